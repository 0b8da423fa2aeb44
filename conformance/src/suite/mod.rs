//! The suite: registered backends × scenarios → libtest-mimic trials.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use cellcheck_contract::{Availability, Backend};
use cellcheck_fixtures::Fixtures;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::expectations::{self, Catalog, Expectations, ExpectationsError, ExpectedOutcome};
use crate::harness::{self, RunReport, Scenario};
use crate::results::{self, Outcome, ResultLine};

mod contract;
mod rerun;
mod trial;
use contract::{Gate, Pending};
use rerun::rerun_hint;
pub use rerun::{rerun_command, shell_quote};
use trial::make_trial;
pub use trial::{run_scenario, run_scenario_bounded};

type PlainFactory = Box<dyn Fn() -> Arc<dyn Backend>>;
type FixtureFactory = Box<dyn Fn(&Fixtures) -> Arc<dyn Backend>>;

enum Factory {
    Plain(PlainFactory),
    WithFixtures {
        name: String,
        f: FixtureFactory,
        /// What the user set to add it (see [`Suite::configured_backend`]).
        configured_by: Option<String>,
    },
}

/// A set of backends to run the scenario set against.
pub struct Suite {
    backends: Vec<Factory>,
    scenarios: Vec<Scenario>,
    /// The expectations file when `CELLCHECK_EXPECTATIONS` is not set.
    expectations: Option<std::path::PathBuf>,
}

impl Default for Suite {
    fn default() -> Self {
        Self::new()
    }
}

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// One runtime per process, shared by every trial: a backend's background tasks (reapers, waits)
/// outlive the trial that started them, so they must not die with a per-trial runtime.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .thread_name("cellcheck")
            .build()
            .expect("building the tokio runtime")
    })
}

/// The family and scenario of each backend's reasons trial, `{backend}::suite::skips_and_known_failures`:
/// it prints every trial of the backend that is skipped here or expected to fail, with the
/// reasons, grouped. nextest never shows an ignored trial's reason (a skipped trial is only counted
/// as SKIP), nor the output of a passing one unless configured, so the repository's nextest config
/// shows this trial's output (`success-output = "immediate"`); the skipped trials stay skips and
/// the known failures stay runs whose failure is expected. It records no result: the reports carry
/// each trial's reason already, and `cargo xtask` leaves it out.
pub const REASONS_TRIAL: &str = "suite::skips_and_known_failures";

/// What a trial will do, decided at listing time.
#[derive(Debug, Clone)]
enum Plan {
    Run {
        known_failure: Option<String>,
    },
    /// Listed as ignored. `by_expectation`: an expectation said so (a forced run then runs it).
    Skip {
        reason: String,
        by_expectation: bool,
    },
    Fail(String),
}

impl Suite {
    /// A suite with every built-in scenario and no backend.
    pub fn new() -> Self {
        Suite {
            backends: Vec::new(),
            scenarios: crate::scenarios::all(),
            expectations: None,
        }
    }

    /// Read known failures and justified skips from `path` (see [`crate::expectations`]) when
    /// `CELLCHECK_EXPECTATIONS` does not name another file; a missing file means none. Without
    /// it a suite reads only `CELLCHECK_EXPECTATIONS`.
    pub fn expectations_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.expectations = Some(path.into());
        self
    }

    /// The expectations of this run, checked against this suite's backends and scenarios (an
    /// unknown backend, a glob matching no trial, an expired entry, an unknown field are errors).
    pub fn load_expectations(&self) -> Result<Expectations, ExpectationsError> {
        let Some((path, required)) = Expectations::source(self.expectations.as_deref()) else {
            return Ok(Expectations::default());
        };
        let paths: std::collections::BTreeSet<String> =
            self.scenarios.iter().map(|s| s.path()).collect();
        let catalog: Catalog = self
            .names()
            .into_iter()
            .map(|n| (n, paths.clone()))
            .collect();
        Expectations::load_checked(&path, required, &catalog, expectations::today_utc())
    }

    /// Register a backend by factory. The factory runs lazily, once per process, and must be cheap
    /// (no I/O): the suite calls it only when a selected trial belongs to it.
    pub fn backend<F>(mut self, factory: F) -> Self
    where
        F: Fn() -> Arc<dyn Backend> + 'static,
    {
        self.backends.push(Factory::Plain(Box::new(factory)));
        self
    }

    /// Register a backend that needs the built fixtures (rootfs, probe, init). `name` must equal
    /// the backend's [`Backend::name`]; it is known before the fixtures are built, so a fixture
    /// build error fails this backend's trials instead of hiding them.
    pub fn backend_with_fixtures<F>(mut self, name: &str, factory: F) -> Self
    where
        F: Fn(&Fixtures) -> Arc<dyn Backend> + 'static,
    {
        self.backends.push(Factory::WithFixtures {
            name: name.to_string(),
            f: Box::new(factory),
            configured_by: None,
        });
        self
    }

    /// Register a backend the user configured through `what` (e.g. `CELLCHECK_REMOTE_DRIVER="cmd"`),
    /// as [`Suite::backend_with_fixtures`] does. The user asked for it, so if it is unavailable (a
    /// driver that exits, hangs or answers garbage at its handshake) its trials fail, naming `what`
    /// and the reason, even without strict mode; a built-in backend the host cannot run stays a skip.
    pub fn configured_backend<F>(mut self, name: &str, what: &str, factory: F) -> Self
    where
        F: Fn(&Fixtures) -> Arc<dyn Backend> + 'static,
    {
        self.backends.push(Factory::WithFixtures {
            name: name.to_string(),
            f: Box::new(factory),
            configured_by: Some(what.to_string()),
        });
        self
    }

    /// Replace the scenario set (e.g. a subset for a focused run).
    pub fn with_scenarios(mut self, scenarios: Vec<Scenario>) -> Self {
        self.scenarios = scenarios;
        self
    }

    /// Parse the command line (libtest conventions), list or run, and return the exit code.
    pub fn run_from_args(self) -> ExitCode {
        // Before any thread exists: the canary changes this process's env.
        crate::ids::canary();
        harness::sentinels();
        let args = Arguments::from_args();
        // A selection naming no registered backend would list and run nothing, and "0 passed"
        // is a green run the user never asked for.
        if let Err(e) = check_selection(
            std::env::var("CELLCHECK_BACKENDS").ok().as_deref(),
            &self.names(),
        ) {
            eprintln!("cellcheck: {e}");
            return ExitCode::FAILURE;
        }
        // Wrong expectations would fail every trial alike: one clear error instead.
        if let Err(e) = self.load_expectations() {
            eprintln!("cellcheck: expectations cannot be used:\n{e}");
            return ExitCode::FAILURE;
        }
        if let Err(e) = crate::trace::install() {
            eprintln!("cellcheck: {e}");
            return ExitCode::FAILURE;
        }
        if let Err(e) = crate::ledger::ensure_dir(&crate::ledger::dir()) {
            eprintln!("cellcheck: {e}");
            return ExitCode::FAILURE;
        }
        let trials = self.trials(&args);
        libtest_mimic::run(&args, trials).exit_code()
    }

    /// The names of the registered backends (a plain factory is constructed to learn its name,
    /// cheap by contract).
    pub fn names(&self) -> Vec<String> {
        self.backends
            .iter()
            .map(|f| match f {
                Factory::Plain(f) => f().name().to_string(),
                Factory::WithFixtures { name, .. } => name.clone(),
            })
            .collect()
    }

    /// Build the trials for `args`: one per (selected backend, scenario).
    pub fn trials(self, args: &Arguments) -> Vec<Trial> {
        crate::ids::canary();
        harness::sentinels();
        let selected: Option<Vec<String>> = std::env::var("CELLCHECK_BACKENDS")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
        let strict = std::env::var("CELLCHECK_STRICT").is_ok_and(|v| v == "1");
        let class = expectations::host_class();
        let (exps, exp_error) = match self.load_expectations() {
            Ok(e) => (e, None),
            Err(e) => (Expectations::default(), Some(e)),
        };
        let mut fixtures: Option<Result<Fixtures, String>> = None;
        let mut trials: Vec<Pending> = Vec::new();
        let mut gates: Vec<Gate> = Vec::new();
        // The backends built for this run, by name: the ledger's recovery destroys through them.
        let mut built: Vec<Arc<dyn Backend>> = Vec::new();

        for factory in &self.backends {
            let (known_name, configured_by) = match factory {
                Factory::Plain(_) => (None, None),
                Factory::WithFixtures {
                    name,
                    configured_by,
                    ..
                } => (Some(name.clone()), configured_by.clone()),
            };
            // A plain factory is constructed to learn its name (cheap by contract).
            let plain = match factory {
                Factory::Plain(f) => Some(f()),
                Factory::WithFixtures { .. } => None,
            };
            let name = known_name
                .or_else(|| plain.as_ref().map(|b| b.name().to_string()))
                .unwrap_or_default();
            if let Some(sel) = &selected {
                if !sel.iter().any(|s| s == &name) {
                    continue;
                }
            }
            let trial_names: Vec<String> = self
                .scenarios
                .iter()
                .map(|s| format!("{name}::{}::{}", s.family, s.name))
                .collect();
            let reasons_name = format!("{name}::{REASONS_TRIAL}");
            let wanted = trial_names
                .iter()
                .chain([&reasons_name])
                .any(|n| selected_by_filter(args, n));
            if !wanted {
                // Listed (so filters see consistent names) but never run: no fixtures, no preflight.
                for n in trial_names.into_iter().chain([reasons_name]) {
                    trials.push(Pending::Built(Trial::test(n, || Ok(()))));
                }
                continue;
            }

            // Fixtures, then the backend, then its (cached) preflight.
            let fx = fixtures
                .get_or_insert_with(|| cellcheck_fixtures::ensure().map_err(|e| e.to_string()))
                .clone();
            // Every backend's trials need the probe in the cell's root, so a fixture build
            // error fails them all (with the error) rather than skipping them.
            let backend: Result<Arc<dyn Backend>, String> = match &fx {
                Err(e) => Err(format!("fixture build failed: {e}")),
                // A backend built from the fixtures gets its own copy of the rootfs, so a
                // change in it is its own (see `roots`).
                Ok(fx) => match (factory, plain) {
                    (_, Some(b)) => Ok(b),
                    (Factory::WithFixtures { f, .. }, None) => {
                        crate::roots::fixtures_for(&name, fx).map(|fx| f(&fx))
                    }
                    (Factory::Plain(f), None) => Ok(f()),
                },
            };
            let mut gate = None;
            let availability = match &backend {
                Ok(b) => {
                    let key = crate::preflight::config_key(
                        &**b,
                        &crate::preflight::fixtures_key(fx.as_ref().ok()),
                    );
                    let b2 = b.clone();
                    let k2 = key.clone();
                    let (a, _cached) = runtime()
                        .block_on(async move { crate::preflight::preflight(&*b2, &k2).await });
                    if exp_error.is_none() {
                        gate = contract::gate_for(
                            b,
                            &a,
                            &self.scenarios,
                            &trial_names,
                            &exps,
                            &class,
                            &key,
                            args,
                        );
                    }
                    Some(a)
                }
                Err(_) => None,
            };
            // Its trials (the check's aside) wait for the check's answer (see `contract`).
            let gate = gate.map(|g| {
                gates.push(g);
                gates.len() - 1
            });
            if let Ok(b) = &backend {
                built.push(b.clone());
            }
            let caps = backend.as_ref().ok().map(|b| b.capabilities());
            let attributes = backend.as_ref().map(|b| b.attributes()).unwrap_or_default();
            let mut notes: Vec<Note> = Vec::new();

            for sc in &self.scenarios {
                let trial_name = format!("{name}::{}::{}", sc.family, sc.name);
                let exp = exps.lookup(&name, &class, &sc.path());
                let plan = if let Some(e) = &exp_error {
                    Plan::Fail(format!("cannot read expectations: {e}"))
                } else if let Err(e) = &backend {
                    Plan::Fail(e.clone())
                } else if let Some(e) = exp.filter(|e| e.outcome == ExpectedOutcome::Skip) {
                    Plan::Skip {
                        reason: format!("expected skip: {}", e.describe()),
                        by_expectation: true,
                    }
                } else {
                    let unavailable = match &availability {
                        Some(Availability::Unavailable { reason }) => {
                            Some(format!("backend unavailable: {reason}"))
                        }
                        _ => None,
                    };
                    let missing = caps.as_ref().and_then(|c| sc.missing_capability(c));
                    // Strict mode is for "could not run": a backend the host cannot run. A
                    // capability the backend declares unsupported (with its reason) stays a skip.
                    match (unavailable, missing) {
                        (Some(reason), _) if configured_by.is_some() => Plan::Fail(format!(
                            "backend {name:?}, configured by {}, does not work: {reason}",
                            configured_by.as_deref().unwrap_or_default()
                        )),
                        (Some(reason), _) if strict => Plan::Fail(format!(
                            "strict mode (CELLCHECK_STRICT=1): this trial would be skipped: {reason}"
                        )),
                        (Some(reason), _) | (None, Some(reason)) => Plan::Skip {
                            reason,
                            by_expectation: false,
                        },
                        (None, None) => Plan::Run {
                            known_failure: exp
                                .filter(|e| e.outcome == ExpectedOutcome::KnownFailure)
                                .map(|e| e.describe()),
                        },
                    }
                };
                match &plan {
                    Plan::Skip { reason, .. } => notes.push(Note {
                        known_failure: false,
                        reason: reason.clone(),
                        path: sc.path(),
                    }),
                    Plan::Run {
                        known_failure: Some(why),
                    } => notes.push(Note {
                        known_failure: true,
                        reason: why.clone(),
                        path: sc.path(),
                    }),
                    _ => {}
                }
                let base = ResultLine {
                    id: trial_name.clone(),
                    backend: name.clone(),
                    family: sc.family.to_string(),
                    scenario: sc.name.to_string(),
                    outcome: Outcome::Skip,
                    reason: String::new(),
                    duration_ms: 0,
                    attributes: attributes.clone(),
                    rerun: String::new(),
                };
                trials.push(Pending::Scenario {
                    gate: gate.filter(|_| sc.path() != contract::CHECK),
                    name: trial_name,
                    sc: *sc,
                    backend: backend.as_ref().ok().cloned(),
                    plan,
                    base: Box::new(base),
                });
            }
            let text = reasons_text(&name, self.scenarios.len(), &notes);
            trials.push(Pending::Built(Trial::test(reasons_name, move || {
                println!("{text}");
                Ok(())
            })));
        }
        // What dead harnesses left is recovered before any cell runs, the checks' included.
        recover_from_ledger(&built);
        contract::finish(trials, gates, args)
    }
}

/// A trial that does not simply run: skipped here, or expected to fail.
struct Note {
    known_failure: bool,
    reason: String,
    path: String,
}

/// What the reasons trial prints: a count line, then each reason once with its trials.
fn reasons_text(backend: &str, total: usize, notes: &[Note]) -> String {
    let skips = notes.iter().filter(|n| !n.known_failure).count();
    let known = notes.len() - skips;
    let mut out =
        format!("{backend}: {total} trials, {skips} skipped here, {known} expected to fail");
    // Reasons in first-seen order, each with every trial it covers.
    let mut groups: Vec<(bool, &str, Vec<&str>)> = Vec::new();
    for n in notes {
        match groups
            .iter_mut()
            .find(|(k, r, _)| *k == n.known_failure && *r == n.reason)
        {
            Some(g) => g.2.push(&n.path),
            None => groups.push((n.known_failure, &n.reason, vec![&n.path])),
        }
    }
    for (known_failure, reason, paths) in groups {
        let kind = if known_failure {
            "known failure"
        } else {
            "skip"
        };
        out.push_str(&format!(
            "\n{kind} ({}): {reason}\n    {}",
            paths.len(),
            paths.join(", ")
        ));
    }
    out
}

/// `CELLCHECK_BACKENDS` (comma-separated; unset or blank selects all) against the registered
/// names: an error naming every unknown name and the known ones.
pub fn check_selection(selection: Option<&str>, known: &[String]) -> Result<(), String> {
    let Some(sel) = selection.filter(|s| !s.trim().is_empty()) else {
        return Ok(());
    };
    let unknown: Vec<&str> = sel
        .split(',')
        .map(str::trim)
        .filter(|n| !known.iter().any(|k| k == n))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(format!(
        "CELLCHECK_BACKENDS={sel:?} names unknown backend(s): {}; known: {}",
        unknown
            .iter()
            .map(|n| if n.is_empty() { "\"\" (empty)" } else { n })
            .collect::<Vec<_>>()
            .join(", "),
        known.join(", ")
    ))
}

/// Reconcile what dead harnesses left (see [`crate::ledger`]), before any trial runs: through
/// the backends of this run where the name matches, by record otherwise; then the rootfs copies
/// of dead harnesses (see [`crate::roots`]). Each recovered cell is
/// printed and recorded as an audit line of kind `recovered`.
fn recover_from_ledger(built: &[Arc<dyn Backend>]) {
    let mut found = crate::ledger::reconcile(&crate::ledger::dir(), &|name| {
        built.iter().find(|b| b.name() == name).cloned()
    });
    found.extend(crate::roots::reconcile(&crate::roots::dir()));
    for r in found {
        if r.removed.is_empty() && r.errors.is_empty() {
            continue;
        }
        eprintln!("{}", crate::ledger::describe(&r));
        crate::audit::AuditLine::Recovered(r).record();
    }
}

fn selected_by_filter(args: &Arguments, name: &str) -> bool {
    // A probe trial marked ignored, so `--ignored` alone never rules the name out.
    let probe = Trial::test(name, || Ok(())).with_ignored_flag(true);
    !args.is_filtered_out(&probe)
}

#[cfg(test)]
mod tests {
    use super::{check_selection, reasons_text, Note};

    #[test]
    fn reasons_are_grouped_and_counted() {
        let note = |k, r: &str, p: &str| Note {
            known_failure: k,
            reason: r.into(),
            path: p.into(),
        };
        let notes = [
            note(
                false,
                "capability snapshot unsupported: criu",
                "snapshot::a",
            ),
            note(true, "adds HOME", "isolation::env_inside"),
            note(
                false,
                "capability snapshot unsupported: criu",
                "snapshot::b",
            ),
        ];
        assert_eq!(
            reasons_text("runsc", 9, &notes),
            "runsc: 9 trials, 2 skipped here, 1 expected to fail\n\
             skip (2): capability snapshot unsupported: criu\n    snapshot::a, snapshot::b\n\
             known failure (1): adds HOME\n    isolation::env_inside"
        );
        assert_eq!(
            reasons_text("host", 3, &[]),
            "host: 3 trials, 0 skipped here, 0 expected to fail"
        );
    }

    #[test]
    fn a_selection_must_name_registered_backends() {
        let known = ["host".to_string(), "runc".to_string()];
        assert_eq!(check_selection(None, &known), Ok(()));
        assert_eq!(check_selection(Some(" "), &known), Ok(()));
        assert_eq!(check_selection(Some("host, runc"), &known), Ok(()));
        let e = check_selection(Some("host,nosuch,runcc"), &known).unwrap_err();
        assert!(e.contains("unknown backend(s): nosuch, runcc"), "{e}");
        assert!(e.contains("known: host, runc"), "{e}");
        let e = check_selection(Some("host,"), &known).unwrap_err();
        assert!(e.contains("(empty)"), "{e}");
    }
}
