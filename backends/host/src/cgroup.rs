//! Cgroups for cells, v1 and v2, decided per controller.
//!
//! v2 is used for a controller when the host is pure v2 (`/sys/fs/cgroup/cgroup.controllers`
//! exists) or, on a hybrid host, when the unified hierarchy offers that controller. Otherwise the
//! controller's v1 hierarchy (`/sys/fs/cgroup/<controller>`) is used. A cell's directory is
//! `<hierarchy>/cellcheck/<instance>/<cell-id>` in each hierarchy it uses.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellcheck_contract::spec::CpuMax;

/// Controllers a cell needs; `freezer` is cgroup v2's core `cgroup.freeze` under v2.
pub const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "freezer"];

/// Controllers without which the backend refuses to run (cpu is enforced where present).
pub const REQUIRED: [&str; 3] = ["memory", "pids", "freezer"];

/// Cap on tasks when the document sets no `pidsMax`: a fork bomb must not take the host down.
pub const DEFAULT_PIDS_MAX: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1,
    V2,
}

/// What the host's cgroup mounts look like (read once; the decision from it is pure).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLayout {
    /// The cgroup filesystem root, normally `/sys/fs/cgroup`.
    pub root: PathBuf,
    /// `<root>/cgroup.controllers` exists: the whole host is v2.
    pub pure_v2: bool,
    /// Controllers the unified hierarchy's root offers (pure v2: `<root>`, hybrid: `<root>/unified`).
    pub unified_controllers: BTreeSet<String>,
    /// Whether a unified hierarchy is mounted at all (pure, or hybrid's `<root>/unified`).
    pub unified_mounted: bool,
    /// v1 hierarchies present as `<root>/<controller>`.
    pub v1: BTreeSet<String>,
}

/// Where each controller lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub root: PathBuf,
    pub pure_v2: bool,
    /// (controller, version) for every controller that is available.
    pub controllers: Vec<(&'static str, Version)>,
    /// Controllers available nowhere.
    pub missing: Vec<&'static str>,
}

impl HostLayout {
    pub fn detect(root: &Path) -> HostLayout {
        let pure_v2 = root.join("cgroup.controllers").is_file();
        let unified = if pure_v2 {
            root.to_path_buf()
        } else {
            root.join("unified")
        };
        let unified_mounted = unified.join("cgroup.controllers").is_file();
        let unified_controllers = fs::read_to_string(unified.join("cgroup.controllers"))
            .map(|t| t.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let v1 = if pure_v2 {
            BTreeSet::new()
        } else {
            CONTROLLERS
                .iter()
                .filter(|c| root.join(c).join("cgroup.procs").is_file())
                .map(|c| c.to_string())
                .collect()
        };
        HostLayout {
            root: root.to_path_buf(),
            pure_v2,
            unified_controllers,
            unified_mounted,
            v1,
        }
    }

    /// Decide per controller. Pure logic, unit-tested below.
    pub fn plan(&self) -> Plan {
        let mut controllers = Vec::new();
        let mut missing = Vec::new();
        for c in CONTROLLERS {
            // Freezing is part of the v2 core (cgroup.freeze), not a controller to enable.
            let in_unified =
                self.unified_mounted && (self.unified_controllers.contains(c) || c == "freezer");
            let choice = if self.pure_v2 {
                in_unified.then_some(Version::V2)
            } else if self.v1.contains(c) {
                Some(Version::V1)
            } else if in_unified
                && (c != "freezer"
                    || self.unified_controllers.iter().any(|u| {
                        // On a hybrid host, only freeze through v2 when we use the unified tree anyway.
                        CONTROLLERS.contains(&u.as_str())
                    }))
            {
                Some(Version::V2)
            } else {
                None
            };
            match choice {
                Some(v) => controllers.push((c, v)),
                None => missing.push(c),
            }
        }
        Plan {
            root: self.root.clone(),
            pure_v2: self.pure_v2,
            controllers,
            missing,
        }
    }
}

impl Plan {
    pub fn unified_root(&self) -> PathBuf {
        if self.pure_v2 {
            self.root.clone()
        } else {
            self.root.join("unified")
        }
    }

    pub fn version_of(&self, c: &str) -> Option<Version> {
        self.controllers
            .iter()
            .find(|(n, _)| *n == c)
            .map(|(_, v)| *v)
    }

    pub fn uses_v2(&self) -> bool {
        self.controllers.iter().any(|(_, v)| *v == Version::V2)
    }

    /// Why the backend cannot run here, if it cannot.
    pub fn unusable(&self) -> Option<String> {
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|c| self.version_of(c).is_none())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "no usable cgroup for {} (looked for v1 hierarchies under {} and a unified hierarchy offering them)",
                missing.join(", "),
                self.root.display()
            )
        })
    }

    /// "v1", "v2", or e.g. "mixed (memory=v2, pids=v1, ...)".
    pub fn describe(&self) -> String {
        let all_v1 = self.controllers.iter().all(|(_, v)| *v == Version::V1);
        let all_v2 = self.controllers.iter().all(|(_, v)| *v == Version::V2);
        if self.controllers.is_empty() {
            "none".into()
        } else if all_v1 {
            "v1".into()
        } else if all_v2 {
            "v2".into()
        } else {
            let parts: Vec<String> = self
                .controllers
                .iter()
                .map(|(c, v)| format!("{c}={}", if *v == Version::V1 { "v1" } else { "v2" }))
                .collect();
            format!("mixed ({})", parts.join(", "))
        }
    }

    /// The directories of one cell: one per v1 controller, plus one unified directory if any
    /// controller is v2. Each entry is (dir, version, controllers in it).
    pub fn cell_dirs(&self, instance: &str, id: &str) -> Vec<CellDir> {
        let mut out = Vec::new();
        let mut v2_ctrls = Vec::new();
        for (c, v) in &self.controllers {
            match v {
                Version::V1 => out.push(CellDir {
                    base: self.root.join(c),
                    dir: self.root.join(c).join("cellcheck").join(instance).join(id),
                    version: Version::V1,
                    controllers: vec![c],
                }),
                Version::V2 => v2_ctrls.push(*c),
            }
        }
        if !v2_ctrls.is_empty() {
            let base = self.unified_root();
            out.push(CellDir {
                dir: base.join("cellcheck").join(instance).join(id),
                base,
                version: Version::V2,
                controllers: v2_ctrls,
            });
        }
        out
    }
}

/// One cgroup directory of a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellDir {
    /// The hierarchy's root (`/sys/fs/cgroup/memory`, or the unified root).
    pub base: PathBuf,
    pub dir: PathBuf,
    pub version: Version,
    pub controllers: Vec<&'static str>,
}

/// The files and values that enforce a cell's limits in one directory (pure).
pub fn limit_writes(
    d: &CellDir,
    memory: Option<u64>,
    pids: Option<u64>,
    cpu: Option<CpuMax>,
    has_memsw: bool,
) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    let pids = pids.unwrap_or(DEFAULT_PIDS_MAX);
    for c in &d.controllers {
        match (d.version, *c) {
            (Version::V1, "memory") => {
                if let Some(m) = memory {
                    w.push(("memory.limit_in_bytes", m.to_string()));
                    // Without this the workload would swap instead of meeting its limit.
                    if has_memsw {
                        w.push(("memory.memsw.limit_in_bytes", m.to_string()));
                    }
                }
            }
            (Version::V2, "memory") => {
                if let Some(m) = memory {
                    w.push(("memory.max", m.to_string()));
                    w.push(("memory.swap.max", "0".into()));
                }
            }
            // One more than declared: the init outside the cell (the backend's supervisor of
            // pid 1) sits in the cgroup too, and is not the cell's to count.
            (_, "pids") => w.push(("pids.max", pids.saturating_add(1).to_string())),
            (Version::V1, "cpu") => {
                if let Some(c) = cpu {
                    // Period first: the kernel checks the quota against the current period.
                    w.push(("cpu.cfs_period_us", c.period.to_string()));
                    w.push(("cpu.cfs_quota_us", c.quota.to_string()));
                }
            }
            (Version::V2, "cpu") => {
                if let Some(c) = cpu {
                    w.push(("cpu.max", format!("{} {}", c.quota, c.period)));
                }
            }
            _ => {}
        }
    }
    w
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )
    })
}

impl CellDir {
    /// Create the directory (and its `cellcheck/<instance>` parents), enabling v2 controllers on
    /// the way down, and write the limits.
    ///
    /// The parents are shared: `cellcheck/<instance>` by the cells of one backend, `cellcheck` by
    /// every backend instance on the host (other processes too), and [`CellDir::remove`] removes
    /// a parent once it is empty so nothing is left behind. That is safe because a cgroup with
    /// a child cannot be removed (EBUSY): once our directory exists, its parents stay. The one
    /// window left is a parent removed between our mkdir of it and our mkdir (or
    /// `subtree_control` write) inside it, which then fails with ENOENT; we walk down from the
    /// hierarchy's root again. Each such restart needs a concurrent cleanup that found the
    /// parent empty in that window, so the walk ends; the bound only turns a missing hierarchy
    /// into an error instead of a loop.
    pub fn create(
        &self,
        memory: Option<u64>,
        pids: Option<u64>,
        cpu: Option<CpuMax>,
    ) -> io::Result<()> {
        const MAX_WALKS: u32 = 1000;
        let mut walks = 1;
        loop {
            match self.make_path() {
                Err(e) if e.kind() == io::ErrorKind::NotFound && walks < MAX_WALKS => walks += 1,
                r => break r?,
            }
        }
        let has_memsw = self.dir.join("memory.memsw.limit_in_bytes").exists();
        for (file, value) in limit_writes(self, memory, pids, cpu, has_memsw) {
            write(&self.dir.join(file), &value)?;
        }
        Ok(())
    }

    /// One walk from the hierarchy's root down to the cell's directory (see [`CellDir::create`]).
    fn make_path(&self) -> io::Result<()> {
        let rel = self.dir.strip_prefix(&self.base).unwrap_or(&self.dir);
        let mut cur = self.base.clone();
        for part in rel.components() {
            if self.version == Version::V2 {
                // A child only gets controllers its parent enabled in subtree_control.
                let want: Vec<String> = self
                    .controllers
                    .iter()
                    .filter(|c| **c != "freezer")
                    .map(|c| format!("+{c}"))
                    .collect();
                if !want.is_empty() {
                    let sc = cur.join("cgroup.subtree_control");
                    let have = fs::read_to_string(&sc).unwrap_or_default();
                    for w in want {
                        if !have.split_whitespace().any(|h| h == &w[1..]) {
                            write(&sc, &w)?;
                        }
                    }
                }
            }
            cur.push(part);
            match fs::create_dir(&cur) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && cur != self.dir => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("create {}: {e}", cur.display()),
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn add(&self, pid: u32) -> io::Result<()> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    pub fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn has(&self, c: &str) -> bool {
        self.controllers.contains(&c)
    }

    /// How many times the OOM killer struck in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        if !self.has("memory") {
            return 0;
        }
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill"),
            Version::V2 => ("memory.events", "oom_kill"),
        };
        fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    pub fn freeze(&self, frozen: bool) -> io::Result<()> {
        match self.version {
            Version::V1 => write(
                &self.dir.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            Version::V2 => write(
                &self.dir.join("cgroup.freeze"),
                if frozen { "1" } else { "0" },
            ),
        }
    }

    /// Whether every task is frozen (the freeze has taken effect).
    pub fn is_frozen(&self) -> bool {
        match self.version {
            Version::V1 => fs::read_to_string(self.dir.join("freezer.state"))
                .map(|t| t.trim() == "FROZEN")
                .unwrap_or(false),
            Version::V2 => fs::read_to_string(self.dir.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l.trim() == "frozen 1"))
                .unwrap_or(false),
        }
    }

    /// rmdir, retrying while the kernel still holds the last tasks. Missing is fine.
    pub fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("remove {}: {e}", self.dir.display()),
                    ))
                }
            }
        }
        // The instance and `cellcheck` parents go when empty. One still in use refuses (EBUSY) and
        // stops the walk; a creator racing this removal walks again (see `create`).
        let mut p = self.dir.parent();
        while let Some(d) = p {
            if d == self.base || fs::remove_dir(d).is_err() {
                break;
            }
            p = d.parent();
        }
        Ok(())
    }
}

/// Kill every task of the cell's cgroups until they are empty (thawing a frozen cell so the kill
/// lands). Returns whether they emptied in time.
pub fn kill_all(dirs: &[CellDir], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let mut any = false;
        for d in dirs {
            let procs = d.procs();
            if procs.is_empty() {
                continue;
            }
            any = true;
            let kill_file = d.dir.join("cgroup.kill");
            if d.version == Version::V2 && kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            }
            for p in procs {
                // SAFETY: signalling a pid that is a member of our own cell's cgroup.
                unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
            }
            if d.has("freezer") {
                let _ = d.freeze(false);
            }
        }
        if !any {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn layout(pure: bool, unified: Option<&[&str]>, v1: &[&str]) -> HostLayout {
        HostLayout {
            root: PathBuf::from("/sys/fs/cgroup"),
            pure_v2: pure,
            unified_mounted: unified.is_some(),
            unified_controllers: set(unified.unwrap_or(&[])),
            v1: set(v1),
        }
    }

    /// Where the race tests put their shared parent: named by the environment when a test runs
    /// this one in two processes at once, else private to this process.
    const RACE_TOP_ENV: &str = "CELLCHECK_CGROUP_RACE_TOP";

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// `threads` threads per instance, each creating and removing its own cells `rounds` times
    /// under `<hierarchy>/<top>/<instance>/`, with instances sharing `<top>` the way every
    /// backend shares `cellcheck`. Returns every error seen.
    fn churn(top: &str, instances: usize, threads: usize, rounds: usize) -> Vec<String> {
        let plan = HostLayout::detect(Path::new("/sys/fs/cgroup")).plan();
        assert_eq!(plan.unusable(), None, "this host's cgroups: {plan:?}");
        let me = std::process::id();
        let workers: Vec<_> = (0..instances * threads)
            .map(|w| {
                let (plan, top) = (plan.clone(), top.to_string());
                std::thread::spawn(move || {
                    let instance = format!("{me}-{}", w % instances);
                    let mut errors = Vec::new();
                    for r in 0..rounds {
                        let dirs: Vec<CellDir> = plan
                            .cell_dirs(&instance, &format!("c{w}-{r}"))
                            .into_iter()
                            .map(|d| CellDir {
                                dir: d.base.join(&top).join(&instance).join(format!("c{w}-{r}")),
                                ..d
                            })
                            .collect();
                        for d in &dirs {
                            if let Err(e) = d.create(None, Some(8), None) {
                                errors.push(e.to_string());
                            }
                        }
                        for d in &dirs {
                            if let Err(e) = d.remove() {
                                errors.push(e.to_string());
                            }
                        }
                    }
                    errors
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    }

    fn leftovers(top: &str) -> Vec<PathBuf> {
        let plan = HostLayout::detect(Path::new("/sys/fs/cgroup")).plan();
        let mut bases: Vec<PathBuf> = plan
            .cell_dirs("i", "c")
            .into_iter()
            .map(|d| d.base.join(top))
            .collect();
        bases.retain(|p| p.exists());
        bases
    }

    #[test]
    fn creates_racing_removals_of_the_shared_parents_never_fail() {
        if !is_root() {
            eprintln!("skipped: cgroups need root");
            return;
        }
        let shared = std::env::var(RACE_TOP_ENV).ok();
        let top = shared
            .clone()
            .unwrap_or_else(|| format!("cellcheck-race-{}", std::process::id()));
        // Two creators per instance: the instance parent empties (and is removed) often, and so
        // does the top every instance shares.
        let errors = churn(&top, 16, 2, 40);
        assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());
        if shared.is_none() {
            assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
        }
    }

    #[test]
    fn two_processes_creating_under_one_shared_parent_never_fail() {
        if !is_root() {
            eprintln!("skipped: cgroups need root");
            return;
        }
        // The same churn in two processes at once (nextest runs every trial in a process of its
        // own, so backends in different processes share `cellcheck`).
        let top = format!("cellcheck-race2-{}", std::process::id());
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..2)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "cgroup::tests::creates_racing_removals_of_the_shared_parents_never_fail",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(RACE_TOP_ENV, &top)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "{}: {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
    }

    #[test]
    fn pure_v2_uses_the_unified_root_for_everything() {
        let p = layout(true, Some(&["cpuset", "cpu", "io", "memory", "pids"]), &[]).plan();
        assert_eq!(p.describe(), "v2");
        assert!(p.missing.is_empty());
        assert_eq!(p.unusable(), None);
        let dirs = p.cell_dirs("9-ab", "c1");
        assert_eq!(dirs.len(), 1);
        assert_eq!(
            dirs[0].dir,
            PathBuf::from("/sys/fs/cgroup/cellcheck/9-ab/c1")
        );
        assert_eq!(
            dirs[0].controllers,
            vec!["memory", "pids", "cpu", "freezer"]
        );
    }

    #[test]
    fn hybrid_with_empty_unified_is_all_v1() {
        let p = layout(false, Some(&[]), &["memory", "pids", "cpu", "freezer"]).plan();
        assert_eq!(p.describe(), "v1");
        assert!(!p.uses_v2());
        let dirs = p.cell_dirs("1-x", "a");
        let paths: Vec<_> = dirs.iter().map(|d| d.dir.clone()).collect();
        assert_eq!(
            paths,
            ["memory", "pids", "cpu", "freezer"]
                .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/cellcheck/1-x/a")))
        );
    }

    #[test]
    fn hybrid_takes_v2_for_controllers_only_the_unified_tree_has() {
        let p = layout(false, Some(&["memory", "pids"]), &["cpu", "freezer"]).plan();
        assert_eq!(p.version_of("memory"), Some(Version::V2));
        assert_eq!(p.version_of("freezer"), Some(Version::V1));
        assert!(p.describe().starts_with("mixed"), "{}", p.describe());
        let dirs = p.cell_dirs("i", "c");
        let uni = dirs.iter().find(|d| d.version == Version::V2).unwrap();
        assert_eq!(
            uni.dir,
            PathBuf::from("/sys/fs/cgroup/unified/cellcheck/i/c")
        );
        assert_eq!(uni.controllers, vec!["memory", "pids"]);
    }

    #[test]
    fn missing_required_controllers_are_named() {
        let p = layout(false, Some(&[]), &["cpu"]).plan();
        let why = p.unusable().unwrap();
        assert!(why.contains("memory, pids, freezer"), "{why}");
        // A v2 freezer alone does not count as using the unified tree on a hybrid host.
        assert_eq!(p.version_of("freezer"), None);
    }

    #[test]
    fn limits_map_to_each_version() {
        let cpu = Some(CpuMax {
            quota: 50_000,
            period: 100_000,
        });
        let p1 = layout(false, Some(&[]), &["memory", "pids", "cpu", "freezer"]).plan();
        let mut all = Vec::new();
        for d in p1.cell_dirs("i", "c") {
            all.extend(limit_writes(&d, Some(64 << 20), None, cpu, true));
        }
        assert_eq!(
            all,
            vec![
                ("memory.limit_in_bytes", "67108864".to_string()),
                ("memory.memsw.limit_in_bytes", "67108864".to_string()),
                ("pids.max", "1025".to_string()),
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "50000".to_string()),
            ]
        );
        let p2 = layout(true, Some(&["memory", "pids", "cpu"]), &[]).plan();
        let d = &p2.cell_dirs("i", "c")[0];
        assert_eq!(
            limit_writes(d, Some(1000), Some(7), cpu, false),
            vec![
                ("memory.max", "1000".to_string()),
                ("memory.swap.max", "0".to_string()),
                ("pids.max", "8".to_string()),
                ("cpu.max", "50000 100000".to_string()),
            ]
        );
    }
}
