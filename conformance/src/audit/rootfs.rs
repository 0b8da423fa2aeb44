//! The rootfs part of the window: the built rootfs and each backend's private copy, compared
//! before the window's first trial and after its last.

use super::*;

/// Every entry under `root` (paths, sizes, modes, mtimes; symlinks not followed).
pub fn walk_tree(root: &Path) -> BTreeMap<PathBuf, FileMeta> {
    let mut out = BTreeMap::new();
    if root.is_dir() {
        walk_files(root, 64, &mut out, &BTreeSet::new());
    }
    out
}

/// What changed between two walks of a root: added, removed, changed entries, each described with
/// its path (a directory whose only change is the mtime an added or removed child gave it is left
/// out: the child says it).
pub fn rootfs_diff(
    before: &BTreeMap<PathBuf, FileMeta>,
    after: &BTreeMap<PathBuf, FileMeta>,
) -> Vec<(PathBuf, String)> {
    let moved = |p: &PathBuf| {
        after.keys().chain(before.keys()).any(|c| {
            c.parent() == Some(p.as_path()) && before.contains_key(c) != after.contains_key(c)
        })
    };
    let mut out = Vec::new();
    for (p, m) in after {
        match before.get(p) {
            None => out.push((p.clone(), format!("{} added", p.display()))),
            Some(b) if b != m => {
                let dir = m.mode & 0o170000 == 0o040000;
                let only_mtime = b.size == m.size && b.mode == m.mode;
                if !(dir && only_mtime && moved(p)) {
                    let mtime = if b.mtime_ns != m.mtime_ns {
                        ", modified"
                    } else {
                        ""
                    };
                    out.push((
                        p.clone(),
                        format!(
                            "{} changed (size {} -> {}, mode {:o} -> {:o}{mtime})",
                            p.display(),
                            b.size,
                            m.size,
                            b.mode,
                            m.mode
                        ),
                    ))
                }
            }
            Some(_) => {}
        }
    }
    for p in before.keys() {
        if !after.contains_key(p) {
            out.push((p.clone(), format!("{} removed", p.display())));
        }
    }
    out
}

/// The trial of the window whose cell `p` names, with that cell.
fn owner<'a>(trials: &'a [TrialRec], p: &Path) -> Option<(&'a TrialRec, &'a Needles)> {
    trials.iter().find_map(|t| {
        t.cells
            .iter()
            .find(|c| c.mentioned_in(&p.to_string_lossy()).is_some())
            .map(|c| (t, c))
    })
}

/// Rootfs changes of the window.
///
/// Each backend's private copy (see [`crate::roots`]): only that backend's cells run in it, so
/// any change fails it: named after the trial whose cell the path mentions, else after every
/// trial of the backend in the window (under nextest exactly one).
///
/// The built rootfs: no cell of a harness-built backend runs in it any more. A change whose path
/// mentions a cell of the window still fails that cell's trial (ids carry the trial's random
/// token, so that is exact). Any other change is only a warning: the built tree is still shared
/// by whatever is not handed a copy (a backend an outside suite builds from the fixtures dir
/// itself, a run of another checkout using `CELLCHECK_FIXTURES_DIR`), and a fixture rebuild by
/// any process swaps the whole tree; none of these leaves a record that would tell whose it is.
pub(super) fn rootfs_changes(
    before: &Snapshot,
    after: &Snapshot,
    trials: &[TrialRec],
    others: &BTreeSet<String>,
    rep: &mut WindowReport,
) {
    let made = crate::roots::all();
    for (backend, now) in &after.copies {
        let Some(was) = before
            .copies
            .get(backend)
            .or_else(|| made.get(backend).map(|c| &c.made))
        else {
            continue;
        };
        let mine: Vec<&str> = trials
            .iter()
            .filter(|t| &t.backend == backend)
            .map(|t| t.name.as_str())
            .collect();
        for (p, what) in rootfs_diff(was, now) {
            let l = Leftover::Rootfs(what);
            let line = match owner(trials, &p) {
                Some((t, c)) => format!(
                    "{l} in the private rootfs copy of backend {backend} (cell {}, trial {})",
                    c.cell, t.name
                ),
                None if mine.is_empty() => format!(
                    "{l} in the private rootfs copy of backend {backend}, which only its cells \
                     use (no trial of it ran in this window)"
                ),
                None => format!(
                    "{l} in the private rootfs copy of backend {backend}, which only its cells \
                     use (trial{} of it in this window: {})",
                    if mine.len() == 1 { "" } else { "s" },
                    mine.join(", ")
                ),
            };
            rep.backends.insert(backend.clone());
            rep.leftovers.entry(backend.clone()).or_default().push(line);
        }
    }
    let mut suspects: BTreeSet<&str> = rep.backends.iter().map(String::as_str).collect();
    suspects.extend(others.iter().map(String::as_str));
    let suspects: Vec<&str> = suspects.into_iter().collect();
    for (p, what) in rootfs_diff(&before.rootfs, &after.rootfs) {
        let l = Leftover::Rootfs(what);
        match owner(trials, &p) {
            Some((t, c)) => rep
                .leftovers
                .entry(t.backend.clone())
                .or_default()
                .push(format!(
                    "{l} in the built rootfs (cell {}, trial {})",
                    c.cell, t.name
                )),
            None => rep.warnings.push(format!(
                "{l}: the built rootfs, which no harness-built backend runs cells in, changed \
                 while cells of {} were live (whose change it was cannot be told from here)",
                suspects.join(", ")
            )),
        }
    }
}
