//! Typed operations over a [`Conn`]: each contract call becomes one request with its deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use cellcheck_contract::{
    Availability, Capabilities, CellDocument, CellError, CellHandle, ExecRequest, ExitReport,
    Footprint, SnapshotRef, TeardownReport,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::conn::Conn;
use crate::protocol::{
    attributes_from_wire, availability_from_wire, capabilities_from_wire, FixturePaths,
    HelloParams, HelloResult, ListResult, PROTOCOL_VERSION,
};

/// Deadlines for requests. A request past its deadline fails, and the driver is killed (a driver
/// that does not answer cannot be trusted with the next request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// hello, capabilities, attributes.
    pub handshake: Duration,
    /// Most operations (create, destroy, exec setup, list, footprint, pause...).
    pub op: Duration,
    /// `wait` (and `exec`) on a workload without its own timeout.
    pub wait: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            handshake: Duration::from_secs(10),
            op: Duration::from_secs(60),
            wait: Duration::from_secs(300),
        }
    }
}

impl Deadlines {
    /// A workload with its own bound gets that bound plus the ordinary operation deadline.
    pub fn for_bounded(&self, bound_ms: Option<u64>) -> Duration {
        match bound_ms {
            Some(ms) => Duration::from_millis(ms) + self.op,
            None => self.wait,
        }
    }
}

/// What the handshake learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    pub version: u32,
    pub backend: String,
    pub driver: String,
    pub capabilities: Capabilities,
    pub attributes: BTreeMap<String, String>,
}

fn decode<T: DeserializeOwned>(conn: &Conn, op: &str, v: Value) -> Result<T, CellError> {
    serde_json::from_value(v.clone()).map_err(|e| {
        CellError::failure(format!(
            "{}: malformed {op} result {}: {e}",
            conn.label(),
            crate::short(&v)
        ))
    })
}

fn decode_with<T>(conn: &Conn, op: &str, r: Result<T, String>) -> Result<T, CellError> {
    r.map_err(|e| CellError::failure(format!("{}: malformed {op} result: {e}", conn.label())))
}

/// hello + capabilities + attributes, blocking (used where no runtime may be running). `hello`
/// tells the driver the fixtures' paths when given.
pub fn handshake_blocking(
    conn: &Conn,
    d: &Deadlines,
    fixtures: Option<&FixturePaths>,
) -> Result<DriverInfo, CellError> {
    let hello = conn.call_blocking("hello", hello_params(fixtures), d.handshake)?;
    let caps = conn.call_blocking("capabilities", json!({}), d.handshake)?;
    let attrs = conn.call_blocking("attributes", json!({}), d.handshake)?;
    info(conn, hello, caps, attrs)
}

/// hello + capabilities + attributes.
pub async fn handshake(
    conn: &Conn,
    d: &Deadlines,
    fixtures: Option<&FixturePaths>,
) -> Result<DriverInfo, CellError> {
    let hello = conn
        .call("hello", hello_params(fixtures), d.handshake)
        .await?;
    let caps = conn.call("capabilities", json!({}), d.handshake).await?;
    let attrs = conn.call("attributes", json!({}), d.handshake).await?;
    info(conn, hello, caps, attrs)
}

fn hello_params(fixtures: Option<&FixturePaths>) -> Value {
    serde_json::to_value(HelloParams {
        versions: vec![PROTOCOL_VERSION],
        client: format!("cellcheck-remote {}", env!("CARGO_PKG_VERSION")),
        fixtures: fixtures.cloned(),
    })
    .expect("hello params serialize")
}

fn info(conn: &Conn, hello: Value, caps: Value, attrs: Value) -> Result<DriverInfo, CellError> {
    let h: HelloResult = decode(conn, "hello", hello)?;
    if h.version != PROTOCOL_VERSION {
        return Err(CellError::Unavailable {
            reason: format!(
                "{}: driver chose protocol version {}, this client speaks {PROTOCOL_VERSION}",
                conn.label(),
                h.version
            ),
        });
    }
    Ok(DriverInfo {
        version: h.version,
        backend: h.backend,
        driver: h.driver,
        capabilities: decode_with(conn, "capabilities", capabilities_from_wire(&caps))?,
        attributes: decode_with(conn, "attributes", attributes_from_wire(&attrs))?,
    })
}

pub async fn preflight(conn: &Conn, d: &Deadlines) -> Result<Availability, CellError> {
    let v = conn.call("preflight", json!({}), d.op).await?;
    decode_with(conn, "preflight", availability_from_wire(&v))
}

pub async fn create(
    conn: &Conn,
    d: &Deadlines,
    doc: &CellDocument,
) -> Result<CellHandle, CellError> {
    let v = conn
        .call("create", json!({ "document": doc }), d.op)
        .await?;
    decode(conn, "create", v)
}

pub async fn wait(conn: &Conn, deadline: Duration, id: &str) -> Result<ExitReport, CellError> {
    let v = conn.call("wait", json!({ "id": id }), deadline).await?;
    decode(conn, "wait", v)
}

pub async fn exec(
    conn: &Conn,
    d: &Deadlines,
    id: &str,
    req: &ExecRequest,
) -> Result<ExitReport, CellError> {
    let deadline = d.for_bounded(req.timeout_ms);
    let v = conn
        .call("exec", json!({ "id": id, "request": req }), deadline)
        .await?;
    decode(conn, "exec", v)
}

pub async fn destroy(conn: &Conn, d: &Deadlines, id: &str) -> Result<TeardownReport, CellError> {
    let v = conn.call("destroy", json!({ "id": id }), d.op).await?;
    decode(conn, "destroy", v)
}

pub async fn list(conn: &Conn, d: &Deadlines) -> Result<Vec<String>, CellError> {
    let v = conn.call("list", json!({}), d.op).await?;
    decode::<ListResult>(conn, "list", v).map(|l| l.ids)
}

pub fn footprint_blocking(conn: &Conn, d: &Deadlines, id: &str) -> Result<Footprint, CellError> {
    let v = conn.call_blocking("footprint", json!({ "id": id }), d.op)?;
    decode(conn, "footprint", v)
}

pub async fn snapshot(conn: &Conn, d: &Deadlines, id: &str) -> Result<SnapshotRef, CellError> {
    let v = conn.call("snapshot", json!({ "id": id }), d.op).await?;
    decode(conn, "snapshot", v)
}

pub async fn restore(
    conn: &Conn,
    d: &Deadlines,
    snap: &SnapshotRef,
    new_id: &str,
) -> Result<CellHandle, CellError> {
    let v = conn
        .call(
            "restore",
            json!({ "snapshot": snap, "new_id": new_id }),
            d.op,
        )
        .await?;
    decode(conn, "restore", v)
}

pub async fn delete_snapshot(
    conn: &Conn,
    d: &Deadlines,
    snap: &SnapshotRef,
) -> Result<(), CellError> {
    conn.call("delete_snapshot", json!({ "snapshot": snap }), d.op)
        .await
        .map(drop)
}

pub async fn pause(conn: &Conn, d: &Deadlines, id: &str) -> Result<(), CellError> {
    conn.call("pause", json!({ "id": id }), d.op)
        .await
        .map(drop)
}

pub async fn resume(conn: &Conn, d: &Deadlines, id: &str) -> Result<(), CellError> {
    conn.call("resume", json!({ "id": id }), d.op)
        .await
        .map(drop)
}

/// Ask the driver to destroy everything and exit (closing its input does the same).
pub async fn shutdown(conn: &Conn, d: &Deadlines) -> Result<(), CellError> {
    conn.call("shutdown", json!({}), d.op).await.map(drop)
}
