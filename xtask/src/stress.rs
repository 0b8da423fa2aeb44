//! `cargo xtask stress`: the selected backends' trials, N rounds, while this command keeps every
//! core busy (one busy loop per core), a disk busy (write and fsync a bounded file) and fork busy
//! (spawn `true` in a loop). The load starts before the first round and is stopped and removed
//! after the last, whatever happened. Every trial that failed in any round is reported with the
//! message of each failing round.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use cellcheck_conformance::results::{Outcome, TrialResult};
use serde::Serialize;

use crate::conformance::{self, Plan};
use crate::util::out_dir;

/// `cargo xtask stress`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Rounds of every selected trial.
    #[arg(long, default_value_t = 10, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Stress this backend; repeatable (default: every backend this host can run).
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
}

/// The disk load's file never grows past this.
const DISK_BOUND: u64 = 64 << 20;
const DISK_CHUNK: usize = 1 << 20;

/// What the load did while it ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadFigures {
    pub busy_threads: usize,
    pub disk_mib_written: u64,
    pub forks: u64,
}

/// The load: started by [`Load::start`], stopped and cleaned up when dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    written: Arc<AtomicU64>,
    forks: Arc<AtomicU64>,
    busy: usize,
    // Removed on drop, after the disk thread has stopped writing into it.
    dir: Option<tempfile::TempDir>,
}

impl Load {
    fn start(under: &Path) -> Result<Load> {
        let busy = std::thread::available_parallelism().map_or(1, |n| n.get());
        let dir = tempfile::Builder::new()
            .prefix("stress-load-")
            .tempdir_in(under)
            .with_context(|| format!("make the disk load's dir under {}", under.display()))?;
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            written: Arc::new(AtomicU64::new(0)),
            forks: Arc::new(AtomicU64::new(0)),
            busy,
            dir: None,
        };
        for i in 0..busy {
            let stop = load.stop.clone();
            load.threads.push(
                std::thread::Builder::new()
                    .name(format!("stress-cpu-{i}"))
                    .spawn(move || {
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                    })?,
            );
        }
        let (stop, written, path) = (
            load.stop.clone(),
            load.written.clone(),
            dir.path().join("load"),
        );
        load.threads.push(
            std::thread::Builder::new()
                .name("stress-disk".into())
                .spawn(move || disk_load(&path, &stop, &written))?,
        );
        let (stop, forks) = (load.stop.clone(), load.forks.clone());
        load.threads.push(
            std::thread::Builder::new()
                .name("stress-fork".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let ran = std::process::Command::new("true")
                            .stdin(std::process::Stdio::null())
                            .status();
                        if ran.is_err() {
                            // `true` cannot start: the load would be a busy error loop instead.
                            break;
                        }
                        forks.fetch_add(1, Ordering::Relaxed);
                    }
                })?,
        );
        load.dir = Some(dir);
        Ok(load)
    }

    fn figures(&self) -> LoadFigures {
        LoadFigures {
            busy_threads: self.busy,
            disk_mib_written: self.written.load(Ordering::Relaxed) >> 20,
            forks: self.forks.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(d) = self.dir.take() {
            if let Err(e) = d.close() {
                eprintln!("stress: removing the disk load's dir: {e}");
            }
        }
    }
}

/// Writes 1 MiB chunks with an fsync each, starting over at [`DISK_BOUND`].
fn disk_load(path: &Path, stop: &AtomicBool, written: &AtomicU64) {
    let chunk = vec![0x5a_u8; DISK_CHUNK];
    let Ok(mut f) = std::fs::File::create(path) else {
        return;
    };
    let mut size = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if size >= DISK_BOUND {
            if f.set_len(0).is_err() || std::io::Seek::rewind(&mut f).is_err() {
                return;
            }
            size = 0;
        }
        if f.write_all(&chunk).is_err() || f.sync_data().is_err() {
            return;
        }
        size += DISK_CHUNK as u64;
        written.fetch_add(DISK_CHUNK as u64, Ordering::Relaxed);
    }
}

/// A trial that failed in at least one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failed {
    pub id: String,
    /// Rounds in which it ran (or should have).
    pub rounds: u32,
    /// (round, outcome, message) of every failing round.
    pub failures: Vec<(u32, String, String)>,
}

/// Every trial that failed (or left no result) in some round, with every failing round.
pub fn failures(plan_selected: &[String], per_round: &[Vec<TrialResult>]) -> Vec<Failed> {
    let mut by: BTreeMap<String, Failed> = BTreeMap::new();
    for (i, round) in per_round.iter().enumerate() {
        let n = i as u32 + 1;
        let mut seen = std::collections::BTreeSet::new();
        for r in round {
            seen.insert(r.id.as_str());
            if matches!(r.outcome, Outcome::Fail | Outcome::Xpass | Outcome::Flaky) {
                entry(&mut by, &r.id, per_round.len()).failures.push((
                    n,
                    r.outcome.to_string(),
                    r.reason.clone(),
                ));
            }
        }
        for id in plan_selected {
            if !seen.contains(id.as_str()) {
                entry(&mut by, id, per_round.len()).failures.push((
                    n,
                    "fail".into(),
                    "no result recorded: the trial process died before writing one".into(),
                ));
            }
        }
    }
    by.into_values().collect()
}

fn entry<'a>(by: &'a mut BTreeMap<String, Failed>, id: &str, rounds: usize) -> &'a mut Failed {
    by.entry(id.to_string()).or_insert_with(|| Failed {
        id: id.to_string(),
        rounds: rounds as u32,
        failures: Vec::new(),
    })
}

#[derive(Debug, Serialize)]
struct StressReport<'a> {
    backends: &'a [String],
    rounds: u32,
    trials_per_round: usize,
    load: LoadFigures,
    elapsed_s: u64,
    failed: &'a [Failed],
}

pub fn run(opts: &Options) -> Result<bool> {
    let dir = out_dir().join("stress");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let fx = cellcheck_fixtures::ensure().context("build the fixtures")?;
    println!("fixtures: {}", fx.dir.display());
    // Built before the load starts: compiling is not what is being stressed.
    let plan: Plan = conformance::plan(&conformance::Options {
        backends: opts.backends.clone(),
        ..Default::default()
    })?;
    let selected: Vec<String> = plan
        .listed
        .iter()
        .filter(|l| l.selected)
        .map(|l| l.name.clone())
        .collect();
    let start = std::time::Instant::now();
    let load = Load::start(&dir)?;
    println!(
        "stress: {} rounds of {} trials over [{}] while {} busy loops, a disk and a fork load run",
        opts.repeat,
        selected.len(),
        plan.chosen.join(", "),
        load.busy
    );
    let rounds = conformance::rounds(&plan, opts.repeat, &dir);
    let figures = load.figures();
    drop(load);
    let rounds = rounds?;
    let failed = failures(&selected, &rounds.per_round);
    let report = StressReport {
        backends: &plan.chosen,
        rounds: opts.repeat,
        trials_per_round: selected.len(),
        load: figures,
        elapsed_s: start.elapsed().as_secs(),
        failed: &failed,
    };
    let path = out_dir().join("stress.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    println!(
        "\nstress: {} rounds × {} trials in {} s; load: {} busy loops, {} MiB written and synced, {} forks",
        opts.repeat,
        selected.len(),
        report.elapsed_s,
        report.load.busy_threads,
        report.load.disk_mib_written,
        report.load.forks
    );
    println!("wrote {}", path.display());
    if failed.is_empty() {
        println!("stress: 0 failures");
        return Ok(true);
    }
    println!("stress: {} trial(s) failed at least once", failed.len());
    for f in &failed {
        println!(
            "  {} failed in {} of {} rounds",
            f.id,
            f.failures.len(),
            f.rounds
        );
        for (round, outcome, msg) in &f.failures {
            println!(
                "    round {round} ({outcome}): {}",
                msg.replace('\n', "\n      ")
            );
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::sample;

    #[test]
    fn every_failing_round_of_a_trial_is_kept_with_its_message() {
        let selected = vec!["host::a::x".to_string(), "host::a::y".to_string()];
        let rounds = vec![
            vec![
                sample("host::a::x", Outcome::Pass, "", 1),
                sample("host::a::y", Outcome::Fail, "first", 1),
            ],
            vec![sample("host::a::y", Outcome::Fail, "second", 1)],
            vec![
                sample("host::a::x", Outcome::Xfail, "known", 1),
                sample("host::a::y", Outcome::Pass, "", 1),
            ],
        ];
        let f = failures(&selected, &rounds);
        assert_eq!(f.len(), 2, "{f:#?}");
        assert_eq!(f[0].id, "host::a::x");
        assert_eq!(f[0].failures.len(), 1);
        assert!(f[0].failures[0].2.contains("no result recorded"));
        assert_eq!(f[1].failures.len(), 2);
        assert_eq!(
            (f[1].failures[0].0, f[1].failures[1].2.as_str()),
            (1, "second")
        );
        assert_eq!(f[1].rounds, 3);
    }

    #[test]
    fn the_load_runs_and_leaves_nothing_behind() {
        let under = tempfile::tempdir().unwrap();
        let load = Load::start(under.path()).unwrap();
        let me = std::process::id();
        // Busy until it has visibly forked and written (bounded by the test's own timeout).
        while load.forks.load(Ordering::Relaxed) < 3 || load.written.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        assert!(load.busy >= 1);
        drop(load);
        assert_eq!(
            std::fs::read_dir(under.path()).unwrap().count(),
            0,
            "load dir left"
        );
        let children = cellcheck_conformance::residue::processes()
            .into_iter()
            .filter(|p| p.ppid == me && p.cmdline_lossy() == "true")
            .count();
        assert_eq!(children, 0, "a load process outlived the load");
    }
}
