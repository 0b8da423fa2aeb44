//! Continuation snapshots: restore into a new id and carry on from where the snapshot was taken.

use std::path::Path;
use std::time::Duration;

use cellcheck_contract::{CellError, CellHandle, ResourceKind, SnapshotRef};

use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "snapshot";
const COUNTER: &str = "/tmp/cellcheck-count";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(
            F,
            "continue_after_restore",
            [Snapshot, Exec],
            continue_after_restore
        ),
        scenario!(F, "restore_twice", [Snapshot, Exec], restore_twice),
        scenario!(F, "unknown_cell", [Snapshot], unknown_cell),
        scenario!(F, "corrupted_image", [Snapshot], corrupted_image),
        scenario!(F, "delete_removes_files", [Snapshot], delete_removes_files),
    ]
}

/// The counter's value, read through exec `cat`.
pub(crate) async fn read_count(ctx: &Ctx, id: &str) -> Result<u64, Failure> {
    let r = ctx.exec(id, &["cat", COUNTER]).await?;
    r.stdout_str().trim().parse().map_err(|_| {
        ctx.fail(format!(
            "counter file holds {:?} ({:?})",
            r.stdout_str(),
            r.termination
        ))
    })
}

/// Wait until the counter of `id` exceeds `above`.
pub(crate) async fn await_count_above(ctx: &Ctx, id: &str, above: u64) -> Result<u64, Failure> {
    let start = std::time::Instant::now();
    loop {
        if let Ok(v) = read_count(ctx, id).await {
            if v > above {
                return Ok(v);
            }
        }
        check!(
            ctx,
            start.elapsed() < Duration::from_secs(20),
            "the counter of {id} did not pass {above} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running counter cell (every 50 ms), with at least a few ticks done.
pub(crate) async fn counting_cell(ctx: &Ctx) -> Result<String, Failure> {
    ctx.step("create `count` into the cell's /tmp");
    let doc = ctx.doc(&["count", COUNTER, "50"]);
    let id = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    await_count_above(ctx, &id, 2).await?;
    Ok(id)
}

async fn snapshot_of(ctx: &Ctx, id: &str) -> Result<SnapshotRef, Failure> {
    ctx.step(format!("snapshot {id}"));
    ctx.backend()
        .snapshot(id)
        .await
        .map_err(|e| ctx.fail(format!("snapshot failed: {e} ({e:?})")))
}

async fn restore(ctx: &Ctx, snap: &SnapshotRef) -> Result<CellHandle, Failure> {
    let new_id = ctx.new_id();
    ctx.step(format!("restore into {new_id}"));
    let h = ctx
        .backend()
        .restore(snap, &new_id)
        .await
        .map_err(|e| ctx.fail(format!("restore failed: {e} ({e:?})")))?;
    ctx.note_live(&h);
    check!(
        ctx,
        h.id == new_id,
        "restore returned id {:?}, expected {new_id:?}",
        h.id
    );
    Ok(h)
}

async fn delete(ctx: &Ctx, snap: &SnapshotRef) -> Result<(), Failure> {
    ctx.step("delete the snapshot");
    ctx.backend()
        .delete_snapshot(snap)
        .await
        .map_err(|e| ctx.fail(format!("delete_snapshot failed: {e} ({e:?})")))?;
    if let Some(p) = &snap.path {
        check!(ctx, !p.exists(), "snapshot files remain at {}", p.display());
    }
    Ok(())
}

async fn continue_after_restore(ctx: Ctx) -> Result<(), Failure> {
    let src = counting_cell(&ctx).await?;
    let snap = snapshot_of(&ctx, &src).await?;
    let at_snap = read_count(&ctx, &src).await?;
    ctx.step("destroy the source");
    ctx.destroy(&src).await?;
    let h = restore(&ctx, &snap).await?;
    ctx.step("the restored counter continues");
    let first = read_count(&ctx, &h.id).await?;
    // The value read after the snapshot may be a few ticks ahead of the image: allow slack.
    check!(
        ctx,
        first + 20 >= at_snap,
        "restored counter {first} is far behind {at_snap} at snapshot time (restarted?)"
    );
    let later = await_count_above(&ctx, &h.id, first).await?;
    check!(ctx, later > first, "restored counter does not advance");
    ctx.destroy(&h.id).await?;
    delete(&ctx, &snap).await?;
    ctx.assert_clean(&h.id).await
}

async fn restore_twice(ctx: Ctx) -> Result<(), Failure> {
    let src = counting_cell(&ctx).await?;
    let snap = snapshot_of(&ctx, &src).await?;
    ctx.destroy(&src).await?;
    let a = restore(&ctx, &snap).await?;
    let b = restore(&ctx, &snap).await?;
    check!(ctx, a.id != b.id, "two restores share the id {}", a.id);
    ctx.step("both advance independently");
    let (a0, b0) = (
        read_count(&ctx, &a.id).await?,
        read_count(&ctx, &b.id).await?,
    );
    await_count_above(&ctx, &a.id, a0).await?;
    await_count_above(&ctx, &b.id, b0).await?;
    ctx.destroy(&a.id).await?;
    ctx.step("the second survives the first's destroy");
    await_count_above(&ctx, &b.id, read_count(&ctx, &b.id).await?).await?;
    ctx.destroy(&b.id).await?;
    delete(&ctx, &snap).await
}

async fn unknown_cell(ctx: Ctx) -> Result<(), Failure> {
    let id = ctx.new_id();
    ctx.step("snapshot a cell never created");
    match ctx.backend().snapshot(&id).await {
        Err(CellError::NotFound {
            kind: ResourceKind::Cell,
            ..
        }) => Ok(()),
        other => Err(ctx.fail(format!("expected NotFound(cell), got {other:?}"))),
    }
}

fn corrupt(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if let Ok(md) = p.metadata() {
            // Halve every file and scribble over what is left.
            let len = md.len() / 2;
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
                let _ = f.set_len(len);
                let _ = std::os::unix::fs::FileExt::write_at(
                    &f,
                    &vec![0xA5; len.min(4096) as usize],
                    0,
                );
                n += 1;
            }
        }
    }
    n
}

async fn corrupted_image(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let src = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    let snap = snapshot_of(&ctx, &src).await?;
    ctx.destroy(&src).await?;
    let Some(path) = snap.path.clone() else {
        return Err(ctx.fail(
            "the snapshot has no host path to corrupt; cannot check restore of a damaged image",
        ));
    };
    ctx.step(format!("corrupt {}", path.display()));
    let n = corrupt(&path);
    check!(
        ctx,
        n > 0,
        "no snapshot files found under {}",
        path.display()
    );
    let new_id = ctx.new_id();
    ctx.step(format!("restore the damaged image into {new_id}"));
    match ctx.backend().restore(&snap, &new_id).await {
        Err(_) => {}
        Ok(h) => {
            ctx.note_live(&h);
            return Err(ctx.fail("restore of a truncated, overwritten image succeeded"));
        }
    }
    check!(
        ctx,
        !ctx.backend().list().await.contains(&new_id),
        "the failed restore is listed"
    );
    ctx.assert_clean(&new_id).await?;
    delete(&ctx, &snap).await
}

async fn delete_removes_files(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let src = doc.spec.id.clone();
    ctx.create_running(&doc).await?;
    let snap = snapshot_of(&ctx, &src).await?;
    ctx.destroy(&src).await?;
    if let Some(p) = &snap.path {
        check!(
            ctx,
            p.exists(),
            "the snapshot path {} does not exist before delete",
            p.display()
        );
    }
    delete(&ctx, &snap).await?;
    ctx.step("a second delete is NotFound");
    match ctx.backend().delete_snapshot(&snap).await {
        Err(CellError::NotFound { .. }) => Ok(()),
        other => Err(ctx.fail(format!(
            "second delete_snapshot: expected NotFound, got {other:?}"
        ))),
    }
}
