//! What the host backend and its in-cell init say to each other.
//!
//! The backend writes a cell's (or an exec's) configuration to a mode-0600 file in the cell's
//! state directory; the init reads it and removes it at once. Declared env values are secrets, so
//! they never appear on any command line. The init reports back through a status pipe (fd
//! [`STATUS_FD`]) one line per event ([`Status`]), and waits on [`SYNC_FD`] for a go byte so the
//! backend can move it into the cell's cgroups before anything of the cell runs.
//!
//! This crate's library part is plain data and parsing only, so the backend and the static init
//! share one definition of the format.

pub mod deny;

/// The init reads one byte from this fd before it starts anything.
pub const SYNC_FD: i32 = 3;
/// The init writes [`Status`] lines to this fd.
pub const STATUS_FD: i32 = 4;

/// A bind mount of a host path into the cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: String,
    /// Absolute path inside the cell.
    pub target: String,
    pub readonly: bool,
}

/// What the init needs to start a cell (`cell` mode) or run a command in one (`exec` mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub argv: Vec<String>,
    /// `NAME=value`, in declared order.
    pub env: Vec<String>,
    pub cwd: String,
    /// `cell` mode: the cell's hostname.
    pub hostname: String,
    /// `cell` mode: the root to bind read-only.
    pub rootfs: String,
    /// `cell` mode: an empty directory (on the host) the new root is assembled on.
    pub newroot: String,
    /// `cell` mode: host paths bound into the cell after the standard mounts.
    pub binds: Vec<Bind>,
    /// `exec` mode: host pid of a process whose namespaces the command joins.
    pub target_pid: u32,
    /// `RLIMIT_NOFILE` (soft, hard) of the workload or command; unchanged when `None`.
    pub nofile: Option<(u64, u64)>,
    /// Keep capabilities, skip no_new_privs, the seccomp filter and the cgroup namespace: only
    /// for a cell that itself runs cells (nested), which its backend's configuration must ask for.
    /// Masked `/proc` paths, a read-only root and `/sys` still apply.
    pub privileged: bool,
}

/// One status line from the init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The cell's pid 1, as a host pid.
    Pid1(u32),
    /// The workload is forked and held before exec; its pid in the cell's pid namespace. The
    /// backend looks up its host pid, then writes one byte to [`SYNC_FD`] to let it go on.
    Forked(u32),
    /// The workload (or exec'd command) runs; its pid as seen by the one who forked it.
    Started(u32),
    Exited(i32),
    Signaled(i32),
    /// Setup failed: which step (`program`, `cwd`, `setup`), the errno, a message.
    Failed {
        step: String,
        errno: i32,
        message: String,
    },
}

impl Status {
    pub fn encode(&self) -> String {
        match self {
            Status::Pid1(p) => format!("P {p}\n"),
            Status::Forked(p) => format!("F {p}\n"),
            Status::Started(p) => format!("S {p}\n"),
            Status::Exited(c) => format!("X {c}\n"),
            Status::Signaled(s) => format!("K {s}\n"),
            Status::Failed {
                step,
                errno,
                message,
            } => {
                let clean: String = message
                    .chars()
                    .map(|c| if c == '\n' { ' ' } else { c })
                    .collect();
                format!("E {step} {errno} {clean}\n")
            }
        }
    }

    pub fn decode(line: &str) -> Option<Status> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (tag, rest) = line.split_once(' ')?;
        Some(match tag {
            "P" => Status::Pid1(rest.parse().ok()?),
            "F" => Status::Forked(rest.parse().ok()?),
            "S" => Status::Started(rest.parse().ok()?),
            "X" => Status::Exited(rest.parse().ok()?),
            "K" => Status::Signaled(rest.parse().ok()?),
            "E" => {
                let mut it = rest.splitn(3, ' ');
                let step = it.next()?.to_string();
                let errno = it.next()?.parse().ok()?;
                let message = it.next().unwrap_or("").to_string();
                Status::Failed {
                    step,
                    errno,
                    message,
                }
            }
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad init config: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

// The file is a sequence of NUL-terminated fields: a tag, then a fixed number of values for it.
// Admission forbids NUL in argv, env and paths, so no escaping is needed; encode refuses NUL anyway.

impl Config {
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        let mut put = |fields: &[&str]| -> Result<(), DecodeError> {
            for f in fields {
                if f.contains('\0') {
                    return Err(DecodeError(format!("field {:?} contains NUL", fields[0])));
                }
                out.extend_from_slice(f.as_bytes());
                out.push(0);
            }
            Ok(())
        };
        for a in &self.argv {
            put(&["argv", a])?;
        }
        for e in &self.env {
            put(&["env", e])?;
        }
        put(&["cwd", &self.cwd])?;
        put(&["hostname", &self.hostname])?;
        put(&["rootfs", &self.rootfs])?;
        put(&["newroot", &self.newroot])?;
        for b in &self.binds {
            let ro = if b.readonly { "ro" } else { "rw" };
            put(&["bind", &b.source, &b.target, ro])?;
        }
        put(&["target", &self.target_pid.to_string()])?;
        if let Some((soft, hard)) = self.nofile {
            put(&["nofile", &soft.to_string(), &hard.to_string()])?;
        }
        if self.privileged {
            put(&["privileged", "1"])?;
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Config, DecodeError> {
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError(e.to_string()))?;
        let body = text
            .strip_suffix('\0')
            .ok_or_else(|| DecodeError("missing final NUL".into()))?;
        let mut fields = body.split('\0');
        let mut c = Config::default();
        let next = |fields: &mut std::str::Split<'_, char>, tag: &str| {
            fields
                .next()
                .map(str::to_string)
                .ok_or_else(|| DecodeError(format!("{tag}: missing value")))
        };
        while let Some(tag) = fields.next() {
            match tag {
                "argv" => c.argv.push(next(&mut fields, tag)?),
                "env" => c.env.push(next(&mut fields, tag)?),
                "cwd" => c.cwd = next(&mut fields, tag)?,
                "hostname" => c.hostname = next(&mut fields, tag)?,
                "rootfs" => c.rootfs = next(&mut fields, tag)?,
                "newroot" => c.newroot = next(&mut fields, tag)?,
                "bind" => {
                    let source = next(&mut fields, tag)?;
                    let target = next(&mut fields, tag)?;
                    let readonly = match next(&mut fields, tag)?.as_str() {
                        "ro" => true,
                        "rw" => false,
                        other => return Err(DecodeError(format!("bind: mode {other:?}"))),
                    };
                    c.binds.push(Bind {
                        source,
                        target,
                        readonly,
                    });
                }
                "target" => {
                    c.target_pid = next(&mut fields, tag)?
                        .parse()
                        .map_err(|e| DecodeError(format!("target: {e}")))?
                }
                "nofile" => {
                    let mut n = || -> Result<u64, DecodeError> {
                        next(&mut fields, tag)?
                            .parse()
                            .map_err(|e| DecodeError(format!("nofile: {e}")))
                    };
                    c.nofile = Some((n()?, n()?));
                }
                "privileged" => c.privileged = next(&mut fields, tag)? == "1",
                other => return Err(DecodeError(format!("unknown field {other:?}"))),
            }
        }
        if c.argv.is_empty() {
            return Err(DecodeError("no argv".into()));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips() {
        let c = Config {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo a=b; exit 3".into()],
            env: vec!["A=1".into(), "EMPTY=".into(), "X=y=z".into()],
            cwd: "/tmp".into(),
            hostname: "cell-1".into(),
            rootfs: "/r o/fs".into(),
            newroot: "/state/root".into(),
            binds: vec![Bind {
                source: "/sys/fs/cgroup".into(),
                target: "/sys/fs/cgroup".into(),
                readonly: false,
            }],
            target_pid: 42,
            nofile: Some((200, 300)),
            privileged: true,
        };
        assert_eq!(Config::decode(&c.encode().unwrap()).unwrap(), c);
        let plain = Config {
            argv: vec!["/bin/true".into()],
            ..Config::default()
        };
        assert_eq!(Config::decode(&plain.encode().unwrap()).unwrap(), plain);
    }

    #[test]
    fn config_rejects_garbage() {
        assert!(Config::decode(b"argv\0/bin/true").is_err());
        assert!(Config::decode(b"what\0x\0").is_err());
        assert!(Config::decode(b"cwd\0/\0").is_err(), "no argv");
        assert!(Config::decode(b"bind\0/a\0/b\0maybe\0argv\0x\0").is_err());
        let bad = Config {
            argv: vec!["a\0b".into()],
            ..Config::default()
        };
        assert!(bad.encode().is_err());
    }

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Pid1(7),
            Status::Forked(3),
            Status::Started(2),
            Status::Exited(-1),
            Status::Signaled(15),
            Status::Failed {
                step: "program".into(),
                errno: 2,
                message: "no such\nfile".into(),
            },
        ] {
            let line = s.encode();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            let back = Status::decode(&line).unwrap();
            match (&s, &back) {
                (Status::Failed { message, .. }, Status::Failed { message: m2, .. }) => {
                    assert_eq!(m2, &message.replace('\n', " "))
                }
                _ => assert_eq!(back, s),
            }
        }
        assert_eq!(Status::decode("Q 1"), None);
        assert_eq!(Status::decode("X notanumber"), None);
    }
}
