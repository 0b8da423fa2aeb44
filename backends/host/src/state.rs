//! The state directories: one per cell (`<state_root>/<id>`: config, captures, the root's mount
//! point), under a state root that is made on first use and removed once empty, race-free
//! against other instances and processes that share its parents.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::lock;

/// Where instances keep their state by default (`<base>/<pid>-<random>/<cell-id>`).
pub const DEFAULT_STATE_BASE: &str = "/run/cellcheck/host";

/// One backend instance's state root.
pub(crate) struct StateRoot {
    root: PathBuf,
    /// Parents of the root this instance created (outermost first).
    made_parents: Mutex<Vec<PathBuf>>,
}

impl StateRoot {
    pub(crate) fn new(root: PathBuf) -> Self {
        StateRoot {
            root,
            made_parents: Mutex::new(Vec::new()),
        }
    }

    /// The cell's state directory (exists while the cell does).
    pub(crate) fn cell_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Create the cell's state directory and the state root above it (mode 0700), remembering
    /// which missing parents of the root we made.
    ///
    /// The state root and its parents are removed once empty, by this instance and by others
    /// sharing a parent (other processes, other backends under the same base), so our mkdir of
    /// a directory may find its parent just removed (ENOENT). Then we walk again from the top:
    /// the same protocol as the cgroup parents (`CellDir::create`). Once the cell's directory
    /// exists, its parents are not empty and stay.
    pub(crate) fn make_cell_dir(&self, dir: &Path) -> io::Result<()> {
        const MAX_WALKS: u32 = 1000;
        let mut made = lock(&self.made_parents);
        let mut missing = Vec::new();
        let mut p = self.root.parent();
        while let Some(d) = p {
            if d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            p = d.parent();
        }
        let mut walks = 1;
        loop {
            let r = fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.root)
                .and_then(|()| fs::DirBuilder::new().mode(0o700).create(dir));
            match r {
                Err(e) if e.kind() == io::ErrorKind::NotFound && walks < MAX_WALKS => walks += 1,
                r => break r?,
            }
        }
        for d in missing.into_iter().rev() {
            if !made.contains(&d) {
                made.push(d);
            }
        }
        Ok(())
    }

    /// Remove the state root if it is empty, then the parents we made and the default base
    /// while they are empty. Safe at any time: a directory in use is not empty, and a create
    /// racing the removal walks again (see [`StateRoot::make_cell_dir`]).
    pub(crate) fn remove_if_empty(&self) {
        if fs::remove_dir(&self.root).is_err() {
            return;
        }
        // Parents go only if we made them and they are empty (another instance may use them).
        for d in lock(&self.made_parents).iter().rev() {
            if fs::remove_dir(d).is_err() {
                break;
            }
        }
        // The default base is every instance's: whichever instance ends last removes it.
        if self.root.parent() == Some(Path::new(DEFAULT_STATE_BASE))
            && fs::remove_dir(DEFAULT_STATE_BASE).is_ok()
        {
            let _ = fs::remove_dir(
                Path::new(DEFAULT_STATE_BASE)
                    .parent()
                    .unwrap_or(Path::new("/")),
            );
        }
    }
}

/// Remove what a cell kept on disk. Not recursive on purpose: the root mount point must be an
/// empty directory on the host (mounts live in the cell's namespace); if it is not, something
/// leaked and deleting through it could reach the shared rootfs.
pub(crate) fn remove_cell_dir(dir: &Path) -> io::Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir(&p).map_err(|err| {
                io::Error::new(err.kind(), format!("remove {}: {err}", p.display()))
            })?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    fs::remove_dir(dir)
}
