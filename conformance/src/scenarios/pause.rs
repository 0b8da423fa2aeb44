//! Freeze and thaw. Exec into a paused cell should be refused with `InvalidState` (the contract's
//! preference); a backend that serves it anyway must still not let the workload run.

use std::time::{Duration, Instant};

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
        scenario!(
            F,
            "stops_the_clock_without_exec",
            [Pause],
            stops_without_exec
        ),
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
    let before_at = Instant::now();
    let before = read_count(&ctx, &id).await?;
    pause(&ctx, &id).await?;
    let ran_before = before_at.elapsed();
    // No exec while frozen (a backend may refuse it): compare across the pause instead.
    ctx.step("paused for 1.5 s (30 intervals of 50 ms)");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resumed_at = Instant::now();
    resume(&ctx, &id).await?;
    ctx.step("read right after resume");
    let after = read_count(&ctx, &id).await?;
    let ran = ran_before + resumed_at.elapsed();
    // Only the ticks while it ran around the pause may land; a running counter adds ~30 more.
    let allowed = cellcheck_fixtures::counter::most_ticks(ran, Duration::from_millis(50));
    check!(
        ctx,
        after <= before + allowed,
        "the counter moved from {before} to {after} across a 1.5 s pause; running for {} ms \
         around it, it could add at most {allowed}",
        ran.as_millis()
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

/// Pause seen from outside, with no exec: two cells sleep 20 × 100 ms side by side and one is
/// paused for 2 s; a frozen loop makes no progress (on a VM the guest clock stops too), so the
/// paused one ends about 2 s after its twin.
async fn stops_without_exec(ctx: Ctx) -> Result<(), Failure> {
    const PAUSE: Duration = Duration::from_secs(2);
    // One interval of the pause may overlap a sleep already due, plus noise between the twins.
    const SLACK: Duration = Duration::from_millis(700);
    let sleeper = |ctx: &Ctx| {
        ctx.shell_doc(
            &ctx.new_id(),
            "i=0; while [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done; printf ticks=$i",
        )
    };
    let (paused_doc, twin_doc) = (sleeper(&ctx), sleeper(&ctx));
    ctx.step("create two cells sleeping 20 × 100 ms");
    let (p, t) = tokio::join!(
        ctx.create_running(&paused_doc),
        ctx.create_running(&twin_doc)
    );
    let (p, t) = (p?, t?);
    let run = |id: String, pause_it: bool| {
        let ctx = ctx.clone();
        async move {
            let start = Instant::now();
            if pause_it {
                tokio::time::sleep(Duration::from_millis(300)).await;
                pause(&ctx, &id).await?;
                tokio::time::sleep(PAUSE).await;
                resume(&ctx, &id).await?;
            }
            let r = ctx.wait(&id).await?;
            Ok::<_, Failure>((start.elapsed(), r))
        }
    };
    let (pr, tr) = tokio::join!(run(p.id.clone(), true), run(t.id.clone(), false));
    let ((p_took, p_rep), (t_took, t_rep)) = (pr?, tr?);
    check!(
        ctx,
        p_rep.stdout == b"ticks=20" && t_rep.stdout == b"ticks=20",
        "the workloads wrote {:?} and {:?}",
        p_rep.stdout_str(),
        t_rep.stdout_str()
    );
    check!(
        ctx,
        p_took + SLACK >= t_took + PAUSE,
        "paused for {PAUSE:?}, the cell ended {p_took:?} after create, its unpaused twin \
         {t_took:?}: the pause did not stop the workload"
    );
    for id in [p.id, t.id] {
        ctx.destroy(&id).await?;
        ctx.assert_clean(&id).await?;
    }
    Ok(())
}
