//! Where a backend instance keeps things: container ids, the state root and its bundle, state and
//! snapshot dirs, each cell's cgroup dirs, and the footprint the residue checker looks for.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cellcheck_contract::{CellError, Footprint};

use crate::{failure, Inner};

pub(crate) fn mkdir_private(p: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// A new file only this user can read (captured output may hold secrets).
pub(crate) fn new_file(p: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
}

impl Inner {
    /// The runtime's container id for cell `id`: unique per backend instance.
    pub(crate) fn rid(&self, id: &str) -> String {
        format!("cc-{}-{id}", self.instance)
    }

    pub(crate) fn bundle_dir(&self, rid: &str) -> PathBuf {
        self.root.join("bundles").join(rid)
    }

    pub(crate) fn snapshot_parent(&self, rid: &str) -> PathBuf {
        self.root.join("snapshots").join(rid)
    }

    /// What the runtime keeps for a container under its `--root`.
    pub(crate) fn state_entries(&self, rid: &str) -> Vec<PathBuf> {
        self.kind.state_entries(&self.root.join("state"), rid)
    }

    pub(crate) fn cgroup_dirs(&self, rid: &str) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.join(rid)).collect()
    }

    pub(crate) fn footprint(&self, id: &str) -> Footprint {
        let rid = self.rid(id);
        let mut paths = vec![self.bundle_dir(&rid), self.snapshot_parent(&rid)];
        paths.extend(self.state_entries(&rid));
        Footprint {
            process_markers: vec![rid.clone()],
            cgroup_dirs: self.cgroup_dirs(&rid),
            paths,
            mount_markers: vec![rid],
            netns: vec![],
        }
    }

    /// Create the state root's `state` and `bundles` dirs. The caller holds `root_guard`.
    pub(crate) fn ensure_root(&self) -> Result<(), CellError> {
        for sub in ["state", "bundles"] {
            let p = self.root.join(sub);
            mkdir_private(&p).map_err(|e| failure(&format!("create {}", p.display()), e))?;
        }
        Ok(())
    }

    /// Remove the state root once no cell (of any state) and no snapshot is left in it.
    pub(crate) fn remove_root_if_unused(&self) {
        let _guard = self.root_guard.lock().unwrap();
        if self.cells.is_empty() {
            self.remove_root_if_empty();
        }
    }

    /// The removal itself; the caller holds `root_guard` (or is the backend's `Drop`).
    pub(crate) fn remove_root_if_empty(&self) {
        if !self.snapshots.lock().unwrap().is_empty() {
            return;
        }
        for sub in ["snapshots", "bundles", "state"] {
            let _ = fs::remove_dir(self.root.join(sub));
        }
        let _ = fs::remove_dir(&self.root);
        // The shared parent goes too when this was the last instance in it.
        if let Some(parent) = self.root.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}
