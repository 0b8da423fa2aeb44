//! OCI runtime backends — runc, crun and gVisor's runsc — through one bundle generator.
//!
//! Each cell is an OCI bundle (`config.json` from [`bundle::config`], root = the shared read-only
//! fixture rootfs) under the backend instance's own state root,
//! `<state parent>/<runtime>-<instance>/{state,bundles,snapshots}`; the runtime gets
//! `--root <state root>/state`, never its global default. The runtime container id is
//! `cc-<instance>-<the id's first 32 characters>-<digest of the id>`, so two backends (or two test
//! processes) using the same cell id never share a container, cgroup or process marker, and a
//! 128-byte id still makes names the runtime can store (runsc's lock file
//! `<cid>_sandbox:<cid>.lock` must fit NAME_MAX). The footprint names the container id as a
//! process marker, so whatever a cell leaves under it is attributed to the cell.
//!
//! # Where things are
//!
//! | file | owns |
//! | --- | --- |
//! | [`runtime`] | the runtime CLI and every difference between runc, crun and runsc |
//! | `probe` | what the host offers (binary, version, cgroups, CRIU) and the preflight |
//! | `layout` | paths: container ids, bundle, state and snapshot dirs, the footprint |
//! | `launch` | create and restore: bundle, runtime `create`/`restore` under the [`shim`], `start` |
//! | `monitor` | how a cell's exit status is obtained, its timeout, out-of-memory |
//! | `exec` | a process run in a live cell |
//! | `snapshot` | checkpoint, restore input, pause and resume |
//! | `teardown` | destroy, the scrub of a failed create, and the backend's `Drop` |
//!
//! Cells live in the contract's [`CellTable`]: one rule for duplicate ids, concurrent destroys
//! (the loser waits until teardown is over) and TTL timers of an earlier incarnation.
//!
//! # How the exit status is obtained
//!
//! - runc, crun: `create` runs under a subreaper [`shim`]; once `create` exits, the container's
//!   init is the shim's child, and the shim reports its raw wait status (exit code and signal stay
//!   distinct). The same for `exec --detach`.
//! - runsc: the workload is not a host process. The pid the shim reports on is the sandbox, which
//!   exits once its workload has; then the sandbox's own boot log line (`application exiting with
//!   …`, written with `--debug-log --debug-command=boot`) says exactly how the workload ended.
//!   `runsc wait` is not used: it prints a folded `128+N` code, not a wait status.
//!   `runsc exec` exits with a folded `128+N` code too, but logs the exec'd process's raw wait
//!   status (`Exiting with status: N`, with `--debug-log --debug-command=exec`), which is read.
//! - OOM: when the workload died of SIGKILL and the cell cgroup's `oom_kill` counter (v1
//!   `memory.oom_control`, v2 `memory.events`) is non-zero, the termination is `OutOfMemory`.
//!
//! # runsc specifics
//!
//! - `--network=none`, `--oci-seccomp` (else the bundle's seccomp profile is ignored) and
//!   `--platform` (ptrace, or systrap where this runsc knows it) on every command: runsc re-reads
//!   its flags per command.
//! - Snapshot = `runsc checkpoint --image-path`: the source's workload stops, as `checkpoint` does
//!   by default (`--leave-running` hangs with the runsc release this was built against); the cell
//!   stays listed until destroyed. Restore = `runsc restore --detach` of a fresh
//!   bundle into a new container id. The image and the cell document stay until
//!   `delete_snapshot`, so a restore works after the source is destroyed.
//! - runsc adds `HOME=/` to a workload's env when the bundle does not set it. The backend does not
//!   hide it: the env-exactness scenario is a recorded known failure for runsc.

pub mod bundle;
pub mod runtime;
pub mod shim;

mod exec;
mod freezer;
mod launch;
mod layout;
mod monitor;
mod probe;
mod snapshot;
mod teardown;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cellcheck_contract::table::CellTable;
use cellcheck_contract::trace::traced;
use cellcheck_contract::{
    AdmittedCell, Availability, Backend, Capabilities, Capability, CellDocument, CellError,
    CellHandle, ExecRequest, ExitReport, Footprint, Retry, SnapshotRef, TeardownReport,
};
use cellcheck_fixtures::Fixtures;
use tokio::sync::watch;
use tracing::{info_span, Instrument, Span};

use runtime::Runtime;
pub use runtime::RuntimeKind;
use shim::Shim;

/// Where instance state roots go unless configured otherwise.
pub const DEFAULT_STATE_PARENT: &str = "/run/cellcheck";

/// How long teardown waits for a runtime's processes to go away before reporting a failure.
const TEARDOWN_WAIT: Duration = Duration::from_secs(15);

/// Backend configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciConfig {
    /// The shared read-only root every cell runs in (never copied).
    pub rootfs: PathBuf,
    /// Parent of the per-instance state roots.
    pub state_parent: PathBuf,
    /// The runtime binary; `None` = `CELLCHECK_<RUNTIME>_BIN`, else `PATH`.
    pub bin: Option<PathBuf>,
}

impl OciConfig {
    pub fn from_fixtures(fx: &Fixtures) -> Self {
        OciConfig {
            rootfs: fx.rootfs.clone(),
            state_parent: PathBuf::from(DEFAULT_STATE_PARENT),
            bin: None,
        }
    }
}

/// The answer a wait gets, shared by every waiter.
type WaitResult = Result<ExitReport, CellError>;

/// One live container.
struct Live {
    cell: AdmittedCell,
    rid: String,
    dir: PathBuf,
    shim: Shim,
    host_pid: Option<u32>,
    exit: watch::Receiver<Option<WaitResult>>,
    paused: AtomicBool,
    /// The monitor and the TTL timer: stopped by teardown.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Live {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

struct Inner {
    kind: RuntimeKind,
    runtime: Result<Runtime, String>,
    version: String,
    instance: String,
    root: PathBuf,
    rootfs: PathBuf,
    hierarchies: Vec<PathBuf>,
    caps: Capabilities,
    cells: CellTable<Live>,
    /// Held across "reserve an id + create the state root" and "table empty? + remove the state
    /// root", so a create never finds its root removed under it.
    root_guard: Mutex<()>,
    snapshots: Mutex<HashMap<String, PathBuf>>,
    seq: AtomicU64,
}

/// An OCI runtime backend (runc, crun or runsc). Cheap to clone; clones share their cells.
#[derive(Clone)]
pub struct OciBackend {
    inner: Arc<Inner>,
}

impl OciBackend {
    pub fn runc(cfg: OciConfig) -> Self {
        Self::new(RuntimeKind::Runc, cfg)
    }
    pub fn crun(cfg: OciConfig) -> Self {
        Self::new(RuntimeKind::Crun, cfg)
    }
    pub fn runsc(cfg: OciConfig) -> Self {
        Self::new(RuntimeKind::Runsc, cfg)
    }

    /// Construction probes the host once (binary, version, runsc platform, `criu check`), so
    /// [`Backend::capabilities`] and [`Backend::attributes`] stay pure afterwards.
    pub fn new(kind: RuntimeKind, cfg: OciConfig) -> Self {
        let instance = format!("{:08x}", rand::random::<u32>());
        let root = cfg.state_parent.join(format!("{}-{instance}", kind.name()));
        let host = probe::HostFacts::probe(kind, cfg.bin.clone());
        let runtime = host.bin.map(|bin| Runtime {
            kind,
            bin,
            state: root.join("state"),
            platform: host.platform,
            unmount: host.unmount,
        });
        OciBackend {
            inner: Arc::new(Inner {
                kind,
                runtime,
                version: host.version,
                instance,
                root,
                rootfs: cfg.rootfs,
                hierarchies: host.hierarchies,
                caps: host.caps,
                cells: CellTable::new(),
                root_guard: Mutex::new(()),
                snapshots: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(0),
            }),
        }
    }

    pub fn kind(&self) -> RuntimeKind {
        self.inner.kind
    }

    /// This instance's state root (`…/<runtime>-<instance>`); gone when no cell or snapshot is left.
    pub fn state_root(&self) -> &Path {
        &self.inner.root
    }

    /// The runtime's container id for cell `id`.
    pub fn container_id(&self, id: &str) -> String {
        self.inner.rid(id)
    }

    /// The runtime binary and flags in use (for running it by hand beside the backend).
    pub fn runtime(&self) -> Result<Runtime, CellError> {
        self.inner.rt()
    }
}

fn failure(what: &str, reason: impl std::fmt::Display) -> CellError {
    CellError::BackendFailure {
        reason: format!("{what}: {reason}"),
        retry: Retry::Unknown,
    }
}

fn invalid_state(operation: &str, state: &str) -> CellError {
    CellError::InvalidState {
        operation: operation.into(),
        state: state.into(),
    }
}

impl OciBackend {
    /// The span of one operation on one cell.
    fn span(&self, op: &'static str, id: &str) -> Span {
        info_span!("oci", op, runtime = self.inner.kind.name(), cell = %id)
    }
}

impl Inner {
    fn rt(&self) -> Result<Runtime, CellError> {
        self.runtime
            .clone()
            .map_err(|reason| CellError::Unavailable { reason })
    }
}

#[async_trait]
impl Backend for OciBackend {
    fn name(&self) -> &str {
        self.inner.kind.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps.clone()
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert("runtime".into(), self.inner.kind.name().into());
        if !self.inner.version.is_empty() {
            a.insert("runtime_version".into(), self.inner.version.clone());
        }
        if let Ok(rt) = &self.inner.runtime {
            if let Some(p) = &rt.platform {
                a.insert("platform".into(), p.clone());
            }
        }
        a
    }

    async fn preflight(&self) -> Availability {
        self.inner.preflight().await
    }

    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let span = self.span("create", &doc.spec.id);
        traced(self.inner.create(doc)).instrument(span).await
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        traced(self.inner.wait_outcome(id))
            .instrument(self.span("wait", id))
            .await
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        traced(self.inner.destroy(id, None))
            .instrument(self.span("destroy", id))
            .await
    }

    fn footprint(&self, id: &str) -> Footprint {
        self.inner.footprint(id)
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let span = self.span("exec", id);
        traced(async {
            self.inner.caps.require(Capability::Exec)?;
            self.inner.exec(id, req).await
        })
        .instrument(span)
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
        let span = self.span("pause", id);
        traced(async {
            self.inner.caps.require(Capability::Pause)?;
            self.inner.set_paused(id, true).await
        })
        .instrument(span)
        .await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        let span = self.span("resume", id);
        traced(async {
            self.inner.caps.require(Capability::Pause)?;
            self.inner.set_paused(id, false).await
        })
        .instrument(span)
        .await
    }

    async fn list(&self) -> Vec<String> {
        self.inner.cells.list()
    }
}
