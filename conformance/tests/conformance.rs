//! This repository's own conformance run: every built-in backend, one trial per scenario.
//!
//! `CELLCHECK_BACKENDS=host,runc` restricts the listed backends.

use std::process::ExitCode;
use std::sync::Arc;

use cellcheck_conformance::Suite;

/// Every built-in backend, registered by factory (constructed lazily, once per process).
fn builtin(suite: Suite) -> Suite {
    let suite = suite
        .backend_with_fixtures("host", |fx| {
            Arc::new(cellcheck_host::HostBackend::new(
                cellcheck_host::HostConfig::from_fixtures(fx),
            ))
        })
        .backend_with_fixtures("qemu", |fx| {
            Arc::new(cellcheck_qemu::QemuBackend::new(
                cellcheck_qemu::QemuConfig::from_fixtures(fx),
            ))
        })
        .backend_with_fixtures("runc", |fx| {
            Arc::new(cellcheck_oci::OciBackend::runc(
                cellcheck_oci::OciConfig::from_fixtures(fx),
            ))
        })
        .backend_with_fixtures("crun", |fx| {
            Arc::new(cellcheck_oci::OciBackend::crun(
                cellcheck_oci::OciConfig::from_fixtures(fx),
            ))
        })
        .backend_with_fixtures("runsc", |fx| {
            Arc::new(cellcheck_oci::OciBackend::runsc(
                cellcheck_oci::OciConfig::from_fixtures(fx),
            ))
        })
        .backend_with_fixtures("nested", cellcheck_remote::nested::NestedBackend::for_suite)
        .backend_with_fixtures("remote-python", |fx| {
            cellcheck_remote::remote_or_unavailable(
                "remote-python",
                cellcheck_remote::python_runc_driver_argv(fx),
            )
        });
    // Any other driver: CELLCHECK_REMOTE_DRIVER="cmd args" runs as backend `remote`.
    match std::env::var(cellcheck_remote::DRIVER_ENV) {
        Ok(cmd) if !cmd.trim().is_empty() => suite.backend_with_fixtures("remote", move |_| {
            cellcheck_remote::remote_or_unavailable(
                "remote",
                cmd.split_whitespace().map(String::from).collect(),
            )
        }),
        _ => suite,
    }
}

fn main() -> ExitCode {
    builtin(Suite::new()).run_from_args()
}
