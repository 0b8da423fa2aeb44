//! The host audit's part of every report: per backend, `host audit: clean` or each leftover with
//! what it is and whom it was attributed to, and the cells of killed runs this run recovered.

use super::{escape_xml as x, Report};
use cellcheck_conformance::audit::BackendAudit;
use cellcheck_conformance::ledger::Recovered;

impl Report {
    /// One row per backend that ran trials or has audit lines: a backend whose trials ran with no
    /// audit line says `host audit: not run`, never nothing.
    pub fn audit_rows(&self) -> Vec<BackendAudit> {
        let mut rows = Vec::new();
        for name in self.backend_names() {
            let ran = self.results.iter().any(|t| {
                t.backend == name && t.outcome != cellcheck_conformance::results::Outcome::Skip
            });
            match self.host_audit.iter().find(|a| a.backend == name) {
                Some(a) => rows.push(a.clone()),
                None if ran => rows.push(BackendAudit {
                    backend: name,
                    ..BackendAudit::default()
                }),
                None => {}
            }
        }
        for a in &self.host_audit {
            if !rows.iter().any(|r| r.backend == a.backend) {
                rows.push(a.clone());
            }
        }
        rows
    }
}

fn recovered_line(r: &Recovered) -> String {
    let mut s = format!("recovered {} (left by run {})", r.what(), r.run);
    if r.removed.is_empty() && r.errors.is_empty() {
        s.push_str(": nothing of it was left");
    }
    let parts: Vec<String> = r
        .removed
        .iter()
        .map(|x| format!("removed {x}"))
        .chain(r.errors.iter().map(|e| format!("NOT removed: {e}")))
        .collect();
    if !parts.is_empty() {
        s.push_str(": ");
        s.push_str(&parts.join("; "));
    }
    s
}

/// The console lines printed under the table.
pub fn console(r: &Report) -> String {
    let mut s = String::new();
    for a in r.audit_rows() {
        s.push_str(&format!("{}: {}\n", a.backend, a.verdict()));
        for l in &a.leftovers {
            s.push_str(&format!("  - {} [found by {}]\n", l.what, l.found_by));
        }
        for rec in &a.recovered {
            s.push_str(&format!("  - {}\n", recovered_line(rec)));
        }
    }
    s
}

/// The Markdown section (empty when no backend ran).
pub fn markdown(r: &Report) -> String {
    let rows = r.audit_rows();
    if rows.is_empty() {
        return String::new();
    }
    let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s = "\n## Host audit\n\n".to_string();
    for a in rows {
        s.push_str(&format!("- **{}**: {}\n", a.backend, a.verdict()));
        for l in &a.leftovers {
            s.push_str(&format!(
                "  - {} (found by `{}`)\n",
                flat(&l.what),
                l.found_by
            ));
        }
        for rec in &a.recovered {
            s.push_str(&format!("  - {}\n", flat(&recovered_line(rec))));
        }
    }
    s
}

/// The HTML section (empty when no backend ran).
pub fn html(r: &Report) -> String {
    let rows = r.audit_rows();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = "<h2>Host audit</h2><ul id=\"host-audit\">\n".to_string();
    for a in rows {
        let class = if a.clean() {
            "verdict-pass"
        } else {
            "verdict-fail"
        };
        s.push_str(&format!(
            "<li><b>{}</b>: <span class=\"{class}\">{}</span>",
            x(&a.backend),
            x(&a.verdict())
        ));
        if !a.leftovers.is_empty() || !a.recovered.is_empty() {
            s.push_str("<ul>\n");
            for l in &a.leftovers {
                s.push_str(&format!(
                    "<li>{} (found by <code>{}</code>)</li>\n",
                    x(&l.what),
                    x(&l.found_by)
                ));
            }
            for rec in &a.recovered {
                s.push_str(&format!("<li>{}</li>\n", x(&recovered_line(rec))));
            }
            s.push_str("</ul>");
        }
        s.push_str("</li>\n");
    }
    s.push_str("</ul>\n");
    s
}

#[cfg(test)]
mod tests {
    use crate::report::fixture;

    #[test]
    fn every_format_shows_each_backend_audit_and_what_was_recovered() {
        let r = fixture::report();
        let rows = r.audit_rows();
        let names: Vec<&str> = rows.iter().map(|a| a.backend.as_str()).collect();
        // crun never ran: no row; host and runsc ran.
        assert_eq!(names, ["host", "runsc"]);

        let console = r.table();
        assert!(console.contains("host: host audit: clean\n"), "{console}");
        assert!(
            console.contains("runsc: host audit: 1 leftover(s)\n  - cgroup dir /sys/fs/cgroup/x/cc-ab12cd34-e still exists (cell cc-ab12cd34-e, trial runsc::exit::code_0) [found by runsc::exit::code_0]"),
            "{console}"
        );
        assert!(
            console.contains(
                "recovered cell cc-dead0001-h (left by run r-17): removed process pid 4242"
            ),
            "{console}"
        );

        let md = r.to_markdown();
        assert!(
            md.contains("## Host audit\n\n- **host**: host audit: clean\n"),
            "{md}"
        );
        assert!(md.contains("(found by `runsc::exit::code_0`)"), "{md}");

        let html = r.to_html();
        assert!(
            html.contains("<b>host</b>: <span class=\"verdict-pass\">host audit: clean</span>"),
            "{html}"
        );
        assert!(html.contains("<span class=\"verdict-fail\">host audit: 1 leftover(s)</span>"));
        assert!(html.contains("recovered cell cc-dead0001-h"));

        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["host_audit"][1]["backend"], "runsc");
        assert_eq!(v["host_audit"][1]["recovered"][0]["cell"], "cc-dead0001-h");
        assert_eq!(
            v["host_audit"][1]["leftovers"][0]["found_by"],
            "runsc::exit::code_0"
        );

        // A backend whose trials ran but left no audit line is said so, not shown clean.
        let mut r = fixture::report();
        r.host_audit.clear();
        assert!(r.table().contains("host: host audit: not run\n"));
    }
}
