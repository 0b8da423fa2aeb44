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

mod collect;
mod index;
mod lines;
mod needles;
mod rootfs;
mod window;
pub use collect::*;
pub use index::*;
pub use lines::*;
pub use needles::*;
pub use rootfs::*;
pub use window::*;

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
    /// Every entry of the built (shared) fixture rootfs (paths, sizes, modes, mtimes).
    pub rootfs: BTreeMap<PathBuf, FileMeta>,
    /// Every entry of each backend's private rootfs copy in this process, by backend (see
    /// [`crate::roots`]).
    pub copies: BTreeMap<String, BTreeMap<PathBuf, FileMeta>>,
}

impl Snapshot {
    /// Take a snapshot, walking the file areas plus `extra_roots`.
    pub fn take(extra_roots: &[PathBuf]) -> Snapshot {
        Self::take_since(extra_roots, None)
    }

    /// [`Snapshot::take`], reusing `baseline`'s process contents (see [`processes_since`]).
    pub fn take_since(extra_roots: &[PathBuf], baseline: Option<&Snapshot>) -> Snapshot {
        Self::take_inner(extra_roots, baseline, true, true)
    }

    /// [`Snapshot::take_since`] for a per-cell check ([`scoped`]) that is not a window's end:
    /// the shared rootfs and the backends' copies are left unrecorded (empty), as only a window
    /// compares them and a cell's check may run many times in a trial.
    pub fn take_scoped(extra_roots: &[PathBuf], baseline: Option<&Snapshot>) -> Snapshot {
        Self::take_inner(extra_roots, baseline, true, false)
    }

    /// A baseline: processes by stat only.
    pub fn take_baseline(extra_roots: &[PathBuf]) -> Snapshot {
        Self::take_inner(extra_roots, None, false, true)
    }

    fn take_inner(
        extra_roots: &[PathBuf],
        baseline: Option<&Snapshot>,
        contents: bool,
        with_rootfs: bool,
    ) -> Snapshot {
        let procs = read_processes(baseline.map(|b| &b.procs), contents)
            .into_iter()
            .map(|p| ((p.pid, p.start), p))
            .collect();
        let mut files = BTreeMap::new();
        // The fixtures and the build output may sit under /tmp, and the ledger under /run; they
        // are not a cell's.
        let skip: BTreeSet<PathBuf> = [cellcheck_fixtures::fixtures_dir(), crate::ledger::dir()]
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
        // Only a window compares the rootfs and the copies; a cell's own check leaves them out.
        let rootfs = crate::harness::fixtures_rootfs()
            .filter(|_| with_rootfs)
            .map(|r| walk_tree(&r))
            .unwrap_or_default();
        let copies = if with_rootfs {
            crate::roots::all()
                .into_iter()
                .map(|(b, c)| (b, walk_tree(&c.root)))
                .collect()
        } else {
            BTreeMap::new()
        };
        Snapshot {
            rootfs,
            copies,
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
/// `CELLCHECK_RESULTS`. Lines are [`AuditLine`]s: `{"kind": "window", ...}` (per backend, per
/// audit window) and `{"kind": "recovered", ...}` (per reconciled ledger entry); one `write` on an `O_APPEND`
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
mod tests;
