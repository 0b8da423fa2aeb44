//! Create, wait, destroy, and the id rules around them.

use cellcheck_contract::{CellError, ResourceKind, Termination};

use crate::harness::{alone, Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "lifecycle";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "create_wait_destroy", [], create_wait_destroy),
        scenario!(F, "many_cells", [], many_cells),
        scenario!(
            F,
            "capabilities_stable_and_typed",
            [],
            capabilities_stable_and_typed
        ),
        scenario!(F, "duplicate_live_id", [], duplicate_live_id),
        scenario!(F, "same_id_after_destroy", [], same_id_after_destroy),
        scenario!(F, "destroy_unknown", [], destroy_unknown),
        scenario!(F, "double_destroy", [], double_destroy),
        scenario!(F, "concurrent_destroy", [], concurrent_destroy),
        scenario!(F, "destroy_running", [], destroy_running),
        scenario!(F, "teardown_remaining_cells", [], teardown_remaining_cells),
        scenario!(F, "list_live_not_destroyed", [], list_live_not_destroyed),
        scenario!(F, "exec_output", [Exec], exec_output),
        scenario!(
            F,
            "host_pid_is_the_workload",
            [HostPid],
            host_pid_is_the_workload
        ),
    ]
}

/// The basic contract other scenarios build on: the host pid create reports is the workload's
/// process (they read its `/proc` entry). Decided exactly, never by a deadline: the reported
/// process is gone, or is a ready probe without this cell's marker, or the workload (found by its
/// marker in the process table) is another process. Waiting for the workload to start is bounded
/// by the harness's progress bound like any step.
async fn host_pid_is_the_workload(ctx: Ctx) -> Result<(), Failure> {
    use cellcheck_fixtures::{probe_state, ProbeState};
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let id = doc.spec.id.clone();
    let h = ctx.create(&doc).await?;
    let Some(pid) = h.host_pid else {
        return Err(ctx.fail("HostPid is supported but create gave no host pid"));
    };
    let marker = ctx.marker_of(&id);
    let needle = format!("{}={marker}\0", crate::ids::MARKER_VAR).into_bytes();
    let proc_root = std::path::Path::new("/proc");
    let has_marker = |p: u32| {
        std::fs::read(format!("/proc/{p}/environ"))
            .is_ok_and(|env| memchr::memmem::find(&env, &needle).is_some())
    };
    ctx.step("compare the reported host pid with the workload found by its marker");
    loop {
        match probe_state(proc_root, pid) {
            ProbeState::Ready if has_marker(pid) => break,
            ProbeState::Ready => {
                return Err(ctx.fail(format!(
                    "create reported host pid {pid}: a ready probe without this cell's marker in \
                     its env (another cell's workload, or the env was not passed)"
                )))
            }
            s @ (ProbeState::Gone | ProbeState::Exited) => {
                return Err(ctx.fail(format!(
                    "create reported host pid {pid}, which {} while the workload holds",
                    if s == ProbeState::Gone {
                        "does not exist"
                    } else {
                        "has exited"
                    }
                )))
            }
            ProbeState::Starting { comm, .. } => {
                // The residue checker's walk of the process table finds the marked processes.
                let found = crate::residue::marked_processes(std::slice::from_ref(&marker), &[])
                    .into_iter()
                    .map(|(p, _)| p.pid)
                    .find(|&q| {
                        q != pid && probe_state(proc_root, q) == ProbeState::Ready && has_marker(q)
                    });
                if let Some(q) = found {
                    return Err(ctx.fail(format!(
                        "create reported host pid {pid} ({comm:?}), but the workload runs as host \
                         pid {q} (found by this cell's marker)"
                    )));
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    ctx.step("destroy");
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn create_wait_destroy(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create + wait `exit 0`");
    let (id, r) = ctx.run_probe(&["exit", "0"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "expected exit 0, got {:?}",
        r.termination
    );
    ctx.step("destroy");
    let t = ctx.destroy(&id).await?;
    check!(
        ctx,
        t.id == id,
        "teardown report names {:?}, expected {id:?}",
        t.id
    );
    check!(
        ctx,
        !t.killed_running,
        "workload had exited, yet killed_running = true"
    );
    ctx.step("residue after destroy");
    ctx.assert_clean(&id).await
}

async fn duplicate_live_id(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    ctx.step("create again with the same live id");
    let again = ctx.doc_for(&id, &["exit", "0"]);
    match ctx.try_create(&again).await {
        Err(CellError::AlreadyExists { id: got }) => {
            check!(
                ctx,
                got == id,
                "AlreadyExists names {got:?}, expected {id:?}"
            )
        }
        other => return Err(ctx.fail(format!("expected AlreadyExists, got {other:?}"))),
    }
    ctx.step("the first cell is still live");
    check!(
        ctx,
        ctx.backend().list().await.contains(&id),
        "the original cell vanished from list()"
    );
    let t = ctx.destroy(&id).await?;
    check!(
        ctx,
        t.killed_running,
        "the original `hold` workload should still have been running"
    );
    ctx.assert_clean(&id).await
}

async fn same_id_after_destroy(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("first run");
    let doc = ctx.doc(&["exit", "0"]);
    let id = doc.spec.id.clone();
    ctx.create(&doc).await?;
    ctx.wait(&id).await?;
    ctx.destroy(&id).await?;
    ctx.step("second run under the same id");
    let doc2 = ctx.doc_for(&id, &["exit", "7"]);
    ctx.create(&doc2).await?;
    let r = ctx.wait(&id).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 7 },
        "second run: expected exit 7, got {:?}",
        r.termination
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

async fn destroy_unknown(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("destroy an id never created");
    let id = ctx.new_id();
    match ctx.try_destroy(&id).await {
        Err(CellError::NotFound {
            kind: ResourceKind::Cell,
            ..
        }) => Ok(()),
        other => Err(ctx.fail(format!("expected NotFound(cell), got {other:?}"))),
    }
}

async fn double_destroy(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run and destroy");
    let (id, _) = ctx.run_probe(&["exit", "0"]).await?;
    ctx.destroy(&id).await?;
    ctx.step("destroy again");
    match ctx.try_destroy(&id).await {
        Err(CellError::NotFound {
            kind: ResourceKind::Cell,
            ..
        }) => {}
        other => {
            return Err(ctx.fail(format!(
                "second destroy: expected NotFound(cell), got {other:?}"
            )))
        }
    }
    ctx.assert_clean(&id).await
}

async fn concurrent_destroy(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    ctx.step("two destroys at once");
    let (a, b) = tokio::join!(ctx.try_destroy(&id), ctx.try_destroy(&id));
    let oks = [&a, &b].iter().filter(|r| r.is_ok()).count();
    check!(
        ctx,
        oks == 1,
        "expected exactly one Ok, got {a:?} and {b:?}"
    );
    let other = if a.is_ok() { &b } else { &a };
    check!(
        ctx,
        matches!(other, Err(CellError::NotFound { .. })),
        "the losing destroy should be NotFound, got {other:?}"
    );
    ctx.assert_clean(&id).await
}

async fn destroy_running(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    ctx.step("destroy while running");
    let t = ctx.destroy(&id).await?;
    check!(
        ctx,
        t.killed_running,
        "destroy of a running workload reported killed_running = false"
    );
    ctx.assert_clean(&id).await
}

async fn teardown_remaining_cells(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create two `hold` cells");
    let a = ctx.doc(&["hold"]);
    let b = ctx.doc(&["hold"]);
    ctx.create_running(&a).await?;
    ctx.create_running(&b).await?;
    ctx.step("destroy the first");
    let t = ctx.destroy(&a.spec.id).await?;
    check!(
        ctx,
        t.remaining_cells >= 1,
        "the second cell is live, yet remaining_cells = {}",
        t.remaining_cells
    );
    // Other trials in this process share the backend; counts are exact only when alone.
    if alone() {
        let listed = ctx.backend().list().await.len();
        check!(
            ctx,
            t.remaining_cells == listed,
            "remaining_cells = {} but list() has {listed}",
            t.remaining_cells
        );
    }
    ctx.step("destroy the second");
    let t2 = ctx.destroy(&b.spec.id).await?;
    if alone() {
        check!(
            ctx,
            t2.remaining_cells + 1 == t.remaining_cells,
            "remaining_cells went from {} to {} after one more destroy",
            t.remaining_cells,
            t2.remaining_cells
        );
    }
    Ok(())
}

async fn list_live_not_destroyed(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    ctx.step("list while live");
    let l = ctx.backend().list().await;
    check!(ctx, l.contains(&id), "list() lacks the live cell: {l:?}");
    ctx.destroy(&id).await?;
    ctx.step("list after destroy");
    let l = ctx.backend().list().await;
    check!(ctx, !l.contains(&id), "list() still has the destroyed cell");
    Ok(())
}

async fn exec_output(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    ctx.step("exec `out 10`");
    let r = ctx.exec(&id, &["out", "10"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exec exit: {:?}",
        r.termination
    );
    check!(
        ctx,
        r.stdout == b"0123456789",
        "exec stdout {:?}",
        r.stdout_str()
    );
    ctx.step("exec `exit 3`");
    let r = ctx.exec(&id, &["exit", "3"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 3 },
        "exec exit: {:?}",
        r.termination
    );
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}

/// Cells live at once in [`many_cells`].
pub const MANY: usize = 16;

/// Many live cells, each with its own output and exit code, waited in random order and destroyed
/// concurrently: every report belongs to its own cell.
async fn many_cells(ctx: Ctx) -> Result<(), Failure> {
    use rand::seq::SliceRandom;
    ctx.step(format!(
        "create {MANY} cells ({} at a time)",
        crate::harness::PARALLEL
    ));
    let ids = ctx
        .concurrently(MANY, |i| {
            let id = ctx.new_id();
            let mut doc = ctx.doc_for(&id, &[]);
            // Sleeps so the cells overlap; each writes its own index and id on both streams.
            doc.spec.run.argv = vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "printf 'out-{i}-%s' \"$0\"; printf 'err-{i}' >&2; sleep 1; exit {}",
                    20 + i
                ),
                id.clone(),
            ];
            let ctx = ctx.clone();
            async move { ctx.create(&doc).await.map(|h| h.id) }
        })
        .await?;
    ctx.step("all of them are listed at once");
    let listed = ctx.backend().list().await;
    let missing: Vec<&String> = ids.iter().filter(|id| !listed.contains(id)).collect();
    check!(
        ctx,
        missing.is_empty(),
        "live cells not listed: {missing:?}"
    );

    ctx.step("wait for them in random order, concurrently");
    let mut order: Vec<usize> = (0..MANY).collect();
    order.shuffle(&mut rand::thread_rng());
    let mut waits = tokio::task::JoinSet::new();
    for i in order {
        let (ctx, id) = (ctx.clone(), ids[i].clone());
        waits.spawn(async move { (i, ctx.try_wait(&id).await) });
    }
    let mut wrong = Vec::new();
    while let Some(j) = waits.join_next().await {
        let (i, r) = j.map_err(|e| ctx.fail(format!("wait task: {e}")))?;
        let want_out = format!("out-{i}-{}", ids[i]);
        let want_err = format!("err-{i}");
        match r {
            Ok(r) if r.termination == (Termination::Exited { code: 20 + i as i32 })
                && r.stdout == want_out.as_bytes()
                && r.stderr == want_err.as_bytes() => {}
            Ok(r) => wrong.push(format!(
                "cell {i} ({}): {:?}, stdout {:?}, stderr {:?}; expected exit {}, {want_out:?}, {want_err:?}",
                ids[i],
                r.termination,
                r.stdout_str(),
                r.stderr_str(),
                20 + i
            )),
            Err(e) => wrong.push(format!("cell {i} ({}): wait failed: {e:?}", ids[i])),
        }
    }
    check!(
        ctx,
        wrong.is_empty(),
        "reports that are not their own cell's:\n  {}",
        wrong.join("\n  ")
    );

    ctx.step("destroy them all concurrently");
    let mut destroys = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let ctx = ctx.clone();
        destroys.spawn(async move { (id.clone(), ctx.try_destroy(&id).await) });
    }
    while let Some(j) = destroys.join_next().await {
        let (id, r) = j.map_err(|e| ctx.fail(format!("destroy task: {e}")))?;
        match r {
            Ok(t) if t.id == id => {}
            Ok(t) => wrong.push(format!("destroy {id} reported cell {:?}", t.id)),
            Err(e) => wrong.push(format!("destroy {id}: {e:?}")),
        }
    }
    check!(
        ctx,
        wrong.is_empty(),
        "concurrent destroys:\n  {}",
        wrong.join("\n  ")
    );
    let listed = ctx.backend().list().await;
    let left: Vec<&String> = ids.iter().filter(|id| listed.contains(id)).collect();
    check!(
        ctx,
        left.is_empty(),
        "destroyed cells still listed: {left:?}"
    );
    for id in &ids {
        ctx.assert_clean(id).await?;
    }
    Ok(())
}

/// `capabilities()` gives the same answer every time, and an operation whose capability is
/// unsupported answers `Unsupported` naming it (on a live cell, so nothing else can be the reason).
async fn capabilities_stable_and_typed(ctx: Ctx) -> Result<(), Failure> {
    use cellcheck_contract::Capability;
    ctx.step("ask for the capabilities three times");
    let first = ctx.caps();
    for _ in 0..2 {
        let again = ctx.caps();
        check!(
            ctx,
            again == first,
            "capabilities changed between calls: {first:?} then {again:?}"
        );
    }
    let unsupported: Vec<Capability> = [Capability::Exec, Capability::Snapshot, Capability::Pause]
        .into_iter()
        .filter(|c| !first.has(*c))
        .collect();
    if unsupported.is_empty() {
        return Ok(());
    }
    ctx.step("create a holding cell");
    let doc = ctx.doc(&["hold"]);
    let id = ctx.create_running(&doc).await?.id;
    for cap in unsupported {
        ctx.step(format!("{cap} is unsupported: call it anyway"));
        let r = match cap {
            Capability::Exec => ctx
                .backend()
                .exec(
                    &id,
                    cellcheck_contract::ExecRequest {
                        argv: Ctx::probe_argv(&["exit", "0"]),
                        env: vec![ctx.marker_env(&id)],
                        timeout_ms: Some(10_000),
                    },
                )
                .await
                .map(|_| ()),
            Capability::Snapshot => ctx.backend().snapshot(&id).await.map(|_| ()),
            _ => ctx.backend().pause(&id).await,
        };
        check!(
            ctx,
            r == Err(CellError::Unsupported { capability: cap }),
            "{cap} is declared unsupported, yet calling it gave {r:?}"
        );
    }
    ctx.destroy(&id).await?;
    ctx.assert_clean(&id).await
}
