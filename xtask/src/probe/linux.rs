//! Linux probes. Each one does the thing it reports on (forks into a namespace, makes a cgroup
//! leaf, runs `criu check`), never only a file test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use std::sync::Arc;

use anyhow::Result;
use cellcheck_contract::Availability;
use cellcheck_registry::{Probe, Registry, RowsProbe};

use super::ProbeRow;
use crate::util::run_bounded;

pub fn root() -> ProbeRow {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        ProbeRow::present("euid 0")
    } else {
        ProbeRow::absent(format!(
            "euid {euid}: the host, OCI and QEMU backends need root"
        ))
    }
}

/// Forks a child that calls `unshare(flags)` and exits with 0 or the errno; the answer is the
/// child's, so the probe itself never changes namespace.
fn unshare_in_child(flags: libc::c_int) -> Result<(), String> {
    // SAFETY: the child only calls async-signal-safe functions (unshare, _exit) before exiting.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let rc = unsafe { libc::unshare(flags) };
        let code = if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(1) & 0xff
        };
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: pid is our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    if rc != pid {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            errno => Err(format!(
                "unshare: {}",
                std::io::Error::from_raw_os_error(errno)
            )),
        }
    } else {
        Err(format!("probe child ended with wait status {status}"))
    }
}

pub fn user_namespaces() -> ProbeRow {
    let sysctl = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| format!(", user.max_user_namespaces = {}", s.trim()))
        .unwrap_or_default();
    match unshare_in_child(libc::CLONE_NEWUSER) {
        Ok(()) => ProbeRow::present(format!(
            "a forked child entered a new user namespace{sysctl}"
        )),
        Err(e) => ProbeRow::absent(format!(
            "unshare(CLONE_NEWUSER) in a forked child: {e}{sysctl}"
        )),
    }
}

/// The namespaces the host backend isolates a cell with.
pub fn other_namespaces() -> ProbeRow {
    let kinds = [
        ("pid", libc::CLONE_NEWPID),
        ("mount", libc::CLONE_NEWNS),
        ("net", libc::CLONE_NEWNET),
        ("uts", libc::CLONE_NEWUTS),
        ("ipc", libc::CLONE_NEWIPC),
    ];
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (name, flag) in kinds {
        match unshare_in_child(flag) {
            Ok(()) => ok.push(name),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    if bad.is_empty() {
        ProbeRow::present(format!(
            "a forked child entered new {} namespaces",
            ok.join(", ")
        ))
    } else {
        ProbeRow::absent(format!("entered {:?}; refused {}", ok, bad.join("; ")))
    }
}

/// One cgroup mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub path: PathBuf,
    /// `None` for cgroup2, else the v1 controllers of the hierarchy.
    pub v1_controllers: Option<Vec<String>>,
}

/// Parses `/proc/self/mountinfo` for cgroup hierarchies.
pub fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default();
        let _source = r.next();
        let opts = r.next().unwrap_or_default();
        let path = PathBuf::from(mount_point.replace("\\040", " "));
        match fstype {
            "cgroup2" => out.push(CgroupMount {
                path,
                v1_controllers: None,
            }),
            "cgroup" => {
                let known = [
                    "cpu",
                    "cpuacct",
                    "cpuset",
                    "memory",
                    "pids",
                    "freezer",
                    "devices",
                    "blkio",
                    "net_cls",
                    "net_prio",
                    "perf_event",
                    "hugetlb",
                    "rdma",
                    "misc",
                ];
                let ctrls: Vec<String> = opts
                    .split(',')
                    .filter(|o| known.contains(o))
                    .map(str::to_string)
                    .collect();
                // A named hierarchy (name=systemd) has no controllers to offer cells.
                if !ctrls.is_empty() {
                    out.push(CgroupMount {
                        path,
                        v1_controllers: Some(ctrls),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// Creates and removes a leaf; reports what the leaf offered.
fn try_leaf(
    parent: &Path,
    check: impl Fn(&Path) -> Result<String, String>,
) -> Result<String, String> {
    let leaf = parent.join(format!("cellcheck-probe-{}", std::process::id()));
    std::fs::create_dir(&leaf).map_err(|e| format!("mkdir {}: {e}", leaf.display()))?;
    let r = check(&leaf);
    // The leaf is empty (no process ever joined it), so rmdir always succeeds.
    if let Err(e) = std::fs::remove_dir(&leaf) {
        return Err(format!("rmdir {}: {e}", leaf.display()));
    }
    r
}

pub fn cgroups() -> ProbeRow {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts = cgroup_mounts(&mountinfo);
    let v2: Vec<&CgroupMount> = mounts
        .iter()
        .filter(|m| m.v1_controllers.is_none())
        .collect();
    let v1: Vec<&CgroupMount> = mounts
        .iter()
        .filter(|m| m.v1_controllers.is_some())
        .collect();

    let mut usable = Vec::new();
    let mut problems = Vec::new();
    for m in &v1 {
        let ctrls = m.v1_controllers.clone().unwrap_or_default();
        match try_leaf(&m.path, |leaf| {
            // A v1 leaf gets the controller's files the moment it exists.
            let missing: Vec<&String> = ctrls
                .iter()
                .filter(|c| {
                    let first = format!("{c}.");
                    !std::fs::read_dir(leaf)
                        .map(|rd| {
                            rd.flatten()
                                .any(|e| e.file_name().to_string_lossy().starts_with(&first))
                        })
                        .unwrap_or(false)
                })
                .collect();
            if missing.is_empty() {
                Ok(ctrls.join(","))
            } else {
                Err(format!("leaf lacks files of {missing:?}"))
            }
        }) {
            Ok(c) => usable.push(c),
            Err(e) => problems.push(e),
        }
    }
    let mut v2_notes = Vec::new();
    for m in &v2 {
        let root = std::fs::read_to_string(m.path.join("cgroup.controllers"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        match try_leaf(&m.path, |leaf| {
            Ok(std::fs::read_to_string(leaf.join("cgroup.controllers"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default())
        }) {
            Ok(in_leaf) if !in_leaf.is_empty() => {
                usable.push(in_leaf.split(' ').collect::<Vec<_>>().join(","));
                v2_notes.push(format!("v2 at {}: a leaf gets {in_leaf}", m.path.display()));
            }
            Ok(_) => v2_notes.push(format!(
                "v2 at {}: no controllers (root offers {:?})",
                m.path.display(),
                root
            )),
            Err(e) => problems.push(e),
        }
    }
    let version = match (v1.is_empty(), v2.is_empty()) {
        (true, true) => return ProbeRow::absent("no cgroup hierarchy mounted"),
        (true, false) => "v2",
        (false, true) => "v1",
        (false, false) => "hybrid",
    };
    let mut ev = format!("{version}; usable controllers (a leaf was made and removed): ");
    ev.push_str(
        if usable.is_empty() {
            "none".into()
        } else {
            usable.join(",")
        }
        .as_str(),
    );
    for n in v2_notes {
        ev.push_str("; ");
        ev.push_str(&n);
    }
    for p in &problems {
        ev.push_str("; ");
        ev.push_str(p);
    }
    if usable.is_empty() {
        ProbeRow::absent(ev)
    } else {
        ProbeRow::present(ev)
    }
}

pub fn criu() -> ProbeRow {
    let r = run_bounded(Command::new("criu").arg("check"), Duration::from_secs(60));
    let said = r
        .output
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    match (r.code, r.error) {
        (Some(0), _) => ProbeRow::present(format!(
            "`criu check` exit 0 in {} ms: {said}",
            r.elapsed.as_millis()
        )),
        (Some(code), _) => ProbeRow::absent(format!("`criu check` exit {code}: {said}")),
        (None, Some(e)) => ProbeRow::absent(format!("`criu check`: {e}")),
        (None, None) => ProbeRow::absent("`criu check` did not finish"),
    }
}

/// The rows the registry's backends stand on: each backend's own `preflight()` (or its own
/// probe, e.g. QEMU's accelerators), run concurrently, each bounded so a hung runtime reads as
/// absent instead of hanging the probe.
pub fn backend_rows(registry: &Registry) -> Result<BTreeMap<String, ProbeRow>> {
    let mut rows = BTreeMap::new();
    let fx = match cellcheck_fixtures::ensure() {
        Ok(fx) => fx,
        Err(e) => {
            for row in registry.produced_rows() {
                rows.insert(row, ProbeRow::absent(format!("no fixtures to run: {e}")));
            }
            return Ok(rows);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let answers = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for entry in registry.entries() {
            match &entry.probe {
                Probe::Preflight => {
                    let backend = (entry.factory)(&fx);
                    let row = entry.name.clone();
                    tasks.spawn(async move { vec![(row, preflight(backend).await)] });
                }
                Probe::Rows { rows, probe } => {
                    let (rows, probe) = (*rows, *probe);
                    tasks.spawn(async move { own_probe(rows, probe).await });
                }
                Probe::SameAs(_) => {}
            }
        }
        let mut all = Vec::new();
        while let Some(done) = tasks.join_next().await {
            all.extend(done.expect("a probe task panicked"));
        }
        all
    });
    rows.extend(answers);
    Ok(rows)
}

const PREFLIGHT_BOUND: Duration = Duration::from_secs(120);

async fn preflight(b: Arc<dyn cellcheck_contract::Backend>) -> ProbeRow {
    let t0 = std::time::Instant::now();
    match tokio::time::timeout(PREFLIGHT_BOUND, b.preflight()).await {
        Ok(Availability::Available { evidence }) => ProbeRow::present(format!(
            "preflight ok in {} ms: {evidence}",
            t0.elapsed().as_millis()
        )),
        Ok(Availability::Unavailable { reason }) => ProbeRow::absent(reason),
        Err(_) => ProbeRow::absent(format!(
            "preflight did not answer within {} s",
            PREFLIGHT_BOUND.as_secs()
        )),
    }
}

/// A backend's own multi-row probe (e.g. a guest boots to its agent, or the row says what was
/// seen instead); a row it does not answer within the bound is absent.
async fn own_probe(rows: &'static [&'static str], probe: RowsProbe) -> Vec<(String, ProbeRow)> {
    let t0 = std::time::Instant::now();
    match tokio::time::timeout(PREFLIGHT_BOUND, probe()).await {
        Ok(answers) => answers
            .into_iter()
            .map(|(row, a)| {
                let row_v = match a {
                    Availability::Available { evidence } => ProbeRow::present(format!(
                        "ok in {} ms: {evidence}",
                        t0.elapsed().as_millis()
                    )),
                    Availability::Unavailable { reason } => ProbeRow::absent(reason),
                };
                (row, row_v)
            })
            .collect(),
        Err(_) => rows
            .iter()
            .map(|r| {
                let why = format!("no answer within {} s", PREFLIGHT_BOUND.as_secs());
                (r.to_string(), ProbeRow::absent(why))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:16 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn mountinfo_cgroup_hierarchies_are_classified() {
        let m = cgroup_mounts(HYBRID);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0].path, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[0].v1_controllers, None);
        assert_eq!(m[1].v1_controllers, Some(vec!["memory".to_string()]));
        assert_eq!(
            m[2].v1_controllers,
            Some(vec!["cpu".to_string(), "cpuacct".to_string()])
        );
    }

    #[test]
    fn the_forked_probe_reports_a_refused_unshare() {
        // A flag unshare does not take is refused by the kernel in the child, and the parent
        // hears the errno rather than guessing.
        let e = unshare_in_child(libc::CLONE_VFORK).unwrap_err();
        assert!(e.contains("unshare"), "{e}");
    }

    #[test]
    fn cgroup_probe_leaves_no_leaf_behind() {
        let row = cgroups();
        assert!(!row.evidence.is_empty());
        let me = format!("cellcheck-probe-{}", std::process::id());
        for m in cgroup_mounts(&std::fs::read_to_string("/proc/self/mountinfo").unwrap()) {
            assert!(
                !m.path.join(&me).exists(),
                "leaf left in {}",
                m.path.display()
            );
        }
    }
}
