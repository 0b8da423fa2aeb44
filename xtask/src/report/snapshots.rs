//! Every rendering of the one fixed run ([`super::fixture::report`]) pinned by an insta
//! snapshot: a change to any report format shows up as a reviewed diff of `snapshots/`.

use super::fixture;

#[test]
fn json() {
    insta::assert_snapshot!("report.json", fixture::report().to_json());
}

#[test]
fn junit() {
    insta::assert_snapshot!("junit.xml", fixture::report().to_junit());
}

#[test]
fn tap() {
    insta::assert_snapshot!("report.tap", fixture::report().to_tap());
}

#[test]
fn markdown() {
    insta::assert_snapshot!("matrix.md", fixture::report().to_markdown());
}

#[test]
fn html() {
    insta::assert_snapshot!("report.html", fixture::report().to_html());
}

#[test]
fn console_table() {
    insta::assert_snapshot!("table.txt", fixture::report().table());
}
