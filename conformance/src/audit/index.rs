//! Every needle of every cell searched at once: one automaton per comparison and one pass over
//! each haystack (a process's cmdline, environ and cgroup, a path, a mount line), instead of one
//! search per cell and needle. A trial with many cells made the per-needle search the audit's
//! largest cost.
//!
//! The index only proposes: a process is a candidate of a cell when one of the cell's needles
//! occurs in one of its haystacks (or it is a host pid the backend reported), and the cell's own
//! [`Needles::process_reason`] then decides and words the reason, as it did before. Every string
//! `process_reason` can match (the marker, also inside `CELLCHECK_MARKER=<marker>`, the names,
//! the secrets) is in the index, so no process it would blame is left out; resource names are
//! matched against [`Needles::names`] only, exactly what [`Needles::mentioned_in`] matches.

use aho_corasick::{AhoCorasick, AhoCorasickKind};

use super::*;

/// Needles of many owners (a cell's index in a slice), searched together.
pub struct NeedleIndex {
    ac: Option<AhoCorasick>,
    /// Pattern id → its owners: one pattern per distinct needle, so two cells sharing a needle
    /// (an id and the prefix of every id a trial minted) both hear of a match.
    owners: Vec<Vec<usize>>,
}

impl NeedleIndex {
    /// An index of `(owner, needle)`; empty needles match nothing, as in [`contains`].
    pub fn new<'a>(needles: impl IntoIterator<Item = (usize, &'a [u8])>) -> Self {
        let mut by: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
        for (o, n) in needles {
            if !n.is_empty() {
                let v = by.entry(n).or_default();
                if !v.contains(&o) {
                    v.push(o);
                }
            }
        }
        let ac = if by.is_empty() {
            None
        } else {
            // Standard match semantics, searched overlapping: every occurrence of every needle,
            // also one inside another's. An index serves one look at the host (a few hundred
            // short haystacks), so the automaton that is quickest to build is the cheapest.
            Some(
                AhoCorasick::builder()
                    .kind(Some(AhoCorasickKind::NoncontiguousNFA))
                    .build(by.keys())
                    .expect("an automaton of a few hundred needles"),
            )
        };
        NeedleIndex {
            ac,
            owners: by.into_values().collect(),
        }
    }

    /// Add to `out` the owners of every needle occurring in one of `hays` (each searched on its
    /// own, so no match spans two of them).
    pub fn owners_in(&self, hays: &[&[u8]], out: &mut BTreeSet<usize>) {
        let Some(ac) = &self.ac else { return };
        for h in hays.iter().filter(|h| !h.is_empty()) {
            for m in ac.find_overlapping_iter(*h) {
                out.extend(&self.owners[m.pattern().as_usize()]);
            }
        }
    }

    /// The owners of every needle occurring in `hay`.
    pub fn owners(&self, hay: &[u8]) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        self.owners_in(&[hay], &mut out);
        out
    }
}

/// The needles of a set of cells, indexed: what processes may belong to which cell, and which
/// cells a resource name mentions.
pub struct CellIndex<'a> {
    pub cells: &'a [Needles],
    /// Markers, names and secrets: what a process's cmdline, environ or cgroup may mention.
    procs: NeedleIndex,
    /// Names only: what a path, mount, netns or loop device may mention.
    names: NeedleIndex,
    /// `(pid, start)` → the cells that reported it as their host pid.
    host_pids: BTreeMap<(u32, u64), Vec<usize>>,
}

impl<'a> CellIndex<'a> {
    pub fn new(cells: &'a [Needles]) -> Self {
        let mut procs = Vec::new();
        let mut names = Vec::new();
        let mut host_pids: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
        for (i, c) in cells.iter().enumerate() {
            procs.push((i, c.marker.as_bytes()));
            for n in c.names() {
                procs.push((i, n.as_bytes()));
                names.push((i, n.as_bytes()));
            }
            procs.extend(c.secrets.iter().map(|s| (i, s.as_bytes())));
            for k in &c.host_pids {
                host_pids.entry(*k).or_default().push(i);
            }
        }
        CellIndex {
            cells,
            procs: NeedleIndex::new(procs),
            names: NeedleIndex::new(names),
            host_pids,
        }
    }

    /// The cells process `p` may belong to (to be confirmed by their `process_reason`), and those
    /// that reported it as their host pid.
    pub fn candidates(&self, p: &Proc) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        self.procs
            .owners_in(&[&p.cmdline, &p.environ, p.cgroup.as_bytes()], &mut out);
        if let Some(v) = self.host_pids.get(&(p.pid, p.start)) {
            out.extend(v);
        }
        out
    }

    /// Each cell that `p` belongs to, with the reason.
    pub fn owners_of(&self, p: &Proc) -> Vec<(usize, String)> {
        self.candidates(p)
            .into_iter()
            .filter_map(|i| self.cells[i].process_reason(p).map(|why| (i, why)))
            .collect()
    }

    /// The cells whose id or markers `name` mentions.
    pub fn naming(&self, name: &str) -> BTreeSet<usize> {
        self.names.owners(name.as_bytes())
    }
}

/// Files of `after` new or changed since `before` that hold a secret of one of `cells`, as
/// `(file, cells)`: each file read once whatever the number of cells.
pub(super) fn files_with_secrets_of(
    ix: &CellIndex,
    before: &Snapshot,
    after: &Snapshot,
) -> Vec<(PathBuf, BTreeSet<usize>)> {
    let secrets = NeedleIndex::new(
        ix.cells
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.secrets.iter().map(move |s| (i, s.as_bytes()))),
    );
    if secrets.ac.is_none() {
        return Vec::new();
    }
    after
        .files
        .iter()
        .filter(|(p, m)| {
            m.mode & 0o170000 == 0o100000 && m.size > 0 && before.files.get(*p) != Some(*m)
        })
        .filter_map(|(p, _)| {
            let owners = secrets.owners(&read_head(p)?);
            (!owners.is_empty()).then(|| (p.clone(), owners))
        })
        .collect()
}

/// The first [`SECRET_READ_MAX`] bytes of `path`.
fn read_head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(SECRET_READ_MAX).read_to_end(&mut buf).ok()?;
    Some(buf)
}
