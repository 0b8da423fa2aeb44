//! Real cells on this host (root only): timeout and TTL, pause, exec, many creators at once, and
//! the trace every operation leaves. Nothing of a cell may be left after a test.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use cellcheck_contract::{
    Backend, CellDocument, CellError, EnvVar, ExecRequest, ResourceKind, Termination, PROBE_PATH,
};
use cellcheck_host::HostBackend;

use common::*;
#[tokio::test]
async fn timeout_kills_and_keeps_the_cell_listed() {
    let Some(b) = backend() else { return };
    let d = probe(&["hold"]).with_timeout_ms(300);
    let id = d.spec.id.clone();
    let h = b.create(&d).await.unwrap();
    let pid = h.host_pid.unwrap();
    let t0 = Instant::now();
    let e = b.wait(&id).await.unwrap_err();
    assert_eq!(e, CellError::DeadlineExceeded { after_ms: 300 });
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "workload killed"
    );
    assert_eq!(b.list().await, vec![id.clone()]);
    assert_eq!(b.wait(&id).await.unwrap_err(), e);
    finish(&b, &id).await;
}

#[tokio::test]
async fn timeout_is_enforced_without_a_waiter() {
    let Some(b) = backend() else { return };
    let d = probe(&["hold"]).with_timeout_ms(200);
    let id = d.spec.id.clone();
    let pid = b.create(&d).await.unwrap().host_pid.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "workload killed"
    );
    assert!(matches!(
        b.wait(&id).await,
        Err(CellError::DeadlineExceeded { .. })
    ));
    finish(&b, &id).await;
}

#[tokio::test]
async fn ttl_reaper_destroys_the_cell() {
    let Some(b) = backend() else { return };
    let d = probe(&["hold"]).with_ttl_seconds(1);
    let id = d.spec.id.clone();
    let fp = b.footprint(&id);
    b.create(&d).await.unwrap();
    let t0 = Instant::now();
    while b.list().await.contains(&id) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ttl reaper did not run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t0.elapsed() >= Duration::from_millis(800));
    assert_eq!(
        b.destroy(&id).await.unwrap_err(),
        CellError::cell_not_found(&id)
    );
    assert_clean(&fp);
}

fn read_count(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/root/tmp/count"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    let Some(b) = backend() else { return };
    let d = probe(&["count", "/tmp/count", "10"]);
    let id = d.spec.id.clone();
    let pid = b.create(&d).await.unwrap().host_pid.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.pause(&id).await.unwrap();
    let a = read_count(pid);
    assert!(a > 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_count(pid), a, "frozen");
    let e = b
        .exec(
            &id,
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CellError::InvalidState { .. }), "{e:?}");
    b.resume(&id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(read_count(pid) > a, "thawed");
    // Destroying a paused cell works too.
    b.pause(&id).await.unwrap();
    let t = b.destroy(&id).await.unwrap();
    assert!(t.killed_running);
    assert_clean(&b.footprint(&id));
}

#[tokio::test]
async fn exec_runs_in_the_cell_with_its_own_env() {
    let Some(b) = backend() else { return };
    let d = probe(&["hold"]).with_env("WORKLOAD", "1");
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let run = |argv: &[&str], env: &[(&str, &str)]| ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(n, v)| EnvVar {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        timeout_ms: None,
    };
    let r = b
        .exec(&id, run(&[PROBE_PATH, "hostname"], &[]))
        .await
        .unwrap();
    assert_eq!(r.stdout_str(), format!("{id}\n"));
    let r = b
        .exec(&id, run(&[PROBE_PATH, "env"], &[("X", "1")]))
        .await
        .unwrap();
    assert_eq!(r.stdout, b"X=1\0");
    let r = b.exec(&id, run(&[PROBE_PATH, "fds"], &[])).await.unwrap();
    assert_eq!(r.stdout_str(), "0 1 2\n");
    // Same pid namespace: the workload is there.
    let r = b.exec(&id, run(&[PROBE_PATH, "pids"], &[])).await.unwrap();
    assert!(r.stdout_str().starts_with("1 2 "), "{}", r.stdout_str());
    let r = b
        .exec(&id, run(&["/bin/sh", "-c", "echo e >&2; exit 3"], &[]))
        .await
        .unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 3 });
    assert_eq!(r.stderr_str(), "e\n");
    let e = b.exec(&id, run(&["/nope"], &[])).await.unwrap_err();
    assert_eq!(
        e,
        CellError::NotFound {
            kind: ResourceKind::Program,
            id: "/nope".into()
        }
    );
    let mut slow = run(&[PROBE_PATH, "hold"], &[]);
    slow.timeout_ms = Some(200);
    assert_eq!(
        b.exec(&id, slow).await.unwrap_err(),
        CellError::DeadlineExceeded { after_ms: 200 }
    );
    // The timed-out command is gone: only the cell's init, the workload and this probe remain.
    let r = b.exec(&id, run(&[PROBE_PATH, "pids"], &[])).await.unwrap();
    let out = r.stdout_str();
    let me = out.lines().nth(1).unwrap().trim_start_matches("self=");
    assert_eq!(
        out.lines().next(),
        Some(format!("1 2 {me}").as_str()),
        "{out}"
    );
    assert!(matches!(
        b.exec("nope", run(&["/bin/true"], &[])).await,
        Err(CellError::NotFound {
            kind: ResourceKind::Cell,
            ..
        })
    ));
    finish(&b, &id).await;
}

#[tokio::test]
async fn an_invalid_exec_request_is_refused_naming_the_field_and_runs_nothing() {
    let Some(b) = backend() else { return };
    let d = probe(&["sleep", "30000"]);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let files = |b: &HostBackend| -> BTreeSet<String> {
        std::fs::read_dir(b.state_dir(&id))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let before = files(&b);
    let bad = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), "echo ran > /tmp/ran".into()],
        env: vec![EnvVar {
            name: "A=B".into(),
            value: "v".into(),
        }],
        timeout_ms: None,
    };
    match b.exec(&id, bad).await {
        Err(CellError::InvalidSpec { field, .. }) => assert_eq!(field, "exec.env[0].name"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    assert_eq!(files(&b), before, "an exec refused at admission left files");
    // Nothing ran: the probe's cell has no /tmp/ran.
    let check = b
        .exec(
            &id,
            ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), "test ! -e /tmp/ran".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(check.code(), Some(0), "{check:?}");
    finish(&b, &id).await;
}

#[tokio::test]
async fn exec_after_the_workload_ended_is_invalid_state() {
    let Some(b) = backend() else { return };
    let d = probe(&["exit", "0"]);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    b.wait(&id).await.unwrap();
    let e = b
        .exec(
            &id,
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CellError::InvalidState { .. }), "{e:?}");
    finish(&b, &id).await;
}

/// Set by `two_processes_churn_at_once` for its child processes: they churn, nothing else.
const CHURN_CHILD_ENV: &str = "CELLCHECK_HOST_CHURN_CHILD";

/// 32 creators at once, each running short cells back to back on one backend: the load under
/// which shared parents (cgroup, state root) are removed while another create is between its
/// mkdirs, and the init's status lines arrive in any order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_creators_never_fail() {
    let Some(b) = backend() else { return };
    let rounds = 4;
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut errors = Vec::new();
                for r in 0..rounds {
                    let id = format!("churn{}-{t}-{r}", std::process::id());
                    let doc = CellDocument::new(&id, ["/bin/sh", "-c", &format!("exit {t}")]);
                    let fp = b.footprint(&id);
                    match b.create(&doc).await {
                        Ok(_) => {
                            match b.wait(&id).await {
                                Ok(rep) if rep.code() == Some(t) => {}
                                other => errors.push(format!("{id}: wait: {other:?}")),
                            }
                            if let Err(e) = b.destroy(&id).await {
                                errors.push(format!("{id}: destroy: {e}"));
                            }
                        }
                        Err(e) => errors.push(format!("{id}: create: {e}")),
                    }
                    assert_clean(&fp);
                }
                errors
            })
        })
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());
    assert!(b.list().await.is_empty());
    if std::env::var_os(CHURN_CHILD_ENV).is_none() {
        assert!(!b.config().state_root.exists(), "state root left");
    }
}

/// The same churn in two processes at once: nextest runs each trial in a process of its own, so
/// backends in different processes share the `cellcheck` cgroup parents and the state base.
#[test]
fn two_processes_churn_at_once() {
    if backend().is_none() {
        return;
    }
    cellcheck_host::test_support::run_test_in_processes(
        "thirty_two_concurrent_creators_never_fail",
        2,
        (CHURN_CHILD_ENV, "1"),
    );
}

/// Every operation is a span naming its cell, with events at its key steps, so a failing trial
/// can show what the backend did on the way.
#[tokio::test]
#[tracing_test::traced_test]
async fn operations_are_traced_with_the_cell_id() {
    let Some(b) = backend() else { return };
    let d = probe(&["sleep", "30000"]);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    b.pause(&id).await.unwrap();
    b.resume(&id).await.unwrap();
    let r = b
        .exec(
            &id,
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.code(), Some(0));
    let fp = b.footprint(&id);
    let rep = b.destroy(&id).await.unwrap();
    assert!(rep.killed_running);
    assert_clean(&fp);
    assert_eq!(
        b.wait(&id).await.unwrap_err(),
        CellError::cell_not_found(&id)
    );
    for (op, event) in [
        ("create", "cgroup made"),
        ("create", "init spawned"),
        ("create", "pid 1 reported"),
        ("pause", "freezer state reached"),
        ("resume", "freezer state reached"),
        ("exec", "exec command started"),
        ("destroy", "teardown killed"),
        ("wait", "failed"),
    ] {
        let span = format!("op=\"{op}\" backend=host cell={id}");
        logs_assert(|lines: &[&str]| {
            lines
                .iter()
                .any(|l| l.contains(&span) && l.contains(event))
                .then_some(())
                .ok_or(format!("no {event:?} in a {op} span of {id}"))
        });
    }
    logs_assert(|lines: &[&str]| {
        let line = lines
            .iter()
            .find(|l| l.contains("teardown killed") && l.contains(&id))
            .ok_or("no teardown event")?;
        // The workload (and pid 1 with the init) were running: at least the workload died.
        match line
            .split("tasks=")
            .nth(1)
            .and_then(|t| t.split(' ').next())
        {
            Some(n) if n.parse::<usize>().map_err(|e| e.to_string())? >= 1 => Ok(()),
            other => Err(format!("teardown killed {other:?} tasks: {line}")),
        }
    });
}
