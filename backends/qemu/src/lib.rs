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
//!   guest RAM is the limit plus the guest's own needs, so the cgroup, not the VM, runs out); an
//!   OOM kill is reported as [`Termination::OutOfMemory`]. The guest RAM is capped at 2 GiB (or
//!   the host's `MemTotal`): a larger limit is a maximum the workload cannot reach, not a size
//!   QEMU must allocate, and the cgroup is given it unchanged (past the guest's memory it is
//!   `max`). `cpuMax` and `openFiles` are not applied yet.
//! - **Hardening**: the in-guest checks only show what the guest kernel allows its own
//!   processes, so their capabilities are declared unsupported; the boundary is the VMM process:
//!   QEMU's seccomp sandbox, no capabilities, no_new_privs, its own mount/net/ipc/uts namespaces
//!   and a cgroup carrying the cell's memory (guest RAM + QEMU's overhead) and a pids limit
//!   (see `confine`).

//!
//! Files: `vm` (the QEMU process and its channels), `agent` (the guest agent's requests: the
//! workload, waits, execs), `lifecycle` (boot or restore into a reserved id, destroy, the TTL),
//! `snapshot` (migration streams, restore input, pause). Cells live in the contract's
//! [`CellTable`].

mod agent;
mod confine;
mod console;
mod lifecycle;
mod lines;
mod probe;
mod snapshot;
mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex as StdMutex};

use cellcheck_contract::trace::traced;
use std::time::{Duration, Instant};
use tracing::{info_span, Instrument, Span};

use async_trait::async_trait;
use cellcheck_contract::table::CellTable;
use cellcheck_contract::{
    AdmittedCell, Availability, Backend, Capabilities, Capability, CellDocument, CellError,
    CellHandle, ExecRequest, ExitReport, Footprint, SnapshotRef, TeardownReport,
};
use cellcheck_fixtures::guest::GuestArtifacts;
use cellcheck_fixtures::Fixtures;
use serde::{Deserialize, Serialize};

pub use probe::{probe_accelerator, probe_with};
use vm::Vm;

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
            qemu_bin: qemu_bin(),
            guest: cellcheck_fixtures::guest::ensure_guest(fx).map_err(|e| e.to_string()),
            accel: None,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(60),
            run_root: PathBuf::from("/run/cellcheck"),
        }
    }
}

/// The QEMU binary: `CELLCHECK_QEMU_BIN`, else the host architecture's on `PATH`.
fn qemu_bin() -> PathBuf {
    std::env::var_os("CELLCHECK_QEMU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default_qemu_bin()))
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
/// The most RAM a guest is given (MiB), the host's `MemTotal` if smaller: a larger limit is
/// still enforced by the guest's cell cgroup, up to what the guest has.
const GUEST_RAM_CAP_MIB: u64 = 2048;
/// Longest single agent long-poll; between polls other requests (exec) get the channel.
const WAIT_SLICE: Duration = Duration::from_millis(400);
/// Any agent request answers within this (a slow TCG guest on a busy host included).
const REQUEST_BOUND: Duration = Duration::from_secs(20);

struct Cell {
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

impl Cell {
    fn paused(&self) -> bool {
        self.state.lock().expect("state lock").paused
    }
}

struct Inner {
    config: QemuConfig,
    accel: Accel,
    instance_dir: PathBuf,
    cells: CellTable<Cell>,
    next_snapshot: AtomicU64,
    /// Boots in flight at most: one per CPU. A boot is CPU-bound (under TCG entirely), so more
    /// at once only makes each slower, until a loaded host pushes them all past the boot bound;
    /// the bound counts from when a boot gets its CPU, so it measures the guest, not the queue.
    boots: tokio::sync::Semaphore,
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
                cells: CellTable::new(),
                next_snapshot: AtomicU64::new(1),
                boots: tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                ),
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

    /// The name of `id`'s VMM cgroup: the instance and the id, so it names the cell.
    fn cgroup_leaf(&self, id: &str) -> String {
        let instance = self.instance_dir.file_name().unwrap_or_default();
        format!("{}-{id}", instance.to_string_lossy())
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
}

/// Why the in-guest hardening checks do not apply: they only show what the guest kernel allows
/// its own processes; the isolation boundary of a microVM is the VMM process on the host.
const GUEST_KERNEL: &str = "an in-guest check concerns only the guest kernel; the boundary of a microVM is the VMM process on the host";

impl QemuBackend {
    /// The span of one operation on one cell.
    fn span(&self, op: &'static str, id: &str) -> Span {
        info_span!("qemu", op, accel = self.inner.accel.as_str(), cell = %id)
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        let in_guest = [
            Capability::DropCapabilities,
            Capability::NoNewPrivs,
            Capability::Seccomp,
            Capability::ReadonlyRoot,
            Capability::ProcMasking,
            Capability::MinimalDev,
            Capability::CgroupIsolation,
        ];
        let caps = Capabilities::default()
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
            // The VMM process on the host: see `confine`.
            .with(Capability::VmmConfinement)
            .without(
                Capability::HostPid,
                "a microVM workload has no host-visible pid",
            )
            .without(
                Capability::Rlimits,
                "the guest agent does not apply limits.openFiles to the workload yet",
            )
            .without(
                Capability::CpuLimit,
                "the guest agent's cgroup carries only memory and pids limits; cpuMax is not applied",
            );
        in_guest
            .into_iter()
            .fold(caps, |c, cap| c.without(cap, GUEST_KERNEL))
    }

    async fn preflight(&self) -> Availability {
        probe_with(&self.inner.config, self.inner.accel).await
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert("accelerator".into(), self.inner.accel.as_str().into());
        // Part of the suite's preflight cache key: a QEMU installed or removed is probed anew.
        let bin = probe::binary_path().map_or("not found".into(), |p| p.display().to_string());
        a.insert("qemu_binary".into(), bin);
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
        let span = self.span("create", &doc.spec.id);
        traced(self.inner.create(doc)).instrument(span).await
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        traced(self.inner.wait(id))
            .instrument(self.span("wait", id))
            .await
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        traced(self.inner.destroy(id, None))
            .instrument(self.span("destroy", id))
            .await
    }

    fn footprint(&self, id: &str) -> Footprint {
        let dir = self.inner.cell_dir(id);
        Footprint {
            // The work dir path is in QEMU's command line (`-serial file:<dir>/console.log`).
            process_markers: vec![format!("{}/", dir.display())],
            cgroup_dirs: confine::dirs_for(&self.inner.cgroup_leaf(id)),
            paths: vec![dir, self.inner.snapshots_of(id)],
            ..Footprint::default()
        }
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        traced(self.inner.exec(id, req))
            .instrument(self.span("exec", id))
            .await
    }

    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        traced(self.inner.snapshot(id))
            .instrument(self.span("snapshot", id))
            .await
    }

    async fn restore(&self, snap: &SnapshotRef, new_id: &str) -> Result<CellHandle, CellError> {
        let span = self.span("restore", new_id);
        traced(self.inner.restore(snap, new_id))
            .instrument(span)
            .await
    }

    async fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        self.inner.delete_snapshot(snap)
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        traced(self.inner.set_paused(id, true))
            .instrument(self.span("pause", id))
            .await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        traced(self.inner.set_paused(id, false))
            .instrument(self.span("resume", id))
            .await
    }

    async fn list(&self) -> Vec<String> {
        self.inner.cells.list()
    }
}
