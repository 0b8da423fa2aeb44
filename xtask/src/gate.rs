//! `cargo xtask gate DIR...`: one verdict for a release. Finds every report.json under the given
//! directories (CI shards and runner classes, one artifact each), merges each class's shards into
//! one run, and writes the merged matrix as gate.json, gate.md and gate.html. It fails when any
//! class's run has a problem, when a shard is missing or given twice, or when two reports disagree
//! about one trial.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cellcheck_conformance::results::TrialResult;
use serde::Serialize;

use crate::report::{self, Report};
use crate::util::out_dir;

/// `cargo xtask gate`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Directories searched (recursively) for report.json files.
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Where gate.json, gate.md and gate.html go (default: target/conformance/gate).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub const SCHEMA: &str = "cellcheck-gate/1";

/// The merged matrix and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub schema: &'static str,
    pub passed: bool,
    /// The report.json files merged.
    pub inputs: Vec<PathBuf>,
    /// Problems of the merge itself (missing or repeated shards, disagreeing reports).
    pub problems: Vec<String>,
    /// One merged run per runner class, in class order.
    pub classes: Vec<Report>,
}

/// Every `report.json` under `dir`, sorted; an error when there is none.
pub fn find_reports(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("read {}", d.display()))?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "report.json") {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        bail!("gate: no report.json under {}", dir.display());
    }
    out.sort();
    Ok(out)
}

pub fn load(path: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let r: Report =
        serde_json::from_str(&text).with_context(|| format!("{}: not a report", path.display()))?;
    if r.schema != report::SCHEMA {
        bail!(
            "{}: schema {:?}, this gate reads {:?}",
            path.display(),
            r.schema,
            report::SCHEMA
        );
    }
    Ok(r)
}

fn class_of(r: &Report) -> String {
    r.host["class"].as_str().unwrap_or("unknown").to_string()
}

/// Merges reports: shards of one class into one run each.
pub fn merge(inputs: Vec<(PathBuf, Report)>) -> Gate {
    let mut problems = Vec::new();
    let mut by_class: BTreeMap<String, Vec<(PathBuf, Report)>> = BTreeMap::new();
    for (p, r) in inputs.iter().cloned() {
        by_class.entry(class_of(&r)).or_default().push((p, r));
    }
    let mut classes = Vec::new();
    for (class, reports) in by_class {
        check_shards(&class, &reports, &mut problems);
        classes.push(merge_class(&class, reports, &mut problems));
    }
    let passed = problems.is_empty() && classes.iter().all(Report::passed);
    Gate {
        schema: SCHEMA,
        passed,
        inputs: inputs.into_iter().map(|(p, _)| p).collect(),
        problems,
        classes,
    }
}

/// Every shard K of N present exactly once, and no unpartitioned run beside shards.
fn check_shards(class: &str, reports: &[(PathBuf, Report)], problems: &mut Vec<String>) {
    let mut seen: BTreeMap<(u32, u32), Vec<&Path>> = BTreeMap::new();
    let mut whole = Vec::new();
    for (p, r) in reports {
        match r.partition.as_deref().map(parse_partition) {
            None | Some(Some((1, 1))) => whole.push(p.as_path()),
            Some(Some(kn)) => seen.entry(kn).or_default().push(p),
            Some(None) => problems.push(format!(
                "{class}: {} has an unreadable partition {:?}",
                p.display(),
                r.partition
            )),
        }
    }
    if whole.len() > 1 || (!whole.is_empty() && !seen.is_empty()) {
        problems.push(format!(
            "{class}: {} whole run(s) and {} shard(s) given; one of them only",
            whole.len(),
            seen.values().map(Vec::len).sum::<usize>()
        ));
    }
    let ns: Vec<u32> = seen.keys().map(|(_, n)| *n).collect();
    if let Some(&n) = ns.first() {
        if ns.iter().any(|&m| m != n) {
            problems.push(format!("{class}: shards of different counts {ns:?}"));
        }
        for k in 1..=n {
            match seen.get(&(k, n)).map(Vec::len) {
                None => problems.push(format!("{class}: shard {k}/{n} is missing")),
                Some(1) => {}
                Some(c) => problems.push(format!("{class}: shard {k}/{n} given {c} times")),
            }
        }
    }
}

fn parse_partition(v: &str) -> Option<(u32, u32)> {
    crate::conformance::parse_partition(v).ok()
}

fn merge_class(class: &str, reports: Vec<(PathBuf, Report)>, problems: &mut Vec<String>) -> Report {
    let host = reports[0].1.host.clone();
    let mut backends: Vec<crate::matrix::Selected> = Vec::new();
    let mut results: BTreeMap<String, (PathBuf, TrialResult)> = BTreeMap::new();
    let mut run_problems = Vec::new();
    let mut audits = Vec::new();
    for (path, r) in reports {
        audits.extend(r.host_audit);
        for b in r.backends {
            if !backends.iter().any(|x| x.name == b.name) {
                backends.push(b);
            }
        }
        for t in r.results {
            match results.get(&t.id) {
                None => {
                    results.insert(t.id.clone(), (path.clone(), t));
                }
                Some((_, prev)) if prev.outcome == t.outcome => {}
                Some((first, prev)) => problems.push(format!(
                    "{class}: {} is {} in {} but {} in {}",
                    t.id,
                    prev.outcome,
                    first.display(),
                    t.outcome,
                    path.display()
                )),
            }
        }
        run_problems.extend(r.problems);
    }
    // A run-level problem (an expired expectation, a backend with no trials) is found by every
    // shard: once in the merge.
    run_problems.sort();
    run_problems.dedup();
    let mut results: Vec<TrialResult> = results.into_values().map(|(_, t)| t).collect();
    results.sort_by(|a, b| {
        (&a.backend, &a.family, &a.scenario).cmp(&(&b.backend, &b.family, &b.scenario))
    });
    let mut merged = Report::new(host, backends, results, run_problems);
    merged.host_audit = cellcheck_conformance::audit::merge(audits);
    merged
}

pub fn run(opts: &Options) -> Result<bool> {
    let mut inputs = Vec::new();
    for d in &opts.dirs {
        for p in find_reports(d)? {
            let r = load(&p)?;
            inputs.push((p, r));
        }
    }
    let gate = merge(inputs);
    let dir = opts.out.clone().unwrap_or_else(|| out_dir().join("gate"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let verdict = verdict_line(&gate);
    let mut md = format!("# cellcheck release gate\n\n{verdict}\n");
    for p in &gate.problems {
        md.push_str(&format!("\n- {p}"));
    }
    for r in &gate.classes {
        md.push('\n');
        md.push_str(&r.to_markdown());
    }
    let refs: Vec<&Report> = gate.classes.iter().collect();
    let files = [
        ("gate.json", serde_json::to_string_pretty(&gate)? + "\n"),
        ("gate.md", md),
        (
            "gate.html",
            report::html_many("cellcheck release gate", &verdict, &refs),
        ),
    ];
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    for r in &gate.classes {
        println!("{}: {}", class_of(r), r.summary);
        for p in &r.problems {
            println!(
                "  {} {}: {}",
                p.kind,
                p.trial.as_deref().unwrap_or("-"),
                first_line(&p.message)
            );
        }
    }
    for p in &gate.problems {
        println!("gate: {p}");
    }
    println!("{verdict}");
    Ok(gate.passed)
}

fn verdict_line(g: &Gate) -> String {
    let problems: usize =
        g.problems.len() + g.classes.iter().map(|c| c.problems.len()).sum::<usize>();
    if g.passed {
        format!(
            "gate: passed ({} report(s), {} class(es))",
            g.inputs.len(),
            g.classes.len()
        )
    } else {
        format!(
            "gate: FAILED ({problems} problem(s) over {} report(s))",
            g.inputs.len()
        )
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use cellcheck_conformance::expectations::{parse_date, Expectations};

    use cellcheck_conformance::results::Outcome;

    use super::*;
    use crate::util::sample;
    use crate::verdict::{judge, Judged};

    /// A run of `results` judged as xtask judges one, as shard `partition` when given.
    fn run(
        results: Vec<TrialResult>,
        listed: &BTreeSet<String>,
        partition: Option<&str>,
    ) -> Report {
        let exp = Expectations::default();
        // `ghost` has no listed trial: a run-level problem every shard finds.
        let backends: BTreeSet<String> = ["host".to_string(), "ghost".to_string()].into();
        let problems = judge(&Judged {
            results: &results,
            listed,
            backends: &backends,
            class: "linux-nokvm",
            expectations: &exp,
            expectations_file: std::path::Path::new("matrix/expectations.toml"),
            catalog: &Default::default(),
            today: parse_date("2026-11-30").unwrap(),
            strict: true,
            unusable: &BTreeMap::new(),
        });
        let host = serde_json::json!({"class": "linux-nokvm", "kernel": "6.1"});
        let mut r = Report::new(host, Vec::new(), results, problems);
        r.partition = partition.map(String::from);
        r
    }

    fn all_results(fail: bool) -> Vec<TrialResult> {
        let mut v = vec![
            sample("host::exit::code_0", Outcome::Pass, "", 3),
            sample("host::exit::code_1", Outcome::Xfail, "known", 4),
            sample("host::exit::code_42", Outcome::Pass, "", 5),
            sample("host::spec::empty_id", Outcome::Pass, "", 6),
        ];
        if fail {
            v[2] = sample(
                "host::exit::code_42",
                Outcome::Fail,
                "exit 41, wanted 42",
                5,
            );
        }
        v
    }

    fn verdict_of(r: &Report) -> (bool, Vec<crate::verdict::Problem>, Vec<(String, Outcome)>) {
        let mut p = r.problems.clone();
        p.sort();
        let mut o: Vec<_> = r
            .results
            .iter()
            .map(|t| (t.id.clone(), t.outcome))
            .collect();
        o.sort();
        (r.passed(), p, o)
    }

    #[test]
    fn gate_over_two_partitions_gives_the_unpartitioned_verdict() {
        for fail in [false, true] {
            let all = all_results(fail);
            let listed: BTreeSet<String> = all.iter().map(|r| r.id.clone()).collect();
            let whole = run(all.clone(), &listed, None);
            let (a, b): (Vec<_>, Vec<_>) =
                all.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
            let strip = |v: Vec<(usize, TrialResult)>| v.into_iter().map(|(_, r)| r).collect();
            let s1 = run(strip(a), &listed, Some("1/2"));
            let s2 = run(strip(b), &listed, Some("2/2"));
            let gate = merge(vec![("s2".into(), s2), ("s1".into(), s1)]);
            assert!(gate.problems.is_empty(), "{:?}", gate.problems);
            assert_eq!(gate.classes.len(), 1);
            assert_eq!(
                verdict_of(&gate.classes[0]),
                verdict_of(&whole),
                "fail={fail}"
            );
            assert_eq!(gate.passed, whole.passed());
            // The backend without trials fails every run, found by both shards, reported once.
            assert!(!gate.passed);
            let run_level = gate.classes[0]
                .problems
                .iter()
                .filter(|p| p.trial.is_none())
                .count();
            assert_eq!(run_level, 1, "{:?}", gate.classes[0].problems);
        }
    }

    #[test]
    fn missing_and_repeated_shards_and_disagreements_fail_the_gate() {
        let all = all_results(false);
        let listed: BTreeSet<String> = all.iter().map(|r| r.id.clone()).collect();
        let s1 = run(all[..2].to_vec(), &listed, Some("1/3"));
        let gate = merge(vec![("a".into(), s1.clone()), ("b".into(), s1.clone())]);
        let text = gate.problems.join("\n");
        assert!(text.contains("shard 1/3 given 2 times"), "{text}");
        assert!(text.contains("shard 2/3 is missing") && text.contains("shard 3/3 is missing"));

        let mut other = s1.clone();
        other.partition = Some("2/3".into());
        other.results[0].outcome = Outcome::Fail;
        let gate = merge(vec![("a".into(), s1), ("b".into(), other)]);
        assert!(
            gate.problems
                .iter()
                .any(|p| p.contains("host::exit::code_0 is pass in a but fail in b")),
            "{:?}",
            gate.problems
        );
        assert!(!gate.passed);
    }

    #[test]
    fn reports_are_found_under_artifact_dirs_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        assert!(find_reports(d.path()).is_err(), "an empty dir is an error");
        let r = crate::report::fixture::report();
        for a in [
            "conformance-linux-nokvm-0",
            "conformance-linux-nokvm-1/nested",
        ] {
            std::fs::create_dir_all(d.path().join(a)).unwrap();
            std::fs::write(d.path().join(a).join("report.json"), r.to_json()).unwrap();
        }
        let found = find_reports(d.path()).unwrap();
        assert_eq!(found.len(), 2);
        let back = load(&found[0]).unwrap();
        assert_eq!(back.to_json(), r.to_json());
        std::fs::write(
            &found[1],
            r.to_json()
                .replace("cellcheck-report/1", "cellcheck-report/0"),
        )
        .unwrap();
        assert!(format!("{:#}", load(&found[1]).unwrap_err()).contains("schema"));
    }
}
