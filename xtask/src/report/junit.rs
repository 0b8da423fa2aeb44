//! JUnit XML, the shape CI test-report viewers read: one `<testsuite>` per backend.

use super::{escape_xml as x, Report};
use cellcheck_conformance::results::Outcome;

pub fn render(r: &Report) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let failing = |o: Outcome| matches!(o, Outcome::Fail | Outcome::Xpass | Outcome::Flaky);
    let total_ms: u64 = r.results.iter().map(|t| t.duration_ms).sum();
    s.push_str(&format!(
        "<testsuites name=\"cellcheck\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">\n",
        r.results.len(),
        r.results.iter().filter(|t| failing(t.outcome)).count(),
        r.summary.skip,
        total_ms as f64 / 1000.0
    ));
    for backend in r.backend_names() {
        let trials: Vec<_> = r.results.iter().filter(|t| t.backend == backend).collect();
        let ms: u64 = trials.iter().map(|t| t.duration_ms).sum();
        s.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">\n",
            x(&backend),
            trials.len(),
            trials.iter().filter(|t| failing(t.outcome)).count(),
            trials.iter().filter(|t| t.outcome == Outcome::Skip).count(),
            ms as f64 / 1000.0
        ));
        if let Some(b) = r.backends.iter().find(|b| b.name == backend) {
            s.push_str(&format!(
                "    <properties><property name=\"available\" value=\"{}\"/><property name=\"evidence\" value=\"{}\"/></properties>\n",
                b.usable,
                x(&b.why)
            ));
        }
        for t in trials {
            s.push_str(&format!(
                "    <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\"",
                x(&t.backend),
                x(&t.family),
                x(&t.scenario),
                t.duration_ms as f64 / 1000.0
            ));
            let body = match t.outcome {
                Outcome::Pass => None,
                Outcome::Fail => Some(failure("fail", &t.reason, &t.reason, &t.rerun)),
                Outcome::Xpass => Some(failure(
                    "xpass",
                    &format!("listed as a known failure but passed: {}", t.reason),
                    &t.reason,
                    &t.rerun,
                )),
                Outcome::Flaky => Some(failure(
                    "flaky",
                    &format!("outcomes differed between runs: {}", t.reason),
                    &t.reason,
                    &t.rerun,
                )),
                Outcome::Skip => Some(format!("<skipped message=\"{}\"/>", x(&t.reason))),
                Outcome::Xfail => Some(format!(
                    "<system-out>expected failure (xfail): {}</system-out>",
                    x(&t.reason)
                )),
            };
            match body {
                None => s.push_str("/>\n"),
                Some(b) => s.push_str(&format!(">{b}</testcase>\n")),
            }
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

/// A `<failure>`: the message attribute, and as text the full reason and the rerun line (CI
/// viewers show the text in full where they cut the attribute).
fn failure(kind: &str, message: &str, reason: &str, rerun: &str) -> String {
    let mut text = x(reason);
    if !rerun.is_empty() {
        text.push_str(&format!("\nrerun: {}", x(rerun)));
    }
    format!(
        "<failure type=\"{kind}\" message=\"{}\">{text}</failure>",
        x(message)
    )
}

#[cfg(test)]
mod tests {
    use crate::report::fixture;

    #[test]
    fn junit_parses_back_with_the_right_counts() {
        let text = fixture::report().to_junit();
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "testsuites");
        assert_eq!(root.attribute("tests"), Some("8"));
        assert_eq!(root.attribute("failures"), Some("3"));
        assert_eq!(root.attribute("skipped"), Some("2"));
        let suites: Vec<_> = root.children().filter(|n| n.is_element()).collect();
        let names: Vec<_> = suites
            .iter()
            .map(|s| s.attribute("name").unwrap())
            .collect();
        assert_eq!(names, ["host", "runsc", "crun"]);
        let failure = doc
            .descendants()
            .find(|n| {
                n.attribute("name") == Some("code_42")
                    && n.attribute("classname") == Some("host.exit")
            })
            .unwrap()
            .children()
            .find(|n| n.has_tag_name("failure"))
            .unwrap();
        // Escaped on the way out, intact on the way back (the control byte replaced).
        assert_eq!(
            failure.attribute("message"),
            Some("exit 41, wanted 42 <&\"'>\u{FFFD}")
        );
        // The full reason and the rerun line with the env that selected the trial.
        assert_eq!(
            failure.text(),
            Some(
                "exit 41, wanted 42 <&\"'>\u{FFFD}\nrerun: CELLCHECK_BACKENDS=host \
                 CELLCHECK_HOST_CLASS=linux-nokvm cargo nextest run -p cellcheck-conformance \
                 --test conformance -E 'test(=host::exit::code_42)'"
            )
        );
        let types: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("failure"))
            .map(|n| n.attribute("type").unwrap())
            .collect();
        assert_eq!(types, ["fail", "xpass", "flaky"]);
        assert_eq!(suites[2].attribute("tests"), Some("0"));
    }
}
