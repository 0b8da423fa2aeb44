//! The gate on a backend's basic contract: a backend whose host pid is not the workload's would
//! fail most scenarios, each after waiting out its bound (they read the workload's `/proc`
//! entry), and hide the one reason. So before its trials run, the check scenario
//! ([`CHECK`]) runs once, its answer shared by the run's processes through the preflight cache;
//! when it fails, every other trial of the backend that would run fails at once, naming the
//! check's reason and trial. The check is exact (see the scenario), never a deadline, so the
//! gate adds no timing of its own.

use cellcheck_contract::{Capability, Support};

use super::*;

/// The scenario every other one builds on: the host pid create reports is the workload's.
pub const CHECK: &str = "lifecycle::host_pid_is_the_workload";

/// A trial not built yet: a gate may still turn its run into a failure.
pub(super) enum Pending {
    Built(Trial),
    Scenario {
        name: String,
        sc: Scenario,
        backend: Option<Arc<dyn Backend>>,
        plan: Plan,
        base: Box<ResultLine>,
        /// The gate of this trial's backend (an index into the gates), unless it is the check.
        gate: Option<usize>,
    },
}

/// One backend's check, to run before its trials.
pub(super) struct Gate {
    backend: Arc<dyn Backend>,
    check: Scenario,
    /// The backend's configuration key (see [`crate::preflight::config_key`]).
    key: String,
}

/// The gate for a backend whose trials `trial_names` are about to be built, when one is due: a
/// run (not a listing) of an available backend that declares `HostPid`, with a trial other than
/// the check selected, the check in the suite and no expectation about it (an expected skip or
/// failure of the check is not a reason to fail the rest).
#[allow(clippy::too_many_arguments)]
pub(super) fn gate_for(
    backend: &Arc<dyn Backend>,
    availability: &Availability,
    scenarios: &[Scenario],
    trial_names: &[String],
    exps: &Expectations,
    class: &str,
    key: &str,
    args: &Arguments,
) -> Option<Gate> {
    let name = backend.name();
    let check = scenarios.iter().find(|s| s.path() == CHECK)?;
    let check_trial = format!("{name}::{CHECK}");
    let due = !args.list
        && availability.is_available()
        && backend.capabilities().support(Capability::HostPid) == Support::Supported
        && exps.lookup(name, class, CHECK).is_none()
        && trial_names
            .iter()
            .any(|n| *n != check_trial && selected_by_filter(args, n));
    due.then(|| Gate {
        backend: backend.clone(),
        check: *check,
        key: key.to_string(),
    })
}

/// Run each gate (its answer from the cache when fresh), then build the trials: a trial that
/// would run becomes a failure when its backend's check failed.
pub(super) fn finish(pending: Vec<Pending>, gates: Vec<Gate>, args: &Arguments) -> Vec<Trial> {
    let broken: Vec<Option<String>> = gates.iter().map(broken).collect();
    pending
        .into_iter()
        .map(|p| match p {
            Pending::Built(t) => t,
            Pending::Scenario {
                name,
                sc,
                backend,
                plan,
                base,
                gate,
            } => {
                let plan = match (plan, gate.and_then(|g| broken[g].clone())) {
                    (Plan::Run { .. }, Some(why)) => Plan::Fail(why),
                    (plan, _) => plan,
                };
                make_trial(name, sc, backend, plan, *base, args)
            }
        })
        .collect()
}

/// The failure every other trial of the gate's backend gets, or `None` when the check passed.
fn broken(gate: &Gate) -> Option<String> {
    let name = gate.backend.name().to_string();
    let (b, sc) = (gate.backend.clone(), gate.check);
    // The test binary is part of the key: a rebuilt backend is checked again, not judged by the
    // answer its previous build got.
    let key = format!("{}|exe={}", gate.key, exe_identity());
    let stem = format!("{name}.contract");
    let (failed, _cached): (Option<String>, bool) = runtime().block_on(async move {
        crate::preflight::cached(&stem, &key, async move {
            let r = harness::run_scenario_async(b, sc).await;
            (!r.passed).then(|| first_reason(&r.message))
        })
        .await
    });
    failed.map(|reason| format!("basic contract broken: {reason} (see trial {name}::{CHECK})"))
}

/// The running executable's path, size and modification time.
fn exe_identity() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "unknown".into();
    };
    let meta = std::fs::metadata(&exe).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{}:{mtime}", exe.display(), meta.map_or(0, |m| m.len()))
}

/// The first line of a failure that says what went wrong: the harness's message starts with
/// the backend, the scenario, the step and the cell, context the gate's message points to.
fn first_reason(message: &str) -> String {
    const CONTEXT: &[&str] = &["backend: ", "scenario: ", "step: ", "cell: "];
    message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !CONTEXT.iter().any(|c| l.starts_with(c)))
        .unwrap_or("the check failed without a message")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::first_reason;

    #[test]
    fn the_reason_is_the_first_line_past_backend_and_scenario() {
        let m = "backend: faulty-host\nscenario: lifecycle::host_pid_is_the_workload\n\
                 step: compare\ncell: cc-x\n\
                 create reported host pid 7, but the workload runs as host pid 8\n\
                 cells touched: x";
        assert_eq!(
            first_reason(m),
            "create reported host pid 7, but the workload runs as host pid 8"
        );
        assert_eq!(first_reason(""), "the check failed without a message");
    }
}
