//! `cargo xtask clean`: reconcile the ledger now, as every run does at its start. Each cell a dead
//! harness left is destroyed through its backend where that can work, then whatever remains is
//! removed by what the ledger recorded (pid with start time, paths and cgroups that name the
//! cell), never by a name pattern; every removed thing is listed by name. The private rootfs
//! copies of dead harnesses are removed too (by their owner's pid and start time).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Result;
use cellcheck_conformance::ledger::{self, Recovered};
use cellcheck_contract::Backend;

/// `cargo xtask clean`'s flags.
#[derive(Debug, Clone, PartialEq, Eq, Default, clap::Args)]
pub struct Options {
    /// The ledger to reconcile (default: the suite's, `CELLCHECK_LEDGER_DIR` or the host-wide
    /// `/run/cellcheck/ledger`).
    #[arg(long, value_name = "DIR")]
    pub ledger: Option<PathBuf>,
}

/// Reconcile `dir`, destroying through `backend_of`'s backends first; what was recovered, and the
/// text listing it (`nothing to clean` when the ledger held no dead harness's cell).
pub fn clean(
    dir: &Path,
    backend_of: &dyn Fn(&str) -> Option<Arc<dyn Backend>>,
) -> (Vec<Recovered>, String) {
    let found = ledger::reconcile(dir, backend_of);
    let mut text = String::new();
    if found.is_empty() {
        text.push_str(&format!(
            "ledger {}: nothing to clean (no cell of a dead harness)\n",
            dir.display()
        ));
    }
    for r in &found {
        text.push_str(&ledger::describe(r));
        text.push('\n');
    }
    (found, text)
}

/// The built-in (and env-configured) backend named `name`, built from the fixtures the first
/// time one is needed. Without fixtures, removal goes by record alone.
fn registered(name: &str) -> Option<Arc<dyn Backend>> {
    static FIXTURES: OnceLock<Option<cellcheck_fixtures::Fixtures>> = OnceLock::new();
    let registry = cellcheck_registry::Registry::builtin().with_env_drivers();
    let entry = registry.get(name)?;
    let fx = FIXTURES.get_or_init(|| match cellcheck_fixtures::ensure() {
        Ok(fx) => Some(fx),
        Err(e) => {
            eprintln!("clean: no fixtures ({e}); removing by record only");
            None
        }
    });
    fx.as_ref().map(|fx| (entry.factory)(fx))
}

/// Exits 0 when everything recorded was removed (or nothing was left), 1 when something could not
/// be removed (its entry is kept for the next try).
pub fn run(opts: &Options) -> Result<bool> {
    let explicit = opts.ledger.is_some() || std::env::var_os("CELLCHECK_LEDGER_DIR").is_some();
    let dir = opts.ledger.clone().unwrap_or_else(ledger::dir);
    // A ledger the user named must be there: a typo must not read as "nothing to clean".
    if explicit && !dir.is_dir() {
        anyhow::bail!("ledger {} is not a directory", dir.display());
    }
    let (mut found, mut text) = clean(&dir, &registered);
    // The rootfs copies dead harnesses left beside the fixtures of this target dir.
    for r in cellcheck_conformance::roots::reconcile(&cellcheck_conformance::roots::dir()) {
        text.push_str(&ledger::describe(&r));
        text.push('\n');
        found.push(r);
    }
    print!("{text}");
    let failed = found.iter().filter(|r| !r.errors.is_empty()).count();
    if failed > 0 {
        println!("clean: {failed} cell(s) not fully removed; their entries stay in the ledger");
    }
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellcheck_conformance::{audit, ids};
    use cellcheck_contract::CellDocument;

    /// A real host-backend cell whose harness is dead (its ledger entry names a harness start time
    /// that is not this process's) is killed by its recorded pid and start time, its recorded paths
    /// and cgroups that name it are removed, and each is listed; a second clean finds nothing.
    #[test]
    fn clean_removes_and_lists_a_dead_harness_cell() {
        let fx = cellcheck_fixtures::ensure().expect("fixtures");
        let registry = cellcheck_registry::Registry::builtin();
        let host = (registry.get("host").expect("host").factory)(&fx);
        let rt = tokio::runtime::Runtime::new().unwrap();
        if let cellcheck_contract::Availability::Unavailable { reason } =
            rt.block_on(host.preflight())
        {
            panic!("the host backend cannot run here: {reason}");
        }
        let tok = ids::random_token(8);
        let id = format!("cc-{tok}-clean-01");
        let marker = format!("ccm-{tok}-01");
        let mut doc = CellDocument::new(
            &id,
            vec![
                cellcheck_contract::PROBE_PATH.to_string(),
                "hold".to_string(),
            ],
        );
        doc.spec.run.env.push(cellcheck_contract::EnvVar {
            name: ids::MARKER_VAR.into(),
            value: marker.clone(),
        });
        let dir = tempfile::tempdir().unwrap();
        let ledger_dir = dir.path().join("ledger");
        let footprint = host.footprint(&id);
        let mut e = ledger::Entry::new(&id, "host", &marker, footprint.clone());
        // A harness that is not alive: this pid with another start time.
        e.harness_start += 1;
        ledger::write(&ledger_dir, "dead.json", &e).unwrap();
        let h = rt.block_on(host.create(&doc)).expect("create");
        let pid = h.host_pid.expect("the host backend reports a host pid");
        // The cell as a killed run leaves it: its workload started, not half set up.
        let t0 = std::time::Instant::now();
        while cellcheck_fixtures::probe_state(Path::new("/proc"), pid)
            != cellcheck_fixtures::ProbeState::Ready
        {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(15),
                "the probe of {id} (pid {pid}) did not get ready in 15 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let start = audit::start_time(pid).expect("the cell's process runs");
        e.host_pid = Some((pid, start));
        ledger::write(&ledger_dir, "dead.json", &e).unwrap();
        let existing: Vec<PathBuf> = footprint
            .paths
            .iter()
            .chain(&footprint.cgroup_dirs)
            .filter(|p| p.exists() && p.to_string_lossy().contains(&id))
            .cloned()
            .collect();

        // No backend to destroy through: everything goes by record.
        let (found, text) = clean(&ledger_dir, &|_| None);
        // Whatever happens, the instance that made the cell forgets it (it finds nothing left).
        let _ = rt.block_on(host.destroy(&id));
        println!("{text}");
        assert_eq!(found.len(), 1, "{text}");
        assert!(found[0].errors.is_empty(), "{text}");
        assert!(
            text.contains(&format!("recovered cell {id} of backend host")),
            "{text}"
        );
        assert!(
            text.contains(&format!("killed process pid {pid} ")),
            "host pid {pid}: {text}"
        );
        assert!(
            audit::start_time(pid) != Some(start) || {
                let p = audit::processes()
                    .into_iter()
                    .find(|p| p.pid == pid && p.start == start);
                p.is_none_or(|p| !p.runnable())
            },
            "pid {pid} still runs after clean:\n{text}"
        );
        for p in &existing {
            assert!(
                !p.exists(),
                "{} still exists after clean:\n{text}",
                p.display()
            );
            assert!(text.contains(&p.display().to_string()), "{text}");
        }
        assert!(!ledger_dir.join("dead.json").exists(), "{text}");
        let (again, text) = clean(&ledger_dir, &|_| None);
        assert!(again.is_empty(), "{text}");
        assert!(text.contains("nothing to clean"), "{text}");
    }
}
