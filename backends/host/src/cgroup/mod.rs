//! Cgroups for cells, v1 and v2, decided per controller (see [`plan`]): creating a cell's
//! directories under shared parents, its tasks, freezing, OOM counts, killing and removal.

mod plan;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cellcheck_contract::spec::CpuMax;

pub use plan::{limit_writes, HostLayout, Plan, Version};

/// One cgroup directory of a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellDir {
    /// The hierarchy's root (`/sys/fs/cgroup/memory`, or the unified root).
    pub base: PathBuf,
    pub dir: PathBuf,
    pub version: Version,
    pub controllers: Vec<&'static str>,
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

/// What [`kill_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Killed {
    /// The cgroups emptied in time.
    pub emptied: bool,
    /// How many distinct tasks were sent SIGKILL.
    pub tasks: usize,
}

/// Kill every task of the cell's cgroups until they are empty (thawing a frozen cell so the kill
/// lands).
pub fn kill_all(dirs: &[CellDir], within: Duration) -> Killed {
    let deadline = Instant::now() + within;
    let mut signalled = std::collections::BTreeSet::new();
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
                signalled.insert(p);
            }
            if d.has("freezer") {
                let _ = d.freeze(false);
            }
        }
        if !any || Instant::now() >= deadline {
            return Killed {
                emptied: !any,
                tasks: signalled.len(),
            };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        crate::test_support::run_test_in_processes(
            "cgroup::tests::creates_racing_removals_of_the_shared_parents_never_fail",
            2,
            (RACE_TOP_ENV, &top),
        );
        assert_eq!(leftovers(&top), Vec::<PathBuf>::new());
    }
}
