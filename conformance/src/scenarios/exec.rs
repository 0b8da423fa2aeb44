//! Exec: a command in a live cell gets exactly the request's env and fds 0-2, ends like a workload
//! does (codes and signals), runs beside other execs, and a cell whose workload ended refuses it.

use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, EnvVar, ExecRequest, ExitReport, Termination};

use super::pattern;
use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "exec";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "env_exact", [Exec], env_exact),
        scenario!(F, "fds_only_stdio", [Exec], fds_only_stdio),
        scenario!(F, "codes_and_signals", [Exec], codes_and_signals),
        scenario!(F, "concurrent", [Exec], concurrent),
        scenario!(F, "timeout", [Exec], timeout),
        scenario!(F, "after_workload_ended", [Exec], after_workload_ended),
    ]
}

/// A live cell holding, for execs.
async fn holding_cell(ctx: &Ctx) -> Result<String, Failure> {
    ctx.step("create a holding cell");
    let doc = ctx.doc(&["hold"]);
    let h = ctx.create_running(&doc).await?;
    Ok(h.id)
}

fn probe_req(ctx: &Ctx, id: &str, args: &[&str], extra_env: &[(&str, &str)]) -> ExecRequest {
    let mut env = vec![ctx.marker_env(id)];
    env.extend(extra_env.iter().map(|(n, v)| EnvVar {
        name: n.to_string(),
        value: v.to_string(),
    }));
    ExecRequest {
        argv: Ctx::probe_argv(args),
        env,
        timeout_ms: Some(30_000),
    }
}

async fn exec_req(ctx: &Ctx, id: &str, req: ExecRequest) -> Result<ExitReport, Failure> {
    let what = format!("{:?}", req.argv);
    ctx.backend()
        .exec(id, req)
        .await
        .map_err(|e| ctx.fail(format!("exec {what} failed: {e:?}")))
}

async fn env_exact(ctx: Ctx) -> Result<(), Failure> {
    let id = holding_cell(&ctx).await?;
    // Differs from the workload's env (which has only the marker), in names, order and bytes.
    let extra = [
        ("ZED", "last=first"),
        ("ALPHA", "h\u{e9}llo \u{2713}"),
        ("EMPTY", ""),
    ];
    let req = probe_req(&ctx, &id, &["env"], &extra);
    let want: Vec<u8> = req
        .env
        .iter()
        .flat_map(|e| format!("{}={}\0", e.name, e.value).into_bytes())
        .collect();
    ctx.step("exec `env` with its own env");
    let r = exec_req(&ctx, &id, req).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stdout == want,
        "exec env is {:?}, expected exactly the request's {:?}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&want)
    );
    Ok(())
}

async fn fds_only_stdio(ctx: Ctx) -> Result<(), Failure> {
    let id = holding_cell(&ctx).await?;
    ctx.step("exec `fds`");
    let r = exec_req(&ctx, &id, probe_req(&ctx, &id, &["fds"], &[])).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 } && r.stdout == b"0 1 2\n",
        "exec sees fds {:?} ({:?}), expected \"0 1 2\"",
        r.stdout_str().trim(),
        r.termination
    );
    Ok(())
}

async fn codes_and_signals(ctx: Ctx) -> Result<(), Failure> {
    let id = holding_cell(&ctx).await?;
    let mut wrong = Vec::new();
    for code in [0, 1, 42, 126, 127, 128, 129, 137, 143, 192, 255] {
        ctx.step(format!("exec `exit {code}`"));
        let r = exec_req(
            &ctx,
            &id,
            probe_req(&ctx, &id, &["exit", &code.to_string()], &[]),
        )
        .await?;
        if r.termination != (Termination::Exited { code }) {
            wrong.push(format!("exit {code}: got {:?}", r.termination));
        }
    }
    for sig in [9, 15, 1, 34] {
        ctx.step(format!("exec `signal {sig}`"));
        let r = exec_req(
            &ctx,
            &id,
            probe_req(&ctx, &id, &["signal", &sig.to_string()], &[]),
        )
        .await?;
        if r.termination != (Termination::Signaled { signal: sig }) {
            wrong.push(format!("signal {sig}: got {:?}", r.termination));
        }
    }
    check!(
        ctx,
        wrong.is_empty(),
        "exec reported ends wrongly:\n  {}",
        wrong.join("\n  ")
    );
    Ok(())
}

async fn concurrent(ctx: Ctx) -> Result<(), Failure> {
    let id = holding_cell(&ctx).await?;
    ctx.step("8 execs at once, each writing its own byte count");
    let sizes: Vec<usize> = (0..8).map(|i| 1000 + 4099 * i).collect();
    let results = ctx
        .concurrently(sizes.len(), |i| {
            let (b, id) = (ctx.backend_arc(), id.clone());
            let req = probe_req(&ctx, &id, &["out", &sizes[i].to_string()], &[]);
            async move { Ok(b.exec(&id, req).await) }
        })
        .await?;
    let mut wrong = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(r)
                if r.termination == (Termination::Exited { code: 0 })
                    && r.stdout == pattern(sizes[i]) => {}
            Ok(r) => wrong.push(format!(
                "exec {i} (`out {}`): {:?} with {} stdout bytes",
                sizes[i],
                r.termination,
                r.stdout.len()
            )),
            Err(e) => wrong.push(format!("exec {i}: {e:?}")),
        }
    }
    check!(
        ctx,
        wrong.is_empty(),
        "concurrent execs got wrong reports:\n  {}",
        wrong.join("\n  ")
    );
    Ok(())
}

async fn timeout(ctx: Ctx) -> Result<(), Failure> {
    let id = holding_cell(&ctx).await?;
    ctx.step("exec `hold` with timeoutMs = 1000");
    let mut req = probe_req(&ctx, &id, &["hold"], &[]);
    req.timeout_ms = Some(1000);
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), ctx.backend().exec(&id, req)).await;
    check!(
        ctx,
        matches!(r, Ok(Err(CellError::DeadlineExceeded { .. }))),
        "expected DeadlineExceeded after about 1 s, got {r:?} after {:?}",
        start.elapsed()
    );
    ctx.step("the cell still runs execs");
    let r = exec_req(&ctx, &id, probe_req(&ctx, &id, &["exit", "3"], &[])).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 3 },
        "exec after a timed-out exec: {:?}",
        r.termination
    );
    Ok(())
}

async fn after_workload_ended(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `exit 0` to its end");
    let (id, _) = ctx.run_probe(&["exit", "0"]).await?;
    ctx.step("exec into the ended cell");
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        ctx.backend()
            .exec(&id, probe_req(&ctx, &id, &["exit", "0"], &[])),
    )
    .await;
    check!(
        ctx,
        matches!(r, Ok(Err(CellError::InvalidState { .. }))),
        "exec after the workload ended: expected InvalidState, got {r:?}"
    );
    ctx.destroy(&id).await?;
    Ok(())
}
