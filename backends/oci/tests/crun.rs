//! crun, driven for real. On a hybrid cgroup host crun runs without the cgroup2 mount (in a
//! private mount namespace), so these run here too; where crun cannot run at all the backend must
//! say so with crun's own words and create nothing.

mod common;

use cellcheck_contract::{Availability, Backend, CellError, Limits, Termination};
use cellcheck_oci::{OciBackend, OciConfig, RuntimeKind};
use common::*;

const KIND: RuntimeKind = RuntimeKind::Crun;

// missing program, duplicate/concurrent destroy, deadline, pause/resume: as for every runtime.
common::shared_tests!(KIND);
// Exit code and signal apart, the workload killed from the host: as for runc.
common::shared_tests!(@each KIND; exit_code_and_signal_are_distinct);

/// crun manages the cell's cgroups itself (v1 here, through the private mount namespace): a
/// memory limit holds and its OOM kill is reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_is_enforced_and_reported_as_oom() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("oom");
    let d = doc(&a, &[PROBE, "alloc", "512"]).with_limits(Limits {
        memory_max_bytes: Some(32 << 20),
        ..Limits::default()
    });
    b.create(&d).await.unwrap();
    let r = b.wait(&a).await.unwrap();
    assert_eq!(
        r.termination,
        Termination::OutOfMemory,
        "{}",
        r.stderr_str()
    );
    b.destroy(&a).await.unwrap();
    assert_no_residue(&b, &a);
}

/// The private mount namespace crun runs in never leaks into the host's mount table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_mount_table_is_left_alone() {
    let before = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let Some(b) = backend(KIND).await else { return };
    let a = id("mounts");
    b.create(&doc(&a, &[PROBE, "exit", "0"])).await.unwrap();
    b.wait(&a).await.unwrap();
    b.destroy(&a).await.unwrap();
    let after = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let cgroup_mounts = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("cgroup"))
            .map(String::from)
            .collect()
    };
    assert_eq!(cgroup_mounts(&before), cgroup_mounts(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_is_functional_and_leaves_nothing() {
    let fx = cellcheck_fixtures::ensure().unwrap();
    let b = OciBackend::crun(OciConfig::from_fixtures(&fx));
    match b.preflight().await {
        Availability::Available { evidence } => {
            assert!(evidence.contains("exited 0"), "{evidence}");
            let id = common::id("crun");
            b.create(&common::doc(&id, &["/bin/true"])).await.unwrap();
            assert_eq!(b.wait(&id).await.unwrap().code(), Some(0));
            b.destroy(&id).await.unwrap();
        }
        Availability::Unavailable { reason } => {
            eprintln!("crun unavailable: {reason}");
            assert!(!reason.trim().is_empty());
            let id = common::id("crun");
            let e = b
                .create(&common::doc(&id, &["/bin/true"]))
                .await
                .unwrap_err();
            assert!(!matches!(e, CellError::InvalidSpec { .. }), "{e:?}");
            common::assert_no_residue(&b, &id);
        }
    }
    common::assert_clean_root(&b);
}
