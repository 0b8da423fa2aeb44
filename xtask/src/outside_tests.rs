//! Backends from outside the repository in a real run through xtask's own function: two
//! drivers side by side, each under its own name, and a driver whose `hello` gives another name.

use std::path::Path;

use cellcheck_conformance::results::Outcome;

use crate::conformance::{run_in, Options};
use crate::report::Report;

fn report_of(dir: &Path) -> Report {
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The static driver of the fixtures serving host cells under `name`.
fn driver_cmd(name: &str) -> String {
    let fx = cellcheck_fixtures::ensure().unwrap();
    format!(
        "{} host --rootfs {} --init {} --name {name}",
        fx.driver.display(),
        fx.rootfs.display(),
        fx.host_init.display()
    )
}

#[test]
fn two_drivers_run_side_by_side_under_their_own_names() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["drv-a", "drv-b"];
    let opts = Options {
        // Naming only the drivers runs no built-in backend.
        backends: names.map(String::from).to_vec(),
        drivers: names.map(|n| (n.to_string(), driver_cmd(n))).to_vec(),
        filter: Some("test(/::exit::code_42$/) | test(/::isolation::environ_exact$/)".into()),
        repeat: 1,
        no_build: true,
        ..Default::default()
    };
    let passed = run_in(&opts, dir.path()).unwrap();
    let report = report_of(dir.path());
    let log = std::fs::read_to_string(dir.path().join("nextest.log")).unwrap_or_default();
    assert!(passed, "{:#?}\n{log}", report.problems);
    for n in names {
        let ran: Vec<_> = report.results.iter().filter(|r| r.backend == n).collect();
        assert_eq!(ran.len(), 2, "{n}: {ran:#?}");
        assert!(ran.iter().all(|r| r.outcome == Outcome::Pass), "{ran:#?}");
        let row = report.backends.iter().find(|b| b.name == n).unwrap();
        let var = cellcheck_contract::drivers::env_var(n);
        assert!(row.why.contains(&var), "{row:?}");
    }
    assert_eq!(report.results.len(), 4, "only the drivers' filtered trials");
}

#[test]
fn a_driver_whose_hello_gives_another_name_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        backends: vec!["drv-c".into()],
        drivers: vec![("drv-c".into(), driver_cmd("someone-else"))],
        repeat: 1,
        no_build: true,
        ..Default::default()
    };
    let e = format!("{:#}", run_in(&opts, dir.path()).unwrap_err());
    assert!(
        e.contains("\"someone-else\"") && e.contains("\"drv-c\""),
        "{e}"
    );
    assert!(!dir.path().join("report.json").exists());
}
