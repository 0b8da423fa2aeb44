//! Cell lifecycle cost against the bare namespaces it is made of.
//!
//! `cargo run --release -p cellcheck-host --example bench-host -- [N]` (root): N times create → wait →
//! destroy of `cellcheck-probe exit 0`, and N times `unshare` with the same namespaces plus
//! `chroot` into the fixture rootfs running the same probe, alternating so both see the same
//! machine state. Prints median, p90 and the ratio, and writes
//! `<target>/conformance/bench-host.json`. Recorded, never asserted.

use std::process::{Command, Stdio};
use std::time::Instant;

use cellcheck_contract::{Backend, CellDocument, PROBE_PATH};
use cellcheck_host::{HostBackend, HostConfig};

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.9))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(50)
        .max(1);
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the host backend needs root"
    );
    let fx = cellcheck_fixtures::ensure()?;
    let b = HostBackend::new(HostConfig::from_fixtures(&fx));
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for i in 0..n {
        let id = format!("bench-{i}");
        let t = Instant::now();
        b.create(&CellDocument::new(&id, [PROBE_PATH, "exit", "0"]))
            .await?;
        let r = b.wait(&id).await?;
        b.destroy(&id).await?;
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(r.code() == Some(0), "cell ended with {:?}", r.termination);

        let t = Instant::now();
        let st = Command::new("unshare")
            .args([
                "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "chroot",
            ])
            .arg(&fx.rootfs)
            .args([PROBE_PATH, "exit", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        raw.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(st.success(), "unshare run failed: {st}");
    }
    let (om, op) = stats(ours);
    let (rm, rp) = stats(raw);
    let ratio = om / rm;
    println!("host backend  create→wait→destroy  median {om:.2} ms  p90 {op:.2} ms  (n={n})");
    println!("unshare+chroot same namespaces      median {rm:.2} ms  p90 {rp:.2} ms");
    println!("ratio (median) {ratio:.2}");
    let json = serde_json::json!({
        "backend": "host",
        "ours_ms": {"median": om, "p90": op},
        "raw_ms": {"median": rm, "p90": rp},
        "ratio": ratio,
        "n": n,
        "cgroup": b.cgroup_plan().describe(),
    });
    let dir = cellcheck_fixtures::target_dir().join("conformance");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench-host.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}
