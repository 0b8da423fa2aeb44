//! How a workload ended, and what it wrote, reported exactly.

use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, ResourceKind, Termination};

use super::pattern;
use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "exit";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "code_0", [], |c| code(c, 0)),
        scenario!(F, "code_1", [], |c| code(c, 1)),
        scenario!(F, "code_42", [], |c| code(c, 42)),
        scenario!(F, "code_255", [], |c| code(c, 255)),
        scenario!(F, "sigkill", [], |c| signaled(c, "KILL", 9)),
        scenario!(F, "sigterm", [], |c| signaled(c, "TERM", 15)),
        scenario!(F, "missing_program", [], missing_program),
        scenario!(F, "timeout", [Timeout], timeout),
        scenario!(F, "large_stdout", [], large_stdout),
        scenario!(F, "large_stderr", [], large_stderr),
        scenario!(F, "wait_twice", [], wait_twice),
    ]
}

async fn code(ctx: Ctx, n: i32) -> Result<(), Failure> {
    ctx.step(format!("run `exit {n}`"));
    let r = ctx.run_and_destroy(&["exit", &n.to_string()]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: n },
        "expected exit code {n}, got {:?}",
        r.termination
    );
    Ok(())
}

async fn signaled(ctx: Ctx, sig: &str, num: i32) -> Result<(), Failure> {
    ctx.step(format!("run `signal {sig}`"));
    let r = ctx.run_and_destroy(&["signal", sig]).await?;
    check!(
        ctx,
        r.termination == Termination::Signaled { signal: num },
        "expected death by signal {num} (SIG{sig}), got {:?}",
        r.termination
    );
    Ok(())
}

async fn missing_program(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create with a program that is not in the root");
    let id = ctx.new_id();
    let mut doc = ctx.doc_for(&id, &[]);
    doc.spec.run.argv = vec![format!("/usr/bin/cellcheck-missing-{}", ctx.token())];
    match ctx.try_create(&doc).await {
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        }) => {}
        other => return Err(ctx.fail(format!("expected NotFound(program), got {other:?}"))),
    }
    ctx.step("nothing left behind");
    check!(
        ctx,
        !ctx.backend().list().await.contains(&id),
        "the failed cell is listed"
    );
    ctx.assert_clean(&id).await
}

async fn timeout(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold` with timeoutMs = 1000");
    let doc = ctx.doc(&["hold"]).with_timeout_ms(1000);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    ctx.step("wait past the deadline");
    let start = Instant::now();
    let r = ctx.try_wait(&id).await;
    let took = start.elapsed();
    check!(
        ctx,
        matches!(r, Err(CellError::DeadlineExceeded { .. })),
        "expected DeadlineExceeded, got {r:?}"
    );
    check!(
        ctx,
        took < Duration::from_secs(20),
        "the deadline of 1 s took {took:?} to fire"
    );
    ctx.step("the cell stays listed until destroyed");
    check!(
        ctx,
        ctx.backend().list().await.contains(&id),
        "the timed-out cell is no longer listed"
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn large_stdout(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `out 1000000`");
    let r = ctx.run_and_destroy(&["out", "1000000"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stdout.len() == 1_000_000,
        "captured {} stdout bytes, expected 1000000",
        r.stdout.len()
    );
    check!(
        ctx,
        r.stdout == pattern(1_000_000),
        "stdout bytes differ from the expected pattern"
    );
    check!(
        ctx,
        r.stderr.is_empty(),
        "unexpected stderr: {:?}",
        r.stderr_str()
    );
    Ok(())
}

async fn large_stderr(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `err 1000`");
    let r = ctx.run_and_destroy(&["err", "1000"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stderr == pattern(1000),
        "stderr ({} bytes) differs from the expected 1000",
        r.stderr.len()
    );
    check!(
        ctx,
        r.stdout.is_empty(),
        "unexpected stdout: {:?}",
        r.stdout_str()
    );
    Ok(())
}

async fn wait_twice(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `out 5` then `exit 42` semantics");
    let (id, first) = ctx.run_probe(&["exit", "42"]).await?;
    ctx.step("wait again");
    let second = ctx.wait(&id).await?;
    check!(
        ctx,
        first == second,
        "second wait differs: {first:?} vs {second:?}"
    );
    check!(
        ctx,
        first.termination == Termination::Exited { code: 42 },
        "exit: {:?}",
        first.termination
    );
    ctx.destroy(&id).await?;
    Ok(())
}
