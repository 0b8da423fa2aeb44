//! What a scenario sees ([`Ctx`]), what it returns ([`Failure`]), and how one trial runs it:
//! bounded in time, panics caught, every touched cell destroyed afterwards and checked for residue.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The bound of a scenario unless it asks for another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
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
}

struct Inner {
    backend: Arc<dyn Backend>,
    family: &'static str,
    scenario: &'static str,
    token: String,
    state: Mutex<State>,
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
            }),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
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
        let others: Vec<Needles> = {
            let recs: Vec<CellRec> = self
                .st()
                .cells
                .iter()
                .filter(|c| c.live && c.id != id)
                .cloned()
                .collect();
            recs.iter()
                .map(|c| Needles {
                    marker: String::new(),
                    secrets: Vec::new(),
                    ..self.needles(c)
                })
                .collect()
        };
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
        if !seen.is_empty() {
            self.st().violations.extend(seen);
        }
    }

    /// `backend.create`, recorded (in the ledger too, before the backend is called).
    pub async fn try_create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        let id = doc.spec.id.clone();
        self.ensure_registered(&id, doc);
        self.set_cell(&id);
        self.ledger_write(&id);
        let r = self.inner.backend.create(doc).await;
        if let Ok(h) = &r {
            self.mark_live(h);
            if h.host_pid.is_some() {
                self.ledger_write(&id);
            }
        }
        r
    }

    /// `backend.create`, which must succeed.
    pub async fn create(&self, doc: &CellDocument) -> Result<CellHandle, Failure> {
        self.try_create(doc)
            .await
            .map_err(|e| self.fail(format!("create failed: {e} ({e:?})")))
    }

    /// Create, then wait until the workload runs its program: a holding probe until it says it is
    /// ready (so its fds and env are only what the backend handed over), anything else until
    /// `/proc/<pid>/cmdline` is its argv; without a host pid, a short settle delay.
    pub async fn create_running(&self, doc: &CellDocument) -> Result<CellHandle, Failure> {
        let h = self.create(doc).await?;
        self.await_running(&h, &doc.spec.run.argv).await?;
        Ok(h)
    }

    pub async fn await_running(&self, h: &CellHandle, argv: &[String]) -> Result<(), Failure> {
        use cellcheck_fixtures::ProbeState;
        let Some(pid) = h.host_pid else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        };
        let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
        let probe = cellcheck_fixtures::ready::announces_readiness(argv);
        let start = Instant::now();
        loop {
            let state = cellcheck_fixtures::probe_state(std::path::Path::new("/proc"), pid);
            let seen = match state {
                ProbeState::Ready if probe => return Ok(()),
                // A process that ended cannot start later: say so now rather than after 15 s.
                ProbeState::Exited | ProbeState::Gone => {
                    return Err(self.fail(format!(
                        "host pid {pid} {} before it started {argv:?}",
                        if state == ProbeState::Gone {
                            "does not exist"
                        } else {
                            "exited"
                        }
                    )))
                }
                ProbeState::Ready => {
                    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
                }
                ProbeState::Starting { cmdline, .. } => cmdline,
            };
            if !probe && seen == want {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(15) {
                let what = if probe { "get ready running" } else { "start" };
                return Err(self.fail(format!(
                    "host pid {pid} did not {what} {argv:?} within 15 s (cmdline {:?})",
                    String::from_utf8_lossy(&seen)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn record_output(&self, what: String, r: &ExitReport) {
        self.st().outputs.push((what, r.clone()));
    }

    /// `backend.wait`, recorded.
    pub async fn try_wait(&self, id: &str) -> Result<ExitReport, CellError> {
        self.set_cell(id);
        let r = self.inner.backend.wait(id).await;
        if let Ok(rep) = &r {
            self.record_output(format!("wait {id}"), rep);
        }
        r
    }

    pub async fn wait(&self, id: &str) -> Result<ExitReport, Failure> {
        self.try_wait(id)
            .await
            .map_err(|e| self.fail(format!("wait failed: {e} ({e:?})")))
    }

    /// `backend.destroy`, recorded.
    pub async fn try_destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        self.set_cell(id);
        let r = self.inner.backend.destroy(id).await;
        if r.is_ok() {
            self.mark_gone(id);
            self.check_gone(id);
        }
        r
    }

    pub async fn destroy(&self, id: &str) -> Result<TeardownReport, Failure> {
        self.try_destroy(id)
            .await
            .map_err(|e| self.fail(format!("destroy failed: {e} ({e:?})")))
    }

    /// Run the probe with `args` in the live cell `id`, with the cell's marker as its only env.
    pub async fn try_exec(&self, id: &str, args: &[&str]) -> Result<ExitReport, CellError> {
        self.set_cell(id);
        let req = ExecRequest {
            argv: Self::probe_argv(args),
            env: vec![self.marker_env(id)],
            timeout_ms: Some(30_000),
        };
        let r = self.inner.backend.exec(id, req).await;
        if let Ok(rep) = &r {
            self.record_output(format!("exec {id} {args:?}"), rep);
        }
        r
    }

    pub async fn exec(&self, id: &str, args: &[&str]) -> Result<ExitReport, Failure> {
        self.try_exec(id, args)
            .await
            .map_err(|e| self.fail(format!("exec {args:?} failed: {e} ({e:?})")))
    }

    /// Create a cell running the probe with `args`, wait for it, return its id and report.
    pub async fn run_probe(&self, args: &[&str]) -> Result<(String, ExitReport), Failure> {
        let doc = self.doc(args);
        self.run_doc(&doc).await
    }

    pub async fn run_doc(&self, doc: &CellDocument) -> Result<(String, ExitReport), Failure> {
        let h = self.create(doc).await?;
        let r = self.wait(&h.id).await?;
        Ok((h.id, r))
    }

    /// Create, wait and destroy; the report of the run.
    pub async fn run_and_destroy(&self, args: &[&str]) -> Result<ExitReport, Failure> {
        let (id, r) = self.run_probe(args).await?;
        self.destroy(&id).await?;
        Ok(r)
    }

    fn scope_of(&self, c: &CellRec) -> Scope {
        let footprint = if c.id.is_empty() {
            Default::default()
        } else {
            self.inner.backend.footprint(&c.id)
        };
        Scope {
            cell: c.id.clone(),
            env_markers: if c.marker.is_empty() {
                vec![]
            } else {
                vec![c.marker.clone()]
            },
            footprint,
            host_pids: c.host_pids.clone(),
            check_resources: c.check_resources,
        }
    }

    /// Fail unless nothing of cell `id` remains on the host (after its destroy or failed create).
    pub async fn assert_clean(&self, id: &str) -> Result<(), Failure> {
        self.step(format!("residue check of {id}"));
        let recs: Vec<CellRec> = self
            .st()
            .cells
            .iter()
            .filter(|c| c.id == id)
            .cloned()
            .collect();
        // Fds are checked per trial against the fds open before it; here only the rest.
        let (reports, _) = self.leftovers(&recs, None).await;
        match reports.into_iter().next() {
            Some((_, text)) => Err(self.fail(text)),
            None => Ok(()),
        }
    }

    /// What of `recs` is still on the host: the footprint's resources (the backend's word) and
    /// everything the host audit finds mentioning the cells (no word needed), as one report per
    /// leaking cell, plus the snapshot the audit took. Processes another live cell of the trial
    /// claims by its own id or pid are that cell's, not these ones'.
    ///
    /// Only what is freed asynchronously after every process of the cell is dead (a zombie
    /// awaiting its reaper, a veth or loop device being released) is looked at again, for at
    /// most [`RESIDUE_GRACE`]; anything else fails at once.
    async fn leftovers(
        &self,
        recs: &[CellRec],
        fds_before: Option<&BTreeMap<i32, PathBuf>>,
    ) -> (Vec<(String, String)>, Option<audit::Snapshot>) {
        let others: Vec<Needles> = {
            let ids: Vec<&str> = recs.iter().map(|c| c.id.as_str()).collect();
            let live: Vec<CellRec> = self
                .st()
                .cells
                .iter()
                .filter(|c| c.live && !ids.contains(&c.id.as_str()))
                .cloned()
                .collect();
            live.iter()
                .map(|c| Needles {
                    marker: String::new(),
                    secrets: Vec::new(),
                    ..self.needles(c)
                })
                .collect()
        };
        let needles: Vec<Needles> = recs.iter().map(|c| self.needles(c)).collect();
        let roots = audit::window().roots();
        let start = Instant::now();
        loop {
            let baseline = audit::window().baseline();
            let after = audit::Snapshot::take_since(&roots, baseline.as_deref());
            let before = baseline.as_deref().unwrap_or(&after);
            let mut per_cell: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut settling = true;
            let procs: Vec<residue::ProcInfo> = after
                .procs
                .values()
                .map(|p| residue::ProcInfo {
                    pid: p.pid,
                    ppid: p.ppid,
                    state: p.state,
                    cmdline: p.cmdline.clone(),
                    environ: p.environ.clone(),
                })
                .collect();
            for c in recs {
                let leaks = residue::scan_procs(
                    &self.scope_of(c),
                    fds_before.unwrap_or(&BTreeMap::new()),
                    procs.clone(),
                );
                for l in leaks {
                    if fds_before.is_none() && matches!(l, residue::Leak::Fd { .. }) {
                        continue;
                    }
                    settling &= matches!(l, residue::Leak::Zombie { .. });
                    per_cell
                        .entry(c.id.clone())
                        .or_default()
                        .push(l.to_string());
                }
            }
            for (cell, l) in audit::scoped(&needles, before, &after) {
                if let audit::Leftover::Process { .. } = &l {
                    let pid = leftover_pid(&l);
                    if others.iter().any(|o| {
                        after
                            .procs
                            .values()
                            .any(|p| Some(p.pid) == pid && o.process_reason(p).is_some())
                    }) {
                        continue;
                    }
                }
                settling &= matches!(
                    l,
                    audit::Leftover::Zombie { .. }
                        | audit::Leftover::Link(_)
                        | audit::Leftover::Loop(_)
                );
                let text = format!("{l} [host audit]");
                let v = per_cell.entry(cell).or_default();
                // The footprint check may already name the same pid or path.
                if !v.iter().any(|x| same_thing(x, &l)) {
                    v.push(text);
                }
            }
            if per_cell.is_empty() || !settling || start.elapsed() >= RESIDUE_GRACE {
                let reports = per_cell
                    .into_iter()
                    .map(|(cell, v)| {
                        let mut s =
                            format!("residue of cell {cell}: {} leaked resource(s)", v.len());
                        for l in v {
                            s.push_str("\n  - ");
                            s.push_str(&l);
                        }
                        (cell, s)
                    })
                    .collect();
                return (reports, Some(after));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn outputs_report(&self) -> String {
        let st = self.st();
        let mut s = String::new();
        for (what, r) in st.outputs.iter().rev().take(4) {
            s.push_str(&format!(
                "\n  {what}: {:?}\n    stdout: {}\n    stderr: {}",
                r.termination,
                clip(&r.stdout),
                clip(&r.stderr)
            ));
        }
        s
    }
}

fn leftover_pid(l: &audit::Leftover) -> Option<u32> {
    match l {
        audit::Leftover::Process { proc_, .. } => {
            proc_.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
        }
        audit::Leftover::Zombie { pid } => Some(*pid),
        _ => None,
    }
}

/// Whether the footprint check's line `x` already names what the audit found.
fn same_thing(x: &str, l: &audit::Leftover) -> bool {
    match l {
        audit::Leftover::Process { .. } | audit::Leftover::Zombie { .. } => leftover_pid(l)
            .is_some_and(|p| x.contains(&format!("pid {p} ")) || x.ends_with(&format!("pid {p}"))),
        audit::Leftover::CgroupDir(p) | audit::Leftover::File(p) => {
            x.contains(&format!(" {} still exists", p.display()))
        }
        audit::Leftover::Netns(n) => x.contains(&format!("netns {n} ")),
        _ => false,
    }
}

fn clip(b: &[u8]) -> String {
    const MAX: usize = 600;
    let s = String::from_utf8_lossy(&b[..b.len().min(MAX)]).into_owned();
    if b.len() > MAX {
        format!("{s:?}… ({} bytes)", b.len())
    } else {
        format!("{s:?}")
    }
}

/// Fds the harness holds open WITHOUT close-on-exec for its whole life: a pipe, a unix socket
/// pair and a file. A backend with sloppy spawn hygiene hands them to the workload.
#[derive(Debug)]
pub struct Sentinels {
    pub fds: Vec<(i32, &'static str)>,
}

static SENTINELS: OnceLock<Sentinels> = OnceLock::new();

pub fn sentinels() -> &'static Sentinels {
    SENTINELS.get_or_init(|| {
        let mut fds = Vec::new();
        // Raw libc on purpose: std and nix wrappers set O_CLOEXEC, which is exactly what we
        // must not do here.
        unsafe {
            let mut p = [0i32; 2];
            if libc::pipe(p.as_mut_ptr()) == 0 {
                fds.push((p[0], "pipe read end"));
                fds.push((p[1], "pipe write end"));
            }
            let mut s = [0i32; 2];
            if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, s.as_mut_ptr()) == 0 {
                fds.push((s[0], "unix socket"));
                fds.push((s[1], "unix socket peer"));
            }
            let path = b"/proc/self/exe\0";
            let f = libc::open(path.as_ptr().cast(), libc::O_RDONLY);
            if f >= 0 {
                fds.push((f, "file (the harness binary)"));
            }
        }
        Sentinels { fds }
    })
}

impl Sentinels {
    /// The sentinels that really are inheritable (FD_CLOEXEC clear).
    pub fn inheritable(&self) -> Vec<i32> {
        self.fds
            .iter()
            .map(|(fd, _)| *fd)
            .filter(|fd| {
                let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
                flags >= 0 && flags & libc::FD_CLOEXEC == 0
            })
            .collect()
    }
}

/// Trials currently running in this process (several under `cargo test`, one under nextest).
pub static ACTIVE_TRIALS: AtomicUsize = AtomicUsize::new(0);

/// Whether this trial is the only one running in the process, so backend-wide counts are exact.
pub fn alone() -> bool {
    ACTIVE_TRIALS.load(Ordering::SeqCst) == 1
}

/// The verdict of one scenario run, before expectations are applied.
#[derive(Debug)]
pub struct RunReport {
    pub passed: bool,
    /// The full failure context (empty when passed).
    pub message: String,
    pub duration: Duration,
    /// The part of `duration` the host audit took (snapshots and their comparison).
    pub audit: Duration,
}

/// Run one scenario against `backend` on the current tokio runtime: bounded, panics caught, then
/// every live cell destroyed and every touched cell checked for residue.
pub async fn run_scenario_async(backend: Arc<dyn Backend>, sc: Scenario) -> RunReport {
    ACTIVE_TRIALS.fetch_add(1, Ordering::SeqCst);
    let start = Instant::now();
    audit::window().add_roots(audit::state_roots(&*backend));
    let trial = format!("{}::{}::{}", backend.name(), sc.family, sc.name);
    let audit_start = Instant::now();
    let window_i = audit::window().open(backend.name(), &trial);
    let mut audit_time = audit_start.elapsed();
    let fds_before = residue::own_fds();
    let ctx = Ctx::new(backend.clone(), sc.family, sc.name);
    let task = tokio::spawn((sc.run)(ctx.clone()));
    let abort = task.abort_handle();
    let verdict: Result<(), String> = match tokio::time::timeout(sc.timeout, task).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(f))) => Err(f.to_string()),
        Ok(Err(join)) => Err(match join.try_into_panic() {
            Ok(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic payload".into());
                let st = ctx.st();
                format!(
                    "step: {}\nthe scenario panicked (backend or scenario code): {msg}",
                    st.step
                )
            }
            Err(e) => format!("scenario task failed: {e}"),
        }),
        Err(_) => {
            abort.abort();
            Err(format!(
                "step: {}\nscenario did not finish within {} s (hung backend?)",
                ctx.st().step,
                sc.timeout.as_secs()
            ))
        }
    };

    // Clean up what the scenario left live, also after a failure, then look for residue.
    let mut cleanup_errors = Vec::new();
    let cells: Vec<CellRec> = ctx.st().cells.clone();
    let mut done = std::collections::BTreeSet::new();
    for c in cells.iter().filter(|c| c.live) {
        if !done.insert(c.id.clone()) {
            continue;
        }
        let spawned = tokio::spawn({
            let b = backend.clone();
            let id = c.id.clone();
            async move { b.destroy(&id).await }
        });
        match tokio::time::timeout(Duration::from_secs(60), spawned).await {
            Ok(Ok(Ok(_))) => {
                ctx.mark_gone(&c.id);
                ctx.check_gone(&c.id);
            }
            Ok(Ok(Err(CellError::NotFound { .. }))) => {}
            Ok(Ok(Err(e))) => cleanup_errors.push(format!("cleanup destroy {}: {e}", c.id)),
            Ok(Err(e)) => cleanup_errors.push(format!("cleanup destroy {} panicked: {e}", c.id)),
            Err(_) => cleanup_errors.push(format!("cleanup destroy {} hung for 60 s", c.id)),
        }
    }
    let audit_start = Instant::now();
    let (leaks, after) = ctx.leftovers(&cells, Some(&fds_before)).await;
    let leak_reports: Vec<String> = leaks.iter().map(|(_, t)| t.clone()).collect();
    // A cell that left nothing no longer needs its ledger entry; one that leaked keeps it, so
    // the next run removes what this one could only report.
    let cells: Vec<CellRec> = ctx.st().cells.clone();
    for c in &cells {
        if let Some(p) = &c.ledger {
            if !c.live && !leaks.iter().any(|(id, _)| id == &c.id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let needles: Vec<Needles> = cells.iter().map(|c| ctx.needles(c)).collect();
    let window = audit::window().close(window_i, needles, after);
    audit_time += audit_start.elapsed();
    ACTIVE_TRIALS.fetch_sub(1, Ordering::SeqCst);
    let mut host_audit = None;
    if let Some(w) = &window {
        for warn in &w.warnings {
            eprintln!("cellcheck: host audit warning: {warn}");
        }
        for b in &w.backends {
            eprintln!("{}", audit::console_line(b, w));
            audit::record(&serde_json::json!({
                "kind": "window",
                "backend": b,
                "closed_by": trial,
                "clean": !w.leftovers.contains_key(b),
                "leftovers": w.leftovers.get(b).cloned().unwrap_or_default(),
                "warnings": w.warnings,
                // What the audit added to the closing trial (snapshots and comparisons).
                "audit_ms": audit_time.as_millis() as u64,
                "trial_ms": start.elapsed().as_millis() as u64,
            }));
        }
        if let Some(v) = w.leftovers.get(backend.name()) {
            host_audit = Some(format!(
                "host audit of backend {} (snapshots before its first trial and after its last \
                 in this process): {} leftover(s)\n  - {}",
                backend.name(),
                v.len(),
                v.join("\n  - ")
            ));
        }
    }

    let mut parts = Vec::new();
    if let Err(m) = &verdict {
        parts.push(m.clone());
    }
    let violations = ctx.st().violations.clone();
    if !violations.is_empty() {
        parts.push(violations.join("\n"));
    }
    if let Some(h) = host_audit {
        parts.push(h);
    }
    if !leak_reports.is_empty() {
        parts.push(format!("after the scenario: {}", leak_reports.join("\n")));
    }
    if !cleanup_errors.is_empty() {
        parts.push(cleanup_errors.join("\n"));
    }
    let passed = parts.is_empty();
    let mut message = String::new();
    if !passed {
        message = format!(
            "backend: {}\nscenario: {}::{}\n{}",
            backend.name(),
            sc.family,
            sc.name,
            parts.join("\n")
        );
        let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        if !ids.is_empty() {
            message.push_str(&format!("\ncells touched: {}", ids.join(", ")));
        }
        let outs = ctx.outputs_report();
        if !outs.is_empty() {
            message.push_str(&format!("\ncaptured output:{outs}"));
        }
    }
    RunReport {
        passed,
        message,
        duration: start.elapsed(),
        audit: audit_time,
    }
}

/// The fixture root, for scenarios that check a workload did not write into a shared root.
pub fn fixtures_rootfs() -> Option<PathBuf> {
    Some(cellcheck_fixtures::fixtures_dir().join("rootfs"))
}
