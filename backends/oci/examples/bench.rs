//! Our create → wait → destroy beside the runtime run by hand on the same bundle, in one run.
//!
//! `cargo run --release -p cellcheck-oci --example bench-oci -- --runtime runsc [N]` writes
//! `target/conformance/bench-<runtime>.json` (medians, p90s, ratios). For runsc it also times
//! snapshot and restore through the backend beside `runsc checkpoint` / `runsc restore` by hand.

use std::fs;
use std::time::{Duration, Instant};

use cellcheck_contract::{Availability, Backend, CellDocument, PROBE_PATH};
use cellcheck_oci::{bundle, OciBackend, OciConfig, RuntimeKind};
use serde_json::json;

fn stats(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    json!({ "n": v.len(), "median_ms": at(0.5), "p90_ms": at(0.9), "min_ms": ms(v[0]) })
}

fn ratio(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    a["median_ms"].as_f64().unwrap_or(0.0) / b["median_ms"].as_f64().unwrap_or(1.0).max(1e-9)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut kind = RuntimeKind::Runsc;
    let mut n = 10usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runtime" => {
                kind = match it.next().map(String::as_str) {
                    Some("runc") => RuntimeKind::Runc,
                    Some("crun") => RuntimeKind::Crun,
                    Some("runsc") => RuntimeKind::Runsc,
                    other => anyhow::bail!("unknown runtime {other:?}"),
                }
            }
            x => n = x.parse()?,
        }
    }
    let fx = cellcheck_fixtures::ensure()?;
    let b = OciBackend::new(kind, OciConfig::from_fixtures(&fx));
    let evidence = match b.preflight().await {
        Availability::Available { evidence } => evidence,
        Availability::Unavailable { reason } => {
            anyhow::bail!("{} unavailable: {reason}", kind.name())
        }
    };
    let rt = b.runtime()?;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);

    // Ours: create → wait → destroy.
    let mut ours = Vec::new();
    for i in 0..n {
        let id = format!("bench-{tag}-{i}");
        let t = Instant::now();
        b.create(&CellDocument::new(&id, [PROBE_PATH, "exit", "0"]))
            .await?;
        let r = b.wait(&id).await?;
        b.destroy(&id).await?;
        ours.push(t.elapsed());
        anyhow::ensure!(r.code() == Some(0), "bench cell ended {:?}", r.termination);
    }

    // By hand: `<runtime> run` of the same bundle shape in a scratch dir under the same state root.
    let scratch = b
        .state_root()
        .with_file_name(format!("bench-{}-{tag}", kind.name()));
    fs::create_dir_all(scratch.join("state"))?;
    let mut by_hand = Vec::new();
    let mut hand_rt = rt.clone();
    hand_rt.state = scratch.join("state");
    for i in 0..n {
        let id = format!("hand-{tag}-{i}");
        let dir = scratch.join(&id);
        fs::create_dir_all(&dir)?;
        let cell = CellDocument::new(&id, [PROBE_PATH, "exit", "0"]).admit()?;
        let opts = bundle::BundleOptions {
            rootfs: fx.rootfs.clone(),
            cgroups_path: format!("/{id}"),
            pids_limit: true,
        };
        bundle::write_config(&dir.join("config.json"), &bundle::config(&cell, &opts))?;
        let t = Instant::now();
        let out = hand_rt
            .run_os(&[
                "run".into(),
                "--bundle".into(),
                dir.clone().into_os_string(),
                id.clone().into(),
            ])
            .await;
        by_hand.push(t.elapsed());
        anyhow::ensure!(out.ok, "{} run: {}", kind.name(), out.stderr);
        let _ = hand_rt.run(&["delete", "--force", &id]).await;
        fs::remove_dir_all(&dir)?;
    }

    let ours_s = stats(ours);
    let hand_s = stats(by_hand);
    let mut report = json!({
        "runtime": kind.name(),
        "evidence": evidence,
        "lifecycle": { "ours": ours_s, "by_hand": hand_s, "ratio": ratio(&ours_s, &hand_s) },
    });

    if kind == RuntimeKind::Runsc {
        let (mut snap, mut rest, mut hsnap, mut hrest) = (vec![], vec![], vec![], vec![]);
        for i in 0..n.min(5) {
            let src = format!("snap-{tag}-{i}");
            let dst = format!("rest-{tag}-{i}");
            b.create(&CellDocument::new(
                &src,
                [PROBE_PATH, "count", "/tmp/n", "50"],
            ))
            .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = Instant::now();
            let s = b.snapshot(&src).await?;
            snap.push(t.elapsed());
            let t = Instant::now();
            b.restore(&s, &dst).await?;
            rest.push(t.elapsed());
            b.destroy(&dst).await?;
            b.destroy(&src).await?;
            b.delete_snapshot(&s).await?;

            // By hand, detached, then checkpoint and restore with the CLI.
            let id = format!("hsnap-{tag}-{i}");
            let rid = format!("hrest-{tag}-{i}");
            let dir = scratch.join(&id);
            let img = scratch.join(format!("{id}.img"));
            fs::create_dir_all(&dir)?;
            fs::create_dir_all(&img)?;
            let cell = CellDocument::new(&id, [PROBE_PATH, "count", "/tmp/n", "50"]).admit()?;
            let opts = bundle::BundleOptions {
                rootfs: fx.rootfs.clone(),
                cgroups_path: format!("/{id}"),
                pids_limit: true,
            };
            bundle::write_config(&dir.join("config.json"), &bundle::config(&cell, &opts))?;
            // Detached runsc keeps inherited stdio open: hand it /dev/null, never pipes.
            let detached = |args: Vec<std::ffi::OsString>| {
                let argv = hand_rt.argv(&args);
                std::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
            };
            let st = detached(vec![
                "run".into(),
                "--detach".into(),
                "--bundle".into(),
                dir.clone().into(),
                id.clone().into(),
            ])?;
            anyhow::ensure!(st.success(), "runsc run --detach: {st}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = Instant::now();
            let out = hand_rt
                .run_os(&[
                    "checkpoint".into(),
                    "--image-path".into(),
                    img.clone().into(),
                    id.clone().into(),
                ])
                .await;
            hsnap.push(t.elapsed());
            anyhow::ensure!(out.ok, "runsc checkpoint: {}", out.stderr);
            let t = Instant::now();
            let st = detached(vec![
                "restore".into(),
                "--detach".into(),
                "--image-path".into(),
                img.clone().into(),
                "--bundle".into(),
                dir.clone().into(),
                rid.clone().into(),
            ])?;
            hrest.push(t.elapsed());
            anyhow::ensure!(st.success(), "runsc restore: {st}");
            for c in [&rid, &id] {
                let _ = hand_rt.run(&["kill", c, "KILL"]).await;
                let _ = hand_rt.run(&["delete", "--force", c]).await;
            }
            fs::remove_dir_all(&dir)?;
            fs::remove_dir_all(&img)?;
        }
        let (s, r, hs, hr) = (stats(snap), stats(rest), stats(hsnap), stats(hrest));
        report["snapshot"] = json!({ "ours": s, "by_hand": hs, "ratio": ratio(&s, &hs) });
        report["restore"] = json!({ "ours": r, "by_hand": hr, "ratio": ratio(&r, &hr) });
    }
    let _ = fs::remove_dir(scratch.join("state"));
    let _ = fs::remove_dir(&scratch);
    let _ = fs::remove_dir(scratch.parent().unwrap_or(&scratch));

    let out_dir = cellcheck_fixtures::target_dir().join("conformance");
    fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(format!("bench-{}.json", kind.name()));
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}
