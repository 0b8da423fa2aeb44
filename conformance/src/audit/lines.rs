//! The audit file's lines ([`record`] writes them, one per closed window and per recovered
//! cell) and what a run's lines say per backend ([`BackendAudit`]), for the reports.

use serde::{Deserialize, Serialize};

use super::*;
use crate::ledger::Recovered;

/// One line of the audit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditLine {
    /// One audit window of one backend closed (under nextest: one per trial).
    Window(WindowLine),
    /// A cell a dead harness left was reconciled at the start of a run.
    Recovered(Recovered),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowLine {
    pub backend: String,
    /// The trial whose end closed the window.
    pub closed_by: String,
    pub clean: bool,
    /// Each leftover described, with the cell and trial it mentions when it mentions one.
    #[serde(default)]
    pub leftovers: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// What the audit added to the closing trial (snapshots and comparisons).
    #[serde(default)]
    pub audit_ms: u64,
    /// The trial's own residue checks (after each destroy and in `assert_clean`), inside
    /// `trial_ms` and apart from `audit_ms`.
    #[serde(default)]
    pub check_ms: u64,
    #[serde(default)]
    pub trial_ms: u64,
}

impl AuditLine {
    /// Append this line to the audit file (see [`record`]).
    pub fn record(&self) {
        match serde_json::to_value(self) {
            Ok(v) => record(&v),
            Err(e) => eprintln!("cellcheck: cannot encode an audit line: {e}"),
        }
    }
}

/// The lines of an audit file; a missing file has none. A line that is not an audit line is an
/// error naming the file and the line, never skipped.
pub fn read_lines(path: &Path) -> Result<Vec<AuditLine>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: not an audit line: {e}", path.display(), i + 1))
        })
        .collect()
}

/// One leftover the audit found, and the trial whose window found it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FoundLeftover {
    /// What it is, with the cell and trial it mentions when it mentions one.
    pub what: String,
    /// The trial that closed the window (the one it is attributed to when it names no cell).
    pub found_by: String,
}

/// What the host audit said about one backend over a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendAudit {
    pub backend: String,
    /// How many audit windows of the backend closed (0: the audit never ran for it).
    pub windows: usize,
    /// Empty when every window was clean.
    pub leftovers: Vec<FoundLeftover>,
    /// Cells of killed runs recovered at this run's start, each thing removed by name.
    pub recovered: Vec<Recovered>,
    /// What was seen but not pinned on the backend (printed, never failed).
    pub warnings: Vec<String>,
    /// Summed over the windows: the audit's share, the trials' own residue checks and the
    /// trials' whole time.
    pub audit_ms: u64,
    #[serde(default)]
    pub check_ms: u64,
    pub trial_ms: u64,
}

impl BackendAudit {
    pub fn clean(&self) -> bool {
        self.windows > 0 && self.leftovers.is_empty()
    }

    /// `host audit: clean`, `host audit: N leftover(s)` or `host audit: not run`.
    pub fn verdict(&self) -> String {
        if self.windows == 0 {
            "host audit: not run".into()
        } else if self.leftovers.is_empty() {
            "host audit: clean".into()
        } else {
            format!("host audit: {} leftover(s)", self.leftovers.len())
        }
    }
}

/// The audit lines of a run, per backend, in backend name order.
pub fn per_backend(lines: &[AuditLine]) -> Vec<BackendAudit> {
    fn of<'a>(by: &'a mut BTreeMap<String, BackendAudit>, b: &str) -> &'a mut BackendAudit {
        by.entry(b.to_string()).or_insert_with(|| BackendAudit {
            backend: b.to_string(),
            ..BackendAudit::default()
        })
    }
    let mut by: BTreeMap<String, BackendAudit> = BTreeMap::new();
    for l in lines {
        match l {
            AuditLine::Window(w) => {
                let a = of(&mut by, &w.backend);
                a.windows += 1;
                a.audit_ms += w.audit_ms;
                a.check_ms += w.check_ms;
                a.trial_ms += w.trial_ms;
                a.leftovers
                    .extend(w.leftovers.iter().map(|what| FoundLeftover {
                        what: what.clone(),
                        found_by: w.closed_by.clone(),
                    }));
                a.warnings.extend(w.warnings.iter().cloned());
            }
            AuditLine::Recovered(r) => of(&mut by, &r.backend).recovered.push(r.clone()),
        }
    }
    let mut out: Vec<BackendAudit> = by.into_values().collect();
    for a in &mut out {
        a.leftovers.sort();
        a.leftovers.dedup();
        a.warnings.sort();
        a.warnings.dedup();
    }
    out
}

/// Several runs' audits (shards of one class) as one, per backend.
pub fn merge(parts: impl IntoIterator<Item = BackendAudit>) -> Vec<BackendAudit> {
    let mut by: BTreeMap<String, BackendAudit> = BTreeMap::new();
    for p in parts {
        let a = by.entry(p.backend.clone()).or_insert_with(|| BackendAudit {
            backend: p.backend.clone(),
            ..BackendAudit::default()
        });
        a.windows += p.windows;
        a.audit_ms += p.audit_ms;
        a.check_ms += p.check_ms;
        a.trial_ms += p.trial_ms;
        a.leftovers.extend(p.leftovers);
        a.recovered.extend(p.recovered);
        a.warnings.extend(p.warnings);
    }
    let mut out: Vec<BackendAudit> = by.into_values().collect();
    for a in &mut out {
        a.leftovers.sort();
        a.leftovers.dedup();
        a.recovered.dedup();
        a.warnings.sort();
        a.warnings.dedup();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(backend: &str, trial: &str, leftovers: &[&str]) -> AuditLine {
        AuditLine::Window(WindowLine {
            backend: backend.into(),
            closed_by: trial.into(),
            clean: leftovers.is_empty(),
            leftovers: leftovers.iter().map(|s| s.to_string()).collect(),
            warnings: Vec::new(),
            audit_ms: 3,
            check_ms: 1,
            trial_ms: 10,
        })
    }

    #[test]
    fn lines_round_trip_and_add_up_per_backend() {
        let lines = vec![
            window("host", "host::exit::code_0", &[]),
            window(
                "runc",
                "runc::exit::code_0",
                &["path /run/x-cc-1 still exists (cell cc-1, trial runc::exit::code_0)"],
            ),
            window("runc", "runc::exit::code_1", &[]),
            AuditLine::Recovered(Recovered {
                backend: "runc".into(),
                cell: "cc-9".into(),
                run: "r1".into(),
                removed: vec!["process pid 7".into()],
                errors: Vec::new(),
            }),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let text: String = lines
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n")
            .collect();
        assert!(text.starts_with("{\"kind\":\"window\""), "{text}");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_lines(&path).unwrap(), lines);
        assert_eq!(read_lines(&dir.path().join("none")).unwrap(), vec![]);

        let per = per_backend(&lines);
        assert_eq!(per.len(), 2);
        assert_eq!(per[0].verdict(), "host audit: clean");
        assert_eq!(
            (per[0].windows, per[0].audit_ms, per[0].trial_ms),
            (1, 3, 10)
        );
        assert_eq!(per[1].verdict(), "host audit: 1 leftover(s)");
        assert_eq!(per[1].leftovers[0].found_by, "runc::exit::code_0");
        assert_eq!(per[1].recovered[0].cell, "cc-9");
        let twice = merge(per.iter().cloned().chain(per.iter().cloned()));
        assert_eq!(twice[1].windows, 4);
        assert_eq!(
            twice[1].leftovers, per[1].leftovers,
            "the same leftover once"
        );

        std::fs::write(&path, "{\"kind\":\"window\"}\n").unwrap();
        let e = read_lines(&path).unwrap_err();
        assert!(e.contains("audit.jsonl:1: not an audit line"), "{e}");
    }
}
