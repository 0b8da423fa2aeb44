//! `report.html`: one self-contained page (no scripts, no external assets): a summary per backend
//! first, then why the run failed, each failing trial expandable (`<details>`) with its full message
//! and rerun line, a colour-coded scenarios × backends matrix with durations and reasons as
//! tooltips, and the skips and known failures grouped by reason.

use super::{escape_xml as x, outcome_label, Report};
use cellcheck_conformance::results::Outcome;

/// Cell colours; the pass green is what the screenshot test looks for.
#[cfg(test)]
pub const PASS_RGB: (u8, u8, u8) = (0x1a, 0x7f, 0x37);
const STYLE: &str = "
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1f2328; background: #ffffff; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #57606a; margin-bottom: 16px; }
table { border-collapse: collapse; margin-bottom: 20px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
td.o { min-width: 90px; font-weight: 600; }
td.pass { background: #1a7f37; color: #ffffff; }
td.fail { background: #cf222e; color: #ffffff; }
td.skip { background: #d0d7de; color: #24292f; }
td.xfail { background: #bf8700; color: #ffffff; }
td.xpass { background: #8250df; color: #ffffff; }
td.flaky { background: #fb8500; color: #ffffff; }
td.none { background: #ffffff; }
.verdict-pass { color: #1a7f37; } .verdict-fail { color: #cf222e; }
ul { padding-left: 20px; } li { margin: 2px 0; }
code, pre { font: 12px ui-monospace, monospace; }
pre { background: #f6f8fa; padding: 6px 8px; white-space: pre-wrap; margin: 4px 0; }
details { margin: 4px 0; } summary { cursor: pointer; }
td.n { text-align: right; } td.bad { color: #cf222e; font-weight: 600; }
";

pub fn render(r: &Report) -> String {
    let class = r.host["class"].as_str().unwrap_or("unknown class");
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    s.push_str(&format!(
        "<title>cellcheck conformance: {}</title>\n",
        x(class)
    ));
    s.push_str(&format!("<style>{STYLE}</style></head><body>\n"));
    s.push_str(&body(r));
    s.push_str("</body></html>\n");
    s
}

/// One page holding several runs (`cargo xtask gate`: one section per runner class).
pub fn render_many(title: &str, verdict: &str, reports: &[&Report]) -> String {
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    s.push_str(&format!("<title>{}</title>\n", x(title)));
    s.push_str(&format!("<style>{STYLE}</style></head><body>\n"));
    s.push_str(&format!(
        "<h1>{}</h1>\n<div class=\"meta\">{}</div>\n",
        x(title),
        x(verdict)
    ));
    for r in reports {
        s.push_str(&body(r));
    }
    s.push_str("</body></html>\n");
    s
}

/// Everything of one run's page between `<body>` and `</body>`.
fn body(r: &Report) -> String {
    let class = r.host["class"].as_str().unwrap_or("unknown class");
    let mut s = String::new();
    s.push_str(&format!("<h1>cellcheck conformance: {}</h1>\n", x(class)));
    let (vclass, vtext) = if r.passed() {
        ("verdict-pass", "run passed".to_string())
    } else {
        (
            "verdict-fail",
            format!("run failed: {} problem(s)", r.problems.len()),
        )
    };
    s.push_str(&format!(
        "<div class=\"meta\">{} · <span class=\"{vclass}\">{vtext}</span> · kernel {}</div>\n",
        x(&r.summary.to_string()),
        x(r.host["kernel"].as_str().unwrap_or("?"))
    ));
    s.push_str(&backends_table(r));
    if !r.problems.is_empty() {
        s.push_str("<h2>Why the run failed</h2><ul>\n");
        for p in &r.problems {
            s.push_str(&format!(
                "<li><b>{}</b> {} {}</li>\n",
                x(&p.kind.to_string()),
                p.trial
                    .as_deref()
                    .map(|t| format!("<code>{}</code>", x(t)))
                    .unwrap_or_default(),
                x(&p.message)
            ));
        }
        s.push_str("</ul>\n");
    }
    s.push_str(&failures(r));
    s.push_str(&super::audit::html(r));
    s.push_str(&matrix(r));
    s.push_str(&reasons(r));
    s
}

/// One row per backend: availability (the probe's evidence as tooltip) and its outcome counts.
fn backends_table(r: &Report) -> String {
    let mut s = String::from(
        "<h2>Backends</h2><table id=\"backends\"><thead><tr><th>backend</th><th>host</th>\
         <th>pass</th><th>fail</th><th>skip</th><th>xfail</th><th>xpass</th><th>flaky</th>\
         <th>time</th></tr></thead><tbody>\n",
    );
    for name in r.backend_names() {
        let sum = r.summary_of(&name);
        let ms: u64 = r
            .results
            .iter()
            .filter(|t| t.backend == name)
            .map(|t| t.duration_ms)
            .sum();
        let (avail, why) = match r.backends.iter().find(|b| b.name == name) {
            Some(b) if b.usable => ("available", b.why.as_str()),
            Some(b) => ("unavailable", b.why.as_str()),
            None => ("", ""),
        };
        let n = |v: usize, bad: bool| {
            let class = if bad && v > 0 { "n bad" } else { "n" };
            format!("<td class=\"{class}\">{v}</td>")
        };
        s.push_str(&format!(
            "<tr><td><b>{}</b></td><td title=\"{}\">{avail}</td>{}{}{}{}{}{}<td class=\"n\">{:.1} s</td></tr>\n",
            x(&name),
            x(why),
            n(sum.pass, false),
            n(sum.fail, true),
            n(sum.skip, false),
            n(sum.xfail, false),
            n(sum.xpass, true),
            n(sum.flaky, true),
            ms as f64 / 1000.0
        ));
    }
    s.push_str("</tbody></table>\n");
    s
}

/// Each failing trial, folded: its first line, then the full message and the rerun line.
fn failures(r: &Report) -> String {
    let failed = r.failures();
    if failed.is_empty() {
        return String::new();
    }
    let mut s = format!("<h2>Failures ({})</h2>\n", failed.len());
    for t in failed {
        s.push_str(&format!(
            "<details class=\"failure\"><summary><code>{}</code> {}: {}</summary>\n<pre>{}</pre>\n",
            x(&t.id),
            outcome_label(t.outcome),
            x(t.reason.lines().next().unwrap_or("")),
            x(&t.reason)
        ));
        if !t.rerun.is_empty() {
            s.push_str(&format!("<div>rerun:</div><pre>{}</pre>\n", x(&t.rerun)));
        }
        s.push_str("</details>\n");
    }
    s
}

/// Scenarios × backends, each cell's reason as its tooltip.
fn matrix(r: &Report) -> String {
    let backends = r.backend_names();
    let mut s = String::from("<h2>Matrix</h2><table id=\"matrix\"><thead><tr><th>scenario</th>");
    for b in &backends {
        s.push_str(&format!("<th>{}</th>", x(b)));
    }
    s.push_str("</tr></thead><tbody>\n");
    for (scenario, row) in r.grid() {
        s.push_str(&format!("<tr><td><code>{}</code></td>", x(&scenario)));
        for b in &backends {
            match row.get(b) {
                None => s.push_str("<td class=\"o none\"></td>"),
                Some(t) => {
                    let text = match t.outcome {
                        Outcome::Skip => "skip".to_string(),
                        o => format!("{} {} ms", outcome_label(o), t.duration_ms),
                    };
                    s.push_str(&format!(
                        "<td class=\"o {}\" title=\"{}\">{}</td>",
                        t.outcome,
                        x(&t.reason),
                        x(&text)
                    ));
                }
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");
    s
}

/// Skips and known failures, one line per backend and reason, its trials folded below it.
fn reasons(r: &Report) -> String {
    let groups = r.reason_groups();
    if groups.is_empty() {
        return String::new();
    }
    let mut s = String::from("<h2>Skips and known failures</h2><ul>\n");
    for (backend, outcome, reason, trials) in groups {
        let ids: Vec<String> = trials
            .iter()
            .map(|t| format!("<code>{}</code>", x(&t.scenario_path())))
            .collect();
        s.push_str(&format!(
            "<li><b>{}</b> {} ×{}: {}<details><summary>{} trial(s)</summary>{}</details></li>\n",
            x(backend),
            outcome_label(outcome),
            trials.len(),
            x(if reason.is_empty() {
                "(no reason given)"
            } else {
                reason
            }),
            trials.len(),
            ids.join(", ")
        ));
    }
    s.push_str("</ul>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixture;

    #[test]
    fn html_contains_the_matrix_with_reasons() {
        let html = fixture::report().to_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<table id=\"matrix\">"));
        assert!(html.contains("<th>host</th><th>runsc</th><th>crun</th>"));
        assert!(html
            .contains("<td class=\"o skip\" title=\"capability snapshot unsupported\">skip</td>"));
        assert!(html.contains("<td class=\"o pass\" title=\"\">pass 12 ms</td>"));
        assert!(html.contains("exit 41, wanted 42 &lt;&amp;&quot;&#39;&gt;"));
        assert!(!html.contains("<script"), "self-contained and inert");
        assert!(!html.contains("http://") && !html.contains("https://"));
        // Balanced table rows: the header plus one per scenario.
        assert_eq!(html.matches("<tr>").count(), html.matches("</tr>").count());
        // Two tables: backends (header + 3) and matrix (header + 5 scenarios).
        assert_eq!(html.matches("<tr>").count(), (1 + 3) + (1 + 5));
        let (r, g, b) = PASS_RGB;
        assert!(html.contains(&format!("#{r:02x}{g:02x}{b:02x}")));
    }

    #[test]
    fn html_summarises_first_and_folds_failures_and_reasons() {
        let html = fixture::report().to_html();
        let at = |needle: &str| html.find(needle).unwrap_or_else(|| panic!("{needle}"));
        // The per-backend summary comes before the failures, which come before the matrix.
        assert!(at("<table id=\"backends\">") < at("<h2>Failures (3)</h2>"));
        assert!(at("<h2>Failures (3)</h2>") < at("<table id=\"matrix\">"));
        assert!(html.contains(
            "<tr><td><b>host</b></td><td title=\"host: ran /bin/true\">available</td>\
             <td class=\"n\">1</td><td class=\"n bad\">1</td><td class=\"n\">2</td>"
        ));
        // Each failure expandable, with its full message and its rerun line.
        assert_eq!(html.matches("<details class=\"failure\">").count(), 3);
        assert!(html.contains(
            "<pre>CELLCHECK_BACKENDS=host CELLCHECK_HOST_CLASS=linux-nokvm cargo nextest run \
             -p cellcheck-conformance --test conformance -E &#39;test(=host::exit::code_42)&#39;</pre>"
        ));
        // Two host trials skipped for one reason: one line, not two.
        assert_eq!(
            html.matches("<b>host</b> skip ×2: capability snapshot unsupported")
                .count(),
            1
        );
        assert!(
            html.contains("<code>snapshot::restore</code>, <code>snapshot::corrupted_image</code>")
        );
    }
}

#[cfg(test)]
mod browser {
    //! Renders the report in a real headless Chromium and checks the screenshot.

    use std::collections::HashSet;
    use std::process::Command;
    use std::time::Duration;

    use super::PASS_RGB;
    use crate::report::fixture;
    use crate::util::run_bounded;

    fn find_chromium() -> Option<String> {
        [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ]
        .into_iter()
        .find(|b| {
            run_bounded(Command::new(b).arg("--version"), Duration::from_secs(30)).code == Some(0)
        })
        .map(String::from)
    }

    #[test]
    fn html_report_renders_in_headless_chromium() {
        let Some(chromium) = find_chromium() else {
            eprintln!("SKIPPED: no chromium on PATH (tried chromium, chromium-browser, google-chrome); CI installs it");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let html = dir.path().join("report.html");
        std::fs::write(&html, fixture::report().to_html()).unwrap();
        let png_path = dir.path().join("shot.png");
        let profile = dir.path().join("profile");
        let ran = run_bounded(
            Command::new(&chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    "--window-size=1280,900",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg(format!("--screenshot={}", png_path.display()))
                .arg(format!("file://{}", html.display())),
            Duration::from_secs(90),
        );
        assert!(
            png_path.exists(),
            "{chromium} wrote no screenshot (exit {:?}, {:?}):\n{}",
            ran.code,
            ran.error,
            ran.output
        );

        let file = std::io::BufReader::new(std::fs::File::open(&png_path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("sized frame")];
        let info = reader.next_frame(&mut buf).expect("a decodable frame");
        assert_eq!((info.width, info.height), (1280, 900));
        let channels = match info.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => panic!("unexpected colour type {other:?}"),
        };
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let pixels: Vec<(u8, u8, u8)> = buf[..info.buffer_size()]
            .chunks_exact(channels)
            .map(|p| (p[0], p[1], p[2]))
            .collect();
        let distinct: HashSet<_> = pixels.iter().collect();
        assert!(
            distinct.len() >= 20,
            "a blank page: only {} distinct colours",
            distinct.len()
        );
        let near = |a: (u8, u8, u8), b: (u8, u8, u8)| {
            a.0.abs_diff(b.0) <= 6 && a.1.abs_diff(b.1) <= 6 && a.2.abs_diff(b.2) <= 6
        };
        let green = pixels.iter().filter(|p| near(**p, PASS_RGB)).count();
        let red = pixels
            .iter()
            .filter(|p| near(**p, (0xcf, 0x22, 0x2e)))
            .count();
        // Two pass cells of at least ~80×20 px each.
        assert!(green > 2 * 1000, "pass-green pixels: {green}");
        assert!(red > 1000, "fail-red pixels: {red}");
    }
}
