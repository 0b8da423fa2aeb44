//! What names one cell's things ([`Needles`]), what the audit finds ([`Leftover`]), and the per-
//! trial check ([`scoped`]).

use super::*;

/// What identifies one cell's things: its id, its marker, its declared secrets, the backend's
/// process markers (e.g. a runtime's container id) and the host pids it was given.
#[derive(Debug, Clone, Default)]
pub struct Needles {
    pub cell: String,
    pub marker: String,
    pub secrets: Vec<String>,
    pub process_markers: Vec<String>,
    /// `(pid, start time)` of the host pids the backend reported.
    pub host_pids: Vec<(u32, u64)>,
}

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    // memmem, not a window-by-window compare: every process's environ is searched for every
    // needle of every cell, and that search was most of the audit's time.
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

impl Needles {
    /// Strings a resource's name may mention: the id and the backend's markers. (Ids are validated
    /// `[A-Za-z0-9._-]` and carry the trial's random token, so a mention is never an accident.)
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.cell.as_str())
            .chain(self.process_markers.iter().map(String::as_str))
            .filter(|s| s.len() >= 8)
    }

    /// Why process `p` belongs to this cell, if it does.
    pub fn process_reason(&self, p: &Proc) -> Option<String> {
        if self.host_pids.contains(&(p.pid, p.start)) {
            return Some("the host pid the backend reported".into());
        }
        if !self.marker.is_empty() {
            let exact = format!("{MARKER_VAR}={}\0", self.marker);
            if contains(&p.environ, exact.as_bytes())
                || contains(&p.cmdline, self.marker.as_bytes())
            {
                return Some(format!("marker {}", self.marker));
            }
        }
        for n in self.names() {
            if contains(&p.cmdline, n.as_bytes()) {
                return Some(format!("cmdline mentions {n}"));
            }
            if contains(&p.environ, n.as_bytes()) {
                return Some(format!("environ mentions {n}"));
            }
            if p.cgroup.contains(n) {
                return Some(format!("its cgroup mentions {n}"));
            }
        }
        for s in &self.secrets {
            if contains(&p.cmdline, s.as_bytes()) || contains(&p.environ, s.as_bytes()) {
                return Some("it holds a declared secret".into());
            }
        }
        None
    }

    /// Whether a resource name (path, mount line, netns) mentions this cell.
    pub fn mentioned_in(&self, s: &str) -> Option<String> {
        self.names().find(|n| s.contains(n)).map(String::from)
    }
}

/// One thing left on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    Process { proc_: String, why: String },
    Zombie { pid: u32 },
    CgroupDir(PathBuf),
    Mount(String),
    Netns(String),
    Link(String),
    Loop(String),
    File(PathBuf),
    Secret { path: PathBuf },
    Rootfs(String),
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Process { proc_, why } => write!(f, "process {proc_} still alive ({why})"),
            Leftover::Zombie { pid } => write!(f, "unreaped zombie child pid {pid} of the harness"),
            Leftover::CgroupDir(p) => write!(f, "cgroup dir {} still exists", p.display()),
            Leftover::Mount(m) => write!(f, "mount {m} still present"),
            Leftover::Netns(n) => write!(f, "netns {n} still exists (/run/netns/{n})"),
            Leftover::Link(l) => write!(f, "network interface {l} still exists"),
            Leftover::Loop(l) => write!(f, "loop device {l} still attached"),
            Leftover::File(p) => write!(f, "path {} still exists", p.display()),
            Leftover::Secret { path } => {
                write!(f, "file {} holds a declared secret", path.display())
            }
            Leftover::Rootfs(c) => write!(f, "rootfs changed: {c}"),
        }
    }
}

/// Files of `after` that are new or changed since `before` and hold one of `secrets`.
pub fn files_with_secrets(before: &Snapshot, after: &Snapshot, secrets: &[String]) -> Vec<PathBuf> {
    let cell = [Needles {
        secrets: secrets.to_vec(),
        ..Needles::default()
    }];
    files_with_secrets_of(&CellIndex::new(&cell), before, after)
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

/// The per-trial check: everything in `after` that mentions one of `cells`, as
/// `(cell, leftover)`. `before` is the snapshot taken when the trial started (for the secret
/// search, which reads only files new or changed since then).
pub fn scoped(cells: &[Needles], before: &Snapshot, after: &Snapshot) -> Vec<(String, Leftover)> {
    scoped_by_index(&CellIndex::new(cells), before, after)
        .into_iter()
        .map(|(i, l)| (cells[i].cell.clone(), l))
        .collect()
}

/// [`scoped`] with an index already built, as `(index of the cell, leftover)`: cell by cell, and
/// per cell in the order processes, cgroup dirs, mounts, netns, loop devices, files, secrets.
pub(super) fn scoped_by_index(
    ix: &CellIndex,
    before: &Snapshot,
    after: &Snapshot,
) -> Vec<(usize, Leftover)> {
    let mut per: Vec<Vec<Leftover>> = vec![Vec::new(); ix.cells.len()];
    let me = std::process::id();
    for p in after.procs.values() {
        for i in ix.candidates(p) {
            let c = &ix.cells[i];
            if p.state == 'Z' && p.ppid == me && c.host_pids.contains(&(p.pid, p.start)) {
                per[i].push(Leftover::Zombie { pid: p.pid });
            } else if p.runnable() {
                if let Some(why) = c.process_reason(p) {
                    per[i].push(Leftover::Process {
                        proc_: p.describe(),
                        why,
                    });
                }
            }
        }
    }
    for d in &after.cgroups {
        for i in ix.naming(&d.to_string_lossy()) {
            per[i].push(Leftover::CgroupDir(d.clone()));
        }
    }
    type Named<'s> = (&'s BTreeSet<String>, fn(String) -> Leftover);
    let named: [Named; 3] = [
        (&after.mounts, Leftover::Mount),
        (&after.netns, Leftover::Netns),
        (&after.loops, Leftover::Loop),
    ];
    for (set, what) in named {
        for m in set {
            for i in ix.naming(m) {
                per[i].push(what(m.clone()));
            }
        }
    }
    // Only the outermost path of a leftover tree: its contents add nothing.
    let mut last: Vec<Option<&PathBuf>> = vec![None; ix.cells.len()];
    for p in after.files.keys() {
        for i in ix.naming(&p.to_string_lossy()) {
            if last[i].is_some_and(|l| p.starts_with(l)) {
                continue;
            }
            per[i].push(Leftover::File(p.clone()));
            last[i] = Some(p);
        }
    }
    for (p, owners) in files_with_secrets_of(ix, before, after) {
        for i in owners {
            per[i].push(Leftover::Secret { path: p.clone() });
        }
    }
    per.into_iter()
        .enumerate()
        .flat_map(|(i, v)| v.into_iter().map(move |l| (i, l)))
        .collect()
}

/// Processes of cell `c` that can still run: what "destroy returned Ok" forbids.
pub fn runnable_of(c: &Needles) -> Vec<(Proc, String)> {
    let baseline = window().baseline();
    processes_since(baseline.as_deref().map(|b| &b.procs))
        .into_iter()
        .filter(|p| p.runnable())
        .filter_map(|p| c.process_reason(&p).map(|why| (p, why)))
        .collect()
}
