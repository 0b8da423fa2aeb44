//! runsc (gVisor), driven for real. Skipped (with the preflight's reason) where runsc cannot run.

mod common;

use cellcheck_contract::{Backend, CellError, ResourceKind, Termination};
use cellcheck_oci::RuntimeKind;
use common::*;

const KIND: RuntimeKind = RuntimeKind::Runsc;

/// The `NAME=value` entries of a probe's NUL-separated env dump, sorted: runsc may reorder them.
fn env_set(stdout: &[u8]) -> Vec<&[u8]> {
    let mut got: Vec<&[u8]> = stdout
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .collect();
    got.sort();
    got
}

// missing program, duplicate/concurrent destroy, deadline, pause/resume: as for every runtime.
common::shared_tests!(KIND);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_signal_are_distinct() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("exit");
    b.create(&doc(&a, &[PROBE, "exit", "137"])).await.unwrap();
    exit_137_is_reported_twice(&b, &a).await;
    // As pid 1 the workload cannot die of its own signal; runsc kill delivers one from outside.
    let s = id("sig");
    let h = b.create(&doc(&s, &[PROBE, "hold"])).await.unwrap();
    assert!(
        h.host_pid.is_none(),
        "the sandbox pid is not the workload's"
    );
    let rt = b.runtime().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let out = rt.run(&["kill", &b.container_id(&s), "KILL"]).await;
    assert!(out.ok, "{}", out.stderr);
    signal_9_is_reported_then_both_go(&b, &a, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_is_exactly_the_declared_set_and_fds_are_0_1_2() {
    let Some(b) = backend(KIND).await else { return };
    common::env_is_exactly_the_declared_set_and_fds_are_0_1_2(&b, |r| {
        // runsc does not always keep the declared order once HOME is declared (seen: HOME first),
        // so this runtime-specific test pins the set; the strict ordered rule stays in the
        // conformance suite, where runsc's env scenarios are recorded known failures.
        assert_eq!(
            env_set(&r.stdout),
            vec![&b"A=x y"[..], b"HOME=/h", b"Z=last=1"]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gets_exact_env_and_status() {
    let Some(b) = backend(KIND).await else { return };
    common::exec_gets_exact_env_and_status(&b, |r| {
        // As for the workload, runsc may move a declared HOME first: pin the set here.
        assert_eq!(env_set(&r.stdout), vec![&b"E=2"[..], b"HOME=/"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_into_a_new_id_and_the_counter_continues() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("snap-src");
    b.create(&doc(&a, &[PROBE, "count", "/tmp/n", "50"]))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let snap = b.snapshot(&a).await.unwrap();
    assert_eq!(snap.source, a);
    let read = |id: String| {
        let b = b.clone();
        async move {
            let r = read_counter(&b, &id).await;
            r.stdout_str().trim().parse::<u64>().unwrap()
        }
    };
    b.destroy(&a).await.unwrap();
    let c = id("snap-dst");
    b.restore(&snap, &c).await.unwrap();
    let n1 = read(c.clone()).await;
    assert!(
        n1 >= 5,
        "restored counter starts from the snapshot's value, got {n1}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let n2 = read(c.clone()).await;
    assert!(n2 > n1, "counter continues after restore: {n1} -> {n2}");
    assert!(matches!(
        b.restore(&snap, &c).await,
        Err(CellError::AlreadyExists { .. })
    ));
    b.destroy(&c).await.unwrap();
    b.delete_snapshot(&snap).await.unwrap();
    assert!(matches!(
        b.delete_snapshot(&snap).await,
        Err(CellError::NotFound {
            kind: ResourceKind::Snapshot,
            ..
        })
    ));
    assert_no_residue(&b, &a);
    assert_no_residue(&b, &c);
    assert_clean_root(&b);
}

/// A workload still running when its exit is awaited: runsc's own `wait` then answers with a
/// folded `128+N` code, which read as a raw wait status turned exit 7 into signal 7. The exit
/// status comes from the sandbox's exact report instead: codes stay codes (even 129..=192, where
/// a folded code is ambiguous) and signals stay signals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_is_exact_when_the_workload_outlives_the_wait() {
    let Some(b) = backend(KIND).await else { return };
    for code in [7, 42, 137] {
        let a = id("late");
        let script = format!("sleep 1; exit {code}");
        b.create(&doc(&a, &["/bin/sh", "-c", &script]))
            .await
            .unwrap();
        let r = b.wait(&a).await.unwrap();
        assert_eq!(r.termination, Termination::Exited { code }, "{script}");
        b.destroy(&a).await.unwrap();
        assert_no_residue(&b, &a);
    }
}
