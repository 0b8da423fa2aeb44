//! `cargo xtask conformance`: build the fixtures, probe, run the suite for this class's backends
//! under nextest, then write every report from the one results file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::classes::ClassMatrix;
use crate::matrix::{self, Selected};
use crate::probe;
use crate::report::Report;
use crate::results::{self, Outcome, TrialResult};
use crate::util::{out_dir, project_root};
use crate::verdict::{self, Judged, ProblemKind};

const PACKAGE: &str = "cellcheck-conformance";
const TEST: &str = "conformance";

/// `cargo xtask conformance`'s flags.
#[derive(Debug, Clone, PartialEq, Eq, Default, clap::Args)]
pub struct Options {
    /// Run only this backend (even if the probe says this host cannot); repeatable.
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
    /// Turn "could not run" skips into failures (release gating).
    #[arg(long)]
    pub strict: bool,
    /// Run every trial N times; runs that disagree make the trial flaky.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Run shard K of N (nextest's count partitioning).
    #[arg(long, value_name = "K/N", value_parser = parse_partition)]
    pub partition: Option<(u32, u32)>,
    /// Do not build the fixtures first.
    #[arg(long)]
    pub no_build: bool,
}

pub fn parse_partition(v: &str) -> Result<(u32, u32), String> {
    let parsed = v
        .split_once('/')
        .and_then(|(k, n)| Some((k.parse::<u32>().ok()?, n.parse::<u32>().ok()?)));
    match parsed {
        Some((k, n)) if n >= 1 && (1..=n).contains(&k) => Ok((k, n)),
        _ => Err(format!("{v:?}: want K/N with 1 ≤ K ≤ N")),
    }
}

/// The env every suite process of this run gets.
fn suite_env(backends: &[String], class: &str, strict: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("CELLCHECK_BACKENDS".to_string(), backends.join(",")),
        ("CELLCHECK_HOST_CLASS".to_string(), class.to_string()),
    ];
    if strict {
        env.push(("CELLCHECK_STRICT".into(), "1".into()));
    }
    env
}

/// The one line that reruns exactly one trial with the env it needs.
pub fn rerun_command(id: &str, class: &str, strict: bool) -> String {
    let backend = id.split("::").next().unwrap_or(id);
    let strict = if strict { " CELLCHECK_STRICT=1" } else { "" };
    format!(
        "CELLCHECK_BACKENDS={backend} CELLCHECK_HOST_CLASS={class}{strict} cargo nextest run -p {PACKAGE} --test {TEST} -E 'test(={id})'"
    )
}

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

fn nextest_base(sub: &str) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(project_root())
        .args(["nextest", sub, "-p", PACKAGE, "--test", TEST]);
    c
}

fn list_trials(env: &[(String, String)], partition: Option<(u32, u32)>) -> Result<Vec<Listed>> {
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
struct Progress {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(path: PathBuf, from: u64, done_before: usize, total: usize) -> Progress {
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

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A skipped result xtask writes itself, for trials the suite did not record.
fn synthetic_skip(id: &str, reason: String) -> TrialResult {
    let mut parts = id.splitn(3, "::");
    TrialResult {
        id: id.to_string(),
        backend: parts.next().unwrap_or_default().to_string(),
        family: parts.next().unwrap_or_default().to_string(),
        scenario: parts.next().unwrap_or_default().to_string(),
        outcome: Outcome::Skip,
        reason,
        duration_ms: 0,
        attributes: BTreeMap::new(),
    }
}

/// Fills in what the results file lacks: unusable backends' trials (skipped, with the probe's
/// evidence), ignored trials the suite did not record, and selected trials that ran but left no
/// line (a crash: failed).
pub fn complete(
    mut results: Vec<TrialResult>,
    listed: &[Listed],
    unusable: &BTreeMap<String, String>,
    first_shard: bool,
) -> Vec<TrialResult> {
    let seen: BTreeSet<String> = results.iter().map(|r| r.id.clone()).collect();
    for l in listed {
        if seen.contains(&l.name) {
            continue;
        }
        let backend = l.name.split("::").next().unwrap_or_default();
        if let Some(why) = unusable.get(backend) {
            if first_shard {
                results.push(synthetic_skip(
                    &l.name,
                    format!("unavailable on this host: {why}"),
                ));
            }
        } else if l.ignored {
            if first_shard {
                results.push(synthetic_skip(
                    &l.name,
                    "ignored when listed (the suite recorded no reason)".into(),
                ));
            }
        } else if l.selected {
            let mut r = synthetic_skip(&l.name, String::new());
            r.outcome = Outcome::Fail;
            r.reason =
                "no result recorded: the trial process died before writing one (see nextest.log)"
                    .into();
            results.push(r);
        }
    }
    // A backend with nothing listed (no implementation, or not registered in the suite) still
    // gets one row, so the report says why it did not run.
    if first_shard {
        for (backend, why) in unusable {
            if !results.iter().any(|r| &r.backend == backend) {
                results.push(synthetic_skip(
                    &format!("{backend}::backend::available"),
                    format!("unavailable on this host: {why}"),
                ));
            }
        }
    }
    results
}

pub fn run(opts: &Options) -> Result<bool> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    if opts.no_build {
        println!("fixtures: not built (--no-build)");
    } else {
        let fx = cellcheck_fixtures::ensure().context("build the fixtures")?;
        println!("fixtures: {}", fx.dir.display());
    }

    let host = probe::load_or_probe()?;
    let class = host.class.clone();
    let m = ClassMatrix::load(&class)?;
    if let Ok(expected) = std::env::var("CELLCHECK_EXPECT_BACKENDS") {
        let want: Vec<String> = expected.split(',').map(|s| s.trim().to_string()).collect();
        if want != m.names() {
            bail!(
                "CELLCHECK_EXPECT_BACKENDS={expected} but matrix/{class}.toml lists {}",
                m.names().join(",")
            );
        }
    }
    let selection = matrix::select(&m, &host);
    let (chosen, shown): (Vec<String>, Vec<Selected>) = if opts.backends.is_empty() {
        let run = selection
            .iter()
            .filter(|s| s.usable)
            .map(|s| s.name.clone())
            .collect();
        (run, selection.clone())
    } else {
        // Asked for by name: run it even if the probe says no; the suite's preflight decides.
        let shown = opts
            .backends
            .iter()
            .map(|b| {
                selection
                    .iter()
                    .find(|s| &s.name == b)
                    .cloned()
                    .unwrap_or(Selected {
                        name: b.clone(),
                        usable: true,
                        why: "asked for with --backend".into(),
                    })
            })
            .collect();
        (opts.backends.clone(), shown)
    };
    let unusable: BTreeMap<String, String> = shown
        .iter()
        .filter(|s| !s.usable && !chosen.contains(&s.name))
        .map(|s| (s.name.clone(), s.why.clone()))
        .collect();
    println!(
        "class {class}: running [{}]; unavailable here [{}]",
        chosen.join(", "),
        unusable.keys().cloned().collect::<Vec<_>>().join(", ")
    );

    // The run's own trials are listed with exactly the run's env and partition, so the
    // selection matches what nextest will run; unusable backends are listed apart, only to
    // show their trials as skipped.
    let mut listed = if chosen.is_empty() {
        Vec::new()
    } else {
        list_trials(&suite_env(&chosen, &class, opts.strict), opts.partition)?
    };
    if !unusable.is_empty() {
        let names: Vec<String> = unusable.keys().cloned().collect();
        for mut l in list_trials(&suite_env(&names, &class, false), None)? {
            l.selected = false;
            listed.push(l);
        }
    }
    let to_run = listed.iter().filter(|l| l.selected).count();

    let results_path = dir.join("results.jsonl");
    let log_path = dir.join("nextest.log");
    for p in [&results_path, &log_path] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
    let env = suite_env(&chosen, &class, opts.strict);
    // The suite records ignored trials when nextest lists them, so they count towards progress.
    let per_round = listed
        .iter()
        .filter(|l| l.selected || (l.ignored && !unusable.contains_key(backend_of(&l.name))))
        .count();
    let total = per_round * opts.repeat as usize;
    let mut runs: Vec<TrialResult> = Vec::new();
    let mut lines_seen = 0;
    let mut nextest_ok = true;
    if to_run > 0 {
        for round in 1..=opts.repeat {
            if opts.repeat > 1 {
                println!("round {round}/{}", opts.repeat);
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("open {}", log_path.display()))?;
            let mut c = nextest_base("run");
            c.arg("--no-fail-fast");
            if let Some((k, n)) = opts.partition {
                c.arg("--partition").arg(format!("count:{k}/{n}"));
            }
            c.envs(env.iter().map(|(k, v)| (k, v)))
                .env("CELLCHECK_RESULTS", &results_path)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let done_before = (round as usize - 1) * per_round;
            let progress = Progress::start(
                results_path.clone(),
                file_len(&results_path),
                done_before,
                total,
            );
            let status = c.status().context("run `cargo nextest run`");
            progress.finish();
            nextest_ok &= status?.success();
            let all = results::read_file(&results_path)?;
            runs.extend(results::last_per_id(all[lines_seen..].to_vec()));
            lines_seen = all.len();
        }
    }

    let folded = results::fold(runs);
    let first_shard = !matches!(opts.partition, Some((k, _)) if k != 1);
    let results = complete(folded, &listed, &unusable, first_shard);

    let expectations = cellcheck_conformance::expectations::Expectations::load(
        &project_root().join("matrix/expectations.toml"),
    )
    .map_err(anyhow::Error::msg)?;
    let listed_ids: BTreeSet<String> = listed.iter().map(|l| l.name.clone()).collect();
    let listed_backends: BTreeSet<String> = chosen.iter().cloned().collect();
    let problems = verdict::judge(&Judged {
        results: &results,
        listed: &listed_ids,
        backends: &listed_backends,
        class: &class,
        expectations: &expectations,
        today: cellcheck_conformance::expectations::today_utc(),
        strict: opts.strict,
        unusable: &unusable,
    });
    let host_json = serde_json::to_value(&host)?;
    let report = Report::new(host_json, shown, results, problems);
    let files = report.write_all(&dir)?;

    println!();
    print!("{}", report.table());
    for f in &files {
        println!("wrote {}", f.display());
    }
    if !nextest_ok && report.summary.fail == 0 && report.summary.xpass == 0 {
        println!(
            "note: nextest exited non-zero without a failing result; see {}",
            log_path.display()
        );
    }
    if report.passed() {
        println!("conformance: passed");
        return Ok(true);
    }
    println!(
        "\nconformance: FAILED ({} problem(s))",
        report.problems.len()
    );
    for p in &report.problems {
        match &p.trial {
            Some(id) => {
                println!("  {} {id}: {}", p.kind, first_line(&p.message));
                if p.kind != ProblemKind::UnexplainedSkip
                    || !unusable.contains_key(id.split("::").next().unwrap_or(""))
                {
                    println!("    rerun: {}", rerun_command(id, &class, opts.strict));
                }
            }
            None => println!("  {}: {}", p.kind, p.message),
        }
    }
    Ok(false)
}

fn backend_of(id: &str) -> &str {
    id.split("::").next().unwrap_or_default()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(s: &str) -> Result<Options, clap::Error> {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            o: Options,
        }
        use clap::Parser;
        T::try_parse_from(std::iter::once("conformance").chain(s.split_whitespace())).map(|t| t.o)
    }

    #[test]
    fn flags_parse_and_bad_ones_are_refused() {
        let o = parse_args(
            "--backend host --backend runc --strict --repeat 3 --partition 2/4 --no-build",
        )
        .unwrap();
        assert_eq!(parse_args("").unwrap().repeat, 1);
        assert_eq!(o.backends, ["host", "runc"]);
        assert!(o.strict && o.no_build);
        assert_eq!(o.repeat, 3);
        assert_eq!(o.partition, Some((2, 4)));
        for bad in [
            "--repeat 0",
            "--partition 5/4",
            "--partition 0/2",
            "--partition x",
            "--backend",
            "--frobnicate",
        ] {
            assert!(parse_args(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rerun_line_names_the_trial_and_its_env() {
        assert_eq!(
            rerun_command("host::exit::code_42", "linux-nokvm", false),
            "CELLCHECK_BACKENDS=host CELLCHECK_HOST_CLASS=linux-nokvm cargo nextest run -p cellcheck-conformance --test conformance -E 'test(=host::exit::code_42)'"
        );
        assert!(
            rerun_command("runsc::a::b", "linux-kvm", true).contains("CELLCHECK_STRICT=1 cargo")
        );
    }

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

    #[test]
    fn missing_results_are_completed_honestly() {
        let listed = vec![
            Listed {
                name: "host::exit::code_0".into(),
                ignored: false,
                selected: true,
            },
            Listed {
                name: "host::exit::code_1".into(),
                ignored: false,
                selected: true,
            },
            Listed {
                name: "host::exit::code_2".into(),
                ignored: false,
                selected: false,
            },
            Listed {
                name: "host::snapshot::x".into(),
                ignored: true,
                selected: false,
            },
            Listed {
                name: "crun::exit::code_0".into(),
                ignored: true,
                selected: false,
            },
        ];
        let ran = vec![crate::results::sample(
            "host::exit::code_0",
            Outcome::Pass,
            "",
            5,
        )];
        let unusable: BTreeMap<String, String> = [
            ("crun".to_string(), "crun: hybrid cgroups".to_string()),
            (
                "apple-vz".to_string(),
                "apple-vz: no implementation yet".to_string(),
            ),
        ]
        .into();
        let r = complete(ran.clone(), &listed, &unusable, true);
        let by = |id: &str| r.iter().find(|x| x.id == id).cloned();
        assert_eq!(by("host::exit::code_1").unwrap().outcome, Outcome::Fail);
        assert!(by("host::exit::code_2").is_none(), "another shard's trial");
        assert_eq!(by("host::snapshot::x").unwrap().outcome, Outcome::Skip);
        assert!(by("crun::exit::code_0")
            .unwrap()
            .reason
            .contains("hybrid cgroups"));
        assert!(by("apple-vz::backend::available")
            .unwrap()
            .reason
            .contains("no implementation"));
        // Later shards do not repeat the skips the first shard reports.
        let r = complete(ran, &listed, &unusable, false);
        assert_eq!(r.len(), 2);
    }
}
