//! `cargo xtask conformance`: build the fixtures, probe, run the suite for this class's backends
//! under nextest, then write every report from the one results file.
//!
//! A run is five steps: [`plan`] (list), [`rounds`], [`fill`], [`judge`], then the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cellcheck_conformance::results::{self, Outcome, TrialResult};
use cellcheck_contract::drivers;

use crate::classes::ClassMatrix;
use crate::matrix::{self, Selected};
use crate::nextest::{file_len, list_trials, Listed, Progress};
use crate::outside::{shell_quote, Target};
use crate::probe;
use crate::report::Report;
use crate::util::out_dir;
use crate::verdict::{self, Judged, ProblemKind};

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
    /// Add the backend the driver CMD serves over the driver protocol, under NAME (its `hello`
    /// must give NAME); repeatable. Its trials get `CELLCHECK_<NAME>_DRIVER=CMD`.
    #[arg(long = "driver", value_name = "NAME=CMD", value_parser = crate::outside::parse_driver)]
    pub drivers: Vec<(String, String)>,
    /// Run the suite test target (`harness = false`) of the crate at PATH under nextest and add
    /// its backends to the matrix; repeatable.
    #[arg(long = "crate", value_name = "PATH")]
    pub crates: Vec<PathBuf>,
    /// Only the trials this nextest filterset selects (e.g. 'test(/::lifecycle::/)').
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
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

/// The env every suite process of this run gets: the selection, the class, strictness and
/// each driver's own variable.
fn suite_env(
    backends: &[String],
    class: &str,
    strict: bool,
    drivers: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("CELLCHECK_BACKENDS".to_string(), backends.join(",")),
        ("CELLCHECK_HOST_CLASS".to_string(), class.to_string()),
    ];
    if strict {
        env.push(("CELLCHECK_STRICT".into(), "1".into()));
    }
    for (name, cmd) in drivers {
        env.push((drivers::env_var(name), cmd.clone()));
    }
    env
}

/// The one line that reruns exactly one trial of `target` with the env it needs: the suite's own
/// [`cellcheck_conformance::rerun_command`] over xtask's env and `run_env` (what this run gives
/// the target's processes), for results the suite did not write (it records its own for every
/// failure). The suite narrows the selection to the trial's backend and drops other drivers.
pub fn rerun_command(id: &str, target: &Target, run_env: &[(String, String)]) -> String {
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    // What selected it in the suite's process, over what the user set.
    env.remove("CELLCHECK_STRICT");
    env.extend(run_env.iter().cloned());
    let line =
        cellcheck_conformance::rerun_command(id, &target.package, &target.test, env.into_iter());
    match &target.dir {
        None => line,
        Some(d) => format!("cd {} && {line}", shell_quote(&d.display().to_string())),
    }
}

/// Gives every failing result its rerun line (the suite's, else [`Plan::rerun`]).
fn with_reruns(mut results: Vec<TrialResult>, plan: &Plan) -> Vec<TrialResult> {
    for r in &mut results {
        if r.rerun.is_empty()
            && matches!(r.outcome, Outcome::Fail | Outcome::Xpass | Outcome::Flaky)
        {
            r.rerun = plan.rerun(&r.id);
        }
    }
    results
}

/// A skipped result xtask writes itself, for trials the suite did not record.
fn synthetic_skip(id: &str, reason: String) -> TrialResult {
    results::synthetic(id, Outcome::Skip, reason)
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
    // The suite records ignored trials when nextest lists them, filter or not: a trial the
    // run's filter leaves out is not this run's.
    let filtered: BTreeSet<&str> = listed
        .iter()
        .filter(|l| l.filtered_out)
        .map(|l| l.name.as_str())
        .collect();
    results.retain(|r| !filtered.contains(r.id.as_str()));
    let seen: BTreeSet<String> = results.iter().map(|r| r.id.clone()).collect();
    for l in listed {
        if seen.contains(&l.name) || l.filtered_out {
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

/// What a run will do, decided before anything runs: the class, its backends, the listing.
pub struct Plan {
    pub host: probe::HostReport,
    pub class: String,
    /// The class's backends (or the asked-for ones) and whether this host can run them.
    pub shown: Vec<Selected>,
    /// The backends this run runs.
    pub chosen: Vec<String>,
    /// Backends shown but not run, with why.
    pub unusable: BTreeMap<String, String>,
    pub listed: Vec<Listed>,
    pub strict: bool,
    pub partition: Option<(u32, u32)>,
    /// Drivers (name, command), run in this repository's suite under their own names; their
    /// names are among `chosen`.
    pub drivers: Vec<(String, String)>,
    /// Outside crates' test targets and the backends each lists (their trials are in `listed`).
    pub outside: Vec<(Target, Vec<String>)>,
    pub filter: Option<String>,
}

impl Plan {
    /// The env every process of this repository's suite gets in this run.
    pub fn env(&self) -> Vec<(String, String)> {
        suite_env(&self.chosen, &self.class, self.strict, &self.drivers)
    }

    /// Every test target of this run with the env its processes get.
    pub fn targets(&self) -> Vec<(Target, Vec<(String, String)>)> {
        let mut out = Vec::new();
        if !self.chosen.is_empty() {
            out.push((Target::suite(), self.env()));
        }
        for (t, _) in &self.outside {
            out.push((t.clone(), outside_env(&self.class, self.strict)));
        }
        out
    }

    /// The command that reruns trial `id` alone.
    pub fn rerun(&self, id: &str) -> String {
        let b = backend_of(id);
        match self
            .outside
            .iter()
            .find(|(_, bs)| bs.iter().any(|x| x == b))
        {
            Some((t, _)) => rerun_command(id, t, &outside_env(&self.class, self.strict)),
            None => rerun_command(id, &Target::suite(), &self.env()),
        }
    }

    /// Every backend of this run (built-in, drivers, outside crates').
    pub fn backends(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.chosen.iter().cloned().collect();
        for (_, bs) in &self.outside {
            all.extend(bs.iter().cloned());
        }
        all
    }

    fn first_shard(&self) -> bool {
        !matches!(self.partition, Some((k, _)) if k != 1)
    }
}

/// The env an outside crate's suite processes get: every backend it registers runs.
fn outside_env(class: &str, strict: bool) -> Vec<(String, String)> {
    suite_env(&[], class, strict, &[])
}

/// Step 1, list: fixtures, probe, the class's backends against this host, drivers and outside
/// crates, and nextest's listing of each.
pub fn plan(opts: &Options) -> Result<Plan> {
    let (strict, partition, filter) = (opts.strict, opts.partition, opts.filter.as_deref());
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
    let builtin = cellcheck_registry::Registry::builtin().names();
    let mut outside_names: Vec<String> = Vec::new();
    for (name, cmd) in &opts.drivers {
        if builtin.contains(name) || outside_names.contains(name) {
            bail!("--driver {name}={cmd}: backend {name:?} already exists in this run");
        }
        crate::outside::check_driver(name, cmd)?;
        outside_names.push(name.clone());
    }
    // Outside crates are listed first: their backend names are known only from their listing.
    let mut outside = Vec::new();
    let mut outside_listed = Vec::new();
    for dir in &opts.crates {
        let t = Target::outside(dir)?;
        println!("outside crate: {}", t.describe());
        let listed = list_trials(&t, &outside_env(&class, strict), partition, filter)?;
        let mut names: Vec<String> = listed
            .iter()
            .map(|l| backend_of(&l.name).to_string())
            .collect();
        names.dedup();
        if names.is_empty() {
            bail!("{}: its suite lists no trial", t.describe());
        }
        for n in &names {
            if builtin.contains(n) || outside_names.contains(n) {
                bail!(
                    "{}: its backend {n:?} has the name of another backend of this run",
                    t.describe()
                );
            }
        }
        outside_names.extend(names.iter().cloned());
        outside_listed.extend(listed);
        outside.push((t, names));
    }
    // `--backend` picks built-in backends; naming a driver's or outside crate's backend keeps it
    // (it runs anyway) without adding any built-in one.
    let backends: Vec<String> = opts
        .backends
        .iter()
        .filter(|b| !outside_names.contains(b))
        .cloned()
        .collect();
    let selection = matrix::select(&m, &host);
    let (mut chosen, mut shown): (Vec<String>, Vec<Selected>) = if opts.backends.is_empty() {
        let run = selection
            .iter()
            .filter(|s| s.usable)
            .map(|s| s.name.clone())
            .collect();
        (run, selection.clone())
    } else {
        // Asked for by name: run it even if the probe says no; the suite's preflight decides.
        let shown = backends
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
        (backends.to_vec(), shown)
    };
    for (name, cmd) in &opts.drivers {
        chosen.push(name.clone());
        shown.push(Selected {
            name: name.clone(),
            usable: true,
            why: format!("driver {}={cmd:?}", drivers::env_var(name)),
        });
    }
    for (t, names) in &outside {
        for n in names {
            shown.push(Selected {
                name: n.clone(),
                usable: true,
                why: t.describe(),
            });
        }
    }
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
    let suite = Target::suite();
    let mut listed = if chosen.is_empty() {
        Vec::new()
    } else {
        list_trials(
            &suite,
            &suite_env(&chosen, &class, strict, &opts.drivers),
            partition,
            filter,
        )?
    };
    if !unusable.is_empty() {
        let names: Vec<String> = unusable.keys().cloned().collect();
        for mut l in list_trials(&suite, &suite_env(&names, &class, false, &[]), None, filter)? {
            l.selected = false;
            listed.push(l);
        }
    }
    listed.extend(outside_listed);
    Ok(Plan {
        host,
        class,
        shown,
        chosen,
        unusable,
        listed,
        strict,
        partition,
        drivers: opts.drivers.clone(),
        outside,
        filter: filter.map(String::from),
    })
}

/// What `repeat` nextest runs recorded.
pub struct Rounds {
    /// Each round's results (the last line per trial within the round).
    pub per_round: Vec<Vec<TrialResult>>,
    /// Whether every nextest run exited 0.
    pub nextest_ok: bool,
    pub log: PathBuf,
}

/// Step 2, rounds: runs the plan's trials `repeat` times under nextest, showing progress.
pub fn rounds(plan: &Plan, repeat: u32, dir: &Path) -> Result<Rounds> {
    let results_path = dir.join("results.jsonl");
    let log_path = dir.join("nextest.log");
    // The suite writes its audit lines beside the results file.
    for p in [&results_path, &log_path, &audit_path(dir)] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
    let mut out = Rounds {
        per_round: Vec::new(),
        nextest_ok: true,
        log: log_path.clone(),
    };
    if !plan.listed.iter().any(|l| l.selected) {
        return Ok(out);
    }
    // The suite records ignored trials when nextest lists them, so they count towards progress.
    let per_round = plan
        .listed
        .iter()
        .filter(|l| {
            l.selected
                || (l.ignored
                    && !l.filtered_out
                    && !plan.unusable.contains_key(backend_of(&l.name)))
        })
        .count();
    let total = per_round * repeat as usize;
    let mut lines_seen = 0;
    for round in 1..=repeat {
        if repeat > 1 {
            println!("round {round}/{repeat}");
        }
        let done_before = (round as usize - 1) * per_round;
        let progress = Progress::start(
            results_path.clone(),
            file_len(&results_path),
            done_before,
            total,
        );
        // One target after the other: each process set of a target gets the env of its own.
        let mut status = Ok(true);
        for (target, env) in plan.targets() {
            status = run_target(plan, &target, &env, dir, &results_path, &log_path);
            match &status {
                Ok(ok) => out.nextest_ok &= ok,
                Err(_) => break,
            }
        }
        progress.finish();
        status?;
        let all = results::read_file(&results_path).map_err(anyhow::Error::msg)?;
        out.per_round
            .push(results::last_per_id(all[lines_seen..].to_vec()));
        lines_seen = all.len();
    }
    Ok(out)
}

/// One `cargo nextest run` of `target`, its output appended to the log.
fn run_target(
    plan: &Plan,
    target: &Target,
    env: &[(String, String)],
    dir: &Path,
    results_path: &Path,
    log_path: &Path,
) -> Result<bool> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut c = target.nextest("run", plan.filter.as_deref());
    c.arg("--no-fail-fast");
    if let Some((k, n)) = plan.partition {
        c.arg("--partition").arg(format!("count:{k}/{n}"));
    }
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .env("CELLCHECK_RESULTS", results_path)
        .env("CELLCHECK_AUDIT_RESULTS", audit_path(dir))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = c
        .status()
        .with_context(|| format!("run `cargo nextest run` of {}", target.describe()))?;
    Ok(status.success())
}

/// Step 3, fill: one result per trial (repeats folded), completed with what no trial recorded.
pub fn fill(plan: &Plan, rounds: &Rounds) -> Vec<TrialResult> {
    let folded = results::fold(rounds.per_round.concat());
    with_reruns(
        complete(folded, &plan.listed, &plan.unusable, plan.first_shard()),
        plan,
    )
}

/// What the expectations are checked against: the backends of this run with the trials the suite
/// listed for them, and every other backend in `known` with the whole scenario set (the suite
/// lists every scenario for every backend, run or skipped).
pub fn catalog(
    listed: &BTreeSet<String>,
    run: &BTreeSet<String>,
    known: &[String],
) -> cellcheck_conformance::expectations::Catalog {
    let all: BTreeSet<String> = cellcheck_conformance::scenarios::all()
        .iter()
        .map(|s| s.path())
        .collect();
    let mut c: cellcheck_conformance::expectations::Catalog =
        known.iter().map(|k| (k.clone(), all.clone())).collect();
    for b in run {
        let prefix = format!("{b}::");
        c.insert(
            b.clone(),
            listed
                .iter()
                .filter_map(|id| id.strip_prefix(&prefix).map(String::from))
                .collect(),
        );
    }
    c
}

/// Step 4, judge: why the run fails, from its results and the expectations.
pub fn judge(plan: &Plan, results: &[TrialResult]) -> Result<Vec<verdict::Problem>> {
    use cellcheck_conformance::expectations::Expectations;
    // The file the suite read (CELLCHECK_EXPECTATIONS or the repository's), checked by the
    // suite's own function; its entry problems become the verdict's.
    let default = Expectations::repository_file();
    let (path, required) = Expectations::source(Some(&default)).unwrap_or((default.clone(), false));
    let listed_ids: BTreeSet<String> = plan.listed.iter().map(|l| l.name.clone()).collect();
    let listed_backends = plan.backends();
    let known = cellcheck_registry::Registry::builtin()
        .with_env_drivers()
        .names();
    let catalog = catalog(&listed_ids, &listed_backends, &known);
    let today = cellcheck_conformance::expectations::today_utc();
    let expectations = Expectations::read(&path, required)?;
    Ok(verdict::judge(&Judged {
        results,
        listed: &listed_ids,
        backends: &listed_backends,
        class: &plan.class,
        expectations: &expectations,
        expectations_file: &path,
        catalog: &catalog,
        today,
        strict: plan.strict,
        unusable: &plan.unusable,
    }))
}

pub fn run(opts: &Options) -> Result<bool> {
    run_in(opts, &out_dir())
}

/// [`run`], writing the results and every report under `dir`.
pub fn run_in(opts: &Options, dir: &Path) -> Result<bool> {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    if opts.no_build {
        println!("fixtures: not built (--no-build)");
    } else {
        let fx = cellcheck_fixtures::ensure().context("build the fixtures")?;
        println!("fixtures: {}", fx.dir.display());
    }
    let plan = plan(opts)?;
    let rounds = rounds(&plan, opts.repeat, &dir)?;
    let results = fill(&plan, &rounds);
    let problems = judge(&plan, &results)?;
    report(&plan, &rounds, results, problems, &dir)
}

/// Step 5, report: every report file, the console table and the verdict.
fn report(
    plan: &Plan,
    rounds: &Rounds,
    results: Vec<TrialResult>,
    problems: Vec<verdict::Problem>,
    dir: &Path,
) -> Result<bool> {
    let host_json = serde_json::to_value(&plan.host)?;
    let mut report = Report::new(host_json, plan.shown.clone(), results, problems);
    let lines =
        cellcheck_conformance::audit::read_lines(&audit_path(dir)).map_err(anyhow::Error::msg)?;
    report.host_audit = cellcheck_conformance::audit::per_backend(&lines);
    report.partition = plan.partition.map(|(k, n)| format!("{k}/{n}"));
    let files = report.write_all(dir)?;

    println!();
    print!("{}", report.table());
    for f in &files {
        println!("wrote {}", f.display());
    }
    if !rounds.nextest_ok && report.summary.fail == 0 && report.summary.xpass == 0 {
        println!(
            "note: nextest exited non-zero without a failing result; see {}",
            rounds.log.display()
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
                    || !plan.unusable.contains_key(backend_of(id))
                {
                    let recorded = report
                        .results
                        .iter()
                        .find(|r| &r.id == id && !r.rerun.is_empty())
                        .map(|r| r.rerun.clone());
                    println!("    rerun: {}", recorded.unwrap_or_else(|| plan.rerun(id)));
                }
            }
            None => println!("  {}: {}", p.kind, p.message),
        }
    }
    Ok(false)
}

/// The suite's audit lines (`audit.jsonl` beside `CELLCHECK_RESULTS`).
fn audit_path(dir: &Path) -> PathBuf {
    dir.join("audit.jsonl")
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
        let suite = Target::suite();
        let line = rerun_command(
            "host::exit::code_42",
            &suite,
            &suite_env(&["host".into()], "linux-nokvm", false, &[]),
        );
        assert!(line.starts_with("CELLCHECK_BACKENDS=host "), "{line}");
        assert!(
            line.contains(" CELLCHECK_HOST_CLASS=linux-nokvm "),
            "{line}"
        );
        assert!(line.ends_with(" cargo nextest run -p cellcheck-conformance --test conformance -E 'test(=host::exit::code_42)'"), "{line}");
        assert!(!line.contains("CELLCHECK_STRICT"), "{line}");
        assert!(rerun_command(
            "runsc::a::b",
            &suite,
            &suite_env(&["runsc".into()], "linux-kvm", true, &[])
        )
        .contains("CELLCHECK_STRICT=1 cargo"));
        // Two drivers side by side: each trial's line carries its own driver only.
        let drivers = [
            ("one".to_string(), "python3 one.py".to_string()),
            ("two-py".to_string(), "./two".to_string()),
        ];
        let env = suite_env(
            &["host".into(), "one".into(), "two-py".into()],
            "c",
            false,
            &drivers,
        );
        let one = rerun_command("one::exit::code_0", &suite, &env);
        assert!(one.starts_with("CELLCHECK_BACKENDS=one "), "{one}");
        assert!(
            one.contains(" CELLCHECK_ONE_DRIVER='python3 one.py' cargo nextest run -p cellcheck-conformance --test conformance -E 'test(=one::exit::code_0)'"),
            "{one}"
        );
        let two = rerun_command("two-py::exit::code_0", &suite, &env);
        assert!(two.contains("CELLCHECK_TWO_PY_DRIVER=./two "), "{two}");
        assert!(!two.contains("one.py"), "{two}");
        assert!(!rerun_command("host::a::b", &suite, &env).contains("_DRIVER"));
        // An outside crate's trial reruns from its directory.
        let outside = Target {
            dir: Some("/src/my crate".into()),
            package: "mine".into(),
            test: "conformance".into(),
        };
        let line = rerun_command("mine::a::b", &outside, &outside_env("c", false));
        assert!(
            line.starts_with("cd '/src/my crate' && CELLCHECK_BACKENDS=mine "),
            "{line}"
        );
        assert!(
            line.ends_with(" cargo nextest run -p mine --test conformance -E 'test(=mine::a::b)'"),
            "{line}"
        );
    }

    #[test]
    fn driver_and_crate_flags_parse() {
        let o = parse_args("--driver a=python3 --driver b-2=./drv --crate x/y --filter test(/a/)")
            .unwrap();
        assert_eq!(
            o.drivers,
            [
                ("a".into(), "python3".into()),
                ("b-2".into(), "./drv".into())
            ]
        );
        assert_eq!(o.crates, [PathBuf::from("x/y")]);
        assert_eq!(o.filter.as_deref(), Some("test(/a/)"));
        assert!(parse_args("--driver A=x").is_err());
        assert!(parse_args("--driver a").is_err());
    }

    #[test]
    fn missing_results_are_completed_honestly() {
        let listed = vec![
            Listed {
                name: "host::exit::code_0".into(),
                ignored: false,
                selected: true,
                filtered_out: false,
            },
            Listed {
                name: "host::exit::code_1".into(),
                ignored: false,
                selected: true,
                filtered_out: false,
            },
            Listed {
                name: "host::exit::code_2".into(),
                ignored: false,
                selected: false,
                filtered_out: false,
            },
            Listed {
                name: "host::snapshot::x".into(),
                ignored: true,
                selected: false,
                filtered_out: false,
            },
            Listed {
                name: "host::snapshot::filtered".into(),
                ignored: true,
                selected: false,
                filtered_out: true,
            },
            Listed {
                name: "crun::exit::code_0".into(),
                ignored: true,
                selected: false,
                filtered_out: false,
            },
        ];
        let ran = vec![
            crate::util::sample("host::exit::code_0", Outcome::Pass, "", 5),
            crate::util::sample("host::snapshot::filtered", Outcome::Skip, "no snapshots", 0),
        ];
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
        assert!(
            by("host::snapshot::filtered").is_none(),
            "left out by the filter"
        );
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
