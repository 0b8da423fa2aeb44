//! A deliberately broken backend: wraps a working one and injects exactly one fault, so the
//! suite's self-tests can prove each scenario catches the defect it exists for.
//!
//! Whatever a fault leaks is recorded here, and [`FaultyBackend::cleanup`] removes it by the pid
//! or path it recorded, never by name.
//!
//! `leaks.rs` owns what the leaking faults make and its cleanup, `rewrite.rs` the faults that
//! rewrite a document or a report, `backend.rs` the `Backend` implementation that applies them.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::sync::{Arc, Mutex};

use cellcheck_contract::{Backend, ExitReport};

mod backend;
mod leaks;
mod rewrite;

use leaks::Made;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// On create, also start a host process carrying the cell's marker; destroy never kills it.
    LeakProcess,
    /// The workload also gets the harness's ambient canary var.
    LeakAmbientEnv,
    /// The workload gets an extra fd 7.
    LeakFd,
    /// `wait` reports exit code + 1.
    MisreportExit,
    /// Create makes an extra cgroup dir, listed in the footprint, that destroy never removes.
    SkipCgroupRemoval,
    /// Create writes a state file, listed in the footprint, that destroy never removes.
    LeaveStateFile,
    /// A second destroy of the same id panics instead of returning NotFound.
    PanicOnDoubleDestroy,
    /// `wait` never returns (a hung backend).
    HangOnWait,
    /// Create makes a cgroup dir named after the cell that the footprint does not list.
    UndeclaredCgroupDir,
    /// Create writes a file named after the cell that the footprint does not list.
    UndeclaredFile,
    /// Create mounts a tmpfs on a dir named after the cell; the footprint has no mount marker.
    UndeclaredMount,
    /// Create adds a named netns after the cell; the footprint lists none.
    UndeclaredNetns,
    /// Create starts a helper process with no marker, no id, an empty env; never killed.
    UnmarkedHelper,
    /// Create starts a short helper and never reaps it: a zombie child of the harness.
    Zombie,
    /// Destroy returns Ok at once and does the real destroy a moment later.
    LateKill,
    /// Create writes the declared secrets into a file whose name says nothing of the cell.
    SecretToFile,
    /// Create writes a file named after the cell into the rootfs the backend was given.
    WriteSharedRootfs,
    /// Create makes `/work` in the rootfs the backend was given, as a runtime creating a missing
    /// working directory before it makes the root read-only: a path that names no cell.
    CreateMissingCwd,
    /// Admission too strict: ids over 64 bytes and non-ASCII argv or env values are refused.
    AdmissionTooStrict,
    /// Admission too lax: a timeout over the TTL, a zero TTL or a duplicate env name is "repaired"
    /// and the cell created.
    AdmissionTooLax,
    /// A wrapper shell folds exit codes: a real exit 129..=192 is reported as death by signal N-128
    /// (the workload's and an exec's, as a runtime's `exec` exit status does).
    FoldExitAsSignal,
    /// The reverse: death by signal N is reported as exit 128+N.
    FoldSignalAsExit,
    /// Captured output goes through a lossy UTF-8 conversion.
    MangleOutput,
    /// stderr is appended to stdout (one pipe for both).
    MergeStreams,
    /// A second wait returns the termination but empty captures.
    ForgetOutputOnRewait,
    /// `timeoutMs` is enforced only while someone waits.
    TimeoutOnlyWhileWaiting,
    /// A document with a timeout loses its TTL (one field overwrites the other).
    TtlDroppedWithTimeout,
    /// With several cells live, `wait` answers with the report of the cell created before.
    CrossTalk,
    /// Exec gets the harness's ambient canary var too.
    ExecAmbientEnv,
    /// Exec gets an extra fd 7.
    ExecLeaksFd,
    /// Exec reports exit code + 1 and any death by signal as SIGKILL.
    ExecMisreportEnd,
    /// Concurrent execs share one report slot: each gets the previous exec's report.
    ExecSharedReport,
    /// Exec's own timeout is ignored.
    ExecIgnoresTimeout,
    /// Exec into a cell whose workload ended is an untyped backend failure.
    ExecAfterEndUntyped,
    /// Pause and resume answer Ok and do nothing.
    PauseNoop,
    /// `run.workingDirectory` is dropped: every workload starts at `/`.
    IgnoreWorkingDirectory,
    /// A `run.workingDirectory` the root lacks is dropped: that workload starts at `/` instead of
    /// create failing (a declared directory the root has is kept).
    MissingCwdStartsAtRoot,
    /// A `run.workingDirectory` the root lacks is made in the rootfs the backend was given before
    /// the cell starts, as runc and runsc do: create succeeds and the root is written.
    MakeMissingCwd,
    /// `capabilities()` drops Snapshot on every other call.
    CapabilitiesUnstable,
    /// Pause is declared unsupported, and calling it is an untyped backend failure.
    UnsupportedUntyped,
    /// The backend forgot to harden: it wraps a backend whose cells keep their capabilities and
    /// run without no_new_privs, seccomp filter or cgroup namespace, yet claims all of them.
    /// Needs an unhardened inner backend ([`Fault::needs_unhardened_inner`]).
    Unhardened,
    /// The workload finds an extra device node in `/dev` (made before it starts, as a backend
    /// that passes a host device through would). Needs an unhardened inner backend.
    ExtraDevice,
    /// The declared `limits.openFiles` is dropped before the inner backend sees the document, so
    /// the default is applied instead.
    DropOpenFiles,
    /// The declared `memoryMaxBytes`, `pidsMax` and `cpuMax` are dropped before the inner backend
    /// sees the document, while the backend still claims to enforce them.
    DropLimits,
    /// The workload's root filesystem is writable while the backend claims a read-only root: it
    /// runs in a writable overlay of the cell's root (upper layer in the cell's own `/tmp`, so
    /// nothing reaches the shared rootfs). Needs an unhardened inner backend.
    WritableRoot,
    /// The backend claims its VMM process is confined while the process running the cell on the
    /// host (the host backend's init, which names the cell id) keeps its capabilities and runs
    /// without no_new_privs or a seccomp filter.
    UnconfinedVmm,
    /// Create reports the pid of the process that launched the workload (the cell's init) as
    /// the workload's host pid, as a backend handing out its launcher's pid would.
    WrongHostPid,
}

/// The node [`Fault::ExtraDevice`] adds to the cell's `/dev` (a copy of `null`, harmless).
pub const EXTRA_DEVICE: &str = "cellcheck-extra";

impl Fault {
    /// The fault shows only over a backend that does not harden its cells (the host backend with
    /// `privileged`): a hardened cell could neither keep capabilities, make a device node nor
    /// mount an overlay.
    pub fn needs_unhardened_inner(self) -> bool {
        matches!(
            self,
            Fault::Unhardened | Fault::ExtraDevice | Fault::WritableRoot
        )
    }
}

pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    fault: Fault,
    name: String,
    leaked: Mutex<Vec<Child>>,
    /// Paths and netns the undeclared faults made, removed by [`FaultyBackend::cleanup`].
    made: Mutex<Vec<Made>>,
    /// Destroys [`Fault::LateKill`] still has to do.
    late: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    destroyed: Mutex<BTreeSet<String>>,
    created: Mutex<Vec<String>>,
    /// [`Fault::TimeoutOnlyWhileWaiting`]: each cell's deadline, enforced by `wait` only.
    deadlines: Mutex<BTreeMap<String, (std::time::Instant, u64)>>,
    /// [`Fault::TimeoutOnlyWhileWaiting`]: cells the fault killed at their deadline.
    timed_out: Mutex<BTreeSet<String>>,
    /// [`Fault::ForgetOutputOnRewait`]: cells waited once.
    waited: Mutex<BTreeSet<String>>,
    /// [`Fault::ExecSharedReport`]: the one report slot.
    exec_slot: Mutex<Option<ExitReport>>,
    /// [`Fault::CapabilitiesUnstable`]: calls so far.
    calls: std::sync::atomic::AtomicUsize,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>, fault: Fault) -> Self {
        let name = format!("faulty-{}", inner.name());
        FaultyBackend {
            inner,
            fault,
            name,
            leaked: Mutex::new(Vec::new()),
            made: Mutex::new(Vec::new()),
            late: Mutex::new(Vec::new()),
            destroyed: Mutex::new(BTreeSet::new()),
            created: Mutex::new(Vec::new()),
            deadlines: Mutex::new(BTreeMap::new()),
            timed_out: Mutex::new(BTreeSet::new()),
            waited: Mutex::new(BTreeSet::new()),
            exec_slot: Mutex::new(None),
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// Pids of the processes [`Fault::LeakProcess`] started.
    pub fn leaked_pids(&self) -> Vec<u32> {
        self.leaked.lock().unwrap().iter().map(|c| c.id()).collect()
    }
}
