//! TAP version 13: a plan line, one `ok`/`not ok` per trial, YAML diagnostics for failures.

use super::Report;
use cellcheck_conformance::results::Outcome;

pub fn render(r: &Report) -> String {
    let mut s = format!("TAP version 13\n1..{}\n", r.results.len());
    for (i, t) in r.results.iter().enumerate() {
        let n = i + 1;
        let reason = t.reason.replace(['\n', '\r'], " ");
        match t.outcome {
            Outcome::Pass => s.push_str(&format!("ok {n} - {} # time={}ms\n", t.id, t.duration_ms)),
            // TAP's SKIP and TODO directives are exactly skip and expected failure.
            Outcome::Skip => s.push_str(&format!("ok {n} - {} # SKIP {reason}\n", t.id)),
            Outcome::Xfail => s.push_str(&format!("not ok {n} - {} # TODO {reason}\n", t.id)),
            Outcome::Fail | Outcome::Xpass | Outcome::Flaky => {
                s.push_str(&format!("not ok {n} - {}\n", t.id));
                s.push_str("  ---\n");
                s.push_str(&format!("  outcome: {}\n", t.outcome));
                s.push_str(&format!("  message: {}\n", yaml_str(&t.reason)));
                s.push_str(&format!("  duration_ms: {}\n", t.duration_ms));
                s.push_str("  ...\n");
            }
        }
    }
    s
}

/// A double-quoted YAML scalar (JSON strings are valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

#[cfg(test)]
mod tests {
    use crate::report::fixture;

    #[test]
    fn tap_has_a_plan_and_not_ok_lines() {
        let text = fixture::report().to_tap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "TAP version 13");
        assert_eq!(lines[1], "1..8");
        let results: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
            .collect();
        assert_eq!(results.len(), 8);
        assert_eq!(results[0], "ok 1 - host::exit::code_0 # time=12ms");
        assert_eq!(results[1], "not ok 2 - host::exit::code_42");
        assert_eq!(
            results[2],
            "ok 3 - host::snapshot::restore # SKIP capability snapshot unsupported"
        );
        assert_eq!(
            results[5],
            "not ok 6 - runsc::exit::code_42 # TODO known: HOME=/"
        );
        assert_eq!(results[6], "not ok 7 - runsc::snapshot::restore");
        assert!(text.contains("  outcome: xpass\n"));
        assert!(
            text.contains("  message: \"exit 41, wanted 42 <&\\\"'>\\u0001\"\n"),
            "{text}"
        );
    }
}
