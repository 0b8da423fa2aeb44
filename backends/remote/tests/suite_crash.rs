//! A driver that crashes mid-create, run through the conformance suite's own scenario runner: each
//! trial that creates is a failure naming the crash, and the run goes on to the next trial.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellcheck_conformance::run_scenario_bounded;
use cellcheck_remote::RemoteBackend;

/// Answers the handshake and bookkeeping properly, and dies by SIGKILL on every create.
const CRASHER: &str = r#"
import json, os, signal, sys
for line in sys.stdin:
    req = json.loads(line); rid = req["id"]; op = req["op"]
    def ok(r): print(json.dumps({"v": 1, "id": rid, "result": r}), flush=True)
    if op == "hello": ok({"version": 1, "backend": "crasher", "driver": "crasher"})
    elif op == "capabilities": ok({})
    elif op == "attributes": ok({})
    elif op == "preflight": ok({"status": "available", "evidence": "answers"})
    elif op == "list": ok({"ids": []})
    elif op == "footprint": ok({"process_markers": [], "cgroup_dirs": [], "paths": [], "mount_markers": [], "netns": []})
    elif op == "create": os.kill(os.getpid(), signal.SIGKILL)
    else: print(json.dumps({"v": 1, "id": rid, "error": {"error": "not_found", "kind": "cell", "id": req["params"].get("id", "")}}), flush=True)
"#;

#[test]
fn crash_mid_create_fails_each_trial_by_name_and_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("crasher.py");
    std::fs::File::create(&script)
        .unwrap()
        .write_all(CRASHER.as_bytes())
        .unwrap();
    let b = Arc::new(
        RemoteBackend::new(
            "crasher",
            vec!["python3".into(), script.display().to_string()],
        )
        .expect("handshake"),
    );
    let start = Instant::now();
    let scenarios = [
        "lifecycle::create_wait_destroy",
        "exit::code_42",
        "lifecycle::destroy_running",
    ];
    for sc in scenarios {
        let verdict = run_scenario_bounded(b.clone(), sc, Some(Duration::from_secs(30)));
        let msg = verdict.expect_err("a crashing driver cannot pass");
        assert!(
            msg.contains("driver exited with signal 9 during create"),
            "{sc}: {msg}"
        );
    }
    // Trials that never create still run against the restarted driver.
    run_scenario_bounded(
        b.clone(),
        "lifecycle::destroy_unknown",
        Some(Duration::from_secs(30)),
    )
    .expect("destroy of an unknown id is answered by a fresh driver");
    assert!(start.elapsed() < Duration::from_secs(60));
}
