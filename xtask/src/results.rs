//! Trial results: the JSON lines the suite appends, and how repeated runs fold into one result.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
    Xfail,
    Xpass,
    /// Repeated runs of one trial disagreed. Only xtask produces this.
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

/// One trial's result, exactly the shape of a line of `CELLCHECK_RESULTS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    pub id: String,
    pub backend: String,
    pub family: String,
    pub scenario: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub reason: String,
    #[serde(default, deserialize_with = "millis")]
    pub duration_ms: u64,
    #[serde(default)]
    pub attributes: BTreeMap<String, serde_json::Value>,
}

impl TrialResult {
    /// `{family}::{scenario}`, what expectation globs match against.
    pub fn scenario_path(&self) -> String {
        format!("{}::{}", self.family, self.scenario)
    }
}

/// The suite may write fractional milliseconds; reports carry whole ones.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = f64::deserialize(d)?;
    Ok(if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    })
}

/// Parses one results file. A torn last line (a trial killed mid-write) is an error naming the
/// line, because a silently dropped result would read as "not run".
pub fn parse_lines(text: &str, origin: &Path) -> Result<Vec<TrialResult>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a trial result: {l}", origin.display(), i + 1))
        })
        .collect()
}

pub fn read_file(path: &Path) -> Result<Vec<TrialResult>> {
    match std::fs::read_to_string(path) {
        Ok(t) => parse_lines(&t, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Within one run a trial may be recorded twice (listed as skipped, then forced to run): the
/// last line counts, as the suite documents.
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

/// Folds the results of `repeat` runs into one result per trial, ordered by backend, family,
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
    let mut out = runs.swap_remove(0);
    out.duration_ms = total / n;
    out.attributes
        .insert("runs".into(), serde_json::Value::from(n));
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

#[cfg(test)]
pub(crate) fn sample(id: &str, outcome: Outcome, reason: &str, ms: u64) -> TrialResult {
    let mut parts = id.splitn(3, "::");
    TrialResult {
        id: id.to_string(),
        backend: parts.next().unwrap().to_string(),
        family: parts.next().unwrap().to_string(),
        scenario: parts.next().unwrap().to_string(),
        outcome,
        reason: reason.to_string(),
        duration_ms: ms,
        attributes: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suite_lines_with_fractional_durations() {
        let text = r#"{"id":"host::exit::code_42","backend":"host","family":"exit","scenario":"code_42","outcome":"pass","reason":"","duration_ms":12.6,"attributes":{"runtime":"host"}}

{"id":"crun::exit::code_0","backend":"crun","family":"exit","scenario":"code_0","outcome":"skip","reason":"crun: hybrid cgroups","duration_ms":0,"attributes":{}}"#;
        let r = parse_lines(text, Path::new("r.jsonl")).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].duration_ms, 13);
        assert_eq!(r[1].outcome, Outcome::Skip);
        assert_eq!(r[0].scenario_path(), "exit::code_42");
    }

    /// `Outcome` and `TrialResult` stay separate from the suite's `ResultLine` (they add `Flaky`
    /// and read leniently), so pin that every line the suite can write still parses here.
    #[test]
    fn reads_every_line_the_suite_writes() {
        use cellcheck_conformance::results::{Outcome as S, ResultLine};
        for (s, want) in [
            (S::Pass, Outcome::Pass),
            (S::Fail, Outcome::Fail),
            (S::Skip, Outcome::Skip),
            (S::Xfail, Outcome::Xfail),
            (S::Xpass, Outcome::Xpass),
        ] {
            // Exhaustive, so a new suite outcome fails to compile until it is listed above.
            match s {
                S::Pass | S::Fail | S::Skip | S::Xfail | S::Xpass => {}
            }
            let line = ResultLine {
                id: "host::exit::code_0".into(),
                backend: "host".into(),
                family: "exit".into(),
                scenario: "code_0".into(),
                outcome: s,
                reason: "why".into(),
                duration_ms: 7,
                attributes: BTreeMap::from([("k".into(), "v".into())]),
            };
            let text = serde_json::to_string(&line).unwrap();
            let r = parse_lines(&text, Path::new("r.jsonl")).unwrap();
            assert_eq!(r[0].outcome, want);
            assert_eq!(
                (r[0].id.as_str(), r[0].reason.as_str()),
                (line.id.as_str(), "why")
            );
            assert_eq!(
                (r[0].duration_ms, &r[0].attributes["k"]),
                (7, &serde_json::json!("v"))
            );
        }
    }

    #[test]
    fn torn_line_is_an_error_naming_the_line() {
        let err = parse_lines("{\"id\":\"x\"", Path::new("r.jsonl")).unwrap_err();
        assert!(format!("{err:#}").contains("r.jsonl:1"), "{err:#}");
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
        assert_eq!(folded[1].attributes["runs"], 2);
        let s = Summary::of(&folded);
        assert_eq!((s.pass, s.flaky, s.total()), (1, 1, 2));
    }
}
