//! Freeze and thaw. Exec into a paused cell should be refused with `InvalidState` (the contract's
//! preference); a backend that serves it anyway must still not let the workload run.

use std::time::Duration;

use cellcheck_contract::CellError;

use super::snapshot::{await_count_above, counting_cell, read_count};
use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "pause";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "counter_stops", [Pause, Exec], counter_stops),
        scenario!(F, "exec_while_paused", [Pause, Exec], exec_while_paused),
        scenario!(F, "destroy_paused", [Pause], destroy_paused),
        scenario!(F, "unknown_cell", [Pause], unknown_cell),
    ]
}

async fn pause(ctx: &Ctx, id: &str) -> Result<(), Failure> {
    ctx.step(format!("pause {id}"));
    ctx.backend()
        .pause(id)
        .await
        .map_err(|e| ctx.fail(format!("pause failed: {e} ({e:?})")))
}

async fn resume(ctx: &Ctx, id: &str) -> Result<(), Failure> {
    ctx.step(format!("resume {id}"));
    ctx.backend()
        .resume(id)
        .await
        .map_err(|e| ctx.fail(format!("resume failed: {e} ({e:?})")))
}

async fn counter_stops(ctx: Ctx) -> Result<(), Failure> {
    let id = counting_cell(&ctx).await?;
    ctx.step("read the counter before pausing");
    let before = read_count(&ctx, &id).await?;
    pause(&ctx, &id).await?;
    // No exec while frozen (a backend may refuse it): compare across the pause instead.
    ctx.step("paused for 1.5 s (30 intervals of 50 ms)");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    resume(&ctx, &id).await?;
    ctx.step("read right after resume");
    let after = read_count(&ctx, &id).await?;
    // Only the ticks around the pause and read calls may land; a running counter adds ~30.
    check!(
        ctx,
        after <= before + 10,
        "the counter moved from {before} to {after} across a 1.5 s pause"
    );
    ctx.step("it advances after resume");
    await_count_above(&ctx, &id, after).await?;
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn exec_while_paused(ctx: Ctx) -> Result<(), Failure> {
    let id = counting_cell(&ctx).await?;
    pause(&ctx, &id).await?;
    ctx.step("exec into the paused cell");
    let r = tokio::time::timeout(Duration::from_secs(10), ctx.try_exec(&id, &["exit", "0"])).await;
    match r {
        Ok(Err(CellError::InvalidState { .. })) => {}
        Ok(other) => {
            return Err(ctx.fail(format!(
                "exec into a paused cell: expected InvalidState, got {other:?}"
            )))
        }
        Err(_) => {
            return Err(ctx.fail("exec into a paused cell hung for 10 s (expected InvalidState)"))
        }
    }
    resume(&ctx, &id).await?;
    ctx.destroy(&id).await?;
    Ok(())
}

async fn destroy_paused(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `tree 3`");
    let doc = ctx.doc(&["tree", "3"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pause(&ctx, &id).await?;
    ctx.step("destroy while paused");
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn unknown_cell(ctx: Ctx) -> Result<(), Failure> {
    let id = ctx.new_id();
    ctx.step("pause a cell never created");
    let r = ctx.backend().pause(&id).await;
    check!(
        ctx,
        matches!(r, Err(CellError::NotFound { .. })),
        "expected NotFound, got {r:?}"
    );
    let r = ctx.backend().resume(&id).await;
    check!(
        ctx,
        matches!(r, Err(CellError::NotFound { .. })),
        "resume: expected NotFound, got {r:?}"
    );
    Ok(())
}
