//! A harness killed while its cells are live leaves them on the host. The next run must find them
//! in the ledger, remove them and say what it removed.
//!
//! The test runs this binary twice as a child: first in the `hold` role (creates cells on the
//! host, runc and nested backends, one of each paused where the backend can pause, then waits),
//! which it SIGKILLs; then in the `rerun` role, a normal suite run of one scenario per backend.
//! Both share a private ledger and directory of rootfs copies. After the rerun nothing of the
//! killed run is left: not its cells, and not what its backend instances made for all their cells
//! (a host instance's cgroup parents, a nested instance's socket and state dirs).
//!
//! A second test runs the spec family's property test on the host backend behind a witness that
//! looks for each cell's ledger entry while the cell lives: a killed property run must leave a
//! record of its cells like any other scenario.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellcheck_conformance::audit::{self, Needles};
use cellcheck_conformance::{ids, ledger, roots, Ctx, Suite};
use cellcheck_contract::{Availability, Backend, Capability};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::{Deserialize, Serialize};

const ROLE: &str = "CELLCHECK_RECOVERY_ROLE";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    backend: String,
    id: String,
    marker: String,
    footprint: cellcheck_contract::Footprint,
    paused: bool,
}

fn host(fx: &cellcheck_fixtures::Fixtures) -> Arc<dyn Backend> {
    Arc::new(cellcheck_host::HostBackend::new(
        cellcheck_host::HostConfig::from_fixtures(fx),
    ))
}

fn runc(fx: &cellcheck_fixtures::Fixtures) -> Arc<dyn Backend> {
    Arc::new(cellcheck_oci::OciBackend::runc(
        cellcheck_oci::OciConfig::from_fixtures(fx),
    ))
}

fn nested(fx: &cellcheck_fixtures::Fixtures) -> Arc<dyn Backend> {
    cellcheck_remote::nested::NestedBackend::for_suite(fx)
}

/// Create two cells per backend (one paused where the backend can pause), print them, wait.
fn hold() -> ExitCode {
    ids::canary();
    let fx = cellcheck_fixtures::ensure().expect("fixtures");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Each in its private rootfs copy, as the suite builds them: the kill leaves the copies too.
    let fx_for = |name| roots::fixtures_for(name, &fx).expect("a private rootfs copy");
    // Backends and contexts stay alive until the kill: dropping either would destroy the cells
    // (a host backend tears down its cells when dropped), and the kill would find none live.
    let mut keep = Vec::new();
    for b in [
        host(&fx_for("host")),
        runc(&fx_for("runc")),
        nested(&fx_for("nested")),
    ] {
        if let Availability::Unavailable { reason } = rt.block_on(b.preflight()) {
            eprintln!("{} unavailable: {reason}", b.name());
            return ExitCode::FAILURE;
        }
        let ctx = Ctx::new(b.clone(), "recovery", "hold");
        for n in 0..2 {
            let doc = ctx.doc(&["hold"]);
            let id = doc.spec.id.clone();
            if let Err(f) = rt.block_on(ctx.create_running(&doc)) {
                eprintln!("create on {}: {f}", b.name());
                return ExitCode::FAILURE;
            }
            let paused = n == 1 && ctx.has(Capability::Pause);
            if paused {
                if let Err(e) = rt.block_on(b.pause(&id)) {
                    eprintln!("pause on {}: {e}", b.name());
                    return ExitCode::FAILURE;
                }
            }
            let held = Held {
                backend: b.name().into(),
                id: id.clone(),
                marker: ctx.marker_of(&id),
                footprint: b.footprint(&id),
                paused,
            };
            println!("{}", serde_json::to_string(&held).unwrap());
        }
        keep.push((b, ctx));
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A normal run of one scenario per backend: its start recovers what the ledger holds.
fn rerun() -> ExitCode {
    let scenarios = cellcheck_conformance::scenarios::all()
        .into_iter()
        .filter(|s| s.path() == "exit::code_0")
        .collect();
    Suite::new()
        .backend_with_fixtures("host", host)
        .backend_with_fixtures("runc", runc)
        .backend_with_fixtures("nested", nested)
        .with_scenarios(scenarios)
        .run_from_args()
}

/// Everything of `h` still on the host, by what the audit and the footprint can see.
fn remains(h: &Held) -> Vec<String> {
    let n = Needles {
        cell: h.id.clone(),
        marker: h.marker.clone(),
        process_markers: h.footprint.process_markers.clone(),
        ..Needles::default()
    };
    let mut out: Vec<String> = audit::processes()
        .into_iter()
        .filter(|p| n.process_reason(p).is_some())
        .map(|p| format!("process {}", p.describe()))
        .collect();
    for p in h.footprint.paths.iter().chain(&h.footprint.cgroup_dirs) {
        if p.symlink_metadata().is_ok() {
            out.push(format!("{} still exists", p.display()));
        }
    }
    // The dead instance's state dirs go with its last cell.
    for p in &h.footprint.paths {
        if let Some(d) = p.parent().filter(|d| d.exists()) {
            if std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_none()) {
                out.push(format!("empty state dir {} still exists", d.display()));
            }
        }
    }
    out.extend(
        audit::cgroup_dirs()
            .into_iter()
            .filter(|d| d.to_string_lossy().contains(&h.id))
            .map(|d| format!("cgroup dir {}", d.display())),
    );
    out
}

/// What backend instances of process `pid` made beside their cells, still on the host: host
/// instances' cgroup parents (`cellcheck/<pid>-<hex>`) and state roots, nested instances' dirs
/// (`/run/cellcheck/nested/nest<pid>-<hex>`).
fn instance_leftovers(pid: u32) -> Vec<String> {
    let host = format!("{pid}-");
    let nest = format!("nest{pid}-");
    let mut out: Vec<String> = audit::cgroup_dirs()
        .into_iter()
        .filter(|d| {
            d.components().any(|c| {
                let c = c.as_os_str().to_string_lossy();
                c.starts_with(&host) || c.starts_with(&nest)
            })
        })
        .map(|d| format!("cgroup dir {}", d.display()))
        .collect();
    for base in [
        cellcheck_remote::nested::STATE_BASE,
        cellcheck_host::DEFAULT_STATE_BASE,
    ] {
        let Ok(rd) = std::fs::read_dir(base) else {
            continue;
        };
        out.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with(&host) || n.starts_with(&nest)
                })
                .map(|p| format!("{}", p.display())),
        );
    }
    out
}

/// The entries of a ledger (its `.json` files; the directory also holds the reconcile lock).
fn ledger_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

fn sigkill_then_rerun() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ledger_dir = dir.path().join("ledger");
    let results = dir.path().join("results.jsonl");
    let audit_file = dir.path().join("audit.jsonl");
    // Both runs keep their rootfs copies here, not in the shared directory: there, any other test
    // process starting after the kill would recover the killed run's copies before the rerun.
    let roots_dir = dir.path().join("roots");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;

    let mut child = Command::new(&me)
        .env(ROLE, "hold")
        .env("CELLCHECK_LEDGER_DIR", &ledger_dir)
        .env(roots::DIR_VAR, &roots_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn hold: {e}"))?;
    // Where the holding run's rootfs copies are: named by its pid and start time.
    let owner = format!(
        "{}-{}",
        child.id(),
        audit::start_time(child.id()).unwrap_or_default()
    );
    let copies = roots_dir.join(&owner);
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut held: Vec<Held> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l == "ready" => break true,
            Ok(l) => held.push(serde_json::from_str(&l).map_err(|e| format!("{l}: {e}"))?),
            Err(_) => break false,
        }
    };
    let result = (|| -> Result<(), String> {
        if !ready {
            return Err(format!(
                "the holding run did not get its cells up within 120 s (got {held:?})"
            ));
        }
        for b in ["host", "runc"] {
            if !held.iter().any(|h| h.backend == b && h.paused) {
                return Err(format!("no paused {b} cell among {held:?}"));
            }
        }
        let entries = ledger_entries(&ledger_dir).len();
        if entries != held.len() {
            return Err(format!(
                "{entries} ledger entries for {} live cells",
                held.len()
            ));
        }
        for b in ["host", "runc", "nested"] {
            if !copies.join(b).join("bin/busybox").is_file() {
                return Err(format!("no rootfs copy of {b} in {}", copies.display()));
            }
        }
        child.kill().map_err(|e| format!("SIGKILL: {e}"))?;
        child.wait().map_err(|e| e.to_string())?;
        // A backend may tie its cells to the harness's life (the host backend's init dies with
        // it): nothing of those is left to recover. Runc's containers outlive the harness, so
        // the kill really leaves cells behind, or this test proves nothing.
        let left: Vec<&Held> = held.iter().filter(|h| !remains(h).is_empty()).collect();
        for h in held.iter().filter(|h| h.backend == "runc") {
            if !left.iter().any(|l| l.id == h.id) {
                return Err(format!(
                    "nothing of runc cell {} was left by the killed run",
                    h.id
                ));
            }
        }
        for h in held.iter().filter(|h| !left.iter().any(|l| l.id == h.id)) {
            println!(
                "{} cell {} died with its harness: nothing to recover",
                h.backend, h.id
            );
        }

        let rerun = Command::new(&me)
            .arg("exit::code_0")
            .env(ROLE, "rerun")
            .env("CELLCHECK_LEDGER_DIR", &ledger_dir)
            .env(roots::DIR_VAR, &roots_dir)
            .env("CELLCHECK_RESULTS", &results)
            .env_remove("CELLCHECK_BACKENDS")
            .output()
            .map_err(|e| format!("spawn rerun: {e}"))?;
        let stderr = String::from_utf8_lossy(&rerun.stderr);
        let stdout = String::from_utf8_lossy(&rerun.stdout);
        if !rerun.status.success() {
            return Err(format!(
                "the second run failed ({}):\n{stdout}\n{stderr}",
                rerun.status
            ));
        }
        let audit_lines = std::fs::read_to_string(&audit_file).unwrap_or_default();
        let mut problems = Vec::new();
        for h in &left {
            let said = format!("recovered cell {} of backend {}", h.id, h.backend);
            if !stderr.contains(&said) {
                problems.push(format!("the console does not say {said:?}"));
            }
            if !audit_lines.lines().any(|l| {
                l.contains("\"kind\":\"recovered\"")
                    && l.contains(&format!("\"cell\":\"{}\"", h.id))
            }) {
                problems.push(format!("no `recovered` audit line for {}", h.id));
            }
        }
        // The killed run's rootfs copies: removed by the rerun's start, and said.
        for b in ["host", "runc", "nested"] {
            let said =
                format!("recovered the private rootfs copy of backend {b} (left by run {owner})");
            if !stderr.contains(&said) {
                problems.push(format!("the console does not say {said:?}"));
            }
        }
        if copies.exists() {
            problems.push(format!("{} left after recovery", copies.display()));
        }
        // What the killed run's backend instances made for all their cells (named by its pid).
        problems.extend(
            instance_leftovers(child.id())
                .into_iter()
                .map(|l| format!("{l} left after recovery")),
        );
        for h in &held {
            let after = remains(h);
            if !after.is_empty() {
                problems.push(format!("{} left after recovery: {after:?}", h.id));
            }
        }
        for h in left.iter().filter(|h| h.paused) {
            if !stderr.contains("thawed frozen cgroup") {
                problems.push(format!("the paused cell {} was not reported thawed", h.id));
            }
        }
        let entries = ledger_entries(&ledger_dir);
        if !entries.is_empty() {
            problems.push(format!("ledger entries left: {entries:?}"));
        }
        println!("{stderr}");
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}\n--- second run's stderr:\n{stderr}",
                problems.join("\n")
            ))
        }
    })();
    // Whatever happened, leave nothing behind.
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&copies);
    for r in ledger::reconcile(&ledger_dir, &|_| None) {
        if !r.removed.is_empty() {
            eprintln!("test cleanup: {}", ledger::describe(&r));
        }
    }
    result.map_err(Failed::from)
}

/// The host backend, plus a look at the ledger at every create and wait: is this harness's entry
/// for the cell on disk?
struct LedgerWitness {
    inner: Arc<dyn Backend>,
    /// `(id, what was seen)` per admitted create and per wait.
    seen: Mutex<Vec<(String, bool)>>,
}

impl LedgerWitness {
    fn recorded(id: &str) -> bool {
        let me = std::process::id();
        std::fs::read_dir(ledger::dir())
            .map(|r| {
                r.flatten()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .filter_map(|t| serde_json::from_slice::<ledger::Entry>(&t).ok())
                    .any(|e| e.cell == id && e.harness_pid == me)
            })
            .unwrap_or(false)
    }

    fn look(&self, id: &str) {
        let seen = Self::recorded(id);
        self.seen.lock().unwrap().push((id.to_string(), seen));
    }
}

#[async_trait::async_trait]
impl Backend for LedgerWitness {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> cellcheck_contract::Capabilities {
        self.inner.capabilities()
    }
    async fn preflight(&self) -> Availability {
        self.inner.preflight().await
    }
    async fn create(
        &self,
        doc: &cellcheck_contract::CellDocument,
    ) -> Result<cellcheck_contract::CellHandle, cellcheck_contract::CellError> {
        // Only a document admission accepts has an id the ledger may record.
        if doc.admit().is_ok() {
            self.look(&doc.spec.id);
        }
        self.inner.create(doc).await
    }
    async fn wait(
        &self,
        id: &str,
    ) -> Result<cellcheck_contract::ExitReport, cellcheck_contract::CellError> {
        self.look(id);
        self.inner.wait(id).await
    }
    async fn destroy(
        &self,
        id: &str,
    ) -> Result<cellcheck_contract::TeardownReport, cellcheck_contract::CellError> {
        self.inner.destroy(id).await
    }
    fn footprint(&self, id: &str) -> cellcheck_contract::Footprint {
        self.inner.footprint(id)
    }
    async fn list(&self) -> Vec<String> {
        self.inner.list().await
    }
}

/// Every cell of the property test is in the ledger while it lives, and its entry is gone once it
/// was checked clean.
fn property_cells_in_the_ledger() -> Result<(), Failed> {
    let fx = cellcheck_fixtures::ensure().map_err(|e| format!("fixtures: {e}"))?;
    let w = Arc::new(LedgerWitness {
        inner: host(&fx),
        seen: Mutex::new(Vec::new()),
    });
    cellcheck_conformance::run_scenario(w.clone(), "spec::property_documents")?;
    let seen = w.seen.lock().unwrap().clone();
    let missing: Vec<&String> = seen.iter().filter(|(_, s)| !s).map(|(i, _)| i).collect();
    if seen.is_empty() {
        return Err("the property test created no admitted cell".into());
    }
    if !missing.is_empty() {
        return Err(format!(
            "{} of {} looks found no ledger entry for the live cell: {missing:?}",
            missing.len(),
            seen.len()
        )
        .into());
    }
    let left: Vec<&String> = seen
        .iter()
        .map(|(i, _)| i)
        .filter(|i| LedgerWitness::recorded(i))
        .collect();
    if !left.is_empty() {
        return Err(format!("ledger entries left after the trial: {left:?}").into());
    }
    println!("{} looks, each found the cell's ledger entry", seen.len());
    Ok(())
}

fn main() -> ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("hold") => return hold(),
        Ok("rerun") => return rerun(),
        _ => {}
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test(
            "recovery::sigkill_with_live_cells_then_rerun",
            sigkill_then_rerun,
        ),
        Trial::test(
            "recovery::property_cells_in_the_ledger",
            property_cells_in_the_ledger,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}
