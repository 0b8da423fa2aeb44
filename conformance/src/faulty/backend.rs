//! The `Backend` implementation: each operation forwards to the inner backend and applies the
//! one fault at its place.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use async_trait::async_trait;
use cellcheck_contract::{
    Availability, Backend, Capabilities, CellDocument, CellError, CellHandle, ExecRequest,
    ExitReport, Footprint, SnapshotRef, TeardownReport, Termination,
};

use super::{Fault, FaultyBackend};
use crate::ids::{canary, declared_marker};

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
            Fault::UnconfinedVmm => caps.with(cellcheck_contract::Capability::VmmConfinement),
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
        if self.fault == Fault::MakeMissingCwd {
            self.make_missing_cwd(doc)?;
        }
        let mut h = self.inner.create(&self.wrap(doc)).await?;
        if self.fault == Fault::WrongHostPid {
            h.host_pid = h.host_pid.and_then(parent_of);
        }
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
                // Marked and visible as such before create returns, so the leak is there to
                // find however soon the audit looks.
                let child = crate::residue::spawn_marked(
                    Command::new("sleep")
                        .arg("3600")
                        .env_clear()
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                    &marker,
                )
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
            // A wrapper that folds or mangles a workload's end does the same to an exec's.
            (_, r) => r.map(|mut rep| {
                self.fold(&mut rep);
                rep
            }),
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

/// The parent of host pid `pid` (field 4 of `/proc/<pid>/stat`, after the parenthesised name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}
