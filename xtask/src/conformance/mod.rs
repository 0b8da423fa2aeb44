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
use crate::install;
use crate::matrix::{self, Selected};
use crate::nextest::{file_len, list_trials, Listed, Progress};
use crate::outside::Target;
use crate::probe;
use crate::report::Report;
use crate::util::out_dir;
use crate::verdict::{self, Judged, ProblemKind};
use cellcheck_conformance::shell_quote;

mod rounds;
pub use rounds::{fill, rounds, Rounds};

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
    /// Do not install missing runtimes (as root with apt, they are installed from Debian's
    /// packages); each missing one's backend is skipped, naming the command that would add it.
    #[arg(long)]
    pub no_install: bool,
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
    plan_after(opts, &[])
}

/// [`plan`] after the runtimes were seen to (`runtimes`: [`install::execute`]'s steps): a backend
/// that cannot run here for want of a runtime says which, and what would add it.
pub fn plan_after(opts: &Options, runtimes: &[install::Step]) -> Result<Plan> {
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
    for s in shown.iter_mut().filter(|s| !s.usable) {
        for hint in runtimes
            .iter()
            .filter(|r| r.runtime.backends.contains(&s.name.as_str()))
            .filter_map(install::Step::hint)
        {
            s.why = format!("{}; {hint}", s.why);
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
    let runtimes = install::runtimes(std::env::consts::ARCH);
    let host = install::Host::current(&runtimes);
    let wanted = install::selected(&opts.backends);
    let steps = install::execute(install::plan(&runtimes, &wanted, &host, opts.no_install));
    if opts.no_build {
        println!("fixtures: not built (--no-build)");
    } else {
        let fx = cellcheck_fixtures::ensure().context("build the fixtures")?;
        println!("fixtures: {}", fx.dir.display());
    }
    let plan = plan_after(opts, &steps)?;
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
mod tests;
