//! A deliberately broken backend: wraps a working one and injects exactly one fault, so the
//! suite's self-tests can prove each scenario catches the defect it exists for.
//!
//! Whatever a fault leaks is recorded here, and [`FaultyBackend::cleanup`] removes it by the pid
//! or path it recorded, never by name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cellcheck_contract::{
    Availability, Backend, Capabilities, CellDocument, CellError, CellHandle, ExecRequest,
    ExitReport, Footprint, SnapshotRef, TeardownReport, Termination,
};

use crate::ids::{canary, declared_marker, MARKER_VAR};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// On create, also start a host process carrying the cell's marker; destroy never kills it.
    LeakProcess,
    /// The workload also gets the harness's ambient canary var.
    LeakAmbientEnv,
    /// The workload gets an extra fd 7.
    LeakFd,
    /// `wait` reports exit code + 1.
    MisreportExit,
    /// Create makes an extra cgroup dir, listed in the footprint, that destroy never removes.
    SkipCgroupRemoval,
    /// Create writes a state file, listed in the footprint, that destroy never removes.
    LeaveStateFile,
    /// A second destroy of the same id panics instead of returning NotFound.
    PanicOnDoubleDestroy,
    /// `wait` never returns (a hung backend).
    HangOnWait,
    /// Create makes a cgroup dir named after the cell that the footprint does not list.
    UndeclaredCgroupDir,
    /// Create writes a file named after the cell that the footprint does not list.
    UndeclaredFile,
    /// Create mounts a tmpfs on a dir named after the cell; the footprint has no mount marker.
    UndeclaredMount,
    /// Create adds a named netns after the cell; the footprint lists none.
    UndeclaredNetns,
    /// Create starts a helper process with no marker, no id, an empty env; never killed.
    UnmarkedHelper,
    /// Create starts a short helper and never reaps it: a zombie child of the harness.
    Zombie,
    /// Destroy returns Ok at once and does the real destroy a moment later.
    LateKill,
    /// Create writes the declared secrets into a file whose name says nothing of the cell.
    SecretToFile,
    /// Create writes a file into the shared fixture rootfs.
    WriteSharedRootfs,
    /// Admission too strict: ids over 64 bytes and non-ASCII argv or env values are refused.
    AdmissionTooStrict,
    /// Admission too lax: a timeout over the TTL, a zero TTL or a duplicate env name is "repaired"
    /// and the cell created.
    AdmissionTooLax,
    /// A wrapper shell folds exit codes: a real exit 129..=192 is reported as death by signal N-128.
    FoldExitAsSignal,
    /// The reverse: death by signal N is reported as exit 128+N.
    FoldSignalAsExit,
    /// Captured output goes through a lossy UTF-8 conversion.
    MangleOutput,
    /// stderr is appended to stdout (one pipe for both).
    MergeStreams,
    /// A second wait returns the termination but empty captures.
    ForgetOutputOnRewait,
    /// `timeoutMs` is enforced only while someone waits.
    TimeoutOnlyWhileWaiting,
    /// A document with a timeout loses its TTL (one field overwrites the other).
    TtlDroppedWithTimeout,
    /// With several cells live, `wait` answers with the report of the cell created before.
    CrossTalk,
    /// Exec gets the harness's ambient canary var too.
    ExecAmbientEnv,
    /// Exec gets an extra fd 7.
    ExecLeaksFd,
    /// Exec reports exit code + 1 and any death by signal as SIGKILL.
    ExecMisreportEnd,
    /// Concurrent execs share one report slot: each gets the previous exec's report.
    ExecSharedReport,
    /// Exec's own timeout is ignored.
    ExecIgnoresTimeout,
    /// Exec into a cell whose workload ended is an untyped backend failure.
    ExecAfterEndUntyped,
    /// Pause and resume answer Ok and do nothing.
    PauseNoop,
    /// `run.workingDirectory` is dropped: every workload starts at `/`.
    IgnoreWorkingDirectory,
    /// `capabilities()` drops Snapshot on every other call.
    CapabilitiesUnstable,
    /// Pause is declared unsupported, and calling it is an untyped backend failure.
    UnsupportedUntyped,
    /// The backend forgot to harden: it wraps a backend whose cells keep their capabilities and
    /// run without no_new_privs, seccomp filter or cgroup namespace, yet claims all of them.
    /// Needs an unhardened inner backend ([`Fault::needs_unhardened_inner`]).
    Unhardened,
    /// The workload finds an extra device node in `/dev` (made before it starts, as a backend
    /// that passes a host device through would). Needs an unhardened inner backend.
    ExtraDevice,
    /// The declared `limits.openFiles` is dropped before the inner backend sees the document, so
    /// the default is applied instead.
    DropOpenFiles,
}

/// The node [`Fault::ExtraDevice`] adds to the cell's `/dev` (a copy of `null`, harmless).
pub const EXTRA_DEVICE: &str = "cellcheck-extra";

impl Fault {
    /// The fault shows only over a backend that does not harden its cells (the host backend with
    /// `privileged`): a hardened cell could neither keep capabilities nor make a device node.
    pub fn needs_unhardened_inner(self) -> bool {
        matches!(self, Fault::Unhardened | Fault::ExtraDevice)
    }
}

/// Something an undeclared fault made, to be removed by [`FaultyBackend::cleanup`].
#[derive(Debug)]
enum Made {
    Path(PathBuf),
    Mount(PathBuf),
    Netns(String),
}

pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    fault: Fault,
    name: String,
    leaked: Mutex<Vec<Child>>,
    /// Paths and netns the undeclared faults made, removed by [`FaultyBackend::cleanup`].
    made: Mutex<Vec<Made>>,
    /// Destroys [`Fault::LateKill`] still has to do.
    late: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    destroyed: Mutex<BTreeSet<String>>,
    created: Mutex<Vec<String>>,
    /// [`Fault::TimeoutOnlyWhileWaiting`]: each cell's deadline, enforced by `wait` only.
    deadlines: Mutex<BTreeMap<String, (std::time::Instant, u64)>>,
    /// [`Fault::TimeoutOnlyWhileWaiting`]: cells the fault killed at their deadline.
    timed_out: Mutex<BTreeSet<String>>,
    /// [`Fault::ForgetOutputOnRewait`]: cells waited once.
    waited: Mutex<BTreeSet<String>>,
    /// [`Fault::ExecSharedReport`]: the one report slot.
    exec_slot: Mutex<Option<ExitReport>>,
    /// [`Fault::CapabilitiesUnstable`]: calls so far.
    calls: std::sync::atomic::AtomicUsize,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>, fault: Fault) -> Self {
        let name = format!("faulty-{}", inner.name());
        FaultyBackend {
            inner,
            fault,
            name,
            leaked: Mutex::new(Vec::new()),
            made: Mutex::new(Vec::new()),
            late: Mutex::new(Vec::new()),
            destroyed: Mutex::new(BTreeSet::new()),
            created: Mutex::new(Vec::new()),
            deadlines: Mutex::new(BTreeMap::new()),
            timed_out: Mutex::new(BTreeSet::new()),
            waited: Mutex::new(BTreeSet::new()),
            exec_slot: Mutex::new(None),
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// Pids of the processes [`Fault::LeakProcess`] started.
    pub fn leaked_pids(&self) -> Vec<u32> {
        self.leaked.lock().unwrap().iter().map(|c| c.id()).collect()
    }

    /// The extra cgroup dir [`Fault::SkipCgroupRemoval`] makes for `id`.
    pub fn cgroup_dir(id: &str) -> PathBuf {
        let root = PathBuf::from("/sys/fs/cgroup");
        // v2 (unified at the root) or the v1 pids controller.
        let base = if root.join("cgroup.controllers").exists() {
            root
        } else {
            root.join("pids")
        };
        base.join(format!("cellcheck-faulty-{id}"))
    }

    /// The state file [`Fault::LeaveStateFile`] writes for `id`.
    pub fn state_file(id: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cellcheck-faulty-{id}.state"))
    }

    /// What the undeclared faults made, by name (for the self-tests' expected messages).
    pub fn made(&self) -> Vec<String> {
        self.made
            .lock()
            .unwrap()
            .iter()
            .map(|m| match m {
                Made::Path(p) | Made::Mount(p) => p.display().to_string(),
                Made::Netns(n) => n.clone(),
            })
            .collect()
    }

    /// Remove what the faults leaked: kill and reap the leaked processes (by their recorded pid),
    /// remove the cgroup dirs and state files of the given ids. Returns what it removed.
    pub fn cleanup(&self, ids: &[String]) -> Vec<String> {
        let mut done = Vec::new();
        // The late destroys first: they kill what is still running.
        let late: Vec<_> = self.late.lock().unwrap().drain(..).collect();
        for h in late {
            while !h.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            done.push("a late destroy".to_string());
        }
        for m in self.made.lock().unwrap().drain(..).rev() {
            let ok = match &m {
                Made::Mount(p) => {
                    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).is_ok()
                        && std::fs::remove_dir(p).is_ok()
                }
                Made::Path(p) if p.is_dir() => std::fs::remove_dir(p).is_ok(),
                Made::Path(p) => std::fs::remove_file(p).is_ok(),
                Made::Netns(n) => Command::new("ip")
                    .args(["netns", "delete", n])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if ok {
                done.push(format!("{m:?}"));
            }
        }
        for mut c in self.leaked.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
            done.push(format!("pid {}", c.id()));
        }
        for id in ids {
            let d = Self::cgroup_dir(id);
            if std::fs::remove_dir(&d).is_ok() {
                done.push(d.display().to_string());
            }
            let f = Self::state_file(id);
            if std::fs::remove_file(&f).is_ok() {
                done.push(f.display().to_string());
            }
        }
        done
    }

    /// [`FaultyBackend::cleanup`] for every id this backend created.
    pub fn cleanup_created(&self) -> Vec<String> {
        let ids: Vec<String> = self.created.lock().unwrap().clone();
        self.cleanup(&ids)
    }

    fn spawn_quiet(&self, cmd: &mut Command) -> Result<Child, CellError> {
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| CellError::failure(format!("faulty: spawn helper: {e}")))
    }

    /// The undeclared leaks of create, each named after the cell (as a backend names its things).
    fn leak_undeclared(&self, doc: &CellDocument) -> Result<(), CellError> {
        let id = &doc.spec.id;
        let tmp = std::env::temp_dir();
        let mut made = self.made.lock().unwrap();
        match self.fault {
            Fault::UndeclaredCgroupDir => {
                let d = Self::cgroup_dir(id).with_file_name(format!("cellcheck-undeclared-{id}"));
                std::fs::create_dir_all(&d)?;
                made.push(Made::Path(d));
            }
            Fault::UndeclaredFile => {
                let f = tmp.join(format!("cellcheck-undeclared-{id}"));
                std::fs::write(&f, b"x")?;
                made.push(Made::Path(f));
            }
            Fault::UndeclaredMount => {
                let d = tmp.join(format!("cellcheck-mnt-{id}"));
                std::fs::create_dir_all(&d)?;
                made.push(Made::Path(d.clone()));
                nix::mount::mount(
                    Some("cellcheck-faulty"),
                    &d,
                    Some("tmpfs"),
                    nix::mount::MsFlags::empty(),
                    Some("size=64k"),
                )
                .map_err(|e| CellError::failure(format!("faulty: mount: {e}")))?;
                made.pop();
                made.push(Made::Mount(d));
            }
            Fault::UndeclaredNetns => {
                let n = format!("cellcheck-{id}");
                let ok = Command::new("ip")
                    .args(["netns", "add", &n])
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return Err(CellError::failure("faulty: `ip netns add` failed"));
                }
                made.push(Made::Netns(n));
            }
            Fault::UnmarkedHelper => {
                let c = self.spawn_quiet(Command::new("sleep").arg("3600"))?;
                self.leaked.lock().unwrap().push(c);
            }
            Fault::Zombie => {
                let c = self.spawn_quiet(&mut Command::new("true"))?;
                self.leaked.lock().unwrap().push(c);
            }
            Fault::SecretToFile => {
                let secrets = crate::ids::declared_secrets(doc);
                if !secrets.is_empty() {
                    let f = tmp.join(format!("faulty-{}.log", crate::ids::random_token(10)));
                    std::fs::write(&f, secrets.join("\n"))?;
                    made.push(Made::Path(f));
                }
            }
            Fault::WriteSharedRootfs => {
                if let Some(root) = crate::harness::fixtures_rootfs() {
                    let f = root.join(format!("faulty-{id}"));
                    std::fs::write(&f, b"x")?;
                    made.push(Made::Path(f));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn wrap(&self, doc: &CellDocument) -> CellDocument {
        let mut d = doc.clone();
        match self.fault {
            Fault::LeakAmbientEnv => {
                let c = canary();
                let mut argv = vec!["/bin/env".to_string(), format!("{}={}", c.name, c.value)];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::LeakFd => {
                let mut argv = vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    "exec 7</dev/null; exec \"$@\"".to_string(),
                    "sh".to_string(),
                ];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::AdmissionTooLax => {
                let run = &mut d.spec.run;
                let mut seen = BTreeSet::new();
                run.env.retain(|e| seen.insert(e.name.clone()));
                let over = match (d.spec.lifetime, run.timeout_ms) {
                    (Some(l), _) if l.ttl_seconds == 0 => true,
                    (Some(l), Some(t)) => t > l.ttl_seconds.saturating_mul(1000),
                    _ => false,
                };
                if over {
                    d.spec.lifetime = None;
                }
            }
            Fault::TimeoutOnlyWhileWaiting => d.spec.run.timeout_ms = None,
            Fault::IgnoreWorkingDirectory => d.spec.run.working_directory = None,
            Fault::TtlDroppedWithTimeout if d.spec.run.timeout_ms.is_some() => {
                d.spec.lifetime = None
            }
            Fault::ExtraDevice => {
                let mut argv = vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    format!("mknod /dev/{EXTRA_DEVICE} c 1 3 && exec \"$@\""),
                    "sh".to_string(),
                ];
                argv.append(&mut d.spec.run.argv);
                d.spec.run.argv = argv;
            }
            Fault::DropOpenFiles => {
                if let Some(l) = d.spec.run.limits.as_mut() {
                    l.open_files = None;
                }
            }
            _ => {}
        }
        d
    }

    /// [`Fault::AdmissionTooStrict`]'s extra refusals.
    fn too_strict(doc: &CellDocument) -> Result<(), CellError> {
        if doc.spec.id.len() > 64 {
            return Err(CellError::invalid("spec.id", "longer than 64 characters"));
        }
        if let Some(i) = doc.spec.run.argv.iter().position(|a| !a.is_ascii()) {
            return Err(CellError::invalid(
                format!("spec.run.argv[{i}]"),
                "not ASCII",
            ));
        }
        if let Some(i) = doc.spec.run.env.iter().position(|e| !e.value.is_ascii()) {
            return Err(CellError::invalid(
                format!("spec.run.env[{i}].value"),
                "not ASCII",
            ));
        }
        Ok(())
    }

    fn fold(&self, r: &mut ExitReport) {
        match (self.fault, r.termination) {
            (Fault::FoldExitAsSignal, Termination::Exited { code })
                if (129..=192).contains(&code) =>
            {
                r.termination = Termination::Signaled { signal: code - 128 }
            }
            (Fault::FoldSignalAsExit, Termination::Signaled { signal }) => {
                r.termination = Termination::Exited { code: 128 + signal }
            }
            (Fault::MangleOutput, _) => {
                r.stdout = String::from_utf8_lossy(&r.stdout).into_owned().into_bytes();
                r.stderr = String::from_utf8_lossy(&r.stderr).into_owned().into_bytes();
            }
            (Fault::MergeStreams, _) => {
                let err = std::mem::take(&mut r.stderr);
                r.stdout.extend(err);
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Backend for FaultyBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        let caps = self.inner.capabilities();
        match self.fault {
            Fault::CapabilitiesUnstable
                if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 1 =>
            {
                caps.without(
                    cellcheck_contract::Capability::Snapshot,
                    "faulty: flaky answer",
                )
            }
            Fault::UnsupportedUntyped => {
                caps.without(cellcheck_contract::Capability::Pause, "faulty: not offered")
            }
            _ => caps,
        }
    }

    async fn preflight(&self) -> Availability {
        self.inner.preflight().await
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = self.inner.attributes();
        a.insert("fault".into(), format!("{:?}", self.fault));
        a
    }

    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        if self.fault == Fault::AdmissionTooStrict {
            Self::too_strict(doc)?;
        }
        let h = self.inner.create(&self.wrap(doc)).await?;
        let id = &doc.spec.id;
        if let (Fault::TimeoutOnlyWhileWaiting, Some(t)) = (self.fault, doc.spec.run.timeout_ms) {
            self.deadlines
                .lock()
                .unwrap()
                .insert(id.clone(), (std::time::Instant::now(), t));
        }
        self.destroyed.lock().unwrap().remove(id);
        self.created.lock().unwrap().push(id.clone());
        match self.fault {
            Fault::LeakProcess => {
                let marker = declared_marker(doc).unwrap_or_else(|| id.clone());
                let child = Command::new("sleep")
                    .arg("3600")
                    .env_clear()
                    .env(MARKER_VAR, marker)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| CellError::failure(format!("faulty: spawn leak: {e}")))?;
                self.leaked.lock().unwrap().push(child);
            }
            Fault::SkipCgroupRemoval => {
                std::fs::create_dir_all(Self::cgroup_dir(id))?;
            }
            Fault::LeaveStateFile => {
                std::fs::write(Self::state_file(id), id.as_bytes())?;
            }
            _ => self.leak_undeclared(doc)?,
        }
        Ok(h)
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        if self.fault == Fault::HangOnWait {
            std::future::pending::<()>().await;
        }
        let target = match self.fault {
            // The cell created just before this one, if it is still around.
            Fault::CrossTalk => {
                let created = self.created.lock().unwrap().clone();
                let gone = self.destroyed.lock().unwrap().clone();
                let pos = created.iter().rposition(|c| c == id);
                pos.and_then(|p| created[..p].iter().rev().find(|c| !gone.contains(*c)))
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
            }
            _ => id.to_string(),
        };
        if self.fault == Fault::TimeoutOnlyWhileWaiting {
            if self.timed_out.lock().unwrap().contains(id) {
                return Err(CellError::DeadlineExceeded { after_ms: 0 });
            }
            let dl = self.deadlines.lock().unwrap().get(id).copied();
            if let Some((start, ms)) = dl {
                let left = std::time::Duration::from_millis(ms).saturating_sub(start.elapsed());
                match tokio::time::timeout(left, self.inner.wait(id)).await {
                    Ok(r) => return r,
                    Err(_) => {
                        // Killed only now, because someone waited.
                        let _ = self.inner.destroy(id).await;
                        self.timed_out.lock().unwrap().insert(id.to_string());
                        return Err(CellError::DeadlineExceeded { after_ms: ms });
                    }
                }
            }
        }
        let mut r = self.inner.wait(&target).await?;
        if self.fault == Fault::MisreportExit {
            if let Termination::Exited { code } = r.termination {
                r.termination = Termination::Exited { code: code + 1 };
            }
        }
        self.fold(&mut r);
        if self.fault == Fault::ForgetOutputOnRewait
            && !self.waited.lock().unwrap().insert(id.to_string())
        {
            r.stdout.clear();
            r.stderr.clear();
        }
        Ok(r)
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        if self.fault == Fault::PanicOnDoubleDestroy && self.destroyed.lock().unwrap().contains(id)
        {
            panic!("faulty backend: second destroy of {id}");
        }
        if self.fault == Fault::LateKill && !self.destroyed.lock().unwrap().contains(id) {
            self.destroyed.lock().unwrap().insert(id.to_string());
            let (inner, cell) = (self.inner.clone(), id.to_string());
            self.late.lock().unwrap().push(tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let _ = inner.destroy(&cell).await;
            }));
            return Ok(TeardownReport {
                id: id.to_string(),
                killed_running: false,
                remaining_cells: 0,
            });
        }
        if self.fault == Fault::TimeoutOnlyWhileWaiting && self.timed_out.lock().unwrap().remove(id)
        {
            self.destroyed.lock().unwrap().insert(id.to_string());
            return Ok(TeardownReport {
                id: id.to_string(),
                killed_running: true,
                remaining_cells: self.inner.list().await.len(),
            });
        }
        let mut r = self.inner.destroy(id).await;
        if r.is_ok() {
            self.destroyed.lock().unwrap().insert(id.to_string());
        }
        if let (Fault::CrossTalk, Ok(t)) = (self.fault, &mut r) {
            // Teardown reports are mixed up the same way: the newest cell's id.
            if let Some(last) = self.created.lock().unwrap().last() {
                t.id = last.clone();
            }
        }
        r
    }

    fn footprint(&self, id: &str) -> Footprint {
        let mut f = self.inner.footprint(id);
        match self.fault {
            Fault::SkipCgroupRemoval => f.cgroup_dirs.push(Self::cgroup_dir(id)),
            Fault::LeaveStateFile => f.paths.push(Self::state_file(id)),
            _ => {}
        }
        f
    }

    async fn exec(&self, id: &str, mut req: ExecRequest) -> Result<ExitReport, CellError> {
        match self.fault {
            Fault::ExecAmbientEnv => {
                let c = canary();
                req.env.push(cellcheck_contract::EnvVar {
                    name: c.name.clone(),
                    value: c.value.clone(),
                });
            }
            Fault::ExecLeaksFd => {
                let mut argv = vec![
                    "/bin/sh".to_string(),
                    "-c".to_string(),
                    "exec 7</dev/null; exec \"$@\"".to_string(),
                    "sh".to_string(),
                ];
                argv.append(&mut req.argv);
                req.argv = argv;
            }
            Fault::ExecIgnoresTimeout => req.timeout_ms = None,
            _ => {}
        }
        let r = self.inner.exec(id, req).await;
        match (self.fault, r) {
            (Fault::ExecMisreportEnd, Ok(mut rep)) => {
                rep.termination = match rep.termination {
                    Termination::Exited { code } => Termination::Exited { code: code + 1 },
                    Termination::Signaled { .. } => Termination::Signaled { signal: 9 },
                    t => t,
                };
                Ok(rep)
            }
            (Fault::ExecSharedReport, Ok(rep)) => {
                let prev = self.exec_slot.lock().unwrap().replace(rep.clone());
                Ok(prev.unwrap_or(rep))
            }
            (Fault::ExecAfterEndUntyped, Err(CellError::InvalidState { state, .. })) => {
                Err(CellError::failure(format!("exec failed: {state}")))
            }
            (_, r) => r,
        }
    }

    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        self.inner.snapshot(id).await
    }

    async fn restore(&self, snap: &SnapshotRef, new_id: &str) -> Result<CellHandle, CellError> {
        self.inner.restore(snap, new_id).await
    }

    async fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        self.inner.delete_snapshot(snap).await
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        match self.fault {
            Fault::PauseNoop => return Ok(()),
            Fault::UnsupportedUntyped => {
                return Err(CellError::failure("pause: no freezer for this cell"))
            }
            _ => {}
        }
        self.inner.pause(id).await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        if self.fault == Fault::PauseNoop {
            return Ok(());
        }
        self.inner.resume(id).await
    }

    async fn list(&self) -> Vec<String> {
        self.inner.list().await
    }
}
