//! Taking a cell down: destroy (kill, wait for the monitor, scrub), the scrub a failed create
//! also uses, and the synchronous teardown when a backend is dropped with cells still live.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, TeardownReport};

use crate::runtime::Runtime;
use crate::{failure, Inner, Live, Shim, TEARDOWN_WAIT};

impl Inner {
    /// Destroy `id` (only its incarnation `incarnation`, when given: a TTL timer of an earlier
    /// cell must not take down a new one). A concurrent second destroy waits in the cell table
    /// until this teardown is over, then hears `NotFound`.
    pub(crate) async fn destroy(
        self: &Arc<Self>,
        id: &str,
        incarnation: Option<u64>,
    ) -> Result<TeardownReport, CellError> {
        let teardown = self.cells.begin_destroy(id, incarnation).await?;
        let live = teardown.cell().clone();
        // The TTL timer may be what called us: stop the cell's tasks only after taking the cell.
        let tasks: Vec<_> = live.tasks.lock().unwrap().drain(..).collect();
        let killed_running = !live.exited();
        tracing::debug!(killed_running, "teardown begins");
        let rt = self.rt()?;
        if killed_running {
            self.kill_cell(&live).await;
        }
        let mut rx = live.exit.clone();
        let _ = tokio::time::timeout(TEARDOWN_WAIT, rx.wait_for(|o| o.is_some())).await;
        // Never abort the task running this destroy (the TTL timer calls destroy itself).
        let me = tokio::task::try_id();
        for t in tasks {
            if Some(t.id()) != me {
                t.abort();
            }
        }
        let problems = self
            .scrub(&rt, &live.rid, &live.dir, Some(&live.shim))
            .await;
        let remaining = teardown.finish();
        self.remove_root_if_unused();
        tracing::debug!(remaining_cells = remaining, ?problems, "teardown over");
        if !problems.is_empty() {
            return Err(failure(&format!("destroy {id}"), problems.join("; ")));
        }
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running,
            remaining_cells: remaining,
        })
    }

    /// SIGKILL the container (thawing it first: a frozen task does not die until thawed).
    pub(crate) async fn kill_cell(&self, live: &Live) {
        let Ok(rt) = self.rt() else { return };
        if live.paused.swap(false, Ordering::SeqCst) {
            let _ = rt.run(&["resume", &live.rid]).await;
        }
        let _ = rt.run(&["kill", "--all", &live.rid, "KILL"]).await;
    }

    /// Remove whatever a failed or finished container left: the container, its processes (the
    /// shim reaps them), its state entries, its cgroups and its bundle dir.
    pub(crate) async fn scrub(
        &self,
        rt: &Runtime,
        rid: &str,
        dir: &Path,
        shim: Option<&Shim>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let out = rt.run(&["delete", "--force", rid]).await;
        if !out.ok {
            let msg = out.message(self.kind);
            let gone = msg.contains("does not exist")
                || msg.contains("not exist")
                || msg.contains("no such");
            if !gone {
                problems.push(format!("delete: {msg}"));
            }
        }
        if let Some(shim) = shim {
            if tokio::time::timeout(TEARDOWN_WAIT, shim.done())
                .await
                .is_err()
            {
                problems.push(format!(
                    "runtime processes of {rid} did not exit within {TEARDOWN_WAIT:?}"
                ));
            }
        }
        // runsc was seen to leave its lock file behind after deleting a container whose create
        // failed; once the runtime's processes are gone nothing can hold these any more.
        for entry in self.state_entries(rid) {
            let removed = if entry.is_dir() {
                fs::remove_dir_all(&entry)
            } else {
                fs::remove_file(&entry)
            };
            if let Err(e) = removed {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("remove {}: {e}", entry.display()));
                }
            }
        }
        for cg in self.cgroup_dirs(rid) {
            if cg.exists() {
                if let Err(e) = fs::remove_dir(&cg) {
                    problems.push(format!("rmdir {}: {e}", cg.display()));
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("remove {}: {e}", dir.display()));
            }
        }
        problems
    }
}

/// Dropping the last handle of a backend destroys what it still holds (synchronously: there may be
/// no runtime left to await on), so a panicking test or an aborted run leaves no container behind.
impl Drop for Inner {
    fn drop(&mut self) {
        let cells: Vec<Arc<Live>> = self.cells.drain();
        if let Ok(rt) = &self.runtime {
            let run = |args: &[&str]| {
                let _ = rt
                    .command(&args.iter().map(OsString::from).collect::<Vec<_>>())
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            };
            for l in &cells {
                if l.paused.load(Ordering::SeqCst) {
                    run(&["resume", &l.rid]);
                }
                run(&["kill", "--all", &l.rid, "KILL"]);
                run(&["delete", "--force", &l.rid]);
            }
        }
        let deadline = Instant::now() + TEARDOWN_WAIT;
        for l in &cells {
            while !l.shim.state().done && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            for entry in self.state_entries(&l.rid) {
                let _ = fs::remove_file(&entry).or_else(|_| fs::remove_dir_all(&entry));
            }
            for cg in self.cgroup_dirs(&l.rid) {
                let _ = fs::remove_dir(cg);
            }
            let _ = fs::remove_dir_all(&l.dir);
        }
        if let Ok(snaps) = self.snapshots.get_mut() {
            for (_, dir) in snaps.drain() {
                let _ = fs::remove_dir_all(&dir);
                if let Some(parent) = dir.parent() {
                    let _ = fs::remove_dir(parent);
                }
            }
        }
        self.remove_root_if_empty();
    }
}
