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

/// `fixtures/outside-crate` copied where an author keeps their crate, its path dependencies
/// pointing at this checkout, with this checkout's lock file (the same versions, nothing fetched).
fn template_crate(into: &Path) -> std::path::PathBuf {
    let root = crate::util::project_root();
    let from = root.join("fixtures/outside-crate");
    let dir = into.join("template-backend");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&from)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "copy {}", from.display());
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut rewritten = String::new();
    for line in text.lines() {
        // `path = "../../x"` is relative to the template's place in this repository.
        let line = match line.split_once("path = \"") {
            Some((head, rest)) => {
                let (rel, tail) = rest.split_once('"').unwrap();
                let abs = from.join(rel).canonicalize().unwrap();
                format!("{head}path = \"{}\"{tail}", abs.display())
            }
            None => line.to_string(),
        };
        rewritten.push_str(&line);
        rewritten.push('\n');
    }
    assert!(!rewritten.contains("../"), "{rewritten}");
    std::fs::write(&manifest, rewritten).unwrap();
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    dir
}

#[test]
fn the_template_crate_joins_the_matrix_under_its_own_name() {
    let tmp = tempfile::tempdir().unwrap();
    let krate = template_crate(tmp.path());
    // The outside crate builds into this checkout's target dir, so only the template itself
    // compiles (as an author's CI caches its target dir), and the fixtures there are reused.
    std::env::set_var("CARGO_TARGET_DIR", cellcheck_fixtures::target_dir());
    let out = tmp.path().join("out");
    let opts = Options {
        // Naming only the crate's backend runs no built-in backend.
        backends: vec!["template".into()],
        crates: vec![krate.clone()],
        filter: Some("test(/::exit::code_/) | test(/::pause::/)".into()),
        repeat: 1,
        no_build: true,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let passed = run_in(&opts, &out).unwrap();
    println!("the template crate's run took {:?}", started.elapsed());
    let report = report_of(&out);
    let log = std::fs::read_to_string(out.join("nextest.log")).unwrap_or_default();
    assert!(passed, "{:#?}\n{log}", report.problems);
    assert!(
        report.results.iter().all(|r| r.backend == "template"),
        "only the crate's backend ran: {:#?}",
        report.results
    );
    let row = report.backends.iter().find(|b| b.name == "template");
    assert!(
        row.is_some_and(|r| r.why.contains("template-backend")),
        "{:#?}",
        report.backends
    );
    let of = |o: Outcome| -> Vec<_> { report.results.iter().filter(|r| r.outcome == o).collect() };
    let passes = of(Outcome::Pass);
    assert!(
        passes.iter().any(|r| r.id == "template::exit::code_42"),
        "{:#?}",
        report.results
    );
    let skips = of(Outcome::Skip);
    assert!(
        !skips.is_empty() && skips.iter().all(|r| r.family == "pause"),
        "{skips:#?}"
    );
    for s in &skips {
        assert!(
            s.reason.contains("template: cells cannot be frozen"),
            "{s:#?}"
        );
    }
    // Nothing left: the suite's own audit of the host for the backend, and no cell of it in the
    // ledger.
    let audit = report.audit_rows();
    let a = audit.iter().find(|a| a.backend == "template");
    assert!(
        a.is_some_and(|a| a.windows > 0 && a.leftovers.is_empty()),
        "{audit:#?}"
    );
    let ledger = cellcheck_conformance::ledger::dir();
    let left: Vec<_> = std::fs::read_dir(&ledger)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("\"template\"")))
        .collect();
    assert!(left.is_empty(), "ledger entries left: {left:?}");
    // Every failing trial's rerun line runs from the crate's directory.
    assert!(
        report
            .results
            .iter()
            .all(|r| r.rerun.is_empty()
                || r.rerun.starts_with(&format!("cd {} && ", krate.display())))
    );
}
