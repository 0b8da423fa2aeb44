//! Cell in cell: `cellcheck-driver host` runs inside an outer host cell and creates the inner
//! cells.
//!
//! # Layout
//!
//! Every inner cell gets its own outer cell (id `<instance>-<hash of the inner id>`), created by an
//! in-process [`HostBackend`] with three binds:
//!
//! | host                              | in the outer cell     |                                  |
//! |-----------------------------------|-----------------------|----------------------------------|
//! | `/sys/fs/cgroup`                  | `/sys/fs/cgroup`      | read-write: the inner backend makes cgroups |
//! | the fixtures dir                  | `/run/fixtures`       | read-only: init, rootfs, static driver |
//! | `/run/cellcheck/nested/<instance>`| `/run/nest`           | read-write: sockets and inner state |
//!
//! The outer workload is `cellcheck-driver --connect /run/nest/sock/<outer>.sock host ...`: the
//! host backend gives a cell capture files, not a channel, so the driver *connects out* to a unix
//! socket we listen on in the bound directory (path sockets work across mount and network
//! namespaces). Outer and inner cells alike run in the rootfs the backend was given (the suite's
//! private copy sits inside the fixtures dir, so the inner cells reach it through the bind). The inner backend keeps its state in `/run/nest/state/<outer>`, so its files are
//! visible on the host, and its cgroups land in the real hierarchy next to the outer cell's.
//!
//! # Seeing through both layers
//!
//! `footprint(id)` is the outer cell's footprint plus the inner backend's (computed in process
//! from the same configuration the driver runs with, paths translated to the host). Destroy asks
//! the driver to destroy the inner cell, closes the connection (the driver then exits), destroys
//! the outer cell, and removes whatever of the inner footprint is left — so a driver that crashed
//! or hung leaves nothing behind either.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cellcheck_contract::table::CellTable;
use cellcheck_contract::{
    Availability, Backend, Capabilities, Capability, CellDocument, CellError, CellHandle,
    ExecRequest, ExitReport, Footprint, TeardownReport,
};
use cellcheck_host::{BindMount, HostBackend, HostConfig};

use crate::client;
use crate::conn::{Conn, Peer};
use crate::RemoteOptions;

mod backend;

/// Where each nested instance keeps its sockets and inner state (`<base>/<instance>`).
pub const STATE_BASE: &str = "/run/cellcheck/nested";

const FIXTURES_IN_CELL: &str = "/run/fixtures";
const NEST_IN_CELL: &str = "/run/nest";

/// The static driver: `CELLCHECK_DRIVER_BIN` when set, else the one the fixture builder built
/// beside the other static fixtures (it runs in the busybox root of the outer cell).
pub fn ensure_static_driver(fx: &cellcheck_fixtures::Fixtures) -> Result<PathBuf, CellError> {
    let driver = std::env::var_os("CELLCHECK_DRIVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| fx.driver.clone());
    if driver.is_file() {
        Ok(driver)
    } else {
        Err(CellError::Unavailable {
            reason: format!("static cellcheck-driver missing at {}", driver.display()),
        })
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The outer cell's driver: the outer cell's workload, a host pid we know (and its start time, so a
/// reused pid is never signalled).
struct OuterPeer {
    pid: u32,
    start: Option<u64>,
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; starttime is field 22 overall.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl Peer for OuterPeer {
    fn kill(&self) {
        if self.start.is_some() && start_time(self.pid) == self.start {
            // SAFETY: signalling the driver process of an outer cell we created (start time checked).
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
            }
        }
    }
    fn ended(&self, grace: Duration) -> Option<String> {
        let end = Instant::now() + grace;
        loop {
            if start_time(self.pid) != self.start {
                return Some("in the outer cell exited".into());
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The host pid of the process that the driver (host pid `driver`) sees as `ns_pid`: a descendant
/// of the driver whose pid one namespace level below the host's is `ns_pid`.
fn host_pid_of(driver: u32, ns_pid: u32) -> Option<u32> {
    let parent_of = |pid: u32| -> Option<u32> {
        let st = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        st.lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    };
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(st) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let Some(nspid) = st.lines().find_map(|l| l.strip_prefix("NSpid:")) else {
            continue;
        };
        let levels: Vec<u32> = nspid
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if levels.get(1) != Some(&ns_pid) {
            continue;
        }
        let mut p = pid;
        for _ in 0..64 {
            match parent_of(p) {
                Some(pp) if pp == driver => return Some(pid),
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    None
}

struct NestedCell {
    id: String,
    outer_id: String,
    /// Host pid of the driver (the outer cell's workload).
    driver_pid: u32,
    conn: Conn,
    timeout_ms: Option<u64>,
    ttl: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Inner {
    name: String,
    instance: String,
    /// Host side of `/run/nest`.
    root: PathBuf,
    driver: PathBuf,
    /// The root of the inner cells, as the outer cell sees it: the rootfs this backend was given
    /// (the suite's private copy lives in the fixtures dir too), reached through the fixtures bind.
    rootfs_in_cell: PathBuf,
    /// The static driver, as the outer cell sees it.
    driver_in_cell: PathBuf,
    outer: Option<HostBackend>,
    caps: Capabilities,
    opts: RemoteOptions,
    cells: CellTable<NestedCell>,
}

/// The nested backend. Cheap to clone; clones share their cells.
#[derive(Clone)]
pub struct NestedBackend {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NestedBackend {
    /// A nested backend over the built fixtures (builds the static driver if needed).
    pub fn from_fixtures(fx: &cellcheck_fixtures::Fixtures) -> Result<Self, CellError> {
        let driver = ensure_static_driver(fx)?;
        Ok(Self::new(fx, driver, RemoteOptions::default()))
    }

    /// Suite factory: the nested backend, or an unavailable stand-in saying why it cannot be built.
    pub fn for_suite(fx: &cellcheck_fixtures::Fixtures) -> Arc<dyn Backend> {
        match Self::from_fixtures(fx) {
            Ok(b) => Arc::new(b),
            Err(e) => Arc::new(crate::UnavailableBackend::new("nested", e.to_string())),
        }
    }

    /// `driver` must be a static `cellcheck-driver` inside `fx.dir` (it is reached through the
    /// fixtures bind).
    pub fn new(fx: &cellcheck_fixtures::Fixtures, driver: PathBuf, opts: RemoteOptions) -> Self {
        let instance = format!(
            "nest{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() >> 8
        );
        let root = PathBuf::from(STATE_BASE).join(&instance);
        let mut cfg = HostConfig::from_fixtures(fx);
        cfg.name = "nested-outer".into();
        // The outer cell runs the inner backend, which needs mounts, namespaces and cgroups; the
        // inner cells, where workloads run, get the full hardening from the inner host-init.
        cfg.privileged = true;
        cfg.extra_binds = vec![
            BindMount {
                source: "/sys/fs/cgroup".into(),
                target: "/sys/fs/cgroup".into(),
                readonly: false,
            },
            BindMount {
                source: fx.dir.clone(),
                target: FIXTURES_IN_CELL.into(),
                readonly: true,
            },
            BindMount {
                source: root.clone(),
                target: NEST_IN_CELL.into(),
                readonly: false,
            },
        ];
        let outer = HostBackend::new(cfg);
        let caps = Self::inner_caps(&instance);
        // Both through the fixtures bind (the suite's rootfs copies live in the fixtures dir).
        let in_cell = |p: &Path, or: &str| {
            Path::new(FIXTURES_IN_CELL).join(p.strip_prefix(&fx.dir).unwrap_or(Path::new(or)))
        };
        let rootfs_in_cell = in_cell(&fx.rootfs, "rootfs");
        let driver_in_cell = in_cell(&driver, "bin/cellcheck-driver");
        NestedBackend {
            inner: Arc::new(Inner {
                name: "nested".into(),
                instance,
                root,
                driver,
                rootfs_in_cell,
                driver_in_cell,
                outer: Some(outer),
                caps,
                opts,
                cells: CellTable::new(),
            }),
        }
    }

    /// The inner backend's capabilities: those of the host backend, as the driver will declare.
    fn inner_caps(instance: &str) -> Capabilities {
        let probe = HostBackend::new(inner_config(&format!("{instance}-caps")));
        let mut caps = probe.capabilities();
        if let cellcheck_contract::Support::Unsupported { .. } = caps.support(Capability::Snapshot)
        {
            caps = caps.without(
                Capability::Snapshot,
                "nested host cells do not snapshot (no CRIU in the cell's root)",
            );
        }
        caps
    }

    fn outer(&self) -> &HostBackend {
        self.inner
            .outer
            .as_ref()
            .expect("outer backend lives as long as the nested one")
    }

    /// The outer cell that carries inner cell `id`.
    pub fn outer_id(&self, id: &str) -> String {
        format!("{}-{:016x}", self.inner.instance, fnv(id))
    }

    fn socket(&self, outer_id: &str) -> PathBuf {
        self.inner
            .root
            .join("sock")
            .join(format!("{outer_id}.sock"))
    }

    fn live(&self, id: &str) -> Result<Arc<NestedCell>, CellError> {
        self.inner.cells.get(id)
    }

    /// The inner backend's footprint of `id`, with paths as the host sees them.
    fn inner_footprint(&self, id: &str) -> Footprint {
        let outer_id = self.outer_id(id);
        let mut f = inner_footprint_in_cell(&outer_id, id);
        f.paths = f
            .paths
            .into_iter()
            .map(|p| match p.strip_prefix(NEST_IN_CELL) {
                Ok(rest) => self.inner.root.join(rest),
                Err(_) => p,
            })
            .collect();
        // The inner backend's instance dirs belong to this one outer cell, so they are the
        // cell's residue too.
        let parents: Vec<PathBuf> = f
            .cgroup_dirs
            .iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        f.cgroup_dirs.extend(parents);
        f
    }

    fn outer_stderr(&self, outer_id: &str) -> String {
        let p = self.outer().state_dir(outer_id).join("stderr");
        let s = fs::read_to_string(p).unwrap_or_default();
        let tail: String = s
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if tail.trim().is_empty() {
            String::new()
        } else {
            format!("; driver stderr: {:?}", tail.trim())
        }
    }

    /// Start the outer cell and its driver, and connect: the connection and the driver's host
    /// pid. On error nothing is left.
    async fn open(&self, outer_id: &str) -> Result<(Conn, u32), CellError> {
        let sock_dir = self.inner.root.join("sock");
        let state_dir = self.inner.root.join("state").join(outer_id);
        for d in [&sock_dir, &state_dir] {
            make_dirs(d).map_err(|e| CellError::failure(format!("create {}: {e}", d.display())))?;
        }
        let sock = self.socket(outer_id);
        let _ = fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| CellError::failure(format!("listen on {}: {e}", sock.display())))?;
        let driver_in_cell = &self.inner.driver_in_cell;
        let mut inner_cfg = inner_config(outer_id);
        inner_cfg.rootfs = self.inner.rootfs_in_cell.clone();
        let doc = CellDocument::new(
            outer_id,
            [
                driver_in_cell.display().to_string(),
                "--connect".into(),
                format!("{NEST_IN_CELL}/sock/{outer_id}.sock"),
                "host".into(),
                "--rootfs".into(),
                inner_cfg.rootfs.display().to_string(),
                "--init".into(),
                inner_cfg.init.display().to_string(),
                "--state-root".into(),
                inner_cfg.state_root.display().to_string(),
                "--name".into(),
                inner_cfg.name.clone(),
            ],
        )
        .with_env("CELLCHECK_NESTED_OUTER", outer_id);
        let handle = match self.outer().create(&doc).await {
            Ok(h) => h,
            Err(e) => {
                self.sweep(outer_id, None);
                return Err(CellError::failure(format!("outer cell {outer_id}: {e}")));
            }
        };
        tracing::debug!(outer = outer_id, driver_pid = ?handle.host_pid, "outer cell runs the driver");
        let accepted =
            tokio::time::timeout(self.inner.opts.deadlines.handshake, listener.accept()).await;
        let stream = match accepted {
            Ok(Ok((s, _))) => s
                .into_std()
                .and_then(|s| s.set_nonblocking(false).map(|_| s)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other(format!(
                "the driver did not connect within {} ms",
                self.inner.opts.deadlines.handshake.as_millis()
            ))),
        };
        drop(listener);
        let _ = fs::remove_file(&sock);
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let why = format!("outer cell {outer_id}: {e}{}", self.outer_stderr(outer_id));
                self.teardown_outer(outer_id, None).await;
                return Err(CellError::failure(why));
            }
        };
        let reader = stream
            .try_clone()
            .map_err(|e| CellError::failure(format!("socket: {e}")))?;
        let pid = handle.host_pid.unwrap_or(0);
        let conn = Conn::start(
            format!("nested driver in {outer_id} (pid {pid})"),
            Box::new(reader),
            Box::new(SocketWriter(stream)),
            Box::new(OuterPeer {
                pid,
                start: start_time(pid),
            }),
            self.inner.opts.tap.clone(),
        );
        tracing::debug!(outer = outer_id, "driver connected");
        if let Err(e) = client::handshake(&conn, &self.inner.opts.deadlines, None).await {
            tracing::debug!(outer = outer_id, error = %e, "driver handshake failed");
            conn.close(Duration::from_secs(2));
            self.teardown_outer(outer_id, None).await;
            return Err(e);
        }
        tracing::debug!(outer = outer_id, "driver handshake done");
        Ok((conn, pid))
    }

    /// Destroy the outer cell and remove what is left of the inner cell `inner_id`.
    async fn teardown_outer(&self, outer_id: &str, inner_id: Option<&str>) {
        tracing::debug!(outer = outer_id, "outer cell teardown");
        match self.outer().destroy(outer_id).await {
            Ok(_) | Err(CellError::NotFound { .. }) => {}
            Err(e) => eprintln!("{}: destroy outer cell {outer_id}: {e}", self.inner.name),
        }
        self.sweep(outer_id, inner_id);
    }

    /// Remove what a dead driver could not: the inner cell's cgroups and state, our socket.
    fn sweep(&self, outer_id: &str, inner_id: Option<&str>) {
        if let Some(id) = inner_id {
            let f = self.inner_footprint(id);
            remove_cgroup_dirs_and_parents(&f.cgroup_dirs);
            for p in &f.paths {
                let _ = fs::remove_dir_all(p);
            }
        }
        let _ = fs::remove_file(self.socket(outer_id));
        let _ = fs::remove_dir_all(self.inner.root.join("state").join(outer_id));
    }

    /// Tear down the cell `teardown` holds. `incarnation` is `Some` when the cell's own TTL timer
    /// is the caller, which must not abort itself.
    async fn destroy_cell(
        &self,
        id: &str,
        cell: &NestedCell,
        incarnation: Option<u64>,
    ) -> Result<bool, CellError> {
        if incarnation.is_none() {
            if let Some(t) = lock(&cell.ttl).take() {
                t.abort();
            }
        }
        let inner = client::destroy(&cell.conn, &self.inner.opts.deadlines, id).await;
        // The driver destroys anything left and exits when its input closes.
        cell.conn.close(Duration::from_secs(10));
        self.teardown_outer(&cell.outer_id, Some(id)).await;
        match inner {
            Ok(r) => Ok(r.killed_running),
            Err(e @ CellError::NotFound { .. }) => Err(e),
            Err(e) => {
                // The outer cell took everything with it; say so, but the cell is gone.
                eprintln!(
                    "{}: inner destroy of {id} failed ({e}); removed with its outer cell (driver pid {})",
                    self.inner.name, cell.driver_pid
                );
                Ok(true)
            }
        }
    }
}

/// Remove an inner cell's cgroup dirs and their parents: the inner backend's instance dir is named
/// after the one outer cell it runs in, so nothing else lives there (a busy dir stays: rmdir fails).
fn remove_cgroup_dirs_and_parents(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = fs::remove_dir(d);
        if let Some(parent) = d.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// The inner backend's configuration, as the driver in the outer cell runs it.
fn inner_config(outer_id: &str) -> HostConfig {
    let mut c = HostConfig::new(
        format!("{FIXTURES_IN_CELL}/bin/cellcheck-host-init"),
        format!("{FIXTURES_IN_CELL}/rootfs"),
    );
    c.state_root = PathBuf::from(format!("{NEST_IN_CELL}/state/{outer_id}"));
    c.name = "nested-inner".into();
    c
}

/// The inner footprint as the inner backend computes it (paths inside the outer cell).
fn inner_footprint_in_cell(outer_id: &str, id: &str) -> Footprint {
    HostBackend::new(inner_config(outer_id)).footprint(id)
}

/// `create_dir_all`, walking again when a parent vanished on the way: the shared base
/// ([`STATE_BASE`]) is removed by whichever instance (or recovery) finds it empty, in any process,
/// so it may go between our mkdir of it and of the dir below it.
fn make_dirs(d: &Path) -> std::io::Result<()> {
    const MAX_WALKS: u32 = 1000;
    let mut walks = 1;
    loop {
        match fs::create_dir_all(d) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && walks < MAX_WALKS => walks += 1,
            r => return r,
        }
    }
}

fn merge(mut a: Footprint, b: Footprint) -> Footprint {
    a.process_markers.extend(b.process_markers);
    a.cgroup_dirs.extend(b.cgroup_dirs);
    a.paths.extend(b.paths);
    a.mount_markers.extend(b.mount_markers);
    a.netns.extend(b.netns);
    a
}

impl NestedBackend {
    /// Destroy `id` (only its incarnation `incarnation`, when given: for the TTL timer). A
    /// concurrent second destroy waits in the cell table until this one is over.
    async fn destroy_incarnation(
        &self,
        id: &str,
        incarnation: Option<u64>,
    ) -> Result<TeardownReport, CellError> {
        let teardown = self.inner.cells.begin_destroy(id, incarnation).await?;
        let killed_running = self.destroy_cell(id, teardown.cell(), incarnation).await?;
        let remaining_cells = teardown.finish();
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running,
            remaining_cells,
        })
    }
}

/// The write half of the driver's socket: dropping it shuts the direction down, so the driver sees
/// end of input even though the reader still holds the socket.
struct SocketWriter(std::os::unix::net::UnixStream);

impl std::io::Write for SocketWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Drop for SocketWriter {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let cells = self.cells.drain();
        for c in &cells {
            c.conn.close(Duration::from_secs(5));
        }
        // Dropping the outer backend destroys every outer cell it still tracks.
        drop(self.outer.take());
        for c in &cells {
            let f = inner_footprint_in_cell(&c.outer_id, &c.id);
            remove_cgroup_dirs_and_parents(&f.cgroup_dirs);
        }
        let _ = fs::remove_dir_all(&self.root);
        // The shared parent goes with the last instance (fails harmlessly while others live).
        if let Some(parent) = self.root.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}
