//! A process run in a live cell: its own `process.json`, captured output files beside the
//! bundle, its deadline, and its exact status (the runtime kind says how that is obtained).

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cellcheck_contract::{CellError, ExecRequest, ExitReport, ResourceKind, Termination};

use crate::layout::new_file;
use crate::runtime::{self, ExecStyle, Runtime};
use crate::{bundle, failure, invalid_state, Inner, Live, Shim};

/// The files of one exec, removed when it is over.
struct ExecFiles {
    process: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    pid: PathBuf,
    log: PathBuf,
}

impl ExecFiles {
    fn new(dir: &Path, seq: &AtomicU64) -> Self {
        let n = seq.fetch_add(1, Ordering::SeqCst);
        let file = |s: &str| dir.join(format!("exec-{n}.{s}"));
        ExecFiles {
            process: file("json"),
            stdout: file("stdout"),
            stderr: file("stderr"),
            pid: file("pid"),
            log: file("log"),
        }
    }

    fn all(&self) -> [&PathBuf; 5] {
        [
            &self.process,
            &self.stdout,
            &self.stderr,
            &self.pid,
            &self.log,
        ]
    }
}

impl Drop for ExecFiles {
    fn drop(&mut self) {
        for p in self.all() {
            let _ = fs::remove_file(p);
        }
    }
}

fn validate(req: &ExecRequest) -> Result<(), CellError> {
    if req.argv.is_empty() {
        return Err(CellError::invalid("exec.argv", "must not be empty"));
    }
    for (i, a) in req.argv.iter().enumerate() {
        if a.is_empty() || a.contains('\0') {
            return Err(CellError::invalid(
                format!("exec.argv[{i}]"),
                "must be non-empty without NUL",
            ));
        }
    }
    for (i, e) in req.env.iter().enumerate() {
        if e.name.is_empty() || e.name.contains(['=', '\0']) || e.value.contains('\0') {
            return Err(CellError::invalid(
                format!("exec.env[{i}]"),
                "name must be non-empty without '=' or NUL; value without NUL",
            ));
        }
    }
    Ok(())
}

fn read_pid(p: &Path) -> Option<i32> {
    fs::read_to_string(p)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

impl Inner {
    pub(crate) async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let live = self.cells.get(id)?;
        validate(&req)?;
        if live.exited() {
            return Err(invalid_state("exec", "exited"));
        }
        if live.paused.load(Ordering::SeqCst) {
            return Err(invalid_state("exec", "paused"));
        }
        let rt = self.rt()?;
        let files = ExecFiles::new(&live.dir, &self.seq);
        let process = bundle::process(
            &req.argv,
            &req.env,
            live.cell.working_directory(),
            live.cell.open_files(),
        );
        let io = |what: &'static str| move |e: std::io::Error| failure(what, e);
        bundle::write_config(&files.process, &process).map_err(io("write exec process.json"))?;
        let stdio = [
            File::open("/dev/null").map_err(io("open /dev/null"))?,
            new_file(&files.stdout).map_err(io("create exec stdout"))?,
            new_file(&files.stderr).map_err(io("create exec stderr"))?,
        ];
        let termination = match self.kind.exec_style() {
            ExecStyle::DetachedUnderShim => {
                self.exec_detached(&rt, &live, &req, &files, stdio).await?
            }
            ExecStyle::Attached => self.exec_attached(&rt, &live, &req, &files, stdio).await?,
        };
        Ok(ExitReport {
            termination,
            stdout: fs::read(&files.stdout).unwrap_or_default(),
            stderr: fs::read(&files.stderr).unwrap_or_default(),
        })
    }

    fn exec_error(&self, req: &ExecRequest, msg: String) -> CellError {
        if runtime::is_missing_program(&msg, &req.argv[0]) {
            CellError::NotFound {
                kind: ResourceKind::Program,
                id: req.argv[0].clone(),
            }
        } else {
            failure(&format!("{} exec", self.kind.name()), msg)
        }
    }

    /// runc, crun: `exec --detach` under a shim, which reports the process's raw wait status.
    async fn exec_detached(
        &self,
        rt: &Runtime,
        live: &Live,
        req: &ExecRequest,
        files: &ExecFiles,
        stdio: [File; 3],
    ) -> Result<Termination, CellError> {
        let mut args: Vec<OsString> = self.kind.exec_log_args(&files.log);
        args.extend([
            "exec".into(),
            "--detach".into(),
            "--pid-file".into(),
            files.pid.clone().into(),
            "--process".into(),
            files.process.clone().into(),
            live.rid.clone().into(),
        ]);
        let [stdin, stdout, stderr] = &stdio;
        let shim = Shim::spawn(
            &rt.argv(&args),
            [stdin, stdout, stderr],
            &files.pid,
            rt.unmount.as_deref(),
        )
        .map_err(|e| failure("spawn runtime exec", e))?;
        drop(stdio);
        tracing::debug!(
            shim_pid = shim.pid,
            "runtime exec --detach started under the shim"
        );
        let st = shim
            .runtime_status()
            .await
            .map_err(|e| failure("exec", std::io::Error::from_raw_os_error(e)))?;
        tracing::debug!(status = st, "runtime exec --detach ended (wait status)");
        if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
            let msg = runtime::runtime_message(
                &(fs::read_to_string(&files.log).unwrap_or_default()
                    + &fs::read_to_string(&files.stderr).unwrap_or_default()),
            );
            shim.done().await;
            return Err(self.exec_error(req, msg));
        }
        let wait = shim.target_status();
        let st = match req.timeout_ms.map(Duration::from_millis) {
            None => wait.await,
            Some(d) => match tokio::time::timeout(d, wait).await {
                Ok(st) => st,
                Err(_) => {
                    if let Some(pid) = read_pid(&files.pid) {
                        // SAFETY: kill(2) of the exec'd process the shim still holds unreaped,
                        // so the pid cannot have been reused.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    shim.done().await;
                    return Err(CellError::DeadlineExceeded {
                        after_ms: d.as_millis() as u64,
                    });
                }
            },
        };
        shim.done().await;
        tracing::debug!(?st, "exec'd process ended (wait status)");
        st.map(runtime::termination)
            .ok_or_else(|| failure("exec", "exit status of the exec'd process unavailable"))
    }

    /// runsc: `exec` in the foreground (the process lives in the sandbox, not on the host). Its
    /// exit code folds a signal into `128+N`, so the end is read from the wait status it logs.
    async fn exec_attached(
        &self,
        rt: &Runtime,
        live: &Live,
        req: &ExecRequest,
        files: &ExecFiles,
        [stdin, stdout, stderr]: [File; 3],
    ) -> Result<Termination, CellError> {
        let mut args: Vec<OsString> = self.kind.exec_log_args(&files.log);
        args.extend([
            "exec".into(),
            "--process".into(),
            files.process.clone().into(),
            "--internal-pid-file".into(),
            files.pid.clone().into(),
            live.rid.clone().into(),
        ]);
        let argv = rt.argv(&args);
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failure("spawn runsc exec", e))?;
        let status = match req.timeout_ms.map(Duration::from_millis) {
            None => child.wait().await,
            Some(d) => match tokio::time::timeout(d, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    if let Some(pid) = read_pid(&files.pid) {
                        let pid = pid.to_string();
                        let _ = rt.run(&["kill", "--pid", &pid, &live.rid, "KILL"]).await;
                    }
                    let _ = child.wait().await;
                    return Err(CellError::DeadlineExceeded {
                        after_ms: d.as_millis() as u64,
                    });
                }
            },
        }
        .map_err(|e| failure("wait for runsc exec", e))?;
        tracing::debug!(%status, "runsc exec ended");
        let log = fs::read_to_string(&files.log).unwrap_or_default();
        if let Some(t) = runtime::parse_runsc_exit_log(&log) {
            return Ok(t);
        }
        // No wait status logged: runsc exec itself failed (exit 128), before the process started
        // or while waiting for it.
        let stderr = fs::read_to_string(&files.stderr).unwrap_or_default();
        let msg = runtime::runtime_message(&stderr);
        if read_pid(&files.pid).is_none() {
            return Err(self.exec_error(req, msg));
        }
        Err(failure(
            "runsc exec",
            format!("ended ({status}) without logging the exec'd process's wait status: {msg}"),
        ))
    }
}
