//! The host audit: what a cell could leave on a Linux host, found by looking, not by asking the
//! backend.
//!
//! A [`Snapshot`] records the process table (pid, start time, state, ppid, cgroup, cmdline,
//! environ), every cgroup hierarchy's directory tree (v1 and v2 alike: everything under
//! `/sys/fs/cgroup`), mountinfo, `/run/netns`, network interfaces, loop devices, the entries
//! under the audited file areas (`/tmp`, `/run`, `/var/run`, `/var/lib`, `/dev/shm` and the
//! backends' state roots) and the harness's own fds.
//!
//! Two checks use it:
//! - per trial ([`scoped`]): after the trial's cells are destroyed, anything on the host that
//!   mentions one of its cells (id, marker, secret) is residue of that trial, whether or not the
//!   backend's footprint named it. The footprint only sharpens the message.
//! - per window ([`Window`]): a snapshot before the first trial of this process and after its
//!   last; what is new afterwards and mentions a cell of the window is blamed on that cell's trial,
//!   what mentions none is blamed only when ancestry proves it ours (see below).
//!
//! # Attribution, with other work running on the same host
//!
//! Trials run in parallel as threads of one process (`cargo test`) and as separate processes
//! (`cargo nextest`), beside other backends' trials and beside work that is not this run's at all.
//! Nothing is ever blamed because it is merely new:
//! - every cell id and marker carries a random token minted by its trial, so a name that mentions
//!   one cannot belong to another trial, another process or another run;
//! - a process that mentions no cell is blamed only when it descends from this harness process
//!   (ppid chain) or is a zombie child of it: another process's trials are not our descendants.
//!   Within one process, it is blamed when the window closes (no trial of this process is running)
//!   and attributed, by its start time, to the backends whose trials were running when it started;
//! - files, cgroup dirs, mounts and netns that mention no cell are never blamed: on a shared host
//!   they may be anyone's. (This is the price of "no false red"; a backend that names its
//!   resources after the cell, as every built-in one does, is fully covered.)

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::ids::MARKER_VAR;

/// The file areas audited on every host.
pub const FILE_AREAS: &[&str] = &["/tmp", "/run", "/var/run", "/var/lib", "/dev/shm"];
/// How deep the file areas are walked: cells' leftovers sit near the top (a state dir, a socket,
/// a bundle); deeper levels are their contents.
const FILE_DEPTH: usize = 4;
/// `/var/lib` holds package databases thousands of files deep; a tool's per-cell state there sits
/// at `/var/lib/<tool>/<id>`.
const VAR_LIB_DEPTH: usize = 2;
/// The most entries recorded per snapshot, so an unusual host cannot make the audit slow.
const FILE_CAP: usize = 60_000;
/// The most bytes read per file when looking for a secret.
const SECRET_READ_MAX: u64 = 4 << 20;

/// One process of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// Start time in clock ticks since boot: with the pid, names the process across pid reuse.
    pub start: u64,
    pub ppid: u32,
    pub state: char,
    /// `/proc/<pid>/cgroup`, lines joined by `;`.
    pub cgroup: String,
    pub cmdline: Vec<u8>,
    pub environ: Vec<u8>,
}

impl Proc {
    pub fn cmdline_lossy(&self) -> String {
        let s = String::from_utf8_lossy(&self.cmdline)
            .replace('\0', " ")
            .trim()
            .to_string();
        if s.is_empty() {
            "[no cmdline]".into()
        } else {
            s
        }
    }

    /// Not a zombie nor dead: it can still run code.
    pub fn runnable(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }

    pub fn describe(&self) -> String {
        format!(
            "pid {} (state {}, ppid {}, cmdline {:?})",
            self.pid,
            self.state,
            self.ppid,
            self.cmdline_lossy()
        )
    }
}

/// Size, mode and modification time of a file entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i128,
}

impl FileMeta {
    fn of(m: &std::fs::Metadata) -> Self {
        FileMeta {
            size: m.size(),
            mode: m.mode(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }
}

/// What the host looked like at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Clock ticks since boot when the snapshot was taken.
    pub at: u64,
    pub procs: BTreeMap<(u32, u64), Proc>,
    pub cgroups: BTreeSet<PathBuf>,
    /// `mount point, source, fstype` of every mount of the harness's mount namespace.
    pub mounts: BTreeSet<String>,
    pub netns: BTreeSet<String>,
    pub links: BTreeSet<String>,
    /// Loop devices and their backing files.
    pub loops: BTreeSet<String>,
    pub files: BTreeMap<PathBuf, FileMeta>,
    pub fds: BTreeMap<i32, PathBuf>,
    /// Every entry of the shared fixture rootfs (paths, sizes, modes, mtimes).
    pub rootfs: BTreeMap<PathBuf, FileMeta>,
}

/// Clock ticks since boot, the unit of a process's start time.
pub fn now_ticks() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = up
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    (secs * procfs::ticks_per_second() as f64) as u64
}

/// `(pid, start time)` of this process.
pub fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_time(pid).unwrap_or(0))
}

/// The start time of `pid`, if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()
        .map(|s| s.starttime)
}

/// Every process of the host except this one.
pub fn processes() -> Vec<Proc> {
    processes_since(None)
}

/// Every process of the host except this one; cmdline, environ and cgroup are read only for
/// processes not in `known` (a baseline's keys). A process that existed when the baseline was
/// taken was forked before any cell of the window was created, so it is none of theirs: its
/// contents are not needed, and skipping them keeps a snapshot cheap.
pub fn processes_since(known: Option<&BTreeMap<(u32, u64), Proc>>) -> Vec<Proc> {
    read_processes(known, true)
}

/// The process table; with `contents` false only what `/proc/<pid>/stat` says (a baseline needs
/// no more: its processes' contents are never looked at, see [`processes_since`]).
fn read_processes(known: Option<&BTreeMap<(u32, u64), Proc>>, contents: bool) -> Vec<Proc> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(all) = procfs::process::all_processes() else {
        return out;
    };
    for p in all.flatten() {
        if p.pid as u32 == me {
            continue;
        }
        // A process that exits meanwhile is simply not there.
        let Ok(st) = p.stat() else { continue };
        let pid = st.pid as u32;
        if let Some(k) = known.and_then(|k| k.get(&(pid, st.starttime))) {
            out.push(Proc {
                state: st.state,
                ppid: st.ppid as u32,
                ..k.clone()
            });
            continue;
        }
        let read = |f: &str| {
            if contents {
                std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default()
            } else {
                Vec::new()
            }
        };
        let cgroup = String::from_utf8_lossy(&read("cgroup"))
            .trim()
            .replace('\n', ";");
        out.push(Proc {
            pid,
            start: st.starttime,
            ppid: st.ppid as u32,
            state: st.state,
            cgroup,
            cmdline: read("cmdline"),
            environ: read("environ"),
        });
    }
    out
}

fn walk_dirs(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let p = e.path();
            out.insert(p.clone());
            walk_dirs(&p, out);
        }
    }
}

/// The cgroup directories below `d`.
pub fn cgroup_dirs_under(d: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    walk_dirs(d, &mut out);
    out
}

/// Every cgroup directory of every hierarchy (v1 controllers, the v2 tree, hybrids).
pub fn cgroup_dirs() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    walk_dirs(Path::new("/sys/fs/cgroup"), &mut out);
    out
}

fn mounts() -> BTreeSet<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let src = post.next()?;
            Some(format!("{mp} (source {src}, type {fstype})"))
        })
        .collect()
}

fn names_in(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn loops() -> BTreeSet<String> {
    names_in("/sys/block")
        .into_iter()
        .filter(|n| n.starts_with("loop"))
        .filter_map(|n| {
            let f = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file")).ok()?;
            Some(format!("/dev/{n} backed by {}", f.trim()))
        })
        .collect()
}

fn walk_files(
    dir: &Path,
    depth: usize,
    out: &mut BTreeMap<PathBuf, FileMeta>,
    skip: &BTreeSet<PathBuf>,
) {
    if depth == 0 || out.len() >= FILE_CAP {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if out.len() >= FILE_CAP {
            return;
        }
        let p = e.path();
        if skip.contains(&p) {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        out.insert(p.clone(), FileMeta::of(&m));
        if m.is_dir() {
            walk_files(&p, depth - 1, out, skip);
        }
    }
}

/// The file areas plus `extra` roots (backend state roots), without duplicates or symlinked
/// aliases (`/var/run` is usually `/run`).
pub fn file_roots(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for r in FILE_AREAS
        .iter()
        .map(PathBuf::from)
        .chain(extra.iter().cloned())
    {
        let Ok(real) = r.canonicalize() else { continue };
        if !roots.iter().any(|x| real.starts_with(x)) {
            roots.retain(|x| !x.starts_with(&real));
            roots.push(real);
        }
    }
    roots
}

impl Snapshot {
    /// Take a snapshot, walking the file areas plus `extra_roots`.
    pub fn take(extra_roots: &[PathBuf]) -> Snapshot {
        Self::take_since(extra_roots, None)
    }

    /// [`Snapshot::take`], reusing `baseline`'s process contents (see [`processes_since`]).
    pub fn take_since(extra_roots: &[PathBuf], baseline: Option<&Snapshot>) -> Snapshot {
        Self::take_inner(extra_roots, baseline, true)
    }

    /// A baseline: processes by stat only.
    pub fn take_baseline(extra_roots: &[PathBuf]) -> Snapshot {
        Self::take_inner(extra_roots, None, false)
    }

    fn take_inner(
        extra_roots: &[PathBuf],
        baseline: Option<&Snapshot>,
        contents: bool,
    ) -> Snapshot {
        let procs = read_processes(baseline.map(|b| &b.procs), contents)
            .into_iter()
            .map(|p| ((p.pid, p.start), p))
            .collect();
        let mut files = BTreeMap::new();
        // The fixtures and the build output may sit under /tmp; they are not a cell's.
        let skip: BTreeSet<PathBuf> = [cellcheck_fixtures::fixtures_dir()]
            .into_iter()
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        for r in file_roots(extra_roots) {
            let depth = if r == Path::new("/var/lib") {
                VAR_LIB_DEPTH
            } else {
                FILE_DEPTH
            };
            walk_files(&r, depth, &mut files, &skip);
        }
        let mut rootfs = BTreeMap::new();
        if let Some(r) = crate::harness::fixtures_rootfs().filter(|r| r.is_dir()) {
            walk_files(&r, 64, &mut rootfs, &BTreeSet::new());
        }
        Snapshot {
            rootfs,
            at: now_ticks(),
            procs,
            cgroups: cgroup_dirs(),
            mounts: mounts(),
            netns: names_in("/run/netns"),
            links: names_in("/sys/class/net"),
            loops: loops(),
            files,
            fds: crate::residue::own_fds(),
        }
    }

    /// Whether `p` descends from this harness process (its ppid chain reaches us).
    pub fn descends_from_me(&self, p: &Proc) -> bool {
        let me = std::process::id();
        let by_pid: BTreeMap<u32, &Proc> = self.procs.values().map(|p| (p.pid, p)).collect();
        let mut cur = p.ppid;
        for _ in 0..64 {
            if cur == me {
                return true;
            }
            match by_pid.get(&cur) {
                Some(q) if q.ppid != cur => cur = q.ppid,
                _ => return false,
            }
        }
        false
    }
}

/// What identifies one cell's things: its id, its marker, its declared secrets, the backend's
/// process markers (e.g. a runtime's container id) and the host pids it was given.
#[derive(Debug, Clone, Default)]
pub struct Needles {
    pub cell: String,
    pub marker: String,
    pub secrets: Vec<String>,
    pub process_markers: Vec<String>,
    /// `(pid, start time)` of the host pids the backend reported.
    pub host_pids: Vec<(u32, u64)>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

impl Needles {
    /// Strings a resource's name may mention: the id and the backend's markers. (Ids are validated
    /// `[A-Za-z0-9._-]` and carry the trial's random token, so a mention is never an accident.)
    fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.cell.as_str())
            .chain(self.process_markers.iter().map(String::as_str))
            .filter(|s| s.len() >= 8)
    }

    /// Why process `p` belongs to this cell, if it does.
    pub fn process_reason(&self, p: &Proc) -> Option<String> {
        if self.host_pids.contains(&(p.pid, p.start)) {
            return Some("the host pid the backend reported".into());
        }
        if !self.marker.is_empty() {
            let exact = format!("{MARKER_VAR}={}\0", self.marker);
            if contains(&p.environ, exact.as_bytes())
                || contains(&p.cmdline, self.marker.as_bytes())
            {
                return Some(format!("marker {}", self.marker));
            }
        }
        for n in self.names() {
            if contains(&p.cmdline, n.as_bytes()) {
                return Some(format!("cmdline mentions {n}"));
            }
            if contains(&p.environ, n.as_bytes()) {
                return Some(format!("environ mentions {n}"));
            }
            if p.cgroup.contains(n) {
                return Some(format!("its cgroup mentions {n}"));
            }
        }
        for s in &self.secrets {
            if contains(&p.cmdline, s.as_bytes()) || contains(&p.environ, s.as_bytes()) {
                return Some("it holds a declared secret".into());
            }
        }
        None
    }

    /// Whether a resource name (path, mount line, netns) mentions this cell.
    pub fn mentioned_in(&self, s: &str) -> Option<String> {
        self.names().find(|n| s.contains(n)).map(String::from)
    }
}

/// One thing left on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    Process { proc_: String, why: String },
    Zombie { pid: u32 },
    CgroupDir(PathBuf),
    Mount(String),
    Netns(String),
    Link(String),
    Loop(String),
    File(PathBuf),
    Secret { path: PathBuf },
    Rootfs(String),
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Process { proc_, why } => write!(f, "process {proc_} still alive ({why})"),
            Leftover::Zombie { pid } => write!(f, "unreaped zombie child pid {pid} of the harness"),
            Leftover::CgroupDir(p) => write!(f, "cgroup dir {} still exists", p.display()),
            Leftover::Mount(m) => write!(f, "mount {m} still present"),
            Leftover::Netns(n) => write!(f, "netns {n} still exists (/run/netns/{n})"),
            Leftover::Link(l) => write!(f, "network interface {l} still exists"),
            Leftover::Loop(l) => write!(f, "loop device {l} still attached"),
            Leftover::File(p) => write!(f, "path {} still exists", p.display()),
            Leftover::Secret { path } => {
                write!(f, "file {} holds a declared secret", path.display())
            }
            Leftover::Rootfs(c) => write!(f, "shared rootfs changed: {c}"),
        }
    }
}

/// Whether `path` (a file of at most [`SECRET_READ_MAX`] bytes) contains one of `secrets`.
fn file_holds(path: &Path, secrets: &[String]) -> bool {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::new();
    if f.take(SECRET_READ_MAX).read_to_end(&mut buf).is_err() {
        return false;
    }
    secrets.iter().any(|s| contains(&buf, s.as_bytes()))
}

/// Files of `after` that are new or changed since `before` and hold one of `secrets`.
pub fn files_with_secrets(before: &Snapshot, after: &Snapshot, secrets: &[String]) -> Vec<PathBuf> {
    if secrets.iter().all(|s| s.is_empty()) {
        return Vec::new();
    }
    after
        .files
        .iter()
        .filter(|(p, m)| {
            m.mode & 0o170000 == 0o100000
                && m.size > 0
                && before.files.get(*p) != Some(*m)
                && file_holds(p, secrets)
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// The per-trial check: everything in `after` that mentions one of `cells`, as
/// `(cell, leftover)`. `before` is the snapshot taken when the trial started (for the secret
/// search, which reads only files new or changed since then).
pub fn scoped(cells: &[Needles], before: &Snapshot, after: &Snapshot) -> Vec<(String, Leftover)> {
    let mut out = Vec::new();
    let me = std::process::id();
    for c in cells {
        let mut push = |l: Leftover| out.push((c.cell.clone(), l));
        for p in after.procs.values() {
            if p.state == 'Z' && p.ppid == me && c.host_pids.contains(&(p.pid, p.start)) {
                push(Leftover::Zombie { pid: p.pid });
            } else if p.runnable() {
                if let Some(why) = c.process_reason(p) {
                    push(Leftover::Process {
                        proc_: p.describe(),
                        why,
                    });
                }
            }
        }
        for d in &after.cgroups {
            if c.mentioned_in(&d.to_string_lossy()).is_some() {
                push(Leftover::CgroupDir(d.clone()));
            }
        }
        for m in &after.mounts {
            if c.mentioned_in(m).is_some() {
                push(Leftover::Mount(m.clone()));
            }
        }
        for n in &after.netns {
            if c.mentioned_in(n).is_some() {
                push(Leftover::Netns(n.clone()));
            }
        }
        for l in &after.loops {
            if c.mentioned_in(l).is_some() {
                push(Leftover::Loop(l.clone()));
            }
        }
        // Only the outermost path of a leftover tree: its contents add nothing.
        let mut last: Option<&PathBuf> = None;
        for p in after.files.keys() {
            if last.is_some_and(|l| p.starts_with(l)) {
                continue;
            }
            if c.mentioned_in(&p.to_string_lossy()).is_some() {
                push(Leftover::File(p.clone()));
                last = Some(p);
            }
        }
        for p in files_with_secrets(before, after, &c.secrets) {
            push(Leftover::Secret { path: p });
        }
    }
    out
}

/// Processes of cell `c` that can still run: what "destroy returned Ok" forbids.
pub fn runnable_of(c: &Needles) -> Vec<(Proc, String)> {
    let baseline = window().baseline();
    processes_since(baseline.as_deref().map(|b| &b.procs))
        .into_iter()
        .filter(|p| p.runnable())
        .filter_map(|p| c.process_reason(&p).map(|why| (p, why)))
        .collect()
}

/// One trial as the window remembers it.
#[derive(Debug, Clone)]
struct TrialRec {
    backend: String,
    name: String,
    cells: Vec<Needles>,
    start: u64,
    end: Option<u64>,
}

#[derive(Default)]
struct WindowState {
    active: usize,
    baseline: Option<std::sync::Arc<Snapshot>>,
    trials: Vec<TrialRec>,
    extra_roots: Vec<PathBuf>,
    /// Backends with live cells of other harness processes when the window opened.
    others_at_open: BTreeSet<String>,
}

/// The per-process audit window: opened by the first running trial, closed by the last.
pub struct Window {
    st: Mutex<WindowState>,
}

/// What a closed window found, per backend.
#[derive(Debug, Clone, Default)]
pub struct WindowReport {
    /// Backend name → leftovers (already described, with their trial when known).
    pub leftovers: BTreeMap<String, Vec<String>>,
    /// The backends whose trials ran in the window.
    pub backends: BTreeSet<String>,
    /// What was seen but cannot be pinned on this window's backends (printed, never failed).
    pub warnings: Vec<String>,
}

static WINDOW: Window = Window {
    st: Mutex::new(WindowState {
        active: 0,
        baseline: None,
        trials: Vec::new(),
        extra_roots: Vec::new(),
        others_at_open: BTreeSet::new(),
    }),
};

/// The process's window.
pub fn window() -> &'static Window {
    &WINDOW
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A trial starts; returns its index. The first one takes the baseline.
    pub fn open(&self, backend: &str, name: &str) -> usize {
        let mut st = self.lock();
        if st.active == 0 {
            let roots = st.extra_roots.clone();
            st.baseline = Some(std::sync::Arc::new(Snapshot::take_baseline(&roots)));
            st.trials.clear();
            st.others_at_open = crate::ledger::live_backends_elsewhere();
        }
        st.active += 1;
        st.trials.push(TrialRec {
            backend: backend.into(),
            name: name.into(),
            cells: Vec::new(),
            start: now_ticks(),
            end: None,
        });
        st.trials.len() - 1
    }

    /// Add backend state roots to the audited file areas (from the next baseline on).
    pub fn add_roots(&self, roots: impl IntoIterator<Item = PathBuf>) {
        let mut st = self.lock();
        for r in roots {
            if !st.extra_roots.contains(&r) {
                st.extra_roots.push(r);
            }
        }
    }

    /// The audited extra roots.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.lock().extra_roots.clone()
    }

    /// The baseline of the open window.
    pub fn baseline(&self) -> Option<std::sync::Arc<Snapshot>> {
        self.lock().baseline.clone()
    }

    /// Trial `i` ends with `cells`. When it was the last running one the window closes: a new
    /// snapshot is compared with the baseline.
    ///
    /// `after`, when given, is a snapshot the caller just took (it is used instead of a new one).
    /// Leftovers that mention a cell of trial `i` itself are left out: its own scoped check
    /// reported them already.
    pub fn close(
        &self,
        i: usize,
        cells: Vec<Needles>,
        after: Option<Snapshot>,
    ) -> Option<WindowReport> {
        let mut st = self.lock();
        if let Some(t) = st.trials.get_mut(i) {
            t.cells = cells;
            t.end = Some(now_ticks());
        }
        st.active = st.active.saturating_sub(1);
        if st.active > 0 {
            return None;
        }
        let before = st.baseline.take()?;
        let roots = st.extra_roots.clone();
        let mut trials = std::mem::take(&mut st.trials);
        drop(st);
        let after = after.unwrap_or_else(|| Snapshot::take_since(&roots, Some(&before)));
        let skip: Vec<Needles> = trials
            .get_mut(i)
            .map(|t| t.cells.clone())
            .unwrap_or_default();
        let mut others = std::mem::take(&mut self.lock().others_at_open);
        others.extend(crate::ledger::live_backends_elsewhere());
        let mut rep = diff_window(&before, &after, &trials, &skip);
        rootfs_changes(&before, &after, &trials, &others, &mut rep);
        Some(rep)
    }
}

fn diff_window(
    before: &Snapshot,
    after: &Snapshot,
    trials: &[TrialRec],
    reported: &[Needles],
) -> WindowReport {
    let mut rep = WindowReport {
        backends: trials.iter().map(|t| t.backend.clone()).collect(),
        ..WindowReport::default()
    };
    let mut add = |backend: &str, what: String| {
        rep.leftovers
            .entry(backend.to_string())
            .or_default()
            .push(what);
    };
    // Whatever mentions a cell of the window: that cell's trial.
    let all: Vec<(&TrialRec, &Needles)> = trials
        .iter()
        .flat_map(|t| t.cells.iter().map(move |c| (t, c)))
        .collect();
    let mut claimed: BTreeSet<(u32, u64)> = BTreeSet::new();
    for (t, c) in &all {
        let own = reported
            .iter()
            .any(|r| r.cell == c.cell && r.marker == c.marker);
        for (cell, l) in scoped(std::slice::from_ref(*c), before, after) {
            if let Leftover::Process { .. } | Leftover::Zombie { .. } = &l {
                for p in after.procs.values() {
                    if c.process_reason(p).is_some() || c.host_pids.contains(&(p.pid, p.start)) {
                        claimed.insert((p.pid, p.start));
                    }
                }
            }
            if !own {
                add(&t.backend, format!("{l} (cell {cell}, trial {})", t.name));
            }
        }
    }
    // New processes of ours that mention no cell: descendants of this harness, and zombie
    // children. Attributed by start time to the backends whose trials were running then.
    let me = std::process::id();
    for (k, p) in &after.procs {
        if before.procs.contains_key(k) || claimed.contains(k) {
            continue;
        }
        let zombie = p.state == 'Z' && p.ppid == me;
        if !(zombie || p.runnable() && after.descends_from_me(p)) {
            continue;
        }
        let running: BTreeSet<&str> = trials
            .iter()
            .filter(|t| t.start <= p.start && !matches!(t.end, Some(e) if p.start > e + 1))
            .map(|t| t.backend.as_str())
            .collect();
        let what = if zombie {
            Leftover::Zombie { pid: p.pid }.to_string()
        } else {
            Leftover::Process {
                proc_: p.describe(),
                why: "a descendant of the harness that mentions no cell".into(),
            }
            .to_string()
        };
        if running.len() == 1 {
            add(
                running.first().unwrap(),
                format!("{what}, started during its trials"),
            );
        } else if running.is_empty() {
            // Started between trials of this process: each backend of the window is a suspect.
            for b in &rep.backends.clone() {
                add(b, format!("{what}, started between trials"));
            }
        } else {
            let names: Vec<&str> = running.iter().copied().collect();
            for b in &running {
                add(
                    b,
                    format!(
                        "{what}, started while trials of {} ran",
                        names.join(" and ")
                    ),
                );
            }
        }
    }
    for v in rep.leftovers.values_mut() {
        v.sort();
        v.dedup();
    }
    rep
}

/// A backend's state roots: the parent directories of the paths its footprint names (asked once
/// per backend and process, for an id no cell uses).
pub fn state_roots(b: &dyn cellcheck_contract::Backend) -> Vec<PathBuf> {
    static ASKED: Mutex<BTreeMap<String, Vec<PathBuf>>> = Mutex::new(BTreeMap::new());
    let mut asked = ASKED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = asked.get(b.name()) {
        return r.clone();
    }
    let fp = b.footprint("cellcheck-audit-roots");
    let mut roots: Vec<PathBuf> = fp
        .paths
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .filter(|p| p.components().count() > 1)
        .collect();
    roots.sort();
    roots.dedup();
    asked.insert(b.name().to_string(), roots.clone());
    roots
}

/// Append one JSON line to the audit file: `CELLCHECK_AUDIT_RESULTS`, else `audit.jsonl` beside
/// `CELLCHECK_RESULTS`. Lines are `{"kind": "window", ...}` (per backend, per audit window) and
/// `{"kind": "recovered", ...}` (per reconciled ledger entry); one `write` on an `O_APPEND`
/// descriptor each, so concurrent trial processes never interleave them.
pub fn record(line: &serde_json::Value) {
    let path = match std::env::var_os("CELLCHECK_AUDIT_RESULTS") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("CELLCHECK_RESULTS") {
            Some(r) => Path::new(&r)
                .parent()
                .unwrap_or(Path::new("."))
                .join("audit.jsonl"),
            None => return,
        },
    };
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut buf = line.to_string().into_bytes();
    buf.push(b'\n');
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(&path)
        .and_then(|mut f| f.write_all(&buf));
    if let Err(e) = res {
        eprintln!(
            "cellcheck: cannot append to audit file {}: {e}",
            path.display()
        );
    }
}

/// What changed in the shared rootfs between two snapshots: added, removed, changed entries (a
/// directory whose only change is the mtime an added or removed child gave it is left out).
pub fn rootfs_diff(before: &Snapshot, after: &Snapshot) -> Vec<(PathBuf, String)> {
    let moved = |p: &PathBuf| {
        after.rootfs.keys().chain(before.rootfs.keys()).any(|c| {
            c.parent() == Some(p.as_path())
                && before.rootfs.contains_key(c) != after.rootfs.contains_key(c)
        })
    };
    let mut out = Vec::new();
    for (p, m) in &after.rootfs {
        match before.rootfs.get(p) {
            None => out.push((p.clone(), format!("{} added", p.display()))),
            Some(b) if b != m => {
                let dir = m.mode & 0o170000 == 0o040000;
                let only_mtime = b.size == m.size && b.mode == m.mode;
                if !(dir && only_mtime && moved(p)) {
                    out.push((
                        p.clone(),
                        format!(
                            "{} changed (size {} -> {}, mode {:o} -> {:o})",
                            p.display(),
                            b.size,
                            m.size,
                            b.mode,
                            m.mode
                        ),
                    ))
                }
            }
            Some(_) => {}
        }
    }
    for p in before.rootfs.keys() {
        if !after.rootfs.contains_key(p) {
            out.push((p.clone(), format!("{} removed", p.display())));
        }
    }
    out
}

/// Rootfs changes of the window. A change whose path mentions a cell is that cell's trial's and
/// fails its backend. Any other change is reported as a warning naming the backends whose cells
/// were live meanwhile (this window's, and other harness processes' per the ledger), never as a
/// failure: the rootfs is shared by every backend of the run, and a cell of another process may
/// have lived and died inside this window without any record left to tell.
fn rootfs_changes(
    before: &Snapshot,
    after: &Snapshot,
    trials: &[TrialRec],
    others: &BTreeSet<String>,
    rep: &mut WindowReport,
) {
    let mut suspects: BTreeSet<&str> = rep.backends.iter().map(String::as_str).collect();
    suspects.extend(others.iter().map(String::as_str));
    let suspects: Vec<&str> = suspects.into_iter().collect();
    for (p, what) in rootfs_diff(before, after) {
        let l = Leftover::Rootfs(what);
        let owner = trials.iter().find_map(|t| {
            t.cells
                .iter()
                .find(|c| c.mentioned_in(&p.to_string_lossy()).is_some())
                .map(|c| (t, c))
        });
        match owner {
            Some((t, c)) => rep
                .leftovers
                .entry(t.backend.clone())
                .or_default()
                .push(format!("{l} (cell {}, trial {})", c.cell, t.name)),
            None => rep.warnings.push(format!(
                "{l}: a cell wrote into the shared rootfs while cells of {} were live \
                 (which one cannot be told from here)",
                suspects.join(", ")
            )),
        }
    }
}

/// The console line of a backend after its window: `host audit: clean` or the leftovers.
pub fn console_line(backend: &str, rep: &WindowReport) -> String {
    match rep.leftovers.get(backend) {
        None => format!("cellcheck: {backend}: host audit: clean"),
        Some(v) => format!(
            "cellcheck: {backend}: host audit: {} leftover(s)\n  - {}",
            v.len(),
            v.join("\n  - ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needles(cell: &str, marker: &str) -> Needles {
        Needles {
            cell: cell.into(),
            marker: marker.into(),
            ..Needles::default()
        }
    }

    #[test]
    fn names_mentioning_a_cell_are_found_everywhere_else_ignored() {
        let tok = crate::ids::random_token(10);
        let cell = format!("cc-{tok}-audit-01");
        let dir = tempfile::tempdir().unwrap();
        let before = Snapshot::take(&[dir.path().to_path_buf()]);
        let mine = dir.path().join(format!("state-{cell}"));
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("inner"), b"x").unwrap();
        let other = dir.path().join("someone-else");
        std::fs::write(&other, b"x").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_VAR, format!("ccm-{tok}"))
            .spawn()
            .unwrap();
        // Until it has exec'd, the child is a copy of this process without the marker.
        while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .is_ok_and(|c| c.starts_with(b"sleep\0"))
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = Snapshot::take(&[dir.path().to_path_buf()]);
        let n = needles(&cell, &format!("ccm-{tok}"));
        let found = scoped(std::slice::from_ref(&n), &before, &after);
        let text: Vec<String> = found.iter().map(|(_, l)| l.to_string()).collect();
        assert!(
            found.contains(&(cell.clone(), Leftover::File(mine.clone()))),
            "{text:?}"
        );
        // The tree is reported once, by its top.
        assert!(!text.iter().any(|t| t.contains("inner")), "{text:?}");
        assert!(!text.iter().any(|t| t.contains("someone-else")), "{text:?}");
        assert!(
            text.iter()
                .any(|t| t.contains(&format!("pid {}", child.id()))),
            "{text:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&mine).unwrap();
        let clean = scoped(&[n], &before, &Snapshot::take(&[dir.path().to_path_buf()]));
        assert!(clean.is_empty(), "{clean:?}");
    }

    #[test]
    fn secrets_are_found_in_new_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let secret = format!("s3cr3t-{}", crate::ids::random_token(20));
        let old = dir.path().join("old");
        std::fs::write(&old, b"nothing").unwrap();
        let before = Snapshot::take(&[dir.path().to_path_buf()]);
        let leak = dir.path().join("x");
        std::fs::write(&leak, format!("k={secret}\n")).unwrap();
        let after = Snapshot::take(&[dir.path().to_path_buf()]);
        assert_eq!(
            files_with_secrets(&before, &after, std::slice::from_ref(&secret)),
            vec![leak.canonicalize().unwrap()]
        );
    }

    #[test]
    fn window_blames_an_unmarked_child_and_a_zombie() {
        let w = Window {
            st: Mutex::new(WindowState::default()),
        };
        let i = w.open("b1", "b1::t");
        let mut helper = std::process::Command::new("sleep")
            .arg("30")
            .env_clear()
            .spawn()
            .unwrap();
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        // `true` exits at once; unreaped, it is a zombie child of ours.
        while std::fs::read_to_string(format!("/proc/{}/stat", zombie.id()))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let rep = w.close(i, Vec::new(), None).unwrap();
        helper.kill().unwrap();
        helper.wait().unwrap();
        zombie.wait().unwrap();
        let v = rep.leftovers.get("b1").cloned().unwrap_or_default();
        assert!(
            v.iter()
                .any(|l| l.contains(&format!("pid {}", helper.id()))),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|l| l.contains(&format!("zombie child pid {}", zombie.id()))),
            "{v:?}"
        );
    }

    #[test]
    fn ancestry_follows_the_ppid_chain() {
        let mut s = Snapshot::default();
        let me = std::process::id();
        for (pid, ppid) in [(100_001, me), (100_002, 100_001), (100_003, 1)] {
            s.procs.insert(
                (pid, 1),
                Proc {
                    pid,
                    start: 1,
                    ppid,
                    state: 'S',
                    cgroup: String::new(),
                    cmdline: vec![],
                    environ: vec![],
                },
            );
        }
        let get = |pid| s.procs[&(pid, 1)].clone();
        assert!(s.descends_from_me(&get(100_002)));
        assert!(!s.descends_from_me(&get(100_003)));
    }
}
