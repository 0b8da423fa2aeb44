//! A backend whose basic contract is broken (its host pid is not the workload's) fails once,
//! fast, with the reason: its other trials fail at once, naming the check's reason and trial,
//! instead of each waiting out its bound. A backend that keeps the contract is not affected.
//!
//! Each suite runs in a child process of this test binary (the suite changes its process's env),
//! with its own results file, so what each trial did is read back from its result line.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use cellcheck_conformance::faulty::{Fault, FaultyBackend};
use cellcheck_conformance::results::{read_file, Outcome};
use cellcheck_conformance::Suite;
use cellcheck_contract::Backend;

const CHECK: &str = "lifecycle::host_pid_is_the_workload";

/// The check, and scenarios that create running cells (two of them read the workload's `/proc`
/// entry through the host pid, as the ones that cascaded into timeouts do).
const SCENARIOS: &[&str] = &[
    CHECK,
    "lifecycle::create_wait_destroy",
    "lifecycle::destroy_running",
    "isolation::environ_exact",
    "exit::timeout_unwaited",
];

/// Runs every trial of one backend (`CC_GATE_BACKEND`: `faulty` is the host backend with
/// [`Fault::WrongHostPid`], `host` the plain one) and prints the conclusion.
#[test]
#[ignore = "helper: run in a child process by the tests below"]
fn helper_run_gated_suite() {
    let faulty = std::env::var("CC_GATE_BACKEND").unwrap() == "faulty";
    let scenarios = cellcheck_conformance::scenarios::all()
        .into_iter()
        .filter(|s| SCENARIOS.contains(&s.path().as_str()))
        .collect::<Vec<_>>();
    assert_eq!(scenarios.len(), SCENARIOS.len(), "every scenario exists");
    let name = if faulty { "faulty-host" } else { "host" };
    let suite = Suite::new()
        .with_scenarios(scenarios)
        .backend_with_fixtures(name, move |fx| {
            let host: Arc<dyn Backend> = Arc::new(cellcheck_host::HostBackend::new(
                cellcheck_host::HostConfig::from_fixtures(fx),
            ));
            if faulty {
                Arc::new(FaultyBackend::new(host, Fault::WrongHostPid))
            } else {
                host
            }
        });
    let args = libtest_mimic::Arguments::from_iter(["suite", "--test-threads", "1"]);
    let start = Instant::now();
    let c = libtest_mimic::run(&args, suite.trials(&args));
    println!(
        "conclusion: passed={} failed={} ignored={} in {:?}",
        c.num_passed,
        c.num_failed,
        c.num_ignored,
        start.elapsed()
    );
}

/// The child's output and result lines, and how long it took.
fn run_child(backend: &str) -> (String, Vec<cellcheck_conformance::results::TrialResult>) {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_run_gated_suite",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CC_GATE_BACKEND", backend)
        .env("CELLCHECK_RESULTS", &results)
        .env_remove("CELLCHECK_STRICT")
        .env_remove("CELLCHECK_BACKENDS")
        .env_remove("CELLCHECK_EXPECTATIONS")
        .output()
        .unwrap();
    let took = start.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helper failed:\n{text}");
    println!("{backend}: the child ran its suite in {took:?}");
    (text, read_file(&results).unwrap())
}

#[test]
fn a_wrong_host_pid_fails_every_other_trial_at_once_with_the_reason() {
    let (out, lines) = run_child("faulty");
    assert!(
        out.contains("conclusion: passed=1 failed=5 ignored=0"),
        "the check and the four others fail (the reasons trial passes):\n{out}"
    );
    let check = lines
        .iter()
        .find(|l| l.scenario_path() == CHECK)
        .unwrap_or_else(|| panic!("the check's result line:\n{out}"));
    assert_eq!(check.outcome, Outcome::Fail, "{out}");
    assert!(
        check.reason.contains("but the workload runs as host pid"),
        "the check names both pids:\n{out}"
    );
    let gated: Vec<_> = lines
        .iter()
        .filter(|l| l.scenario_path() != CHECK)
        .collect();
    assert_eq!(gated.len(), SCENARIOS.len() - 1, "{out}");
    for l in gated {
        assert_eq!(l.outcome, Outcome::Fail, "{}:\n{out}", l.id);
        assert!(
            l.reason.starts_with("basic contract broken: ")
                && l.reason.contains("but the workload runs as host pid")
                && l.reason
                    .ends_with("(see trial faulty-host::lifecycle::host_pid_is_the_workload)"),
            "{} names the check's reason and trial: {:?}",
            l.id,
            l.reason
        );
        // Failed without running: no cell made, no bound waited out.
        assert_eq!(l.duration_ms, 0, "{} ran:\n{out}", l.id);
        assert!(!l.rerun.is_empty(), "{} has a rerun line", l.id);
    }
}

#[test]
fn a_backend_that_keeps_the_contract_is_not_gated() {
    let (out, lines) = run_child("host");
    assert!(
        out.contains("conclusion: passed=6 failed=0 ignored=0"),
        "every trial of the plain host backend passes:\n{out}"
    );
    assert_eq!(lines.len(), SCENARIOS.len(), "{out}");
    for l in &lines {
        assert_eq!(l.outcome, Outcome::Pass, "{}:\n{out}", l.id);
    }
    // The gated trials ran for real (a cell each, at least its create and destroy).
    assert!(
        lines
            .iter()
            .filter(|l| l.scenario_path() != CHECK)
            .all(|l| l.duration_ms > 0),
        "{lines:?}"
    );
}
