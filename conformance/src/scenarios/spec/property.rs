//! The property test of admission: drawn valid documents are created and run, drawn documents
//! breaking exactly one rule are refused naming that rule's field, and nothing is left behind.

use std::time::Instant;

use cellcheck_contract::spec::{Authority, CpuMax, Environment, Lifetime};
use cellcheck_contract::{CellDocument, CellError, EnvVar, Limits, Termination, PROBE_PATH};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::RUN_BOUND;
use crate::check;
use crate::harness::{Ctx, Failure, RESIDUE_GRACE};
use crate::ids::MARKER_VAR;
use crate::residue::{self, Scope};
use crate::scenarios::pattern;

/// `PROPTEST_CASES`, else 32.
pub fn property_cases() -> usize {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(32)
}

/// What a valid drawn document's workload does.
#[derive(Debug, Clone)]
enum Expect {
    Exit(i32),
    /// Exits 0 after writing `pattern(n)` to stdout.
    Out(usize),
}

/// A valid document running the probe or the shell, under `id`.
fn valid_strategy(id: String) -> impl Strategy<Value = (CellDocument, Expect)> {
    // Units of an optional dot and one more character never form `..`.
    let tail = "(\\.?[A-Za-z0-9_-]){0,60}";
    let run = prop_oneof![
        (0i32..=255).prop_map(|k| (
            vec![PROBE_PATH.into(), "exit".into(), k.to_string()],
            Expect::Exit(k)
        )),
        (0usize..3000).prop_map(|n| (
            vec![PROBE_PATH.into(), "out".into(), n.to_string()],
            Expect::Out(n)
        )),
        (
            (0i32..=255),
            prop::collection::vec("[a-zé ✓日\\n\\t=]{1,8}", 0..3)
        )
            .prop_map(|(k, extra)| {
                let mut argv = vec!["/bin/sh".into(), "-c".into(), format!("exit {k}")];
                argv.extend(extra);
                (argv, Expect::Exit(k))
            }),
    ];
    let env = prop::collection::vec(
        ("[A-Za-z_][A-Za-z0-9_.é-]{0,8}", "[a-zA-Z0-9 =é✓日-]{0,12}"),
        0..4,
    );
    let wd = proptest::option::of(prop_oneof![Just("/".to_string()), Just("/bin".to_string())]);
    // timeout ≤ ttl, both long enough never to fire.
    let time = prop_oneof![
        Just((None, None)),
        (30_000u64..600_000).prop_map(|t| (Some(t), None)),
        (60u64..100_000).prop_map(|ttl| (None, Some(ttl))),
        (30_000u64..600_000, 0u64..1000)
            .prop_map(|(t, extra)| (Some(t), Some(t / 1000 + 1 + extra))),
    ];
    let limits = proptest::option::of((
        proptest::option::of(64u64 << 20..=8u64 << 30),
        proptest::option::of(64u64..=4096),
        proptest::option::of((10_000u64..=400_000, 10_000u64..=1_000_000)),
    ));
    let authority = proptest::option::of((
        prop::collection::vec("[a-z:/é]{1,10}", 0..3),
        prop::collection::vec("[a-z.]{1,8}:[0-9]{1,4}", 0..3),
    ));
    let image = proptest::option::of(Just("cellcheck/fixture-rootfs".to_string()));
    (tail, run, env, wd, time, limits, authority, image).prop_map(
        move |(tail, (argv, expect), env, wd, (timeout, ttl), limits, authority, image)| {
            let mut full = format!("{id}{tail}");
            full.truncate(cellcheck_contract::spec::MAX_ID_LEN);
            let mut d = CellDocument::new(full, argv);
            for (k, v) in env {
                if !d.spec.run.env.iter().any(|e| e.name == k) {
                    d = d.with_env(k, v);
                }
            }
            d.spec.run.working_directory = wd;
            d.spec.run.timeout_ms = timeout;
            d.spec.lifetime = ttl.map(|ttl_seconds| Lifetime { ttl_seconds });
            d.spec.run.limits = limits.map(|(m, p, c)| Limits {
                memory_max_bytes: m,
                pids_max: p,
                cpu_max: c.map(|(quota, period)| CpuMax { quota, period }),
                ..Limits::default()
            });
            d.spec.authority = authority.map(|(secret_refs, egress)| Authority {
                secret_refs,
                egress,
            });
            d.spec.environment = image.map(|i| Environment {
                image: Some(i),
                digest: None,
            });
            (d, expect)
        },
    )
}

const REFUSED_ID_CHARS: &[char] = &[
    '/', ' ', ':', '@', '+', '~', '!', '#', '$', '%', '&', '*', '(', ')', '[', ']', '{', '}', '<',
    '>', '?', ',', ';', '\'', '"', '\\', '\t', '\n', '\0', 'é', 'ß', '日', '٣', 'ａ',
];

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[rng.gen_range(0..xs.len())]
}

/// Break exactly one rule of the valid `d`; the field admission must name.
fn break_one_rule(d: &mut CellDocument, rng: &mut StdRng) -> String {
    let run = &mut d.spec.run;
    match rng.gen_range(0..21) {
        0 => {
            d.spec.id.clear();
            "spec.id".into()
        }
        1 => {
            let n = rng.gen_range(129..300);
            while d.spec.id.len() < n {
                d.spec.id.push('a');
            }
            "spec.id".into()
        }
        2 => {
            let c = *pick(rng, &['-', '.', '_']);
            d.spec.id.replace_range(0..1, &c.to_string());
            "spec.id".into()
        }
        3 => {
            let at = rng.gen_range(1..=d.spec.id.len());
            d.spec.id.insert(at, *pick(rng, REFUSED_ID_CHARS));
            "spec.id".into()
        }
        4 => {
            let at = rng.gen_range(1..=d.spec.id.len());
            d.spec.id.insert_str(at, "..");
            "spec.id".into()
        }
        5 => {
            d.api_version =
                pick(rng, &["", "cellcheck.dev/v2", "Cellcheck.dev/v1", "v1"]).to_string();
            "apiVersion".into()
        }
        6 => {
            d.kind = pick(rng, &["", "Cell", "executioncell", "ExecutionCells"]).to_string();
            "kind".into()
        }
        7 => {
            run.argv.clear();
            "spec.run.argv".into()
        }
        8 | 9 => {
            let i = rng.gen_range(0..run.argv.len());
            if rng.gen_bool(0.5) {
                run.argv[i].clear();
            } else {
                let at = rng.gen_range(0..=run.argv[i].len());
                let at = (0..=at)
                    .rev()
                    .find(|a| run.argv[i].is_char_boundary(*a))
                    .unwrap_or(0);
                run.argv[i].insert(at, '\0');
            }
            format!("spec.run.argv[{i}]")
        }
        10 => {
            run.working_directory =
                Some(pick(rng, &["", "bin", "./bin", "tmp/x", "/b\0in"]).to_string());
            "spec.run.workingDirectory".into()
        }
        11 | 12 => {
            // Insert a bad entry at p (the marker is always declared, so env is never empty).
            let p = rng.gen_range(0..=run.env.len());
            let kind = rng.gen_range(0..5);
            let (e, what) = match kind {
                0 => (
                    EnvVar {
                        name: String::new(),
                        value: "v".into(),
                    },
                    "name",
                ),
                1 => (
                    EnvVar {
                        name: "BAD=NAME".into(),
                        value: "v".into(),
                    },
                    "name",
                ),
                2 => (
                    EnvVar {
                        name: "BAD\0NAME".into(),
                        value: "v".into(),
                    },
                    "name",
                ),
                3 => (
                    EnvVar {
                        name: "CC_FRESH_NAME".into(),
                        value: "a\0b".into(),
                    },
                    "value",
                ),
                _ => {
                    // A duplicate of an earlier name: inserted after it.
                    let p = rng.gen_range(1..=run.env.len());
                    let j = rng.gen_range(0..p);
                    let e = EnvVar {
                        name: run.env[j].name.clone(),
                        value: "dup".into(),
                    };
                    run.env.insert(p, e);
                    return format!("spec.run.env[{p}].name");
                }
            };
            run.env.insert(p, e);
            format!("spec.run.env[{p}].{what}")
        }
        13 => {
            run.timeout_ms = Some(0);
            "spec.run.timeoutMs".into()
        }
        14 => {
            let ttl = rng.gen_range(1..100_000u64);
            d.spec.lifetime = Some(Lifetime { ttl_seconds: ttl });
            run.timeout_ms = Some(ttl * 1000 + rng.gen_range(1..=1000));
            "spec.run.timeoutMs".into()
        }
        15 => {
            d.spec.lifetime = Some(Lifetime { ttl_seconds: 0 });
            "spec.lifetime.ttlSeconds".into()
        }
        16 => {
            run.limits
                .get_or_insert_with(Limits::default)
                .memory_max_bytes = Some(0);
            "spec.run.limits.memoryMaxBytes".into()
        }
        17 => {
            run.limits.get_or_insert_with(Limits::default).pids_max = Some(0);
            "spec.run.limits.pidsMax".into()
        }
        18 => {
            let l = run.limits.get_or_insert_with(Limits::default);
            if rng.gen_bool(0.5) {
                l.cpu_max = Some(CpuMax {
                    quota: 0,
                    period: rng.gen_range(0..2_000_000),
                });
                "spec.run.limits.cpuMax".into()
            } else {
                let period = if rng.gen_bool(0.5) {
                    rng.gen_range(1..1000)
                } else {
                    rng.gen_range(1_000_001..u64::MAX)
                };
                l.cpu_max = Some(CpuMax {
                    quota: rng.gen_range(1..1_000_000),
                    period,
                });
                "spec.run.limits.cpuMax.period".into()
            }
        }
        19 => {
            let a = d.spec.authority.get_or_insert_with(Authority::default);
            let bad = pick(rng, &["", "a\0b"]).to_string();
            if rng.gen_bool(0.5) {
                let i = rng.gen_range(0..=a.secret_refs.len());
                a.secret_refs.insert(i, bad);
                format!("spec.authority.secretRefs[{i}]")
            } else {
                // Secret refs stay valid, so the egress entry is the first broken rule.
                let i = rng.gen_range(0..=a.egress.len());
                a.egress.insert(i, bad);
                format!("spec.authority.egress[{i}]")
            }
        }
        _ => {
            d.spec.environment = Some(Environment {
                image: Some(pick(rng, &["", "a\0b"]).to_string()),
                digest: None,
            });
            "spec.environment.image".into()
        }
    }
}

/// Valid and invalid documents, drawn: each valid one must be created and run with the expected
/// result, each invalid one refused naming its field, nothing left behind. Cells go through the
/// context like every other (ledger entry before create, cleanup and audit after a failure). Cost
/// is linear in the case count: every case has its own id and marker, is checked once, on its
/// own, and is then released.
pub(super) async fn property_documents(ctx: Ctx) -> Result<(), Failure> {
    let cases = property_cases();
    let seed: u64 = std::env::var("CELLCHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().next_u64());
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    // Which cases break a rule, and how: a second generator from the same seed.
    let mut rng = StdRng::seed_from_u64(seed);
    let token = ctx.token().to_string();
    let backend = ctx.backend_arc();
    let start = Instant::now();
    let (mut valid, mut invalid) = (0usize, 0usize);
    for i in 0..cases {
        // Ids and markers are unique per case and never a prefix of another (`x` ends them).
        let base = format!("cc-{token}-p{i}x");
        let marker = format!("ccm-{token}-p{i}x");
        let (mut doc, expect) = valid_strategy(base)
            .new_tree(&mut runner)
            .map_err(|e| ctx.fail(format!("strategy: {e}")))?
            .current();
        doc.spec.run.env.push(EnvVar {
            name: MARKER_VAR.into(),
            value: marker.clone(),
        });
        let broken = if rng.gen_bool(0.5) {
            Some(break_one_rule(&mut doc, &mut rng))
        } else {
            None
        };
        let json = serde_json::to_string(&doc).unwrap_or_default();
        ctx.step(format!(
            "case {i} (seed {seed}, CELLCHECK_SEED reruns it): {json}"
        ));
        // The generator and the contract must agree, or the generator is wrong.
        match (&broken, doc.admit()) {
            (None, Ok(_)) => {}
            (Some(want), Err(CellError::InvalidSpec { field, .. })) if *want == field => {}
            (b, got) => {
                return Err(ctx.fail(format!(
                    "generator expected {b:?} (None = valid), the contract's admission says {got:?}"
                )))
            }
        }
        let id = doc.spec.id.clone();
        match &broken {
            None => {
                valid += 1;
                let h = ctx
                    .try_create(&doc)
                    .await
                    .map_err(|e| ctx.fail(format!("a valid document was not created: {e:?}")))?;
                let waited = tokio::time::timeout(RUN_BOUND, backend.wait(&h.id)).await;
                let destroyed = ctx.try_destroy(&h.id).await;
                let r = waited
                    .map_err(|_| ctx.fail(format!("did not end within {RUN_BOUND:?}")))?
                    .map_err(|e| ctx.fail(format!("wait failed: {e:?}")))?;
                destroyed.map_err(|e| ctx.fail(format!("destroy failed: {e:?}")))?;
                let ok = match expect {
                    Expect::Exit(k) => r.termination == Termination::Exited { code: k },
                    Expect::Out(n) => {
                        r.termination == Termination::Exited { code: 0 } && r.stdout == pattern(n)
                    }
                };
                check!(
                    ctx,
                    ok,
                    "expected {expect:?}, got {:?} with {} stdout bytes, stderr {:?}",
                    r.termination,
                    r.stdout.len(),
                    r.stderr_str()
                );
            }
            Some(want) => {
                invalid += 1;
                match ctx.try_create(&doc).await {
                    Err(CellError::InvalidSpec { field, .. }) => check!(
                        ctx,
                        field == *want,
                        "InvalidSpec names {field:?}, expected {want:?}"
                    ),
                    Ok(h) => {
                        let _ = ctx.try_destroy(&h.id).await;
                        return Err(ctx.fail(format!("created, expected InvalidSpec({want})")));
                    }
                    Err(e) => {
                        return Err(ctx.fail(format!("expected InvalidSpec({want}), got {e:?}")))
                    }
                }
            }
        }
        check!(
            ctx,
            !backend.list().await.contains(&id),
            "{id:?} is still listed"
        );
        let scope = Scope {
            cell: id.clone(),
            env_markers: vec![marker],
            footprint: if id.is_empty() || id.contains('\0') {
                Default::default()
            } else {
                backend.footprint(&id)
            },
            host_pids: Vec::new(),
            check_resources: !id.is_empty() && !id.contains('\0'),
        };
        let leaks = residue::scan_settled(&scope, &Default::default(), RESIDUE_GRACE).await;
        let leaks: Vec<_> = leaks
            .into_iter()
            .filter(|l| !matches!(l, residue::Leak::Fd { .. }))
            .collect();
        check!(ctx, leaks.is_empty(), "{}", residue::describe(&id, &leaks));
        // Checked clean: its record and ledger entry go now, so cost stays linear in the cases.
        ctx.release_clean(&id);
    }
    eprintln!(
        "spec::property_documents on {}: {cases} cases ({valid} valid, {invalid} invalid) in {:.1} s, seed {seed}",
        backend.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
