//! How a workload ended, and what it wrote, reported exactly.

use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, ResourceKind, Termination};

use super::pattern;
use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "exit";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "code_0", [], |c| code(c, 0)),
        scenario!(F, "code_1", [], |c| code(c, 1)),
        scenario!(F, "code_42", [], |c| code(c, 42)),
        scenario!(F, "code_255", [], |c| code(c, 255)),
        scenario!(F, "sigkill", [], |c| signaled(c, "KILL", 9)),
        scenario!(F, "sigterm", [], |c| signaled(c, "TERM", 15)),
        scenario!(F, "missing_program", [], missing_program),
        scenario!(F, "timeout", [Timeout], timeout),
        scenario!(F, "large_stdout", [], large_stdout),
        scenario!(F, "large_stderr", [], large_stderr),
        scenario!(F, "wait_twice", [], wait_twice),
        scenario!(F, "codes_126_to_192", [], |c| codes(
            c,
            (126..=192).collect()
        )),
        scenario!(F, "codes_spread", [], |c| codes(
            c,
            vec![0, 1, 2, 3, 7, 63, 64, 65, 100, 124, 125, 193, 200, 224, 254, 255]
        )),
        scenario!(F, "signals_beside_codes", [], signals_beside_codes),
        scenario!(F, "output_bytes_exact", [], output_bytes_exact),
        scenario!(F, "streams_apart", [], streams_apart),
        scenario!(F, "timeout_unwaited", [Timeout, HostPid], timeout_unwaited),
        scenario!(F, "timeout_with_ttl", [Timeout, Ttl], timeout_with_ttl),
    ]
}

/// Every code of `codes` from its own cell, the cells overlapping.
async fn codes(ctx: Ctx, codes: Vec<i32>) -> Result<(), Failure> {
    ctx.step(format!("run `exit N` for N in {codes:?}"));
    let docs = codes
        .iter()
        .map(|n| ctx.doc(&["exit", &n.to_string()]))
        .collect();
    let results = ctx.run_many(docs).await?;
    let wrong: Vec<String> = codes
        .iter()
        .zip(&results)
        .filter(|(n, (_, r))| {
            !matches!(r, Ok(rep) if rep.termination == Termination::Exited { code: **n })
        })
        .map(|(n, (id, r))| {
            let got = r.as_ref().map(|rep| rep.termination);
            format!("exit {n} in {id}: got {got:?}")
        })
        .collect();
    check!(
        ctx,
        wrong.is_empty(),
        "{} of {} exit codes misreported:\n  {}",
        wrong.len(),
        codes.len(),
        wrong.join("\n  ")
    );
    Ok(())
}

/// Signals a workload dies of (realtime ones included), each next to a real exit 128+N.
const SIGNALS: &[i32] = &[1, 2, 3, 6, 9, 10, 11, 13, 14, 15, 31, 34, 64];

async fn signals_beside_codes(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `signal N` and `exit 128+N` side by side");
    let mut docs = Vec::new();
    for s in SIGNALS {
        docs.push(ctx.doc(&["signal", &s.to_string()]));
        docs.push(ctx.doc(&["exit", &(128 + s).to_string()]));
    }
    let results = ctx.run_many(docs).await?;
    let mut wrong = Vec::new();
    for (s, pair) in SIGNALS.iter().zip(results.chunks(2)) {
        let (sig_id, sig) = &pair[0];
        let (code_id, code) = &pair[1];
        let sig = sig.as_ref().map(|r| r.termination);
        let code = code.as_ref().map(|r| r.termination);
        if sig != Ok(Termination::Signaled { signal: *s }) {
            wrong.push(format!("death by signal {s} in {sig_id}: got {sig:?}"));
        }
        if code != Ok(Termination::Exited { code: 128 + s }) {
            wrong.push(format!("exit {} in {code_id}: got {code:?}", 128 + s));
        }
    }
    check!(
        ctx,
        wrong.is_empty(),
        "signals and codes 128+N confused:\n  {}",
        wrong.join("\n  ")
    );
    Ok(())
}

/// Bytes no text decoding survives: invalid UTF-8, NUL, a lone continuation byte, no final newline.
const OUT_BYTES: &[u8] = b"\xff\xfe\x00a\x00\nb\xc3(\x80";
const ERR_BYTES: &[u8] = b"\x01\x00\xff\xe2\x82";

/// `printf` escapes (octal) for `bytes`.
fn printf_escaped(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:03o}")).collect()
}

async fn output_bytes_exact(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("a shell writes raw bytes to stdout and stderr");
    let script = format!(
        "printf '{}'; printf '{}' >&2",
        printf_escaped(OUT_BYTES),
        printf_escaped(ERR_BYTES)
    );
    let id = ctx.new_id();
    let doc = ctx.shell_doc(&id, script);
    let (_, r) = ctx.run_doc(&doc).await?;
    ctx.destroy(&id).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stdout == OUT_BYTES,
        "stdout bytes {:?}, expected {:?}",
        r.stdout,
        OUT_BYTES
    );
    check!(
        ctx,
        r.stderr == ERR_BYTES,
        "stderr bytes {:?}, expected {:?}",
        r.stderr,
        ERR_BYTES
    );
    Ok(())
}

async fn streams_apart(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("a shell alternates writes to stdout and stderr");
    let id = ctx.new_id();
    let doc = ctx.shell_doc(
        &id,
        "printf out1; printf err1 >&2; printf out2; printf err2 >&2; exit 5",
    );
    let (_, r) = ctx.run_doc(&doc).await?;
    ctx.destroy(&id).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 5 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stdout == b"out1out2" && r.stderr == b"err1err2",
        "stdout {:?} and stderr {:?}, expected \"out1out2\" and \"err1err2\"",
        r.stdout_str(),
        r.stderr_str()
    );
    Ok(())
}

/// How late past its deadline a timed-out workload may still be alive.
pub const TIMEOUT_TOLERANCE: Duration = Duration::from_millis(2500);

fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| crate::residue::parse_stat(&s))
        .is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Nobody waits: the workload must still die by its deadline, seen from the host.
async fn timeout_unwaited(ctx: Ctx) -> Result<(), Failure> {
    const DEADLINE: Duration = Duration::from_millis(1000);
    ctx.step("create `hold` with timeoutMs = 1000 and never wait");
    let doc = ctx
        .doc(&["hold"])
        .with_timeout_ms(DEADLINE.as_millis() as u64);
    let id = doc.spec.id.clone();
    let h = ctx.create_running(&doc).await?;
    let started = Instant::now();
    let pid = h
        .host_pid
        .ok_or_else(|| ctx.fail("HostPid is supported but create gave no host pid"))?;
    ctx.step(format!(
        "host pid {pid} must be dead within {DEADLINE:?} + {TIMEOUT_TOLERANCE:?}"
    ));
    while alive(pid) {
        check!(
            ctx,
            started.elapsed() < DEADLINE + TIMEOUT_TOLERANCE,
            "the workload (host pid {pid}) is still alive {:?} after create, past its timeout of \
             {DEADLINE:?} + {TIMEOUT_TOLERANCE:?}, while nobody waits",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.step("a later wait reports the deadline at once");
    let r = tokio::time::timeout(Duration::from_secs(5), ctx.try_wait(&id)).await;
    check!(
        ctx,
        matches!(r, Ok(Err(CellError::DeadlineExceeded { .. }))),
        "expected DeadlineExceeded within 5 s, got {r:?}"
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

/// A timeout and a TTL in one document: the timeout fires first, the TTL still reaps the cell.
async fn timeout_with_ttl(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold` with timeoutMs = 1000 and ttlSeconds = 3");
    let doc = ctx.doc(&["hold"]).with_timeout_ms(1000).with_ttl_seconds(3);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    let created = Instant::now();
    ctx.step("wait: the timeout fires, not the TTL");
    let r = ctx.try_wait(&id).await;
    check!(
        ctx,
        matches!(r, Err(CellError::DeadlineExceeded { .. })),
        "expected DeadlineExceeded, got {r:?}"
    );
    check!(
        ctx,
        created.elapsed() < Duration::from_secs(3),
        "the 1 s timeout fired only after {:?}, past the 3 s TTL",
        created.elapsed()
    );
    ctx.step("the TTL then destroys the cell by itself");
    while ctx.backend().list().await.contains(&id) {
        check!(
            ctx,
            created.elapsed() < Duration::from_secs(3) + Duration::from_secs(10),
            "the cell is still listed {:?} after create, its TTL is 3 s",
            created.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = ctx.try_destroy(&id).await;
    check!(
        ctx,
        matches!(d, Err(CellError::NotFound { .. })),
        "destroy after the TTL: expected NotFound, got {d:?}"
    );
    ctx.assert_clean(&id).await
}

async fn code(ctx: Ctx, n: i32) -> Result<(), Failure> {
    ctx.step(format!("run `exit {n}`"));
    let r = ctx.run_and_destroy(&["exit", &n.to_string()]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: n },
        "expected exit code {n}, got {:?}",
        r.termination
    );
    Ok(())
}

async fn signaled(ctx: Ctx, sig: &str, num: i32) -> Result<(), Failure> {
    ctx.step(format!("run `signal {sig}`"));
    let r = ctx.run_and_destroy(&["signal", sig]).await?;
    check!(
        ctx,
        r.termination == Termination::Signaled { signal: num },
        "expected death by signal {num} (SIG{sig}), got {:?}",
        r.termination
    );
    Ok(())
}

async fn missing_program(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create with a program that is not in the root");
    let id = ctx.new_id();
    let mut doc = ctx.doc_for(&id, &[]);
    doc.spec.run.argv = vec![format!("/usr/bin/cellcheck-missing-{}", ctx.token())];
    match ctx.try_create(&doc).await {
        Err(CellError::NotFound {
            kind: ResourceKind::Program,
            ..
        }) => {}
        other => return Err(ctx.fail(format!("expected NotFound(program), got {other:?}"))),
    }
    ctx.step("nothing left behind");
    check!(
        ctx,
        !ctx.backend().list().await.contains(&id),
        "the failed cell is listed"
    );
    ctx.assert_clean(&id).await
}

async fn timeout(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold` with timeoutMs = 1000");
    let doc = ctx.doc(&["hold"]).with_timeout_ms(1000);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    ctx.step("wait past the deadline");
    let start = Instant::now();
    let r = ctx.try_wait(&id).await;
    let took = start.elapsed();
    check!(
        ctx,
        matches!(r, Err(CellError::DeadlineExceeded { .. })),
        "expected DeadlineExceeded, got {r:?}"
    );
    check!(
        ctx,
        took < Duration::from_secs(20),
        "the deadline of 1 s took {took:?} to fire"
    );
    ctx.step("the cell stays listed until destroyed");
    check!(
        ctx,
        ctx.backend().list().await.contains(&id),
        "the timed-out cell is no longer listed"
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn large_stdout(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `out 1000000`");
    let r = ctx.run_and_destroy(&["out", "1000000"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stdout.len() == 1_000_000,
        "captured {} stdout bytes, expected 1000000",
        r.stdout.len()
    );
    check!(
        ctx,
        r.stdout == pattern(1_000_000),
        "stdout bytes differ from the expected pattern"
    );
    check!(
        ctx,
        r.stderr.is_empty(),
        "unexpected stderr: {:?}",
        r.stderr_str()
    );
    Ok(())
}

async fn large_stderr(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `err 1000`");
    let r = ctx.run_and_destroy(&["err", "1000"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stderr == pattern(1000),
        "stderr ({} bytes) differs from the expected 1000",
        r.stderr.len()
    );
    check!(
        ctx,
        r.stdout.is_empty(),
        "unexpected stdout: {:?}",
        r.stdout_str()
    );
    Ok(())
}

async fn wait_twice(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run a shell writing to both streams, exit 42");
    let id = ctx.new_id();
    let doc = ctx.shell_doc(&id, "printf 'to stdout'; printf 'to stderr' >&2; exit 42");
    let (_, first) = ctx.run_doc(&doc).await?;
    ctx.step("wait again");
    let second = ctx.wait(&id).await?;
    check!(
        ctx,
        first == second,
        "second wait differs: {first:?} vs {second:?}"
    );
    check!(
        ctx,
        first.termination == Termination::Exited { code: 42 },
        "exit: {:?}",
        first.termination
    );
    check!(
        ctx,
        second.stdout == b"to stdout" && second.stderr == b"to stderr",
        "the second wait's captures are {:?} / {:?}, expected \"to stdout\" / \"to stderr\"",
        second.stdout_str(),
        second.stderr_str()
    );
    ctx.destroy(&id).await?;
    Ok(())
}
