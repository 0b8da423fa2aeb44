//! A backend added through the registry alone appears in the suite's listing, the host probe and
//! the matrix check: nothing else needs to name it.

use std::sync::Arc;

use async_trait::async_trait;
use cellcheck_contract::{
    Availability, Backend, Capabilities, CellDocument, CellError, CellHandle, ExitReport,
    Footprint, TeardownReport,
};
use cellcheck_registry::{Entry, Probe, Registry};

use crate::classes::{self, ClassMatrix, MatrixBackend};
use crate::probe::HostReport;

/// A backend that exists only here: its preflight answers, nothing else is ever called.
struct Dummy;

const EVIDENCE: &str = "the dummy backend answers its preflight";

#[async_trait]
impl Backend for Dummy {
    fn name(&self) -> &str {
        "dummy"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn preflight(&self) -> Availability {
        Availability::Available {
            evidence: EVIDENCE.into(),
        }
    }
    async fn create(&self, _: &CellDocument) -> Result<CellHandle, CellError> {
        unreachable!("listing and probing never create a cell")
    }
    async fn wait(&self, _: &str) -> Result<ExitReport, CellError> {
        unreachable!("listing and probing never wait")
    }
    async fn destroy(&self, _: &str) -> Result<TeardownReport, CellError> {
        unreachable!("listing and probing never destroy")
    }
    fn footprint(&self, _: &str) -> Footprint {
        Footprint::default()
    }
    async fn list(&self) -> Vec<String> {
        Vec::new()
    }
}

fn registry() -> Registry {
    Registry::builtin().with(Entry::new("dummy", Probe::Preflight, |_| Arc::new(Dummy)))
}

const CHILD_ENV: &str = "XTASK_TEST_LIST_CHILD";

/// Lists the suite's trials for `registry()`. The suite sets a canary in the process env, which
/// is only safe before other threads run, so a fresh process of this test binary does it.
#[test]
#[ignore = "helper: run in a child process by a_backend_added_to_the_registry_joins_everything"]
fn list_child() {
    assert_eq!(
        std::env::var(CHILD_ENV).as_deref(),
        Ok("1"),
        "run by its parent"
    );
    let mut suite = cellcheck_conformance::Suite::new();
    for e in registry().entries() {
        let f = e.factory.clone();
        suite = suite.backend_with_fixtures(&e.name, move |fx| f(fx));
    }
    for t in suite.trials(&libtest_mimic::Arguments::default()) {
        println!("TRIAL {} ignored={}", t.name(), t.has_ignored_flag());
    }
}

#[test]
fn a_backend_added_to_the_registry_joins_everything() {
    // The listing.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "new_backend::list_child",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .env("CELLCHECK_BACKENDS", "dummy")
        .env("CELLCHECK_PREFLIGHT_CACHE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints the test's name on the line its first output starts on.
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| Some(&l[l.find("TRIAL ")? + "TRIAL ".len()..]))
        .collect();
    assert!(
        listed.iter().all(|l| l.starts_with("dummy::")),
        "{listed:?}"
    );
    for s in cellcheck_conformance::scenarios::all() {
        let name = format!("dummy::{}::{} ", s.family, s.name);
        assert!(
            listed.iter().any(|l| l.starts_with(&name)),
            "{name} not in {listed:?}"
        );
    }
    assert!(
        listed.contains(&"dummy::lifecycle::create_wait_destroy ignored=false"),
        "{listed:?}"
    );

    // The probe: the dummy's own preflight answers its row.
    let only = Registry::new().with(registry().get("dummy").unwrap().clone());
    let rows = crate::probe::linux::backend_rows(&only).unwrap();
    let row = &rows["dummy"];
    assert!(row.present && row.evidence.contains(EVIDENCE), "{row:?}");

    // The matrix check: missing from the class files until its entry is added, then selected.
    let mut all = classes::load_all().unwrap();
    let problems = classes::check_against_registry(&all, &registry());
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems.iter().all(|p| p.contains("\"dummy\"")),
        "{problems:#?}"
    );
    for m in all.iter_mut().filter(|m| m.class.starts_with("linux-")) {
        m.backends.push(MatrixBackend {
            name: "dummy".into(),
            probe: "dummy".into(),
            implemented: true,
        });
    }
    assert_eq!(
        classes::check_against_registry(&all, &registry()),
        Vec::<String>::new()
    );
    let nokvm: &ClassMatrix = all.iter().find(|m| m.class == "linux-nokvm").unwrap();
    let mut host = HostReport::empty("linux-nokvm");
    host.probes.extend(rows);
    let dummy = crate::matrix::select(nokvm, &host)
        .into_iter()
        .find(|s| s.name == "dummy")
        .unwrap();
    assert!(dummy.usable, "{dummy:?}");
}
