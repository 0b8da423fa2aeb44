//! runsc (gVisor), driven for real. Skipped (with the preflight's reason) where runsc cannot run.

mod common;

use cellcheck_contract::{Backend, CellError, EnvVar, ExecRequest, ResourceKind, Termination};
use cellcheck_oci::RuntimeKind;
use common::*;

const KIND: RuntimeKind = RuntimeKind::Runsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_signal_are_distinct() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("exit");
    b.create(&doc(&a, &[PROBE, "exit", "137"])).await.unwrap();
    let r = b.wait(&a).await.unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 137 });
    assert_eq!(
        b.wait(&a).await.unwrap(),
        r,
        "a second wait returns the same report"
    );
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
    let r2 = b.wait(&s).await.unwrap();
    assert_eq!(r2.termination, Termination::Signaled { signal: 9 });
    let t = b.destroy(&a).await.unwrap();
    assert!(!t.killed_running);
    assert_eq!(t.remaining_cells, 1);
    assert_eq!(b.destroy(&s).await.unwrap().remaining_cells, 0);
    assert_no_residue(&b, &a);
    assert_no_residue(&b, &s);
    assert_clean_root(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_is_exactly_the_declared_set_and_fds_are_0_1_2() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("env");
    let d = doc(&a, &[PROBE, "env"])
        .with_env("Z", "last=1")
        .with_env("HOME", "/h")
        .with_env("A", "x y");
    b.create(&d).await.unwrap();
    let r = b.wait(&a).await.unwrap();
    assert_eq!(r.code(), Some(0), "{}", r.stderr_str());
    // runsc does not always keep the declared order once HOME is declared (seen: HOME first), so
    // this runtime-specific test pins the set; the strict ordered rule stays in the conformance
    // suite, where runsc's env scenarios are recorded known failures.
    let mut got: Vec<&[u8]> = r
        .stdout
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .collect();
    got.sort();
    assert_eq!(got, vec![&b"A=x y"[..], b"HOME=/h", b"Z=last=1"]);
    b.destroy(&a).await.unwrap();
    // Without a declared HOME the runtime itself appends one (a recorded known failure of
    // isolation::environ_exact); pinned here so a runtime that stops doing it is noticed.
    let h = id("home");
    b.create(&doc(&h, &[PROBE, "env"]).with_env("Z", "1"))
        .await
        .unwrap();
    let r = b.wait(&h).await.unwrap();
    assert!(r.stdout.starts_with(b"Z=1\0HOME="), "{:?}", r.stdout_str());
    assert_eq!(
        r.stdout.iter().filter(|&&c| c == 0).count(),
        2,
        "{:?}",
        r.stdout_str()
    );
    b.destroy(&h).await.unwrap();
    let f = id("fds");
    b.create(&doc(&f, &[PROBE, "fds"])).await.unwrap();
    let r = b.wait(&f).await.unwrap();
    assert_eq!(r.stdout_str().trim(), "0 1 2");
    b.destroy(&f).await.unwrap();
    assert_no_residue(&b, &a);
    assert_clean_root(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_program_is_not_found_and_leaves_nothing() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("missing");
    let e = b
        .create(&doc(&a, &["/bin/no-such-program"]))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        CellError::NotFound {
            kind: ResourceKind::Program,
            id: "/bin/no-such-program".into()
        }
    );
    assert!(b.list().await.is_empty());
    assert_no_residue(&b, &a);
    assert_clean_root(&b);
    // The id is free again.
    b.create(&doc(&a, &["/bin/true"])).await.unwrap();
    assert_eq!(b.wait(&a).await.unwrap().code(), Some(0));
    b.destroy(&a).await.unwrap();
    assert_clean_root(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_destroy_twice_and_concurrent_destroys() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("dup");
    b.create(&doc(&a, &[PROBE, "hold"])).await.unwrap();
    assert!(matches!(
        b.create(&doc(&a, &[PROBE, "hold"])).await,
        Err(CellError::AlreadyExists { .. })
    ));
    let (x, y) = tokio::join!(b.destroy(&a), b.destroy(&a));
    assert_eq!(x.is_ok() as u8 + y.is_ok() as u8, 1, "{x:?} {y:?}");
    let ok = x.or(y).unwrap();
    assert!(ok.killed_running);
    assert!(matches!(
        b.destroy(&a).await,
        Err(CellError::NotFound { .. })
    ));
    assert_no_residue(&b, &a);
    assert_clean_root(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_and_reports_deadline() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("deadline");
    b.create(&doc(&a, &[PROBE, "hold"]).with_timeout_ms(500))
        .await
        .unwrap();
    let e = b.wait(&a).await.unwrap_err();
    assert_eq!(e, CellError::DeadlineExceeded { after_ms: 500 });
    assert_eq!(b.list().await, vec![a.clone()]);
    b.destroy(&a).await.unwrap();
    assert_no_residue(&b, &a);
    assert_clean_root(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gets_exact_env_and_status() {
    let Some(b) = backend(KIND).await else { return };
    let a = id("exec");
    b.create(&doc(&a, &[PROBE, "hold"]).with_env("W", "1"))
        .await
        .unwrap();
    let req = |argv: &[&str]| ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![
            EnvVar {
                name: "E".into(),
                value: "2".into(),
            },
            EnvVar {
                name: "HOME".into(),
                value: "/".into(),
            },
        ],
        timeout_ms: Some(10_000),
    };
    let r = b.exec(&a, req(&[PROBE, "env"])).await.unwrap();
    // As for the workload, runsc may move a declared HOME first: pin the set here.
    let mut got: Vec<&[u8]> = r
        .stdout
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .collect();
    got.sort();
    assert_eq!(got, vec![&b"E=2"[..], b"HOME=/"]);
    let r = b.exec(&a, req(&[PROBE, "signal", "TERM"])).await.unwrap();
    assert_eq!(r.termination, Termination::Signaled { signal: 15 });
    let r = b.exec(&a, req(&[PROBE, "exit", "7"])).await.unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 7 });
    let e = b.exec(&a, req(&["/bin/nope"])).await.unwrap_err();
    assert!(
        matches!(
            e,
            CellError::NotFound {
                kind: ResourceKind::Program,
                ..
            }
        ),
        "{e:?}"
    );
    b.destroy(&a).await.unwrap();
    assert_no_residue(&b, &a);
    assert_clean_root(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_freeze_the_counter() {
    let Some(b) = backend(KIND).await else { return };
    pause_resume(&b).await;
}

pub async fn pause_resume(b: &cellcheck_oci::OciBackend) {
    let a = id("pause");
    b.create(&doc(&a, &[PROBE, "count", "/tmp/n", "20"]))
        .await
        .unwrap();
    let read = || async {
        let r = b
            .exec(
                &a,
                ExecRequest {
                    argv: vec![PROBE.into(), "cat".into(), "/tmp/n".into()],
                    env: vec![],
                    timeout_ms: Some(10_000),
                },
            )
            .await
            .unwrap();
        r.stdout_str().trim().parse::<u64>().unwrap_or(0)
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    b.pause(&a).await.unwrap();
    assert!(matches!(
        b.exec(
            &a,
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            }
        )
        .await,
        Err(CellError::InvalidState { .. })
    ));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    b.resume(&a).await.unwrap();
    let n1 = read().await;
    b.pause(&a).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    b.resume(&a).await.unwrap();
    let n2 = read().await;
    assert!(
        n2 >= n1 && n2 < n1 + 10,
        "counter moved while paused: {n1} -> {n2}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let n3 = read().await;
    assert!(
        n3 > n2 + 3,
        "counter did not continue after resume: {n2} -> {n3}"
    );
    b.destroy(&a).await.unwrap();
    assert_no_residue(b, &a);
    assert_clean_root(b);
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
            let r = b
                .exec(
                    &id,
                    ExecRequest {
                        argv: vec![PROBE.into(), "cat".into(), "/tmp/n".into()],
                        env: vec![],
                        timeout_ms: Some(10_000),
                    },
                )
                .await
                .unwrap();
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
