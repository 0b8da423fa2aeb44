//! Skip and known-failure reasons are visible under nextest: each backend's reasons trial prints
//! them, grouped, and the repository's nextest config shows its output.
//!
//! The suite runs in a child process of this test binary (it reads its expectations from the env,
//! as a user sets them).

use std::process::Command;

use cellcheck_conformance::{Suite, REASONS_TRIAL};

const TRIAL: &str = "host::suite::skips_and_known_failures";

/// Runs the host backend's reasons trial with the expectations of `CELLCHECK_EXPECTATIONS`.
#[test]
#[ignore = "helper: run in a child process by the reasons_trial_prints_skips_and_known_failures test"]
fn helper_run_reasons_trial() {
    assert_eq!(TRIAL, format!("host::{REASONS_TRIAL}"));
    let suite = Suite::new().backend_with_fixtures("host", |fx| {
        std::sync::Arc::new(cellcheck_host::HostBackend::new(
            cellcheck_host::HostConfig::from_fixtures(fx),
        ))
    });
    let args = libtest_mimic::Arguments::from_iter(["suite", "--exact", TRIAL]);
    let c = libtest_mimic::run(&args, suite.trials(&args));
    println!(
        "conclusion: passed={} failed={} ignored={}",
        c.num_passed, c.num_failed, c.num_ignored
    );
}

#[test]
fn reasons_trial_prints_skips_and_known_failures() {
    let all = cellcheck_conformance::scenarios::all();
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("expectations.toml");
    let entry = |scenario: &str, outcome: &str, reason: &str| {
        format!(
            "[[expect]]\nbackend = \"host\"\nclass = \"*\"\nscenario = \"{scenario}\"\n\
             outcome = \"{outcome}\"\nreason = \"{reason}\"\nexpires = \"2099-01-01\"\n"
        )
    };
    let text = [
        entry(&all[0].path(), "skip", "first reason"),
        entry(&all[1].path(), "skip", "first reason"),
        entry(&all[2].path(), "known-failure", "second reason"),
    ]
    .join("\n");
    std::fs::write(&exp, text).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_run_reasons_trial",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("CELLCHECK_EXPECTATIONS", &exp)
        .env("CELLCHECK_PREFLIGHT_CACHE", "0")
        .env_remove("CELLCHECK_BACKENDS")
        .env_remove("CELLCHECK_STRICT")
        .env_remove("CELLCHECK_RESULTS")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.contains("conclusion: passed=1 failed=0 ignored=0"),
        "{out}"
    );
    // The host backend may skip more here (a capability it declares unsupported on this host).
    let n = all.len();
    let head = out
        .lines()
        .find(|l| l.starts_with(&format!("host: {n} trials, ")))
        .unwrap_or_else(|| panic!("no count line:\n{out}"));
    assert!(head.ends_with(", 1 expected to fail"), "{head}");
    assert!(
        out.contains(&format!(
            "skip (2): expected skip: first reason\n    {}, {}",
            all[0].path(),
            all[1].path()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "known failure (1): second reason\n    {}",
            all[2].path()
        )),
        "{out}"
    );
}

/// nextest shows a passing trial's output only when told to: the repository's config tells it for
/// the reasons trials (outside crates copy the same override, see the README).
#[test]
fn nextest_config_shows_the_reasons_trials_output() {
    let path = cellcheck_fixtures::workspace_root().join(".config/nextest.toml");
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let overrides = cfg["profile"]["default"]["overrides"].as_array().unwrap();
    let o = overrides
        .iter()
        .find(|o| {
            o["filter"]
                .as_str()
                .is_some_and(|f| f.contains(REASONS_TRIAL))
        })
        .expect("an override for the reasons trials");
    assert_eq!(o["success-output"].as_str(), Some("immediate"));
}
