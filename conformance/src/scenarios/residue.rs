//! Nothing of a cell survives its destroy, whatever the workload did or however the cell ended.

use std::path::Path;
use std::time::{Duration, Instant};

use cellcheck_contract::{Capability, CellError, Limits, Termination};

use crate::harness::{fixtures_rootfs, Ctx, Failure, Scenario};
use crate::residue::marked_processes;
use crate::{check, scenario};

const F: &str = "residue";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "after_exit", [], after_exit),
        scenario!(F, "after_kill", [], after_kill),
        scenario!(F, "after_missing_program", [], after_missing_program),
        scenario!(F, "after_refused_spec", [], after_refused_spec),
        scenario!(F, "after_timeout", [Timeout], after_timeout),
        scenario!(F, "daemon", [], |c| daemon(c, false)),
        scenario!(F, "daemon_exit", [], |c| daemon(c, true)),
        scenario!(F, "tree", [], tree),
        scenario!(F, "tmp_file", [], tmp_file),
        scenario!(F, "ttl_reaper", [Ttl], ttl_reaper),
    ]
}

async fn after_exit(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `exit 0`, destroy");
    let (id, _) = ctx.run_probe(&["exit", "0"]).await?;
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn after_kill(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `signal KILL`, destroy");
    let (id, r) = ctx.run_probe(&["signal", "KILL"]).await?;
    check!(
        ctx,
        matches!(r.termination, Termination::Signaled { .. }),
        "expected a signal death, got {:?}",
        r.termination
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn after_missing_program(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create with a missing program");
    let id = ctx.new_id();
    let mut doc = ctx.doc_for(&id, &[]);
    doc.spec.run.argv = vec!["/nonexistent/cellcheck".into(), "x".into()];
    let r = ctx.try_create(&doc).await;
    check!(
        ctx,
        r.is_err(),
        "create of a missing program succeeded: {r:?}"
    );
    ctx.assert_clean(&id).await
}

async fn after_refused_spec(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create a document admission refuses (pidsMax = 0)");
    let doc = ctx.doc(&["hold"]).with_limits(Limits {
        pids_max: Some(0),
        ..Limits::default()
    });
    let id = doc.spec.id.clone();
    let r = ctx.try_create(&doc).await;
    check!(
        ctx,
        matches!(r, Err(CellError::InvalidSpec { .. })),
        "expected InvalidSpec, got {r:?}"
    );
    check!(
        ctx,
        !ctx.backend().list().await.contains(&id),
        "the refused cell is listed"
    );
    ctx.assert_clean(&id).await
}

async fn after_timeout(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("`hold` with timeoutMs = 500");
    let doc = ctx.doc(&["tree", "3"]).with_timeout_ms(500);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    let r = ctx.try_wait(&id).await;
    check!(
        ctx,
        matches!(r, Err(CellError::DeadlineExceeded { .. })),
        "expected DeadlineExceeded, got {r:?}"
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

/// Wait until at least `n` processes carry the cell's marker (only observable with host pids).
async fn await_marked(ctx: &Ctx, id: &str, n: usize) -> Result<(), Failure> {
    if !ctx.has(Capability::HostPid) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        return Ok(());
    }
    let marker = ctx.marker_of(id);
    let start = Instant::now();
    loop {
        let seen = marked_processes(std::slice::from_ref(&marker), &[]).len();
        if seen >= n {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(ctx.fail(format!(
                "only {seen} of {n} expected processes of the cell appeared on the host"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn daemon(ctx: Ctx, exit_first: bool) -> Result<(), Failure> {
    let verb = if exit_first { "daemon-exit" } else { "daemon" };
    ctx.step(format!("run `{verb}`"));
    let doc = ctx.doc(&[verb]);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    if exit_first {
        let r = ctx.wait(&id).await?;
        check!(
            ctx,
            r.termination == Termination::Exited { code: 0 },
            "`daemon-exit` exit: {:?}",
            r.termination
        );
        check!(
            ctx,
            r.stdout_str().contains("daemon="),
            "no `daemon=` line in {:?}",
            r.stdout_str()
        );
    } else {
        ctx.step("the daemonized grandchild is up");
        await_marked(&ctx, &id, 2).await?;
    }
    ctx.step("destroy");
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn tree(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `tree 5`");
    let doc = ctx.doc(&["tree", "5"]);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    ctx.step("all 6 processes are up");
    await_marked(&ctx, &id, 6).await?;
    ctx.step("destroy");
    let t = ctx.destroy(&id).await?;
    check!(
        ctx,
        t.killed_running,
        "the tree was running, yet killed_running = false"
    );
    ctx.assert_clean(&id).await
}

/// Files under `root` (bounded walk) whose name or content contains `needle`.
pub(crate) fn files_containing(root: &Path, needle: &str, budget: &mut usize) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let Ok(md) = p.symlink_metadata() else {
            continue;
        };
        if p.to_string_lossy().contains(needle) {
            hits.push(p.display().to_string());
            continue;
        }
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if md.is_file() && md.len() <= 4 << 20 {
            if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

async fn tmp_file(ctx: Ctx) -> Result<(), Failure> {
    let name = format!("cellcheck-{}", ctx.token());
    let content = format!("content-{}", crate::ids::random_token(16));
    let inner = format!("/tmp/{name}");
    ctx.step(format!("run `write {inner} ...`"));
    let (id, r) = ctx.run_probe(&["write", &inner, &content]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "`write` into the cell's /tmp failed: {:?} {}",
        r.termination,
        r.stderr_str()
    );
    ctx.destroy(&id).await?;
    ctx.step("the file is nowhere on the host");
    let mut hits = Vec::new();
    let host_tmp = Path::new("/tmp").join(&name);
    if host_tmp.exists() {
        hits.push(host_tmp.display().to_string());
    }
    // The root the backend was given, and the built one it was copied from.
    for root in ctx.rootfs().into_iter().chain(fixtures_rootfs()) {
        let p = root.join("tmp").join(&name);
        if p.exists() {
            hits.push(p.display().to_string());
        }
    }
    let mut budget = 20_000;
    for p in ctx.backend().footprint(&id).paths {
        hits.extend(files_containing(&p, &content, &mut budget));
    }
    check!(
        ctx,
        hits.is_empty(),
        "the file the workload wrote in its /tmp survived on the host: {hits:?}"
    );
    ctx.assert_clean(&id).await
}

async fn ttl_reaper(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold` with ttlSeconds = 2");
    let doc = ctx.doc(&["hold"]).with_ttl_seconds(2);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    ctx.step("the reaper destroys it");
    let start = Instant::now();
    while ctx.backend().list().await.contains(&id) {
        check!(
            ctx,
            start.elapsed() < Duration::from_secs(20),
            "the cell was still listed 20 s after a 2 s ttl"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctx.step("a later destroy is NotFound");
    let r = ctx.try_destroy(&id).await;
    check!(
        ctx,
        matches!(r, Err(CellError::NotFound { .. })),
        "destroy after the ttl: expected NotFound, got {r:?}"
    );
    ctx.assert_clean(&id).await
}
