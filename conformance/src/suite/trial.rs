//! One trial: a scenario against a backend as a libtest-mimic trial (skips, expectations, the
//! verdict and its rerun line), and the same run outside libtest for the suite's self-tests.

use super::*;

pub(super) fn make_trial(
    name: String,
    sc: Scenario,
    backend: Option<Arc<dyn Backend>>,
    plan: Plan,
    base: ResultLine,
    args: &Arguments,
) -> Trial {
    if let Plan::Skip { reason, .. } = &plan {
        // Ignored trials are never started by a plain run or by nextest, so their record is
        // written now: in a run that selects them, or when listed with `--ignored`.
        let forced = args.ignored || args.include_ignored;
        if selected_by_filter(args, &name)
            && ((!args.list && !forced) || (args.list && args.ignored))
        {
            eprintln!("cellcheck: skip {name}: {reason}");
            results::record(&ResultLine {
                reason: reason.clone(),
                ..base.clone()
            });
        }
    }
    let ignored = matches!(plan, Plan::Skip { .. });
    let trial_name = name.clone();
    Trial::ignorable_test(name, move || {
        let record = |outcome: Outcome, reason: &str, ms: u64| {
            let rerun = if matches!(outcome, Outcome::Fail | Outcome::Xpass) {
                rerun_hint(&trial_name)
            } else {
                String::new()
            };
            results::record(&ResultLine {
                outcome,
                reason: reason.to_string(),
                duration_ms: ms,
                rerun,
                ..base.clone()
            })
        };
        let run = |b: Arc<dyn Backend>| -> RunReport {
            runtime().block_on(harness::run_scenario_async(b, sc))
        };
        match plan {
            Plan::Fail(msg) => {
                record(Outcome::Fail, &msg, 0);
                Err(Failed::from(format!(
                    "backend: {}\nscenario: {}\n{msg}\nrerun: {}",
                    base.backend,
                    sc.path(),
                    rerun_hint(&trial_name)
                )))
            }
            Plan::Skip {
                reason,
                by_expectation: false,
            } => {
                // Forced to run (`--ignored`), but it cannot run here.
                record(Outcome::Skip, &reason, 0);
                Ok(Completion::ignored_with(reason))
            }
            Plan::Skip {
                by_expectation: true,
                ..
            }
            | Plan::Run {
                known_failure: None,
            } => {
                let Some(b) = backend else {
                    return Err(Failed::from("no backend"));
                };
                let r = run(b);
                let ms = r.duration.as_millis() as u64;
                if r.passed {
                    record(Outcome::Pass, "", ms);
                    Ok(Completion::Completed)
                } else {
                    record(Outcome::Fail, &r.message, ms);
                    Err(Failed::from(format!(
                        "{}\nrerun: {}",
                        r.message,
                        rerun_hint(&trial_name)
                    )))
                }
            }
            Plan::Run {
                known_failure: Some(why),
            } => {
                let Some(b) = backend else {
                    return Err(Failed::from("no backend"));
                };
                let r = run(b);
                let ms = r.duration.as_millis() as u64;
                if r.passed {
                    let msg = format!("listed as known failure but passed (xpass): {why}");
                    record(Outcome::Xpass, &msg, ms);
                    Err(Failed::from(format!(
                        "{msg}\nrerun: {}",
                        rerun_hint(&trial_name)
                    )))
                } else {
                    println!("known failure (xfail): {why}\n{}", r.message);
                    record(Outcome::Xfail, &why, ms);
                    Ok(Completion::Completed)
                }
            }
        }
    })
    .with_ignored_flag(ignored)
}

/// Run one scenario (`"family::scenario"`) against `backend` outside libtest, with the same
/// bounds, cleanup and residue checks as a trial. For self-tests of the suite.
pub fn run_scenario(backend: Arc<dyn Backend>, path: &str) -> Result<(), String> {
    run_scenario_bounded(backend, path, None)
}

/// [`run_scenario`] with another bound than the scenario's own.
pub fn run_scenario_bounded(
    backend: Arc<dyn Backend>,
    path: &str,
    bound: Option<std::time::Duration>,
) -> Result<(), String> {
    crate::ids::canary();
    harness::sentinels();
    let mut sc = crate::scenarios::all()
        .into_iter()
        .find(|s| s.path() == path)
        .ok_or_else(|| format!("no scenario named {path}"))?;
    if let Some(b) = bound {
        sc.timeout = b;
    }
    let r = runtime().block_on(harness::run_scenario_async(backend, sc));
    if r.passed {
        Ok(())
    } else {
        Err(r.message)
    }
}
