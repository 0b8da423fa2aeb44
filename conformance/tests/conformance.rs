//! This repository's own conformance run: every built-in backend, one trial per scenario.
//!
//! The backends come from `cellcheck-registry`, the one list of built-in backends.
//! `CELLCHECK_BACKENDS=host,runc` restricts the listed backends; `CELLCHECK_<NAME>_DRIVER="cmd
//! args"` adds an outside driver as backend `<name>` (`CELLCHECK_REMOTE_DRIVER`: `remote`). Known
//! failures: `matrix/expectations.toml`, or the file `CELLCHECK_EXPECTATIONS` names.

use std::process::ExitCode;

use cellcheck_conformance::expectations::Expectations;
use cellcheck_conformance::Suite;
use cellcheck_registry::Registry;

fn main() -> ExitCode {
    let mut suite = Suite::new().expectations_file(Expectations::repository_file());
    for entry in Registry::builtin().with_env_drivers().entries() {
        let factory = entry.factory.clone();
        suite = match &entry.configured_by {
            Some(what) => suite.configured_backend(&entry.name, what, move |fx| factory(fx)),
            None => suite.backend_with_fixtures(&entry.name, move |fx| factory(fx)),
        };
    }
    suite.run_from_args()
}
