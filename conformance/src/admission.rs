//! The admission table (`fixtures/admission/table.json`): every admission rule of the contract at
//! its boundaries, on both sides, as documents a backend must create or refuse. The spec family
//! runs it on every backend; `docs/admission.md` is rendered from it ([`render_markdown`]) and a
//! test keeps the two in step.

use std::sync::OnceLock;

use cellcheck_contract::CellDocument;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The table, compiled in so the suite needs no checkout at run time.
pub const TABLE_JSON: &str = include_str!("../../fixtures/admission/table.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub about: String,
    /// A valid document every case starts from.
    pub base: Value,
    /// The rules, in the order admission checks them (the first broken one is named).
    pub rules: Vec<Rule>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub field: String,
    pub rule: String,
}

/// What an admitted case's workload must do once created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// It exits 0.
    #[default]
    Exit0,
    /// It exits 0, or its (tiny) timeout fires first.
    Exit0OrDeadline,
    /// It ends somehow (a limit at its minimum may kill it): any report, or the deadline.
    Ends,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// The `field` of the [`Rule`] this case is about.
    pub rule: String,
    pub why: String,
    /// JSON pointer → value, applied to the base document.
    pub set: Map<String, Value>,
    /// Whether admission must accept the document.
    pub admit: bool,
    /// The field a refusal must name.
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub run: RunOutcome,
}

impl Case {
    /// Whether the case chooses the id itself (else the scenario gives it a fresh one).
    pub fn sets_id(&self) -> bool {
        self.set.contains_key("/spec/id")
    }

    /// The case's document, under `id` unless the case sets its own.
    pub fn document(&self, base: &Value, id: &str) -> Result<CellDocument, String> {
        let mut v = base.clone();
        set_pointer(&mut v, "/spec/id", Value::String(id.to_string()))?;
        for (ptr, val) in &self.set {
            set_pointer(&mut v, ptr, val.clone())?;
        }
        serde_json::from_value(v).map_err(|e| format!("case {}: not a document: {e}", self.name))
    }
}

/// Set `ptr` (a JSON pointer of object keys) to `val`, creating missing objects on the way.
fn set_pointer(root: &mut Value, ptr: &str, val: Value) -> Result<(), String> {
    let keys: Vec<&str> = ptr
        .strip_prefix('/')
        .ok_or_else(|| format!("pointer {ptr:?} must start with '/'"))?
        .split('/')
        .collect();
    let (last, path) = keys.split_last().ok_or("empty pointer")?;
    let mut cur = root;
    for k in path {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        cur = cur
            .as_object_mut()
            .ok_or("not an object")?
            .entry(k.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    cur.as_object_mut()
        .ok_or("not an object")?
        .insert(last.to_string(), val);
    Ok(())
}

/// The parsed table. Its shape is checked by this module's tests, so a broken table fails there.
pub fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| serde_json::from_str(TABLE_JSON).expect("fixtures/admission/table.json"))
}

/// The case named `name`.
pub fn case(name: &str) -> Option<&'static Case> {
    table().cases.iter().find(|c| c.name == name)
}

/// Where the rendered table lives, relative to the workspace root.
pub const DOC_PATH: &str = "docs/admission.md";

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// A value as the docs show it: compact JSON, long strings cut with their length said.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 40 => {
            let head: String = s.chars().take(12).collect();
            format!(
                "{}… ({} chars)",
                serde_json::to_string(&head)
                    .unwrap_or_default()
                    .trim_end_matches('"'),
                s.chars().count()
            )
        }
        _ => serde_json::to_string(v).unwrap_or_default(),
    }
}

/// `docs/admission.md`, rendered from the table.
pub fn render_markdown(t: &Table) -> String {
    let mut s = String::new();
    s.push_str("# Admission rules\n\n");
    s.push_str(
        "<!-- Generated from fixtures/admission/table.json; do not edit. Regenerate with\n     \
         CELLCHECK_BLESS=1 cargo test -p cellcheck-conformance --lib admission -->\n\n",
    );
    s.push_str(
        "Before a backend creates anything it admits the document. A document that breaks a rule \
         is refused with `InvalidSpec` naming the field below (the first broken rule, in this \
         order), and nothing is created; every document the rules allow must be created and run. \
         The spec family of the suite runs each case of this table against every backend \
         (`spec::refused_table`, `spec::admits_<case>`), and a property test \
         (`spec::property_documents`) draws further valid and invalid documents.\n\n",
    );
    s.push_str("Every case changes this document (JSON pointer → value):\n\n```json\n");
    s.push_str(&serde_json::to_string_pretty(&t.base).unwrap_or_default());
    s.push_str("\n```\n");
    for r in &t.rules {
        s.push_str(&format!("\n## `{}`\n\n{}.\n\n", r.field, r.rule));
        s.push_str("| case | change | verdict | why |\n| --- | --- | --- | --- |\n");
        for c in t.cases.iter().filter(|c| c.rule == r.field) {
            let change: Vec<String> = c
                .set
                .iter()
                .map(|(k, v)| format!("`{k}` = `{}`", show(v)))
                .collect();
            let verdict = if c.admit {
                "admitted".to_string()
            } else {
                format!("refused: `{}`", c.field.as_deref().unwrap_or("?"))
            };
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                c.name,
                cell(&change.join("<br>")),
                verdict,
                cell(&c.why)
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellcheck_contract::CellError;

    #[test]
    fn table_is_well_formed() {
        let t = table();
        let mut names = std::collections::BTreeSet::new();
        for c in &t.cases {
            assert!(names.insert(&c.name), "duplicate case {}", c.name);
            assert!(
                c.name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
                "case name {:?}",
                c.name
            );
            assert!(
                t.rules.iter().any(|r| r.field == c.rule),
                "case {} names unknown rule {}",
                c.name,
                c.rule
            );
            assert_eq!(
                c.admit,
                c.field.is_none(),
                "case {}: field iff refused",
                c.name
            );
        }
        // Both directions for every rule: something it admits and something it refuses.
        for r in &t.rules {
            let of: Vec<&Case> = t.cases.iter().filter(|c| c.rule == r.field).collect();
            assert!(
                of.iter().any(|c| c.admit),
                "rule {} admits nothing",
                r.field
            );
            assert!(
                of.iter().any(|c| !c.admit),
                "rule {} refuses nothing",
                r.field
            );
        }
    }

    /// The contract's admission and the table agree on every case (the table is its spec).
    #[test]
    fn contract_admission_matches_the_table() {
        let t = table();
        for c in &t.cases {
            let doc = c.document(&t.base, "table-id").unwrap();
            match (doc.admit(), c.admit, &c.field) {
                (Ok(_), true, _) => {}
                (Err(CellError::InvalidSpec { field, .. }), false, Some(want)) => {
                    assert_eq!(&field, want, "case {}", c.name)
                }
                (got, _, _) => panic!("case {}: admission said {got:?}", c.name),
            }
        }
    }

    /// `docs/admission.md` is the table rendered; `CELLCHECK_BLESS=1` rewrites it.
    #[test]
    fn admission_doc_is_in_step_with_the_table() {
        let path = cellcheck_fixtures::workspace_root().join(DOC_PATH);
        let want = render_markdown(table());
        if std::env::var("CELLCHECK_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of step with fixtures/admission/table.json; regenerate it with \
             CELLCHECK_BLESS=1 cargo test -p cellcheck-conformance --lib admission",
            path.display()
        );
    }

    #[test]
    fn pointers_create_missing_objects() {
        let mut v = serde_json::json!({"a": {}});
        set_pointer(&mut v, "/a/b/c", Value::from(1)).unwrap();
        assert_eq!(v, serde_json::json!({"a": {"b": {"c": 1}}}));
        assert!(set_pointer(&mut v, "a", Value::Null).is_err());
    }
}
