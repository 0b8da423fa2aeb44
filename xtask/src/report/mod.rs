//! Every report format, all written from one [`Report`].

mod audit;
mod html;
mod junit;
mod markdown;
#[cfg(test)]
mod snapshots;
mod tap;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::matrix::Selected;
use crate::verdict::Problem;
use cellcheck_conformance::audit::BackendAudit;
use cellcheck_conformance::results::{Outcome, Summary, TrialResult};

pub const SCHEMA: &str = "cellcheck-report/1";

/// One run, as every report sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// `K/N` when this run was shard K of N of its class (`cargo xtask gate` merges shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// host.json as the probe wrote it.
    pub host: serde_json::Value,
    /// The class's backends and whether this host could run them.
    pub backends: Vec<Selected>,
    pub results: Vec<TrialResult>,
    pub summary: Summary,
    /// Why the run fails (empty when it passes).
    pub problems: Vec<Problem>,
    /// Per backend, what the host audit found over the run and which cells of killed runs it
    /// recovered (from the suite's audit lines).
    #[serde(default)]
    pub host_audit: Vec<BackendAudit>,
}

impl Report {
    pub fn new(
        host: serde_json::Value,
        backends: Vec<Selected>,
        results: Vec<TrialResult>,
        problems: Vec<Problem>,
    ) -> Report {
        Report {
            schema: SCHEMA.to_string(),
            partition: None,
            host,
            summary: Summary::of(&results),
            backends,
            results,
            problems,
            host_audit: Vec::new(),
        }
    }

    /// Backends in matrix order, then any others that produced results.
    pub fn backend_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.backends.iter().map(|b| b.name.clone()).collect();
        for r in &self.results {
            if !names.contains(&r.backend) {
                names.push(r.backend.clone());
            }
        }
        names
    }

    /// `family::scenario` rows, sorted, each with its result per backend.
    pub fn grid(&self) -> BTreeMap<String, BTreeMap<String, &TrialResult>> {
        let mut g: BTreeMap<String, BTreeMap<String, &TrialResult>> = BTreeMap::new();
        for r in &self.results {
            g.entry(r.scenario_path())
                .or_default()
                .insert(r.backend.clone(), r);
        }
        g
    }

    pub fn summary_of(&self, backend: &str) -> Summary {
        Summary::of(self.results.iter().filter(|r| r.backend == backend))
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    /// The reasons section the Markdown and HTML reports share: every trial that did not pass and
    /// gave a reason, in result order, as `head`, one `item` each, then `tail`; empty if none.
    fn reasons_section(
        &self,
        head: &str,
        tail: &str,
        item: impl Fn(&TrialResult) -> String,
    ) -> String {
        let notes: Vec<_> = self
            .results
            .iter()
            .filter(|t| t.outcome != Outcome::Pass && !t.reason.is_empty())
            .collect();
        if notes.is_empty() {
            return String::new();
        }
        let mut s = head.to_string();
        for t in notes {
            s.push_str(&item(t));
        }
        s.push_str(tail);
        s
    }

    /// The trials that failed the run's way (fail, xpass, flaky), in result order.
    pub fn failures(&self) -> Vec<&TrialResult> {
        self.results
            .iter()
            .filter(|t| matches!(t.outcome, Outcome::Fail | Outcome::Xpass | Outcome::Flaky))
            .collect()
    }

    /// Skips and known failures grouped by backend, outcome and reason (a backend the host cannot
    /// run has one reason for all its trials): each group with its trials, in first-seen order.
    pub fn reason_groups(&self) -> Vec<(&str, Outcome, &str, Vec<&TrialResult>)> {
        let mut groups: Vec<(&str, Outcome, &str, Vec<&TrialResult>)> = Vec::new();
        for t in &self.results {
            if !matches!(t.outcome, Outcome::Skip | Outcome::Xfail) {
                continue;
            }
            match groups
                .iter_mut()
                .find(|g| g.0 == t.backend && g.1 == t.outcome && g.2 == t.reason)
            {
                Some(g) => g.3.push(t),
                None => groups.push((&t.backend, t.outcome, &t.reason, vec![t])),
            }
        }
        groups
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes") + "\n"
    }
    pub fn to_junit(&self) -> String {
        junit::render(self)
    }
    pub fn to_tap(&self) -> String {
        tap::render(self)
    }
    pub fn to_markdown(&self) -> String {
        markdown::render(self)
    }
    pub fn to_html(&self) -> String {
        html::render(self)
    }

    /// Writes report.json, junit.xml, report.tap, matrix.md and report.html into `dir`.
    pub fn write_all(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let files = [
            ("report.json", self.to_json()),
            ("junit.xml", self.to_junit()),
            ("report.tap", self.to_tap()),
            ("matrix.md", self.to_markdown()),
            ("report.html", self.to_html()),
        ];
        let mut out = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
            out.push(p);
        }
        Ok(out)
    }

    /// The compact per-backend table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<10} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>9}  note\n",
            "backend", "pass", "fail", "skip", "xfail", "xpass", "flaky", "time"
        );
        for name in self.backend_names() {
            let sum = self.summary_of(&name);
            let ms: u64 = self
                .results
                .iter()
                .filter(|r| r.backend == name)
                .map(|r| r.duration_ms)
                .sum();
            let note = self
                .backends
                .iter()
                .find(|b| b.name == name && !b.usable)
                .map(|b| format!("unavailable: {}", b.why))
                .unwrap_or_default();
            s.push_str(&format!(
                "{:<10} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7.1} s  {}\n",
                name,
                sum.pass,
                sum.fail,
                sum.skip,
                sum.xfail,
                sum.xpass,
                sum.flaky,
                ms as f64 / 1000.0,
                note
            ));
        }
        s.push_str(&format!(
            "total: {} trials: {}\n",
            self.summary.total(),
            self.summary
        ));
        s.push_str(&audit::console(self));
        s
    }
}

/// One HTML page holding several runs, each as its own section.
pub fn html_many(title: &str, verdict: &str, reports: &[&Report]) -> String {
    html::render_many(title, verdict, reports)
}

/// Text safe inside XML/HTML text and attribute values. Control characters XML 1.0 forbids
/// (a trial may capture any bytes) become U+FFFD.
pub fn escape_xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            '\t' | '\n' | '\r' => o.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => o.push('\u{FFFD}'),
            c => o.push(c),
        }
    }
    o
}

pub fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "pass",
        Outcome::Fail => "FAIL",
        Outcome::Skip => "skip",
        Outcome::Xfail => "xfail",
        Outcome::Xpass => "XPASS",
        Outcome::Flaky => "FLAKY",
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A fixed run used by every writer's tests.
    use super::*;
    use crate::util::sample;
    use crate::verdict::ProblemKind;
    use cellcheck_conformance::audit::{AuditLine, WindowLine};

    pub fn report() -> Report {
        let mut results = vec![
            sample("host::exit::code_0", Outcome::Pass, "", 12),
            sample(
                "host::exit::code_42",
                Outcome::Fail,
                "exit 41, wanted 42 <&\"'>\u{1}",
                15,
            ),
            sample(
                "host::snapshot::restore",
                Outcome::Skip,
                "capability snapshot unsupported",
                0,
            ),
            sample(
                "host::snapshot::corrupted_image",
                Outcome::Skip,
                "capability snapshot unsupported",
                0,
            ),
            sample("runsc::exit::code_0", Outcome::Pass, "", 310),
            sample("runsc::exit::code_42", Outcome::Xfail, "known: HOME=/", 320),
            sample(
                "runsc::snapshot::restore",
                Outcome::Xpass,
                "listed as known failure but passed",
                900,
            ),
            sample(
                "runsc::isolation::env_exact",
                Outcome::Flaky,
                "pass×1, fail×1",
                200,
            ),
        ];
        results[0]
            .attributes
            .insert("runtime".into(), "host".into());
        // The suite records a rerun line for each failure it writes.
        for r in results.iter_mut() {
            if matches!(r.outcome, Outcome::Fail | Outcome::Xpass | Outcome::Flaky) {
                r.rerun = format!(
                    "CELLCHECK_BACKENDS={} CELLCHECK_HOST_CLASS=linux-nokvm cargo nextest run \
                     -p cellcheck-conformance --test conformance -E 'test(={})'",
                    r.backend, r.id
                );
            }
        }
        let backends = vec![
            Selected {
                name: "host".into(),
                usable: true,
                why: "host: ran /bin/true".into(),
            },
            Selected {
                name: "runsc".into(),
                usable: true,
                why: "runsc: ok".into(),
            },
            Selected {
                name: "crun".into(),
                usable: false,
                why: "crun: cannot use hybrid cgroups".into(),
            },
        ];
        let problems = vec![Problem {
            kind: ProblemKind::Fail,
            trial: Some("host::exit::code_42".into()),
            message: "exit 41".into(),
        }];
        let mut r = Report::new(
            serde_json::json!({"schema": "cellcheck-host/1", "class": "linux-nokvm", "probes": {}}),
            backends,
            results,
            problems,
        );
        r.host_audit = cellcheck_conformance::audit::per_backend(&[
            AuditLine::Window(WindowLine {
                backend: "host".into(),
                closed_by: "host::exit::code_0".into(),
                clean: true,
                leftovers: Vec::new(),
                warnings: Vec::new(),
                audit_ms: 4,
                check_ms: 1,
                trial_ms: 12,
            }),
            AuditLine::Window(WindowLine {
                backend: "runsc".into(),
                closed_by: "runsc::exit::code_0".into(),
                clean: false,
                leftovers: vec!["cgroup dir /sys/fs/cgroup/x/cc-ab12cd34-e still exists \
                     (cell cc-ab12cd34-e, trial runsc::exit::code_0)"
                    .into()],
                warnings: Vec::new(),
                audit_ms: 30,
                check_ms: 5,
                trial_ms: 310,
            }),
            AuditLine::Recovered(cellcheck_conformance::ledger::Recovered {
                backend: "runsc".into(),
                cell: "cc-dead0001-h".into(),
                run: "r-17".into(),
                removed: vec!["process pid 4242".into()],
                errors: Vec::new(),
            }),
        ]);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_report_has_the_schema_fields() {
        let r = fixture::report();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["host"]["class"], "linux-nokvm");
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 8);
        for field in [
            "id",
            "backend",
            "family",
            "scenario",
            "outcome",
            "reason",
            "duration_ms",
            "attributes",
        ] {
            assert!(results.iter().all(|r| r.get(field).is_some()), "{field}");
        }
        // Every failing trial carries its rerun line; the others none.
        for r in results {
            let failing = ["fail", "xpass", "flaky"].contains(&r["outcome"].as_str().unwrap());
            assert_eq!(r.get("rerun").is_some(), failing, "{r}");
        }
        assert_eq!(results[1]["outcome"], "fail");
        assert_eq!(results[0]["attributes"]["runtime"], "host");
        let s = &v["summary"];
        for (k, n) in [
            ("pass", 2),
            ("fail", 1),
            ("skip", 2),
            ("xfail", 1),
            ("xpass", 1),
            ("flaky", 1),
        ] {
            assert_eq!(s[k], n, "{k}");
        }
        assert_eq!(v["problems"][0]["kind"], "fail");
    }

    #[test]
    fn table_lists_unavailable_backends_with_why() {
        let t = fixture::report().table();
        let crun = t.lines().find(|l| l.starts_with("crun")).unwrap();
        assert!(
            crun.contains("unavailable: crun: cannot use hybrid cgroups"),
            "{t}"
        );
        let host = t.lines().find(|l| l.starts_with("host")).unwrap();
        let cols: Vec<&str> = host.split_whitespace().collect();
        assert_eq!(&cols[1..7], ["1", "1", "2", "0", "0", "0"], "{host}");
    }

    #[test]
    fn written_files_are_all_there() {
        let dir = tempfile::tempdir().unwrap();
        let files = fixture::report().write_all(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "report.json",
                "junit.xml",
                "report.tap",
                "matrix.md",
                "report.html"
            ]
        );
        assert!(files.iter().all(|f| f.metadata().unwrap().len() > 100));
    }
}
