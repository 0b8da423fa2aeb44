//! A driver the user configured (`CELLCHECK_REMOTE_DRIVER`, `CELLCHECK_<NAME>_DRIVER`) that fails
//! its handshake, or whose `hello` gives another name than it was configured under, fails its
//! trials, naming the driver and what it did, without strict mode: the user asked for it.
//!
//! Each broken driver runs in a child process of this test binary (the suite changes its process's
//! env, and the driver is read from the env as a user would set it).

use std::process::Command;

use cellcheck_conformance::Suite;
use cellcheck_registry::Registry;

/// Runs the suite's first scenario against the configured driver and prints the conclusion.
#[test]
#[ignore = "helper: run in a child process by configured_drivers_that_fail_their_handshake_fail"]
fn helper_run_configured_driver() {
    let mut suite = Suite::new().with_scenarios(vec![cellcheck_conformance::scenarios::all()[0]]);
    let registry = Registry::new().with_env_drivers();
    let [entry] = registry.entries() else {
        panic!("one driver configured: {registry:?}");
    };
    let name = entry.name.clone();
    for entry in registry.entries() {
        let factory = entry.factory.clone();
        let what = entry
            .configured_by
            .clone()
            .expect("the env driver is configured");
        suite = suite.configured_backend(&entry.name, &what, move |fx| factory(fx));
    }
    // The scenario's trial alone (not the backend's reasons trial).
    let trial = format!(
        "{name}::{}",
        cellcheck_conformance::scenarios::all()[0].path()
    );
    let args =
        libtest_mimic::Arguments::from_iter(["suite", "--exact", &trial, "--test-threads", "1"]);
    let trials = suite.trials(&args);
    let c = libtest_mimic::run(&args, trials);
    println!(
        "conclusion: passed={} failed={} ignored={}",
        c.num_passed, c.num_failed, c.num_ignored
    );
}

fn run_with_driver(cmd: &str) -> String {
    run_with_driver_var("CELLCHECK_REMOTE_DRIVER", cmd)
}

fn run_with_driver_var(var: &str, cmd: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "helper_run_configured_driver",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(var, cmd)
        .env("CELLCHECK_PREFLIGHT_CACHE", "0")
        .env_remove("CELLCHECK_STRICT")
        .env_remove("CELLCHECK_BACKENDS")
        .env_remove("CELLCHECK_RESULTS")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helper failed:\n{text}");
    text
}

#[test]
fn configured_drivers_that_fail_their_handshake_fail() {
    let dir = tempfile::tempdir().unwrap();
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    };
    // Exits at once; answers every request with a line that is not JSON; reads and never answers.
    let garbage = script(
        "garbage",
        "while read -r line; do echo 'this is not json'; done",
    );
    let hang = script("hang", "while read -r line; do :; done");
    let cases = [
        ("/bin/false".to_string(), "exit"),
        (garbage, "json"),
        (hang, "hello"),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(cmd, what)| std::thread::spawn(move || (run_with_driver(&cmd), cmd, what)))
        .collect();
    for t in threads {
        let (out, cmd, what) = t.join().unwrap();
        assert!(
            out.contains("conclusion: passed=0 failed=1 ignored=0"),
            "driver {cmd}: its trial must fail, not skip:\n{out}"
        );
        assert!(
            out.contains(&format!("CELLCHECK_REMOTE_DRIVER={cmd:?}")),
            "driver {cmd}: the failure must name the driver:\n{out}"
        );
        assert!(
            out.to_lowercase().contains(what),
            "driver {cmd}: the failure must say what it did ({what:?}):\n{out}"
        );
    }
}

#[test]
fn a_driver_whose_hello_gives_another_name_fails_naming_both() {
    let fx = cellcheck_fixtures::ensure().unwrap();
    let cmd = format!(
        "{} host --rootfs {} --init {} --name someone-else",
        fx.driver.display(),
        fx.rootfs.display(),
        fx.host_init.display()
    );
    let out = run_with_driver_var("CELLCHECK_MINE_DRIVER", &cmd);
    assert!(
        out.contains("conclusion: passed=0 failed=1 ignored=0"),
        "its trial must fail:\n{out}"
    );
    assert!(
        out.contains(&format!("CELLCHECK_MINE_DRIVER={cmd:?}")),
        "the failure must name the driver:\n{out}"
    );
    assert!(
        out.contains("\"someone-else\"") && out.contains("configured as \"mine\""),
        "the failure must name both names:\n{out}"
    );
}
