//! Freezing a VM: snapshots as QEMU migration streams (with what a restore needs beside them),
//! restore into a new id, snapshot deletion, and pause/resume through QMP.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellcheck_contract::{CellDocument, CellError, CellHandle, ResourceKind, Retry, SnapshotRef};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::vm::{Vm, VmSpec};
use crate::{Accel, Inner, REQUEST_BOUND};

/// What a restore needs besides the migration stream (`meta.json` beside `state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    source: String,
    document: CellDocument,
    memory_mib: u64,
    accel: Accel,
    kernel: PathBuf,
    initramfs: PathBuf,
}

impl Inner {
    pub(crate) async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        let cell = self.cells.get(id)?;
        let guest = self.guest()?;
        let n = self.next_snapshot.fetch_add(1, Ordering::Relaxed);
        let dir = self.snapshots_of(id).join(n.to_string());
        fs::create_dir_all(&dir)
            .map_err(|e| CellError::failure(format!("create {}: {e}", dir.display())))?;
        let state = dir.join("state");
        let result = cell
            .vm
            .with_agent_quiet(async {
                let was_paused = cell.paused();
                let bound = Instant::now() + Duration::from_secs(120);
                if !was_paused {
                    cell.vm.qmp_cmd("stop", json!({}), bound).await?;
                }
                let r = migrate_to_file(&cell.vm, &state, bound).await;
                if !was_paused {
                    cell.vm.qmp_cmd("cont", json!({}), bound).await?;
                }
                r
            })
            .await;
        let meta = SnapshotMeta {
            source: id.to_string(),
            document: cell.doc.document().clone(),
            memory_mib: cell.vm.spec.memory_mib,
            accel: cell.vm.spec.accel,
            kernel: guest.kernel.clone(),
            initramfs: guest.initramfs.clone(),
        };
        let result = result.and_then(|()| {
            let text =
                serde_json::to_vec_pretty(&meta).map_err(|e| CellError::failure(e.to_string()))?;
            fs::write(dir.join("meta.json"), text).map_err(CellError::from)
        });
        match result {
            Ok(()) => Ok(SnapshotRef {
                id: format!("{id}.{n}"),
                source: id.to_string(),
                path: Some(dir),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                self.prune_dirs(Some(id));
                Err(e)
            }
        }
    }

    pub(crate) async fn restore(
        self: &Arc<Self>,
        snap: &SnapshotRef,
        new_id: &str,
    ) -> Result<CellHandle, CellError> {
        let dir = self.snapshot_dir(snap)?;
        let meta: SnapshotMeta = fs::read(dir.join("meta.json"))
            .map_err(|e| CellError::failure(format!("snapshot {}: meta.json: {e}", snap.id)))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| CellError::BackendFailure {
                    reason: format!("snapshot {}: meta.json: {e}", snap.id),
                    retry: Retry::NotRetryable,
                })
            })?;
        let doc = meta.document.admit()?.with_id(new_id)?;
        let pending = self.reserve(new_id)?;
        let spec = VmSpec {
            qemu_bin: self.config.qemu_bin.clone(),
            kernel: meta.kernel,
            initramfs: meta.initramfs,
            accel: meta.accel,
            memory_mib: meta.memory_mib,
            dir: self.cell_dir(new_id),
            incoming: Some(dir.join("state")),
            cgroup: Some(self.cgroup_leaf(new_id)),
        };
        self.launch(pending, doc, spec, true).await
    }

    pub(crate) fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        let dir = self.snapshot_dir(snap)?;
        fs::remove_dir_all(&dir)
            .map_err(|e| CellError::failure(format!("remove {}: {e}", dir.display())))?;
        self.prune_dirs(Some(&snap.source));
        Ok(())
    }

    /// A snapshot of this backend value: its dir must be ours and still exist.
    fn snapshot_dir(&self, snap: &SnapshotRef) -> Result<PathBuf, CellError> {
        let not_found = || CellError::NotFound {
            kind: ResourceKind::Snapshot,
            id: snap.id.clone(),
        };
        let dir = snap.path.clone().ok_or_else(not_found)?;
        if !dir.starts_with(self.instance_dir.join("snapshots")) || !dir.is_dir() {
            return Err(not_found());
        }
        Ok(dir)
    }

    pub(crate) async fn set_paused(&self, id: &str, pause: bool) -> Result<(), CellError> {
        let cell = self.cells.get(id)?;
        let (cmd, state) = if pause {
            ("stop", "paused")
        } else {
            ("cont", "running")
        };
        if cell.paused() == pause {
            return Err(CellError::InvalidState {
                operation: cmd.into(),
                state: format!("already {state}"),
            });
        }
        cell.vm
            .qmp_cmd(cmd, json!({}), Instant::now() + REQUEST_BOUND)
            .await?;
        cell.state.lock().expect("state lock").paused = pause;
        Ok(())
    }
}

/// Write the stopped guest's migration stream to `path` (QEMU 7.2 has no `file:` URI, and its
/// sandbox refuses `exec:`, so QEMU gets the open file over QMP), lifting the default 32 MiB/s
/// bandwidth cap first.
async fn migrate_to_file(vm: &Vm, path: &Path, deadline: Instant) -> Result<(), CellError> {
    vm.qmp_cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 8u64 << 30}),
        deadline,
    )
    .await?;
    let file = std::fs::File::create(path)
        .map_err(|e| CellError::failure(format!("snapshot: create {}: {e}", path.display())))?;
    vm.qmp_getfd("snapshot", &file, deadline).await?;
    drop(file);
    vm.qmp_cmd("migrate", json!({"uri": "fd:snapshot"}), deadline)
        .await?;
    loop {
        let st = vm.qmp_cmd("query-migrate", json!({}), deadline).await?;
        match st.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(CellError::failure(format!(
                    "snapshot: migration {}: {}",
                    st["status"],
                    st.get("error-desc").and_then(|d| d.as_str()).unwrap_or("")
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(CellError::failure(
                "snapshot: migration did not complete in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
