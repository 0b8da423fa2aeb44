//! OCI runtime backends — runc, crun and gVisor's runsc — through one bundle generator.
//!
//! Each cell is an OCI bundle (`config.json` from [`bundle::config`], root = the shared read-only
//! fixture rootfs) under the backend instance's own state root,
//! `<state parent>/<runtime>-<instance>/{state,bundles,snapshots}`; the runtime gets
//! `--root <state root>/state`, never its global default. The runtime container id is
//! `cc-<instance>-<cell id>`, so two backends (or two test processes) using the same cell id never
//! share a container, cgroup or process marker.
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
//!   `runsc exec` reports a folded `128+N` code, decoded by [`runtime::termination_from_folded_code`].
//! - OOM: when the workload died of SIGKILL and the cell cgroup's `oom_kill` counter (v1
//!   `memory.oom_control`, v2 `memory.events`) is non-zero, the termination is `OutOfMemory`.
//!
//! # runsc specifics
//!
//! - `--network=none` and `--platform` (ptrace, or systrap where this runsc knows it) on every
//!   command: runsc re-reads its flags per command.
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

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellcheck_contract::{
    AdmittedCell, Availability, Backend, Capabilities, Capability, CellDocument, CellError,
    CellHandle, ExecRequest, ExitReport, Footprint, ResourceKind, Retry, SnapshotRef,
    TeardownReport, Termination,
};
use cellcheck_fixtures::Fixtures;
use tokio::sync::watch;

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
type Outcome2 = Result<ExitReport, CellError>;

struct Live {
    cell: AdmittedCell,
    rid: String,
    dir: PathBuf,
    shim: Shim,
    host_pid: Option<u32>,
    exit: watch::Receiver<Option<Outcome2>>,
    paused: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

enum Entry {
    Creating,
    Live(Arc<Live>),
    Destroying,
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
    cells: Mutex<HashMap<String, Entry>>,
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
        let bin = cfg
            .bin
            .clone()
            .map(Ok)
            .unwrap_or_else(|| runtime::find_binary(kind));
        let version = bin
            .as_ref()
            .ok()
            .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let platform = match (&bin, kind) {
            (Ok(b), RuntimeKind::Runsc) => Some(runsc_platform(b)),
            _ => None,
        };
        let runtime = bin.map(|bin| Runtime {
            kind,
            bin,
            state: root.join("state"),
            platform,
        });
        let caps = capabilities_for(kind);
        OciBackend {
            inner: Arc::new(Inner {
                kind,
                runtime,
                version,
                instance,
                root,
                rootfs: cfg.rootfs,
                hierarchies: cgroup_hierarchies(),
                caps,
                cells: Mutex::new(HashMap::new()),
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

/// runsc's platform: `CELLCHECK_RUNSC_PLATFORM`, else systrap where this runsc knows it, else
/// ptrace (KVM needs working nested virtualization, which a CI runner rarely has).
fn runsc_platform(bin: &Path) -> String {
    if let Ok(p) = std::env::var("CELLCHECK_RUNSC_PLATFORM") {
        return p;
    }
    let help = std::process::Command::new(bin)
        .arg("flags")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default();
    if help.contains("systrap") {
        "systrap".into()
    } else {
        "ptrace".into()
    }
}

fn capabilities_for(kind: RuntimeKind) -> Capabilities {
    let base = Capabilities::default()
        .with(Capability::Exec)
        .with(Capability::Pause)
        .with(Capability::Timeout)
        .with(Capability::Ttl)
        .with(Capability::NetworkIsolation)
        .with(Capability::PidIsolation)
        .with(Capability::Hostname);
    match kind {
        RuntimeKind::Runc | RuntimeKind::Crun => base
            .with(Capability::HostPid)
            .with(Capability::MemoryLimit)
            .with(Capability::PidsLimit)
            .without(Capability::Snapshot, criu_reason(kind)),
        RuntimeKind::Runsc => base
            .with(Capability::Snapshot)
            .without(
                Capability::HostPid,
                "the workload runs inside gVisor's sentry; host pids are the sandbox and gofer, not the workload",
            )
            .without(
                Capability::MemoryLimit,
                "runsc applies memory limits to the whole sandbox's host cgroup (sentry included), not to the workload",
            )
            .without(
                Capability::PidsLimit,
                "runsc applies pids limits to the sandbox's host cgroup; the workload's tasks are not host processes",
            ),
    }
}

/// Why runc/crun checkpointing is off: CRIU's own verdict, computed once.
fn criu_reason(kind: RuntimeKind) -> String {
    let out = std::process::Command::new("criu").arg("check").output();
    match out {
        Err(e) => format!("checkpoint needs CRIU: criu: {e}"),
        Ok(o) if o.status.success() => format!(
            "criu check passes, but checkpoint/restore through {} is not implemented by this backend",
            kind.name()
        ),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            let last = text
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("failed")
                .to_string();
            format!("criu check fails on this host: {last}")
        }
    }
}

/// Mounted cgroup hierarchies: the v2 root on a unified host, else every v1 (and hybrid v2) mount.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = fs::read_dir(base)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mkdir_private(p: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

fn new_file(p: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
}

fn failure(what: &str, reason: impl std::fmt::Display) -> CellError {
    CellError::BackendFailure {
        reason: format!("{what}: {reason}"),
        retry: Retry::Unknown,
    }
}

impl Inner {
    fn rid(&self, id: &str) -> String {
        format!("cc-{}-{id}", self.instance)
    }

    fn rt(&self) -> Result<Runtime, CellError> {
        self.runtime
            .clone()
            .map_err(|reason| CellError::Unavailable { reason })
    }

    fn bundle_dir(&self, rid: &str) -> PathBuf {
        self.root.join("bundles").join(rid)
    }

    fn snapshot_parent(&self, rid: &str) -> PathBuf {
        self.root.join("snapshots").join(rid)
    }

    /// What the runtime keeps for a container under its `--root`.
    fn state_entries(&self, rid: &str) -> Vec<PathBuf> {
        let state = self.root.join("state");
        match self.kind {
            RuntimeKind::Runsc => vec![
                state.join(format!("{rid}_sandbox:{rid}.state")),
                state.join(format!("{rid}_sandbox:{rid}.lock")),
            ],
            _ => vec![state.join(rid)],
        }
    }

    fn cgroup_dirs(&self, rid: &str) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.join(rid)).collect()
    }

    fn footprint(&self, id: &str) -> Footprint {
        let rid = self.rid(id);
        let mut paths = vec![self.bundle_dir(&rid), self.snapshot_parent(&rid)];
        paths.extend(self.state_entries(&rid));
        Footprint {
            process_markers: vec![rid.clone()],
            cgroup_dirs: self.cgroup_dirs(&rid),
            paths,
            mount_markers: vec![rid],
            netns: vec![],
        }
    }

    /// Take `id` for a new cell, or refuse a live (or half-made, or dying) one.
    fn reserve(&self, id: &str) -> Result<(), CellError> {
        let mut cells = self.cells.lock().unwrap();
        if cells.contains_key(id) {
            return Err(CellError::AlreadyExists { id: id.to_string() });
        }
        cells.insert(id.to_string(), Entry::Creating);
        Ok(())
    }

    fn live(&self, id: &str) -> Result<Arc<Live>, CellError> {
        match self.cells.lock().unwrap().get(id) {
            Some(Entry::Live(l)) => Ok(l.clone()),
            _ => Err(CellError::cell_not_found(id)),
        }
    }

    /// Forget `id` and remove the state root once nothing is left in it.
    fn release(&self, id: &str) -> usize {
        let mut cells = self.cells.lock().unwrap();
        cells.remove(id);
        let n = cells
            .values()
            .filter(|e| matches!(e, Entry::Live(_)))
            .count();
        if cells.is_empty() {
            self.remove_root_if_empty();
        }
        n
    }

    fn remove_root_if_empty(&self) {
        if !self.snapshots.lock().unwrap().is_empty() {
            return;
        }
        for sub in ["snapshots", "bundles", "state"] {
            let _ = fs::remove_dir(self.root.join(sub));
        }
        let _ = fs::remove_dir(&self.root);
        // The shared parent goes too when this was the last instance in it.
        if let Some(parent) = self.root.parent() {
            let _ = fs::remove_dir(parent);
        }
    }

    fn ensure_root(&self) -> Result<(), CellError> {
        for sub in ["state", "bundles"] {
            let p = self.root.join(sub);
            mkdir_private(&p).map_err(|e| failure(&format!("create {}", p.display()), e))?;
        }
        Ok(())
    }

    /// Create and start `cell`'s container; on any failure everything made so far is removed.
    async fn start_cell(
        self: &Arc<Self>,
        cell: &AdmittedCell,
        restore_from: Option<&Path>,
    ) -> Result<Arc<Live>, CellError> {
        let rt = self.rt()?;
        if !self.rootfs.join("bin").exists() {
            return Err(CellError::Unavailable {
                reason: format!("fixture rootfs {} is missing", self.rootfs.display()),
            });
        }
        self.ensure_root()?;
        let rid = self.rid(cell.id());
        let dir = self.bundle_dir(&rid);
        if dir.exists() {
            // A leftover of a crashed run with this instance id is not ours to reuse.
            return Err(failure(
                "bundle dir",
                format!("{} already exists", dir.display()),
            ));
        }
        mkdir_private(&dir).map_err(|e| failure("create bundle dir", e))?;
        match self.launch(&rt, cell, &rid, &dir, restore_from).await {
            Ok(live) => Ok(live),
            Err((e, shim)) => {
                self.scrub(&rt, &rid, &dir, shim.as_ref()).await;
                Err(e)
            }
        }
    }

    async fn launch(
        self: &Arc<Self>,
        rt: &Runtime,
        cell: &AdmittedCell,
        rid: &str,
        dir: &Path,
        restore_from: Option<&Path>,
    ) -> Result<Arc<Live>, (CellError, Option<Shim>)> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| (failure(&what, e), None)
        };
        let opts = bundle::BundleOptions {
            rootfs: self.rootfs.clone(),
            cgroups_path: format!("/{rid}"),
        };
        bundle::write_config(&dir.join("config.json"), &bundle::config(cell, &opts))
            .map_err(io("write config.json"))?;
        let stdin = File::open("/dev/null").map_err(io("open /dev/null"))?;
        let stdout = new_file(&dir.join("stdout")).map_err(io("create stdout file"))?;
        let stderr = new_file(&dir.join("stderr")).map_err(io("create stderr file"))?;
        let pid_file = dir.join("pid");
        let log = dir.join("runtime.log");
        let mut args: Vec<OsString> = Vec::new();
        match self.kind {
            RuntimeKind::Runsc => {
                let logs = dir.join("logs");
                mkdir_private(&logs).map_err(io("create log dir"))?;
                args.push(format!("--debug-log={}/", logs.display()).into());
                args.push("--debug-command=boot".into());
            }
            RuntimeKind::Runc => {
                args.push("--log".into());
                args.push(log.clone().into());
            }
            RuntimeKind::Crun => {}
        }
        match restore_from {
            None => args.extend(["create".into(), "--bundle".into(), dir.into()]),
            Some(img) => args.extend([
                "restore".into(),
                "--detach".into(),
                "--image-path".into(),
                img.into(),
                "--bundle".into(),
                dir.into(),
            ]),
        }
        args.extend(["--pid-file".into(), pid_file.clone().into(), rid.into()]);
        let shim = Shim::spawn(&rt.argv(&args), [&stdin, &stdout, &stderr], &pid_file)
            .map_err(io("spawn runtime"))?;
        drop((stdin, stdout, stderr));
        let op = if restore_from.is_some() {
            "restore"
        } else {
            "create"
        };
        match shim.runtime_status().await {
            Ok(st) if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 => {}
            Ok(st) => {
                let msg = self.error_text(dir, &log);
                let msg = if msg.is_empty() {
                    format!("wait status {st:#x}")
                } else {
                    msg
                };
                return Err((self.map_start_error(op, cell, &msg), Some(shim)));
            }
            Err(errno) => {
                return Err((
                    CellError::Unavailable {
                        reason: format!(
                            "{}: {}",
                            rt.bin.display(),
                            std::io::Error::from_raw_os_error(errno)
                        ),
                    },
                    Some(shim),
                ))
            }
        }
        let host_pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let started = Instant::now();
        if restore_from.is_none() {
            let exe_before = host_pid.and_then(proc_exe);
            let out = rt.run(&["start", rid]).await;
            if !out.ok {
                let msg = out.message(self.kind);
                return Err((self.map_start_error("start", cell, &msg), Some(shim)));
            }
            if self.kind != RuntimeKind::Runsc {
                if let Some(pid) = host_pid {
                    await_exec(pid, exe_before, Duration::from_secs(5)).await;
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        let live = Arc::new(Live {
            cell: cell.clone(),
            rid: rid.to_string(),
            dir: dir.to_path_buf(),
            shim: shim.clone(),
            // The runsc pid file names the sandbox, not the workload.
            host_pid: if self.kind == RuntimeKind::Runsc {
                None
            } else {
                host_pid
            },
            exit: rx,
            paused: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let me = self.clone();
        let l2 = live.clone();
        let monitor = tokio::spawn(async move { me.monitor(l2, started, tx).await });
        live.tasks.lock().unwrap().push(monitor.abort_handle());
        Ok(live)
    }

    /// The runtime's message for a failed create/restore: its log (runc) or what it wrote to the
    /// stderr it shared with the workload.
    fn error_text(&self, dir: &Path, log: &Path) -> String {
        let from_log = fs::read_to_string(log).unwrap_or_default();
        let m = runtime::runtime_message(&from_log);
        if !m.is_empty() {
            return m;
        }
        runtime::runtime_message(&fs::read_to_string(dir.join("stderr")).unwrap_or_default())
    }

    fn map_start_error(&self, op: &str, cell: &AdmittedCell, msg: &str) -> CellError {
        let argv0 = &cell.argv()[0];
        if runtime::is_missing_program(msg, argv0) {
            CellError::NotFound {
                kind: ResourceKind::Program,
                id: argv0.clone(),
            }
        } else {
            failure(&format!("{} {op}", self.kind.name()), msg)
        }
    }

    /// Remove whatever a failed or finished container left: the container, its processes (the
    /// shim reaps them), its cgroups and its bundle dir.
    async fn scrub(&self, rt: &Runtime, rid: &str, dir: &Path, shim: Option<&Shim>) -> Vec<String> {
        let mut problems = Vec::new();
        let out = rt.run(&["delete", "--force", rid]).await;
        if !out.ok {
            let msg = out.message(self.kind);
            let gone = msg.contains("does not exist")
                || msg.contains("not exist")
                || msg.contains("no such");
            if !gone {
                problems.push(format!("delete: {msg}"));
            }
        }
        if let Some(shim) = shim {
            if tokio::time::timeout(TEARDOWN_WAIT, shim.done())
                .await
                .is_err()
            {
                problems.push(format!(
                    "runtime processes of {rid} did not exit within {TEARDOWN_WAIT:?}"
                ));
            }
        }
        // runsc was seen to leave its lock file behind after deleting a container whose create
        // failed; once the runtime's processes are gone nothing can hold these any more.
        for entry in self.state_entries(rid) {
            let removed = if entry.is_dir() {
                fs::remove_dir_all(&entry)
            } else {
                fs::remove_file(&entry)
            };
            if let Err(e) = removed {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("remove {}: {e}", entry.display()));
                }
            }
        }
        for cg in self.cgroup_dirs(rid) {
            if cg.exists() {
                if let Err(e) = fs::remove_dir(&cg) {
                    problems.push(format!("rmdir {}: {e}", cg.display()));
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("remove {}: {e}", dir.display()));
            }
        }
        problems
    }

    async fn monitor(
        self: Arc<Self>,
        live: Arc<Live>,
        started: Instant,
        tx: watch::Sender<Option<Outcome2>>,
    ) {
        let exit = self.clone().exit_status(live.clone());
        tokio::pin!(exit);
        let res = match live.cell.timeout_ms() {
            None => Ok(exit.await),
            Some(ms) => {
                let left = Duration::from_millis(ms).saturating_sub(started.elapsed());
                match tokio::time::timeout(left, &mut exit).await {
                    Ok(t) => Ok(t),
                    Err(_) => {
                        self.kill_cell(&live).await;
                        let _ = tokio::time::timeout(TEARDOWN_WAIT, &mut exit).await;
                        Err(CellError::DeadlineExceeded { after_ms: ms })
                    }
                }
            }
        };
        let outcome = res.and_then(|t| {
            let termination = t.ok_or_else(|| {
                failure(
                    self.kind.name(),
                    "the workload's exit status could not be obtained",
                )
            })?;
            Ok(ExitReport {
                termination: self.oom_adjust(&live.rid, termination),
                stdout: fs::read(live.dir.join("stdout")).unwrap_or_default(),
                stderr: fs::read(live.dir.join("stderr")).unwrap_or_default(),
            })
        });
        let _ = tx.send(Some(outcome));
    }

    async fn exit_status(self: Arc<Self>, live: Arc<Live>) -> Option<Termination> {
        let status = live.shim.target_status().await;
        if self.kind != RuntimeKind::Runsc {
            return status.map(runtime::termination);
        }
        // The pid is the sandbox, which exits once its workload has. Its boot log says exactly how
        // the workload ended; `runsc wait` would answer with a folded `128+N` code (exit 7 read
        // as a wait status is signal 7, and 129..=192 are ambiguous), so it is not asked.
        if let Some(t) = read_boot_log(&live.dir.join("logs")) {
            return Some(t);
        }
        // No log line (the sandbox itself was killed): the sandbox's own status, which folds the
        // workload's signal into its exit code.
        status.map(|st| {
            if libc::WIFEXITED(st) {
                runtime::termination_from_folded_code(libc::WEXITSTATUS(st))
            } else {
                runtime::termination(st)
            }
        })
    }

    fn oom_adjust(&self, rid: &str, t: Termination) -> Termination {
        if t != (Termination::Signaled { signal: 9 }) {
            return t;
        }
        for h in &self.hierarchies {
            for file in ["memory.oom_control", "memory.events"] {
                let p = h.join(rid).join(file);
                if let Ok(text) = fs::read_to_string(&p) {
                    let kills = text
                        .lines()
                        .find_map(|l| l.strip_prefix("oom_kill "))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    if kills > 0 {
                        return Termination::OutOfMemory;
                    }
                }
            }
        }
        t
    }

    /// SIGKILL the container (thawing it first: a frozen task does not die until thawed).
    async fn kill_cell(&self, live: &Live) {
        let Ok(rt) = self.rt() else { return };
        if live.paused.swap(false, Ordering::SeqCst) {
            let _ = rt.run(&["resume", &live.rid]).await;
        }
        let _ = rt.run(&["kill", "--all", &live.rid, "KILL"]).await;
    }

    async fn create(self: &Arc<Self>, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let cell = doc.admit()?;
        self.rt()?;
        self.reserve(cell.id())?;
        self.finish_create(&cell, None).await
    }

    async fn finish_create(
        self: &Arc<Self>,
        cell: &AdmittedCell,
        restore_from: Option<&Path>,
    ) -> Result<CellHandle, CellError> {
        let id = cell.id().to_string();
        match self.start_cell(cell, restore_from).await {
            Ok(live) => {
                if let Some(ttl) = cell.ttl_seconds() {
                    // Weak: a pending TTL must not keep a dropped backend alive.
                    let me = Arc::downgrade(self);
                    let id2 = id.clone();
                    let h = tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(ttl)).await;
                        if let Some(me) = me.upgrade() {
                            let _ = me.destroy(&id2).await;
                        }
                    });
                    live.tasks.lock().unwrap().push(h.abort_handle());
                }
                let handle = CellHandle {
                    id: id.clone(),
                    host_pid: live.host_pid,
                };
                self.cells.lock().unwrap().insert(id, Entry::Live(live));
                Ok(handle)
            }
            Err(e) => {
                self.release(&id);
                Err(e)
            }
        }
    }

    async fn destroy(self: &Arc<Self>, id: &str) -> Result<TeardownReport, CellError> {
        let live = {
            let mut cells = self.cells.lock().unwrap();
            match cells.get(id) {
                Some(Entry::Live(l)) => {
                    let l = l.clone();
                    cells.insert(id.to_string(), Entry::Destroying);
                    Some(l)
                }
                Some(Entry::Destroying) => None,
                _ => return Err(CellError::cell_not_found(id)),
            }
        };
        let Some(live) = live else {
            // Another destroy (or the TTL reaper) is tearing it down: answer once it is gone, so
            // a caller who sees NotFound never sees the cell's resources still there.
            let until = Instant::now() + TEARDOWN_WAIT * 2;
            while Instant::now() < until
                && matches!(self.cells.lock().unwrap().get(id), Some(Entry::Destroying))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Err(CellError::cell_not_found(id));
        };
        // The TTL reaper may be what called us: abort only after taking the cell.
        let tasks: Vec<_> = live.tasks.lock().unwrap().drain(..).collect();
        let killed_running = live.exit.borrow().is_none();
        let rt = self.rt()?;
        if killed_running {
            self.kill_cell(&live).await;
        }
        let mut rx = live.exit.clone();
        let _ = tokio::time::timeout(TEARDOWN_WAIT, rx.wait_for(|o| o.is_some())).await;
        // Never abort the task running this destroy (the TTL reaper calls destroy itself).
        let me = tokio::task::try_id();
        for t in tasks {
            if Some(t.id()) != me {
                t.abort();
            }
        }
        let problems = self
            .scrub(&rt, &live.rid, &live.dir, Some(&live.shim))
            .await;
        let remaining = self.release(id);
        if !problems.is_empty() {
            return Err(failure(&format!("destroy {id}"), problems.join("; ")));
        }
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running,
            remaining_cells: remaining,
        })
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let live = self.live(id)?;
        if req.argv.is_empty() {
            return Err(CellError::invalid("exec.argv", "must not be empty"));
        }
        for (i, a) in req.argv.iter().enumerate() {
            if a.is_empty() || a.contains('\0') {
                return Err(CellError::invalid(
                    format!("exec.argv[{i}]"),
                    "must be non-empty without NUL",
                ));
            }
        }
        for (i, e) in req.env.iter().enumerate() {
            if e.name.is_empty() || e.name.contains(['=', '\0']) || e.value.contains('\0') {
                return Err(CellError::invalid(
                    format!("exec.env[{i}]"),
                    "name must be non-empty without '=' or NUL; value without NUL",
                ));
            }
        }
        if live.exit.borrow().is_some() {
            return Err(CellError::InvalidState {
                operation: "exec".into(),
                state: "exited".into(),
            });
        }
        if live.paused.load(Ordering::SeqCst) {
            return Err(CellError::InvalidState {
                operation: "exec".into(),
                state: "paused".into(),
            });
        }
        let rt = self.rt()?;
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let base = live.dir.join(format!("exec-{n}"));
        let file = |s: &str| PathBuf::from(format!("{}.{s}", base.display()));
        let (proc_path, out_path, err_path, pid_path, log_path) = (
            file("json"),
            file("stdout"),
            file("stderr"),
            file("pid"),
            file("log"),
        );
        let result = self
            .exec_inner(
                &rt,
                &live,
                &req,
                [&proc_path, &out_path, &err_path, &pid_path, &log_path],
            )
            .await;
        for p in [&proc_path, &out_path, &err_path, &pid_path, &log_path] {
            let _ = fs::remove_file(p);
        }
        result
    }

    async fn exec_inner(
        &self,
        rt: &Runtime,
        live: &Live,
        req: &ExecRequest,
        [proc_path, out_path, err_path, pid_path, log_path]: [&PathBuf; 5],
    ) -> Result<ExitReport, CellError> {
        let io = |what: &'static str| move |e: std::io::Error| failure(what, e);
        let process = bundle::process(&req.argv, &req.env, live.cell.working_directory());
        bundle::write_config(proc_path, &process).map_err(io("write exec process.json"))?;
        let stdin = File::open("/dev/null").map_err(io("open /dev/null"))?;
        let stdout = new_file(out_path).map_err(io("create exec stdout"))?;
        let stderr = new_file(err_path).map_err(io("create exec stderr"))?;
        let missing = |msg: &str| runtime::is_missing_program(msg, &req.argv[0]);
        let not_found = || CellError::NotFound {
            kind: ResourceKind::Program,
            id: req.argv[0].clone(),
        };
        let deadline = req.timeout_ms.map(Duration::from_millis);
        let termination = match self.kind {
            RuntimeKind::Runc | RuntimeKind::Crun => {
                let mut args: Vec<OsString> = Vec::new();
                if self.kind == RuntimeKind::Runc {
                    args.extend(["--log".into(), log_path.into()]);
                }
                args.extend([
                    "exec".into(),
                    "--detach".into(),
                    "--pid-file".into(),
                    pid_path.into(),
                    "--process".into(),
                    proc_path.into(),
                    live.rid.clone().into(),
                ]);
                let shim = Shim::spawn(&rt.argv(&args), [&stdin, &stdout, &stderr], pid_path)
                    .map_err(io("spawn runtime exec"))?;
                drop((stdin, stdout, stderr));
                let st = shim
                    .runtime_status()
                    .await
                    .map_err(|e| failure("exec", std::io::Error::from_raw_os_error(e)))?;
                if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
                    let msg = runtime::runtime_message(
                        &(fs::read_to_string(log_path).unwrap_or_default()
                            + &fs::read_to_string(err_path).unwrap_or_default()),
                    );
                    shim.done().await;
                    return Err(if missing(&msg) {
                        not_found()
                    } else {
                        failure(&format!("{} exec", self.kind.name()), msg)
                    });
                }
                let wait = shim.target_status();
                let st = match deadline {
                    None => wait.await,
                    Some(d) => match tokio::time::timeout(d, wait).await {
                        Ok(st) => st,
                        Err(_) => {
                            if let Some(pid) = read_pid(pid_path) {
                                // SAFETY: kill(2) of the exec'd process the shim still holds
                                // unreaped, so the pid cannot have been reused.
                                unsafe { libc::kill(pid, libc::SIGKILL) };
                            }
                            shim.done().await;
                            return Err(CellError::DeadlineExceeded {
                                after_ms: d.as_millis() as u64,
                            });
                        }
                    },
                };
                shim.done().await;
                st.map(runtime::termination).ok_or_else(|| {
                    failure("exec", "exit status of the exec'd process unavailable")
                })?
            }
            RuntimeKind::Runsc => {
                let argv = rt.argv(&[
                    "exec".into(),
                    "--process".into(),
                    proc_path.into(),
                    "--internal-pid-file".into(),
                    pid_path.into(),
                    live.rid.clone().into(),
                ]);
                let mut child = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(stdin)
                    .stdout(stdout)
                    .stderr(stderr)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(io("spawn runsc exec"))?;
                let status = match deadline {
                    None => child.wait().await,
                    Some(d) => match tokio::time::timeout(d, child.wait()).await {
                        Ok(s) => s,
                        Err(_) => {
                            if let Some(pid) = read_pid(pid_path) {
                                let pid = pid.to_string();
                                let _ = rt.run(&["kill", "--pid", &pid, &live.rid, "KILL"]).await;
                            }
                            let _ = child.wait().await;
                            return Err(CellError::DeadlineExceeded {
                                after_ms: d.as_millis() as u64,
                            });
                        }
                    },
                }
                .map_err(io("wait for runsc exec"))?;
                let code = status.code().unwrap_or(128);
                if code == 128 && read_pid(pid_path).is_none() {
                    // runsc exec itself failed (128) before the process started.
                    let msg =
                        runtime::runtime_message(&fs::read_to_string(err_path).unwrap_or_default());
                    return Err(if missing(&msg) {
                        not_found()
                    } else {
                        failure("runsc exec", msg)
                    });
                }
                runtime::termination_from_folded_code(code)
            }
        };
        Ok(ExitReport {
            termination,
            stdout: fs::read(out_path).unwrap_or_default(),
            stderr: fs::read(err_path).unwrap_or_default(),
        })
    }

    async fn set_paused(&self, id: &str, pause: bool) -> Result<(), CellError> {
        let live = self.live(id)?;
        if live.exit.borrow().is_some() {
            return Err(CellError::InvalidState {
                operation: if pause { "pause" } else { "resume" }.into(),
                state: "exited".into(),
            });
        }
        if live.paused.load(Ordering::SeqCst) == pause {
            return Err(CellError::InvalidState {
                operation: if pause { "pause" } else { "resume" }.into(),
                state: if pause { "paused" } else { "running" }.into(),
            });
        }
        let rt = self.rt()?;
        let verb = if pause { "pause" } else { "resume" };
        let out = rt.run(&[verb, &live.rid]).await;
        if !out.ok {
            return Err(failure(
                &format!("{} {verb}", self.kind.name()),
                out.message(self.kind),
            ));
        }
        live.paused.store(pause, Ordering::SeqCst);
        Ok(())
    }

    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        self.caps.require(Capability::Snapshot)?;
        let live = self.live(id)?;
        if live.exit.borrow().is_some() {
            return Err(CellError::InvalidState {
                operation: "snapshot".into(),
                state: "exited".into(),
            });
        }
        let rt = self.rt()?;
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let snap_id = format!("{id}.snap-{n}");
        let dir = self.snapshot_parent(&live.rid).join(format!("{n}"));
        mkdir_private(&dir).map_err(|e| failure("create snapshot dir", e))?;
        self.snapshots
            .lock()
            .unwrap()
            .insert(snap_id.clone(), dir.clone());
        let dir_s = dir.display().to_string();
        let out = rt
            .run(&["checkpoint", "--image-path", &dir_s, &live.rid])
            .await;
        if !out.ok {
            self.drop_snapshot_files(&snap_id);
            return Err(failure("runsc checkpoint", out.message(self.kind)));
        }
        // The document goes beside the image, so a restore works after the source is destroyed.
        let text = serde_json::to_vec(live.cell.document())
            .map_err(|e| failure("snapshot document", e))?;
        new_file(&dir.join("cell.json"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
            .map_err(|e| failure("write snapshot document", e))?;
        Ok(SnapshotRef {
            id: snap_id,
            source: id.to_string(),
            path: Some(dir),
        })
    }

    fn drop_snapshot_files(&self, snap_id: &str) -> bool {
        let dir = self.snapshots.lock().unwrap().remove(snap_id);
        let Some(dir) = dir else { return false };
        let _ = fs::remove_dir_all(&dir);
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        if self.cells.lock().unwrap().is_empty() {
            self.remove_root_if_empty();
        }
        true
    }

    async fn restore(
        self: &Arc<Self>,
        snap: &SnapshotRef,
        new_id: &str,
    ) -> Result<CellHandle, CellError> {
        self.caps.require(Capability::Snapshot)?;
        let dir = self
            .snapshots
            .lock()
            .unwrap()
            .get(&snap.id)
            .cloned()
            .ok_or_else(|| CellError::NotFound {
                kind: ResourceKind::Snapshot,
                id: snap.id.clone(),
            })?;
        let source = {
            let cells = self.cells.lock().unwrap();
            match cells.get(&snap.source) {
                Some(Entry::Live(l)) => Some(l.cell.clone()),
                _ => None,
            }
        };
        // The source document is kept with the image, so a restore works after the source is gone.
        let cell = match source {
            Some(c) => c.with_id(new_id)?,
            None => {
                let text = fs::read_to_string(dir.join("cell.json"))
                    .map_err(|e| failure("read snapshot document", e))?;
                CellDocument::from_json(&text)?.admit()?.with_id(new_id)?
            }
        };
        self.reserve(new_id)?;
        self.finish_create(&cell, Some(&dir)).await
    }
}

/// Dropping the last handle of a backend destroys what it still holds (synchronously: there may be
/// no runtime left to await on), so a panicking test or an aborted run leaves no container behind.
impl Drop for Inner {
    fn drop(&mut self) {
        let cells: Vec<Arc<Live>> = self
            .cells
            .get_mut()
            .map(|m| {
                m.drain()
                    .filter_map(|(_, e)| match e {
                        Entry::Live(l) => Some(l),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(rt) = &self.runtime {
            let run = |args: &[&str]| {
                let argv = rt.argv(&args.iter().map(OsString::from).collect::<Vec<_>>());
                let _ = std::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            };
            for l in &cells {
                if l.paused.load(Ordering::SeqCst) {
                    run(&["resume", &l.rid]);
                }
                run(&["kill", "--all", &l.rid, "KILL"]);
                run(&["delete", "--force", &l.rid]);
            }
        }
        let deadline = Instant::now() + TEARDOWN_WAIT;
        for l in &cells {
            while !l.shim.state().done && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            for cg in self.cgroup_dirs(&l.rid) {
                let _ = fs::remove_dir(cg);
            }
            let _ = fs::remove_dir_all(&l.dir);
        }
        if let Ok(snaps) = self.snapshots.get_mut() {
            for (_, dir) in snaps.drain() {
                let _ = fs::remove_dir_all(&dir);
                if let Some(parent) = dir.parent() {
                    let _ = fs::remove_dir(parent);
                }
            }
        }
        self.remove_root_if_empty();
    }
}

fn read_pid(p: &Path) -> Option<i32> {
    fs::read_to_string(p)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

fn read_boot_log(dir: &Path) -> Option<Termination> {
    let rd = fs::read_dir(dir).ok()?;
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("boot"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .find_map(|t| runtime::parse_runsc_boot_log(&t))
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
        let rt = match self.inner.rt() {
            Ok(rt) => rt,
            Err(e) => {
                return Availability::Unavailable {
                    reason: e.to_string(),
                }
            }
        };
        let version = match tokio::process::Command::new(&rt.bin)
            .arg("--version")
            .output()
            .await
        {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
            Ok(o) => {
                return Availability::Unavailable {
                    reason: format!(
                        "{} --version failed: {}",
                        rt.bin.display(),
                        runtime::runtime_message(&String::from_utf8_lossy(&o.stderr))
                    ),
                }
            }
            Err(e) => {
                return Availability::Unavailable {
                    reason: format!("{}: {e}", rt.bin.display()),
                }
            }
        };
        let id = format!("preflight-{:08x}", rand::random::<u32>());
        let doc = CellDocument::new(id.clone(), ["/bin/true"]).with_timeout_ms(60_000);
        let t0 = Instant::now();
        let res = async {
            self.inner.create(&doc).await?;
            let r = self.inner.wait_outcome(&id).await;
            let d = self.inner.destroy(&id).await;
            let r = r?;
            d?;
            Ok::<_, CellError>(r)
        }
        .await;
        let ms = t0.elapsed().as_millis();
        let platform = rt
            .platform
            .as_ref()
            .map(|p| format!(", platform {p}"))
            .unwrap_or_default();
        match res {
            Ok(r) if r.termination == (Termination::Exited { code: 0 }) => {
                Availability::Available {
                    evidence: format!(
                        "{version}{platform}: trivial bundle (/bin/true) exited 0 in {ms} ms"
                    ),
                }
            }
            Ok(r) => Availability::Unavailable {
                reason: format!(
                    "{version}: trivial bundle ended {:?}: {}",
                    r.termination,
                    r.stderr_str().trim()
                ),
            },
            Err(CellError::BackendFailure { reason, .. }) => Availability::Unavailable { reason },
            Err(e) => Availability::Unavailable {
                reason: e.to_string(),
            },
        }
    }

    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        self.inner.create(doc).await
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        self.inner.wait_outcome(id).await
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        self.inner.destroy(id).await
    }

    fn footprint(&self, id: &str) -> Footprint {
        self.inner.footprint(id)
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        self.inner.caps.require(Capability::Exec)?;
        self.inner.exec(id, req).await
    }

    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        self.inner.snapshot(id).await
    }

    async fn restore(&self, snap: &SnapshotRef, new_id: &str) -> Result<CellHandle, CellError> {
        self.inner.restore(snap, new_id).await
    }

    async fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        self.inner.caps.require(Capability::Snapshot)?;
        if self.inner.drop_snapshot_files(&snap.id) {
            Ok(())
        } else {
            Err(CellError::NotFound {
                kind: ResourceKind::Snapshot,
                id: snap.id.clone(),
            })
        }
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        self.inner.caps.require(Capability::Pause)?;
        self.inner.set_paused(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        self.inner.caps.require(Capability::Pause)?;
        self.inner.set_paused(id, false).await
    }

    async fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .cells
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Live(_)))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }
}

impl Inner {
    async fn wait_outcome(&self, id: &str) -> Result<ExitReport, CellError> {
        let live = self.live(id)?;
        let mut rx = live.exit.clone();
        let r = rx
            .wait_for(|o| o.is_some())
            .await
            .map_err(|_| failure("wait", "the cell's monitor ended without a result"))?;
        r.clone().expect("checked by wait_for")
    }
}

fn proc_exe(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// `start` returns once the container is told to go, not once its init has exec'd the workload:
/// until then the pid still runs the runtime's init (holding its exec fifo as an fd). Wait, within
/// a bound, until the pid's executable changes (or it is gone), so the pid handed out is the workload.
async fn await_exec(pid: u32, before: Option<PathBuf>, bound: Duration) {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        match proc_exe(pid) {
            Some(now) if Some(&now) == before.as_ref() => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
