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
    fn names(&self) -> impl Iterator<Item = &str> {
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

/// Whether `path` (a file of at most [`SECRET_READ_MAX`] bytes) contains one of `secrets`.
pub(super) fn file_holds(path: &Path, secrets: &[String]) -> bool {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::new();
    if f.take(SECRET_READ_MAX).read_to_end(&mut buf).is_err() {
        return false;
    }
    secrets.iter().any(|s| contains(&buf, s.as_bytes()))
}

/// Files of `after` that are new or changed since `before` and hold one of `secrets`.
pub fn files_with_secrets(before: &Snapshot, after: &Snapshot, secrets: &[String]) -> Vec<PathBuf> {
    if secrets.iter().all(|s| s.is_empty()) {
        return Vec::new();
    }
    after
        .files
        .iter()
        .filter(|(p, m)| {
            m.mode & 0o170000 == 0o100000
                && m.size > 0
                && before.files.get(*p) != Some(*m)
                && file_holds(p, secrets)
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// The per-trial check: everything in `after` that mentions one of `cells`, as
/// `(cell, leftover)`. `before` is the snapshot taken when the trial started (for the secret
/// search, which reads only files new or changed since then).
pub fn scoped(cells: &[Needles], before: &Snapshot, after: &Snapshot) -> Vec<(String, Leftover)> {
    let mut out = Vec::new();
    let me = std::process::id();
    for c in cells {
        let mut push = |l: Leftover| out.push((c.cell.clone(), l));
        for p in after.procs.values() {
            if p.state == 'Z' && p.ppid == me && c.host_pids.contains(&(p.pid, p.start)) {
                push(Leftover::Zombie { pid: p.pid });
            } else if p.runnable() {
                if let Some(why) = c.process_reason(p) {
                    push(Leftover::Process {
                        proc_: p.describe(),
                        why,
                    });
                }
            }
        }
        for d in &after.cgroups {
            if c.mentioned_in(&d.to_string_lossy()).is_some() {
                push(Leftover::CgroupDir(d.clone()));
            }
        }
        for m in &after.mounts {
            if c.mentioned_in(m).is_some() {
                push(Leftover::Mount(m.clone()));
            }
        }
        for n in &after.netns {
            if c.mentioned_in(n).is_some() {
                push(Leftover::Netns(n.clone()));
            }
        }
        for l in &after.loops {
            if c.mentioned_in(l).is_some() {
                push(Leftover::Loop(l.clone()));
            }
        }
        // Only the outermost path of a leftover tree: its contents add nothing.
        let mut last: Option<&PathBuf> = None;
        for p in after.files.keys() {
            if last.is_some_and(|l| p.starts_with(l)) {
                continue;
            }
            if c.mentioned_in(&p.to_string_lossy()).is_some() {
                push(Leftover::File(p.clone()));
                last = Some(p);
            }
        }
        for p in files_with_secrets(before, after, &c.secrets) {
            push(Leftover::Secret { path: p });
        }
    }
    out
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
