//! The results file: with `CELLCHECK_RESULTS=<path>`, every trial appends one JSON line.
//!
//! Each line is written with a single `write` on an `O_APPEND` descriptor, so lines from
//! concurrent trial processes never interleave. When lines are written:
//! - a trial that runs writes its line when it ends (`pass`, `fail`, `xfail`, `xpass`, or `skip`
//!   when it was forced to run but cannot);
//! - an ignored trial writes a `skip` line when a run selects it without running it (a plain
//!   `cargo test` run) and when it is listed with `--list --ignored` (nextest lists ignored trials
//!   that way and never starts them).
//!
//! A trial may therefore appear more than once (listed, then forced to run); readers keep the last
//! line per `id` ([`last_per_id`]).
//!
//! The same type is what every report is written from: [`fold`] merges repeated runs of a trial
//! (disagreeing runs make it [`Outcome::Flaky`]) and [`Summary`] counts outcomes.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
    Xfail,
    Xpass,
    /// Repeated runs of one trial disagreed. Only [`fold`] produces it; a trial never records it.
    Flaky,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::Xfail => "xfail",
            Outcome::Xpass => "xpass",
            Outcome::Flaky => "flaky",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One trial's result: a line of `CELLCHECK_RESULTS`, and a row of every report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialResult {
    /// The trial name, `{backend}::{family}::{scenario}`.
    pub id: String,
    pub backend: String,
    pub family: String,
    pub scenario: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub reason: String,
    /// Whole milliseconds; fractional ones (from other writers) are rounded when read.
    #[serde(default, deserialize_with = "millis")]
    pub duration_ms: u64,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// For a failing trial: the command that reruns it alone, with every variable that selected or
    /// configured it (see [`crate::rerun_command`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rerun: String,
}

/// The name trials record under; the same type as [`TrialResult`].
pub type ResultLine = TrialResult;

impl TrialResult {
    /// `{family}::{scenario}`, what expectation globs match against.
    pub fn scenario_path(&self) -> String {
        format!("{}::{}", self.family, self.scenario)
    }
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = f64::deserialize(d)?;
    Ok(if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    })
}

/// Append `line` to `CELLCHECK_RESULTS` if set. Errors are reported on stderr, never fatal: a
/// results file is a report, not part of the verdict.
pub fn record(line: &ResultLine) {
    let Some(path) = std::env::var_os("CELLCHECK_RESULTS") else {
        return;
    };
    if let Err(e) = append(std::path::Path::new(&path), line) {
        eprintln!("cellcheck: cannot append to results file {path:?}: {e}");
    }
}

pub fn append(path: &std::path::Path, line: &ResultLine) -> std::io::Result<()> {
    let mut buf = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)?;
    let n = f.write(&buf)?;
    if n != buf.len() {
        return Err(std::io::Error::other(format!(
            "short write: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// Parses one results file. A torn line (a trial killed mid-write) is an error naming the line,
/// because a silently dropped result would read as "not run".
pub fn parse_lines(text: &str, origin: &Path) -> Result<Vec<TrialResult>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                format!(
                    "{}:{}: not a trial result ({e}): {l}",
                    origin.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// A results file's lines; none when it does not exist.
pub fn read_file(path: &Path) -> Result<Vec<TrialResult>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => parse_lines(&t, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("read {}: {e}", path.display())),
    }
}

/// Within one run a trial may be recorded twice (listed as skipped, then forced to run): the
/// last line counts.
pub fn last_per_id(lines: Vec<TrialResult>) -> Vec<TrialResult> {
    let mut out: Vec<TrialResult> = Vec::with_capacity(lines.len());
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for r in lines {
        match index.get(&r.id) {
            Some(&i) => out[i] = r,
            None => {
                index.insert(r.id.clone(), out.len());
                out.push(r);
            }
        }
    }
    out
}

/// Folds the results of repeated runs into one result per trial, ordered by backend, family,
/// scenario. Runs that disagree make the trial `flaky`, with each outcome counted in the reason.
pub fn fold(runs: Vec<TrialResult>) -> Vec<TrialResult> {
    let mut by_id: BTreeMap<(String, String, String), Vec<TrialResult>> = BTreeMap::new();
    for r in runs {
        by_id
            .entry((r.backend.clone(), r.family.clone(), r.scenario.clone()))
            .or_default()
            .push(r);
    }
    by_id.into_values().map(fold_one).collect()
}

fn fold_one(mut runs: Vec<TrialResult>) -> TrialResult {
    let n = runs.len() as u64;
    if n == 1 {
        return runs.pop().expect("one run");
    }
    let total: u64 = runs.iter().map(|r| r.duration_ms).sum();
    let mut counts: BTreeMap<Outcome, u64> = BTreeMap::new();
    for r in &runs {
        *counts.entry(r.outcome).or_default() += 1;
    }
    // The most telling reason: a failing run's, else the first non-empty one.
    let reason = runs
        .iter()
        .find(|r| matches!(r.outcome, Outcome::Fail | Outcome::Xpass) && !r.reason.is_empty())
        .or_else(|| runs.iter().find(|r| !r.reason.is_empty()))
        .map(|r| r.reason.clone())
        .unwrap_or_default();
    let rerun = runs
        .iter()
        .find(|r| !r.rerun.is_empty())
        .map(|r| r.rerun.clone())
        .unwrap_or_default();
    let mut out = runs.swap_remove(0);
    out.rerun = rerun;
    out.duration_ms = total / n;
    out.attributes.insert("runs".into(), n.to_string());
    if counts.len() == 1 {
        out.reason = reason;
    } else {
        let tally: Vec<String> = counts.iter().map(|(o, c)| format!("{o}×{c}")).collect();
        out.outcome = Outcome::Flaky;
        out.reason = if reason.is_empty() {
            tally.join(", ")
        } else {
            format!("{}: {reason}", tally.join(", "))
        };
    }
    out
}

/// How many results have each outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
    pub xfail: usize,
    pub xpass: usize,
    pub flaky: usize,
}

impl Summary {
    pub fn of<'a>(results: impl IntoIterator<Item = &'a TrialResult>) -> Summary {
        let mut s = Summary::default();
        for r in results {
            *s.slot(r.outcome) += 1;
        }
        s
    }

    fn slot(&mut self, o: Outcome) -> &mut usize {
        match o {
            Outcome::Pass => &mut self.pass,
            Outcome::Fail => &mut self.fail,
            Outcome::Skip => &mut self.skip,
            Outcome::Xfail => &mut self.xfail,
            Outcome::Xpass => &mut self.xpass,
            Outcome::Flaky => &mut self.flaky,
        }
    }

    pub fn total(&self) -> usize {
        self.pass + self.fail + self.skip + self.xfail + self.xpass + self.flaky
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pass, {} fail, {} skip, {} xfail, {} xpass, {} flaky",
            self.pass, self.fail, self.skip, self.xfail, self.xpass, self.flaky
        )
    }
}

/// A result built from its trial id, for tests and for results a reader fills in itself.
pub fn synthetic(id: &str, outcome: Outcome, reason: impl Into<String>) -> TrialResult {
    let mut parts = id.splitn(3, "::");
    TrialResult {
        id: id.to_string(),
        backend: parts.next().unwrap_or_default().to_string(),
        family: parts.next().unwrap_or_default().to_string(),
        scenario: parts.next().unwrap_or_default().to_string(),
        outcome,
        reason: reason.into(),
        duration_ms: 0,
        attributes: BTreeMap::new(),
        rerun: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, outcome: Outcome, reason: &str, ms: u64) -> TrialResult {
        let mut r = synthetic(id, outcome, reason);
        r.duration_ms = ms;
        r
    }

    #[test]
    fn parses_lines_with_fractional_durations_and_defaults() {
        let text = r#"{"id":"host::exit::code_42","backend":"host","family":"exit","scenario":"code_42","outcome":"pass","reason":"","duration_ms":12.6,"attributes":{"runtime":"host"}}

{"id":"crun::exit::code_0","backend":"crun","family":"exit","scenario":"code_0","outcome":"skip"}"#;
        let r = parse_lines(text, Path::new("r.jsonl")).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].duration_ms, 13);
        assert_eq!(r[1].outcome, Outcome::Skip);
        assert_eq!(r[0].scenario_path(), "exit::code_42");
    }

    #[test]
    fn torn_line_is_an_error_naming_the_line() {
        let err = parse_lines("{\"id\":\"x\"", Path::new("r.jsonl")).unwrap_err();
        assert!(err.contains("r.jsonl:1"), "{err}");
    }

    #[test]
    fn within_a_run_the_last_line_of_a_trial_counts() {
        let r = last_per_id(vec![
            sample("host::a::b", Outcome::Skip, "listed", 0),
            sample("host::a::c", Outcome::Pass, "", 1),
            sample("host::a::b", Outcome::Fail, "forced", 2),
        ]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].id.as_str(), r[0].outcome),
            ("host::a::b", Outcome::Fail)
        );
    }

    #[test]
    fn disagreeing_repeats_are_flaky_and_agreeing_ones_are_not() {
        let runs = vec![
            sample("host::exit::code_0", Outcome::Pass, "", 10),
            sample("host::exit::code_1", Outcome::Pass, "", 10),
            sample("host::exit::code_0", Outcome::Fail, "exit 3, wanted 0", 20),
            sample("host::exit::code_1", Outcome::Pass, "", 30),
            sample("host::exit::code_0", Outcome::Pass, "", 30),
        ];
        let folded = fold(runs);
        assert_eq!(folded.len(), 2);
        assert_eq!(folded[0].id, "host::exit::code_0");
        assert_eq!(folded[0].outcome, Outcome::Flaky);
        assert_eq!(folded[0].reason, "pass×2, fail×1: exit 3, wanted 0");
        assert_eq!(folded[0].duration_ms, 20);
        assert_eq!(folded[1].outcome, Outcome::Pass);
        assert_eq!(folded[1].attributes["runs"], "2");
        let s = Summary::of(&folded);
        assert_eq!((s.pass, s.flaky, s.total()), (1, 1, 2));
    }

    #[test]
    fn lines_append_and_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let mut l = ResultLine {
            id: "host::exit::code_42".into(),
            backend: "host".into(),
            family: "exit".into(),
            scenario: "code_42".into(),
            outcome: Outcome::Xfail,
            reason: "a \"quoted\"\nreason".into(),
            duration_ms: 12,
            attributes: BTreeMap::from([("k".into(), "v".into())]),
            rerun: "CELLCHECK_BACKENDS=host cargo nextest run".into(),
        };
        append(&p, &l).unwrap();
        l.outcome = Outcome::Skip;
        append(&p, &l).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("\"outcome\":\"xfail\""), "{}", lines[0]);
        let back: ResultLine = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(back, l);
    }
}
