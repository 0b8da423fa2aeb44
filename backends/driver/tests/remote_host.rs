//! `cellcheck-driver host` driven through `RemoteBackend`: the host backend out of process, with
//! every protocol line checked against the schema.

#[path = "../../remote/tests/common/mod.rs"]
mod common;

use cellcheck_contract::{
    Backend, CellDocument, CellError, ExecRequest, ResourceKind, Termination,
};
use cellcheck_remote::RemoteBackend;
use common::*;

#[tokio::test]
async fn host_over_the_protocol() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the host backend needs root");
        return;
    }
    let fx = fixtures();
    let tap = SchemaTap::new();
    let b = RemoteBackend::with_options(
        "remote-host",
        // No --rootfs or --init: the driver takes both from hello.
        vec![env!("CARGO_BIN_EXE_cellcheck-driver").into(), "host".into()],
        tap.options_with_fixtures(&fx),
    )
    .expect("handshake");
    assert_eq!(b.driver_info().backend, "host");
    assert!(b.preflight().await.is_available());

    let id = unique_id("rh");
    let doc = CellDocument::new(&id, ["/bin/sleep", "30"]).with_env("K", "v w");
    let fp = b.footprint(&id);
    let h = b.create(&doc).await.unwrap();
    let pid = h.host_pid.unwrap();
    assert!(cellcheck_fixtures::await_exec_settled(
        pid,
        std::time::Duration::from_secs(10)
    ));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_eq!(environ, b"K=v w\0");
    let r = b
        .exec(
            &id,
            ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo hi; exit 4".into()],
                env: vec![],
                timeout_ms: Some(5000),
            },
        )
        .await
        .unwrap();
    assert_eq!((r.code(), r.stdout_str().as_str()), (Some(4), "hi\n"));
    b.pause(&id).await.unwrap();
    b.resume(&id).await.unwrap();
    let t = b.destroy(&id).await.unwrap();
    assert!(t.killed_running);
    assert_no_residue(&fp, &id);
    assert!(matches!(
        b.destroy(&id).await,
        Err(CellError::NotFound { .. })
    ));

    let id2 = unique_id("rh");
    b.create(&CellDocument::new(&id2, ["/bin/sh", "-c", "exit 3"]))
        .await
        .unwrap();
    assert_eq!(
        b.wait(&id2).await.unwrap().termination,
        Termination::Exited { code: 3 }
    );
    b.destroy(&id2).await.unwrap();
    assert!(matches!(
        b.create(&CellDocument::new(unique_id("rh"), ["/nope"]))
            .await,
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        })
    ));
    assert!(matches!(
        b.snapshot("x").await,
        Err(CellError::Unsupported { .. })
    ));
    // A cell left running is destroyed by the driver when its input closes.
    let id3 = unique_id("rh");
    let fp3 = b.footprint(&id3);
    b.create(&CellDocument::new(&id3, ["/bin/sleep", "30"]))
        .await
        .unwrap();
    assert_eq!(
        b.close(std::time::Duration::from_secs(15)),
        "exited with status 0"
    );
    assert_no_residue(&fp3, &id3);
    tap.assert_all_valid(20);
}
