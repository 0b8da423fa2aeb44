//! A cell's life: boot (or restore) a VM into a reserved id, its TTL timer, destroy, and the
//! teardown of whatever a dropped backend still holds.

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use cellcheck_contract::table::Reservation;
use cellcheck_contract::{AdmittedCell, CellDocument, CellError, CellHandle, TeardownReport};
use cellcheck_guest_agent::Op;

use crate::agent::{expect_done, start_workload};
use crate::vm::{Vm, VmSpec};
use crate::{Cell, CellState, Inner, GUEST_OVERHEAD_MIB, REQUEST_BOUND};

/// A reserved id and its work dir until the cell is committed. Dropped uncommitted (a failed or
/// cancelled create or restore), it frees the id and removes the work dir; QEMU, if it was
/// started, is killed by its handle's kill-on-drop.
pub(crate) struct Pending<'a> {
    inner: &'a Inner,
    reservation: Option<Reservation<Cell>>,
    dir: PathBuf,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.reservation.take().is_some() {
            let _ = fs::remove_dir_all(&self.dir);
            self.inner.prune_dirs(None);
        }
    }
}

impl Inner {
    /// Take `id` for a create or restore.
    pub(crate) fn reserve(&self, id: &str) -> Result<Pending<'_>, CellError> {
        Ok(Pending {
            inner: self,
            reservation: Some(self.cells.reserve(id)?),
            dir: self.cell_dir(id),
        })
    }

    /// Remove now-empty parents (snapshot dirs, the instance dir).
    pub(crate) fn prune_dirs(&self, snapshot_cell: Option<&str>) {
        if let Some(id) = snapshot_cell {
            let _ = fs::remove_dir(self.snapshots_of(id));
        }
        let _ = fs::remove_dir(self.instance_dir.join("snapshots"));
        let _ = fs::remove_dir(&self.instance_dir);
    }

    fn memory_for(&self, doc: &AdmittedCell) -> u64 {
        let limit_mib = doc
            .limits()
            .memory_max_bytes
            .map_or(0, |b| b.div_ceil(1 << 20));
        self.config.memory_mib.max(limit_mib + GUEST_OVERHEAD_MIB)
    }

    pub(crate) async fn create(
        self: &Arc<Self>,
        doc: &CellDocument,
    ) -> Result<CellHandle, CellError> {
        let admitted = doc.admit()?;
        let guest = self.guest()?.clone();
        let pending = self.reserve(admitted.id())?;
        let spec = VmSpec {
            qemu_bin: self.config.qemu_bin.clone(),
            kernel: guest.kernel,
            initramfs: guest.initramfs,
            accel: self.accel,
            memory_mib: self.memory_for(&admitted),
            dir: pending.dir.clone(),
            incoming: None,
            cgroup: Some(self.cgroup_leaf(admitted.id())),
        };
        self.launch(pending, admitted, spec, false).await
    }

    /// Boot (or restore) a VM for `doc` under the id `pending` holds, and commit it. On failure
    /// QEMU is reaped, the work dir is gone and the id is free again.
    pub(crate) async fn launch(
        self: &Arc<Self>,
        mut pending: Pending<'_>,
        doc: AdmittedCell,
        spec: VmSpec,
        restored: bool,
    ) -> Result<CellHandle, CellError> {
        let id = doc.id().to_string();
        fs::create_dir_all(&pending.dir).map_err(|e| {
            CellError::failure(format!("create work dir {}: {e}", pending.dir.display()))
        })?;
        let vm = {
            // The semaphore is never closed, so acquiring cannot fail.
            let _boot = self.boots.acquire().await.ok();
            Vm::start(spec, self.config.boot_timeout).await?
        };
        let started = if restored {
            // A restored guest still has the source's hostname.
            vm.agent_request(
                Op::Hostname {
                    name: doc.hostname().to_string(),
                },
                Instant::now() + REQUEST_BOUND,
            )
            .await
            .and_then(expect_done)
        } else {
            start_workload(&vm, &doc).await
        };
        if let Err(e) = started {
            vm.shutdown().await;
            return Err(e);
        }
        let reservation = pending
            .reservation
            .take()
            .expect("reserved until committed");
        let cell = Arc::new(Cell {
            started: Instant::now(),
            dir: pending.dir.clone(),
            vm,
            state: StdMutex::new(CellState::default()),
            ttl: StdMutex::new(None),
            doc,
        });
        if let Some(ttl) = cell.doc.ttl_seconds() {
            let incarnation = reservation.incarnation();
            let id2 = id.clone();
            let task = self.cells.reap_after(
                self,
                &id,
                incarnation,
                Duration::from_secs(ttl),
                move |inner: Arc<Inner>, _| {
                    let span = tracing::info_span!(parent: None, "qemu", op = "ttl", cell = %id2);
                    async move {
                        let _ = inner.destroy(&id2, Some(incarnation)).await;
                    }
                    .instrument(span)
                },
            );
            *cell.ttl.lock().expect("ttl lock") = Some(task);
        }
        reservation.commit(cell);
        Ok(CellHandle { id, host_pid: None })
    }

    /// Destroy `id` (only its incarnation `incarnation`, when given: for the TTL timer). A
    /// concurrent second destroy waits in the cell table until this one is over.
    pub(crate) async fn destroy(
        &self,
        id: &str,
        incarnation: Option<u64>,
    ) -> Result<TeardownReport, CellError> {
        let teardown = self.cells.begin_destroy(id, incarnation).await?;
        let cell = teardown.cell().clone();
        if incarnation.is_none() {
            if let Some(t) = cell.ttl.lock().expect("ttl lock").take() {
                t.abort();
            }
        }
        let (paused, ended) = {
            let st = cell.state.lock().expect("state lock");
            (st.paused, st.outcome.is_some())
        };
        let killed_running = if ended {
            false
        } else if paused {
            true
        } else {
            self.workload_running(&cell).await
        };
        tracing::debug!(killed_running, paused, ended, "teardown begins: qmp quit");
        cell.vm.shutdown().await;
        let _ = fs::remove_dir_all(&cell.dir);
        let remaining = teardown.finish();
        tracing::debug!(remaining_cells = remaining, "teardown over");
        self.prune_dirs(None);
        Ok(TeardownReport {
            id: id.to_string(),
            killed_running,
            remaining_cells: remaining,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Cells never destroyed: kill QEMU. Snapshots can only be restored by this backend value,
        // so its whole instance dir (work dirs and snapshots) goes with it.
        for c in self.cells.drain() {
            c.vm.kill_now();
            let _ = fs::remove_dir_all(&c.dir);
        }
        let _ = fs::remove_dir_all(&self.instance_dir);
    }
}
