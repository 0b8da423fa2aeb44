//! Freezing a cell: checkpoint images (with the cell document beside them, so a restore outlives
//! the source), restore into a new id, snapshot deletion, and pause/resume.

use std::fs;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cellcheck_contract::{
    Capability, CellDocument, CellError, CellHandle, ResourceKind, SnapshotRef,
};

use crate::layout::{mkdir_private, new_file};
use crate::{failure, freezer, invalid_state, Inner, RuntimeKind};

fn snapshot_not_found(snap: &SnapshotRef) -> CellError {
    CellError::NotFound {
        kind: ResourceKind::Snapshot,
        id: snap.id.clone(),
    }
}

impl Inner {
    pub(crate) async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        self.caps.require(Capability::Snapshot)?;
        let live = self.cells.get(id)?;
        if live.exited() {
            return Err(invalid_state("snapshot", "exited"));
        }
        let rt = self.rt()?;
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let snap_id = format!("{id}.snap-{n}");
        let dir = self.snapshot_parent(&live.rid).join(format!("{n}"));
        mkdir_private(&dir).map_err(|e| failure("create snapshot dir", e))?;
        self.snapshots
            .lock()
            .unwrap()
            .insert(snap_id.clone(), dir.clone());
        let dir_s = dir.display().to_string();
        let out = rt
            .run(&["checkpoint", "--image-path", &dir_s, &live.rid])
            .await;
        if !out.ok {
            self.drop_snapshot_files(&snap_id);
            return Err(failure(
                &format!("{} checkpoint", self.kind.name()),
                out.message(self.kind),
            ));
        }
        // The document goes beside the image, so a restore works after the source is destroyed.
        let text = serde_json::to_vec(live.cell.document())
            .map_err(|e| failure("snapshot document", e))?;
        new_file(&dir.join("cell.json"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
            .map_err(|e| failure("write snapshot document", e))?;
        Ok(SnapshotRef {
            id: snap_id,
            source: id.to_string(),
            path: Some(dir),
        })
    }

    fn drop_snapshot_files(&self, snap_id: &str) -> bool {
        let dir = self.snapshots.lock().unwrap().remove(snap_id);
        let Some(dir) = dir else { return false };
        let _ = fs::remove_dir_all(&dir);
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        self.remove_root_if_unused();
        true
    }

    pub(crate) fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        self.caps.require(Capability::Snapshot)?;
        if self.drop_snapshot_files(&snap.id) {
            Ok(())
        } else {
            Err(snapshot_not_found(snap))
        }
    }

    pub(crate) async fn restore(
        self: &Arc<Self>,
        snap: &SnapshotRef,
        new_id: &str,
    ) -> Result<CellHandle, CellError> {
        self.caps.require(Capability::Snapshot)?;
        let dir = self
            .snapshots
            .lock()
            .unwrap()
            .get(&snap.id)
            .cloned()
            .ok_or_else(|| snapshot_not_found(snap))?;
        // The source document is kept with the image, so a restore works after the source is gone.
        let cell = match self.cells.get(&snap.source) {
            Ok(source) => source.cell.with_id(new_id)?,
            Err(_) => {
                let text = fs::read_to_string(dir.join("cell.json"))
                    .map_err(|e| failure("read snapshot document", e))?;
                CellDocument::from_json(&text)?.admit()?.with_id(new_id)?
            }
        };
        let reservation = self.reserve(new_id)?;
        self.finish_create(reservation, &cell, Some(&dir)).await
    }

    pub(crate) async fn set_paused(&self, id: &str, pause: bool) -> Result<(), CellError> {
        let verb = if pause { "pause" } else { "resume" };
        let live = self.cells.get(id)?;
        if live.exited() {
            return Err(invalid_state(verb, "exited"));
        }
        if live.paused.load(Ordering::SeqCst) == pause {
            return Err(invalid_state(
                verb,
                if pause { "paused" } else { "running" },
            ));
        }
        let rt = self.rt()?;
        // runc's own v1 freeze gives up after about 250 ms under load (see `freezer`); its
        // resume, and v2 hosts, need no help.
        let v1_state = (pause && self.kind == RuntimeKind::Runc)
            .then(|| {
                live.host_pid
                    .and_then(|pid| freezer::v1_state_file(pid, &live.rid))
            })
            .flatten();
        if let Some(state) = v1_state {
            freezer::freeze(&state)
                .await
                .map_err(|e| failure(&format!("{} {verb}", self.kind.name()), e))?;
            live.paused.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let out = rt.run(&[verb, &live.rid]).await;
        if !out.ok {
            return Err(failure(
                &format!("{} {verb}", self.kind.name()),
                out.message(self.kind),
            ));
        }
        live.paused.store(pause, Ordering::SeqCst);
        Ok(())
    }
}
