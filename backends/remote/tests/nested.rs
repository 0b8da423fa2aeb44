//! Cell in cell for real: the host backend creates an outer cell running the static
//! `cellcheck-driver host`, which creates the inner cell. The residue check covers both layers.

mod common;

use std::time::Duration;

use cellcheck_contract::{Backend, CellDocument, CellError, ResourceKind, Termination};
use cellcheck_remote::nested::{ensure_static_driver, NestedBackend};
use common::*;

fn nested() -> Option<(NestedBackend, SchemaTap)> {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the host backend needs root");
        return None;
    }
    let fx = fixtures();
    let driver = ensure_static_driver(&fx).expect("static driver");
    let tap = SchemaTap::new();
    Some((NestedBackend::new(&fx, driver, tap.options()), tap))
}

/// Also: every operation is a span naming its cell, with the outer cell, the driver's handshake
/// and each driver request as events, and the outer host backend's spans inside them.
#[tokio::test]
#[tracing_test::traced_test]
async fn nested_lifecycle_sees_through_both_layers() {
    let Some((b, tap)) = nested() else { return };
    let pre = b.preflight().await;
    assert!(pre.is_available(), "{pre:?}");

    let id = unique_id("nest");
    let fp = b.footprint(&id);
    let outer_id = b.outer_id(&id);
    assert!(
        fp.process_markers.iter().any(|m| m.contains(&outer_id)),
        "outer layer in the footprint: {fp:?}"
    );
    assert!(fp.cgroup_dirs.len() >= 2, "both layers' cgroups: {fp:?}");
    let doc = CellDocument::new(&id, ["/bin/sleep", "30"]).with_env("NESTED_MARK", &id);
    let h = b.create(&doc).await.unwrap();
    assert!(matches!(
        b.create(&doc).await,
        Err(CellError::AlreadyExists { .. })
    ));
    // The pid the inner backend reports is translated to the host's.
    let pid = h.host_pid.expect("host pid translated");
    assert!(cellcheck_fixtures::await_exec_settled(
        pid,
        std::time::Duration::from_secs(10)
    ));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_eq!(environ, format!("NESTED_MARK={id}\0").into_bytes());
    let existing: Vec<_> = fp.cgroup_dirs.iter().filter(|d| d.exists()).collect();
    assert!(
        existing.len() >= 2,
        "inner and outer cgroups exist while live: {existing:?}"
    );
    assert_eq!(b.list().await, vec![id.clone()]);
    let t = b.destroy(&id).await.unwrap();
    assert!(t.killed_running);
    assert_eq!(t.remaining_cells, 0);
    assert_no_residue(&fp, &id);
    assert!(matches!(
        b.destroy(&id).await,
        Err(CellError::NotFound { .. })
    ));

    // Exit codes and output come back through both layers; the same id runs again.
    b.create(&CellDocument::new(
        &id,
        ["/bin/sh", "-c", "echo in; exit 5"],
    ))
    .await
    .unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 5 });
    assert_eq!(r.stdout_str(), "in\n");
    b.destroy(&id).await.unwrap();
    assert_no_residue(&fp, &id);

    // A missing program is the inner backend's typed error, and the outer cell is gone too.
    let id2 = unique_id("nest-missing");
    let fp2 = b.footprint(&id2);
    assert!(matches!(
        b.create(&CellDocument::new(&id2, ["/no/such"])).await,
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        })
    ));
    assert_no_residue(&fp2, &id2);
    assert!(b.list().await.is_empty());
    tap.assert_all_valid(20);
    for (op, event) in [
        ("create", "outer cell runs the driver"),
        ("create", "driver handshake done"),
        ("create", "driver request"),
        ("create", "driver answered"),
        ("create", "init spawned"),
        ("wait", "driver answered"),
        ("destroy", "outer cell teardown"),
        ("destroy", "teardown over"),
    ] {
        let span = format!("nested{{op=\"{op}\" cell={id}}}");
        logs_assert(|lines: &[&str]| {
            lines
                .iter()
                .any(|l| l.contains(&span) && l.contains(event))
                .then_some(())
                .ok_or(format!("no {event:?} in a {op} span of {id}"))
        });
    }
}

#[tokio::test]
async fn killing_the_outer_layer_leaves_no_inner_residue() {
    let Some((b, _tap)) = nested() else { return };
    let id = unique_id("nest-kill");
    let fp = b.footprint(&id);
    b.create(&CellDocument::new(
        &id,
        ["/bin/sh", "-c", "sleep 60 & sleep 60"],
    ))
    .await
    .unwrap();
    // Kill the driver in the outer cell behind the backend's back: the inner cell is orphaned.
    let outer_marker = fp
        .process_markers
        .iter()
        .find(|m| m.contains(&b.outer_id(&id)) && !m.contains("/run/nest"))
        .cloned()
        .expect("outer marker");
    let driver_pid = find_driver_pid(&b.outer_id(&id)).expect("driver process");
    unsafe { libc::kill(driver_pid as i32, libc::SIGKILL) };
    // Destroy still takes everything down: the inner op fails, the outer cell and the sweep remain.
    let t = tokio::time::timeout(Duration::from_secs(30), b.destroy(&id))
        .await
        .expect("destroy is bounded")
        .expect("destroy succeeds via the outer layer");
    assert!(t.killed_running);
    assert_no_residue(&fp, &outer_marker);
}

/// The driver of outer cell `outer_id`: the process whose command line names its socket.
fn find_driver_pid(outer_id: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("cellcheck-driver") && cmd.contains(&format!("{outer_id}.sock")) {
            return Some(pid);
        }
    }
    None
}

#[tokio::test]
async fn dropping_the_backend_removes_both_layers() {
    let Some((b, _tap)) = nested() else { return };
    let id = unique_id("nest-drop");
    let fp = b.footprint(&id);
    b.create(&CellDocument::new(&id, ["/bin/sleep", "60"]))
        .await
        .unwrap();
    drop(b);
    assert_no_residue(&fp, &id);
}

#[tokio::test]
#[ignore = "timing breakdown, run by hand"]
async fn timing_breakdown() {
    let t = std::time::Instant::now();
    let Some((b, _tap)) = nested() else { return };
    eprintln!("setup {:?}", t.elapsed());
    let id = unique_id("nest-time");
    let t = std::time::Instant::now();
    b.create(&CellDocument::new(&id, ["/bin/true"]))
        .await
        .unwrap();
    eprintln!("create {:?}", t.elapsed());
    let t = std::time::Instant::now();
    b.wait(&id).await.unwrap();
    eprintln!("wait {:?}", t.elapsed());
    let t = std::time::Instant::now();
    b.destroy(&id).await.unwrap();
    eprintln!("destroy {:?}", t.elapsed());
    let t = std::time::Instant::now();
    drop(b);
    eprintln!("drop {:?}", t.elapsed());
}
