//! runc, driven for real. Skipped (with the preflight's reason) where runc cannot run.

mod common;

use cellcheck_contract::Backend;
use cellcheck_oci::RuntimeKind;
use common::*;

const KIND: RuntimeKind = RuntimeKind::Runc;

// missing program, duplicate/concurrent destroy, deadline, pause/resume: as for every runtime.
common::shared_tests!(KIND);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_signal_are_distinct() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("exit");
    let h = b.create(&doc(&a, &[PROBE, "exit", "137"])).await.unwrap();
    assert!(h.host_pid.is_some());
    exit_137_is_reported_twice(&b, &a).await;
    // As pid 1 of its namespace the workload cannot die of its own signal: kill it from the host.
    let s = id("sig");
    let h = b.create(&doc(&s, &[PROBE, "hold"])).await.unwrap();
    let pid = h.host_pid.expect("runc reports the host pid") as i32;
    // SAFETY: kill(2) of the container init we just started (the shim holds it unreaped).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    signal_9_is_reported_then_both_go(&b, &a, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_is_exactly_the_declared_set_and_fds_are_0_1_2() {
    let Some(b) = backend(KIND).await else { return };
    common::env_is_exactly_the_declared_set_and_fds_are_0_1_2(&b, |r| {
        assert_eq!(r.stdout, b"Z=last=1\0HOME=/h\0A=x y\0".to_vec());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gets_exact_env_and_status() {
    let Some(b) = backend(KIND).await else { return };
    common::exec_gets_exact_env_and_status(&b, |r| {
        assert_eq!(r.stdout, b"E=2\0HOME=/\0".to_vec());
    })
    .await;
}
