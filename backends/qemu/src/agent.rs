//! Talking to the guest agent: starting the workload, long-polling a job until it ends (the
//! cell's wait and its timeout), execs, and the agent's replies as typed errors.

use std::time::{Duration, Instant};

use cellcheck_contract::{
    AdmittedCell, CellError, ExecRequest, ExitReport, ResourceKind, Retry, Termination,
};
use cellcheck_guest_agent::{b64_decode, EnvPair, ErrorKind, JobEnd, Op, ReplyBody, WORKLOAD_JOB};

use crate::vm::Vm;
use crate::{Cell, Inner, REQUEST_BOUND, WAIT_SLICE};

pub(crate) fn env_pairs(env: &[cellcheck_contract::EnvVar]) -> Vec<EnvPair> {
    env.iter()
        .map(|e| EnvPair {
            name: e.name.clone(),
            value: e.value.clone(),
        })
        .collect()
}

pub(crate) fn expect_done(r: ReplyBody) -> Result<(), CellError> {
    match r {
        ReplyBody::Done => Ok(()),
        other => Err(agent_error(other, "")),
    }
}

/// An agent reply that is not the expected one, as a typed error.
pub(crate) fn agent_error(r: ReplyBody, program: &str) -> CellError {
    match r {
        ReplyBody::Error {
            kind: ErrorKind::ProgramNotFound,
            ..
        } => CellError::NotFound {
            kind: ResourceKind::Program,
            id: program.to_string(),
        },
        ReplyBody::Error {
            kind: ErrorKind::InvalidState,
            message,
        } => CellError::InvalidState {
            operation: "agent".into(),
            state: message,
        },
        ReplyBody::Error { kind, message } => CellError::BackendFailure {
            reason: format!("guest agent: {kind:?}: {message}"),
            retry: Retry::NotRetryable,
        },
        other => CellError::failure(format!("guest agent: unexpected reply {other:?}")),
    }
}

fn exit_report(end: JobEnd, stdout: &str, stderr: &str) -> Result<ExitReport, CellError> {
    let dec = |s: &str| b64_decode(s).map_err(|e| CellError::failure(format!("guest agent: {e}")));
    Ok(ExitReport {
        termination: match end {
            JobEnd::Exited { code } => Termination::Exited { code },
            JobEnd::Signaled { signal } => Termination::Signaled { signal },
            JobEnd::OutOfMemory => Termination::OutOfMemory,
        },
        stdout: dec(stdout)?,
        stderr: dec(stderr)?,
    })
}

/// Start the cell's workload (the agent's job [`WORKLOAD_JOB`]) with the cell's hostname.
pub(crate) async fn start_workload(vm: &Vm, doc: &AdmittedCell) -> Result<(), CellError> {
    let limits = doc.limits();
    let op = Op::Run {
        argv: doc.argv().to_vec(),
        env: env_pairs(doc.env()),
        cwd: doc.working_directory().to_string(),
        hostname: Some(doc.hostname().to_string()),
        memory_max_bytes: limits.memory_max_bytes,
        pids_max: limits.pids_max,
    };
    match vm.agent_request(op, Instant::now() + REQUEST_BOUND).await? {
        ReplyBody::Started { .. } => Ok(()),
        ReplyBody::Error {
            kind: ErrorKind::WorkingDirectoryNotFound,
            ..
        } => Err(CellError::NotFound {
            kind: ResourceKind::WorkingDirectory,
            id: doc.working_directory().to_string(),
        }),
        other => Err(agent_error(other, &doc.argv()[0])),
    }
}

impl Cell {
    /// Long-poll `job` until it ends or `deadline` passes (`Ok(None)`). Paused: no agent traffic.
    async fn poll_job(
        &self,
        job: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<ExitReport>, CellError> {
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if self.paused() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let slice = deadline.map_or(WAIT_SLICE, |d| (d - now).min(WAIT_SLICE));
            let r = self
                .vm
                .agent_request(
                    Op::Wait {
                        job,
                        timeout_ms: slice.as_millis() as u64,
                    },
                    Instant::now() + slice + REQUEST_BOUND,
                )
                .await?;
            match r {
                ReplyBody::Exited {
                    end,
                    stdout,
                    stderr,
                    ..
                } => return exit_report(end, &stdout, &stderr).map(Some),
                ReplyBody::Running { .. } => {}
                other => return Err(agent_error(other, "")),
            }
        }
    }

    /// SIGKILL `job` (every process of the cell when `None`) and wait, within a bound, for it.
    async fn kill_job(&self, job: u32, which: Option<u32>) {
        let bound = Instant::now() + REQUEST_BOUND;
        let kill = Op::Kill {
            job: which,
            signal: libc::SIGKILL,
        };
        let _ = self.vm.agent_request(kill, bound).await;
        let _ = self.poll_job(job, Some(bound)).await;
    }
}

impl Inner {
    pub(crate) async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        let cell = self.cells.get(id)?;
        if let Some(o) = &cell.state.lock().expect("state lock").outcome {
            return o.clone();
        }
        let timeout = cell.doc.timeout_ms().map(Duration::from_millis);
        let deadline = timeout.map(|t| cell.started + t);
        let outcome = match cell.poll_job(WORKLOAD_JOB, deadline).await? {
            Some(report) => Ok(report),
            None => {
                // Deadline: kill every process of the cell, wait for the workload's end.
                cell.kill_job(WORKLOAD_JOB, None).await;
                Err(CellError::DeadlineExceeded {
                    after_ms: timeout.map_or(0, |t| t.as_millis() as u64),
                })
            }
        };
        let mut st = cell.state.lock().expect("state lock");
        st.outcome.get_or_insert(outcome).clone()
    }

    pub(crate) async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let cell = self.cells.get(id)?;
        if cell.paused() {
            return Err(CellError::InvalidState {
                operation: "exec".into(),
                state: "paused".into(),
            });
        }
        if req.argv.is_empty() || req.argv.iter().any(|a| a.is_empty() || a.contains('\0')) {
            return Err(CellError::invalid(
                "argv",
                "must be non-empty strings without NUL",
            ));
        }
        let r = cell
            .vm
            .agent_request(
                Op::Exec {
                    argv: req.argv.clone(),
                    env: env_pairs(&req.env),
                    cwd: "/".into(),
                },
                Instant::now() + REQUEST_BOUND,
            )
            .await?;
        let job = match r {
            ReplyBody::Started { job, .. } => job,
            // The workload has ended (the agent refuses an exec after it).
            ReplyBody::Error {
                kind: ErrorKind::InvalidState,
                message,
            } => {
                return Err(CellError::InvalidState {
                    operation: "exec".into(),
                    state: message,
                })
            }
            other => return Err(agent_error(other, &req.argv[0])),
        };
        let deadline = req
            .timeout_ms
            .map(|t| Instant::now() + Duration::from_millis(t));
        let result = match cell.poll_job(job, deadline).await {
            Ok(Some(report)) => Ok(report),
            Ok(None) => {
                cell.kill_job(job, Some(job)).await;
                Err(CellError::DeadlineExceeded {
                    after_ms: req.timeout_ms.unwrap_or(0),
                })
            }
            Err(e) => Err(e),
        };
        let bound = Instant::now() + REQUEST_BOUND;
        let _ = cell.vm.agent_request(Op::Forget { job }, bound).await;
        result
    }

    /// Whether the workload is still running, asked without waiting (for a teardown report).
    pub(crate) async fn workload_running(&self, cell: &Cell) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        let ask = Op::Wait {
            job: WORKLOAD_JOB,
            timeout_ms: 0,
        };
        matches!(
            cell.vm.agent_request(ask, deadline).await,
            Ok(ReplyBody::Running { .. })
        )
    }
}
