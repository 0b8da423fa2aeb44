//! Admission: every refused document is a typed `InvalidSpec` naming its field, and creates nothing.

use std::time::Duration;

use cellcheck_contract::spec::{CpuMax, Lifetime};
use cellcheck_contract::{CellDocument, CellError, Limits};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "spec";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "empty_id", [], |c| invalid(c, Bad::EmptyId)),
        scenario!(F, "id_with_slash", [], |c| invalid(c, Bad::Slash)),
        scenario!(F, "id_with_dotdot", [], |c| invalid(c, Bad::DotDot)),
        scenario!(F, "empty_argv", [], |c| invalid(c, Bad::EmptyArgv)),
        scenario!(F, "nul_in_argv", [], |c| invalid(c, Bad::NulArgv)),
        scenario!(F, "env_key_with_eq", [], |c| invalid(c, Bad::EnvEq)),
        scenario!(F, "timeout_over_ttl", [], |c| invalid(
            c,
            Bad::TimeoutOverTtl
        )),
        scenario!(F, "zero_memory_limit", [], |c| invalid(c, Bad::ZeroMemory)),
        scenario!(F, "unknown_api_version", [], |c| invalid(
            c,
            Bad::ApiVersion
        )),
        scenario!(F, "arbitrary_documents", [], arbitrary_documents)
            .with_timeout(Duration::from_secs(200)),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Bad {
    EmptyId,
    Slash,
    DotDot,
    EmptyArgv,
    NulArgv,
    EnvEq,
    TimeoutOverTtl,
    ZeroMemory,
    ApiVersion,
}

async fn invalid(ctx: Ctx, bad: Bad) -> Result<(), Failure> {
    let base = ctx.new_id();
    // The marker is env[0], so a bad env entry appended after it is env[1].
    let (doc, field, check_resources) = {
        let mut d = ctx.doc_for(&base, &["exit", "0"]);
        let field = match bad {
            Bad::EmptyId => {
                d.spec.id = String::new();
                "spec.id"
            }
            Bad::Slash => {
                d.spec.id = format!("{base}/x");
                "spec.id"
            }
            Bad::DotDot => {
                d.spec.id = format!("{base}..x");
                "spec.id"
            }
            Bad::EmptyArgv => {
                d.spec.run.argv.clear();
                "spec.run.argv"
            }
            Bad::NulArgv => {
                d.spec.run.argv.push("a\0b".into());
                "spec.run.argv[3]"
            }
            Bad::EnvEq => {
                d = d.with_env("BAD=KEY", "v");
                "spec.run.env[1].name"
            }
            Bad::TimeoutOverTtl => {
                d = d.with_ttl_seconds(1).with_timeout_ms(5000);
                "spec.run.timeoutMs"
            }
            Bad::ZeroMemory => {
                d = d.with_limits(Limits {
                    memory_max_bytes: Some(0),
                    ..Limits::default()
                });
                "spec.run.limits.memoryMaxBytes"
            }
            Bad::ApiVersion => {
                d.api_version = "cellcheck.dev/v0".into();
                "apiVersion"
            }
        };
        // An empty id's footprint may name the backend's shared state dir: check markers only.
        (d, field, !matches!(bad, Bad::EmptyId))
    };
    let id = doc.spec.id.clone();
    if id != base {
        // The document still declares `base`'s marker; the bad id gets its footprint checked.
        ctx.register_id(&id, check_resources);
    }
    ctx.step(format!("create a document with a bad {field}"));
    let before = ctx.backend().list().await;
    match ctx.try_create(&doc).await {
        Err(CellError::InvalidSpec { field: got, .. }) => {
            check!(
                ctx,
                got == field,
                "InvalidSpec names field {got:?}, expected {field:?}"
            )
        }
        other => return Err(ctx.fail(format!("expected InvalidSpec({field}), got {other:?}"))),
    }
    ctx.step("nothing was created");
    let after = ctx.backend().list().await;
    check!(
        ctx,
        !after.contains(&id) && !after.contains(&base),
        "the refused cell is listed: {after:?}"
    );
    let new: Vec<&String> = after
        .iter()
        .filter(|i| !before.contains(i) && i.contains(ctx.token()))
        .collect();
    check!(ctx, new.is_empty(), "cells of this trial appeared: {new:?}");
    ctx.assert_clean(&id).await?;
    ctx.assert_clean(&base).await
}

/// Documents with mostly-valid, sometimes-broken fields.
fn doc_strategy(base: String) -> impl Strategy<Value = CellDocument> {
    let id = prop_oneof![
        4 => Just(base.clone()),
        1 => "[A-Za-z0-9._/-]{0,6}".prop_map(move |s| format!("{base}{s}")),
        1 => Just(String::new()),
    ];
    let argv0 = prop_oneof![
        4 => Just(cellcheck_contract::PROBE_PATH.to_string()),
        1 => Just("/bin/true".to_string()),
        1 => Just("/nonexistent".to_string()),
        1 => Just(String::new()),
        1 => "[a-z/]{1,6}",
    ];
    let args = prop_oneof![
        3 => Just(vec!["exit".to_string(), "3".to_string()]),
        1 => Just(vec!["out".to_string(), "100".to_string()]),
        1 => prop::collection::vec("[a-z0-9 \\x00]{0,5}", 0..3),
    ];
    let env = prop::collection::vec(("[A-Z_=\\x00]{0,4}", "[a-z =\\x00]{0,5}"), 0..3);
    let limits = proptest::option::of((
        proptest::option::of(prop_oneof![
            Just(0u64),
            Just(1u64 << 20),
            Just(256u64 << 20)
        ]),
        proptest::option::of(0u64..64),
        proptest::option::of((0u64..200_000, 0u64..2_000_000)),
    ));
    let api =
        prop_oneof![9 => Just(cellcheck_contract::spec::API_VERSION.to_string()), 1 => ".{0,5}"];
    let wd = proptest::option::of(prop_oneof![
        Just("/".to_string()),
        Just("/tmp".to_string()),
        Just("rel".to_string()),
        Just("/nonexistent".to_string())
    ]);
    (
        id,
        argv0,
        args,
        env,
        proptest::option::of(0u64..4000),
        proptest::option::of(0u64..4),
        limits,
        api,
        wd,
    )
        .prop_map(|(id, argv0, args, env, timeout, ttl, limits, api, wd)| {
            let mut d = CellDocument::new(id, std::iter::once(argv0).chain(args));
            for (k, v) in env {
                d = d.with_env(k, v);
            }
            d.api_version = api;
            d.spec.run.timeout_ms = timeout;
            d.spec.run.working_directory = wd;
            d.spec.lifetime = ttl.map(|ttl_seconds| Lifetime { ttl_seconds });
            d.spec.run.limits = limits.map(|(m, p, c)| Limits {
                memory_max_bytes: m,
                pids_max: p,
                cpu_max: c.map(|(quota, period)| CpuMax { quota, period }),
                ..Limits::default()
            });
            d
        })
}

const CASES: usize = 32;

async fn arbitrary_documents(ctx: Ctx) -> Result<(), Failure> {
    // Values are drawn up front (no shrinking): the run is async and a failure names its document.
    let mut runner = TestRunner::new(Config::default());
    let mut docs = Vec::new();
    for _ in 0..CASES {
        let base = ctx.new_id();
        let mut d = doc_strategy(base.clone())
            .new_tree(&mut runner)
            .map_err(|e| ctx.fail(format!("strategy: {e}")))?
            .current();
        if d.spec.id != base {
            ctx.register_id(&d.spec.id, !d.spec.id.is_empty());
        }
        // The marker keeps every created process findable.
        let marker = ctx.marker_env(&d.spec.id);
        if !d.spec.run.env.iter().any(|e| e.name == marker.name) {
            d.spec.run.env.insert(0, marker);
        }
        docs.push(d);
    }
    for (i, d) in docs.iter().enumerate() {
        let json = serde_json::to_string(d).unwrap_or_default();
        ctx.step(format!("case {i}: create {json}"));
        let admitted = d.admit();
        match ctx.try_create(d).await {
            Ok(h) => {
                check!(
                    ctx,
                    admitted.is_ok(),
                    "a document admission refuses ({:?}) was created",
                    admitted.err()
                );
                // Whatever the workload does, it gets a bounded wait, then destroy.
                let _ = tokio::time::timeout(Duration::from_secs(15), ctx.try_wait(&h.id)).await;
                ctx.destroy(&h.id).await?;
            }
            Err(CellError::InvalidSpec { .. }) => {}
            Err(e) => {
                // Typed errors other than InvalidSpec are allowed (a missing program, a bad
                // working directory) only for admissible documents.
                check!(
                    ctx,
                    admitted.is_ok(),
                    "admission refuses it ({:?}) but create said {e:?}",
                    admitted.err()
                );
            }
        }
        ctx.step(format!("case {i}: residue {json}"));
        ctx.assert_clean(&d.spec.id).await?;
    }
    Ok(())
}
