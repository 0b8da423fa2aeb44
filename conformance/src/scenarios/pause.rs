//! Freeze and thaw. Exec into a paused cell should be refused with `InvalidState` (the contract's
//! preference); a backend that serves it anyway must still not let the workload run.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Pause seen with no exec, judged by clocks rather than by progress (which depends on the CPU
/// share a loaded host gives the cell). The probe ticks every 50 ms, printing its realtime and its
/// RTC; it is paused for [`PAUSE`]. A frozen workload reads no clock from the moment `pause`
/// returns until `resume` is called, so no tick may fall in that window by a clock that runs on
/// while the cell is frozen: the host's realtime in a container (the workload reads the host's own
/// CLOCK_REALTIME), QEMU's RTC in a VM (`-rtc clock=host`; the guest's own clocks stop with it).
/// This holds at any load: it is an ordering of events, not a rate. A workload that is not frozen
/// ticks inside the window unless it is denied the CPU for most of [`PAUSE`].
async fn stops_without_exec(ctx: Ctx) -> Result<(), Failure> {
    const PAUSE: Duration = Duration::from_secs(5);
    // 14 s of the probe's own monotonic time: the resume comes 8 s after create returned (3 s, then
    // the pause), so a container's ticks (whose monotonic clock runs on while frozen) go on for
    // about 6 s after it, minus create's latency; a VM's monotonic clock stops with it, so its
    // ticks go on for what was left at the pause. Either way ticks follow the resume by more than
    // the RTC's two-second span.
    let doc = ctx.doc(&["clock", "14000"]);
    let id = doc.spec.id.clone();
    ctx.step("create a cell ticking its clocks every 50 ms");
    ctx.create_running(&doc).await?;
    // The first tick must be provably before the pause by the RTC's span of two seconds (without
    // a host pid, create_running cannot see the first tick; it waits 500 ms).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    pause(&ctx, &id).await?;
    let paused = SystemTime::now();
    ctx.step(format!("paused for {PAUSE:?}"));
    tokio::time::sleep(PAUSE).await;
    let resumed = SystemTime::now();
    resume(&ctx, &id).await?;
    let r = ctx.wait(&id).await?;
    check!(
        ctx,
        r.code() == Some(0),
        "the ticking workload ended {:?}: {}",
        r.termination,
        r.stderr_str()
    );
    let window = Window {
        paused: nanos(paused),
        resumed: nanos(resumed),
    };
    if let Err(why) = judge(&r.stdout_str(), window) {
        return Err(ctx.fail(why));
    }
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// When the cell was frozen, in host realtime nanoseconds: from pause's return to resume's call.
#[derive(Debug, Clone, Copy)]
struct Window {
    paused: u128,
    resumed: u128,
}

const SECOND: u128 = 1_000_000_000;

/// A clock a tick reports, as the span of host realtime in which the tick was taken.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TickClock {
    /// CLOCK_REALTIME, in nanoseconds: the host's in a container; a VM's own stops while paused.
    Realtime,
    /// The RTC, in whole seconds: a reading `s` was taken in `[s, s + 2)`. Right after a resume a
    /// QEMU guest was seen reading a second that began 0.15 to 1.15 s before resume was called,
    /// for about 250 ms (one run in three under TCG): a reading may lag by up to one more second.
    Rtc,
}

impl TickClock {
    fn span(self, line: &str) -> Option<(u128, u128)> {
        let mut fields = line.split(' ');
        let (real, rtc) = (fields.next()?, fields.next()?);
        match self {
            TickClock::Realtime => real.parse().ok().map(|r| (r, r)),
            TickClock::Rtc => rtc
                .parse::<u128>()
                .ok()
                .map(|s| (s * SECOND, (s + 2) * SECOND)),
        }
    }
}

/// The verdict on the probe's ticks: some clock shows ticks before and after the window (so the
/// workload lived across it) and none inside. A clock that does not run through a pause (a VM's
/// realtime) shows no tick after the window and is not used; one that lived across it and still
/// shows none inside proves the freeze.
fn judge(out: &str, w: Window) -> Result<(), String> {
    let (mut seen, mut lived) = (Vec::new(), false);
    for clock in [TickClock::Realtime, TickClock::Rtc] {
        let spans: Vec<(u128, u128)> = out.lines().filter_map(|l| clock.span(l)).collect();
        let before = spans.iter().filter(|s| s.1 <= w.paused).count();
        let after = spans.iter().filter(|s| s.0 >= w.resumed).count();
        let inside: Vec<u128> = spans
            .iter()
            .filter(|s| s.0 > w.paused && s.1 < w.resumed)
            .map(|s| (s.0 - w.paused) / 1_000_000)
            .collect();
        if before > 0 && after > 0 && inside.is_empty() {
            return Ok(());
        }
        lived |= before > 0 && after > 0;
        seen.push(format!(
            "{clock:?}: {} ticks, {before} before the pause, {after} after the resume, {} inside \
             (ms after the pause returned: {:?})",
            spans.len(),
            inside.len(),
            &inside[..inside.len().min(8)]
        ));
    }
    let verdict = if lived {
        "the workload kept ticking while paused: the pause did not stop the workload"
    } else {
        "no clock of the workload shows ticks both before the pause and after the resume, so \
         the run cannot show the freeze (it ended early or its clocks did not run on)"
    };
    Err(format!(
        "paused from {} to {} (host realtime ns): {verdict}; {}",
        w.paused,
        w.resumed,
        seen.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u128 = 1_000 * SECOND + 300_000_000;
    const W: Window = Window {
        paused: P,
        resumed: P + 4 * SECOND,
    };

    /// Ticks every 50 ms from `from` to `to` (ns), realtime shifted by `lag` after the window, with
    /// the host's second as the RTC when `rtc`.
    fn ticks(ranges: &[(u128, u128)], lag: u128, rtc: bool) -> String {
        let mut out = String::new();
        for &(from, to) in ranges {
            let mut t = from;
            while t < to {
                let real = if t >= W.resumed { t - lag } else { t };
                let r = if rtc {
                    (t / SECOND).to_string()
                } else {
                    "-".into()
                };
                out.push_str(&format!("{real} {r}\n"));
                t += 50_000_000;
            }
        }
        out
    }

    #[test]
    fn a_frozen_container_passes() {
        let out = ticks(
            &[(P - 2 * SECOND, P), (W.resumed + 1, W.resumed + SECOND)],
            0,
            false,
        );
        assert_eq!(judge(&out, W), Ok(()));
    }

    #[test]
    fn a_frozen_vm_passes_by_its_rtc_though_its_realtime_lags() {
        let lag = W.resumed - W.paused;
        let out = ticks(
            &[
                (P - 2 * SECOND, P),
                (W.resumed + 1, W.resumed + 1_600_000_000),
            ],
            lag,
            true,
        );
        assert_eq!(judge(&out, W), Ok(()));
    }

    #[test]
    fn a_workload_running_through_the_pause_fails_by_every_clock() {
        for rtc in [false, true] {
            let out = ticks(&[(P - 2 * SECOND, W.resumed + 2 * SECOND)], 0, rtc);
            let e = judge(&out, W).unwrap_err();
            assert!(e.contains("did not stop"), "{e}");
        }
    }

    #[test]
    fn a_run_that_does_not_span_the_window_proves_nothing() {
        let out = ticks(&[(P - 2 * SECOND, P)], 0, true);
        let e = judge(&out, W).unwrap_err();
        assert!(e.contains("cannot show the freeze"), "{e}");
        assert!(judge("", W).is_err());
    }

    #[test]
    fn an_rtc_second_straddling_an_edge_is_not_inside() {
        // RTC readings only; the pause returned 0.3 s into second 1000, resume came in 1004.
        let out = "- 998\n- 1006\n";
        // Read in second 1000: maybe before the pause returned.
        assert_eq!(judge(&format!("{out}- 1000\n"), W), Ok(()));
        // Reading 1003 (it may lag one second): maybe after resume was called.
        assert_eq!(judge(&format!("{out}- 1003\n"), W), Ok(()));
        // Readings 1001 and 1002: certainly inside.
        assert!(judge(&format!("{out}- 1001\n"), W).is_err());
        assert!(judge(&format!("{out}- 1002\n"), W).is_err());
    }
}
