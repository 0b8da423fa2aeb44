//! A cell once started: what its supervisor thread learns about the workload's end, the exit
//! report, the timeout's kill, and teardown.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cellcheck_contract::{CellError, ExitReport, Retry, Termination};
use cellcheck_host_init::Status;
use tokio::sync::watch;
use tracing::debug;

use crate::cgroup::{kill_all, CellDir};
use crate::spawn::StatusReader;
use crate::state::remove_cell_dir;
use crate::{failure, lock, KILL_TIMEOUT};

/// What a cell's init said about its workload's end; `None` while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Exited(i32),
    Signaled(i32),
}

#[derive(Debug, Default)]
pub(crate) struct CellState {
    pub(crate) end: Option<End>,
    pub(crate) timed_out: bool,
    pub(crate) paused: bool,
    pub(crate) report: Option<Result<ExitReport, CellError>>,
}

/// What the supervisor thread and the operations share.
pub(crate) struct Shared {
    pub(crate) st: Mutex<CellState>,
    /// Becomes true once pid 1 is gone and the init is reaped.
    pub(crate) done: watch::Sender<bool>,
}

pub(crate) struct Cell {
    pub(crate) id: String,
    pub(crate) state_dir: PathBuf,
    pub(crate) dirs: Vec<CellDir>,
    pub(crate) created: Instant,
    pub(crate) timeout_ms: Option<u64>,
    /// RLIMIT_NOFILE (soft, hard), for the workload and every exec.
    pub(crate) nofile: (u64, u64),
    /// [`crate::HostConfig::privileged`] when the cell was made; execs get the same.
    pub(crate) privileged: bool,
    /// Pid 1 of the cell, as a host pid (exec joins its namespaces).
    pub(crate) pid1: u32,
    pub(crate) host_pid: Option<u32>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) exec_seq: AtomicU64,
}

impl Cell {
    pub(crate) fn report(&self) -> Result<ExitReport, CellError> {
        let mut st = lock(&self.shared.st);
        if let Some(r) = &st.report {
            return r.clone();
        }
        let r = if st.timed_out {
            Err(CellError::DeadlineExceeded {
                after_ms: self.timeout_ms.unwrap_or(0),
            })
        } else {
            let termination = match st.end {
                Some(End::Exited(code)) => Termination::Exited { code },
                Some(End::Signaled(s))
                    if s == libc::SIGKILL && self.dirs.iter().any(|d| d.oom_kills() > 0) =>
                {
                    Termination::OutOfMemory
                }
                Some(End::Signaled(signal)) => Termination::Signaled { signal },
                None => return Err(failure("workload has not ended")),
            };
            Ok(ExitReport {
                termination,
                stdout: fs::read(self.state_dir.join("stdout")).unwrap_or_default(),
                stderr: fs::read(self.state_dir.join("stderr")).unwrap_or_default(),
            })
        };
        st.report = Some(r.clone());
        r
    }

    /// Kill everything of the cell and remove its resources (blocking). Returns whether the
    /// workload was still running.
    pub(crate) fn teardown(&self) -> Result<bool, CellError> {
        let cell = self;
        let killed_running = lock(&cell.shared.st).end.is_none();
        let killed = kill_all(&cell.dirs, KILL_TIMEOUT);
        debug!(
            tasks = killed.tasks,
            emptied = killed.emptied,
            "teardown killed {} tasks",
            killed.tasks
        );
        let emptied = killed.emptied;
        if let Some(h) = lock(&cell.supervisor).take() {
            let _ = h.join();
        }
        let mut problems = Vec::new();
        if !emptied {
            problems.push("processes of the cell survived SIGKILL".to_string());
        }
        for d in &cell.dirs {
            if let Err(e) = d.remove() {
                problems.push(e.to_string());
            }
        }
        if let Err(e) = remove_cell_dir(&cell.state_dir) {
            problems.push(format!("state dir {}: {e}", cell.state_dir.display()));
        }
        if problems.is_empty() {
            Ok(killed_running)
        } else {
            Err(CellError::BackendFailure {
                reason: format!("destroy {}: {}", cell.id, problems.join("; ")),
                retry: Retry::NotRetryable,
            })
        }
    }

    /// The timeout passed: kill the workload unless it already ended.
    pub(crate) fn expire(&self) {
        let cell = self;
        {
            let mut st = lock(&cell.shared.st);
            if st.end.is_some() || *cell.shared.done.borrow() {
                return;
            }
            st.timed_out = true;
        }
        let killed = kill_all(&cell.dirs, KILL_TIMEOUT);
        debug!(
            tasks = killed.tasks,
            "timeout passed: killed {} tasks", killed.tasks
        );
    }
}

/// Per cell: read the init's status until pid 1 is gone, then reap the init. `end` is what the
/// startup already read of the workload's end (it may end before pid 1's own number arrives).
pub(crate) fn supervise(
    mut child: Child,
    mut status: StatusReader,
    mut end: Option<End>,
    shared: Arc<Shared>,
) {
    while let Ok(Some(s)) = status.next(None) {
        match s {
            Status::Exited(c) => end = Some(End::Exited(c)),
            Status::Signaled(s) => end = Some(End::Signaled(s)),
            _ => {}
        }
    }
    let _ = child.wait();
    {
        let mut st = lock(&shared.st);
        // Pid 1 killed without a report (destroy, timeout): the workload died with it.
        let end = end.unwrap_or(End::Signaled(libc::SIGKILL));
        debug!(?end, "workload ended, init reaped");
        st.end = Some(end);
    }
    shared.done.send_replace(true);
}

pub(crate) fn read_and_remove(p: &Path) -> Vec<u8> {
    let b = fs::read(p).unwrap_or_default();
    let _ = fs::remove_file(p);
    b
}
