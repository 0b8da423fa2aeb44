//! Where a backend instance keeps things: container ids, the state root and its bundle, state and
//! snapshot dirs, each cell's cgroup dirs, and the footprint the residue checker looks for.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cellcheck_contract::{CellError, Footprint};
use sha2::{Digest, Sha256};

use crate::{failure, Inner};

/// How many leading characters of the cell id a container id shows.
const SHOWN_ID_CHARS: usize = 32;

/// `cc-<instance>-<the id's first characters>-<digest of the whole id>`: short whatever the id's
/// length (runsc names a file `<cid>_sandbox:<cid>.lock`, past NAME_MAX for a 128-byte id with
/// the whole id in it), distinct for distinct ids (the digest), readable (the shown prefix, which
/// also keeps the harness's `cc-<token>-` in it), and a safe path component for any `id`: a
/// footprint is asked for ids that admission refuses too, so only a leading run of
/// `[A-Za-z0-9._-]` is shown, never a `/`.
pub(crate) fn container_id(instance: &str, id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let shown: String = id
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(SHOWN_ID_CHARS)
        .collect();
    format!("cc-{instance}-{shown}-{hex}")
}

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
    /// The runtime's container id for cell `id`: unique per backend instance, see [`container_id`].
    pub(crate) fn rid(&self, id: &str) -> String {
        container_id(&self.instance, id)
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

#[cfg(test)]
mod tests {
    use super::container_id;

    #[test]
    fn container_ids_are_short_distinct_and_path_safe() {
        let long = "a".repeat(128);
        let rid = container_id("0123abcd", &long);
        // runsc's lock file `<cid>_sandbox:<cid>.lock` must fit NAME_MAX (255).
        assert!(2 * rid.len() + "_sandbox:.lock".len() <= 255, "{rid}");
        assert!(
            rid.starts_with(&format!("cc-0123abcd-{}-", "a".repeat(32))),
            "{rid}"
        );
        // Ids sharing their shown prefix stay apart; the same id is the same container id.
        let other = format!("{}b", "a".repeat(127));
        assert_ne!(rid, container_id("0123abcd", &other));
        assert_eq!(rid, container_id("0123abcd", &long));
        assert_ne!(rid, container_id("99999999", &long));
        // The harness's `cc-<token>-` prefix of an id stays visible.
        assert!(container_id("i", "cc-tok12345-x-01").contains("cc-tok12345-x-01-"));
        // Whatever the id, the container id is one path component of safe characters, never
        // `.` or `..` (it starts with `cc-`).
        for bad in ["../../etc", "a/b", "ü", "", ".hidden"] {
            let r = container_id("i", bad);
            assert!(
                r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
                "{bad:?} -> {r}"
            );
        }
    }
}
