//! runc, driven for real. Skipped (with the preflight's reason) where runc cannot run.

mod common;

use cellcheck_contract::Backend;
use cellcheck_oci::RuntimeKind;
use common::*;

const KIND: RuntimeKind = RuntimeKind::Runc;

// missing program, duplicate/concurrent destroy, deadline, pause/resume: as for every runtime.
common::shared_tests!(KIND);
// Exit code and signal apart, the workload killed from the host: as for crun.
common::shared_tests!(@each KIND; exit_code_and_signal_are_distinct);

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

/// Every operation is a span naming its cell, with the runtime commands and their status as
/// events, so a failing trial can show what the backend did on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[tracing_test::traced_test]
async fn operations_are_traced_with_the_cell_id() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("trace");
    b.create(&doc(&a, &[PROBE, "hold"])).await.unwrap();
    let r = b
        .exec(
            &a,
            cellcheck_contract::ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.code(), Some(0));
    assert!(b.destroy(&a).await.unwrap().killed_running);
    assert!(b.wait(&a).await.is_err());
    assert_no_residue(&b, &a);
    // The monitor's span (`op="monitor"`) has no parent, so it is outside the test's own span
    // that `logs_assert` looks in.
    for (op, event) in [
        ("create", "runtime create ended"),
        ("create", "cmd=start"),
        ("exec", "runtime exec --detach ended"),
        ("exec", "exec'd process ended"),
        ("destroy", "teardown begins"),
        ("destroy", "cmd=delete --force"),
        ("destroy", "teardown over"),
        ("wait", "failed"),
    ] {
        let (op_field, cell) = (format!("op=\"{op}\""), format!("cell={a}"));
        logs_assert(|lines: &[&str]| {
            lines
                .iter()
                .any(|l| l.contains(&op_field) && l.contains(&cell) && l.contains(event))
                .then_some(())
                .ok_or(format!("no {event:?} in a {op} span of {a}"))
        });
    }
}

/// `runc pause` on a cgroup v1 host gives up after about 1,000 reads of `FREEZING`, thawing
/// between tries, so a cell whose tasks wait for a CPU fails with "unable to freeze" on a loaded
/// host. Every core is kept busy here (two spinning threads per core) while a four-process
/// tree is paused and resumed again and again: each pause must reach the frozen state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[tracing_test::traced_test]
async fn pause_freezes_a_tree_while_every_core_is_busy() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(b) = backend(KIND).await else { return };
    let a = id("pause-load");
    b.create(&doc(&a, &[PROBE, "tree", "3"])).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..2 * cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for round in 0..30 {
        match b.pause(&a).await {
            Ok(()) => b.resume(&a).await.unwrap(),
            Err(e) => failures.push(format!("round {round}: {e}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    b.destroy(&a).await.unwrap();
    assert_no_residue(&b, &a);
    assert!(
        failures.is_empty(),
        "pause failed under load: {failures:#?}"
    );
}
