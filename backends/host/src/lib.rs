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

mod cgroup;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellcheck_contract::{
    AdmittedCell, Availability, Backend, Capabilities, Capability, CellDocument, CellError,
    CellHandle, ExecRequest, ExitReport, Footprint, ResourceKind, Retry, TeardownReport,
    Termination,
};
use cellcheck_host_init::{Bind, Config, Status, STATUS_FD, SYNC_FD};
use tokio::sync::watch;

use cgroup::{kill_all, CellDir};
pub use cgroup::{HostLayout, Plan, Version as CgroupVersion};

/// Where instances keep their state by default (`<base>/<pid>-<random>/<cell-id>`).
pub const DEFAULT_STATE_BASE: &str = "/run/cellcheck/host";

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
}

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
        }
    }

    pub fn from_fixtures(fx: &cellcheck_fixtures::Fixtures) -> Self {
        Self::new(&fx.host_init, &fx.rootfs)
    }
}

/// What a cell's init said about its workload's end; `None` while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

#[derive(Debug, Default)]
struct CellState {
    end: Option<End>,
    timed_out: bool,
    paused: bool,
    report: Option<Result<ExitReport, CellError>>,
}

/// What the supervisor thread and the operations share.
struct Shared {
    st: Mutex<CellState>,
    /// Becomes true once pid 1 is gone and the init is reaped.
    done: watch::Sender<bool>,
}

struct Cell {
    id: String,
    serial: u64,
    state_dir: PathBuf,
    dirs: Vec<CellDir>,
    created: Instant,
    timeout_ms: Option<u64>,
    pid1: u32,
    host_pid: Option<u32>,
    shared: Arc<Shared>,
    supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
    exec_seq: AtomicU64,
}

enum Slot {
    Creating,
    Live(Arc<Cell>),
    Destroying,
}

struct Inner {
    cfg: HostConfig,
    instance: String,
    plan: Plan,
    snapshot_reason: String,
    cells: Mutex<HashMap<String, Slot>>,
    /// Signalled whenever a destroyed cell leaves `cells`.
    gone: Condvar,
    serial: AtomicU64,
    /// Parents of the state root this backend created (outermost first).
    made_parents: Mutex<Vec<PathBuf>>,
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
        match Command::new("criu")
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
                cfg,
                cells: Mutex::new(HashMap::new()),
                gone: Condvar::new(),
                serial: AtomicU64::new(0),
                made_parents: Mutex::new(Vec::new()),
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
        self.inner.cfg.state_root.join(id)
    }

    fn live(&self, id: &str) -> Result<Arc<Cell>, CellError> {
        match lock(&self.inner.cells).get(id) {
            Some(Slot::Live(c)) => Ok(c.clone()),
            _ => Err(CellError::cell_not_found(id)),
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 into a local array; the fds are owned right after.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// A started init: the process, the go-byte writer, the status reader.
struct Started {
    child: Child,
    sync: Option<std::fs::File>,
    status: StatusReader,
}

/// Start `cellcheck-host-init <args>` with the hygiene the contract demands of everything we run.
fn spawn_init(
    init: &Path,
    args: &[&std::ffi::OsStr],
    stdout: fs::File,
    stderr: fs::File,
    new_namespaces: bool,
) -> io::Result<Started> {
    let (sync_r, sync_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (sr, sw) = (sync_r.as_raw_fd(), status_w.as_raw_fd());
    let mut cmd = Command::new(init);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: the closure only makes async-signal-safe syscalls (fcntl, dup2, close, unshare,
    // setsid) on fd numbers captured above.
    unsafe {
        cmd.pre_exec(move || {
            // Move both ends above the target numbers first, so dup2 never clobbers the other.
            let a = libc::fcntl(sr, libc::F_DUPFD_CLOEXEC, 10);
            let b = libc::fcntl(sw, libc::F_DUPFD_CLOEXEC, 10);
            if a < 0 || b < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::dup2(a, SYNC_FD) < 0 || libc::dup2(b, STATUS_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(a);
            libc::close(b);
            if new_namespaces
                && libc::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWUTS
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWPID,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Its own session: terminal signals for the caller never reach a cell.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(sync_r);
    drop(status_w);
    Ok(Started {
        child,
        sync: Some(fs::File::from(sync_w)),
        status: StatusReader::new(status_r),
    })
}

/// Reads [`Status`] lines; the startup phase reads with a deadline.
struct StatusReader {
    inner: BufReader<fs::File>,
}

impl StatusReader {
    fn new(fd: OwnedFd) -> Self {
        StatusReader {
            inner: BufReader::new(fs::File::from(fd)),
        }
    }

    /// The next status line; `Ok(None)` at EOF. With a deadline, waits for data with poll first.
    fn next(&mut self, deadline: Option<Instant>) -> io::Result<Option<Status>> {
        loop {
            if let Some(d) = deadline {
                if self.inner.buffer().is_empty() {
                    let left = d.saturating_duration_since(Instant::now());
                    let mut pfd = libc::pollfd {
                        fd: self.inner.get_ref().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: polling one valid fd.
                    let n = unsafe {
                        libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32)
                    };
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "init did not report in time",
                        ));
                    }
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if let Some(s) = Status::decode(&line) {
                return Ok(Some(s));
            }
        }
    }
}

fn open_capture(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn write_secret(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// The host pid of the process of the cell's cgroup whose pid in the cell's namespace is `nspid`.
fn find_host_pid(dirs: &[CellDir], nspid: u32) -> Option<u32> {
    let d = dirs.first()?;
    d.procs().into_iter().find(|p| {
        fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|t| {
                let l = t.lines().find(|l| l.starts_with("NSpid:"))?;
                let f: Vec<&str> = l["NSpid:".len()..].split_whitespace().collect();
                Some(f.len() == 2 && f[1] == nspid.to_string())
            })
            .unwrap_or(false)
    })
}

/// Remove what a cell kept on disk. Not recursive on purpose: the root mount point must be an
/// empty directory on the host (mounts live in the cell's namespace); if it is not, something
/// leaked and deleting through it could reach the shared rootfs.
fn remove_state_dir(dir: &Path) -> io::Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir(&p).map_err(|err| {
                io::Error::new(err.kind(), format!("remove {}: {err}", p.display()))
            })?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    fs::remove_dir(dir)
}

impl Inner {
    fn footprint(&self, id: &str) -> Footprint {
        let state_dir = self.cfg.state_root.join(id);
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

    fn drop_state_root_if_empty(&self) {
        let _ = fs::remove_dir(&self.cfg.state_root);
        // Parents go only if we made them and they are empty (another instance may use them).
        for d in lock(&self.made_parents).iter().rev() {
            if fs::remove_dir(d).is_err() {
                break;
            }
        }
        // The default base is ours alone: whichever instance ends last removes it.
        if self.cfg.state_root.parent() == Some(Path::new(DEFAULT_STATE_BASE))
            && fs::remove_dir(DEFAULT_STATE_BASE).is_ok()
        {
            let _ = fs::remove_dir(
                Path::new(DEFAULT_STATE_BASE)
                    .parent()
                    .unwrap_or(Path::new("/")),
            );
        }
    }

    /// Create the cell's state directory and the state root above it (mode 0700), remembering
    /// which missing parents of the root we made.
    ///
    /// The state root and its parents are removed once empty, by this instance and by others
    /// sharing a parent (other processes, other backends under the same base), so our mkdir of
    /// a directory may find its parent just removed (ENOENT). Then we walk again from the top:
    /// the same protocol as the cgroup parents (`CellDir::create`). Once the cell's directory
    /// exists, its parents are not empty and stay.
    fn make_state_dir(&self, state_dir: &Path) -> io::Result<()> {
        const MAX_WALKS: u32 = 1000;
        let mut made = lock(&self.made_parents);
        let mut missing = Vec::new();
        let mut p = self.cfg.state_root.parent();
        while let Some(d) = p {
            if d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            p = d.parent();
        }
        let mut walks = 1;
        loop {
            let r = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.cfg.state_root)
                .and_then(|()| fs::DirBuilder::new().mode(0o700).create(state_dir));
            match r {
                Err(e) if e.kind() == io::ErrorKind::NotFound && walks < MAX_WALKS => walks += 1,
                r => break r?,
            }
        }
        for d in missing.into_iter().rev() {
            if !made.contains(&d) {
                made.push(d);
            }
        }
        Ok(())
    }

    /// Start a cell. Blocking; on error everything made so far is gone again.
    fn start(&self, cell: &AdmittedCell, serial: u64) -> Result<Cell, CellError> {
        let id = cell.id().to_string();
        let state_dir = self.cfg.state_root.join(&id);
        let dirs = self.plan.cell_dirs(&self.instance, &id);
        let mut made = Partial {
            state_dir: None,
            dirs: Vec::new(),
            child: None,
        };
        let res = self.start_inner(cell, &state_dir, &dirs, &mut made);
        match res {
            Ok((pid1, host_pid, supervisor, shared)) => {
                made.disarm();
                Ok(Cell {
                    id,
                    serial,
                    state_dir,
                    dirs,
                    created: Instant::now(),
                    timeout_ms: cell.timeout_ms(),
                    pid1,
                    host_pid,
                    shared,
                    supervisor: Mutex::new(Some(supervisor)),
                    exec_seq: AtomicU64::new(0),
                })
            }
            Err(e) => {
                made.cleanup();
                if lock(&self.cells)
                    .values()
                    .all(|s| matches!(s, Slot::Creating))
                {
                    self.drop_state_root_if_empty();
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn start_inner(
        &self,
        cell: &AdmittedCell,
        state_dir: &Path,
        dirs: &[CellDir],
        made: &mut Partial,
    ) -> Result<(u32, Option<u32>, std::thread::JoinHandle<()>, Arc<Shared>), CellError> {
        self.make_state_dir(state_dir)
            .map_err(|e| failure(format!("create {}: {e}", state_dir.display())))?;
        made.state_dir = Some(state_dir.to_path_buf());
        let newroot = state_dir.join("root");
        fs::create_dir(&newroot)
            .map_err(|e| failure(format!("create {}: {e}", newroot.display())))?;
        let config = Config {
            argv: cell.argv().to_vec(),
            env: cell.env_pairs(),
            cwd: cell.working_directory().to_string(),
            hostname: cell.id().to_string(),
            rootfs: self.cfg.rootfs.display().to_string(),
            newroot: newroot.display().to_string(),
            binds: self
                .cfg
                .extra_binds
                .iter()
                .map(|b| Bind {
                    source: b.source.display().to_string(),
                    target: b.target.display().to_string(),
                    readonly: b.readonly,
                })
                .collect(),
            target_pid: 0,
        };
        let bytes = config
            .encode()
            .map_err(|e| failure(format!("encode cell config: {e}")))?;
        write_secret(&state_dir.join("config"), &bytes)
            .map_err(|e| failure(format!("write cell config: {e}")))?;
        let limits = cell.limits();
        for d in dirs {
            made.dirs.push(d.clone());
            d.create(limits.memory_max_bytes, limits.pids_max, limits.cpu_max)
                .map_err(|e| failure(format!("cgroup: {e}")))?;
        }
        let stdout = open_capture(&state_dir.join("stdout"))?;
        let stderr = open_capture(&state_dir.join("stderr"))?;
        let Started {
            child,
            sync,
            mut status,
        } = spawn_init(
            &self.cfg.init,
            &["cell".as_ref(), state_dir.as_os_str()],
            stdout,
            stderr,
            true,
        )
        .map_err(|e| failure(format!("start {}: {e}", self.cfg.init.display())))?;
        let init_pid = child.id();
        made.child = Some(child);
        for d in dirs {
            d.add(init_pid)
                .map_err(|e| failure(format!("cgroup: {e}")))?;
        }
        let mut sync = sync.expect("fresh sync pipe");
        sync.write_all(b"g")
            .map_err(|e| failure(format!("start init: {e}")))?;
        let deadline = Some(Instant::now() + START_TIMEOUT);
        let mut startup = Startup::default();
        while !startup.complete() {
            let msg = status
                .next(deadline)
                .map_err(|e| failure(format!("init: {e}")))?;
            match msg {
                Some(Status::Forked(nspid)) => {
                    startup.host_pid = find_host_pid(dirs, nspid);
                    sync.write_all(b"g")
                        .map_err(|e| failure(format!("init: {e}")))?;
                }
                Some(Status::Failed {
                    step,
                    errno,
                    message,
                }) => {
                    return Err(match step.as_str() {
                        "program"
                            if [
                                libc::ENOENT,
                                libc::EACCES,
                                libc::ENOTDIR,
                                libc::ENOEXEC,
                                libc::ELOOP,
                            ]
                            .contains(&errno) =>
                        {
                            CellError::NotFound {
                                kind: ResourceKind::Program,
                                id: cell.argv()[0].clone(),
                            }
                        }
                        "cwd" => CellError::invalid(
                            "spec.run.workingDirectory",
                            format!("not usable in the cell's root: {message}"),
                        ),
                        _ => failure(format!("init {step}: {message}")),
                    });
                }
                Some(other) => startup.note(other)?,
                None => {
                    let mut err = String::new();
                    let _ = fs::File::open(state_dir.join("stderr"))
                        .and_then(|mut f| f.read_to_string(&mut err));
                    return Err(failure(format!(
                        "init ended before starting the workload ({}): {}",
                        startup.missing(),
                        err.trim()
                    )));
                }
            }
        }
        drop(sync);
        let pid1 = startup.pid1.expect("complete");
        let (done, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            st: Mutex::new(CellState::default()),
            done,
        });
        let child = made.child.take().expect("spawned above");
        let sh = shared.clone();
        let early_end = startup.end;
        let supervisor = std::thread::Builder::new()
            .name(format!("cell-{}", cell.id()))
            .spawn(move || supervise(child, status, early_end, sh))
            .map_err(|e| failure(format!("supervisor thread: {e}")))?;
        Ok((pid1, startup.host_pid, supervisor, shared))
    }

    /// Kill everything of the cell and remove its resources (blocking). Returns whether the
    /// workload was still running.
    fn teardown(&self, cell: &Cell) -> Result<bool, CellError> {
        let killed_running = lock(&cell.shared.st).end.is_none();
        let emptied = kill_all(&cell.dirs, KILL_TIMEOUT);
        if let Some(h) = lock(&cell.supervisor).take() {
            let _ = h.join();
        }
        let mut problems = Vec::new();
        if !emptied {
            problems.push("processes of the cell survived SIGKILL".to_string());
        }
        for d in &cell.dirs {
            if let Err(e) = d.remove() {
                problems.push(e.to_string());
            }
        }
        if let Err(e) = remove_state_dir(&cell.state_dir) {
            problems.push(format!("state dir {}: {e}", cell.state_dir.display()));
        }
        if problems.is_empty() {
            Ok(killed_running)
        } else {
            Err(CellError::BackendFailure {
                reason: format!("destroy {}: {}", cell.id, problems.join("; ")),
                retry: Retry::NotRetryable,
            })
        }
    }

    /// Destroy `id` (only the incarnation `serial`, when given: timers of an earlier cell with
    /// the same id must not touch a new one).
    fn destroy(&self, id: &str, serial: Option<u64>) -> Result<(bool, usize), CellError> {
        let cell = {
            let mut cells = lock(&self.cells);
            match cells.get(id) {
                Some(Slot::Live(c)) if serial.is_none_or(|s| s == c.serial) => {
                    let c = c.clone();
                    cells.insert(id.to_string(), Slot::Destroying);
                    c
                }
                Some(Slot::Destroying) => {
                    // Another destroy (or the reaper) is at work: answer once the cell is gone,
                    // so whoever hears NotFound can rely on nothing being left.
                    while matches!(cells.get(id), Some(Slot::Destroying)) {
                        cells = self.gone.wait(cells).unwrap_or_else(|e| e.into_inner());
                    }
                    return Err(CellError::cell_not_found(id));
                }
                _ => return Err(CellError::cell_not_found(id)),
            }
        };
        let res = self.teardown(&cell);
        let remaining = {
            let mut cells = lock(&self.cells);
            cells.remove(id);
            let n = cells
                .values()
                .filter(|s| !matches!(s, Slot::Destroying))
                .count();
            if cells.is_empty() {
                self.drop_state_root_if_empty();
            }
            self.gone.notify_all();
            n
        };
        Ok((res?, remaining))
    }

    /// The rest of `create` once the id is reserved.
    async fn create_reserved(self: Arc<Self>, cell: AdmittedCell) -> Result<CellHandle, CellError> {
        let id = cell.id().to_string();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let inner = self.clone();
        let c2 = cell.clone();
        let res = tokio::task::spawn_blocking(move || inner.start(&c2, serial))
            .await
            .unwrap_or_else(|e| Err(failure(format!("create task: {e}"))));
        let c = match res {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let mut cells = lock(&self.cells);
                cells.remove(&id);
                if cells.is_empty() {
                    self.drop_state_root_if_empty();
                }
                return Err(e);
            }
        };
        lock(&self.cells).insert(id.clone(), Slot::Live(c.clone()));
        let weak: Weak<Inner> = Arc::downgrade(&self);
        if let Some(ms) = cell.timeout_ms() {
            let (w, cc) = (weak.clone(), c.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Some(inner) = w.upgrade() {
                    let _ = tokio::task::spawn_blocking(move || inner.expire(&cc)).await;
                }
            });
        }
        if let Some(ttl) = cell.ttl_seconds() {
            let (w, id2) = (weak, id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(ttl)).await;
                if let Some(inner) = w.upgrade() {
                    let _ = tokio::task::spawn_blocking(move || inner.destroy(&id2, Some(serial)))
                        .await;
                }
            });
        }
        Ok(CellHandle {
            id,
            host_pid: c.host_pid,
        })
    }

    /// The timeout passed: kill the workload unless it already ended.
    fn expire(&self, cell: &Cell) {
        {
            let mut st = lock(&cell.shared.st);
            if st.end.is_some() || *cell.shared.done.borrow() {
                return;
            }
            st.timed_out = true;
        }
        kill_all(&cell.dirs, KILL_TIMEOUT);
    }
}

/// Things `create` made so far, removed again unless the create succeeds.
struct Partial {
    state_dir: Option<PathBuf>,
    dirs: Vec<CellDir>,
    child: Option<Child>,
}

impl Partial {
    fn disarm(&mut self) {
        self.state_dir = None;
        self.dirs.clear();
        self.child = None;
    }

    fn cleanup(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            kill_all(&self.dirs, KILL_TIMEOUT);
            let _ = c.wait();
        } else {
            kill_all(&self.dirs, KILL_TIMEOUT);
        }
        for d in self.dirs.drain(..) {
            let _ = d.remove();
        }
        if let Some(s) = self.state_dir.take() {
            let _ = remove_state_dir(&s);
        }
    }
}

/// What a cell's init reported while the cell starts.
///
/// Two processes write the one status pipe: the outer init reports pid 1's host pid (`Pid1`)
/// right after forking it, while pid 1 itself reports the workload's fork, start and end. The two
/// run concurrently, so `Pid1` may arrive before, between or after any of pid 1's lines (on a busy
/// host the outer init is often scheduled last). Startup is complete once both `Pid1` and
/// `Started` are in, in whichever order; an end read on the way is kept for the supervisor.
#[derive(Debug, Default)]
struct Startup {
    pid1: Option<u32>,
    host_pid: Option<u32>,
    started: bool,
    end: Option<End>,
}

impl Startup {
    fn complete(&self) -> bool {
        self.started && self.pid1.is_some()
    }

    /// Take in a status line other than `Forked` and `Failed` (those need the caller's I/O).
    fn note(&mut self, s: Status) -> Result<(), CellError> {
        match s {
            Status::Pid1(p) => self.pid1 = Some(p),
            Status::Started(_) => self.started = true,
            Status::Exited(c) if self.started => self.end = Some(End::Exited(c)),
            Status::Signaled(s) if self.started => self.end = Some(End::Signaled(s)),
            other => {
                return Err(failure(format!(
                    "init: unexpected {other:?} while starting"
                )))
            }
        }
        Ok(())
    }

    /// What the init had not reported yet, for the error when it ended early.
    fn missing(&self) -> &'static str {
        match (self.pid1.is_some(), self.started) {
            (false, false) => "neither pid 1 nor the workload's start reported",
            (false, true) => "pid 1 not reported",
            (true, false) => "the workload's start not reported",
            (true, true) => "nothing missing",
        }
    }
}

/// Per cell: read the init's status until pid 1 is gone, then reap the init. `end` is what the
/// startup already read of the workload's end (it may end before pid 1's own number arrives).
fn supervise(
    mut child: Child,
    mut status: StatusReader,
    mut end: Option<End>,
    shared: Arc<Shared>,
) {
    while let Ok(Some(s)) = status.next(None) {
        match s {
            Status::Exited(c) => end = Some(End::Exited(c)),
            Status::Signaled(s) => end = Some(End::Signaled(s)),
            _ => {}
        }
    }
    let _ = child.wait();
    {
        let mut st = lock(&shared.st);
        // Pid 1 killed without a report (destroy, timeout): the workload died with it.
        st.end = Some(end.unwrap_or(End::Signaled(libc::SIGKILL)));
    }
    shared.done.send_replace(true);
}

fn read_and_remove(p: &Path) -> Vec<u8> {
    let b = fs::read(p).unwrap_or_default();
    let _ = fs::remove_file(p);
    b
}

impl Cell {
    fn report(&self) -> Result<ExitReport, CellError> {
        let mut st = lock(&self.shared.st);
        if let Some(r) = &st.report {
            return r.clone();
        }
        let r = if st.timed_out {
            Err(CellError::DeadlineExceeded {
                after_ms: self.timeout_ms.unwrap_or(0),
            })
        } else {
            let termination = match st.end {
                Some(End::Exited(code)) => Termination::Exited { code },
                Some(End::Signaled(s))
                    if s == libc::SIGKILL && self.dirs.iter().any(|d| d.oom_kills() > 0) =>
                {
                    Termination::OutOfMemory
                }
                Some(End::Signaled(signal)) => Termination::Signaled { signal },
                None => return Err(failure("workload has not ended")),
            };
            Ok(ExitReport {
                termination,
                stdout: fs::read(self.state_dir.join("stdout")).unwrap_or_default(),
                stderr: fs::read(self.state_dir.join("stderr")).unwrap_or_default(),
            })
        };
        st.report = Some(r.clone());
        r
    }
}

#[async_trait]
impl Backend for HostBackend {
    fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all().without(Capability::Snapshot, self.inner.snapshot_reason.clone())
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
        let cell = doc.admit()?;
        let id = cell.id().to_string();
        {
            let mut cells = lock(&self.inner.cells);
            if cells.contains_key(&id) {
                return Err(CellError::AlreadyExists { id });
            }
            cells.insert(id.clone(), Slot::Creating);
        }
        // A task of its own: a caller that gives up on the future must not strand a started
        // cell in the `Creating` state, nor leave it without its timers.
        tokio::spawn(Inner::create_reserved(self.inner.clone(), cell))
            .await
            .unwrap_or_else(|e| Err(failure(format!("create task: {e}"))))
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
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
                        let (inner, c) = (self.inner.clone(), cell.clone());
                        let _ = tokio::task::spawn_blocking(move || inner.expire(&c)).await;
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

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        let inner = self.inner.clone();
        let id2 = id.to_string();
        let (killed_running, remaining) =
            tokio::task::spawn_blocking(move || inner.destroy(&id2, None))
                .await
                .unwrap_or_else(|e| Err(failure(format!("destroy task: {e}"))))?;
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running,
            remaining_cells: remaining,
        })
    }

    fn footprint(&self, id: &str) -> Footprint {
        self.inner.footprint(id)
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        exec::run(self, id, req).await
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        let cell = self.live(id)?;
        tokio::task::spawn_blocking(move || freeze(&cell, true))
            .await
            .unwrap_or_else(|e| Err(failure(format!("pause task: {e}"))))
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        let cell = self.live(id)?;
        tokio::task::spawn_blocking(move || freeze(&cell, false))
            .await
            .unwrap_or_else(|e| Err(failure(format!("resume task: {e}"))))
    }

    async fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.inner.cells)
            .iter()
            // A cell being destroyed is listed until it is gone.
            .filter(|(_, s)| !matches!(s, Slot::Creating))
            .map(|(k, _)| k.clone())
            .collect();
        ids.sort();
        ids
    }
}

fn freeze(cell: &Cell, frozen: bool) -> Result<(), CellError> {
    let op = if frozen { "pause" } else { "resume" };
    let mut st = lock(&cell.shared.st);
    if st.end.is_some() || *cell.shared.done.borrow() {
        return Err(CellError::InvalidState {
            operation: op.into(),
            state: "exited".into(),
        });
    }
    let dirs: Vec<&CellDir> = cell.dirs.iter().filter(|d| d.has("freezer")).collect();
    for d in &dirs {
        d.freeze(frozen)
            .map_err(|e| failure(format!("{op}: {e}")))?;
    }
    if frozen {
        // The write only starts the freeze; it is done when the state says so.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dirs.iter().all(|d| d.is_frozen()) {
            if Instant::now() > deadline {
                for d in &dirs {
                    let _ = d.freeze(false);
                }
                return Err(failure("pause: the cell did not freeze within 5 s"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    st.paused = frozen;
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Cells never outlive the backend that made them (tests that fail still clean up).
        let cells: Vec<Arc<Cell>> = lock(&self.cells)
            .drain()
            .filter_map(|(_, s)| match s {
                Slot::Live(c) => Some(c),
                _ => None,
            })
            .collect();
        for c in cells {
            let _ = self.teardown(&c);
        }
        self.drop_state_root_if_empty();
    }
}

mod exec;

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[Status]) -> Result<Startup, CellError> {
        let mut s = Startup::default();
        for l in lines {
            if s.complete() {
                break;
            }
            s.note(l.clone())?;
        }
        Ok(s)
    }

    #[test]
    fn startup_completes_whatever_the_order_of_the_two_writers() {
        use Status::{Exited, Pid1, Started};
        // Pid 1's own lines keep their order; the outer init's `Pid1` may land anywhere.
        for (lines, end) in [
            (vec![Pid1(7), Started(2), Exited(3)], None),
            (vec![Started(2), Pid1(7), Exited(3)], None),
            (vec![Started(2), Exited(3), Pid1(7)], Some(End::Exited(3))),
            (
                vec![Started(2), Status::Signaled(9), Pid1(7)],
                Some(End::Signaled(9)),
            ),
        ] {
            let s = feed(&lines).unwrap();
            assert!(s.complete(), "{lines:?}");
            assert_eq!(s.pid1, Some(7), "{lines:?}");
            assert_eq!(s.end, end, "{lines:?}");
        }
    }

    #[test]
    fn startup_names_what_is_missing_and_refuses_an_end_before_the_start() {
        let s = feed(&[Status::Started(2)]).unwrap();
        assert!(!s.complete());
        assert_eq!(s.missing(), "pid 1 not reported");
        assert_eq!(
            feed(&[]).unwrap().missing(),
            "neither pid 1 nor the workload's start reported"
        );
        assert!(feed(&[Status::Pid1(7), Status::Exited(0)]).is_err());
    }
}
