//! Each backend's private copy of the fixture rootfs.
//!
//! The rootfs is read-only by contract, but a runtime may still write into it (e.g. creating a
//! missing working directory before it makes the root read-only). Were the built rootfs shared by
//! every backend and every test process, a change in it could not be pinned on anyone. So each
//! harness process hands each backend it builds from fixtures its own copy,
//! `<fixtures>/roots/<pid>-<start time>/<backend>/` (or under the directory [`DIR_VAR`] names), made the first time that backend is built in
//! the process. Nobody else runs cells in that copy, so any change in it is that backend's (see
//! the audit's window).
//!
//! The process removes its copies when it exits (an `atexit` handler, so every way a harness
//! ends normally is covered); a copy whose owner (pid and start time) is dead is removed by
//! [`reconcile`] at the next run's start and by `cargo xtask clean`. A live process's copies are
//! never touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use cellcheck_fixtures::Fixtures;

use crate::audit::{self, FileMeta};
use crate::ledger::Recovered;

/// One backend's copy, with what it held when it was made.
#[derive(Debug, Clone)]
pub struct Copy {
    pub root: PathBuf,
    /// Every entry of the copy right after it was made: the baseline of a window that opened
    /// before the copy existed.
    pub made: BTreeMap<PathBuf, FileMeta>,
}

static COPIES: Mutex<BTreeMap<String, Copy>> = Mutex::new(BTreeMap::new());
static CLEANUP: Once = Once::new();

fn copies() -> std::sync::MutexGuard<'static, BTreeMap<String, Copy>> {
    COPIES.lock().unwrap_or_else(|p| p.into_inner())
}

/// The variable naming another directory of copies. A test that kills a harness and checks that
/// the next run recovers its copies points both runs at a directory of its own: in the shared
/// one, any other test process starting at that moment may recover them first.
pub const DIR_VAR: &str = "CELLCHECK_ROOTS_DIR";

/// Where every process's copies are: `CELLCHECK_ROOTS_DIR`, else `<fixtures>/roots`.
pub fn dir() -> PathBuf {
    std::env::var_os(DIR_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cellcheck_fixtures::fixtures_dir().join("roots"))
}

/// This process's directory of copies.
fn own_dir() -> PathBuf {
    let (pid, start) = audit::me();
    dir().join(format!("{pid}-{start}"))
}

/// `fx` with the rootfs replaced by `backend`'s private copy, made now if this process has
/// none for it yet.
pub fn fixtures_for(backend: &str, fx: &Fixtures) -> Result<Fixtures, String> {
    let mut all = copies();
    if let Some(c) = all.get(backend) {
        return Ok(fx.clone().with_rootfs(&c.root));
    }
    if backend.is_empty() || backend.contains('/') || backend.starts_with('.') {
        return Err(format!(
            "backend name {backend:?} cannot name its rootfs copy's directory"
        ));
    }
    CLEANUP.call_once(|| {
        // SAFETY: registers a plain function; it only removes this process's own directory.
        unsafe { libc::atexit(remove_own_at_exit) };
    });
    let dest = own_dir().join(backend);
    let copied = cellcheck_fixtures::copy_rootfs(fx, &dest)
        .map_err(|e| format!("the private rootfs copy of backend {backend}: {e}"))?;
    all.insert(
        backend.to_string(),
        Copy {
            made: audit::walk_tree(&dest),
            root: dest,
        },
    );
    Ok(copied)
}

/// The rootfs copy `backend` was given in this process.
pub fn given(backend: &str) -> Option<PathBuf> {
    copies().get(backend).map(|c| c.root.clone())
}

/// Every copy of this process, by backend.
pub fn all() -> BTreeMap<String, Copy> {
    copies().clone()
}

/// `s` with any path of this process's copies replaced by the built rootfs it was copied from,
/// so what a backend's configuration names is the same in every process (the copies are
/// identical when made).
pub fn normalize(s: &str) -> String {
    let own = own_dir();
    let shared = cellcheck_fixtures::fixtures_dir().join("rootfs");
    let mut out = s.to_string();
    for c in copies().values() {
        if c.root.starts_with(&own) {
            out = out.replace(&*c.root.to_string_lossy(), &shared.to_string_lossy());
        }
    }
    out
}

/// Remove this process's copies (at its exit: nothing runs in them any more).
pub fn remove_own() {
    let own = own_dir();
    if own.exists() {
        if let Err(e) = std::fs::remove_dir_all(&own) {
            eprintln!(
                "cellcheck: cannot remove the rootfs copies {}: {e}",
                own.display()
            );
        }
    }
    copies().clear();
}

extern "C" fn remove_own_at_exit() {
    // Never unwind into libc.
    let _ = std::panic::catch_unwind(remove_own);
}

/// Remove the copies in `dir` whose owner process (pid and start time in the directory's name)
/// is dead: one [`Recovered`] per copy, naming its path. A directory whose name names no owner is
/// left alone and reported as not removed.
pub fn reconcile(dir: &Path) -> Vec<Recovered> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut owners: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    owners.sort();
    for owner in owners {
        let name = owner
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let parsed = name
            .split_once('-')
            .and_then(|(p, s)| Some((p.parse::<u32>().ok()?, s.parse::<u64>().ok()?)));
        let Some((pid, start)) = parsed else {
            out.push(Recovered {
                run: name.clone(),
                errors: vec![format!(
                    "{} names no owner process (<pid>-<start time>)",
                    owner.display()
                )],
                ..Recovered::default()
            });
            continue;
        };
        if audit::start_time(pid) == Some(start) {
            continue;
        }
        let mut kids: Vec<PathBuf> = std::fs::read_dir(&owner)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        kids.sort();
        for k in kids {
            let backend = k
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let mut r = Recovered {
                backend,
                run: name.clone(),
                ..Recovered::default()
            };
            match std::fs::remove_dir_all(&k) {
                Ok(()) => r.removed.push(format!("rootfs copy {}", k.display())),
                Err(e) => r.errors.push(format!("rootfs copy {}: {e}", k.display())),
            }
            out.push(r);
        }
        let _ = std::fs::remove_dir(&owner);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend's copy is made once per process, is what `given` names, and its path reads as
    /// the built rootfs in a configuration key.
    #[test]
    fn a_copy_is_made_once_and_normalized() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("rootfs");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/busybox"), b"x").unwrap();
        let fx = cellcheck_fixtures::Fixtures {
            dir: d.path().to_path_buf(),
            probe: d.path().join("probe"),
            host_init: d.path().join("init"),
            guest_agent: d.path().join("agent"),
            driver: d.path().join("driver"),
            busybox: src.join("bin/busybox"),
            rootfs: src,
        };
        let name = format!("unit-{}", crate::ids::random_token(6));
        let a = fixtures_for(&name, &fx).unwrap();
        let b = fixtures_for(&name, &fx).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rootfs, own_dir().join(&name));
        assert_eq!(given(&name), Some(a.rootfs.clone()));
        assert!(a.busybox.starts_with(&a.rootfs) && a.busybox.is_file());
        let shared = cellcheck_fixtures::fixtures_dir().join("rootfs");
        assert_eq!(
            normalize(&format!("root={}", a.rootfs.display())),
            format!("root={}", shared.display())
        );
        assert!(fixtures_for("a/b", &fx).is_err());
        std::fs::remove_dir_all(&a.rootfs).unwrap();
        copies().remove(&name);
    }

    /// A dead owner's copies are removed and reported by path; a live owner's (this process's)
    /// are kept.
    #[test]
    fn only_dead_owners_copies_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let (pid, start) = audit::me();
        let dead = d.path().join(format!("{pid}-{}", start + 1));
        let live = d.path().join(format!("{pid}-{start}"));
        for o in [&dead, &live] {
            std::fs::create_dir_all(o.join("host/bin")).unwrap();
            std::fs::write(o.join("host/bin/busybox"), b"x").unwrap();
            std::fs::create_dir_all(o.join("runc")).unwrap();
        }
        let found = reconcile(d.path());
        assert_eq!(found.len(), 2, "{found:?}");
        for (r, b) in found.iter().zip(["host", "runc"]) {
            assert_eq!(r.backend, b);
            assert_eq!(r.run, format!("{pid}-{}", start + 1));
            assert!(r.errors.is_empty(), "{r:?}");
            assert_eq!(
                r.removed,
                vec![format!("rootfs copy {}", dead.join(b).display())]
            );
            assert!(crate::ledger::describe(r).contains("rootfs copy"));
        }
        assert!(!dead.exists());
        assert!(live.join("host/bin/busybox").is_file());
        assert!(reconcile(d.path()).is_empty());
    }
}
