//! A cell's exit: one monitor task per cell obtains the workload's termination (exact for every
//! runtime), enforces the document's timeout, recognises out-of-memory, and publishes the result
//! to every waiter.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, ExitReport, Termination};
use tokio::sync::watch;

use crate::{failure, Inner, Live, WaitResult, TEARDOWN_WAIT};

impl Inner {
    pub(crate) async fn monitor(
        self: Arc<Self>,
        live: Arc<Live>,
        started: Instant,
        tx: watch::Sender<Option<WaitResult>>,
    ) {
        let exit = self.exit_status(&live);
        tokio::pin!(exit);
        let res = match live.cell.timeout_ms() {
            None => Ok(exit.await),
            Some(ms) => {
                let left = Duration::from_millis(ms).saturating_sub(started.elapsed());
                match tokio::time::timeout(left, &mut exit).await {
                    Ok(t) => Ok(t),
                    Err(_) => {
                        tracing::debug!(timeout_ms = ms, "timeout reached, killing the container");
                        self.kill_cell(&live).await;
                        let _ = tokio::time::timeout(TEARDOWN_WAIT, &mut exit).await;
                        Err(CellError::DeadlineExceeded { after_ms: ms })
                    }
                }
            }
        };
        let outcome = res.and_then(|t| {
            let termination = t.ok_or_else(|| {
                failure(
                    self.kind.name(),
                    "the workload's exit status could not be obtained",
                )
            })?;
            Ok(ExitReport {
                termination: self.oom_adjust(&live.rid, termination),
                stdout: fs::read(live.dir.join("stdout")).unwrap_or_default(),
                stderr: fs::read(live.dir.join("stderr")).unwrap_or_default(),
            })
        });
        match &outcome {
            Ok(r) => tracing::debug!(termination = ?r.termination, "workload ended"),
            Err(e) => tracing::debug!(error = %e, "workload ended without a report"),
        }
        let _ = tx.send(Some(outcome));
    }

    /// The shim reports the wait status of the pid the runtime wrote to its pid file; the
    /// runtime kind says what that pid is and how its status reads.
    async fn exit_status(&self, live: &Live) -> Option<Termination> {
        let status = live.shim.target_status().await;
        self.kind.termination(status, &live.dir)
    }

    fn oom_adjust(&self, rid: &str, t: Termination) -> Termination {
        if t != (Termination::Signaled { signal: 9 }) {
            return t;
        }
        for h in &self.hierarchies {
            for file in ["memory.oom_control", "memory.events"] {
                let p = h.join(rid).join(file);
                if let Ok(text) = fs::read_to_string(&p) {
                    let kills = text
                        .lines()
                        .find_map(|l| l.strip_prefix("oom_kill "))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    if kills > 0 {
                        return Termination::OutOfMemory;
                    }
                }
            }
        }
        t
    }

    /// The cell's exit report, once its monitor has one (the same answer for every waiter).
    pub(crate) async fn wait_outcome(&self, id: &str) -> Result<ExitReport, CellError> {
        let live = self.cells.get(id)?;
        let mut rx = live.exit.clone();
        let r = rx
            .wait_for(|o| o.is_some())
            .await
            .map_err(|_| failure("wait", "the cell's monitor ended without a result"))?;
        r.clone().expect("checked by wait_for")
    }
}
