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
}

pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    fault: Fault,
    name: String,
    leaked: Mutex<Vec<Child>>,
    destroyed: Mutex<BTreeSet<String>>,
    created: Mutex<Vec<String>>,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>, fault: Fault) -> Self {
        let name = format!("faulty-{}", inner.name());
        FaultyBackend {
            inner,
            fault,
            name,
            leaked: Mutex::new(Vec::new()),
            destroyed: Mutex::new(BTreeSet::new()),
            created: Mutex::new(Vec::new()),
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

    /// Remove what the faults leaked: kill and reap the leaked processes (by their recorded pid),
    /// remove the cgroup dirs and state files of the given ids. Returns what it removed.
    pub fn cleanup(&self, ids: &[String]) -> Vec<String> {
        let mut done = Vec::new();
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
            _ => {}
        }
        d
    }
}

#[async_trait]
impl Backend for FaultyBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
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
        let h = self.inner.create(&self.wrap(doc)).await?;
        let id = &doc.spec.id;
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
            _ => {}
        }
        Ok(h)
    }

    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        if self.fault == Fault::HangOnWait {
            std::future::pending::<()>().await;
        }
        let mut r = self.inner.wait(id).await?;
        if self.fault == Fault::MisreportExit {
            if let Termination::Exited { code } = r.termination {
                r.termination = Termination::Exited { code: code + 1 };
            }
        }
        Ok(r)
    }

    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        if self.fault == Fault::PanicOnDoubleDestroy && self.destroyed.lock().unwrap().contains(id)
        {
            panic!("faulty backend: second destroy of {id}");
        }
        let r = self.inner.destroy(id).await;
        if r.is_ok() {
            self.destroyed.lock().unwrap().insert(id.to_string());
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

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        self.inner.exec(id, req).await
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
        self.inner.pause(id).await
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        self.inner.resume(id).await
    }

    async fn list(&self) -> Vec<String> {
        self.inner.list().await
    }
}
