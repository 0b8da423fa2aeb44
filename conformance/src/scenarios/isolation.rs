//! What the workload can see of the host: env, fds, stdio, pids, hostname, network, secrets.

use cellcheck_contract::spec::MAX_HOSTNAME_LEN as HOSTNAME_MAX;
use cellcheck_contract::{CellDocument, CellError, ResourceKind, Termination};

use crate::harness::{sentinels, Ctx, Failure, Scenario};
use crate::ids::{canary, random_token};
use crate::residue::processes;
use crate::{check, scenario};

const F: &str = "isolation";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "environ_exact", [HostPid], environ_exact),
        scenario!(F, "env_inside", [], env_inside),
        scenario!(F, "no_ambient_canary", [], no_ambient_canary),
        scenario!(F, "fds_host", [HostPid], fds_host),
        scenario!(F, "fds_inside", [], fds_inside),
        scenario!(F, "stdio_not_harness", [HostPid], stdio_not_harness),
        scenario!(F, "pids", [PidIsolation], pids),
        scenario!(F, "hostname", [Hostname], hostname),
        scenario!(F, "hostname_long_id", [Hostname], hostname_long_id),
        scenario!(F, "working_directory", [], working_directory),
        scenario!(
            F,
            "missing_working_directory",
            [],
            missing_working_directory
        ),
        scenario!(F, "netifs", [NetworkIsolation], netifs),
        scenario!(F, "secret_hygiene", [], secret_hygiene),
    ]
}

/// A document with a declared env worth checking: order, `=` in values, empty values, spaces.
fn env_doc(ctx: &Ctx, args: &[&str]) -> CellDocument {
    ctx.doc(args)
        .with_env("ZETA", "last-declared-first")
        .with_env("ALPHA", "a=b=c")
        .with_env("EMPTY", "")
        .with_env("SPACED", " two  words ")
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace('\0', "\\0")
}

/// Names of `NAME=value\0` entries in `got` that are not in `want`.
fn extra_names(got: &[u8], want: &[u8]) -> Vec<String> {
    let want: Vec<&[u8]> = want.split(|&b| b == 0).collect();
    got.split(|&b| b == 0)
        .filter(|e| !e.is_empty() && !want.contains(e))
        .map(|e| {
            let s = String::from_utf8_lossy(e);
            s.split('=').next().unwrap_or_default().to_string()
        })
        .collect()
}

async fn environ_exact(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold` with a declared env");
    let doc = env_doc(&ctx, &["hold"]);
    let h = ctx.create_running(&doc).await?;
    let pid = h
        .host_pid
        .ok_or_else(|| ctx.fail("HostPid is supported but create returned no host pid"))?;
    ctx.step(format!("read /proc/{pid}/environ"));
    let got = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| ctx.fail(format!("cannot read /proc/{pid}/environ: {e}")))?;
    let want = Ctx::expected_environ(&doc);
    check!(
        ctx,
        got == want,
        "environ differs from the declared set (extra vars: {:?})\n  want: {}\n  got:  {}",
        extra_names(&got, &want),
        show(&want),
        show(&got)
    );
    ctx.destroy(&h.id).await?;
    Ok(())
}

async fn env_inside(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `env` with a declared env");
    let doc = env_doc(&ctx, &["env"]);
    let (id, r) = ctx.run_doc(&doc).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    let want = Ctx::expected_environ(&doc);
    check!(
        ctx,
        r.stdout == want,
        "the probe's env differs from the declared set (extra vars: {:?})\n  want: {}\n  got:  {}",
        extra_names(&r.stdout, &want),
        show(&want),
        show(&r.stdout)
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn no_ambient_canary(ctx: Ctx) -> Result<(), Failure> {
    let c = canary();
    ctx.step("run `env`");
    let (id, r) = ctx.run_probe(&["env"]).await?;
    let out = r.stdout_str();
    check!(
        ctx,
        !out.contains(&c.name) && !out.contains(&c.value),
        "the harness's ambient var {} leaked into the workload's env: {}",
        c.name,
        show(&r.stdout)
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn fds_host(ctx: Ctx) -> Result<(), Failure> {
    let inheritable = sentinels().inheritable();
    check!(
        ctx,
        !inheritable.is_empty(),
        "the harness could not set up its inheritable sentinel fds"
    );
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let h = ctx.create_running(&doc).await?;
    let pid = h
        .host_pid
        .ok_or_else(|| ctx.fail("create returned no host pid"))?;
    ctx.step(format!("list /proc/{pid}/fd"));
    let rd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| ctx.fail(format!("cannot list /proc/{pid}/fd: {e}")))?;
    let mut fds: Vec<(i32, String)> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let t = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Some((n, t))
        })
        .collect();
    fds.sort();
    let extra: Vec<String> = fds
        .iter()
        .filter(|(n, _)| *n > 2)
        .map(|(n, t)| format!("fd {n} -> {t}"))
        .collect();
    check!(
        ctx,
        extra.is_empty(),
        "the workload holds fds beyond 0, 1, 2: {} (harness sentinels: {inheritable:?})",
        extra.join(", ")
    );
    check!(
        ctx,
        fds.len() == 3,
        "expected exactly fds 0, 1, 2; got {fds:?}"
    );
    ctx.destroy(&h.id).await?;
    Ok(())
}

async fn fds_inside(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `fds`");
    let (id, r) = ctx.run_probe(&["fds"]).await?;
    let got = r.stdout_str();
    let extra: Vec<String> = got
        .split_whitespace()
        .filter(|f| !["0", "1", "2"].contains(f))
        .map(|f| format!("fd {f}"))
        .collect();
    check!(
        ctx,
        got.trim() == "0 1 2",
        "the probe sees fds {:?}, expected `0 1 2` (extra: {})",
        got.trim(),
        extra.join(", ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn stdio_not_harness(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let h = ctx.create_running(&doc).await?;
    let pid = h
        .host_pid
        .ok_or_else(|| ctx.fail("create returned no host pid"))?;
    for fd in [1, 2] {
        ctx.step(format!("compare fd {fd}"));
        let mine = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        let theirs = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map_err(|e| ctx.fail(format!("cannot read /proc/{pid}/fd/{fd}: {e}")))?;
        // A harness writing to /dev/null (or a tty) shares that name with anyone; only pipes,
        // sockets and files identify the harness's own stream.
        if let Some(m) = mine.filter(|m| !m.starts_with("/dev/")) {
            check!(
                ctx,
                m != theirs,
                "the workload's fd {fd} is the harness's own ({})",
                m.display()
            );
        }
    }
    ctx.destroy(&h.id).await?;
    Ok(())
}

async fn pids(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `pids`");
    let (id, r) = ctx.run_probe(&["pids"]).await?;
    let out = r.stdout_str();
    let mut lines = out.lines();
    let visible: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let me = lines
        .find_map(|l| l.strip_prefix("self="))
        .unwrap_or_default()
        .trim()
        .to_string();
    check!(ctx, !me.is_empty(), "no `self=` line in {out:?}");
    check!(
        ctx,
        visible.contains(&me.as_str()),
        "the probe's own pid {me} is not among the visible {visible:?}"
    );
    let host_count = processes().len();
    check!(
        ctx,
        visible.len() <= 4 && visible.len() < host_count,
        "the cell sees {} pids ({visible:?}); only its own processes should be visible",
        visible.len()
    );
    ctx.destroy(&id).await?;
    Ok(())
}

/// The hostname a cell gets: its id, cut to its first [`HOSTNAME_MAX`] bytes (ids are ASCII),
/// the contract's `AdmittedCell::hostname` rule, restated so a backend cannot share a bug with it.
pub fn expected_hostname(id: &str) -> &str {
    &id[..id.len().min(HOSTNAME_MAX)]
}

async fn hostname(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `hostname`");
    let (id, r) = ctx.run_probe(&["hostname"]).await?;
    check!(
        ctx,
        r.stdout == format!("{}\n", expected_hostname(&id)).as_bytes(),
        "hostname is {:?}, expected the cell id {id:?}",
        r.stdout_str()
    );
    ctx.destroy(&id).await?;
    Ok(())
}

/// An id of the maximum length (128) runs, and its hostname is its first 64 bytes.
async fn hostname_long_id(ctx: Ctx) -> Result<(), Failure> {
    let mut id = ctx.new_id();
    id.push('-');
    while id.len() < cellcheck_contract::spec::MAX_ID_LEN {
        id.push('l');
    }
    let marker = ctx.register_id(&id, true);
    let mut doc = CellDocument::new(&id, Ctx::probe_argv(&["hostname"]));
    doc.spec.run.env.push(cellcheck_contract::EnvVar {
        name: crate::ids::MARKER_VAR.into(),
        value: marker,
    });
    ctx.step(format!(
        "run `hostname` in a cell with a {}-byte id",
        id.len()
    ));
    let (_, r) = ctx.run_doc(&doc).await?;
    let want = expected_hostname(&id);
    check!(
        ctx,
        r.stdout == format!("{want}\n").as_bytes(),
        "hostname is {:?}, expected the id's first {HOSTNAME_MAX} bytes {want:?}",
        r.stdout_str()
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

/// `run.workingDirectory` is where the workload starts; absent, it starts at `/`.
async fn working_directory(ctx: Ctx) -> Result<(), Failure> {
    for wd in [Some("/bin"), Some("/"), None] {
        ctx.step(format!("run `report` with workingDirectory {wd:?}"));
        let mut doc = ctx.doc(&["report"]);
        doc.spec.run.working_directory = wd.map(String::from);
        let (id, r) = ctx.run_doc(&doc).await?;
        ctx.destroy(&id).await?;
        let v: serde_json::Value = serde_json::from_slice(&r.stdout)
            .map_err(|e| ctx.fail(format!("report is not JSON ({e}): {:?}", r.stdout_str())))?;
        let want = wd.unwrap_or("/");
        check!(
            ctx,
            v["cwd"] == want,
            "the workload started in {}, expected {want:?}",
            v["cwd"]
        );
    }
    Ok(())
}

/// A `run.workingDirectory` the root lacks fails create with `NotFound(working directory)`,
/// leaves nothing and is not made in the root (a runtime creating it would write the root).
async fn missing_working_directory(ctx: Ctx) -> Result<(), Failure> {
    // A random name: no other trial's cell can have made it.
    let wd = format!("/cc-missing-{}", random_token(12));
    ctx.step(format!("create `exit 0` with workingDirectory {wd:?}"));
    let id = ctx.new_id();
    let mut doc = ctx.doc_for(&id, &["exit", "0"]);
    doc.spec.run.working_directory = Some(wd.clone());
    let created = ctx.try_create(&doc).await;
    if created.is_ok() {
        ctx.destroy(&id).await?;
    }
    let in_root = ctx
        .rootfs()
        .map(|r| r.join(&wd[1..]))
        .filter(|p| p.exists());
    let made = match &in_root {
        Some(p) => format!("; the directory was made in the root ({})", p.display()),
        None => String::new(),
    };
    match &created {
        Err(CellError::NotFound {
            kind: ResourceKind::WorkingDirectory,
            id: got,
        }) if *got == wd => {}
        other => {
            return Err(ctx.fail(format!(
                "expected NotFound(working directory {wd:?}), got {other:?}{made}"
            )))
        }
    }
    ctx.step("nothing left behind, the root not written");
    check!(
        ctx,
        !ctx.backend().list().await.contains(&id),
        "the failed cell is listed"
    );
    check!(ctx, in_root.is_none(), "create failed{made}");
    ctx.assert_clean(&id).await
}

async fn netifs(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `netifs`");
    let (id, r) = ctx.run_probe(&["netifs"]).await?;
    check!(
        ctx,
        r.stdout_str().split_whitespace().collect::<Vec<_>>() == ["lo"],
        "interfaces {:?}, expected only `lo`",
        r.stdout_str().trim()
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn secret_hygiene(ctx: Ctx) -> Result<(), Failure> {
    let secret = format!("s3cr3t-{}", random_token(24));
    ctx.step("create `hold` with a secret env value");
    let doc = ctx.doc(&["hold"]).with_env("CELLCHECK_SECRET", &secret);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    ctx.step("no host process shows the secret in its cmdline");
    let shown: Vec<String> = processes()
        .into_iter()
        .filter(|p| {
            p.cmdline
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
        })
        .map(|p| format!("pid {} ({})", p.pid, p.cmdline_lossy()))
        .collect();
    check!(
        ctx,
        shown.is_empty(),
        "the secret env value is visible in host cmdlines: {shown:?}"
    );
    ctx.step("after destroy no footprint file holds the secret");
    // Read the footprint while live: destroy should remove it, but check what may stay.
    let paths = ctx.backend().footprint(&id).paths;
    ctx.destroy(&id).await?;
    let mut budget = 20_000;
    let hits: Vec<String> = paths
        .iter()
        .flat_map(|p| super::residue::files_containing(p, &secret, &mut budget))
        .collect();
    check!(
        ctx,
        hits.is_empty(),
        "files still holding the secret after destroy: {hits:?}"
    );
    Ok(())
}
