//! Out-of-process backends.
//!
//! - [`RemoteBackend`]: a [`Backend`] served by a driver program over the driver protocol
//!   (line-delimited JSON on the driver's stdin/stdout, see `docs/protocol.md` and
//!   `schema/protocol.schema.json`). Any language can implement a driver.
//! - `NestedBackend` (module [`nested`]): cell in cell; `cellcheck-driver host` runs inside an outer
//!   host cell and creates the inner cells.
//!
//! Every request has a deadline. A driver that sends a malformed line, answers what was not asked,
//! crashes or stops answering is killed (by the pid we started) and reaped, and the calls waiting on
//! it fail with [`CellError::BackendFailure`] naming what happened and during which operation. The
//! next call starts a fresh driver.

pub mod client;
pub mod conn;
pub mod nested;
pub mod protocol;
mod spawn;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cellcheck_contract::{
    Availability, Backend, Capabilities, CellDocument, CellError, CellHandle, ExecRequest,
    ExitReport, Footprint, SnapshotRef, TeardownReport,
};

pub use client::{Deadlines, DriverInfo};
pub use conn::{Conn, Direction, Tap};
pub use protocol::PROTOCOL_VERSION;

/// The env var naming the generic driver's command line for the suite (split on whitespace);
/// [`cellcheck_contract::drivers::env_var`] names any other driver's.
pub const DRIVER_ENV: &str = "CELLCHECK_REMOTE_DRIVER";

/// A JSON value, cut short for messages.
pub(crate) fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 200 {
        format!("{}...", &s[..s.floor_char_boundary_compat(200)])
    } else {
        s
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Options of a [`RemoteBackend`].
#[derive(Clone, Default)]
pub struct RemoteOptions {
    pub deadlines: Deadlines,
    /// Sees every protocol line (tests validate them against the schema).
    pub tap: Option<Tap>,
    /// The fixtures `hello` tells the driver about.
    pub fixtures: Option<protocol::FixturePaths>,
}

/// A backend served by a driver process.
pub struct RemoteBackend {
    name: String,
    argv: Vec<String>,
    opts: RemoteOptions,
    info: DriverInfo,
    conn: Mutex<Arc<Conn>>,
    /// Per live cell: its own bound (timeoutMs), which sets how long `wait` may take.
    bounds: Mutex<HashMap<String, Option<u64>>>,
    /// The last footprint the driver gave per id, for when it can no longer be asked.
    footprints: Mutex<HashMap<String, Footprint>>,
}

impl RemoteBackend {
    /// Start `argv` as a driver and shake hands with it (blocking; no runtime needed).
    pub fn new(name: impl Into<String>, argv: Vec<String>) -> Result<Self, CellError> {
        Self::with_options(name, argv, RemoteOptions::default())
    }

    /// The driver named by [`DRIVER_ENV`], if the variable is set (see
    /// [`cellcheck_contract::drivers`] for drivers under other names).
    pub fn from_env(name: impl Into<String>) -> Option<Result<Self, CellError>> {
        let cmd = std::env::var(DRIVER_ENV).ok()?;
        let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        Some(Self::new(name, argv))
    }

    pub fn with_options(
        name: impl Into<String>,
        argv: Vec<String>,
        opts: RemoteOptions,
    ) -> Result<Self, CellError> {
        let name = name.into();
        let conn = spawn::spawn(&name, &argv, opts.tap.clone())?;
        let info = client::handshake_blocking(&conn, &opts.deadlines, opts.fixtures.as_ref())?;
        Ok(RemoteBackend {
            name,
            argv,
            opts,
            info,
            conn: Mutex::new(Arc::new(conn)),
            bounds: Mutex::new(HashMap::new()),
            footprints: Mutex::new(HashMap::new()),
        })
    }

    /// What the handshake learnt about the driver.
    pub fn driver_info(&self) -> &DriverInfo {
        &self.info
    }

    /// The current connection; a dead one is replaced by a fresh driver first.
    fn conn(&self) -> Result<Arc<Conn>, CellError> {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if g.dead().is_some() {
            let conn = spawn::spawn(&self.name, &self.argv, self.opts.tap.clone())?;
            let info = client::handshake_blocking(
                &conn,
                &self.opts.deadlines,
                self.opts.fixtures.as_ref(),
            )?;
            if info.capabilities != self.info.capabilities {
                return Err(CellError::failure(format!(
                    "{}: restarted driver declares other capabilities than at start",
                    conn.label()
                )));
            }
            // Cells of the dead driver are gone with it (drivers destroy their cells on exit).
            self.bounds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            *g = Arc::new(conn);
        }
        Ok(g.clone())
    }

    /// Ask the driver to destroy its cells and exit; waits up to `grace`, then kills it.
    /// Returns how the driver ended.
    pub fn close(&self, grace: Duration) -> String {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        c.close(grace)
    }

    fn remember_footprint(&self, id: &str, conn: &Conn) {
        if let Ok(f) = client::footprint_blocking(conn, &self.opts.deadlines, id) {
            self.footprints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_string(), f);
        }
    }
}

#[async_trait]
impl Backend for RemoteBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.info.capabilities.clone()
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = self.info.attributes.clone();
        a.insert("driver".into(), self.info.driver.clone());
        a.insert("driver.backend".into(), self.info.backend.clone());
        a.insert("protocol".into(), self.info.version.to_string());
        a
    }

    async fn preflight(&self) -> Availability {
        let r = match self.conn() {
            Ok(c) => client::preflight(&c, &self.opts.deadlines).await,
            Err(e) => Err(e),
        };
        r.unwrap_or_else(|e| Availability::Unavailable {
            reason: e.to_string(),
        })
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "create", driver = %self.name, cell = %doc.spec.id)
    )]
    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        // Refuse a bad document here, so no driver ever sees one from this client.
        let cell = doc.admit()?;
        let c = self.conn()?;
        self.remember_footprint(cell.id(), &c);
        let h = client::create(&c, &self.opts.deadlines, doc).await?;
        self.bounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h.id.clone(), cell.timeout_ms());
        Ok(h)
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "wait", driver = %self.name, cell = %id)
    )]
    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        let bound = self
            .bounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .flatten();
        let c = self.conn()?;
        client::wait(&c, self.opts.deadlines.for_bounded(bound), id).await
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "destroy", driver = %self.name, cell = %id)
    )]
    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        let c = self.conn()?;
        let r = client::destroy(&c, &self.opts.deadlines, id).await;
        if r.is_ok() {
            self.bounds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        r
    }

    fn footprint(&self, id: &str) -> Footprint {
        let fresh = self
            .conn()
            .and_then(|c| client::footprint_blocking(&c, &self.opts.deadlines, id));
        let mut cache = self.footprints.lock().unwrap_or_else(|p| p.into_inner());
        match fresh {
            Ok(f) => {
                cache.insert(id.to_string(), f.clone());
                f
            }
            Err(e) => {
                eprintln!(
                    "{}: footprint of {id} from the last answer ({e})",
                    self.name
                );
                cache.get(id).cloned().unwrap_or_default()
            }
        }
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "exec", driver = %self.name, cell = %id)
    )]
    async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExitReport, CellError> {
        self.info
            .capabilities
            .require(cellcheck_contract::Capability::Exec)?;
        let c = self.conn()?;
        client::exec(&c, &self.opts.deadlines, id, &req).await
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "snapshot", driver = %self.name, cell = %id)
    )]
    async fn snapshot(&self, id: &str) -> Result<SnapshotRef, CellError> {
        self.info
            .capabilities
            .require(cellcheck_contract::Capability::Snapshot)?;
        let c = self.conn()?;
        client::snapshot(&c, &self.opts.deadlines, id).await
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "restore", driver = %self.name, cell = %new_id)
    )]
    async fn restore(&self, snap: &SnapshotRef, new_id: &str) -> Result<CellHandle, CellError> {
        self.info
            .capabilities
            .require(cellcheck_contract::Capability::Snapshot)?;
        let c = self.conn()?;
        client::restore(&c, &self.opts.deadlines, snap, new_id).await
    }

    async fn delete_snapshot(&self, snap: &SnapshotRef) -> Result<(), CellError> {
        self.info
            .capabilities
            .require(cellcheck_contract::Capability::Snapshot)?;
        let c = self.conn()?;
        client::delete_snapshot(&c, &self.opts.deadlines, snap).await
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "pause", driver = %self.name, cell = %id)
    )]
    async fn pause(&self, id: &str) -> Result<(), CellError> {
        self.info
            .capabilities
            .require(cellcheck_contract::Capability::Pause)?;
        let c = self.conn()?;
        client::pause(&c, &self.opts.deadlines, id).await
    }

    #[tracing::instrument(
        name = "remote",
        skip_all,
        err(level = "debug"),
        fields(op = "resume", driver = %self.name, cell = %id)
    )]
    async fn resume(&self, id: &str) -> Result<(), CellError> {
        self.info
            .capabilities
            .require(cellcheck_contract::Capability::Pause)?;
        let c = self.conn()?;
        client::resume(&c, &self.opts.deadlines, id).await
    }

    async fn list(&self) -> Vec<String> {
        match self.conn() {
            Ok(c) => client::list(&c, &self.opts.deadlines)
                .await
                .unwrap_or_else(|e| {
                    eprintln!("{}: list failed: {e}", self.name);
                    Vec::new()
                }),
            Err(_) => Vec::new(),
        }
    }
}

/// Stands in for a backend that could not be constructed (driver missing, handshake failed), so a
/// suite lists its trials as skipped with the reason instead of losing them.
pub struct UnavailableBackend {
    name: String,
    reason: String,
}

impl UnavailableBackend {
    pub fn new(name: impl Into<String>, reason: impl Into<String>) -> Self {
        UnavailableBackend {
            name: name.into(),
            reason: reason.into(),
        }
    }

    fn err(&self) -> CellError {
        CellError::Unavailable {
            reason: self.reason.clone(),
        }
    }
}

#[async_trait]
impl Backend for UnavailableBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn preflight(&self) -> Availability {
        Availability::Unavailable {
            reason: self.reason.clone(),
        }
    }
    async fn create(&self, _doc: &CellDocument) -> Result<CellHandle, CellError> {
        Err(self.err())
    }
    async fn wait(&self, _id: &str) -> Result<ExitReport, CellError> {
        Err(self.err())
    }
    async fn destroy(&self, _id: &str) -> Result<TeardownReport, CellError> {
        Err(self.err())
    }
    fn footprint(&self, _id: &str) -> Footprint {
        Footprint::default()
    }
    async fn list(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The command line of the example Python driver (runc) over the fixture rootfs.
pub fn python_runc_driver_argv() -> Vec<String> {
    let script = cellcheck_fixtures::workspace_root()
        .join("fixtures/python-driver/cellcheck_runc_driver.py");
    // No --rootfs: the driver takes the rootfs from `hello` (see [`remote_with_fixtures`]).
    vec!["python3".into(), script.display().to_string()]
}

/// Suite factory: `name` served by `argv`, or an [`UnavailableBackend`] saying why not.
pub fn remote_or_unavailable(name: &str, argv: Vec<String>) -> Arc<dyn Backend> {
    remote_or_unavailable_with(name, argv, RemoteOptions::default())
}

/// [`remote_or_unavailable`] whose `hello` gives the driver the paths of `fx` (its rootfs, probe
/// and host init), so the driver needs no flag or guess to find them.
pub fn remote_with_fixtures(
    name: &str,
    argv: Vec<String>,
    fx: &cellcheck_fixtures::Fixtures,
) -> Arc<dyn Backend> {
    remote_or_unavailable_with(name, argv, with_fixtures(fx))
}

/// Options whose `hello` carries the fixture paths of `fx`.
fn with_fixtures(fx: &cellcheck_fixtures::Fixtures) -> RemoteOptions {
    RemoteOptions {
        fixtures: Some(protocol::FixturePaths::of(fx)),
        ..RemoteOptions::default()
    }
}

fn remote_or_unavailable_with(
    name: &str,
    argv: Vec<String>,
    opts: RemoteOptions,
) -> Arc<dyn Backend> {
    match RemoteBackend::with_options(name, argv, opts) {
        Ok(b) => Arc::new(b),
        Err(e) => Arc::new(UnavailableBackend::new(name, e.to_string())),
    }
}

/// Suite factory for a driver the user configured under `name`: as [`remote_with_fixtures`],
/// and the backend its `hello` names must be `name` (under the generic name
/// [`cellcheck_contract::drivers::GENERIC_DRIVER`] any is accepted), so results are never filed
/// under another backend's name.
pub fn configured_driver(
    name: &str,
    argv: Vec<String>,
    fx: &cellcheck_fixtures::Fixtures,
) -> Arc<dyn Backend> {
    match RemoteBackend::with_options(name, argv, with_fixtures(fx)) {
        Ok(b) => match hello_name_mismatch(name, &b.driver_info().backend) {
            None => Arc::new(b),
            Some(why) => Arc::new(UnavailableBackend::new(name, why)),
        },
        Err(e) => Arc::new(UnavailableBackend::new(name, e.to_string())),
    }
}

/// Why a driver configured as `configured` may not serve under that name, if it may not.
pub fn hello_name_mismatch(configured: &str, hello: &str) -> Option<String> {
    (configured != cellcheck_contract::drivers::GENERIC_DRIVER && configured != hello).then(|| {
        format!(
            "the driver's hello names its backend {hello:?}, but it was configured as \
             {configured:?}: the names must match"
        )
    })
}
