//! `matrix.md`: scenarios × backends, for a PR comment or a job summary.

use super::{outcome_label, Report};
use cellcheck_conformance::results::Outcome;

pub fn render(r: &Report) -> String {
    let backends = r.backend_names();
    let mut s = format!(
        "# cellcheck conformance: {}\n\n{}\n\n",
        r.host["class"].as_str().unwrap_or("unknown class"),
        r.summary
    );
    s.push_str("| scenario |");
    for b in &backends {
        s.push_str(&format!(" {b} |"));
    }
    s.push_str("\n| --- |");
    s.push_str(&" --- |".repeat(backends.len()));
    s.push('\n');
    for (scenario, row) in r.grid() {
        s.push_str(&format!("| `{scenario}` |"));
        for b in &backends {
            let cell = match row.get(b) {
                None => "".to_string(),
                Some(t) => match t.outcome {
                    Outcome::Skip => "⏭ skip".to_string(),
                    o => format!("{} {} {} ms", mark(o), outcome_label(o), t.duration_ms),
                },
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    let unavailable: Vec<_> = r.backends.iter().filter(|b| !b.usable).collect();
    if !unavailable.is_empty() {
        s.push_str("\n## Unavailable on this host\n\n");
        for b in unavailable {
            s.push_str(&format!("- **{}**: {}\n", b.name, cell_text(&b.why)));
        }
    }
    s.push_str(&super::audit::markdown(r));
    s.push_str(&r.reasons_section("\n## Reasons\n\n", "", |t| {
        format!(
            "- `{}` {}: {}\n",
            t.id,
            outcome_label(t.outcome),
            cell_text(&t.reason)
        )
    }));
    s
}

fn mark(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "✅",
        Outcome::Fail => "❌",
        Outcome::Skip => "⏭",
        Outcome::Xfail => "🟡",
        Outcome::Xpass => "🟣",
        Outcome::Flaky => "🟠",
    }
}

/// Reasons may hold anything: keep one line and no table breaks.
fn cell_text(s: &str) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use crate::report::fixture;

    #[test]
    fn markdown_table_has_a_row_per_scenario_and_a_column_per_backend() {
        let md = fixture::report().to_markdown();
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows[0], "| scenario | host | runsc | crun |");
        assert_eq!(rows[1], "| --- | --- | --- | --- |");
        // exit::code_0, exit::code_42, isolation::env_exact, snapshot::corrupted_image,
        // snapshot::restore
        assert_eq!(rows.len(), 2 + 5, "{md}");
        assert_eq!(
            rows[2],
            "| `exit::code_0` | ✅ pass 12 ms | ✅ pass 310 ms |  |"
        );
        assert!(rows[3].contains("❌ FAIL 15 ms") && rows[3].contains("🟡 xfail 320 ms"));
        assert!(md.contains("- **crun**: crun: cannot use hybrid cgroups"));
        assert!(md.contains("`host::snapshot::restore` skip: capability snapshot unsupported"));
        for row in &rows {
            assert_eq!(row.matches(" |").count(), 4, "{row}");
        }
    }
}
