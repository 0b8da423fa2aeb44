//! What a scenario sees ([`Ctx`]), what it returns ([`Failure`]), and how one trial runs it:
//! bounded in time, panics caught, every touched cell destroyed afterwards and checked for residue.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cellcheck_contract::{
    Backend, Capabilities, Capability, CellDocument, CellError, CellHandle, EnvVar, ExecRequest,
    ExitReport, TeardownReport, PROBE_PATH,
};

use crate::audit::{self, Needles};
use crate::ids::{self, MARKER_VAR};
use crate::ledger;
use crate::residue::{self, Scope};

mod cells;
mod leftovers;
mod many;
mod run;
pub use many::PARALLEL;
pub use run::*;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The bound of a scenario unless it asks for another: how long it may go without any progress (a
/// step begun, or a create, wait, exec or destroy returned) before it counts as hung. A bound on
/// progress rather than on the total, so a loaded host that makes every operation slower never
/// turns a working backend red, while a backend that stops answering is still caught at once.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// The bound on a scenario's total time, as a multiple of its progress bound: a backend that keeps
/// answering but never lets the scenario end is caught too.
pub const TOTAL_BOUND_FACTOR: u32 = 8;
/// How long what the kernel (or the backend's reaper) frees asynchronously after every process of
/// a cell is dead may take: a dead child's exit status collected after SIGCHLD, a veth or loop
/// device released once its last user is gone. Never applied to a process that can still run.
pub const RESIDUE_GRACE: Duration = Duration::from_millis(1500);

/// One scenario of a family.
#[derive(Clone, Copy)]
pub struct Scenario {
    pub family: &'static str,
    pub name: &'static str,
    pub requires: &'static [Capability],
    pub run: fn(Ctx) -> BoxFuture<'static, Result<(), Failure>>,
    pub timeout: Duration,
}

impl Scenario {
    pub const fn new(
        family: &'static str,
        name: &'static str,
        requires: &'static [Capability],
        run: fn(Ctx) -> BoxFuture<'static, Result<(), Failure>>,
    ) -> Self {
        Scenario {
            family,
            name,
            requires,
            run,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub const fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// `{family}::{scenario}`, what expectation globs match against.
    pub fn path(&self) -> String {
        format!("{}::{}", self.family, self.name)
    }

    /// The first required capability the backend lacks, with its reason.
    pub fn missing_capability(&self, caps: &Capabilities) -> Option<String> {
        self.requires.iter().find_map(|c| match caps.support(*c) {
            cellcheck_contract::Support::Supported => None,
            cellcheck_contract::Support::Unsupported { reason } => {
                Some(format!("capability {c} unsupported: {reason}"))
            }
        })
    }
}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scenario({}::{})", self.family, self.name)
    }
}

/// Why a scenario failed: the step it was in, the cell it was looking at, and what it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub step: String,
    pub cell: Option<String>,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step: {}", self.step)?;
        if let Some(c) = &self.cell {
            write!(f, "\ncell: {c}")?;
        }
        write!(f, "\n{}", self.message)
    }
}

/// Fail the scenario with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($ctx:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($ctx.fail(format!($($fmt)+)));
        }
    };
}

#[derive(Debug, Clone)]
struct CellRec {
    id: String,
    marker: String,
    /// Whether `create` (or `restore`) returned Ok, so the harness must destroy it afterwards.
    live: bool,
    check_resources: bool,
    host_pids: Vec<u32>,
    /// `(pid, start time)` of `host_pids`, so a reused pid is never taken for the cell's.
    host_pid_starts: Vec<(u32, u64)>,
    /// Values of the document's `CELLCHECK_SECRET*` env vars: searched for after destroy.
    secrets: Vec<String>,
    /// The cell's ledger entry, while it is on disk.
    ledger: Option<PathBuf>,
}

impl CellRec {
    fn new(id: &str, marker: String, live: bool, check_resources: bool) -> Self {
        CellRec {
            id: id.to_string(),
            marker,
            live,
            check_resources,
            host_pids: Vec::new(),
            host_pid_starts: Vec::new(),
            secrets: Vec::new(),
            ledger: None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    step: String,
    cell: Option<String>,
    n: u32,
    cells: Vec<CellRec>,
    /// Outputs of waits and execs, for the failure report.
    outputs: Vec<(String, ExitReport)>,
    /// Broken promises seen outside a scenario's own checks (a destroy that returned Ok while a
    /// process of the cell could still run).
    violations: Vec<String>,
    /// Whether the scenario released cells it had checked clean itself ([`Ctx::release_clean`]).
    released: bool,
    /// Time spent in the scenario's own residue checks (after each destroy, `assert_clean`): host
    /// audit work done inside the trial, told apart so the audit's whole cost can be reported.
    checks: Duration,
}

struct Inner {
    backend: Arc<dyn Backend>,
    family: &'static str,
    scenario: &'static str,
    token: String,
    state: Mutex<State>,
    started: Instant,
    /// Milliseconds from `started` to the last progress (see [`DEFAULT_TIMEOUT`]).
    progress_ms: AtomicU64,
}

/// The scenario's handle on the backend. Every call through it is recorded, so the harness knows
/// which cells to destroy and check afterwards and can say which step failed.
#[derive(Clone)]
pub struct Ctx {
    inner: Arc<Inner>,
}

impl Ctx {
    pub fn new(backend: Arc<dyn Backend>, family: &'static str, scenario: &'static str) -> Self {
        Ctx {
            inner: Arc::new(Inner {
                backend,
                family,
                scenario,
                token: ids::random_token(8),
                state: Mutex::new(State {
                    step: "start".into(),
                    ..State::default()
                }),
                started: Instant::now(),
                progress_ms: AtomicU64::new(0),
            }),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    /// The rootfs this backend was given: its private copy (see [`crate::roots`]), or `None`
    /// when it was built without fixtures.
    pub fn rootfs(&self) -> Option<PathBuf> {
        crate::roots::given(self.inner.backend.name())
    }

    pub fn backend_arc(&self) -> Arc<dyn Backend> {
        self.inner.backend.clone()
    }

    pub fn caps(&self) -> Capabilities {
        self.inner.backend.capabilities()
    }

    pub fn has(&self, c: Capability) -> bool {
        self.caps().has(c)
    }

    /// `{family}::{scenario}` of the running scenario.
    pub fn scenario_path(&self) -> String {
        format!("{}::{}", self.inner.family, self.inner.scenario)
    }

    /// This trial's random token (part of every cell id and marker).
    pub fn token(&self) -> &str {
        &self.inner.token
    }

    pub fn step(&self, s: impl Into<String>) {
        self.st().step = s.into();
        self.progressed();
    }

    /// Note progress: the scenario is not hung.
    pub fn progressed(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.progress_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// How long since the last progress.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.inner.progress_ms.load(Ordering::SeqCst));
        self.inner.started.elapsed().saturating_sub(last)
    }

    fn set_cell(&self, id: &str) {
        self.st().cell = Some(id.to_string());
    }

    /// A failure at the current step and cell.
    pub fn fail(&self, message: impl Into<String>) -> Failure {
        let st = self.st();
        Failure {
            step: st.step.clone(),
            cell: st.cell.clone(),
            message: message.into(),
        }
    }

    /// A fresh unique cell id, registered for the residue check.
    pub fn new_id(&self) -> String {
        let mut st = self.st();
        st.n += 1;
        let id = ids::cell_id(
            &self.inner.token,
            &ids::short_name(self.inner.scenario),
            st.n,
        );
        let marker = format!(
            "ccm-{}-{:02}-{}",
            self.inner.token,
            st.n,
            ids::random_token(6)
        );
        st.cells.push(CellRec::new(&id, marker, false, true));
        id
    }

    /// Register an id the harness did not generate (an invalid one, for admission checks) so its
    /// marker is checked too; footprint resources are checked only when `check_resources`.
    pub fn register_id(&self, id: &str, check_resources: bool) -> String {
        let mut st = self.st();
        st.n += 1;
        let marker = format!(
            "ccm-{}-{:02}-{}",
            self.inner.token,
            st.n,
            ids::random_token(6)
        );
        st.cells
            .push(CellRec::new(id, marker.clone(), false, check_resources));
        marker
    }

    /// The marker value declared for `id`.
    pub fn marker_of(&self, id: &str) -> String {
        let st = self.st();
        st.cells
            .iter()
            .rev()
            .find(|c| c.id == id)
            .map(|c| c.marker.clone())
            .unwrap_or_default()
    }

    /// The marker env var for `id`, as a declared pair.
    pub fn marker_env(&self, id: &str) -> EnvVar {
        EnvVar {
            name: MARKER_VAR.into(),
            value: self.marker_of(id),
        }
    }

    /// `[PROBE_PATH, args...]`.
    pub fn probe_argv(args: &[&str]) -> Vec<String> {
        std::iter::once(PROBE_PATH)
            .chain(args.iter().copied())
            .map(String::from)
            .collect()
    }

    /// A document running the probe with `args` under a fresh id, declaring the marker.
    pub fn doc(&self, args: &[&str]) -> CellDocument {
        let id = self.new_id();
        self.doc_for(&id, args)
    }

    /// A document running the probe under `id` (already registered), declaring its marker.
    /// A document under `id` whose workload is `/bin/sh -c script`, with the cell's marker.
    pub fn shell_doc(&self, id: &str, script: impl Into<String>) -> CellDocument {
        let mut d = self.doc_for(id, &[]);
        d.spec.run.argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
        d
    }

    /// What this trial's live cells other than `except` claim by id and pid, so it is never
    /// blamed on the cells being checked. No marker or secrets: a restored copy shares those
    /// with its source.
    fn other_live_needles(&self, except: &[&str]) -> Vec<Needles> {
        let recs: Vec<CellRec> = self
            .st()
            .cells
            .iter()
            .filter(|c| c.live && !except.contains(&c.id.as_str()))
            .cloned()
            .collect();
        recs.iter()
            .map(|c| Needles {
                marker: String::new(),
                secrets: Vec::new(),
                ..self.needles(c)
            })
            .collect()
    }

    pub fn doc_for(&self, id: &str, args: &[&str]) -> CellDocument {
        let mut d = CellDocument::new(id, Self::probe_argv(args));
        d.spec.run.env.push(self.marker_env(id));
        d
    }

    /// The exact environ bytes a workload of `doc` must see.
    pub fn expected_environ(doc: &CellDocument) -> Vec<u8> {
        let mut v = Vec::new();
        for e in &doc.spec.run.env {
            v.extend_from_slice(e.name.as_bytes());
            v.push(b'=');
            v.extend_from_slice(e.value.as_bytes());
            v.push(0);
        }
        v
    }

    fn ensure_registered(&self, id: &str, doc: &CellDocument) {
        let mut st = self.st();
        if !st.cells.iter().any(|c| c.id == id) {
            let marker = ids::declared_marker(doc).unwrap_or_default();
            st.cells
                .push(CellRec::new(id, marker, false, !id.is_empty()));
        }
        let secrets = ids::declared_secrets(doc);
        if let Some(c) = st.cells.iter_mut().rev().find(|c| c.id == id) {
            for s in secrets {
                if !c.secrets.contains(&s) {
                    c.secrets.push(s);
                }
            }
        }
    }

    fn mark_live(&self, h: &CellHandle) {
        let start = h
            .host_pid
            .and_then(|p| audit::start_time(p).map(|s| (p, s)));
        let mut st = self.st();
        if let Some(c) = st.cells.iter_mut().rev().find(|c| c.id == h.id) {
            c.live = true;
            c.host_pids.extend(h.host_pid);
            c.host_pid_starts.extend(start);
        } else {
            let mut c = CellRec::new(&h.id, String::new(), true, true);
            c.host_pids.extend(h.host_pid);
            c.host_pid_starts.extend(start);
            st.cells.push(c);
        }
    }

    /// Write the ledger entry of `id` (before its create, so a harness killed during the create
    /// still leaves a record). Only for ids admission can accept: the entry drives removals.
    fn ledger_write(&self, id: &str) {
        if cellcheck_contract::spec::validate_id(id).is_err() {
            return;
        }
        let (marker, host_pid, existing) = {
            let st = self.st();
            match st.cells.iter().rev().find(|c| c.id == id) {
                Some(c) => (
                    c.marker.clone(),
                    c.host_pid_starts.last().copied(),
                    c.ledger.clone(),
                ),
                None => return,
            }
        };
        let mut e = ledger::Entry::new(
            id,
            self.inner.backend.name(),
            &marker,
            self.inner.backend.footprint(id),
        );
        e.host_pid = host_pid;
        let file = match &existing {
            Some(p) => p.file_name().map(|f| f.to_string_lossy().into_owned()),
            None => Some(e.file_name(&ids::random_token(12))),
        };
        let Some(file) = file else { return };
        match ledger::write(&ledger::dir(), &file, &e) {
            Ok(p) => {
                if let Some(c) = self.st().cells.iter_mut().rev().find(|c| c.id == id) {
                    c.ledger = Some(p);
                }
            }
            Err(err) => eprintln!("cellcheck: cannot write the ledger entry of {id}: {err}"),
        }
    }

    /// What names every cell this trial released ([`Ctx::release_clean`]), as one set of needles:
    /// ids the harness mints start with `cc-<token>-` and markers with `ccm-<token>-`, and the token
    /// is this trial's own random one, so nothing of another trial or run can match. `None` when
    /// the scenario released nothing.
    pub(super) fn released_needles(&self) -> Option<Needles> {
        if !self.st().released {
            return None;
        }
        let token = &self.inner.token;
        Some(Needles {
            cell: format!("cc-{token}-"),
            marker: String::new(),
            secrets: Vec::new(),
            process_markers: vec![format!("ccm-{token}-")],
            host_pids: Vec::new(),
        })
    }

    /// Register a cell id as live (a restore the scenario performed itself).
    pub fn note_live(&self, h: &CellHandle) {
        self.mark_live(h);
        self.ledger_write(&h.id);
    }

    fn mark_gone(&self, id: &str) {
        let mut st = self.st();
        for c in st.cells.iter_mut().filter(|c| c.id == id) {
            c.live = false;
        }
    }

    /// The needles of every record of `id`.
    fn needles_of_id(&self, id: &str) -> Vec<Needles> {
        let recs: Vec<CellRec> = self
            .st()
            .cells
            .iter()
            .filter(|c| c.id == id)
            .cloned()
            .collect();
        recs.iter().map(|c| self.needles(c)).collect()
    }

    fn needles(&self, c: &CellRec) -> Needles {
        let process_markers = if c.check_resources && !c.id.is_empty() {
            self.inner.backend.footprint(&c.id).process_markers
        } else {
            Vec::new()
        };
        Needles {
            cell: if c.check_resources {
                c.id.clone()
            } else {
                String::new()
            },
            marker: c.marker.clone(),
            secrets: c.secrets.clone(),
            process_markers,
            host_pids: c.host_pid_starts.clone(),
        }
    }

    /// Destroy returned Ok for `id`: no process of the cell may still be able to run, at once,
    /// with no grace period. Processes that another live cell of this trial claims by its own
    /// id or pid (a restored copy still carries the source cell's marker) are not this cell's.
    fn check_gone(&self, id: &str) {
        let t = Instant::now();
        let others = self.other_live_needles(&[id]);
        let mut seen = Vec::new();
        for n in self.needles_of_id(id) {
            for (p, why) in audit::runnable_of(&n) {
                if others.iter().any(|o| o.process_reason(&p).is_some()) {
                    continue;
                }
                seen.push(format!(
                    "destroy of {id} returned Ok while process {} could still run ({why})",
                    p.describe()
                ));
            }
        }
        let mut st = self.st();
        st.violations.extend(seen);
        st.checks += t.elapsed();
    }
}
