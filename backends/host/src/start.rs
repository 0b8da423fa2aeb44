//! Starting a cell: its state directory, config and cgroups, the init in new namespaces, and the
//! startup handshake up to the workload's exec; everything made is removed again on failure.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cellcheck_contract::{AdmittedCell, CellError, ResourceKind};
use cellcheck_host_init::{Bind, Config, Status};
use tokio::sync::watch;
use tracing::{debug, info_span};

use crate::cell::{supervise, Cell, CellState, End, Shared};
use crate::cgroup::{kill_all, CellDir};
use crate::spawn::{open_capture, spawn_init, write_secret, Started};
use crate::state::remove_cell_dir;
use crate::{failure, Inner, KILL_TIMEOUT, START_TIMEOUT};

impl Inner {
    /// Start a cell. Blocking; on error everything made so far is gone again.
    pub(crate) fn start(&self, cell: &AdmittedCell) -> Result<Cell, CellError> {
        let id = cell.id().to_string();
        let state_dir = self.state.cell_dir(&id);
        let dirs = self.plan.cell_dirs(&self.instance, &id);
        let mut made = Partial {
            state_dir: None,
            dirs: Vec::new(),
            child: None,
        };
        let res = self.start_inner(cell, &state_dir, &dirs, &mut made);
        match res {
            Ok((pid1, host_pid, supervisor, shared)) => {
                made.disarm();
                Ok(Cell {
                    id,
                    state_dir,
                    dirs,
                    created: Instant::now(),
                    timeout_ms: cell.timeout_ms(),
                    nofile: (cell.open_files().soft, cell.open_files().hard),
                    privileged: self.cfg.privileged,
                    pid1,
                    host_pid,
                    shared,
                    supervisor: Mutex::new(Some(supervisor)),
                    exec_seq: AtomicU64::new(0),
                })
            }
            Err(e) => {
                debug!(error = %e, "start failed, removing what was made");
                made.cleanup();
                self.state.remove_if_empty();
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn start_inner(
        &self,
        cell: &AdmittedCell,
        state_dir: &Path,
        dirs: &[CellDir],
        made: &mut Partial,
    ) -> Result<(u32, Option<u32>, std::thread::JoinHandle<()>, Arc<Shared>), CellError> {
        self.state
            .make_cell_dir(state_dir)
            .map_err(|e| failure(format!("create {}: {e}", state_dir.display())))?;
        made.state_dir = Some(state_dir.to_path_buf());
        let newroot = state_dir.join("root");
        fs::create_dir(&newroot)
            .map_err(|e| failure(format!("create {}: {e}", newroot.display())))?;
        let config = self.init_config(cell, &newroot);
        let bytes = config
            .encode()
            .map_err(|e| failure(format!("encode cell config: {e}")))?;
        write_secret(&state_dir.join("config"), &bytes)
            .map_err(|e| failure(format!("write cell config: {e}")))?;
        let limits = cell.limits();
        for d in dirs {
            made.dirs.push(d.clone());
            d.create(limits.memory_max_bytes, limits.pids_max, limits.cpu_max)
                .map_err(|e| failure(format!("cgroup: {e}")))?;
            debug!(dir = %d.dir.display(), "cgroup made");
        }
        let stdout = open_capture(&state_dir.join("stdout"))?;
        let stderr = open_capture(&state_dir.join("stderr"))?;
        let Started {
            child,
            sync,
            mut status,
        } = spawn_init(
            &self.cfg.init,
            &["cell".as_ref(), state_dir.as_os_str()],
            stdout,
            stderr,
            true,
        )
        .map_err(|e| failure(format!("start {}: {e}", self.cfg.init.display())))?;
        let init_pid = child.id();
        debug!(init_pid, "init spawned");
        made.child = Some(child);
        for d in dirs {
            d.add(init_pid)
                .map_err(|e| failure(format!("cgroup: {e}")))?;
        }
        let mut sync = sync.expect("fresh sync pipe");
        sync.write_all(b"g")
            .map_err(|e| failure(format!("start init: {e}")))?;
        let deadline = Some(Instant::now() + START_TIMEOUT);
        let mut startup = Startup::default();
        while !startup.complete() {
            let msg = status
                .next(deadline)
                .map_err(|e| failure(format!("init: {e}")))?;
            match msg {
                Some(Status::Forked(nspid)) => {
                    startup.host_pid = find_host_pid(dirs, nspid);
                    debug!(nspid, host_pid = ?startup.host_pid, "workload forked");
                    sync.write_all(b"g")
                        .map_err(|e| failure(format!("init: {e}")))?;
                }
                Some(Status::Failed {
                    step,
                    errno,
                    message,
                }) => return Err(start_failure(cell, &step, errno, &message)),
                Some(other) => startup.note(other)?,
                None => {
                    let mut err = String::new();
                    let _ = fs::File::open(state_dir.join("stderr"))
                        .and_then(|mut f| f.read_to_string(&mut err));
                    return Err(failure(format!(
                        "init ended before starting the workload ({}): {}",
                        startup.missing(),
                        err.trim()
                    )));
                }
            }
        }
        drop(sync);
        let pid1 = startup.pid1.expect("complete");
        debug!(pid1, early_end = ?startup.end, "pid 1 reported, workload started");
        let (done, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            st: Mutex::new(CellState::default()),
            done,
        });
        let child = made.child.take().expect("spawned above");
        let sh = shared.clone();
        let early_end = startup.end;
        let id = cell.id().to_string();
        let supervisor = std::thread::Builder::new()
            .name(format!("cell-{}", cell.id()))
            .spawn(move || {
                // A span of its own: the supervisor outlives the create that started it.
                info_span!(parent: None, "host", op = "supervise", cell = %id)
                    .in_scope(|| supervise(child, status, early_end, sh))
            })
            .map_err(|e| failure(format!("supervisor thread: {e}")))?;
        Ok((pid1, startup.host_pid, supervisor, shared))
    }

    /// What the init is told about the cell (written to a mode-0600 file it reads and removes).
    fn init_config(&self, cell: &AdmittedCell, newroot: &Path) -> Config {
        Config {
            argv: cell.argv().to_vec(),
            env: cell.env_pairs(),
            cwd: cell.working_directory().to_string(),
            hostname: cell.hostname().to_string(),
            rootfs: self.cfg.rootfs.display().to_string(),
            newroot: newroot.display().to_string(),
            binds: self
                .cfg
                .extra_binds
                .iter()
                .map(|b| Bind {
                    source: b.source.display().to_string(),
                    target: b.target.display().to_string(),
                    readonly: b.readonly,
                })
                .collect(),
            target_pid: 0,
            nofile: Some((cell.open_files().soft, cell.open_files().hard)),
            privileged: self.cfg.privileged,
        }
    }
}

/// The typed error for a step the init reported as failed.
fn start_failure(cell: &AdmittedCell, step: &str, errno: i32, message: &str) -> CellError {
    match step {
        "program"
            if [
                libc::ENOENT,
                libc::EACCES,
                libc::ENOTDIR,
                libc::ENOEXEC,
                libc::ELOOP,
            ]
            .contains(&errno) =>
        {
            CellError::NotFound {
                kind: ResourceKind::Program,
                id: cell.argv()[0].clone(),
            }
        }
        "cwd" if [libc::ENOENT, libc::ENOTDIR, libc::ELOOP].contains(&errno) => {
            CellError::NotFound {
                kind: ResourceKind::WorkingDirectory,
                id: cell.working_directory().to_string(),
            }
        }
        _ => failure(format!("init {step}: {message}")),
    }
}

/// The host pid of the process of the cell's cgroup whose pid in the cell's namespace is `nspid`.
fn find_host_pid(dirs: &[CellDir], nspid: u32) -> Option<u32> {
    let d = dirs.first()?;
    d.procs().into_iter().find(|p| {
        fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|t| {
                let l = t.lines().find(|l| l.starts_with("NSpid:"))?;
                let f: Vec<&str> = l["NSpid:".len()..].split_whitespace().collect();
                Some(f.len() == 2 && f[1] == nspid.to_string())
            })
            .unwrap_or(false)
    })
}

/// Things `create` made so far, removed again unless the create succeeds.
struct Partial {
    state_dir: Option<PathBuf>,
    dirs: Vec<CellDir>,
    child: Option<Child>,
}

impl Partial {
    fn disarm(&mut self) {
        self.state_dir = None;
        self.dirs.clear();
        self.child = None;
    }

    fn cleanup(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            kill_all(&self.dirs, KILL_TIMEOUT);
            let _ = c.wait();
        } else {
            kill_all(&self.dirs, KILL_TIMEOUT);
        }
        for d in self.dirs.drain(..) {
            let _ = d.remove();
        }
        if let Some(s) = self.state_dir.take() {
            let _ = remove_cell_dir(&s);
        }
    }
}

/// What a cell's init reported while the cell starts.
///
/// Two processes write the one status pipe: the outer init reports pid 1's host pid (`Pid1`)
/// right after forking it, while pid 1 itself reports the workload's fork, start and end. The two
/// run concurrently, so `Pid1` may arrive before, between or after any of pid 1's lines (on a busy
/// host the outer init is often scheduled last). Startup is complete once both `Pid1` and
/// `Started` are in, in whichever order; an end read on the way is kept for the supervisor.
#[derive(Debug, Default)]
struct Startup {
    pid1: Option<u32>,
    host_pid: Option<u32>,
    started: bool,
    end: Option<End>,
}

impl Startup {
    fn complete(&self) -> bool {
        self.started && self.pid1.is_some()
    }

    /// Take in a status line other than `Forked` and `Failed` (those need the caller's I/O).
    fn note(&mut self, s: Status) -> Result<(), CellError> {
        match s {
            Status::Pid1(p) => self.pid1 = Some(p),
            Status::Started(_) => self.started = true,
            Status::Exited(c) if self.started => self.end = Some(End::Exited(c)),
            Status::Signaled(s) if self.started => self.end = Some(End::Signaled(s)),
            other => {
                return Err(failure(format!(
                    "init: unexpected {other:?} while starting"
                )))
            }
        }
        Ok(())
    }

    /// What the init had not reported yet, for the error when it ended early.
    fn missing(&self) -> &'static str {
        match (self.pid1.is_some(), self.started) {
            (false, false) => "neither pid 1 nor the workload's start reported",
            (false, true) => "pid 1 not reported",
            (true, false) => "the workload's start not reported",
            (true, true) => "nothing missing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[Status]) -> Result<Startup, CellError> {
        let mut s = Startup::default();
        for l in lines {
            if s.complete() {
                break;
            }
            s.note(l.clone())?;
        }
        Ok(s)
    }

    #[test]
    fn startup_completes_whatever_the_order_of_the_two_writers() {
        use Status::{Exited, Pid1, Started};
        // Pid 1's own lines keep their order; the outer init's `Pid1` may land anywhere.
        for (lines, end) in [
            (vec![Pid1(7), Started(2), Exited(3)], None),
            (vec![Started(2), Pid1(7), Exited(3)], None),
            (vec![Started(2), Exited(3), Pid1(7)], Some(End::Exited(3))),
            (
                vec![Started(2), Status::Signaled(9), Pid1(7)],
                Some(End::Signaled(9)),
            ),
        ] {
            let s = feed(&lines).unwrap();
            assert!(s.complete(), "{lines:?}");
            assert_eq!(s.pid1, Some(7), "{lines:?}");
            assert_eq!(s.end, end, "{lines:?}");
        }
    }

    #[test]
    fn startup_names_what_is_missing_and_refuses_an_end_before_the_start() {
        let s = feed(&[Status::Started(2)]).unwrap();
        assert!(!s.complete());
        assert_eq!(s.missing(), "pid 1 not reported");
        assert_eq!(
            feed(&[]).unwrap().missing(),
            "neither pid 1 nor the workload's start reported"
        );
        assert!(feed(&[Status::Pid1(7), Status::Exited(0)]).is_err());
    }
}
