//! Exec: another command in a live cell, through `cellcheck-host-init exec`.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, ExecRequest, ExitReport, ResourceKind, Termination};
use cellcheck_host_init::{Config, Status};

use crate::cell::{read_and_remove, Cell};
use crate::spawn::{open_capture, spawn_init, write_secret, Started};
use crate::{failure, lock, HostBackend};

/// How the command ended, as the helper reported it (None: the helper died without saying).
type HelperEnd = Option<Status>;

fn state_error(cell: &Cell) -> Option<CellError> {
    let st = lock(&cell.shared.st);
    let state = if st.paused {
        "paused"
    } else if st.end.is_some() || *cell.shared.done.borrow() {
        "exited"
    } else {
        return None;
    };
    Some(CellError::InvalidState {
        operation: "exec".into(),
        state: state.into(),
    })
}

/// Start the helper and wait until the command runs (or failed to start). Blocking.
fn start(
    cell: &Cell,
    init: &std::path::Path,
    req: &ExecRequest,
    name: &str,
) -> Result<(Started, u32), CellError> {
    let cfg = Config {
        argv: req.argv.clone(),
        env: req
            .env
            .iter()
            .map(|e| format!("{}={}", e.name, e.value))
            .collect(),
        cwd: "/".into(),
        target_pid: cell.pid1,
        nofile: Some(cell.nofile),
        privileged: cell.privileged,
        ..Config::default()
    };
    let bytes = cfg
        .encode()
        .map_err(|e| failure(format!("encode exec config: {e}")))?;
    let dir = &cell.state_dir;
    let config_name = format!("{name}.config");
    write_secret(&dir.join(&config_name), &bytes)
        .map_err(|e| failure(format!("write exec config: {e}")))?;
    let stdout = open_capture(&dir.join(format!("{name}.stdout")))?;
    let stderr = open_capture(&dir.join(format!("{name}.stderr")))?;
    let mut started = spawn_init(
        init,
        &["exec".as_ref(), dir.as_os_str(), config_name.as_ref()],
        stdout,
        stderr,
        false,
    )
    .map_err(|e| failure(format!("start exec helper: {e}")))?;
    let fail_helper = |started: &mut Started, e: CellError| {
        let _ = started.child.kill();
        let _ = started.child.wait();
        let _ = std::fs::remove_file(dir.join(&config_name));
        e
    };
    // Into the cell's cgroups before it does anything, so limits and destroy cover it.
    for d in &cell.dirs {
        if let Err(e) = d.add(started.child.id()) {
            return Err(fail_helper(&mut started, failure(format!("cgroup: {e}"))));
        }
    }
    if let Some(mut s) = started.sync.take() {
        if let Err(e) = s.write_all(b"g") {
            return Err(fail_helper(
                &mut started,
                failure(format!("exec helper: {e}")),
            ));
        }
    }
    let deadline = Some(Instant::now() + crate::START_TIMEOUT);
    match started.status.next(deadline) {
        Ok(Some(Status::Started(pid))) => Ok((started, pid)),
        Ok(Some(Status::Failed {
            step,
            errno,
            message,
        })) => {
            let e = match step.as_str() {
                "program" => CellError::NotFound {
                    kind: ResourceKind::Program,
                    id: req.argv[0].clone(),
                },
                "gone" => CellError::InvalidState {
                    operation: "exec".into(),
                    state: "exited".into(),
                },
                _ => failure(format!("exec {step} (errno {errno}): {message}")),
            };
            Err(fail_helper(&mut started, e))
        }
        Ok(other) => Err(fail_helper(
            &mut started,
            failure(format!(
                "exec helper ended without starting the command: {other:?}"
            )),
        )),
        Err(e) => Err(fail_helper(
            &mut started,
            failure(format!("exec helper: {e}")),
        )),
    }
}

/// Read until the helper reports the end, then reap it. Blocking.
fn finish(mut started: Started) -> HelperEnd {
    let mut end = None;
    while let Ok(Some(s)) = started.status.next(None) {
        if matches!(s, Status::Exited(_) | Status::Signaled(_)) {
            end = Some(s);
        }
    }
    let _ = started.child.wait();
    end
}

pub(crate) async fn run(
    b: &HostBackend,
    id: &str,
    req: ExecRequest,
) -> Result<ExitReport, CellError> {
    req.validate()?;
    let cell = b.live(id)?;
    if let Some(e) = state_error(&cell) {
        return Err(e);
    }
    let n = cell.exec_seq.fetch_add(1, Ordering::Relaxed);
    let name = format!("exec-{n}");
    let oom_before: u64 = cell.dirs.iter().map(|d| d.oom_kills()).sum();
    let init = b.inner.cfg.init.clone();
    let (c2, r2, n2) = (cell.clone(), req.clone(), name.clone());
    let (started, pid) = crate::blocking(move || start(&c2, &init, &r2, &n2))
        .await
        .unwrap_or_else(|e| Err(failure(format!("exec task: {e}"))))
        .inspect_err(|_| remove_outputs(&cell, &name))?;
    tracing::debug!(pid, name, "exec command started");
    let mut finishing = crate::blocking(move || finish(started));
    let timed_out = match req.timeout_ms {
        Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), &mut finishing).await {
            Ok(r) => return collect(&cell, &name, r.ok().flatten(), oom_before, b, id),
            Err(_) => {
                // The helper is our child and still waits on the command, so `pid` is not reused.
                // SAFETY: signalling the command's host pid.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                true
            }
        },
        None => false,
    };
    let end = finishing.await.ok().flatten();
    if timed_out {
        remove_outputs(&cell, &name);
        return Err(CellError::DeadlineExceeded {
            after_ms: req.timeout_ms.unwrap_or(0),
        });
    }
    collect(&cell, &name, end, oom_before, b, id)
}

fn remove_outputs(cell: &Arc<Cell>, name: &str) {
    for ext in ["stdout", "stderr", "config"] {
        let _ = std::fs::remove_file(cell.state_dir.join(format!("{name}.{ext}")));
    }
}

fn collect(
    cell: &Arc<Cell>,
    name: &str,
    end: HelperEnd,
    oom_before: u64,
    b: &HostBackend,
    id: &str,
) -> Result<ExitReport, CellError> {
    let stdout = read_and_remove(&cell.state_dir.join(format!("{name}.stdout")));
    let stderr = read_and_remove(&cell.state_dir.join(format!("{name}.stderr")));
    let termination = match end {
        Some(Status::Exited(code)) => Termination::Exited { code },
        Some(Status::Signaled(s)) => {
            let oom_after: u64 = cell.dirs.iter().map(|d| d.oom_kills()).sum();
            if s == libc::SIGKILL && oom_after > oom_before {
                Termination::OutOfMemory
            } else {
                Termination::Signaled { signal: s }
            }
        }
        _ => {
            // The helper was killed: the cell is being destroyed or has ended under us.
            return Err(if b.live(id).is_err() {
                CellError::cell_not_found(id)
            } else {
                failure("exec helper died before the command ended (the cell ended)")
            });
        }
    };
    Ok(ExitReport {
        termination,
        stdout,
        stderr,
    })
}
