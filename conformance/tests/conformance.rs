//! This repository's own conformance run: every built-in backend, one trial per scenario.
//!
//! `CELLCHECK_BACKENDS=host,runc` restricts the listed backends.

use std::process::ExitCode;
use std::sync::Arc;

use cellcheck_conformance::Suite;

/// Every built-in backend, registered by factory (constructed lazily, once per process).
fn builtin(suite: Suite) -> Suite {
    suite.backend_with_fixtures("host", |fx| {
        Arc::new(cellcheck_host::HostBackend::new(
            cellcheck_host::HostConfig::from_fixtures(fx),
        ))
    })
}

fn main() -> ExitCode {
    builtin(Suite::new()).run_from_args()
}
