//! Real QEMU boots of the fixture guest through the backend (TCG unless a cached probe saw KVM
//! work). Skipped, with the reason, only when the QEMU binary itself is absent.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cellcheck_contract::{
    Backend, CellDocument, CellError, ExecRequest, Limits, ResourceKind, Termination, PROBE_PATH,
};
use cellcheck_qemu::{Accel, QemuBackend, QemuConfig};

fn config() -> Option<QemuConfig> {
    let fx = cellcheck_fixtures::ensure().expect("fixtures build");
    let cfg = QemuConfig::from_fixtures(&fx);
    let present = std::process::Command::new(&cfg.qemu_bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("skipped: {} not runnable", cfg.qemu_bin.display());
        return None;
    }
    cfg.guest.as_ref().expect("guest kernel and initramfs");
    Some(cfg)
}

fn backend() -> Option<QemuBackend> {
    config().map(QemuBackend::new)
}

fn id(tag: &str) -> String {
    format!("qt-{tag}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

fn probe_doc(id: &str, args: &[&str]) -> CellDocument {
    CellDocument::new(id, std::iter::once(PROBE_PATH).chain(args.iter().copied()))
}

fn exec_req(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: std::iter::once(PROBE_PATH)
            .chain(args.iter().copied())
            .map(String::from)
            .collect(),
        env: vec![],
        timeout_ms: Some(20_000),
    }
}

/// Nothing of the backend remains: no QEMU naming its instance dir, no dir.
fn assert_no_residue(b: &QemuBackend) -> Result<()> {
    let marker = b.instance_dir().display().to_string();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        ensure!(!cmd.contains(&marker), "QEMU left running: {cmd}");
    }
    ensure!(
        !b.instance_dir().exists(),
        "{} still exists",
        b.instance_dir().display()
    );
    Ok(())
}

async fn count(b: &QemuBackend, id: &str, file: &str) -> Result<u64> {
    let r = b.exec(id, exec_req(&["cat", file])).await?;
    r.stdout_str()
        .trim()
        .parse()
        .with_context(|| format!("counter holds {:?}", r.stdout_str()))
}

async fn count_above(b: &QemuBackend, id: &str, file: &str, above: u64) -> Result<u64> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(v) = count(b, id, file).await {
            if v > above {
                return Ok(v);
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "counter of {id} stuck at or below {above}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Also: every operation is a span naming its cell, with the boot, the agent's handshake and its
/// requests as events, so a failing trial can show what the backend did on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[tracing_test::traced_test]
async fn boots_and_reports_exit_code() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    assert_eq!(b.name(), "qemu");
    assert_eq!(b.attributes()["accelerator"], b.accelerator().as_str());
    let id = id("exit");
    let h = b.create(&probe_doc(&id, &["exit", "7"])).await?;
    assert_eq!(h.host_pid, None);
    assert_eq!(b.list().await, vec![id.clone()]);
    let r = b.wait(&id).await?;
    assert_eq!(r.termination, Termination::Exited { code: 7 });
    assert_eq!(
        b.wait(&id).await?,
        r,
        "a second wait returns the same report"
    );
    let t = b.destroy(&id).await?;
    assert_eq!((t.killed_running, t.remaining_cells), (false, 0));
    assert!(matches!(
        b.destroy(&id).await,
        Err(CellError::NotFound {
            kind: ResourceKind::Cell,
            ..
        })
    ));
    assert_no_residue(&b)?;
    for (op, event) in [
        ("create", "qemu spawned"),
        ("create", "guest booted, agent ready"),
        ("create", "agent request seq=1 op=\"hello\""),
        ("create", "vm up, agent answered hello"),
        ("create", "agent reply: started"),
        ("wait", "agent reply: exited"),
        ("destroy", "qmp command cmd=\"quit\""),
        ("destroy", "teardown over"),
        ("destroy", "failed"),
    ] {
        let (op_field, cell) = (format!("op=\"{op}\""), format!("cell={id}"));
        logs_assert(|lines: &[&str]| {
            lines
                .iter()
                .any(|l| l.contains(&op_field) && l.contains(&cell) && l.contains(event))
                .then_some(())
                .ok_or(format!("no {event:?} in a {op} span of {id}"))
        });
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_sees_exactly_its_env_fds_pids_and_hostname() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    let sig = id("signal");
    b.create(&probe_doc(&sig, &["signal", "TERM"])).await?;
    assert_eq!(
        b.wait(&sig).await?.termination,
        Termination::Signaled { signal: 15 }
    );
    b.destroy(&sig).await?;
    let id = id("report");
    let doc = probe_doc(&id, &["report"])
        .with_env("ZED", "last=first")
        .with_env("ALPHA", "")
        .with_env("MID", "a b\tc");
    b.create(&doc).await?;
    let r = b.wait(&id).await?;
    assert_eq!(
        r.termination,
        Termination::Exited { code: 0 },
        "{}",
        r.stderr_str()
    );
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).context("report JSON")?;
    assert_eq!(
        v["env"],
        serde_json::json!(["ZED=last=first", "ALPHA=", "MID=a b\tc"])
    );
    assert_eq!(v["fds"], serde_json::json!([0, 1, 2]));
    assert_eq!(v["hostname"], serde_json::json!(id));
    assert_eq!(v["netifs"], serde_json::json!(["lo"]));
    let pids = v["pids"].as_array().context("pids")?;
    assert_eq!(
        pids.len(),
        2,
        "the workload sees only itself and its namespace's init: {pids:?}"
    );
    // After the workload ended, exec is refused (typed), not run in a guest whose workload is gone.
    match b.exec(&id, exec_req(&["env"])).await {
        Err(CellError::InvalidState { .. }) => {}
        other => panic!("exec after the workload ended: want InvalidState, got {other:?}"),
    }
    b.destroy(&id).await?;
    assert_no_residue(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_joins_the_running_cell_and_missing_programs_are_typed() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    let missing = id("missing");
    match b
        .create(&CellDocument::new(&missing, ["/no/such/program"]))
        .await
    {
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        }) => {}
        other => bail!("missing program: expected NotFound(program), got {other:?}"),
    }
    ensure!(b.list().await.is_empty(), "a failed create is listed");
    ensure!(!b.instance_dir().join(&missing).exists());

    let id = id("exec");
    b.create(&probe_doc(&id, &["hold"])).await?;
    let r = b.exec(&id, exec_req(&["exit", "3"])).await?;
    assert_eq!(r.termination, Termination::Exited { code: 3 });
    let r = b.exec(&id, exec_req(&["pids"])).await?;
    let visible = r.stdout_str();
    let first = visible.lines().next().unwrap_or_default();
    assert_eq!(
        first.split_whitespace().count(),
        3,
        "exec sees the cell's init (pid 1), the workload and itself: {visible:?}"
    );
    assert!(first.split_whitespace().any(|p| p == "1"), "{visible:?}");
    let r = b.exec(&id, exec_req(&["out", "100000"])).await?;
    assert_eq!(r.stdout.len(), 100_000);
    assert!(matches!(
        b.exec(
            &id,
            ExecRequest {
                argv: vec!["/no/such".into()],
                ..ExecRequest::default()
            }
        )
        .await,
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        })
    ));
    let t = b.destroy(&id).await?;
    assert!(t.killed_running, "hold was still running");
    assert_no_residue(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_under_a_new_id_and_the_counter_continues() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    let src = id("snap");
    let file = "/tmp/count";
    b.create(&probe_doc(&src, &["count", file, "50"])).await?;
    count_above(&b, &src, file, 2).await?;
    let snap = b.snapshot(&src).await?;
    let at_snap = count(&b, &src, file).await?;
    let path = snap.path.clone().context("snapshot path")?;
    ensure!(path.join("state").metadata()?.len() > 0, "empty snapshot");
    b.destroy(&src).await?;

    let new = id("restored");
    b.restore(&snap, &new).await?;
    let first = count(&b, &new, file).await?;
    ensure!(
        first + 20 >= at_snap && first > 2,
        "restored counter {first} vs {at_snap} at snapshot: restarted?"
    );
    count_above(&b, &new, file, first).await?;
    let host = b.exec(&new, exec_req(&["hostname"])).await?;
    assert_eq!(
        host.stdout_str().trim(),
        new,
        "a restored cell is named by its new id"
    );
    assert!(matches!(
        b.restore(&snap, &new).await,
        Err(CellError::AlreadyExists { .. })
    ));
    b.destroy(&new).await?;
    b.delete_snapshot(&snap).await?;
    ensure!(!path.exists(), "snapshot files remain");
    assert!(matches!(
        b.delete_snapshot(&snap).await,
        Err(CellError::NotFound {
            kind: ResourceKind::Snapshot,
            ..
        })
    ));
    assert_no_residue(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_the_counter() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    let id = id("pause");
    let file = "/tmp/count";
    b.create(&probe_doc(&id, &["count", file, "50"])).await?;
    count_above(&b, &id, file, 2).await?;
    let before_at = std::time::Instant::now();
    let before = count(&b, &id, file).await?;
    b.pause(&id).await?;
    let ran_before = before_at.elapsed();
    assert!(matches!(
        b.exec(&id, exec_req(&["exit", "0"])).await,
        Err(CellError::InvalidState { .. })
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resumed_at = std::time::Instant::now();
    b.resume(&id).await?;
    let after = count(&b, &id, file).await?;
    let ran = ran_before + resumed_at.elapsed();
    let allowed = cellcheck_fixtures::counter::most_ticks(ran, Duration::from_millis(50));
    ensure!(
        after <= before + allowed,
        "counter went {before} -> {after} across a 1.5 s pause (running {} ms around it: at most +{allowed})",
        ran.as_millis()
    );
    count_above(&b, &id, file, after).await?;
    b.destroy(&id).await?;
    assert_no_residue(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_and_memory_limit_reports_oom() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    let slow = id("timeout");
    b.create(&probe_doc(&slow, &["hold"]).with_timeout_ms(1500))
        .await?;
    let oom = id("oom");
    // Past the limit yet within the 256 MiB guest: only the cell's cgroup can kill it.
    b.create(&probe_doc(&oom, &["alloc", "128"]).with_limits(Limits {
        memory_max_bytes: Some(32 << 20),
        ..Limits::default()
    }))
    .await?;
    match b.wait(&slow).await {
        Err(CellError::DeadlineExceeded { after_ms: 1500 }) => {}
        other => bail!("expected DeadlineExceeded, got {other:?}"),
    }
    ensure!(
        b.list().await.contains(&slow),
        "a timed-out cell stays listed"
    );
    let r = b.wait(&oom).await?;
    assert_eq!(
        r.termination,
        Termination::OutOfMemory,
        "{}",
        r.stdout_str()
    );
    b.destroy(&slow).await?;
    b.destroy(&oom).await?;
    assert_no_residue(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_boot_is_typed_and_leaves_nothing() -> Result<()> {
    let Some(mut cfg) = config() else {
        return Ok(());
    };
    let mut guest = cfg.guest.clone().expect("guest");
    // Not a kernel: QEMU refuses it at once.
    guest.kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    cfg.guest = Ok(guest);
    cfg.accel = Some(Accel::Tcg);
    let b = QemuBackend::new(cfg);
    let id = id("badkernel");
    match b.create(&probe_doc(&id, &["exit", "0"])).await {
        Err(CellError::BackendFailure { reason, .. }) => {
            assert!(reason.contains("qemu exited during boot"), "{reason}")
        }
        other => bail!("expected BackendFailure, got {other:?}"),
    }
    ensure!(b.list().await.is_empty());
    assert_no_residue(&b)?;

    let mut cfg = config().expect("config");
    cfg.guest = Err("deliberately absent".into());
    let b = QemuBackend::new(cfg);
    assert!(!b.preflight().await.is_available());
    assert!(matches!(
        b.create(&probe_doc(&id, &["exit", "0"])).await,
        Err(CellError::Unavailable { .. })
    ));
    assert_no_residue(&b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerator_probes_boot_the_real_guest() -> Result<()> {
    if config().is_none() {
        return Ok(());
    }
    let tcg = cellcheck_qemu::probe_accelerator(Accel::Tcg).await;
    match &tcg {
        cellcheck_contract::Availability::Available { evidence } => {
            ensure!(evidence.contains("booted to the guest agent"), "{evidence}")
        }
        other => bail!("TCG must boot wherever QEMU runs: {other:?}"),
    }
    // KVM may or may not work here; either way the verdict names it and says why.
    match cellcheck_qemu::probe_accelerator(Accel::Kvm).await {
        cellcheck_contract::Availability::Available { evidence } => {
            ensure!(evidence.contains("kvm"), "{evidence}")
        }
        cellcheck_contract::Availability::Unavailable { reason } => {
            ensure!(reason.starts_with("kvm: "), "{reason}")
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_create_leaves_nothing_and_frees_the_id() -> Result<()> {
    let Some(b) = backend() else { return Ok(()) };
    let id = id("cancel");
    let doc = probe_doc(&id, &["exit", "4"]);
    // A boot takes seconds; dropping the create future half-way must not leak the VM or the id.
    let r = tokio::time::timeout(Duration::from_millis(700), b.create(&doc)).await;
    ensure!(r.is_err(), "create finished within 700 ms: {r:?}");
    ensure!(b.list().await.is_empty(), "a cancelled create is listed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_no_residue(&b)?;
    b.create(&doc).await?;
    assert_eq!(b.wait(&id).await?.code(), Some(4));
    b.destroy(&id).await?;
    assert_no_residue(&b)
}
