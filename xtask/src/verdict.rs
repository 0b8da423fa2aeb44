//! Whether a run passes: failures, xpasses, flakes, and the expectations file's own health.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use std::path::Path;

use cellcheck_conformance::expectations::{
    Catalog, Date, EntryProblemKind, Expectations, ExpectedOutcome,
};
use serde::{Deserialize, Serialize};

use cellcheck_conformance::results::{Outcome, TrialResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    Fail,
    Xpass,
    Flaky,
    UnexplainedSkip,
    /// A backend this run was to test has no trial in the suite's listing.
    NoTrials,
    ExpiredExpectation,
    StaleExpectation,
    /// An expectation naming a backend the run does not know.
    UnknownBackendExpectation,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Fail => "fail",
            ProblemKind::Xpass => "xpass",
            ProblemKind::Flaky => "flaky",
            ProblemKind::UnexplainedSkip => "unexplained skip",
            ProblemKind::NoTrials => "no trials",
            ProblemKind::ExpiredExpectation => "expired expectation",
            ProblemKind::StaleExpectation => "stale expectation",
            ProblemKind::UnknownBackendExpectation => "expectation for an unknown backend",
        })
    }
}

/// One reason the run fails.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The trial, for trial problems.
    pub trial: Option<String>,
    pub message: String,
}

/// What the run is judged on.
pub struct Judged<'a> {
    pub results: &'a [TrialResult],
    /// Every trial the suite listed for the backends of this run (run or not).
    pub listed: &'a BTreeSet<String>,
    /// Backends whose trials this run listed; staleness is only decidable for them.
    pub backends: &'a BTreeSet<String>,
    pub class: &'a str,
    pub expectations: &'a Expectations,
    /// The file the expectations came from, for messages.
    pub expectations_file: &'a Path,
    /// Every backend the run knows, with its trials: what the expectations are checked against.
    pub catalog: &'a Catalog,
    pub today: Date,
    pub strict: bool,
    /// Backends this host cannot run, with the probe's evidence: their skips are justified.
    pub unusable: &'a BTreeMap<String, String>,
}

/// Every reason the run fails, in a stable order. Empty means the run passes.
pub fn judge(j: &Judged) -> Vec<Problem> {
    let mut out = Vec::new();
    for r in j.results {
        let kind = match r.outcome {
            Outcome::Fail => ProblemKind::Fail,
            Outcome::Xpass => ProblemKind::Xpass,
            Outcome::Flaky if j.strict => ProblemKind::Flaky,
            Outcome::Skip if j.strict && !skip_justified(j, r) => ProblemKind::UnexplainedSkip,
            _ => continue,
        };
        out.push(Problem {
            kind,
            trial: Some(r.id.clone()),
            message: r.reason.clone(),
        });
    }
    for b in j.backends {
        if !j.listed.iter().any(|id| {
            id.strip_prefix(b.as_str())
                .is_some_and(|r| r.starts_with("::"))
        }) {
            out.push(Problem {
                kind: ProblemKind::NoTrials,
                trial: None,
                message: format!(
                    "backend {b} was to be tested, but the suite lists no trial for it (is it registered in the suite?)"
                ),
            });
        }
    }
    // The suite's own check of the file (it refuses to list with any of these), so a run
    // judged from results alone says the same.
    for p in j
        .expectations
        .problems(j.expectations_file, j.catalog, j.today)
    {
        out.push(Problem {
            kind: match p.kind {
                EntryProblemKind::Expired => ProblemKind::ExpiredExpectation,
                EntryProblemKind::MatchesNoTrial => ProblemKind::StaleExpectation,
                EntryProblemKind::UnknownBackend => ProblemKind::UnknownBackendExpectation,
            },
            trial: None,
            message: p.to_string(),
        });
    }
    out
}

/// A skip is explained by an expectation, by the host lacking what the backend needs, or by
/// the backend declaring the capability unsupported (the suite says so in the reason).
pub fn skip_justified(j: &Judged, r: &TrialResult) -> bool {
    if j.unusable.contains_key(&r.backend) {
        return true;
    }
    if let Some(e) = j
        .expectations
        .lookup(&r.backend, j.class, &r.scenario_path())
    {
        if e.outcome == ExpectedOutcome::Skip {
            return true;
        }
    }
    capability_skip(&r.reason)
}

/// The suite words a capability skip `capability <name> unsupported: <the backend's reason>`;
/// a capability the backend declares unsupported, with its reason, is not a defect of this run.
fn capability_skip(reason: &str) -> bool {
    reason
        .strip_prefix("capability ")
        .and_then(|rest| rest.split_once(" unsupported"))
        .is_some_and(|(name, _)| {
            cellcheck_contract::Capability::ALL
                .iter()
                .any(|c| c.as_str() == name)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::sample;

    const FILE: &str = r#"
[[expect]]
backend = "runsc"
class = "*"
scenario = "isolation::env_*"
outcome = "known-failure"
reason = "runsc adds HOME=/"
link = "https://gvisor.dev/docs/"
expires = "2027-06-30"

[[expect]]
backend = "runsc"
class = "linux-nokvm"
scenario = "pause::*"
outcome = "skip"
reason = "paused sandboxes cannot be read here"
link = "https://gvisor.dev/docs/"
expires = "2027-06-30"
"#;

    struct Case {
        results: Vec<TrialResult>,
        listed: BTreeSet<String>,
        backends: BTreeSet<String>,
        exp: Expectations,
        unusable: BTreeMap<String, String>,
    }

    impl Case {
        fn new(results: Vec<TrialResult>) -> Case {
            let listed = results.iter().map(|r| r.id.clone()).collect();
            let backends = results.iter().map(|r| r.backend.clone()).collect();
            Case {
                results,
                listed,
                backends,
                exp: Expectations::parse(FILE).unwrap(),
                unusable: BTreeMap::new(),
            }
        }
        fn judge(&self, today: Date, strict: bool) -> Vec<Problem> {
            let catalog = crate::conformance::catalog(&self.listed, &self.backends, &[]);
            judge(&Judged {
                results: &self.results,
                listed: &self.listed,
                backends: &self.backends,
                class: "linux-nokvm",
                expectations: &self.exp,
                expectations_file: Path::new("exp.toml"),
                catalog: &catalog,
                today,
                strict,
                unusable: &self.unusable,
            })
        }
    }

    fn kinds(p: &[Problem]) -> Vec<ProblemKind> {
        p.iter().map(|p| p.kind).collect()
    }

    const TODAY: Date = (2026, 11, 23);

    fn clean_runsc() -> Vec<TrialResult> {
        vec![
            sample(
                "runsc::isolation::env_inside",
                Outcome::Xfail,
                "HOME=/ added",
                40,
            ),
            sample(
                "runsc::pause::counter",
                Outcome::Skip,
                "paused sandboxes cannot be read here",
                0,
            ),
            sample("runsc::exit::code_0", Outcome::Pass, "", 30),
        ]
    }

    #[test]
    fn a_clean_run_passes_even_strict() {
        let c = Case::new(clean_runsc());
        assert_eq!(c.judge(TODAY, true), vec![]);
    }

    #[test]
    fn an_xpass_fails_the_run() {
        let mut r = clean_runsc();
        r[0].outcome = Outcome::Xpass;
        r[0].reason = "listed as known failure but passed (xpass)".into();
        let p = Case::new(r).judge(TODAY, false);
        assert_eq!(kinds(&p), [ProblemKind::Xpass]);
        assert_eq!(p[0].trial.as_deref(), Some("runsc::isolation::env_inside"));
    }

    #[test]
    fn an_expired_entry_fails_the_run() {
        let p = Case::new(clean_runsc()).judge((2027, 7, 1), false);
        assert_eq!(
            kinds(&p),
            [
                ProblemKind::ExpiredExpectation,
                ProblemKind::ExpiredExpectation
            ]
        );
        assert!(p[0].message.contains("2027-06-30"), "{}", p[0].message);
        // The expiry day itself is still valid.
        assert_eq!(Case::new(clean_runsc()).judge((2027, 6, 30), false), vec![]);
    }

    #[test]
    fn a_stale_entry_fails_the_run() {
        let mut c = Case::new(clean_runsc());
        c.listed.remove("runsc::isolation::env_inside");
        c.results.remove(0);
        let p = c.judge(TODAY, false);
        assert_eq!(kinds(&p), [ProblemKind::StaleExpectation]);
        assert!(
            p[0].message.starts_with("exp.toml: entry 1 "),
            "{}",
            p[0].message
        );
        assert!(p[0].message.contains("isolation::env_*"));
    }

    #[test]
    fn an_entry_for_an_unknown_backend_fails_the_run() {
        let mut c = Case::new(vec![sample("host::exit::code_0", Outcome::Pass, "", 3)]);
        c.backends = ["host".to_string()].into();
        let p = c.judge(TODAY, false);
        assert_eq!(
            kinds(&p),
            [
                ProblemKind::UnknownBackendExpectation,
                ProblemKind::UnknownBackendExpectation
            ]
        );
        assert!(
            p[0].message.contains("unknown backend \"runsc\""),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn strict_fails_an_unexplained_skip_and_a_flake() {
        let mut r = clean_runsc();
        r.push(sample(
            "runsc::exit::code_1",
            Outcome::Skip,
            "skipped for no reason",
            0,
        ));
        r.push(sample(
            "runsc::exit::code_42",
            Outcome::Flaky,
            "pass×1, fail×1",
            9,
        ));
        let c = Case::new(r);
        assert_eq!(kinds(&c.judge(TODAY, false)), []);
        assert_eq!(
            kinds(&c.judge(TODAY, true)),
            [ProblemKind::UnexplainedSkip, ProblemKind::Flaky]
        );
    }

    #[test]
    fn strict_accepts_skips_the_host_or_the_backend_explains() {
        let mut r = clean_runsc();
        r.push(sample(
            "crun::exit::code_0",
            Outcome::Skip,
            "crun: preflight failed",
            0,
        ));
        r.push(sample(
            "runsc::snapshot::restore",
            Outcome::Skip,
            "capability snapshot unsupported: criu check fails",
            0,
        ));
        let mut c = Case::new(r);
        c.unusable
            .insert("crun".into(), "crun: cannot use hybrid cgroups".into());
        assert_eq!(c.judge(TODAY, true), vec![]);
        c.unusable.clear();
        assert_eq!(kinds(&c.judge(TODAY, true)), [ProblemKind::UnexplainedSkip]);
    }

    #[test]
    fn only_the_suite_wording_of_a_capability_skip_counts() {
        assert!(capability_skip(
            "capability snapshot unsupported: criu check fails"
        ));
        assert!(!capability_skip(
            "capability teleport unsupported: no such thing"
        ));
        assert!(!capability_skip(
            "backend unavailable: snapshot unsupported"
        ));
        assert!(!capability_skip(""));
    }

    #[test]
    fn a_backend_without_listed_trials_fails_the_run() {
        let mut c = Case::new(clean_runsc());
        c.backends.insert("nested".into());
        let p = c.judge(TODAY, false);
        assert_eq!(kinds(&p), [ProblemKind::NoTrials]);
        assert!(p[0].message.contains("backend nested"));
    }

    #[test]
    fn plain_failures_always_fail() {
        let mut r = clean_runsc();
        r[2].outcome = Outcome::Fail;
        assert_eq!(
            kinds(&Case::new(r).judge(TODAY, false)),
            [ProblemKind::Fail]
        );
    }
}
