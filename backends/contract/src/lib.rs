//! The cellcheck contract: what every backend implements and what the conformance suite checks.
//!
//! # Semantics every backend must keep (the suite checks each)
//!
//! - [`Backend::create`] admits the document first ([`CellDocument::admit`]); a refused document
//!   creates nothing. A failed create leaves nothing behind (no process, cgroup, mount, file).
//! - A duplicate *live* id is refused with [`CellError::AlreadyExists`]; after destroy the same id
//!   can run again.
//! - Destroy of an unknown or already-destroyed id is [`CellError::NotFound`], never a panic; of two
//!   concurrent destroys of one cell exactly one succeeds.
//! - Destroy of a running cell kills every process of the cell, grandchildren and daemonized
//!   (double-forked, `setsid`) ones included, and removes every resource the cell held.
//! - The workload's env is exactly the declared set (order kept), its fds are exactly 0, 1 and 2,
//!   and its stdio is owned by the backend (never the caller's own).
//! - A program missing from the cell's root is reported by `create` as
//!   [`CellError::NotFound`] with [`ResourceKind::Program`], and nothing is left behind.
//! - A `run.workingDirectory` the cell's root does not have is reported by `create` as
//!   [`CellError::NotFound`] with [`ResourceKind::WorkingDirectory`] (the path as its id): nothing
//!   is left behind and the root is not written (the directory is never created in it). Admission
//!   cannot see the root, so this is an error of create, like a missing program.
//! - `run.timeoutMs` passing makes [`Backend::wait`] return [`CellError::DeadlineExceeded`]; the
//!   workload is killed, the cell stays listed until destroyed. `lifetime.ttlSeconds` passing
//!   makes the backend destroy the cell itself (a later destroy is `NotFound`).
//! - Where [`Capability::Hostname`] is supported, the cell's hostname is its id truncated to its
//!   first 64 bytes ([`AdmittedCell::hostname`]): ids may be up to 128 characters, a Linux
//!   hostname at most 64 bytes, and a valid long id must never be refused for it.
//! - [`Backend::capabilities`] does no I/O and returns the same answer every time it is called on
//!   the same value; an operation whose capability is unsupported returns
//!   [`CellError::Unsupported`].

pub mod drivers;
mod error;
pub mod spec;
pub mod table;
pub mod trace;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use error::{CellError, ResourceKind, Retry};
pub use spec::{AdmittedCell, CellDocument, EnvVar, Limits, OpenFiles, DEFAULT_OPEN_FILES};

/// Where the probe fixture sits inside every cell's root (fixture rootfs, initramfs).
pub const PROBE_PATH: &str = "/usr/bin/cellcheck-probe";

/// A capability a backend may or may not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Run another command in a live cell.
    Exec,
    /// The workload has a pid on the host, so `/proc/<pid>` can be inspected from outside.
    HostPid,
    /// Snapshot a running cell and restore it under a new id.
    Snapshot,
    /// Freeze a cell and thaw it.
    Pause,
    /// `limits.memoryMaxBytes` is enforced.
    MemoryLimit,
    /// `limits.pidsMax` is enforced.
    PidsLimit,
    /// `run.timeoutMs` is enforced.
    Timeout,
    /// `lifetime.ttlSeconds` is enforced by a reaper.
    Ttl,
    /// The cell has its own network namespace with loopback only.
    NetworkIsolation,
    /// The workload sees only its own processes.
    PidIsolation,
    /// The cell's hostname is its id, truncated to its first 64 bytes
    /// ([`AdmittedCell::hostname`]).
    Hostname,
    /// The workload holds no Linux capability: effective, permitted, inheritable, bounding and
    /// ambient sets are all empty.
    DropCapabilities,
    /// The workload runs with no_new_privs set.
    NoNewPrivs,
    /// A seccomp filter (mode 2) refuses the dangerous syscalls (mount, unshare of user or mount
    /// namespaces, keyctl, kexec, module loading, bpf, ptrace, reboot, syslog, ...).
    Seccomp,
    /// The root filesystem is read-only.
    ReadonlyRoot,
    /// `/proc`'s kernel interfaces are masked, and `/proc/sys`, `/proc/bus`, `/proc/fs`,
    /// `/proc/irq` and `/sys` are read-only.
    ProcMasking,
    /// `/dev` holds only the standard nodes and mknod is refused.
    MinimalDev,
    /// The cgroup tree the workload sees is its own (a cgroup namespace) or none at all.
    CgroupIsolation,
    /// `limits.openFiles` (or its documented default) is applied exactly.
    Rlimits,
    /// `limits.cpuMax` is enforced.
    CpuLimit,
    /// The cell's VMM process on the host (found by the cell id in its command line) holds no
    /// capability, runs with no_new_privs under a seccomp filter, in mount, net, ipc and uts
    /// namespaces and a cgroup of its own, the cgroup carrying memory and pids limits. Only a
    /// backend with a VMM process has it.
    VmmConfinement,
}

impl Capability {
    pub const ALL: [Capability; 21] = [
        Capability::Exec,
        Capability::HostPid,
        Capability::Snapshot,
        Capability::Pause,
        Capability::MemoryLimit,
        Capability::PidsLimit,
        Capability::Timeout,
        Capability::Ttl,
        Capability::NetworkIsolation,
        Capability::PidIsolation,
        Capability::Hostname,
        Capability::DropCapabilities,
        Capability::NoNewPrivs,
        Capability::Seccomp,
        Capability::ReadonlyRoot,
        Capability::ProcMasking,
        Capability::MinimalDev,
        Capability::CgroupIsolation,
        Capability::Rlimits,
        Capability::CpuLimit,
        Capability::VmmConfinement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Exec => "exec",
            Capability::HostPid => "host_pid",
            Capability::Snapshot => "snapshot",
            Capability::Pause => "pause",
            Capability::MemoryLimit => "memory_limit",
            Capability::PidsLimit => "pids_limit",
            Capability::Timeout => "timeout",
            Capability::Ttl => "ttl",
            Capability::NetworkIsolation => "network_isolation",
            Capability::PidIsolation => "pid_isolation",
            Capability::Hostname => "hostname",
            Capability::DropCapabilities => "drop_capabilities",
            Capability::NoNewPrivs => "no_new_privs",
            Capability::Seccomp => "seccomp",
            Capability::ReadonlyRoot => "readonly_root",
            Capability::ProcMasking => "proc_masking",
            Capability::MinimalDev => "minimal_dev",
            Capability::CgroupIsolation => "cgroup_isolation",
            Capability::Rlimits => "rlimits",
            Capability::CpuLimit => "cpu_limit",
            Capability::VmmConfinement => "vmm_confinement",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a capability is offered, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "support", rename_all = "snake_case")]
pub enum Support {
    Supported,
    Unsupported { reason: String },
}

/// A backend's capabilities: every [`Capability`] maps to a [`Support`]. Missing entries read as
/// unsupported with a generic reason, so a new capability never turns on by accident.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    entries: BTreeMap<Capability, Support>,
}

impl Capabilities {
    /// Everything supported.
    pub fn all() -> Self {
        let mut c = Capabilities::default();
        for cap in Capability::ALL {
            c.entries.insert(cap, Support::Supported);
        }
        c
    }

    pub fn with(mut self, cap: Capability) -> Self {
        self.entries.insert(cap, Support::Supported);
        self
    }

    pub fn without(mut self, cap: Capability, reason: impl Into<String>) -> Self {
        self.entries.insert(
            cap,
            Support::Unsupported {
                reason: reason.into(),
            },
        );
        self
    }

    pub fn support(&self, cap: Capability) -> Support {
        self.entries
            .get(&cap)
            .cloned()
            .unwrap_or_else(|| Support::Unsupported {
                reason: format!("backend does not declare {cap}"),
            })
    }

    pub fn has(&self, cap: Capability) -> bool {
        matches!(self.support(cap), Support::Supported)
    }

    /// `Ok(())` when supported, else [`CellError::Unsupported`]: the one-liner for operations.
    pub fn require(&self, cap: Capability) -> Result<(), CellError> {
        if self.has(cap) {
            Ok(())
        } else {
            Err(CellError::Unsupported { capability: cap })
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Capability, Support)> + '_ {
        Capability::ALL.into_iter().map(|c| (c, self.support(c)))
    }
}

/// The answer of a functional availability check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Availability {
    Available {
        /// What was run and seen, e.g. "runsc 20220222.0: trivial bundle exited 0 in 310 ms".
        evidence: String,
    },
    Unavailable {
        /// Why, e.g. "runsc: not found" or "kvm: guest did not boot within 20 s".
        reason: String,
    },
}

impl Availability {
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available { .. })
    }
}

/// How a workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Termination {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    /// Killed because it went past `limits.memoryMaxBytes` (distinct from a plain SIGKILL).
    OutOfMemory,
}

/// The end of a workload or an exec: how it ended, and what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReport {
    pub termination: Termination,
    #[serde(with = "bytes_as_string")]
    pub stdout: Vec<u8>,
    #[serde(with = "bytes_as_string")]
    pub stderr: Vec<u8>,
}

impl ExitReport {
    pub fn code(&self) -> Option<i32> {
        match self.termination {
            Termination::Exited { code } => Some(code),
            _ => None,
        }
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// What `create` (or `restore`) hands back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellHandle {
    pub id: String,
    /// The workload's pid on the host, where [`Capability::HostPid`] is supported.
    pub host_pid: Option<u32>,
}

/// Another command in a live cell. It gets exactly `env`, like the workload does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<EnvVar>,
    pub timeout_ms: Option<u64>,
}

/// The longest exec timeout accepted (30 days): far past any deadline a caller means, and well
/// inside what every runtime's clock arithmetic can add to "now".
pub const MAX_EXEC_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;

impl ExecRequest {
    /// The exec's admission, the same rules as a cell's `run`: argv non-empty, no empty or NUL
    /// strings; env names non-empty without `=` or NUL and not repeated, values without NUL;
    /// `timeout_ms` in `1..=`[`MAX_EXEC_TIMEOUT_MS`]. A broken rule is
    /// [`CellError::InvalidSpec`] naming the field (`exec.argv[1]`, `exec.env[0].name`,
    /// `exec.timeoutMs`, ...). Every backend calls it before it runs anything.
    pub fn validate(&self) -> Result<(), CellError> {
        if self.argv.is_empty() {
            return Err(CellError::invalid("exec.argv", "must not be empty"));
        }
        for (i, a) in self.argv.iter().enumerate() {
            let why = if a.is_empty() {
                "must not be empty"
            } else if a.contains('\0') {
                "must not contain NUL"
            } else {
                continue;
            };
            return Err(CellError::invalid(format!("exec.argv[{i}]"), why));
        }
        for (i, e) in self.env.iter().enumerate() {
            let name_why = if e.name.is_empty() {
                Some("must not be empty".to_string())
            } else if e.name.contains('=') {
                Some("must not contain '='".to_string())
            } else if e.name.contains('\0') {
                Some("must not contain NUL".to_string())
            } else if self.env[..i].iter().any(|p| p.name == e.name) {
                Some(format!("duplicate name {:?}", e.name))
            } else {
                None
            };
            if let Some(why) = name_why {
                return Err(CellError::invalid(format!("exec.env[{i}].name"), why));
            }
            if e.value.contains('\0') {
                return Err(CellError::invalid(
                    format!("exec.env[{i}].value"),
                    "must not contain NUL",
                ));
            }
        }
        match self.timeout_ms {
            Some(0) => Err(CellError::invalid(
                "exec.timeoutMs",
                "must be greater than zero",
            )),
            Some(t) if t > MAX_EXEC_TIMEOUT_MS => Err(CellError::invalid(
                "exec.timeoutMs",
                format!("{t} ms exceeds the maximum of {MAX_EXEC_TIMEOUT_MS} ms (30 days)"),
            )),
            _ => Ok(()),
        }
    }
}

/// What destroy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownReport {
    pub id: String,
    /// Whether the workload was still running and had to be killed.
    pub killed_running: bool,
    /// How many cells the backend still tracks after this destroy.
    pub remaining_cells: usize,
}

/// A snapshot a backend took; restore it into a new id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub id: String,
    /// The cell it was taken from.
    pub source: String,
    /// Where its files are, where it has files on the host.
    pub path: Option<PathBuf>,
}

/// Everything on the host that belongs to one cell, so the residue checker can look for it
/// after destroy. A backend lists what it may create; the checker reports what still exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Any process whose environ or cmdline contains one of these byte strings belongs to the cell
    /// (e.g. the runtime's container id, a marker env var value the scenario declared).
    pub process_markers: Vec<String>,
    /// Cgroup directories the cell uses (absolute paths under /sys/fs/cgroup).
    pub cgroup_dirs: Vec<PathBuf>,
    /// Files and directories the backend keeps for the cell (state, bundles, sockets, images).
    pub paths: Vec<PathBuf>,
    /// Any mount whose mount point or source contains one of these strings belongs to the cell.
    pub mount_markers: Vec<String>,
    /// Named network namespaces (`/run/netns/NAME`).
    pub netns: Vec<String>,
}

/// A sandbox backend. All methods take `&self`: backends are shared across concurrent trials.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short stable name, used in trial names (`{backend}::{family}::{scenario}`).
    fn name(&self) -> &str;

    /// Pure: no I/O, the same answer at listing time and at run time.
    fn capabilities(&self) -> Capabilities;

    /// A functional check: can this backend run a cell on this host right now?
    async fn preflight(&self) -> Availability;

    /// Facts recorded in every result of this backend (e.g. `accelerator = tcg`, runtime version).
    /// Pure, like [`Backend::capabilities`].
    fn attributes(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// Admit the document and start its workload.
    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError>;

    /// Wait for the workload to end (enforcing `run.timeoutMs`). Waiting again returns the same report.
    async fn wait(&self, id: &str) -> Result<ExitReport, CellError>;

    /// Kill everything of the cell and remove every resource it held.
    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError>;

    /// What on the host belongs to the cell `id` (known before create, so a failed create can be
    /// checked too).
    fn footprint(&self, id: &str) -> Footprint;

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        let _ = (id, req);
        Err(CellError::Unsupported {
            capability: Capability::Exec,
        })
    }

    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        let _ = id;
        Err(CellError::Unsupported {
            capability: Capability::Snapshot,
        })
    }

    /// Start a new cell `new_id` from a snapshot; it continues where the snapshot was taken.
    async fn restore(&self, snap: &SnapshotRef, new_id: &str) -> Result<CellHandle, CellError> {
        let _ = (snap, new_id);
        Err(CellError::Unsupported {
            capability: Capability::Snapshot,
        })
    }

    /// Remove a snapshot's files.
    async fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        let _ = snap;
        Err(CellError::Unsupported {
            capability: Capability::Snapshot,
        })
    }

    async fn pause(&self, id: &str) -> Result<(), CellError> {
        let _ = id;
        Err(CellError::Unsupported {
            capability: Capability::Pause,
        })
    }

    async fn resume(&self, id: &str) -> Result<(), CellError> {
        let _ = id;
        Err(CellError::Unsupported {
            capability: Capability::Pause,
        })
    }

    /// Ids of the cells this backend tracks now.
    async fn list(&self) -> Vec<String>;
}

mod bytes_as_string {
    //! Captured output is bytes; JSON carries it as a string (lossy for invalid UTF-8 is not
    //! acceptable, so non-UTF-8 output is carried as an array of numbers).
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(t) => Repr::Text(t.to_string()).serialize(s),
            Err(_) => Repr::Bytes(b.to_vec()).serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::Text(t) => t.into_bytes(),
            Repr::Bytes(b) => b,
        })
    }
}

#[cfg(test)]
mod tests;
