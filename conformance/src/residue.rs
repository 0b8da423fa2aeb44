//! The residue checker: after destroy, nothing of a cell may remain on the host.
//!
//! Scoped by cell, never a global diff of the host, so scenarios can run in parallel in one
//! process. For one cell it looks for:
//! - processes whose `/proc/<pid>/environ` or `cmdline` contains one of the cell's markers (the
//!   harness's `CELLCHECK_MARKER=<value>` and the backend's [`Footprint::process_markers`]); the
//!   harness's own process is skipped, a process in another pid namespace still shows here;
//! - listed cgroup dirs, listed paths and named netns that still exist;
//! - mounts in `/proc/self/mountinfo` whose mount point or source contains a mount marker;
//! - fds of the harness that were not open before the scenario and point into the footprint;
//! - zombie children of the harness that were the cell's workload (a zombie's environ and cmdline
//!   read empty, so it is found by the pid the backend handed out).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use cellcheck_contract::Footprint;

use crate::ids::MARKER_VAR;

/// What to look for, for one cell.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub cell: String,
    /// Values of the harness's marker env var for this cell.
    pub env_markers: Vec<String>,
    pub footprint: Footprint,
    /// Host pids the backend reported for the cell (workload, restored copies).
    pub host_pids: Vec<u32>,
    /// Whether listed paths, cgroups and netns are checked (false for an id the backend could not
    /// have used, such as an empty one, whose footprint may name a shared parent directory).
    pub check_resources: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leak {
    Process {
        pid: u32,
        cmdline: String,
        marker: String,
    },
    Zombie {
        pid: u32,
    },
    CgroupDir(PathBuf),
    Path(PathBuf),
    Mount {
        line: String,
        marker: String,
    },
    Netns(String),
    Fd {
        fd: i32,
        target: PathBuf,
    },
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leak::Process {
                pid,
                cmdline,
                marker,
            } => write!(
                f,
                "process pid {pid} still alive (cmdline: {cmdline:?}, marker {marker:?})"
            ),
            Leak::Zombie { pid } => write!(f, "unreaped zombie child pid {pid} of the harness"),
            Leak::CgroupDir(p) => write!(f, "cgroup dir {} still exists", p.display()),
            Leak::Path(p) => write!(f, "path {} still exists", p.display()),
            Leak::Mount { line, marker } => {
                write!(f, "mount still present (marker {marker:?}): {line}")
            }
            Leak::Netns(n) => write!(f, "netns {n} still exists (/run/netns/{n})"),
            Leak::Fd { fd, target } => {
                write!(f, "harness fd {fd} still open on {}", target.display())
            }
        }
    }
}

/// The harness's open fds and their targets. The directory handle used to list them is excluded.
pub fn own_fds() -> BTreeMap<i32, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    let entries: Vec<_> = rd.flatten().collect();
    for e in entries {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(e.path()) {
            // The listing's own handle points at this very directory.
            if target.starts_with("/proc") && target.ends_with("fd") {
                continue;
            }
            out.insert(fd, target);
        }
    }
    out
}

fn read_bytes(p: impl AsRef<Path>) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

/// One process seen in `/proc`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    pub cmdline: Vec<u8>,
    pub environ: Vec<u8>,
}

impl ProcInfo {
    pub fn cmdline_lossy(&self) -> String {
        String::from_utf8_lossy(&self.cmdline)
            .replace('\0', " ")
            .trim()
            .to_string()
    }
}

/// Every process on the host except this one (contents read only for processes newer than the
/// audit window's baseline: older ones cannot be a cell's, see [`crate::audit::processes_since`]).
pub fn processes() -> Vec<ProcInfo> {
    let baseline = crate::audit::window().baseline();
    crate::audit::processes_since(baseline.as_deref().map(|b| &b.procs))
        .into_iter()
        .map(|p| ProcInfo {
            pid: p.pid,
            ppid: p.ppid,
            state: p.state,
            cmdline: p.cmdline,
            environ: p.environ,
        })
        .collect()
}

/// `(state, ppid)` from `/proc/<pid>/stat`; the comm field may hold spaces and parentheses.
pub fn parse_stat(stat: &[u8]) -> Option<(char, u32)> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Which of `markers` (env markers matched exactly as `CELLCHECK_MARKER=<v>\0`, process markers
/// as substrings) the process carries.
pub fn process_marker(
    p: &ProcInfo,
    env_markers: &[String],
    process_markers: &[String],
) -> Option<String> {
    for m in env_markers {
        let exact = format!("{MARKER_VAR}={m}\0");
        if contains(&p.environ, exact.as_bytes()) || contains(&p.cmdline, m.as_bytes()) {
            return Some(m.clone());
        }
    }
    for m in process_markers {
        if contains(&p.environ, m.as_bytes()) || contains(&p.cmdline, m.as_bytes()) {
            return Some(m.clone());
        }
    }
    None
}

/// Spawns `cmd` with `CELLCHECK_MARKER=<marker>` and returns once the child's exec has laid out
/// its environ ([`cellcheck_fixtures::await_exec_settled`]): `spawn` returns a moment before that,
/// and a scan of /proc in that window reads the environ empty and misses the process. Bounded: a
/// child that ends first or never settles is killed, reaped and reported.
pub fn spawn_marked(
    cmd: &mut std::process::Command,
    marker: &str,
) -> std::io::Result<std::process::Child> {
    let mut child = cmd.env(MARKER_VAR, marker).spawn()?;
    if cellcheck_fixtures::await_exec_settled(child.id(), std::time::Duration::from_secs(10)) {
        return Ok(child);
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(std::io::Error::other(format!(
        "pid {} with {MARKER_VAR}={marker} never finished its exec",
        child.id()
    )))
}

/// Processes carrying one of the scope's markers.
pub fn marked_processes(
    env_markers: &[String],
    process_markers: &[String],
) -> Vec<(ProcInfo, String)> {
    processes()
        .into_iter()
        .filter_map(|p| process_marker(&p, env_markers, process_markers).map(|m| (p, m)))
        .collect()
}

/// `(mount point, source)` of a mountinfo line.
pub fn parse_mountinfo_line(line: &str) -> Option<(&str, &str)> {
    let (pre, post) = line.split_once(" - ")?;
    let mount_point = pre.split(' ').nth(4)?;
    let source = post.split(' ').nth(1)?;
    Some((mount_point, source))
}

/// What [`scan_in`] reads of the host, read once for any number of scopes.
pub struct HostView {
    pub procs: Vec<ProcInfo>,
    pub fds: BTreeMap<i32, PathBuf>,
    pub mountinfo: String,
}

impl HostView {
    /// The host now.
    pub fn read() -> Self {
        Self::with(processes(), own_fds())
    }

    /// The host now, with the process table and the harness's fds already read.
    pub fn with(procs: Vec<ProcInfo>, fds: BTreeMap<i32, PathBuf>) -> Self {
        HostView {
            procs,
            fds,
            mountinfo: std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        }
    }
}

/// Everything of `scope` still on the host. `fds_before` is [`own_fds`] taken before the scenario.
pub fn scan(scope: &Scope, fds_before: &BTreeMap<i32, PathBuf>) -> Vec<Leak> {
    let view = HostView::read();
    scan_in(scope, fds_before, &view, &view.procs)
}

/// [`scan`] over a view of the host already read; only `procs` (some or all of the view's) are
/// searched for the scope's markers, so a caller with many scopes may hand each one only the
/// processes that mention one of its markers at all.
pub fn scan_in<'a>(
    scope: &Scope,
    fds_before: &BTreeMap<i32, PathBuf>,
    view: &HostView,
    procs: impl IntoIterator<Item = &'a ProcInfo>,
) -> Vec<Leak> {
    let mut leaks = Vec::new();
    let fp = &scope.footprint;
    let marked = procs
        .into_iter()
        .filter_map(|p| process_marker(p, &scope.env_markers, &fp.process_markers).map(|m| (p, m)));
    for (p, marker) in marked {
        leaks.push(Leak::Process {
            pid: p.pid,
            cmdline: p.cmdline_lossy(),
            marker,
        });
    }
    let me = std::process::id();
    for pid in &scope.host_pids {
        if let Some(stat) = read_bytes(format!("/proc/{pid}/stat")) {
            if let Some(('Z', ppid)) = parse_stat(&stat) {
                if ppid == me {
                    leaks.push(Leak::Zombie { pid: *pid });
                }
            }
        }
    }
    if scope.check_resources {
        for d in &fp.cgroup_dirs {
            if d.exists() {
                leaks.push(Leak::CgroupDir(d.clone()));
            }
        }
        for p in &fp.paths {
            if p.symlink_metadata().is_ok() {
                leaks.push(Leak::Path(p.clone()));
            }
        }
        for n in &fp.netns {
            if Path::new("/run/netns").join(n).symlink_metadata().is_ok() {
                leaks.push(Leak::Netns(n.clone()));
            }
        }
    }
    if !fp.mount_markers.is_empty() {
        for line in view.mountinfo.lines() {
            let Some((mp, src)) = parse_mountinfo_line(line) else {
                continue;
            };
            if let Some(m) = fp
                .mount_markers
                .iter()
                .find(|m| !m.is_empty() && (mp.contains(m.as_str()) || src.contains(m.as_str())))
            {
                leaks.push(Leak::Mount {
                    line: line.to_string(),
                    marker: m.clone(),
                });
            }
        }
    }
    let roots: Vec<&PathBuf> = fp.paths.iter().chain(fp.cgroup_dirs.iter()).collect();
    for (fd, target) in &view.fds {
        if fds_before.get(fd) == Some(target) {
            continue;
        }
        let s = target.to_string_lossy();
        let in_footprint = roots.iter().any(|r| target.starts_with(r))
            || scope.env_markers.iter().any(|m| s.contains(m.as_str()));
        if in_footprint {
            leaks.push(Leak::Fd {
                fd: *fd,
                target: target.clone(),
            });
        }
    }
    leaks
}

/// [`scan`], retried for up to `grace` while leaks remain: a SIGKILLed process may take a few
/// milliseconds to leave `/proc`.
pub async fn scan_settled(
    scope: &Scope,
    fds_before: &BTreeMap<i32, PathBuf>,
    grace: std::time::Duration,
) -> Vec<Leak> {
    let start = std::time::Instant::now();
    loop {
        let leaks = scan(scope, fds_before);
        if leaks.is_empty() || start.elapsed() >= grace {
            return leaks;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A leak report, one line per leaked resource.
pub fn describe(cell: &str, leaks: &[Leak]) -> String {
    let mut s = format!("residue of cell {cell}: {} leaked resource(s)", leaks.len());
    for l in leaks {
        s.push_str("\n  - ");
        s.push_str(&l.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_comm() {
        assert_eq!(parse_stat(b"42 (a) b) (c) S 7 42 42 0"), Some(('S', 7)));
        assert_eq!(parse_stat(b"1 (init) Z 0 1"), Some(('Z', 0)));
        assert_eq!(parse_stat(b"garbage"), None);
    }

    #[test]
    fn mountinfo_fields() {
        let l = "36 35 98:0 /mnt1 /mnt/cc-abc-x-01 rw,noatime master:1 - ext3 /dev/root rw";
        assert_eq!(
            parse_mountinfo_line(l),
            Some(("/mnt/cc-abc-x-01", "/dev/root"))
        );
        let l2 = "36 35 0:5 / /proc rw - proc cc-abc-src rw";
        assert_eq!(parse_mountinfo_line(l2), Some(("/proc", "cc-abc-src")));
    }

    #[test]
    fn marker_matching_is_exact_for_env_markers() {
        let p = ProcInfo {
            pid: 1,
            ppid: 0,
            state: 'S',
            cmdline: b"/bin/x\0arg\0".to_vec(),
            environ: b"A=1\0CELLCHECK_MARKER=ccm-10\0".to_vec(),
        };
        assert_eq!(
            process_marker(&p, &["ccm-10".into()], &[]),
            Some("ccm-10".into())
        );
        // `ccm-1` is a prefix of the present value, not the value.
        assert_eq!(process_marker(&p, &["ccm-1".into()], &[]), None);
        assert_eq!(process_marker(&p, &[], &["arg".into()]), Some("arg".into()));
        assert_eq!(process_marker(&p, &[], &["".into()]), None);
    }

    /// `spawn` returns before exec has filled in the child's environ: under load, a scan right
    /// after a plain spawn read it empty now and then. After `spawn_marked`, never.
    #[test]
    fn a_marked_child_shows_its_marker_as_soon_as_spawn_marked_returns() {
        let marker = format!("ccm-test-{}", crate::ids::random_token(12));
        let needle = format!("{MARKER_VAR}={marker}\0");
        for _ in 0..200 {
            let mut child =
                spawn_marked(std::process::Command::new("sleep").arg("30"), &marker).unwrap();
            let env = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            assert!(contains(&env, needle.as_bytes()), "pid {}", child.id());
        }
    }

    #[test]
    fn scan_finds_a_marked_child_process_paths_and_fds_then_nothing() {
        let marker = format!("ccm-test-{}", crate::ids::random_token(12));
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join("state");
        std::fs::write(&leftover, b"x").unwrap();
        let before = own_fds();
        let file = std::fs::File::open(&leftover).unwrap();
        let mut child =
            spawn_marked(std::process::Command::new("sleep").arg("30"), &marker).unwrap();
        let scope = Scope {
            cell: "c".into(),
            env_markers: vec![marker.clone()],
            footprint: Footprint {
                paths: vec![leftover.clone()],
                ..Footprint::default()
            },
            host_pids: vec![child.id()],
            check_resources: true,
        };
        let leaks = scan(&scope, &before);
        let text = describe("c", &leaks);
        assert!(leaks.contains(&Leak::Path(leftover.clone())), "{text}");
        assert!(
            leaks
                .iter()
                .any(|l| matches!(l, Leak::Process { pid, .. } if *pid == child.id())),
            "{text}"
        );
        assert!(
            leaks
                .iter()
                .any(|l| matches!(l, Leak::Fd { target, .. } if *target == leftover)),
            "{text}"
        );
        // The checker's own probing (reading /proc) is not residue: a second scan sees the same.
        assert_eq!(scan(&scope, &before).len(), leaks.len());

        child.kill().unwrap();
        // Killed but unreaped: a zombie child of ours, found by pid.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let z = scan(&scope, &before);
        assert!(
            z.contains(&Leak::Zombie { pid: child.id() }),
            "{}",
            describe("c", &z)
        );
        child.wait().unwrap();
        drop(file);
        std::fs::remove_file(&leftover).unwrap();
        let after = scan(&scope, &before);
        assert!(after.is_empty(), "{}", describe("c", &after));
    }
}
