//! Timings of the QEMU backend, recorded (not asserted): boot to the first exec, snapshot and
//! restore through the backend, beside a plain `qemu-system-x86_64` boot of the same kernel and
//! initramfs to the same marker (the agent's ready line), measured in the same run.
//!
//! `cargo run -p cellcheck-qemu --example bench-qemu [ROUNDS]` writes
//! `<target>/conformance/bench-qemu.json`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cellcheck_contract::{Backend, CellDocument, ExecRequest, PROBE_PATH};
use cellcheck_guest_agent::CONSOLE_READY_MARKER;
use cellcheck_qemu::{QemuBackend, QemuConfig};
use serde_json::json;

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn stats(xs: &[f64]) -> serde_json::Value {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    json!({"runs": xs, "min": v[0], "median": v[v.len() / 2], "max": v[v.len() - 1]})
}

/// QEMU alone: same machine, kernel and initramfs, until the agent prints its ready line.
async fn plain_boot(cfg: &QemuConfig, dir: &Path) -> Result<Duration> {
    let guest = cfg.guest.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    let console = dir.join("plain-console.log");
    let _ = std::fs::remove_file(&console);
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&cfg.qemu_bin)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-machine", "q35", "-smp", "1", "-nic", "none", "-accel", "tcg",
        ])
        .args(["-m", &cfg.memory_mib.to_string()])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-serial", "null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let took = loop {
        if std::fs::read_to_string(&console).is_ok_and(|c| c.contains(CONSOLE_READY_MARKER)) {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().await?;
            bail!("plain boot did not reach the marker in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    child.kill().await?;
    let _ = std::fs::remove_file(&console);
    Ok(took)
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3);
    let fx = cellcheck_fixtures::ensure()?;
    let cfg = QemuConfig::from_fixtures(&fx);
    let b = QemuBackend::new(cfg.clone());
    let out_dir = cellcheck_fixtures::target_dir().join("conformance");
    std::fs::create_dir_all(&out_dir)?;

    let (mut plain, mut first_exec, mut snap, mut restore, mut destroy) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut snapshot_bytes = 0;
    for round in 0..rounds {
        plain.push(ms(plain_boot(&cfg, &out_dir).await?));

        let id = format!("bench-{}-{round}", std::process::id());
        let start = Instant::now();
        b.create(&CellDocument::new(&id, [PROBE_PATH, "hold"]))
            .await?;
        let r = b
            .exec(
                &id,
                ExecRequest {
                    argv: vec![PROBE_PATH.into(), "exit".into(), "0".into()],
                    ..ExecRequest::default()
                },
            )
            .await?;
        first_exec.push(ms(start.elapsed()));
        if r.code() != Some(0) {
            bail!("first exec: {r:?}");
        }

        let t = Instant::now();
        let s = b.snapshot(&id).await?;
        snap.push(ms(t.elapsed()));
        let state = s.path.as_ref().context("snapshot path")?.join("state");
        snapshot_bytes = std::fs::metadata(state)?.len();

        let new_id = format!("{id}-r");
        let t = Instant::now();
        b.restore(&s, &new_id).await?;
        restore.push(ms(t.elapsed()));

        let t = Instant::now();
        b.destroy(&id).await?;
        destroy.push(ms(t.elapsed()));
        b.destroy(&new_id).await?;
        b.delete_snapshot(&s).await?;
    }
    let report = json!({
        "backend": "qemu",
        "attributes": b.attributes(),
        "guest_memory_mib": cfg.memory_mib,
        "unit": "ms",
        "plain_qemu_boot_to_agent_ready": stats(&plain),
        "backend_create_to_first_exec": stats(&first_exec),
        "backend_snapshot": stats(&snap),
        "backend_restore_to_agent": stats(&restore),
        "backend_destroy_running": stats(&destroy),
        "snapshot_state_bytes": snapshot_bytes,
    });
    let path = out_dir.join("bench-qemu.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}
