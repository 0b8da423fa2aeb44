//! Per-operation overhead of the driver protocol: create / wait / destroy of `/bin/true` through
//! `RemoteBackend` over `cellcheck-driver host` versus the host backend in process, interleaved
//! in the same run. Writes medians and ratios to `target/conformance/bench-remote.json`.
//!
//! `cargo run -p cellcheck-remote --example bench-remote [-- ROUNDS]` (root; builds the driver first).

use std::time::{Duration, Instant};

use cellcheck_contract::{Backend, CellDocument};
use cellcheck_host::{HostBackend, HostConfig};
use cellcheck_remote::RemoteBackend;

#[derive(Default)]
struct Samples {
    create: Vec<Duration>,
    wait: Vec<Duration>,
    destroy: Vec<Duration>,
}

async fn round(b: &dyn Backend, id: &str, s: &mut Samples) {
    let t = Instant::now();
    b.create(&CellDocument::new(id, ["/bin/true"]))
        .await
        .expect("create");
    s.create.push(t.elapsed());
    let t = Instant::now();
    let r = b.wait(id).await.expect("wait");
    s.wait.push(t.elapsed());
    assert_eq!(r.code(), Some(0));
    let t = Instant::now();
    b.destroy(id).await.expect("destroy");
    s.destroy.push(t.elapsed());
}

fn median_us(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let fx = cellcheck_fixtures::ensure().expect("fixtures");
    let driver = cellcheck_fixtures::target_dir().join("debug/cellcheck-driver");
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["build", "-q", "-p", "cellcheck-driver"])
        .status()
        .expect("cargo");
    assert!(status.success(), "build cellcheck-driver");
    let host = HostBackend::new(HostConfig::from_fixtures(&fx));
    let remote = RemoteBackend::new(
        "remote-host",
        vec![
            driver.display().to_string(),
            "host".into(),
            "--rootfs".into(),
            fx.rootfs.display().to_string(),
            "--init".into(),
            fx.host_init.display().to_string(),
        ],
    )
    .expect("driver handshake");
    let (mut h, mut r) = (Samples::default(), Samples::default());
    // One warm-up each, then interleave so both see the same host conditions.
    round(&host, "bench-warm-h", &mut Samples::default()).await;
    round(&remote, "bench-warm-r", &mut Samples::default()).await;
    for i in 0..rounds {
        round(&host, &format!("bench-h-{i}"), &mut h).await;
        round(&remote, &format!("bench-r-{i}"), &mut r).await;
    }
    let mut ops = serde_json::Map::new();
    for (op, hv, rv) in [
        ("create", &mut h.create, &mut r.create),
        ("wait", &mut h.wait, &mut r.wait),
        ("destroy", &mut h.destroy, &mut r.destroy),
    ] {
        let (hm, rm) = (median_us(hv), median_us(rv));
        println!(
            "{op:8} host {hm:9.0} us   remote {rm:9.0} us   ratio {:.2}   overhead {:+.0} us",
            rm / hm,
            rm - hm
        );
        ops.insert(
            op.into(),
            serde_json::json!({
                "host_median_us": hm.round(),
                "remote_median_us": rm.round(),
                "ratio": (rm / hm * 100.0).round() / 100.0,
                "overhead_us": (rm - hm).round(),
            }),
        );
    }
    let out = serde_json::json!({
        "bench": "remote-over-host vs host in process, /bin/true",
        "rounds": rounds,
        "driver": "cellcheck-driver host (debug build) over stdin/stdout",
        "operations": ops,
    });
    let dir = cellcheck_fixtures::target_dir().join("conformance");
    std::fs::create_dir_all(&dir).expect("create target/conformance");
    let path = dir.join("bench-remote.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).expect("write");
    println!("wrote {}", path.display());
    remote.close(Duration::from_secs(10));
}
