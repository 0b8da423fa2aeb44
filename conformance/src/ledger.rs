//! The ledger: every cell the harness creates is written down on disk before `create`, and the
//! entry is removed when the cell is destroyed cleanly. When a harness dies (a CI timeout, Ctrl-C,
//! the OOM killer) its entries stay; the next run reconciles them ([`reconcile`]): the cell is
//! destroyed through its backend when that backend is registered, then whatever remains is
//! removed by what was recorded — never by a name pattern:
//! - processes: the recorded host pid with its start time, and processes carrying the cell's
//!   marker (`CELLCHECK_MARKER=<value>` exactly) or mentioning its id or the backend's process
//!   markers (each carries the dead run's random token, so nothing else can match); the freezer
//!   cgroups they sit in are thawed first, or a SIGKILL would wait for a thaw that never comes;
//! - cgroup dirs, paths, mounts and netns the footprint named, but only those whose name
//!   mentions the cell's id or one of its process markers: a footprint may name a shared parent,
//!   and a shared parent is never removed.
//!
//! Each thing removed is reported by name: on stderr and as an audit line (see [`crate::audit::record`]).
//!
//! The ledger is host-wide: `/run/cellcheck/ledger` ([`DEFAULT_DIR`]), or the directory
//! `CELLCHECK_LEDGER_DIR` names (for a run without root, or a test's private ledger). Host-wide,
//! because the cells a killed run left are the host's problem whatever checkout ran it: a later
//! run of any checkout recovers them, also when the checkout that left them is gone. Runs of
//! several checkouts share it safely: an entry is reconciled only once its harness (pid and start
//! time) is dead, so a live run's cells are never touched by another's reconcile, and reconciles
//! of concurrent runs take turns (an exclusive lock on the directory's `.lock`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellcheck_contract::{Backend, Footprint};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Needles};

/// One live cell, as written before its `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub cell: String,
    pub backend: String,
    pub harness_pid: u32,
    /// The harness's start time (clock ticks since boot): with the pid, names it across reuse.
    pub harness_start: u64,
    /// The run: nextest's run id when set, else the harness pid and start time.
    pub run: String,
    pub marker: String,
    pub footprint: Footprint,
    /// `(pid, start time)` of the host pid `create` returned, once known.
    pub host_pid: Option<(u32, u64)>,
}

/// The host-wide ledger, unless [`DIR_VAR`] names another.
pub const DEFAULT_DIR: &str = "/run/cellcheck/ledger";
/// The variable naming another ledger directory.
pub const DIR_VAR: &str = "CELLCHECK_LEDGER_DIR";

/// The ledger directory: `CELLCHECK_LEDGER_DIR`, else [`DEFAULT_DIR`].
pub fn dir() -> PathBuf {
    std::env::var_os(DIR_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Make sure the ledger directory exists and takes entries: a run whose cells cannot be recorded
/// could not be recovered, so this is an error naming the directory and the variable, never a
/// silent skip. The directory is private (0700): entries name cells' markers and state paths.
pub fn ensure_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let bad = |e: std::io::Error| {
        format!(
            "the cell ledger {} cannot be used ({e}); run as root or point {DIR_VAR} at a \
             writable directory",
            dir.display()
        )
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(bad)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(bad)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// An exclusive `flock` on a file, held while the guard lives. On the ledger dir's `.lock`: two
/// runs starting at once reconcile one after the other, so one never removes what the other is
/// removing. A file that cannot be opened is no lock (the caller's work is still correct alone).
pub(crate) struct FileLock {
    _file: Option<std::fs::File>,
}

impl FileLock {
    pub(crate) fn take(path: &Path) -> FileLock {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok();
        if let Some(f) = &f {
            // SAFETY: flock on an fd we own; it blocks until the other holder is done.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        }
        FileLock { _file: f }
    }
}

fn run_id() -> String {
    let (pid, start) = audit::me();
    std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| format!("{pid}-{start}"))
}

impl Entry {
    pub fn new(cell: &str, backend: &str, marker: &str, footprint: Footprint) -> Entry {
        let (harness_pid, harness_start) = audit::me();
        Entry {
            cell: cell.into(),
            backend: backend.into(),
            harness_pid,
            harness_start,
            run: run_id(),
            marker: marker.into(),
            footprint,
            host_pid: None,
        }
    }

    /// The entry's file: the harness pid and a random token (an id is not a safe file name
    /// until admission accepted it, and two trials may use one id one after the other).
    pub fn file_name(&self, token: &str) -> String {
        format!("{}-{token}.json", self.harness_pid)
    }

    fn needles(&self) -> Needles {
        Needles {
            cell: self.cell.clone(),
            marker: self.marker.clone(),
            secrets: Vec::new(),
            process_markers: self.footprint.process_markers.clone(),
            host_pids: self.host_pid.into_iter().collect(),
        }
    }

    /// Whether `name` mentions the cell (its id or a process marker), so it is the cell's alone.
    fn owns(&self, name: &str) -> bool {
        self.needles().mentioned_in(name).is_some()
    }

    fn harness_alive(&self) -> bool {
        audit::start_time(self.harness_pid) == Some(self.harness_start)
    }
}

/// The backends with live cells of other, living harness processes.
pub fn live_backends_elsewhere() -> std::collections::BTreeSet<String> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir(dir()) else {
        return Default::default();
    };
    rd.flatten()
        // The file name starts with the harness pid: ours are skipped without reading them.
        .filter(|e| {
            !e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{me}-"))
        })
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|t| serde_json::from_slice::<Entry>(&t).ok())
        .filter(|e| e.harness_pid != me && e.harness_alive())
        .map(|e| e.backend)
        .collect()
}

/// Write `e` to `dir/file` atomically (a reader never sees half an entry).
pub fn write(dir: &Path, file: &str, e: &Entry) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(e).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// What reconciling one entry did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    pub backend: String,
    pub cell: String,
    /// The run that left it.
    pub run: String,
    /// Each thing removed, by name.
    pub removed: Vec<String>,
    /// What could not be removed (the entry is kept for the next run).
    pub errors: Vec<String>,
}

/// Reconcile every entry of `dir` whose harness is dead. `backend_of` returns the registered
/// backend of that name, if any, to destroy the cell through it first.
pub fn reconcile(
    dir: &Path,
    backend_of: &dyn Fn(&str) -> Option<std::sync::Arc<dyn Backend>>,
) -> Vec<Recovered> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let _lock = FileLock::take(&dir.join(".lock"));
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read(&f) else {
            continue;
        };
        let e: Entry = match serde_json::from_slice(&text) {
            Ok(e) => e,
            Err(err) => {
                out.push(Recovered {
                    cell: f.display().to_string(),
                    errors: vec![format!("unreadable ledger entry {}: {err}", f.display())],
                    ..Recovered::default()
                });
                continue;
            }
        };
        if e.harness_alive() {
            continue;
        }
        let r = recover(&e, backend_of(&e.backend));
        if r.errors.is_empty() {
            let _ = std::fs::remove_file(&f);
        }
        out.push(r);
    }
    out
}

fn recover(e: &Entry, backend: Option<std::sync::Arc<dyn Backend>>) -> Recovered {
    let mut r = Recovered {
        backend: e.backend.clone(),
        cell: e.cell.clone(),
        run: e.run.clone(),
        ..Recovered::default()
    };
    if let Some(b) = backend {
        let id = e.cell.clone();
        let done = crate::suite::runtime().block_on(async move {
            tokio::time::timeout(Duration::from_secs(30), b.destroy(&id)).await
        });
        match done {
            Ok(Ok(_)) => r.removed.push(format!(
                "cell {} destroyed through backend {}",
                e.cell, e.backend
            )),
            // A fresh backend instance usually does not know the cell: the rest goes by record.
            Ok(Err(_)) => {}
            Err(_) => r.errors.push(format!(
                "destroy of {} through {} hung for 30 s",
                e.cell, e.backend
            )),
        }
    }
    let n = e.needles();
    // Thaw first: a frozen process ignores SIGKILL until thawed.
    let mut freezers: Vec<PathBuf> = e
        .footprint
        .cgroup_dirs
        .iter()
        .filter(|d| e.owns(&d.to_string_lossy()))
        .cloned()
        .collect();
    let mut victims: Vec<audit::Proc> = audit::processes()
        .into_iter()
        .filter(|p| p.runnable() && n.process_reason(p).is_some())
        .collect();
    // Youngest first, so children go before their parents: a parent that is its pid namespace's
    // init takes the namespace with it, and what died that way could not be listed by name.
    victims.sort_by_key(|p| std::cmp::Reverse((p.start, p.pid)));
    for p in &victims {
        for line in p.cgroup.split(';') {
            let mut parts = line.splitn(3, ':');
            let (_, ctl, path) = (parts.next(), parts.next(), parts.next());
            if ctl.is_some_and(|c| c.split(',').any(|c| c == "freezer")) {
                if let Some(path) = path.filter(|p| e.owns(p)) {
                    freezers.push(
                        PathBuf::from("/sys/fs/cgroup/freezer").join(path.trim_start_matches('/')),
                    );
                }
            }
        }
    }
    for d in &freezers {
        if thaw(d) {
            r.removed
                .push(format!("thawed frozen cgroup {}", d.display()));
        }
    }
    for p in &victims {
        // The pid is signalled only while it still has the recorded start time.
        if audit::start_time(p.pid) == Some(p.start) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            r.removed.push(format!("killed process {}", p.describe()));
        }
    }
    // Also every process still in one of the cell's cgroups.
    for d in e
        .footprint
        .cgroup_dirs
        .iter()
        .filter(|d| e.owns(&d.to_string_lossy()))
    {
        for pid in cgroup_pids(d) {
            if victims.iter().any(|v| v.pid == pid) {
                continue;
            }
            if nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
            {
                r.removed
                    .push(format!("killed pid {pid} (in cgroup {})", d.display()));
            }
        }
    }
    // The kernel frees a killed process asynchronously: wait (bounded) for the kills to land.
    let start = std::time::Instant::now();
    loop {
        let left: Vec<String> = victims
            .iter()
            .filter(|p| {
                audit::start_time(p.pid) == Some(p.start)
                    && procfs::process::Process::new(p.pid as i32)
                        .and_then(|q| q.stat())
                        .is_ok_and(|s| s.state != 'Z')
            })
            .map(|p| p.describe())
            .collect();
        if left.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            r.errors.extend(
                left.into_iter()
                    .map(|p| format!("process {p} survived SIGKILL")),
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for m in e.footprint.mount_markers.iter().filter(|m| e.owns(m)) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(crate::residue::parse_mountinfo_line)
            .filter(|(mp, _)| mp.contains(m.as_str()))
            .map(|(mp, _)| mp.to_string())
            .collect();
        // Deepest first.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for mp in points {
            match nix::mount::umount2(mp.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => r.removed.push(format!("unmounted {mp}")),
                Err(err) => r.errors.push(format!("umount {mp}: {err}")),
            }
        }
    }
    for ns in e.footprint.netns.iter().filter(|n| e.owns(n)) {
        let p = Path::new("/run/netns").join(ns);
        if p.exists() {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            match std::fs::remove_file(&p) {
                Ok(()) => r.removed.push(format!("removed netns {ns}")),
                Err(err) => r.errors.push(format!("remove netns {ns}: {err}")),
            }
        }
    }
    let mut cgroups: Vec<PathBuf> = e
        .footprint
        .cgroup_dirs
        .iter()
        .filter(|d| e.owns(&d.to_string_lossy()) && d.exists())
        .flat_map(|d| {
            let mut all = vec![d.clone()];
            all.extend(crate::audit::cgroup_dirs_under(d));
            all
        })
        .collect();
    // Children before parents.
    cgroups.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    cgroups.dedup();
    for d in cgroups {
        match remove_cgroup(&d) {
            Ok(()) => r
                .removed
                .push(format!("removed cgroup dir {}", d.display())),
            Err(err) => r.errors.push(format!("rmdir {}: {err}", d.display())),
        }
    }
    // The dead instance's cgroup parents (`cellcheck/<instance>/`) go with its last cell, also
    // when the cell's own dirs were already gone.
    for d in e
        .footprint
        .cgroup_dirs
        .iter()
        .filter(|d| e.owns(&d.to_string_lossy()))
    {
        for p in remove_empty_cgroup_parents(d) {
            r.removed
                .push(format!("removed empty cgroup dir {}", p.display()));
        }
    }
    for p in e
        .footprint
        .paths
        .iter()
        .filter(|p| e.owns(&p.to_string_lossy()))
    {
        // A path already gone (its backend removed it before the kill) still has parents a dead
        // instance made for it.
        if let Ok(m) = p.symlink_metadata() {
            let res = if m.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            match res {
                Ok(()) => r.removed.push(format!("removed path {}", p.display())),
                Err(err) => {
                    r.errors.push(format!("remove {}: {err}", p.display()));
                    continue;
                }
            }
        }
        for d in remove_empty_parents(p) {
            r.removed.push(format!("removed empty dir {}", d.display()));
        }
    }
    r
}

/// Remove the now empty parents of a cell's cgroup dir (a dead instance's dir, then the shared
/// `cellcheck/` parent once nobody uses it), at most two levels up and never a hierarchy's root:
/// `rmdir` refuses a cgroup with children or tasks, and the backends walk again when a shared
/// parent vanishes under their mkdir.
fn remove_empty_cgroup_parents(d: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let mut out = Vec::new();
    let mut cur = d.parent();
    for _ in 0..2 {
        let Some(p) = cur else { break };
        // A hierarchy's root is a mount point: its device differs from its parent's.
        let root = match (dev(p), p.parent().and_then(dev)) {
            (Some(a), Some(b)) => a != b,
            _ => true,
        };
        if root || std::fs::remove_dir(p).is_err() {
            break;
        }
        out.push(p.to_path_buf());
        cur = p.parent();
    }
    out
}

/// Remove the now empty parents of a removed path (a dead instance's `bundles/`, then its
/// root, then a backend's shared base such as `/run/cellcheck/nested` once nobody uses it), at
/// most three levels up and never a file area (`/run`) or a direct child of one
/// (`/run/cellcheck`, which other runs share). `rmdir` refuses a dir that is not empty, so a
/// dir still in use is never removed.
fn remove_empty_parents(p: &Path) -> Vec<PathBuf> {
    let areas: Vec<PathBuf> = audit::file_roots(&[]);
    let mut out = Vec::new();
    let mut cur = p.parent();
    for _ in 0..3 {
        let Some(d) = cur else { break };
        let protected = d.parent().is_none()
            || areas
                .iter()
                .any(|a| d == a || d.parent() == Some(a.as_path()) || a.starts_with(d));
        if protected || std::fs::remove_dir(d).is_err() {
            break;
        }
        out.push(d.to_path_buf());
        cur = d.parent();
    }
    out
}

/// Thaw a v1 freezer or v2 cgroup; whether it was frozen.
fn thaw(d: &Path) -> bool {
    let v1 = d.join("freezer.state");
    if let Ok(s) = std::fs::read_to_string(&v1) {
        if s.trim() != "THAWED" {
            return std::fs::write(&v1, "THAWED").is_ok();
        }
        return false;
    }
    let v2 = d.join("cgroup.freeze");
    if std::fs::read_to_string(&v2).is_ok_and(|s| s.trim() == "1") {
        return std::fs::write(&v2, "0").is_ok();
    }
    false
}

fn cgroup_pids(d: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_to_string(d.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in crate::audit::cgroup_dirs_under(d) {
        out.extend(cgroup_pids(&sub));
    }
    out
}

/// `rmdir` a cgroup dir; a cgroup whose last task is still exiting is briefly busy (the kernel
/// releases it asynchronously after the task is dead), so EBUSY is retried for a bounded time.
fn remove_cgroup(d: &Path) -> std::io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match std::fs::remove_dir(d) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Recovered {
    /// What was recovered: `cell <id>`, or a backend's private rootfs copy (see
    /// [`crate::roots`]), which has no cell.
    pub fn what(&self) -> String {
        if self.cell.is_empty() {
            "the private rootfs copy".into()
        } else {
            format!("cell {}", self.cell)
        }
    }
}

/// How one recovered entry is printed.
pub fn describe(r: &Recovered) -> String {
    let mut s = format!(
        "cellcheck: recovered {} of backend {} (left by run {})",
        r.what(),
        r.backend,
        r.run
    );
    if r.removed.is_empty() && r.errors.is_empty() {
        s.push_str(": nothing of it was left");
    }
    for x in &r.removed {
        s.push_str(&format!("\n  - {x}"));
    }
    for x in &r.errors {
        s.push_str(&format!("\n  - NOT removed: {x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead instance's empty cgroup dir goes, a parent another instance still uses stays, and
    /// the last instance's removal takes the shared parent too, never the hierarchy's root.
    #[test]
    fn empty_cgroup_parents_go_up_to_the_hierarchy_root() {
        let mounts = procfs::process::Process::myself()
            .and_then(|p| p.mountinfo())
            .expect("mountinfo");
        let root = mounts
            .into_iter()
            .find(|m| matches!(m.fs_type.as_str(), "cgroup" | "cgroup2"))
            .map(|m| m.mount_point)
            .expect("a mounted cgroup hierarchy");
        let shared = root.join(format!("cc-unit-{}", crate::ids::random_token(8)));
        let (a, b) = (shared.join("inst-a"), shared.join("inst-b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let first = remove_empty_cgroup_parents(&a.join("cell"));
        let second = remove_empty_cgroup_parents(&b.join("cell"));
        let left = [&b, &shared].map(|d| d.exists());
        let _ = std::fs::remove_dir(&b);
        let _ = std::fs::remove_dir(&shared);
        assert_eq!(first, vec![a.clone()]);
        assert_eq!(left, [false, false]);
        assert_eq!(second, vec![b.clone(), shared.clone()]);
        assert!(root.is_dir());
        // Directly under the root: one level, then the root stops the walk.
        std::fs::create_dir(&shared).unwrap();
        assert_eq!(
            remove_empty_cgroup_parents(&shared.join("cell")),
            vec![shared.clone()]
        );
        assert!(root.is_dir());
    }

    #[test]
    fn an_entry_of_a_dead_harness_is_recovered_and_a_live_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tok = crate::ids::random_token(10);
        let cell = format!("cc-{tok}-ledger-01");
        let state = dir.path().join(format!("state-{cell}"));
        std::fs::create_dir(&state).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let marker = format!("ccm-{tok}");
        let mut child =
            crate::residue::spawn_marked(std::process::Command::new("sleep").arg("30"), &marker)
                .unwrap();
        let fp = Footprint {
            paths: vec![state.clone(), shared.clone()],
            ..Footprint::default()
        };
        let ledger = dir.path().join("ledger");
        let live = Entry::new(
            &format!("cc-{tok}-ledger-02"),
            "b",
            "",
            Footprint::default(),
        );
        write(&ledger, "live.json", &live).unwrap();
        let mut dead = Entry::new(&cell, "b", &marker, fp);
        // A harness pid with another start time: dead.
        dead.harness_start += 1;
        write(&ledger, "dead.json", &dead).unwrap();

        let got = reconcile(&ledger, &|_| None);
        assert_eq!(got.len(), 1, "{got:?}");
        let text = describe(&got[0]);
        assert!(got[0].errors.is_empty(), "{text}");
        assert!(text.contains(&format!("pid {}", child.id())), "{text}");
        assert!(text.contains(&state.display().to_string()), "{text}");
        // A shared path that does not mention the cell is never removed.
        assert!(shared.exists());
        assert!(!state.exists());
        child.wait().unwrap();
        assert!(ledger.join("live.json").exists());
        assert!(!ledger.join("dead.json").exists());
    }

    /// Another checkout's run shares the host-wide ledger: while its harness lives (same pid,
    /// same start time), its cell is never touched, even with a process and a path of its own.
    #[test]
    fn a_live_cell_of_another_harness_is_never_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let tok = crate::ids::random_token(10);
        let cell = format!("cc-{tok}-ledger-03");
        let state = dir.path().join(format!("state-{cell}"));
        std::fs::create_dir(&state).unwrap();
        let marker = format!("ccm-{tok}");
        // The other run's harness, and a process of its cell.
        let mut harness = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut workload =
            crate::residue::spawn_marked(std::process::Command::new("sleep").arg("30"), &marker)
                .unwrap();
        let mut e = Entry::new(
            &cell,
            "b",
            &marker,
            Footprint {
                paths: vec![state.clone()],
                ..Footprint::default()
            },
        );
        e.harness_pid = harness.id();
        e.harness_start = audit::start_time(harness.id()).unwrap();
        let ledger = dir.path().join("ledger");
        ensure_dir(&ledger).unwrap();
        write(&ledger, "other.json", &e).unwrap();
        let got = reconcile(&ledger, &|_| None);
        let alive = audit::start_time(workload.id()).is_some();
        assert!(got.is_empty() && alive && state.exists(), "{got:?}");
        // Once that harness is dead, the next reconcile recovers the cell.
        harness.kill().unwrap();
        harness.wait().unwrap();
        let got = reconcile(&ledger, &|_| None);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(!state.exists(), "{}", describe(&got[0]));
        workload.wait().unwrap();
        assert!(!ledger.join("other.json").exists());
    }

    #[test]
    fn an_unusable_ledger_dir_is_an_error_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = ensure_dir(&file.join("ledger")).unwrap_err();
        assert!(e.contains(DIR_VAR) && e.contains("file/ledger"), "{e}");
    }
}
