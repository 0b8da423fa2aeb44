//! The protocol client against misbehaving drivers. The drivers are tiny Python scripts (test
//! fixtures); what is under test is the real client: each misbehaviour must become a typed
//! `BackendFailure` naming what happened, within the deadline, with the driver killed and reaped,
//! and the next call must work again with a fresh driver.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use cellcheck_contract::{Backend, CellDocument, CellError};
use cellcheck_remote::{Deadlines, RemoteBackend, RemoteOptions};
use common::*;

/// Answers the handshake, `list` and `footprint` correctly; misbehaves on `create` per its mode.
const FAKE: &str = r#"
import json, os, signal, subprocess, sys, time
mode = sys.argv[1]
def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line); rid = req["id"]; op = req["op"]
    if op == "hello":
        if mode == "garbage-hello":
            print("hello yourself", flush=True); continue
        send({"v": 1, "id": rid, "result": {"version": 1, "backend": "fake", "driver": "fake " + mode}})
    elif op == "capabilities":
        send({"v": 1, "id": rid, "result": {"exec": {"support": "supported"}}})
    elif op == "attributes":
        send({"v": 1, "id": rid, "result": {"mode": mode}})
    elif op == "list":
        send({"v": 1, "id": rid, "result": {"ids": []}})
    elif op == "footprint":
        send({"v": 1, "id": rid, "result": {"process_markers": [], "cgroup_dirs": [], "paths": [], "mount_markers": [], "netns": []}})
    elif op == "create":
        if mode == "garbage":
            print("<html>502 Bad Gateway</html>", flush=True)
        elif mode == "unknown-op":
            send({"v": 1, "id": rid, "op": "frobnicate", "params": {}})
        elif mode == "unknown-error":
            send({"v": 1, "id": rid, "error": {"error": "frobnicated", "why": "?"}})
        elif mode == "wrong-id":
            send({"v": 1, "id": rid + 1000, "result": {"id": "x", "host_pid": None}})
        elif mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "exit":
            sys.stderr.write("fatal: out of cheese\n"); sys.stderr.flush(); os._exit(3)
        elif mode == "hang":
            # A helper in the driver's process group: it must go when the driver is killed.
            subprocess.Popen(["sleep", "1000"], env={"HELPER": "cellcheck-fake-helper-" + str(os.getpid())})
            time.sleep(1000)
        elif mode == "wrong-shape":
            send({"v": 1, "id": rid, "result": {"pid": "twelve"}})
    else:
        send({"v": 1, "id": rid, "error": {"error": "backend_failure", "reason": "unknown operation " + op, "retry": "not_retryable"}})
"#;

struct Fake {
    _dir: tempfile::TempDir,
    script: std::path::PathBuf,
}

fn fake() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake_driver.py");
    std::fs::File::create(&script)
        .unwrap()
        .write_all(FAKE.as_bytes())
        .unwrap();
    Fake { _dir: dir, script }
}

fn opts(tap: &SchemaTap) -> RemoteOptions {
    RemoteOptions {
        deadlines: Deadlines {
            handshake: Duration::from_secs(5),
            op: Duration::from_millis(1500),
            wait: Duration::from_secs(3),
        },
        ..tap.options()
    }
}

fn backend(f: &Fake, mode: &str, tap: &SchemaTap) -> Result<RemoteBackend, CellError> {
    RemoteBackend::with_options(
        "fake",
        vec![
            "python3".into(),
            f.script.display().to_string(),
            mode.into(),
        ],
        opts(tap),
    )
}

/// The pid in "fake driver (pid N)".
fn driver_pid(msg: &str) -> u32 {
    let at = msg.find("(pid ").expect("message names the driver pid") + 5;
    msg[at..].split(')').next().unwrap().parse().unwrap()
}

fn assert_reaped(pid: u32) {
    // A zombie still has /proc/<pid>; reaped means gone.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "driver {pid} still exists"
    );
}

/// Runs a create against `mode`; returns the failure reason after the common checks.
async fn failing_create(mode: &str) -> String {
    let f = fake();
    let tap = SchemaTap::new();
    let b = backend(&f, mode, &tap).expect("handshake");
    assert_eq!(b.attributes().get("mode").map(String::as_str), Some(mode));
    let start = Instant::now();
    let err = b
        .create(&CellDocument::new(unique_id("fake"), ["/bin/true"]))
        .await
        .expect_err("a misbehaving driver cannot create");
    let took = start.elapsed();
    let reason = match &err {
        CellError::BackendFailure { reason, .. } => reason.clone(),
        other => panic!("{mode}: expected BackendFailure, got {other:?}"),
    };
    assert!(took < Duration::from_secs(5), "{mode}: took {took:?}");
    assert!(reason.contains("during create"), "{mode}: {reason}");
    let pid = driver_pid(&reason);
    assert_reaped(pid);
    // The run goes on: the next call starts a fresh driver that answers.
    assert_eq!(b.list().await, Vec::<String>::new());
    let fresh = b.footprint("x");
    assert_eq!(fresh, cellcheck_contract::Footprint::default());
    // Only the misbehaving driver's own lines may be off-schema (it is the thing misbehaving).
    let tap_errors = tap.errors();
    assert!(tap_errors.len() <= 1, "{mode}: {tap_errors:#?}");
    drop(b);
    reason
}

#[tokio::test]
async fn garbage_line_is_a_named_failure() {
    let r = failing_create("garbage").await;
    assert!(
        r.contains("malformed line") && r.contains("502 Bad Gateway"),
        "{r}"
    );
}

#[tokio::test]
async fn a_request_from_the_driver_is_malformed() {
    let r = failing_create("unknown-op").await;
    assert!(
        r.contains("malformed line") && r.contains("frobnicate"),
        "{r}"
    );
}

#[tokio::test]
async fn an_error_outside_the_contract_is_malformed() {
    let r = failing_create("unknown-error").await;
    assert!(
        r.contains("not a cellcheck error") && r.contains("frobnicated"),
        "{r}"
    );
}

#[tokio::test]
async fn an_answer_to_an_unasked_request_is_malformed() {
    let r = failing_create("wrong-id").await;
    assert!(r.contains("not waiting for an answer"), "{r}");
}

#[tokio::test]
async fn crash_mid_create_names_the_signal() {
    let r = failing_create("crash").await;
    assert!(
        r.contains("driver exited with signal 9 during create"),
        "{r}"
    );
}

#[tokio::test]
async fn exit_mid_create_names_status_and_last_words() {
    let r = failing_create("exit").await;
    assert!(
        r.contains("driver exited with status 3") && r.contains("out of cheese"),
        "{r}"
    );
}

#[tokio::test]
async fn hang_is_cut_at_the_deadline_and_its_helpers_go_too() {
    let r = failing_create("hang").await;
    assert!(
        r.contains("did not answer request")
            && r.contains("within 1500 ms; killed it during create"),
        "{r}"
    );
    let pid = driver_pid(&r);
    let left = residue(
        &cellcheck_contract::Footprint::default(),
        &format!("cellcheck-fake-helper-{pid}"),
    );
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_result_of_the_wrong_shape_is_a_failure_not_a_panic() {
    let f = fake();
    let tap = SchemaTap::new();
    let b = backend(&f, "wrong-shape", &tap).unwrap();
    let err = b
        .create(&CellDocument::new("shape", ["/bin/true"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CellError::BackendFailure { reason, .. } if reason.contains("malformed create result")),
        "{err:?}"
    );
    // The schema check sees the same problem.
    assert_eq!(tap.errors().len(), 1, "{:?}", tap.errors());
}

#[tokio::test]
async fn garbage_at_hello_fails_construction_and_reaps() {
    let f = fake();
    let tap = SchemaTap::new();
    let err = match backend(&f, "garbage-hello", &tap) {
        Ok(_) => panic!("handshake with garbage succeeded"),
        Err(e) => e,
    };
    let reason = err.to_string();
    assert!(
        reason.contains("malformed line") && reason.contains("during hello"),
        "{reason}"
    );
    assert_reaped(driver_pid(&reason));
}

#[tokio::test]
async fn a_missing_driver_program_is_unavailable() {
    let err = match RemoteBackend::new("none", vec!["/nonexistent/driver".into()]) {
        Ok(_) => panic!("started a missing driver"),
        Err(e) => e,
    };
    assert!(matches!(err, CellError::Unavailable { .. }), "{err:?}");
    assert!(matches!(
        RemoteBackend::new("none", vec![]),
        Err(CellError::InvalidSpec { .. })
    ));
}
