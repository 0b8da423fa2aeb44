//! A QEMU microVM backend: KVM where it works, TCG where it does not, a guest agent inside.
//!
//! Each cell is one QEMU process booting the fixture kernel and initramfs; the guest agent
//! (`cellcheck-guest-agent`, pid 1 in the guest) runs the workload and execs over the line
//! protocol documented in `backends/guest-agent/PROTOCOL.md`, on the guest's second serial port.
//! QEMU itself is driven through QMP: `stop`/`cont` for pause, `migrate` for snapshots, `quit`.
//!
//! - **Work dir**: `<run root>/qemu-<instance>/<id>/` (console log, QEMU's log), removed on destroy;
//!   the instance dir (`<pid>-<random>`) is removed when it holds nothing more. The run root is
//!   `/run/cellcheck` unless configured.
//! - **Snapshots**: `<instance>/snapshots/<id>/<n>/` holds the migration stream (`state`) and what
//!   restore needs (`meta.json`); they last until deleted or until the backend value is dropped
//!   (only the value that took a snapshot can restore it). Restore starts a new QEMU with `-incoming` under a new id; the
//!   backend then sets the guest hostname to the new id, so [`Capability::Hostname`] holds for
//!   restored cells too. The restored cell's `run.timeoutMs` and ttl count from the restore.
//! - **Accelerator**: fixed at construction: the configured one, else KVM only when a cached
//!   functional probe (see [`probe_accelerator`]) saw a KVM guest reach the agent, else TCG. So
//!   [`Backend::attributes`] (`accelerator = kvm|tcg`) is pure and the same for the whole run.
//! - **Limits**: `memoryMaxBytes` and `pidsMax` are enforced by cgroup v2 inside the guest (the
//!   guest RAM is raised above the limit, so the cgroup, not the VM, runs out); an OOM kill is
//!   reported as [`Termination::OutOfMemory`].

mod probe;
mod vm;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellcheck_contract::{
    AdmittedCell, Availability, Backend, Capabilities, Capability, CellDocument, CellError,
    CellHandle, ExecRequest, ExitReport, Footprint, ResourceKind, Retry, SnapshotRef,
    TeardownReport, Termination,
};
use cellcheck_fixtures::guest::GuestArtifacts;
use cellcheck_fixtures::Fixtures;
use cellcheck_guest_agent::{b64_decode, EnvPair, ErrorKind, JobEnd, Op, ReplyBody, WORKLOAD_JOB};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use probe::{probe_accelerator, probe_with};
use vm::{Vm, VmSpec};

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How to run cells.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `CELLCHECK_QEMU_BIN`, else `qemu-system-x86_64` from `PATH`.
    pub qemu_bin: PathBuf,
    /// Kernel and initramfs, or why there are none (then every cell fails as unavailable).
    pub guest: Result<GuestArtifacts, String>,
    /// `None`: decide from the cached probe (KVM only when it really booted), see [`QemuBackend`].
    pub accel: Option<Accel>,
    /// Guest RAM when no memory limit asks for more.
    pub memory_mib: u64,
    /// How long a boot (or a restore) may take before it is a failure.
    pub boot_timeout: Duration,
    /// Where per-instance work dirs are made.
    pub run_root: PathBuf,
}

impl QemuConfig {
    /// Kernel and initramfs from the fixtures (fetching the kernel once if needed, see
    /// [`cellcheck_fixtures::guest`]). Does not fail: a missing guest is reported by preflight.
    pub fn from_fixtures(fx: &Fixtures) -> Self {
        QemuConfig {
            qemu_bin: std::env::var_os("CELLCHECK_QEMU_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default_qemu_bin())),
            guest: cellcheck_fixtures::guest::ensure_guest(fx).map_err(|e| e.to_string()),
            accel: None,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(60),
            run_root: PathBuf::from("/run/cellcheck"),
        }
    }
}

fn default_qemu_bin() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "qemu-system-aarch64"
    } else {
        "qemu-system-x86_64"
    }
}

/// Room the guest kernel and agent need beside a cell's memory limit.
const GUEST_OVERHEAD_MIB: u64 = 160;
/// Longest single agent long-poll; between polls other requests (exec) get the channel.
const WAIT_SLICE: Duration = Duration::from_millis(400);
/// Any agent request answers within this (a slow TCG guest on a busy host included).
const REQUEST_BOUND: Duration = Duration::from_secs(20);

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

struct Cell {
    generation: u64,
    doc: AdmittedCell,
    dir: PathBuf,
    vm: Vm,
    /// When `run.timeoutMs` starts counting (create, or restore).
    started: Instant,
    state: StdMutex<CellState>,
    ttl: StdMutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct CellState {
    paused: bool,
    outcome: Option<Result<ExitReport, CellError>>,
}

enum Slot {
    /// Being created or restored: the id is taken, the cell is not usable yet.
    Reserved,
    Live(Arc<Cell>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    source: String,
    document: CellDocument,
    memory_mib: u64,
    accel: Accel,
    kernel: PathBuf,
    initramfs: PathBuf,
}

struct Inner {
    config: QemuConfig,
    accel: Accel,
    instance_dir: PathBuf,
    cells: StdMutex<HashMap<String, Slot>>,
    next_snapshot: AtomicU64,
}

/// The QEMU backend. Cheap to clone; all clones share the cells.
#[derive(Clone)]
pub struct QemuBackend {
    inner: Arc<Inner>,
}

impl QemuBackend {
    /// The accelerator is fixed here: `config.accel`, else KVM if a fresh cached probe verdict
    /// says a KVM guest booted, else TCG (no I/O beyond reading that cache file).
    pub fn new(config: QemuConfig) -> Self {
        let accel = config.accel.unwrap_or_else(|| {
            if probe::cached(Accel::Kvm).is_some_and(|a| a.is_available()) {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        });
        let instance = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        QemuBackend {
            inner: Arc::new(Inner {
                instance_dir: config.run_root.join(format!("qemu-{instance}")),
                config,
                accel,
                cells: StdMutex::new(HashMap::new()),
                next_snapshot: AtomicU64::new(1),
            }),
        }
    }

    /// Like [`QemuBackend::new`], but runs the KVM probe first when no verdict is cached.
    pub async fn with_probed_accelerator(config: QemuConfig) -> Self {
        if config.accel.is_none() && probe::cached(Accel::Kvm).is_none() {
            let _ = probe_with(&config, Accel::Kvm).await;
        }
        Self::new(config)
    }

    pub fn accelerator(&self) -> Accel {
        self.inner.accel
    }

    /// The directory of this backend value's cells.
    pub fn instance_dir(&self) -> &Path {
        &self.inner.instance_dir
    }
}

impl Inner {
    fn cell_dir(&self, id: &str) -> PathBuf {
        self.instance_dir.join(id)
    }

    fn snapshots_of(&self, id: &str) -> PathBuf {
        self.instance_dir.join("snapshots").join(id)
    }

    fn guest(&self) -> Result<&GuestArtifacts, CellError> {
        self.config
            .guest
            .as_ref()
            .map_err(|e| CellError::Unavailable {
                reason: format!("qemu: no guest kernel/initramfs: {e}"),
            })
    }

    fn live(&self, id: &str) -> Result<Arc<Cell>, CellError> {
        match self.cells.lock().expect("cells lock").get(id) {
            Some(Slot::Live(c)) => Ok(c.clone()),
            _ => Err(CellError::cell_not_found(id)),
        }
    }

    /// Take `id` for a create or restore. Until committed, dropping the reservation (a failed
    /// or cancelled create) frees the id and removes the work dir.
    fn reserve<'a>(&'a self, id: &str) -> Result<Reservation<'a>, CellError> {
        let mut cells = self.cells.lock().expect("cells lock");
        if cells.contains_key(id) {
            return Err(CellError::AlreadyExists { id: id.into() });
        }
        cells.insert(id.into(), Slot::Reserved);
        Ok(Reservation {
            inner: self,
            id: id.to_string(),
            committed: false,
        })
    }

    /// Remove now-empty parents (snapshot dirs, the instance dir).
    fn prune_dirs(&self, snapshot_cell: Option<&str>) {
        if let Some(id) = snapshot_cell {
            let _ = fs::remove_dir(self.snapshots_of(id));
        }
        let _ = fs::remove_dir(self.instance_dir.join("snapshots"));
        let _ = fs::remove_dir(&self.instance_dir);
    }

    fn memory_for(&self, doc: &AdmittedCell) -> u64 {
        let limit_mib = doc
            .limits()
            .memory_max_bytes
            .map_or(0, |b| b.div_ceil(1 << 20));
        self.config.memory_mib.max(limit_mib + GUEST_OVERHEAD_MIB)
    }

    /// Boot (or restore) a VM for `doc` under its id, which the caller reserved. On failure the
    /// work dir is gone and QEMU is reaped; the caller unreserves.
    async fn launch(
        self: &Arc<Self>,
        doc: AdmittedCell,
        spec: VmSpec,
        restored: bool,
    ) -> Result<Arc<Cell>, CellError> {
        let id = doc.id().to_string();
        let dir = spec.dir.clone();
        fs::create_dir_all(&dir)
            .map_err(|e| CellError::failure(format!("create work dir {}: {e}", dir.display())))?;
        let result = async {
            let vm = Vm::start(spec, self.config.boot_timeout).await?;
            let deadline = Instant::now() + REQUEST_BOUND;
            let started = if restored {
                vm.agent_request(Op::Hostname { name: id.clone() }, deadline)
                    .await
                    .and_then(expect_done)
            } else {
                let limits = doc.limits();
                match vm
                    .agent_request(
                        Op::Run {
                            argv: doc.argv().to_vec(),
                            env: env_pairs(doc.env()),
                            cwd: doc.working_directory().to_string(),
                            hostname: Some(id.clone()),
                            memory_max_bytes: limits.memory_max_bytes,
                            pids_max: limits.pids_max,
                        },
                        deadline,
                    )
                    .await
                {
                    Ok(ReplyBody::Started { .. }) => Ok(()),
                    Ok(other) => Err(agent_error(other, &doc.argv()[0])),
                    Err(e) => Err(e),
                }
            };
            match started {
                Ok(()) => Ok(vm),
                Err(e) => {
                    vm.shutdown().await;
                    Err(e)
                }
            }
        }
        .await;
        let vm = match result {
            Ok(vm) => vm,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                self.prune_dirs(None);
                return Err(e);
            }
        };
        let cell = Arc::new(Cell {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            started: Instant::now(),
            dir,
            vm,
            state: StdMutex::new(CellState::default()),
            ttl: StdMutex::new(None),
            doc,
        });
        if let Some(ttl) = cell.doc.ttl_seconds() {
            let weak: Weak<Inner> = Arc::downgrade(self);
            let generation = cell.generation;
            let id = id.clone();
            let task = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(ttl)).await;
                if let Some(inner) = weak.upgrade() {
                    let _ = inner.destroy_if(&id, Some(generation)).await;
                }
            });
            *cell.ttl.lock().expect("ttl lock") = Some(task);
        }
        Ok(cell)
    }

    /// Destroy `id` (only if it is still the cell of `generation`, for the TTL reaper).
    async fn destroy_if(
        &self,
        id: &str,
        generation: Option<u64>,
    ) -> Result<TeardownReport, CellError> {
        let (cell, remaining) = {
            let mut cells = self.cells.lock().expect("cells lock");
            match cells.get(id) {
                Some(Slot::Live(c)) if generation.is_none_or(|g| g == c.generation) => {}
                _ => return Err(CellError::cell_not_found(id)),
            }
            let Some(Slot::Live(cell)) = cells.remove(id) else {
                unreachable!("checked above");
            };
            (cell, cells.len())
        };
        if generation.is_none() {
            if let Some(t) = cell.ttl.lock().expect("ttl lock").take() {
                t.abort();
            }
        }
        let (paused, ended) = {
            let st = cell.state.lock().expect("state lock");
            (st.paused, st.outcome.is_some())
        };
        let mut killed_running = false;
        if !ended && !paused {
            let deadline = Instant::now() + Duration::from_secs(2);
            killed_running = matches!(
                cell.vm
                    .agent_request(
                        Op::Wait {
                            job: WORKLOAD_JOB,
                            timeout_ms: 0
                        },
                        deadline
                    )
                    .await,
                Ok(ReplyBody::Running { .. })
            );
        } else if paused {
            killed_running = !ended;
        }
        cell.vm.shutdown().await;
        let _ = fs::remove_dir_all(&cell.dir);
        self.prune_dirs(None);
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running,
            remaining_cells: remaining,
        })
    }
}

struct Reservation<'a> {
    inner: &'a Inner,
    id: String,
    committed: bool,
}

impl Reservation<'_> {
    fn commit(mut self, cell: Arc<Cell>) -> CellHandle {
        self.inner
            .cells
            .lock()
            .expect("cells lock")
            .insert(self.id.clone(), Slot::Live(cell));
        self.committed = true;
        CellHandle {
            id: self.id.clone(),
            host_pid: None,
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        {
            let mut cells = self.inner.cells.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(cells.get(&self.id), Some(Slot::Reserved)) {
                cells.remove(&self.id);
            }
        }
        // QEMU, if it was started, is killed by its handle's kill-on-drop.
        let _ = fs::remove_dir_all(self.inner.cell_dir(&self.id));
        self.inner.prune_dirs(None);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Cells never destroyed: kill QEMU. Snapshots can only be restored by this backend value,
        // so its whole instance dir (work dirs and snapshots) goes with it.
        let cells = std::mem::take(&mut *self.cells.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, slot) in cells {
            if let Slot::Live(c) = slot {
                c.vm.kill_now();
                let _ = fs::remove_dir_all(&c.dir);
            }
        }
        let _ = fs::remove_dir_all(&self.instance_dir);
    }
}

fn env_pairs(env: &[cellcheck_contract::EnvVar]) -> Vec<EnvPair> {
    env.iter()
        .map(|e| EnvPair {
            name: e.name.clone(),
            value: e.value.clone(),
        })
        .collect()
}

fn expect_done(r: ReplyBody) -> Result<(), CellError> {
    match r {
        ReplyBody::Done => Ok(()),
        other => Err(agent_error(other, "")),
    }
}

/// An agent reply that is not the expected one, as a typed error.
fn agent_error(r: ReplyBody, program: &str) -> CellError {
    match r {
        ReplyBody::Error {
            kind: ErrorKind::ProgramNotFound,
            ..
        } => CellError::NotFound {
            kind: ResourceKind::Program,
            id: program.to_string(),
        },
        ReplyBody::Error {
            kind: ErrorKind::InvalidState,
            message,
        } => CellError::InvalidState {
            operation: "agent".into(),
            state: message,
        },
        ReplyBody::Error { kind, message } => CellError::BackendFailure {
            reason: format!("guest agent: {kind:?}: {message}"),
            retry: Retry::NotRetryable,
        },
        other => CellError::failure(format!("guest agent: unexpected reply {other:?}")),
    }
}

fn exit_report(end: JobEnd, stdout: &str, stderr: &str) -> Result<ExitReport, CellError> {
    let dec = |s: &str| b64_decode(s).map_err(|e| CellError::failure(format!("guest agent: {e}")));
    Ok(ExitReport {
        termination: match end {
            JobEnd::Exited { code } => Termination::Exited { code },
            JobEnd::Signaled { signal } => Termination::Signaled { signal },
            JobEnd::OutOfMemory => Termination::OutOfMemory,
        },
        stdout: dec(stdout)?,
        stderr: dec(stderr)?,
    })
}

impl Cell {
    fn paused(&self) -> bool {
        self.state.lock().expect("state lock").paused
    }

    /// Long-poll `job` until it ends or `deadline` passes (`Ok(None)`). Paused: no agent traffic.
    async fn poll_job(
        &self,
        job: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<ExitReport>, CellError> {
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if self.paused() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let slice = deadline.map_or(WAIT_SLICE, |d| (d - now).min(WAIT_SLICE));
            let r = self
                .vm
                .agent_request(
                    Op::Wait {
                        job,
                        timeout_ms: slice.as_millis() as u64,
                    },
                    Instant::now() + slice + REQUEST_BOUND,
                )
                .await?;
            match r {
                ReplyBody::Exited {
                    end,
                    stdout,
                    stderr,
                    ..
                } => return exit_report(end, &stdout, &stderr).map(Some),
                ReplyBody::Running { .. } => {}
                other => return Err(agent_error(other, "")),
            }
        }
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with(Capability::Exec)
            .with(Capability::Snapshot)
            .with(Capability::Pause)
            .with(Capability::Timeout)
            .with(Capability::Ttl)
            .with(Capability::NetworkIsolation)
            .with(Capability::PidIsolation)
            .with(Capability::Hostname)
            .with(Capability::MemoryLimit)
            .with(Capability::PidsLimit)
            .without(
                Capability::HostPid,
                "a microVM workload has no host-visible pid",
            )
    }

    async fn preflight(&self) -> Availability {
        probe_with(&self.inner.config, self.inner.accel).await
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert("accelerator".into(), self.inner.accel.as_str().into());
        a.insert(
            "guest_memory_mib".into(),
            self.inner.config.memory_mib.to_string(),
        );
        if let Ok(g) = &self.inner.config.guest {
            a.insert("guest_kernel".into(), g.kernel_origin.clone());
        }
        a.insert(
            "agent_protocol".into(),
            cellcheck_guest_agent::PROTOCOL_VERSION.to_string(),
        );
        a
    }

    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let admitted = doc.admit()?;
        let guest = self.inner.guest()?.clone();
        let id = admitted.id().to_string();
        let reservation = self.inner.reserve(&id)?;
        let spec = VmSpec {
            qemu_bin: self.inner.config.qemu_bin.clone(),
            kernel: guest.kernel,
            initramfs: guest.initramfs,
            accel: self.inner.accel,
            memory_mib: self.inner.memory_for(&admitted),
            dir: self.inner.cell_dir(&id),
            incoming: None,
        };
        let cell = self.inner.launch(admitted, spec, false).await?;
        Ok(reservation.commit(cell))
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        let cell = self.inner.live(id)?;
        if let Some(o) = &cell.state.lock().expect("state lock").outcome {
            return o.clone();
        }
        let timeout = cell.doc.timeout_ms().map(Duration::from_millis);
        let deadline = timeout.map(|t| cell.started + t);
        let outcome = match cell.poll_job(WORKLOAD_JOB, deadline).await? {
            Some(report) => Ok(report),
            None => {
                // Deadline: kill every process of the cell, wait for the workload's end.
                let bound = Instant::now() + REQUEST_BOUND;
                let _ = cell
                    .vm
                    .agent_request(
                        Op::Kill {
                            job: None,
                            signal: libc::SIGKILL,
                        },
                        bound,
                    )
                    .await;
                let _ = cell.poll_job(WORKLOAD_JOB, Some(bound)).await;
                Err(CellError::DeadlineExceeded {
                    after_ms: timeout.map_or(0, |t| t.as_millis() as u64),
                })
            }
        };
        let mut st = cell.state.lock().expect("state lock");
        Ok(st.outcome.get_or_insert(outcome).clone()?)
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        self.inner.destroy_if(id, None).await
    }

    fn footprint(&self, id: &str) -> Footprint {
        let dir = self.inner.cell_dir(id);
        Footprint {
            // The work dir path is in QEMU's command line (`-serial file:<dir>/console.log`).
            process_markers: vec![format!("{}/", dir.display())],
            paths: vec![dir, self.inner.snapshots_of(id)],
            ..Footprint::default()
        }
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let cell = self.inner.live(id)?;
        if cell.paused() {
            return Err(CellError::InvalidState {
                operation: "exec".into(),
                state: "paused".into(),
            });
        }
        if req.argv.is_empty() || req.argv.iter().any(|a| a.is_empty() || a.contains('\0')) {
            return Err(CellError::invalid(
                "argv",
                "must be non-empty strings without NUL",
            ));
        }
        let r = cell
            .vm
            .agent_request(
                Op::Exec {
                    argv: req.argv.clone(),
                    env: env_pairs(&req.env),
                    cwd: "/".into(),
                },
                Instant::now() + REQUEST_BOUND,
            )
            .await?;
        let job = match r {
            ReplyBody::Started { job, .. } => job,
            other => return Err(agent_error(other, &req.argv[0])),
        };
        let deadline = req
            .timeout_ms
            .map(|t| Instant::now() + Duration::from_millis(t));
        let result = cell.poll_job(job, deadline).await;
        let bound = Instant::now() + REQUEST_BOUND;
        let result = match result {
            Ok(Some(report)) => Ok(report),
            Ok(None) => {
                let _ = cell
                    .vm
                    .agent_request(
                        Op::Kill {
                            job: Some(job),
                            signal: libc::SIGKILL,
                        },
                        bound,
                    )
                    .await;
                let _ = cell.poll_job(job, Some(bound)).await;
                Err(CellError::DeadlineExceeded {
                    after_ms: req.timeout_ms.unwrap_or(0),
                })
            }
            Err(e) => Err(e),
        };
        let _ = cell.vm.agent_request(Op::Forget { job }, bound).await;
        result
    }

    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        let cell = self.inner.live(id)?;
        let guest = self.inner.guest()?;
        let n = self.inner.next_snapshot.fetch_add(1, Ordering::Relaxed);
        let dir = self.inner.snapshots_of(id).join(n.to_string());
        fs::create_dir_all(&dir)
            .map_err(|e| CellError::failure(format!("create {}: {e}", dir.display())))?;
        let state = dir.join("state");
        let result = cell
            .vm
            .with_agent_quiet(async {
                let was_paused = cell.paused();
                let bound = Instant::now() + Duration::from_secs(120);
                if !was_paused {
                    cell.vm.qmp_cmd("stop", json!({}), bound).await?;
                }
                let r = migrate_to_file(&cell.vm, &state, bound).await;
                if !was_paused {
                    cell.vm.qmp_cmd("cont", json!({}), bound).await?;
                }
                r
            })
            .await;
        let meta = SnapshotMeta {
            source: id.to_string(),
            document: cell.doc.document().clone(),
            memory_mib: cell.vm.spec.memory_mib,
            accel: cell.vm.spec.accel,
            kernel: guest.kernel.clone(),
            initramfs: guest.initramfs.clone(),
        };
        let result = result.and_then(|()| {
            let text =
                serde_json::to_vec_pretty(&meta).map_err(|e| CellError::failure(e.to_string()))?;
            fs::write(dir.join("meta.json"), text).map_err(CellError::from)
        });
        match result {
            Ok(()) => Ok(SnapshotRef {
                id: format!("{id}.{n}"),
                source: id.to_string(),
                path: Some(dir),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                self.inner.prune_dirs(Some(id));
                Err(e)
            }
        }
    }

    async fn restore(&self, snap: &SnapshotRef, new_id: &str) -> Result<CellHandle, CellError> {
        let dir = self.snapshot_dir(snap)?;
        let meta: SnapshotMeta = fs::read(dir.join("meta.json"))
            .map_err(|e| CellError::failure(format!("snapshot {}: meta.json: {e}", snap.id)))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| CellError::BackendFailure {
                    reason: format!("snapshot {}: meta.json: {e}", snap.id),
                    retry: Retry::NotRetryable,
                })
            })?;
        let doc = meta.document.admit()?.with_id(new_id)?;
        let reservation = self.inner.reserve(new_id)?;
        let spec = VmSpec {
            qemu_bin: self.inner.config.qemu_bin.clone(),
            kernel: meta.kernel,
            initramfs: meta.initramfs,
            accel: meta.accel,
            memory_mib: meta.memory_mib,
            dir: self.inner.cell_dir(new_id),
            incoming: Some(dir.join("state")),
        };
        let cell = self.inner.launch(doc, spec, true).await?;
        Ok(reservation.commit(cell))
    }

    async fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        let dir = self.snapshot_dir(snap)?;
        fs::remove_dir_all(&dir)
            .map_err(|e| CellError::failure(format!("remove {}: {e}", dir.display())))?;
        self.inner.prune_dirs(Some(&snap.source));
        Ok(())
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        self.set_paused(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        self.set_paused(id, false).await
    }

    async fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner
            .cells
            .lock()
            .expect("cells lock")
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Live(_)))
            .map(|(k, _)| k.clone())
            .collect();
        ids.sort();
        ids
    }
}

impl QemuBackend {
    /// A snapshot of this backend value: its dir must be ours and still exist.
    fn snapshot_dir(&self, snap: &SnapshotRef) -> Result<PathBuf, CellError> {
        let not_found = || CellError::NotFound {
            kind: ResourceKind::Snapshot,
            id: snap.id.clone(),
        };
        let dir = snap.path.clone().ok_or_else(not_found)?;
        if !dir.starts_with(self.inner.instance_dir.join("snapshots")) || !dir.is_dir() {
            return Err(not_found());
        }
        Ok(dir)
    }

    async fn set_paused(&self, id: &str, pause: bool) -> Result<(), CellError> {
        let cell = self.inner.live(id)?;
        let (cmd, state) = if pause {
            ("stop", "paused")
        } else {
            ("cont", "running")
        };
        if cell.paused() == pause {
            return Err(CellError::InvalidState {
                operation: cmd.into(),
                state: format!("already {state}"),
            });
        }
        cell.vm
            .qmp_cmd(cmd, json!({}), Instant::now() + REQUEST_BOUND)
            .await?;
        cell.state.lock().expect("state lock").paused = pause;
        Ok(())
    }
}

/// Write the stopped guest's migration stream to `path` (QEMU 7.2 has no `file:` URI, so it
/// goes through `exec:cat`), lifting the default 32 MiB/s bandwidth cap first.
async fn migrate_to_file(vm: &Vm, path: &Path, deadline: Instant) -> Result<(), CellError> {
    vm.qmp_cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 8u64 << 30}),
        deadline,
    )
    .await?;
    let quoted = format!("'{}'", path.display().to_string().replace('\'', r"'\''"));
    vm.qmp_cmd(
        "migrate",
        json!({"uri": format!("exec:cat > {quoted}")}),
        deadline,
    )
    .await?;
    loop {
        let st = vm.qmp_cmd("query-migrate", json!({}), deadline).await?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(CellError::failure(format!(
                    "snapshot: migration {}: {}",
                    st["status"],
                    st.get("error-desc").and_then(|d| d.as_str()).unwrap_or("")
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(CellError::failure(
                "snapshot: migration did not complete in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
