//! Driving `cargo nextest` for the suite's test target: listing its trials and running them
//! while showing each result as it lands.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cellcheck_conformance::results::TrialResult;

use crate::outside::Target;

pub const PACKAGE: &str = "cellcheck-conformance";
pub const TEST: &str = "conformance";

/// A listed trial, as nextest sees it for this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub ignored: bool,
    /// Whether this run (its partition) will run it.
    pub selected: bool,
    /// Left out by the run's filter (`--filter`): listed only so expectations are judged
    /// against every trial, never run nor reported.
    pub filtered_out: bool,
}

/// Parses `cargo nextest list --message-format json`.
pub fn parse_nextest_list(json: &str) -> Result<Vec<Listed>> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("nextest list output is not JSON")?;
    let suites = v
        .get("rust-suites")
        .and_then(|s| s.as_object())
        .context("nextest list output has no rust-suites")?;
    let mut out = Vec::new();
    for suite in suites.values() {
        let Some(cases) = suite.get("testcases").and_then(|c| c.as_object()) else {
            continue;
        };
        for (name, case) in cases {
            if name.ends_with(&format!("::{}", cellcheck_conformance::REASONS_TRIAL)) {
                continue;
            }
            let ignored = case
                .get("ignored")
                .and_then(|b| b.as_bool())
                .unwrap_or(false);
            let status = case
                .pointer("/filter-match/status")
                .and_then(|s| s.as_str())
                .unwrap_or("matches");
            out.push(Listed {
                name: name.clone(),
                ignored,
                selected: status == "matches",
                filtered_out: false,
            });
        }
    }
    Ok(out)
}

/// Lists `target`'s trials as a run with `env`, `partition` and `filter` (a nextest filterset)
/// sees them. Trials the filter leaves out are marked [`Listed::filtered_out`].
pub fn list_trials(
    target: &Target,
    env: &[(String, String)],
    partition: Option<(u32, u32)>,
    filter: Option<&str>,
) -> Result<Vec<Listed>> {
    // Listed without the filter, then marked: the expectations are judged against every trial.
    let listed = list_once(target, env, partition, None, false)?;
    let Some(_) = filter else {
        return Ok(listed);
    };
    // nextest reports an ignored trial as "ignored" whether or not the filter matches it; listed
    // with the ignored ones included, every trial is matched against the filter.
    let matching: BTreeSet<String> = list_once(target, env, None, filter, true)?
        .into_iter()
        .filter(|l| l.selected)
        .map(|l| l.name)
        .collect();
    Ok(listed
        .into_iter()
        .map(|mut l| {
            if !matching.contains(&l.name) {
                l.filtered_out = true;
                l.selected = false;
            }
            l
        })
        .collect())
}

fn list_once(
    target: &Target,
    env: &[(String, String)],
    partition: Option<(u32, u32)>,
    filter: Option<&str>,
    all: bool,
) -> Result<Vec<Listed>> {
    let mut c = target.nextest("list", filter);
    c.args(["--message-format", "json"]);
    if let Some((k, n)) = partition {
        c.arg("--partition").arg(format!("count:{k}/{n}"));
    }
    if all {
        c.args(["--run-ignored", "all"]);
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    let out = c.output().context(
        "run `cargo nextest list` (is cargo-nextest installed? `cargo install cargo-nextest`)",
    )?;
    if !out.status.success() {
        bail!(
            "`cargo nextest list` of {} failed ({}):\n{}",
            target.describe(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_nextest_list(&String::from_utf8_lossy(&out.stdout))
}

/// Prints each result line as it lands, while nextest runs.
pub struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(path: PathBuf, from: u64, done_before: usize, total: usize) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut offset = from;
            let mut done = done_before;
            let mut pending = String::new();
            loop {
                let last = s.load(Ordering::Relaxed);
                if let Ok(mut f) = std::fs::File::open(&path) {
                    if f.seek(SeekFrom::Start(offset)).is_ok() {
                        let mut buf = Vec::new();
                        if let Ok(n) = f.read_to_end(&mut buf) {
                            offset += n as u64;
                            pending.push_str(&String::from_utf8_lossy(&buf));
                        }
                    }
                }
                // Only whole lines: a trial's line is one write, but we may read mid-write.
                while let Some(i) = pending.find('\n') {
                    let line: String = pending.drain(..=i).collect();
                    if let Ok(r) = serde_json::from_str::<TrialResult>(line.trim()) {
                        done += 1;
                        println!(
                            "[{done}/{total}] {} {} {} ms",
                            r.id, r.outcome, r.duration_ms
                        );
                    }
                }
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Progress {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nextest_listing_is_read_with_ignored_and_partition_status() {
        let json = r#"{"rust-build-meta":{},"test-count":3,"rust-suites":{"cellcheck-conformance::conformance":{"binary-id":"x","testcases":{
            "host::exit::code_0":{"ignored":false,"filter-match":{"status":"matches"}},
            "host::snapshot::restore":{"ignored":true,"filter-match":{"status":"mismatch","reason":"ignored"}},
            "host::exit::code_1":{"ignored":false,"filter-match":{"status":"mismatch","reason":"partition"}}}}}}"#;
        let l = parse_nextest_list(json).unwrap();
        assert_eq!(l.len(), 3);
        let get = |n: &str| l.iter().find(|x| x.name == n).unwrap().clone();
        assert!(get("host::exit::code_0").selected);
        assert!(get("host::snapshot::restore").ignored);
        assert!(!get("host::snapshot::restore").selected);
        assert!(!get("host::exit::code_1").selected);
    }
}
