//! Create and restore: reserve the id, write the bundle, run the runtime's `create` (or
//! `restore`) under the [`Shim`], `start` it, and hand the live cell to its monitor.

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellcheck_contract::table::Reservation;
use cellcheck_contract::{AdmittedCell, CellDocument, CellError, CellHandle, ResourceKind};
use tokio::sync::watch;
use tracing::Instrument;

use crate::layout::{mkdir_private, new_file};
use crate::runtime::{self, Runtime};
use crate::{bundle, failure, Inner, Live, Shim};

/// A failed launch: the error, and the shim whose processes the scrub must wait for.
type LaunchError = (CellError, Option<Shim>);

impl Inner {
    pub(crate) async fn create(
        self: &Arc<Self>,
        doc: &CellDocument,
    ) -> Result<CellHandle, CellError> {
        let cell = doc.admit()?;
        self.rt()?;
        let reservation = self.reserve(cell.id())?;
        self.finish_create(reservation, &cell, None).await
    }

    /// Take `id` for a new cell (refusing a live, half-made or dying one) and make sure the state
    /// root exists; both under `root_guard`, so a concurrent last teardown cannot remove the root
    /// between the two.
    pub(crate) fn reserve(&self, id: &str) -> Result<Reservation<Live>, CellError> {
        let guard = self.root_guard.lock().unwrap();
        let reservation = self.cells.reserve(id)?;
        if let Err(e) = self.ensure_root() {
            drop((reservation, guard));
            self.remove_root_if_unused();
            return Err(e);
        }
        Ok(reservation)
    }

    /// Start the reserved cell; commit it (with its TTL timer) or free the id on failure.
    pub(crate) async fn finish_create(
        self: &Arc<Self>,
        reservation: Reservation<Live>,
        cell: &AdmittedCell,
        restore_from: Option<&Path>,
    ) -> Result<CellHandle, CellError> {
        let id = cell.id().to_string();
        let live = match self.start_cell(cell, restore_from).await {
            Ok(live) => live,
            Err(e) => {
                drop(reservation);
                self.remove_root_if_unused();
                return Err(e);
            }
        };
        if let Some(ttl) = cell.ttl_seconds() {
            let incarnation = reservation.incarnation();
            let id2 = id.clone();
            let timer = self.cells.reap_after(
                self,
                &id,
                incarnation,
                Duration::from_secs(ttl),
                move |me: Arc<Inner>, _| {
                    let span = tracing::info_span!(parent: None, "oci", op = "ttl", cell = %id2);
                    async move {
                        let _ = me.destroy(&id2, Some(incarnation)).await;
                    }
                    .instrument(span)
                },
            );
            live.tasks.lock().unwrap().push(timer.abort_handle());
        }
        let handle = CellHandle {
            id,
            host_pid: live.host_pid,
        };
        reservation.commit(live);
        Ok(handle)
    }

    /// Create and start `cell`'s container; on any failure everything made so far is removed.
    async fn start_cell(
        self: &Arc<Self>,
        cell: &AdmittedCell,
        restore_from: Option<&Path>,
    ) -> Result<Arc<Live>, CellError> {
        let rt = self.rt()?;
        if !self.rootfs.join("bin").exists() {
            return Err(CellError::Unavailable {
                reason: format!("fixture rootfs {} is missing", self.rootfs.display()),
            });
        }
        let rid = self.rid(cell.id());
        let dir = self.bundle_dir(&rid);
        if dir.exists() {
            // A leftover of a crashed run with this instance id is not ours to reuse.
            return Err(failure(
                "bundle dir",
                format!("{} already exists", dir.display()),
            ));
        }
        mkdir_private(&dir).map_err(|e| failure("create bundle dir", e))?;
        match self.launch(&rt, cell, &rid, &dir, restore_from).await {
            Ok(live) => Ok(live),
            Err((e, shim)) => {
                self.scrub(&rt, &rid, &dir, shim.as_ref()).await;
                Err(e)
            }
        }
    }

    async fn launch(
        self: &Arc<Self>,
        rt: &Runtime,
        cell: &AdmittedCell,
        rid: &str,
        dir: &Path,
        restore_from: Option<&Path>,
    ) -> Result<Arc<Live>, LaunchError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| (failure(&what, e), None)
        };
        let opts = bundle::BundleOptions {
            rootfs: self.rootfs.clone(),
            cgroups_path: format!("/{rid}"),
            pids_limit: self.kind != crate::runtime::RuntimeKind::Runsc,
        };
        bundle::write_config(&dir.join("config.json"), &bundle::config(cell, &opts))
            .map_err(io("write config.json"))?;
        let stdin = File::open("/dev/null").map_err(io("open /dev/null"))?;
        let stdout = new_file(&dir.join("stdout")).map_err(io("create stdout file"))?;
        let stderr = new_file(&dir.join("stderr")).map_err(io("create stderr file"))?;
        let pid_file = dir.join("pid");
        let log = dir.join("runtime.log");
        let mut args: Vec<OsString> = self
            .kind
            .create_log_args(dir, &log)
            .map_err(io("create log dir"))?;
        match restore_from {
            None => args.extend(["create".into(), "--bundle".into(), dir.into()]),
            Some(img) => args.extend([
                "restore".into(),
                "--detach".into(),
                "--image-path".into(),
                img.into(),
                "--bundle".into(),
                dir.into(),
            ]),
        }
        args.extend(["--pid-file".into(), pid_file.clone().into(), rid.into()]);
        let shim = Shim::spawn(
            &rt.argv(&args),
            [&stdin, &stdout, &stderr],
            &pid_file,
            rt.unmount.as_deref(),
        )
        .map_err(io("spawn runtime"))?;
        drop((stdin, stdout, stderr));
        let op = if restore_from.is_some() {
            "restore"
        } else {
            "create"
        };
        tracing::debug!(shim_pid = shim.pid, "runtime {op} started under the shim");
        let status = shim.runtime_status().await;
        tracing::debug!(?status, "runtime {op} ended (wait status)");
        match status {
            Ok(st) if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 => {}
            Ok(st) => {
                let msg = self.error_text(dir, &log);
                let msg = if msg.is_empty() {
                    format!("wait status {st:#x}")
                } else {
                    msg
                };
                return Err((self.map_start_error(op, cell, &msg), Some(shim)));
            }
            Err(errno) => {
                return Err((
                    CellError::Unavailable {
                        reason: format!(
                            "{}: {}",
                            rt.bin.display(),
                            std::io::Error::from_raw_os_error(errno)
                        ),
                    },
                    Some(shim),
                ))
            }
        }
        // runc/crun: the container's init, which becomes the workload; runsc: the sandbox.
        let pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let host_pid = pid.filter(|_| self.kind.workload_is_host_process());
        tracing::debug!(?pid, ?host_pid, "pid file read");
        let started = Instant::now();
        if restore_from.is_none() {
            let exe_before = host_pid.and_then(proc_exe);
            let out = rt.run(&["start", rid]).await;
            if !out.ok {
                let msg = out.message(self.kind);
                return Err((self.map_start_error("start", cell, &msg), Some(shim)));
            }
            if let Some(pid) = host_pid {
                await_exec(pid, exe_before, Duration::from_secs(5)).await;
            }
        }
        let (tx, rx) = watch::channel(None);
        let live = Arc::new(Live {
            cell: cell.clone(),
            rid: rid.to_string(),
            dir: dir.to_path_buf(),
            shim: shim.clone(),
            host_pid,
            exit: rx,
            paused: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let me = self.clone();
        let l2 = live.clone();
        // Outlives the create: a span of its own, with the cell id.
        let span = tracing::info_span!(parent: None, "oci", op = "monitor", cell = %cell.id());
        let monitor =
            tokio::spawn(async move { me.monitor(l2, started, tx).await }.instrument(span));
        live.tasks.lock().unwrap().push(monitor.abort_handle());
        Ok(live)
    }

    /// The runtime's message for a failed create/restore: its log (runc) or what it wrote to the
    /// stderr it shared with the workload.
    fn error_text(&self, dir: &Path, log: &Path) -> String {
        let from_log = fs::read_to_string(log).unwrap_or_default();
        let m = runtime::runtime_message(&from_log);
        if !m.is_empty() {
            return m;
        }
        runtime::runtime_message(&fs::read_to_string(dir.join("stderr")).unwrap_or_default())
    }

    fn map_start_error(&self, op: &str, cell: &AdmittedCell, msg: &str) -> CellError {
        let argv0 = &cell.argv()[0];
        if runtime::is_missing_program(msg, argv0) {
            CellError::NotFound {
                kind: ResourceKind::Program,
                id: argv0.clone(),
            }
        } else if runtime::is_missing_cwd(msg, cell.working_directory()) {
            CellError::NotFound {
                kind: ResourceKind::WorkingDirectory,
                id: cell.working_directory().to_string(),
            }
        } else {
            failure(&format!("{} {op}", self.kind.name()), msg)
        }
    }
}

fn proc_exe(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// `start` returns once the container is told to go, not once its init has exec'd the workload:
/// until then the pid still runs the runtime's init (holding its exec fifo as an fd). Wait, within
/// a bound, until the pid's executable changes (or it is gone), so the pid handed out is the workload.
async fn await_exec(pid: u32, before: Option<PathBuf>, bound: Duration) {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        match proc_exe(pid) {
            Some(now) if Some(&now) == before.as_ref() => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
