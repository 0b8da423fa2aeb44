//! Resource limits the backend claims to enforce.

use cellcheck_contract::{Limits, Termination};

use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "limits";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(F, "memory_oom", [MemoryLimit], memory_oom),
        scenario!(F, "pids_max", [PidsLimit], pids_max),
    ]
}

async fn memory_oom(ctx: Ctx) -> Result<(), Failure> {
    // Twice the limit, yet little enough that an unlimited cell survives it on every backend
    // (a VM for this limit has 256 MiB): a cell that dies anyway would hide a dropped limit.
    ctx.step("run `alloc 128` under memoryMaxBytes = 64 MiB");
    let doc = ctx.doc(&["alloc", "128"]).with_limits(Limits {
        memory_max_bytes: Some(64 << 20),
        ..Limits::default()
    });
    let (id, r) = ctx.run_doc(&doc).await?;
    check!(
        ctx,
        r.termination == Termination::OutOfMemory,
        "expected OutOfMemory, got {:?} (stdout {:?})",
        r.termination,
        r.stdout_str().trim()
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn pids_max(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("run `fork 64` under pidsMax = 16");
    let doc = ctx.doc(&["fork", "64"]).with_limits(Limits {
        pids_max: Some(16),
        ..Limits::default()
    });
    let (id, r) = ctx.run_doc(&doc).await?;
    let out = r.stdout_str();
    let field = |k: &str| -> Option<u64> {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    let (forked, failed) = (field("forked="), field("failed="));
    check!(
        ctx,
        forked.is_some() && failed.is_some(),
        "unexpected `fork` output {out:?} ({:?})",
        r.termination
    );
    check!(
        ctx,
        failed.unwrap_or(0) > 0,
        "all 64 forks succeeded under pidsMax = 16: {out:?}"
    );
    check!(
        ctx,
        forked.unwrap_or(64) < 16,
        "{forked:?} forks succeeded under pidsMax = 16"
    );
    ctx.destroy(&id).await?;
    Ok(())
}
