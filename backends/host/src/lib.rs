//! The host reference backend: Linux namespaces, a cgroup leaf per cell, strict spawn hygiene.
//!
//! Every rule of the contract holds here; the conformance suite treats a scenario that fails on
//! this backend as a bug in the scenario. Root is required.
//!
//! # How a cell runs
//!
//! `create` writes the cell's config (argv, env, cwd, hostname, root, binds) to a mode-0600 file
//! in the cell's state directory (`<state_root>/<id>`), creates the cell's cgroups and starts the
//! static `cellcheck-host-init` with an empty env, stdin on `/dev/null`, stdout and stderr on
//! capture files in the state directory, inside new mount, UTS, IPC and network namespaces and a
//! pending pid namespace. The init is moved into the cgroups before it reads its go byte, so
//! nothing of the cell ever runs outside them. Its first child is pid 1 of the cell; pid 1 builds
//! the root, forks the workload and holds it until the backend has found its host pid, then lets
//! it exec. Declared env values never appear on a command line; the config file is removed as
//! soon as the init has read it. See the `cellcheck-host-init` crate for the in-cell side.
//!
//! # Operations
//!
//! - `wait` enforces `run.timeoutMs` (a timer also kills the cell at the deadline when nobody
//!   waits); a SIGKILL while the cell's memory cgroup recorded an OOM kill is reported as
//!   [`Termination::OutOfMemory`].
//! - `exec` joins the namespaces of the cell's pid 1 through a fresh `cellcheck-host-init exec`
//!   process placed in the cell's cgroups, with the same env and fd hygiene. Exec into a paused
//!   cell, or one whose workload has ended, is [`CellError::InvalidState`].
//! - `pause`/`resume` use the freezer (v1 `freezer.state`, v2 `cgroup.freeze`). `wait` on a paused
//!   cell keeps waiting; the timeout keeps running.
//! - Snapshots would need CRIU; [`HostBackend::new`] runs `criu check` once per process and the
//!   capability says why it is unsupported either way.
//! - Dropping the backend destroys every cell it still tracks.
//!
//! # Nested cells
//!
//! A driver can run inside a host cell and create cells itself. Give the outer cell
//! [`HostConfig::extra_binds`] for `/sys/fs/cgroup` (read-write; the cell's read-only sysfs
//! provides the mount point) and for the fixtures directory (e.g. at `/run/fixtures`, on the
//! cell's own tmpfs), and point the inner backend's `state_root` somewhere writable in the cell
//! (the default under `/run` is: `/run` is a tmpfs in every cell). The cell runs as root with all
//! capabilities, so the inner init can create namespaces. Inner cells get their own cgroups next
//! to the outer cell's (not inside them), so the outer cell's limits do not bound them.

mod cell;
mod cgroup;
mod exec;
mod freeze;
mod spawn;
mod start;
mod state;
#[doc(hidden)]
pub mod test_support;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellcheck_contract::table::{CellTable, Reservation};
use cellcheck_contract::trace::{failed, traced};
use cellcheck_contract::{
    AdmittedCell, Availability, Backend, Capabilities, Capability, CellDocument, CellError,
    CellHandle, ExecRequest, ExitReport, Footprint, Retry, TeardownReport,
};
use tracing::{debug, info_span, Instrument, Span};

use cell::Cell;
pub use cgroup::{HostLayout, Plan, Version as CgroupVersion};
use state::StateRoot;
pub use state::DEFAULT_STATE_BASE;

/// How long the init may take to start a workload before `create` gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long destroy waits for a cell's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// A host path bound into every cell (see the crate docs on nested cells).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    /// Absolute path inside the cell. It must exist in the root, or lie on one of the cell's own
    /// tmpfs mounts (`/tmp`, `/run`, `/dev`) where it is created.
    pub target: PathBuf,
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The static `cellcheck-host-init` binary.
    pub init: PathBuf,
    /// The root every cell gets, bound read-only.
    pub rootfs: PathBuf,
    /// Where per-cell state directories live; created on first use, removed with the last cell.
    pub state_root: PathBuf,
    pub extra_binds: Vec<BindMount>,
    /// The backend's `name()`.
    pub name: String,
    /// The cgroup filesystem root.
    pub cgroup_root: PathBuf,
    /// Cells keep their capabilities and run without no_new_privs, seccomp filter and cgroup
    /// namespace. Only for cells that run cells themselves (nested); never the default.
    pub privileged: bool,
}

/// Why [`Capability::VmmConfinement`] does not apply: there is no VMM between cell and host.
const NO_VMM: &str =
    "no VMM: a cell is processes on the host kernel, checked by the hardening family";

fn instance_id() -> String {
    format!("{}-{:08x}", std::process::id(), rand::random::<u32>())
}

impl HostConfig {
    pub fn new(init: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> Self {
        HostConfig {
            init: init.into(),
            rootfs: rootfs.into(),
            state_root: PathBuf::from(DEFAULT_STATE_BASE).join(instance_id()),
            extra_binds: Vec::new(),
            name: "host".into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            privileged: false,
        }
    }

    pub fn from_fixtures(fx: &cellcheck_fixtures::Fixtures) -> Self {
        Self::new(&fx.host_init, &fx.rootfs)
    }
}

struct Inner {
    cfg: HostConfig,
    instance: String,
    plan: Plan,
    snapshot_reason: String,
    cells: CellTable<Cell>,
    state: StateRoot,
}

/// The host backend. Cheap to clone; clones share their cells.
#[derive(Clone)]
pub struct HostBackend {
    inner: Arc<Inner>,
}

static CRIU: OnceLock<String> = OnceLock::new();

/// Why snapshots are unsupported here, from `criu check` (run once per process).
fn criu_reason() -> String {
    CRIU.get_or_init(|| {
        // Found by path: the command runs with a cleared env, whose exec never looks in /usr/sbin.
        match Command::new(cellcheck_fixtures::host_tool("criu").unwrap_or_else(|| "criu".into()))
            .arg("check")
            .env_clear()
            .stdin(Stdio::null())
            .output()
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound => "criu: not found".into(),
            Err(e) => format!("criu check could not run: {e}"),
            Ok(out) if !out.status.success() => {
                let err = String::from_utf8_lossy(&out.stderr);
                let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                format!("criu check failed ({}): {first}", out.status)
            }
            Ok(_) => "host snapshots through CRIU are not implemented".into(),
        }
    })
    .clone()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not make every later call panic too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn failure(reason: impl Into<String>) -> CellError {
    CellError::BackendFailure {
        reason: reason.into(),
        retry: Retry::Unknown,
    }
}

/// `spawn_blocking` inside the caller's span, so a blocking step's events belong to its operation.
fn blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

impl HostBackend {
    pub fn new(cfg: HostConfig) -> HostBackend {
        let instance = cfg
            .state_root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| cellcheck_contract::spec::validate_id(n).is_ok())
            .unwrap_or_else(instance_id);
        let plan = HostLayout::detect(&cfg.cgroup_root).plan();
        HostBackend {
            inner: Arc::new(Inner {
                instance,
                plan,
                snapshot_reason: criu_reason(),
                cells: CellTable::new(),
                state: StateRoot::new(cfg.state_root.clone()),
                cfg,
            }),
        }
    }

    pub fn config(&self) -> &HostConfig {
        &self.inner.cfg
    }

    /// Where each cgroup controller lives on this host.
    pub fn cgroup_plan(&self) -> &Plan {
        &self.inner.plan
    }

    /// The cell's state directory (exists while the cell does).
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.inner.state.cell_dir(id)
    }

    fn live(&self, id: &str) -> Result<Arc<Cell>, CellError> {
        self.inner.cells.get(id)
    }

    /// The span of one operation on one cell.
    fn span(&self, op: &'static str, id: &str) -> Span {
        info_span!("host", op, backend = %self.inner.cfg.name, cell = %id)
    }
}

impl Inner {
    fn footprint(&self, id: &str) -> Footprint {
        let state_dir = self.state.cell_dir(id);
        Footprint {
            process_markers: vec![state_dir.display().to_string()],
            cgroup_dirs: self
                .plan
                .cell_dirs(&self.instance, id)
                .into_iter()
                .map(|d| d.dir)
                .collect(),
            paths: vec![state_dir.clone()],
            mount_markers: vec![state_dir.display().to_string()],
            netns: Vec::new(),
        }
    }

    /// Destroy `id` (only the incarnation `incarnation`, when given: timers of an earlier cell
    /// with the same id must not touch a new one). A concurrent destroy of the same cell waits
    /// until this one is over, then hears `NotFound` (the cell table's rule).
    async fn destroy(
        self: &Arc<Self>,
        id: &str,
        incarnation: Option<u64>,
    ) -> Result<TeardownReport, CellError> {
        let teardown = self.cells.begin_destroy(id, incarnation).await?;
        debug!(incarnation = teardown.incarnation(), "teardown begins");
        let (inner, cell) = (self.clone(), teardown.cell().clone());
        let res = blocking(move || {
            let r = cell.teardown();
            // Before the id leaves the table: whoever hears NotFound finds nothing left.
            inner.state.remove_if_empty();
            r
        })
        .await
        .unwrap_or_else(|e| Err(failure(format!("destroy task: {e}"))));
        let remaining_cells = teardown.finish();
        debug!(remaining_cells, "teardown over");
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running: res?,
            remaining_cells,
        })
    }

    /// The rest of `create` once the id is reserved; dropping the reservation on failure frees
    /// the id.
    async fn create_reserved(
        self: Arc<Self>,
        cell: AdmittedCell,
        reservation: Reservation<Cell>,
    ) -> Result<CellHandle, CellError> {
        let id = cell.id().to_string();
        let incarnation = reservation.incarnation();
        let inner = self.clone();
        let c2 = cell.clone();
        let c = blocking(move || inner.start(&c2))
            .await
            .unwrap_or_else(|e| Err(failure(format!("create task: {e}"))))
            .map(Arc::new)?;
        let host_pid = c.host_pid;
        reservation.commit(c);
        if let Some(ms) = cell.timeout_ms() {
            // Also when nobody waits: the workload is dead by its deadline.
            self.cells.reap_after(
                &self,
                &id,
                incarnation,
                Duration::from_millis(ms),
                |_, c| {
                    let span = info_span!("timeout", cell = %c.id);
                    async move {
                        let _ = blocking(move || c.expire()).await;
                    }
                    .instrument(span)
                },
            );
        }
        if let Some(ttl) = cell.ttl_seconds() {
            let id2 = id.clone();
            self.cells.reap_after(
                &self,
                &id,
                incarnation,
                Duration::from_secs(ttl),
                move |inner, _| {
                    let span = info_span!("ttl", cell = %id2);
                    async move {
                        let _ = failed(inner.destroy(&id2, Some(incarnation)).await);
                    }
                    .instrument(span)
                },
            );
        }
        Ok(CellHandle { id, host_pid })
    }
}

#[async_trait]
impl Backend for HostBackend {
    fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
            .without(Capability::Snapshot, self.inner.snapshot_reason.clone())
            .without(Capability::VmmConfinement, NO_VMM)
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert("cgroup".into(), self.inner.plan.describe());
        a
    }

    async fn preflight(&self) -> Availability {
        let un = |reason: String| Availability::Unavailable { reason };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return un("host backend needs root".into());
        }
        let missing_ns: Vec<&str> = ["mnt", "pid", "net", "uts", "ipc"]
            .into_iter()
            .filter(|ns| !Path::new("/proc/self/ns").join(ns).exists())
            .collect();
        if !missing_ns.is_empty() {
            return un(format!(
                "kernel lacks namespaces: {}",
                missing_ns.join(", ")
            ));
        }
        if let Some(why) = self.inner.plan.unusable() {
            return un(why);
        }
        for (what, p) in [
            ("init", &self.inner.cfg.init),
            ("rootfs", &self.inner.cfg.rootfs),
        ] {
            if !p.exists() {
                return un(format!("{what} not found at {}", p.display()));
            }
        }
        let id = format!("preflight-{:08x}", rand::random::<u32>());
        let t0 = Instant::now();
        let doc = CellDocument::new(&id, ["/bin/true"]).with_timeout_ms(20_000);
        let res = match self.create(&doc).await {
            Ok(_) => {
                let r = self.wait(&id).await;
                let _ = self.destroy(&id).await;
                r
            }
            Err(e) => Err(e),
        };
        let ms = t0.elapsed().as_millis();
        match res {
            Ok(r) if r.code() == Some(0) => Availability::Available {
                evidence: format!(
                    "cgroup {}: /bin/true in a cell exited 0, create to destroy in {ms} ms",
                    self.inner.plan.describe()
                ),
            },
            Ok(r) => un(format!(
                "/bin/true in a cell ended with {:?}",
                r.termination
            )),
            Err(e) => un(format!("trivial cell failed: {e}")),
        }
    }

    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let span = self.span("create", &doc.spec.id);
        traced(async {
            let cell = doc.admit()?;
            let reservation = self.inner.cells.reserve(cell.id())?;
            debug!(incarnation = reservation.incarnation(), "id reserved");
            // A task of its own: a caller that gives up on the future must not strand a
            // started cell half-made, nor leave it without its timers.
            tokio::spawn(
                Inner::create_reserved(self.inner.clone(), cell, reservation).in_current_span(),
            )
            .await
            .unwrap_or_else(|e| Err(failure(format!("create task: {e}"))))
        })
        .instrument(span)
        .await
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        let span = self.span("wait", id);
        traced(self.wait_inner(id)).instrument(span).await
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        let span = self.span("destroy", id);
        traced(self.inner.destroy(id, None)).instrument(span).await
    }

    fn footprint(&self, id: &str) -> Footprint {
        self.inner.footprint(id)
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let span = self.span("exec", id);
        traced(exec::run(self, id, req)).instrument(span).await
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        let span = self.span("pause", id);
        traced(self.freeze(id, true)).instrument(span).await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        let span = self.span("resume", id);
        traced(self.freeze(id, false)).instrument(span).await
    }

    async fn list(&self) -> Vec<String> {
        // A cell being destroyed is listed until it is gone.
        self.inner.cells.list()
    }
}

impl HostBackend {
    async fn wait_inner(&self, id: &str) -> Result<ExitReport, CellError> {
        let cell = self.live(id)?;
        let mut done = cell.shared.done.subscribe();
        let deadline = cell
            .timeout_ms
            .map(|ms| tokio::time::Instant::from_std(cell.created) + Duration::from_millis(ms));
        loop {
            if *done.borrow_and_update() {
                return cell.report();
            }
            let changed = match deadline {
                Some(d) => match tokio::time::timeout_at(d, done.changed()).await {
                    Ok(r) => r.is_ok(),
                    Err(_) => {
                        debug!("deadline passed while waiting");
                        let c = cell.clone();
                        let _ = blocking(move || c.expire()).await;
                        continue;
                    }
                },
                None => done.changed().await.is_ok(),
            };
            if !changed {
                return Err(CellError::cell_not_found(id));
            }
        }
    }

    async fn freeze(&self, id: &str, frozen: bool) -> Result<(), CellError> {
        let cell = self.live(id)?;
        blocking(move || freeze::freeze(&cell, frozen))
            .await
            .unwrap_or_else(|e| Err(failure(format!("freeze task: {e}"))))
    }
}

/// An operation's future, with its failure recorded in its span.
impl Drop for Inner {
    fn drop(&mut self) {
        // Cells never outlive the backend that made them (tests that fail still clean up).
        for c in self.cells.drain() {
            let _ = c.teardown();
        }
        self.state.remove_if_empty();
    }
}
