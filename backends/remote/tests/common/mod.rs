//! Shared by the integration tests: fixtures, a schema-checking tap, a residue check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cellcheck_contract::Footprint;
use cellcheck_remote::{Direction, RemoteOptions};
use serde_json::Value;

pub fn fixtures() -> cellcheck_fixtures::Fixtures {
    cellcheck_fixtures::ensure().expect("build the fixtures")
}

pub fn python_driver() -> PathBuf {
    cellcheck_fixtures::workspace_root().join("fixtures/python-driver/cellcheck_runc_driver.py")
}

/// Why runc cannot be used here, if it cannot.
pub fn runc_usable() -> Result<(), String> {
    let out = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .map_err(|e| format!("runc: {e}"))?;
    if !out.status.success() {
        return Err(format!("runc --version: {}", out.status));
    }
    if unsafe { libc::geteuid() } != 0 {
        return Err("runc needs root here".into());
    }
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    Ok(())
}

pub fn unique_id(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Validates every protocol line against `schema/protocol.schema.json`: requests and responses
/// against the message schema, and each result against the schema of its request's op.
#[derive(Clone)]
pub struct SchemaTap {
    inner: Arc<TapState>,
}

struct TapState {
    message: jsonschema::Validator,
    results: HashMap<String, jsonschema::Validator>,
    ops: Mutex<HashMap<u64, String>>,
    seen: Mutex<usize>,
    errors: Mutex<Vec<String>>,
}

pub fn schema() -> Value {
    serde_json::from_str(cellcheck_remote::protocol::SCHEMA).expect("schema is JSON")
}

impl SchemaTap {
    pub fn new() -> Self {
        let schema = schema();
        let message = jsonschema::validator_for(&schema).expect("schema compiles");
        let mut results = HashMap::new();
        for op in cellcheck_remote::protocol::OPERATIONS {
            let mut sub = serde_json::json!({
                "$schema": schema["$schema"],
                "$defs": schema["$defs"],
            });
            sub["$ref"] = Value::String(format!("#/$defs/{op}_result"));
            results.insert(
                op.to_string(),
                jsonschema::validator_for(&sub).expect("result schema compiles"),
            );
        }
        SchemaTap {
            inner: Arc::new(TapState {
                message,
                results,
                ops: Mutex::new(HashMap::new()),
                seen: Mutex::new(0),
                errors: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn options(&self) -> RemoteOptions {
        let me = self.clone();
        RemoteOptions {
            tap: Some(Arc::new(move |d, line| me.check(d, line))),
            ..RemoteOptions::default()
        }
    }

    /// [`SchemaTap::options`] whose `hello` names the built fixtures, as the suite's do.
    pub fn options_with_fixtures(&self, fx: &cellcheck_fixtures::Fixtures) -> RemoteOptions {
        RemoteOptions {
            fixtures: Some(cellcheck_remote::protocol::FixturePaths::of(fx)),
            ..self.options()
        }
    }

    pub fn check(&self, d: Direction, line: &str) {
        let s = &self.inner;
        *s.seen.lock().unwrap() += 1;
        let mut errs = Vec::new();
        match serde_json::from_str::<Value>(line) {
            Err(e) => errs.push(format!("not JSON: {e}")),
            Ok(v) => {
                errs.extend(
                    s.message
                        .iter_errors(&v)
                        .map(|e| format!("{e} at {}", e.instance_path)),
                );
                let id = v["id"].as_u64().unwrap_or(u64::MAX);
                match d {
                    Direction::ToDriver => {
                        if let Some(op) = v["op"].as_str() {
                            s.ops.lock().unwrap().insert(id, op.to_string());
                        }
                    }
                    Direction::FromDriver => {
                        let op = s.ops.lock().unwrap().get(&id).cloned();
                        if let (Some(op), Some(result)) = (op, v.get("result")) {
                            match s.results.get(&op) {
                                Some(val) => {
                                    errs.extend(val.iter_errors(result).map(|e| {
                                        format!("{op} result: {e} at {}", e.instance_path)
                                    }))
                                }
                                None => errs.push(format!("result of unknown op {op}")),
                            }
                        }
                    }
                }
            }
        }
        if !errs.is_empty() {
            s.errors
                .lock()
                .unwrap()
                .push(format!("{d:?} {line}: {}", errs.join("; ")));
        }
    }

    pub fn seen(&self) -> usize {
        *self.inner.seen.lock().unwrap()
    }

    pub fn errors(&self) -> Vec<String> {
        self.inner.errors.lock().unwrap().clone()
    }

    /// Every line was valid, and at least `min` lines went by.
    pub fn assert_all_valid(&self, min: usize) {
        let errs = self.errors();
        assert!(
            errs.is_empty(),
            "protocol lines off-schema:\n{}",
            errs.join("\n")
        );
        assert!(
            self.seen() >= min,
            "only {} protocol lines seen",
            self.seen()
        );
    }
}

/// What of `fp` (and processes carrying `marker`) still exists on the host.
pub fn residue(fp: &Footprint, marker: &str) -> Vec<String> {
    let mut left = Vec::new();
    for p in fp.paths.iter().chain(&fp.cgroup_dirs) {
        if p.exists() {
            left.push(format!("path {}", p.display()));
        }
    }
    let me = std::process::id().to_string();
    let markers: Vec<&str> = fp
        .process_markers
        .iter()
        .map(String::as_str)
        .chain([marker])
        .collect();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
                continue;
            }
            for f in ["cmdline", "environ"] {
                let Ok(bytes) = std::fs::read(e.path().join(f)) else {
                    continue;
                };
                for m in &markers {
                    if !m.is_empty() && bytes.windows(m.len()).any(|w| w == m.as_bytes()) {
                        left.push(format!("process {name} ({f} has {m:?})"));
                    }
                }
            }
        }
    }
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mi.lines() {
            for m in &fp.mount_markers {
                if line.contains(m.as_str()) {
                    left.push(format!("mount {line}"));
                }
            }
        }
    }
    left
}

pub fn assert_no_residue(fp: &Footprint, marker: &str) {
    let left = residue(fp, marker);
    assert!(left.is_empty(), "residue of {marker}: {left:#?}");
}
