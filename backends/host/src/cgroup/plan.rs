//! Where each cgroup controller lives on this host, and which files enforce a cell's limits: pure
//! decisions from a layout read once.
//!
//! v2 is used for a controller when the host is pure v2 (`/sys/fs/cgroup/cgroup.controllers`
//! exists) or, on a hybrid host, when the unified hierarchy offers that controller. Otherwise the
//! controller's v1 hierarchy (`/sys/fs/cgroup/<controller>`) is used. A cell's directory is
//! `<hierarchy>/cellcheck/<instance>/<cell-id>` in each hierarchy it uses.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use cellcheck_contract::spec::CpuMax;

use super::CellDir;

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

/// The backend's own tasks in a cell's cgroup: the init outside the cell (the supervisor of pid 1)
/// and pid 1 itself. `pidsMax` counts the workload's tasks alone, so these come on top.
pub const HELPER_TASKS: u64 = 2;

/// The kernel's `PID_MAX_LIMIT`: the most pids a system can have, and the largest value `pids.max`
/// accepts (EINVAL above it).
pub const PID_MAX_LIMIT: u64 = 4 << 20;

/// `pids.max` for a cell whose workload may hold `pids` tasks: the declared count plus the helpers,
/// or `max` where that passes what the kernel can ever hand out (the same thing as no limit).
pub fn pids_max_value(pids: u64) -> String {
    match pids.checked_add(HELPER_TASKS) {
        Some(n) if n <= PID_MAX_LIMIT => n.to_string(),
        _ => "max".into(),
    }
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
            (_, "pids") => w.push(("pids.max", pids_max_value(pids))),
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
                ("pids.max", "1026".to_string()),
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
                ("pids.max", "9".to_string()),
                ("cpu.max", "50000 100000".to_string()),
            ]
        );
    }

    #[test]
    fn pids_past_the_kernels_limit_are_max() {
        assert_eq!(pids_max_value(1), "3");
        assert_eq!(pids_max_value(PID_MAX_LIMIT - HELPER_TASKS), "4194304");
        assert_eq!(pids_max_value(PID_MAX_LIMIT - 1), "max");
        assert_eq!(pids_max_value(PID_MAX_LIMIT), "max");
        assert_eq!(pids_max_value(u64::MAX), "max");
    }
}
