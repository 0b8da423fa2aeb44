//! The results file: with `CELLCHECK_RESULTS=<path>`, every trial appends one JSON line.
//!
//! Each line is written with a single `write` on an `O_APPEND` descriptor, so lines from
//! concurrent trial processes never interleave. When lines are written:
//! - a trial that runs writes its line when it ends (`pass`, `fail`, `xfail`, `xpass`, or `skip`
//!   when it was forced to run but cannot);
//! - an ignored trial writes a `skip` line when a run selects it without running it (a plain
//!   `cargo test` run) and when it is listed with `--list --ignored` (nextest lists ignored trials
//!   that way and never starts them).
//!
//! A trial may therefore appear more than once (listed, then forced to run); readers keep the last
//! line per `id`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
    Xfail,
    Xpass,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultLine {
    /// The trial name, `{backend}::{family}::{scenario}`.
    pub id: String,
    pub backend: String,
    pub family: String,
    pub scenario: String,
    pub outcome: Outcome,
    pub reason: String,
    pub duration_ms: u64,
    pub attributes: BTreeMap<String, String>,
}

/// Append `line` to `CELLCHECK_RESULTS` if set. Errors are reported on stderr, never fatal: a
/// results file is a report, not part of the verdict.
pub fn record(line: &ResultLine) {
    let Some(path) = std::env::var_os("CELLCHECK_RESULTS") else {
        return;
    };
    if let Err(e) = append(std::path::Path::new(&path), line) {
        eprintln!("cellcheck: cannot append to results file {path:?}: {e}");
    }
}

pub fn append(path: &std::path::Path, line: &ResultLine) -> std::io::Result<()> {
    let mut buf = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)?;
    let n = f.write(&buf)?;
    if n != buf.len() {
        return Err(std::io::Error::other(format!(
            "short write: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_append_and_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let mut l = ResultLine {
            id: "host::exit::code_42".into(),
            backend: "host".into(),
            family: "exit".into(),
            scenario: "code_42".into(),
            outcome: Outcome::Xfail,
            reason: "a \"quoted\"\nreason".into(),
            duration_ms: 12,
            attributes: BTreeMap::from([("k".into(), "v".into())]),
        };
        append(&p, &l).unwrap();
        l.outcome = Outcome::Skip;
        append(&p, &l).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("\"outcome\":\"xfail\""), "{}", lines[0]);
        let back: ResultLine = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(back, l);
    }
}
