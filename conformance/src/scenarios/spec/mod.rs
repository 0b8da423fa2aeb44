//! Admission, in both directions: every document the rules admit is created and run, every
//! document they refuse is a typed `InvalidSpec` naming its field, with nothing created.
//!
//! The boundaries come from the admission table (`fixtures/admission/table.json`, see
//! [`crate::admission`]); a property test (`property.rs`) draws further valid and invalid documents.

use std::sync::OnceLock;
use std::time::Duration;

use cellcheck_contract::{CellDocument, CellError, Termination};

use crate::admission::{self, RunOutcome};
use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

mod property;

use property::{property_cases, property_documents};

const F: &str = "spec";

/// How long an admitted document's workload may take to end.
const RUN_BOUND: Duration = Duration::from_secs(60);

pub fn scenarios() -> Vec<Scenario> {
    let mut v = vec![scenario!(F, "refused_table", [], refused_table)];
    v.extend(
        admitted_names()
            .iter()
            .map(|name| Scenario::new(F, name, &[], |c| Box::pin(admitted(c)))),
    );
    let cases = property_cases() as u64;
    // Bounded, and the bound grows with the case count (a create may take seconds on a VM).
    v.push(
        scenario!(F, "property_documents", [], property_documents)
            .with_timeout(Duration::from_secs(60 + 3 * cases)),
    );
    v
}

/// `admits_<case>` for every case the table admits (one trial each, so a backend's known failure
/// names the exact boundary it misses).
fn admitted_names() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| {
        admission::table()
            .cases
            .iter()
            .filter(|c| c.admit)
            .map(|c| &*Box::leak(format!("admits_{}", c.name).into_boxed_str()))
            .collect()
    })
}

/// The table's document for `case`, under a fresh registered id (or the case's own), with the
/// harness's marker appended to its env.
fn table_doc(ctx: &Ctx, case: &admission::Case) -> Result<CellDocument, Failure> {
    let id = if case.sets_id() {
        None
    } else {
        Some(ctx.new_id())
    };
    let mut doc = case
        .document(
            &admission::table().base,
            id.as_deref().unwrap_or("placeholder"),
        )
        .map_err(|e| ctx.fail(e))?;
    if id.is_none() {
        // An id the table chose: made this trial's own (see `weave_token`), then registered so its
        // marker and footprint are checked too.
        doc.spec.id = weave_token(&doc.spec.id, ctx.token());
        let check_resources = !doc.spec.id.is_empty() && !doc.spec.id.contains('\0');
        ctx.register_id(&doc.spec.id, check_resources);
    }
    let marker = ctx.marker_env(&doc.spec.id);
    doc.spec.run.env.push(marker);
    Ok(doc)
}

/// `id` with the trial's token written over its ASCII letters and digits after the first
/// character, each replacement in the class of the character it replaces (lower, upper, digit):
/// length, first character and every other character stay, so the case tests the same rule. Why:
/// the residue audit attributes a leftover to the trial whose cell id it mentions, and a fixed id
/// from the table (the 64-character one is a prefix of the 128-character one) run by two trials at
/// once, in two processes, would make one trial blame the other's live cell.
fn weave_token(id: &str, token: &str) -> String {
    let mut t = token.bytes().cycle().take(token.len());
    id.char_indices()
        .map(|(i, c)| {
            if i == 0 || !c.is_ascii_alphanumeric() {
                return c;
            }
            let Some(b) = t.next() else { return c };
            let v = b % 26;
            if c.is_ascii_digit() {
                (b'0' + b % 10) as char
            } else if c.is_ascii_uppercase() {
                (b'A' + v) as char
            } else {
                (b'a' + v) as char
            }
        })
        .collect()
}

async fn refused_table(ctx: Ctx) -> Result<(), Failure> {
    let t = admission::table();
    let mut wrong = Vec::new();
    for case in t.cases.iter().filter(|c| !c.admit) {
        let want = case.field.as_deref().unwrap_or_default();
        let doc = table_doc(&ctx, case)?;
        let id = doc.spec.id.clone();
        ctx.step(format!("case {}: create ({})", case.name, case.why));
        match ctx.try_create(&doc).await {
            Err(CellError::InvalidSpec { field, .. }) if field == want => {}
            Err(CellError::InvalidSpec { field, .. }) => wrong.push(format!(
                "{}: InvalidSpec names {field:?}, expected {want:?}",
                case.name
            )),
            Ok(h) => {
                wrong.push(format!(
                    "{}: created cell {:?}, expected InvalidSpec({want})",
                    case.name, h.id
                ));
                ctx.destroy(&h.id).await?;
            }
            Err(e) => wrong.push(format!(
                "{}: expected InvalidSpec({want}), got {e:?}",
                case.name
            )),
        }
        ctx.step(format!("case {}: nothing was created", case.name));
        let listed = ctx.backend().list().await;
        if listed.contains(&id) {
            wrong.push(format!("{}: the refused id {id:?} is listed", case.name));
        }
        ctx.assert_clean(&id).await?;
    }
    check!(
        ctx,
        wrong.is_empty(),
        "{} of {} refused documents were handled wrongly:\n  {}",
        wrong.len(),
        t.cases.iter().filter(|c| !c.admit).count(),
        wrong.join("\n  ")
    );
    Ok(())
}

async fn admitted(ctx: Ctx) -> Result<(), Failure> {
    let path = ctx.scenario_path();
    let name = path.trim_start_matches("spec::admits_");
    let case = admission::case(name).ok_or_else(|| ctx.fail(format!("no table case {name:?}")))?;
    let doc = table_doc(&ctx, case)?;
    let id = doc.spec.id.clone();
    ctx.step(format!(
        "create the admitted document {} ({})",
        case.name, case.why
    ));
    ctx.create(&doc).await?;
    ctx.step("wait for its workload");
    let r = tokio::time::timeout(RUN_BOUND, ctx.try_wait(&id))
        .await
        .map_err(|_| ctx.fail(format!("the workload did not end within {RUN_BOUND:?}")))?;
    match (case.run, &r) {
        (_, Ok(rep)) if rep.termination == (Termination::Exited { code: 0 }) => {}
        (
            RunOutcome::Exit0OrDeadline | RunOutcome::Ends,
            Err(CellError::DeadlineExceeded { .. }),
        ) => {}
        (RunOutcome::Ends, Ok(_)) => {}
        _ => {
            return Err(ctx.fail(format!(
                "expected the workload to {:?}, got {r:?}",
                case.run
            )))
        }
    }
    ctx.step("destroy");
    match ctx.try_destroy(&id).await {
        Ok(_) => {}
        // The document's TTL may have passed and the backend destroyed the cell itself.
        Err(CellError::NotFound { .. }) if doc.spec.lifetime.is_some() => {}
        Err(e) => return Err(ctx.fail(format!("destroy failed: {e:?}"))),
    }
    ctx.assert_clean(&id).await
}

#[cfg(test)]
mod weave_tests {
    use super::weave_token;

    #[test]
    fn weaving_keeps_length_first_char_and_classes() {
        for id in ["a", "A-b.C_9", "abcdefghij0123456789", "x..y", "9Zz-é"] {
            let w = weave_token(id, "k3q9zz01");
            assert_eq!(w.chars().count(), id.chars().count(), "{id} -> {w}");
            assert_eq!(w.chars().next(), id.chars().next());
            for (a, b) in id.chars().zip(w.chars()) {
                let class = |c: char| {
                    (
                        c.is_ascii_digit(),
                        c.is_ascii_lowercase(),
                        c.is_ascii_uppercase(),
                        if c.is_ascii_alphanumeric() {
                            None
                        } else {
                            Some(c)
                        },
                    )
                };
                assert_eq!(class(a), class(b), "{id} -> {w}");
            }
        }
        // Two trials' tokens give two ids, and a short id is no prefix of a longer one's weave.
        let long = "a".repeat(128);
        let (x, y) = (
            weave_token(&long, "aaaa1111"),
            weave_token(&long[..64], "bbbb2222"),
        );
        assert!(!x.contains(&y), "{x} contains {y}");
    }
}
