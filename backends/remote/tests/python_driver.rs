//! The Python runc driver, driven through `RemoteBackend` with a real runc. Every line exchanged is
//! validated against the protocol's JSON Schema.

mod common;

use cellcheck_contract::{Backend, CellDocument, CellError, ResourceKind, Termination};
use common::*;

fn python_backend() -> Option<(cellcheck_remote::RemoteBackend, SchemaTap)> {
    let fx = fixtures();
    if let Err(why) = runc_usable() {
        eprintln!("skipped: {why}");
        return None;
    }
    let tap = SchemaTap::new();
    // No --rootfs: the driver takes it from hello.
    let argv = vec!["python3".to_string(), python_driver().display().to_string()];
    let b = cellcheck_remote::RemoteBackend::with_options(
        "runc-python",
        argv,
        tap.options_with_fixtures(&fx),
    )
    .expect("python driver handshake");
    Some((b, tap))
}

#[test]
fn python_driver_without_a_rootfs_says_so_at_hello() {
    let tap = SchemaTap::new();
    let argv = vec!["python3".to_string(), python_driver().display().to_string()];
    let e = cellcheck_remote::RemoteBackend::with_options("runc-python", argv, tap.options())
        .err()
        .expect("no rootfs from a flag or from hello");
    let m = e.to_string();
    assert!(
        m.contains("no root filesystem") && m.contains("fixtures.rootfs"),
        "{m}"
    );
}

#[tokio::test]
async fn python_driver_lifecycle_exit_and_spec() {
    let Some((b, tap)) = python_backend() else {
        return;
    };
    assert_eq!(b.driver_info().backend, "runc-python");
    let pre = b.preflight().await;
    assert!(pre.is_available(), "{pre:?}");

    let id = unique_id("py-exit");
    let doc = CellDocument::new(&id, ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
        .with_env("CELLCHECK_MARK", &id);
    let h = b.create(&doc).await.unwrap();
    assert!(h.host_pid.is_some());
    assert_eq!(b.list().await, vec![id.clone()]);
    assert!(matches!(
        b.create(&doc).await,
        Err(CellError::AlreadyExists { .. })
    ));
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 7 });
    assert_eq!(r.stdout_str(), "out\n");
    assert_eq!(r.stderr_str(), "err\n");
    assert_eq!(
        b.wait(&id).await.unwrap(),
        r,
        "waiting again gives the same report"
    );
    let fp = b.footprint(&id);
    assert!(!fp.paths.is_empty() && !fp.cgroup_dirs.is_empty());
    let t = b.destroy(&id).await.unwrap();
    assert_eq!((t.killed_running, t.remaining_cells), (false, 0));
    assert_no_residue(&fp, &id);
    assert!(matches!(
        b.destroy(&id).await,
        Err(CellError::NotFound { .. })
    ));

    // Exact env (read from outside, byte for byte), and the id as hostname.
    let id2 = unique_id("py-env");
    let doc = CellDocument::new(&id2, ["/bin/sleep", "30"])
        .with_env("A", "1")
        .with_env("B", "two words=x");
    let h = b.create(&doc).await.unwrap();
    let pid = h.host_pid.unwrap();
    assert!(cellcheck_fixtures::await_exec_settled(
        pid,
        std::time::Duration::from_secs(10)
    ));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_eq!(environ, b"A=1\0B=two words=x\0".to_vec());
    let r = b
        .exec(
            &id2,
            cellcheck_contract::ExecRequest {
                argv: vec!["/bin/hostname".into()],
                env: vec![],
                timeout_ms: Some(5000),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout_str().trim(), id2);
    b.destroy(&id2).await.unwrap();

    // A running cell is killed by destroy, a missing program is NotFound(Program) with no residue,
    // a bad document never reaches the driver.
    let id3 = unique_id("py-run");
    b.create(&CellDocument::new(&id3, ["/bin/sleep", "60"]))
        .await
        .unwrap();
    let fp3 = b.footprint(&id3);
    let t = b.destroy(&id3).await.unwrap();
    assert!(t.killed_running);
    assert_no_residue(&fp3, &id3);
    let id4 = unique_id("py-missing");
    let fp4 = b.footprint(&id4);
    assert!(matches!(
        b.create(&CellDocument::new(&id4, ["/no/such/program"]))
            .await,
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        })
    ));
    assert_no_residue(&fp4, &id4);
    assert!(matches!(
        b.create(&CellDocument::new("bad/id", ["/bin/true"])).await,
        Err(CellError::InvalidSpec { .. })
    ));
    // Timeout: wait reports DeadlineExceeded and the cell stays listed until destroyed.
    let id5 = unique_id("py-timeout");
    b.create(&CellDocument::new(&id5, ["/bin/sleep", "60"]).with_timeout_ms(300))
        .await
        .unwrap();
    assert!(matches!(
        b.wait(&id5).await,
        Err(CellError::DeadlineExceeded { .. })
    ));
    assert!(b.list().await.contains(&id5));
    b.destroy(&id5).await.unwrap();

    let how = b.close(std::time::Duration::from_secs(10));
    assert_eq!(how, "exited with status 0");
    tap.assert_all_valid(20);
}
