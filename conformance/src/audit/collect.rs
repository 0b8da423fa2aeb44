//! Reading the host: the process table, cgroup trees, mounts, netns, loop devices and the file
//! areas.

use super::*;

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
pub(super) fn read_processes(
    known: Option<&BTreeMap<(u32, u64), Proc>>,
    contents: bool,
) -> Vec<Proc> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    // One buffer for every `stat`, and no `fs::read` (its size hint costs a statx per file, and
    // procfs reports size 0 anyway): the process table is read at every look at the host.
    let mut stat = Vec::with_capacity(512);
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process that exits meanwhile is simply not there. Three fields of `stat` parsed
        // by hand: a full parse of every process was a large part of each snapshot.
        stat.clear();
        let Some(st) = read_proc(pid, "stat", &mut stat).and_then(|_| stat_fields(&stat)) else {
            continue;
        };
        if let Some(k) = known.and_then(|k| k.get(&(pid, st.starttime))) {
            out.push(Proc {
                state: st.state,
                ppid: st.ppid,
                ..k.clone()
            });
            continue;
        }
        let read = |f: &str| {
            let mut b = Vec::new();
            if contents {
                read_proc(pid, f, &mut b);
            }
            b
        };
        let cgroup = String::from_utf8_lossy(&read("cgroup"))
            .trim()
            .replace('\n', ";");
        out.push(Proc {
            pid,
            start: st.starttime,
            ppid: st.ppid,
            state: st.state,
            cgroup,
            cmdline: read("cmdline"),
            environ: read("environ"),
        });
    }
    out
}

/// Append `/proc/<pid>/<file>` to `buf`; `None` when the process is gone (or the file unreadable).
fn read_proc(pid: u32, file: &str, buf: &mut Vec<u8>) -> Option<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(format!("/proc/{pid}/{file}")).ok()?;
    f.read_to_end(buf).ok().map(|_| ())
}

/// State, ppid and start time from `/proc/<pid>/stat`.
pub(super) struct StatFields {
    pub(super) state: char,
    pub(super) ppid: u32,
    pub(super) starttime: u64,
}

/// The comm may hold spaces and parentheses: fields are counted after the last `)`, where the
/// state is field 3 and the start time field 22.
pub(super) fn stat_fields(stat: &[u8]) -> Option<StatFields> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut it = rest.split_ascii_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    let starttime = it.nth(22 - 5)?.parse().ok()?;
    Some(StatFields {
        state,
        ppid,
        starttime,
    })
}

pub(super) fn walk_dirs(dir: &Path, out: &mut BTreeSet<PathBuf>) {
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

pub(super) fn mounts() -> BTreeSet<String> {
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

pub(super) fn names_in(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn loops() -> BTreeSet<String> {
    names_in("/sys/block")
        .into_iter()
        .filter(|n| n.starts_with("loop"))
        .filter_map(|n| {
            let f = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file")).ok()?;
            Some(format!("/dev/{n} backed by {}", f.trim()))
        })
        .collect()
}

pub(super) fn walk_files(
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
