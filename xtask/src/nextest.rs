//! Driving `cargo nextest` for the suite's test target: listing its trials and running them
//! while showing each result as it lands.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cellcheck_conformance::results::TrialResult;

use crate::util::project_root;

pub const PACKAGE: &str = "cellcheck-conformance";
pub const TEST: &str = "conformance";

/// A listed trial, as nextest sees it for this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub ignored: bool,
    /// Whether this run (its partition) will run it.
    pub selected: bool,
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
            });
        }
    }
    Ok(out)
}

pub fn nextest_base(sub: &str) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(project_root())
        .args(["nextest", sub, "-p", PACKAGE, "--test", TEST]);
    // The reasons trials print what the reports already carry per trial; left out of the run
    // (and of its partitions) alike.
    c.arg("-E").arg(format!(
        "not test(/::{}$/)",
        cellcheck_conformance::REASONS_TRIAL
    ));
    c
}

pub fn list_trials(env: &[(String, String)], partition: Option<(u32, u32)>) -> Result<Vec<Listed>> {
    let mut c = nextest_base("list");
    c.args(["--message-format", "json"]);
    if let Some((k, n)) = partition {
        c.arg("--partition").arg(format!("count:{k}/{n}"));
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    let out = c.output().context(
        "run `cargo nextest list` (is cargo-nextest installed? `cargo install cargo-nextest`)",
    )?;
    if !out.status.success() {
        bail!(
            "`cargo nextest list` failed ({}):\n{}",
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
