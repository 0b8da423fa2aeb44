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
use crate::{Cell, CellState, Inner, GUEST_OVERHEAD_MIB, GUEST_RAM_CAP_MIB, REQUEST_BOUND};

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
        guest_ram_mib(
            self.config.memory_mib,
            doc.limits().memory_max_bytes,
            host_mem_total_mib(),
        )
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

/// The guest's RAM (MiB) for a cell with memory limit `limit` (bytes): room for the limit plus
/// the guest kernel and agent, at least `default_mib`, at most the cap
/// (`min(GUEST_RAM_CAP_MIB, host_mib)`). A limit is a maximum the guest's cell cgroup enforces,
/// not memory the VM must hold: sizing past the cap would make QEMU refuse a huge admitted limit
/// (u64::MAX) and slow every boot, while the cgroup still holds the workload to a smaller limit.
pub(crate) fn guest_ram_mib(default_mib: u64, limit: Option<u64>, host_mib: Option<u64>) -> u64 {
    let cap = host_mib.map_or(GUEST_RAM_CAP_MIB, |h| h.min(GUEST_RAM_CAP_MIB));
    let wanted = limit
        .map_or(0, |b| b.div_ceil(1 << 20))
        .saturating_add(GUEST_OVERHEAD_MIB);
    default_mib.max(wanted.min(cap))
}

/// The host's `MemTotal` in MiB, if `/proc/meminfo` says.
fn host_mem_total_mib() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib >> 10)
}

#[cfg(test)]
mod tests {
    use super::guest_ram_mib;

    #[test]
    fn guest_ram_is_the_limit_plus_overhead_within_the_cap() {
        const MIB: u64 = 1 << 20;
        // No limit, or a small one: the default.
        assert_eq!(guest_ram_mib(256, None, Some(24_000)), 256);
        assert_eq!(guest_ram_mib(256, Some(64 * MIB), Some(24_000)), 256);
        // An ordinary limit: the limit plus the guest's own needs (a partial MiB rounds up).
        assert_eq!(guest_ram_mib(256, Some(1024 * MIB), Some(24_000)), 1184);
        assert_eq!(guest_ram_mib(256, Some(1024 * MIB + 1), Some(24_000)), 1185);
        // The largest admitted limit: the cap, never an overflow or a size QEMU refuses.
        assert_eq!(guest_ram_mib(256, Some(u64::MAX), Some(24_000)), 2048);
        assert_eq!(guest_ram_mib(256, Some(u64::MAX), None), 2048);
        // A small host caps lower.
        assert_eq!(guest_ram_mib(256, Some(u64::MAX), Some(1000)), 1000);
    }
}
