//! The driver protocol's messages (version 1), shared by the client and `cellcheck-driver`.
//!
//! One JSON object per line. A request is `{"v":1,"id":N,"op":"...","params":{...}}` (optionally
//! `"deadline_ms"`); its response is `{"v":1,"id":N,"result":...}` or `{"v":1,"id":N,"error":E}`
//! where `E` is a serialised [`CellError`]. See `docs/protocol.md`.

use std::collections::BTreeMap;

use cellcheck_contract::{
    Availability, Capabilities, Capability, CellDocument, CellError, ExecRequest, SnapshotRef,
    Support,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The protocol's JSON Schema (draft 2020-12): every message, and each op's result under
/// `$defs/<op>_result`.
pub const SCHEMA: &str = include_str!("../schema/protocol.schema.json");

/// Longest line either side accepts; a longer one is a protocol violation.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Every operation of the protocol, by wire name.
pub const OPERATIONS: &[&str] = &[
    "hello",
    "capabilities",
    "attributes",
    "preflight",
    "create",
    "wait",
    "exec",
    "destroy",
    "list",
    "footprint",
    "snapshot",
    "restore",
    "delete_snapshot",
    "pause",
    "resume",
    "shutdown",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    pub id: u64,
    pub op: String,
    #[serde(default)]
    pub params: Value,
    /// How long the client waits for the answer; a driver may use it to bound its own work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub v: u32,
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

impl Response {
    pub fn ok(id: u64, result: Value) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: u64, e: &CellError) -> Self {
        Response {
            v: PROTOCOL_VERSION,
            id,
            result: None,
            error: Some(serde_json::to_value(e).unwrap_or(Value::Null)),
        }
    }

    /// The outcome this response carries, or why it is not a well-formed response.
    pub fn outcome(self) -> Result<Result<Value, CellError>, String> {
        if self.v != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} (expected {PROTOCOL_VERSION})",
                self.v
            ));
        }
        match (self.result, self.error) {
            (Some(r), None) => Ok(Ok(r)),
            (None, Some(e)) => serde_json::from_value::<CellError>(e.clone())
                .map(Err)
                .map_err(|err| format!("error object {e} is not a cellcheck error: {err}")),
            (Some(_), Some(_)) => Err("response has both result and error".into()),
            (None, None) => Err("response has neither result nor error".into()),
        }
    }
}

/// `hello` params: the versions the client speaks, and the fixtures it built (when it has them),
/// so a driver need not guess where the cell root and the probe are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloParams {
    pub versions: Vec<u32>,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixtures: Option<FixturePaths>,
}

/// Absolute host paths of the built fixtures, as `hello` carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixturePaths {
    /// The read-only root every cell runs in: busybox, the probe at `/usr/bin/cellcheck-probe`.
    pub rootfs: String,
    /// The static probe binary (also inside `rootfs`).
    pub probe: String,
    /// The host backend's static cell init.
    pub host_init: String,
}

impl FixturePaths {
    pub fn of(fx: &cellcheck_fixtures::Fixtures) -> Self {
        FixturePaths {
            rootfs: fx.rootfs.display().to_string(),
            probe: fx.probe.display().to_string(),
            host_init: fx.host_init.display().to_string(),
        }
    }
}

/// `hello` result: the version chosen and who is answering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    pub version: u32,
    /// The backend's short name (e.g. `host`, `runc-python`).
    pub backend: String,
    /// Free text naming the driver program and its version.
    pub driver: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub document: CellDocument,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    pub id: String,
    pub request: ExecRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreParams {
    pub snapshot: SnapshotRef,
    pub new_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    pub snapshot: SnapshotRef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListResult {
    pub ids: Vec<String>,
}

/// Capabilities on the wire: `{"exec":{"support":"supported"},"snapshot":{"support":"unsupported","reason":"..."}}`.
pub fn capabilities_to_wire(c: &Capabilities) -> Value {
    let map: BTreeMap<&str, Support> = c.iter().map(|(cap, s)| (cap.as_str(), s)).collect();
    serde_json::to_value(map).unwrap_or(Value::Null)
}

/// Names this crate does not know are ignored (a newer driver may declare more); missing ones read
/// as unsupported, as [`Capabilities`] always does.
pub fn capabilities_from_wire(v: &Value) -> Result<Capabilities, String> {
    let map: BTreeMap<String, Support> =
        serde_json::from_value(v.clone()).map_err(|e| format!("capabilities: {e}"))?;
    let mut caps = Capabilities::default();
    for cap in Capability::ALL {
        caps = match map.get(cap.as_str()) {
            Some(Support::Supported) => caps.with(cap),
            Some(Support::Unsupported { reason }) => caps.without(cap, reason.clone()),
            None => caps.without(cap, format!("driver does not declare {cap}")),
        };
    }
    Ok(caps)
}

/// Attributes on the wire: a flat string map.
pub fn attributes_from_wire(v: &Value) -> Result<BTreeMap<String, String>, String> {
    serde_json::from_value(v.clone()).map_err(|e| format!("attributes: {e}"))
}

/// Availability on the wire is the contract's own serde form.
pub fn availability_from_wire(v: &Value) -> Result<Availability, String> {
    serde_json::from_value(v.clone()).map_err(|e| format!("preflight: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellcheck_contract::ResourceKind;

    #[test]
    fn error_response_round_trips_every_variant_shape() {
        let e = CellError::NotFound {
            kind: ResourceKind::Program,
            id: "/nope".into(),
        };
        let line = serde_json::to_string(&Response::err(4, &e)).unwrap();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.id, 4);
        assert_eq!(back.outcome().unwrap(), Err(e));
    }

    #[test]
    fn malformed_responses_are_named() {
        let both = Response {
            v: 1,
            id: 1,
            result: Some(Value::Null),
            error: Some(Value::Null),
        };
        assert!(both.outcome().unwrap_err().contains("both"));
        let alien = Response {
            v: 1,
            id: 1,
            result: None,
            error: Some(serde_json::json!({"error": "teapot"})),
        };
        assert!(alien
            .outcome()
            .unwrap_err()
            .contains("not a cellcheck error"));
        let old = Response::ok(1, Value::Null);
        let old = Response { v: 0, ..old };
        assert!(old.outcome().unwrap_err().contains("version"));
    }

    #[test]
    fn capabilities_survive_the_wire_and_ignore_unknown_names() {
        let c = Capabilities::default()
            .with(Capability::Exec)
            .without(Capability::Snapshot, "criu is broken here");
        let mut wire = capabilities_to_wire(&c);
        wire["teleport"] = serde_json::json!({"support": "supported"});
        let back = capabilities_from_wire(&wire).unwrap();
        assert!(back.has(Capability::Exec));
        assert_eq!(
            back.support(Capability::Snapshot),
            Support::Unsupported {
                reason: "criu is broken here".into()
            }
        );
        assert!(!back.has(Capability::Pause));
    }
}
