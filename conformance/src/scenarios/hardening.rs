//! What a hostile workload can do: capabilities, no_new_privs, seccomp and the dangerous
//! syscalls, the root and `/proc`'s kernel interfaces, `/dev`, mounts, the cgroup view, rlimits
//! and the CPU limit. The probe's `harden` reports raw facts; every rule is here.

use cellcheck_contract::spec::CpuMax;
use cellcheck_contract::{CellDocument, Limits, OpenFiles, Termination, DEFAULT_OPEN_FILES};
use serde_json::Value;

use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "hardening";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(
            F,
            "capabilities_empty",
            [DropCapabilities],
            capabilities_empty
        ),
        scenario!(F, "no_new_privs", [NoNewPrivs], no_new_privs),
        scenario!(F, "seccomp_filter", [Seccomp], seccomp_filter),
        scenario!(F, "dangerous_syscalls", [Seccomp], dangerous_syscalls),
        scenario!(
            F,
            "exec_hardened",
            [Exec, DropCapabilities, NoNewPrivs, Seccomp],
            exec_hardened
        ),
        scenario!(F, "readonly_root", [ReadonlyRoot], readonly_root),
        scenario!(F, "proc_masked", [ProcMasking], proc_masked),
        scenario!(
            F,
            "kernel_tunables_readonly",
            [ProcMasking],
            kernel_tunables_readonly
        ),
        scenario!(F, "dev_minimal", [MinimalDev], dev_minimal),
        scenario!(F, "mount_refused", [DropCapabilities], mount_refused),
        scenario!(F, "cgroup_view", [CgroupIsolation], cgroup_view),
        scenario!(F, "rlimits_declared", [Rlimits], rlimits_declared),
        scenario!(F, "rlimits_default", [Rlimits], rlimits_default),
        scenario!(F, "cpu_max", [CpuLimit], cpu_max),
    ]
}

/// Errnos that mean "refused": by a missing capability, a seccomp filter, or a kernel (or
/// gVisor) that does not offer the call at all.
const REFUSED: &[i64] = &[libc::EPERM as i64, libc::EACCES as i64, libc::ENOSYS as i64];

/// `/dev` entries a cell may have: the standard nodes, the fd links, and the pts, shm and mqueue
/// mount points.
const DEV_ALLOWED: &[&str] = &[
    "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
    "stdin", "stdout", "stderr",
];

/// A refused attempt: an errno in [`REFUSED`], or a child killed by the filter (`-SIG`).
fn refused(e: i64) -> bool {
    REFUSED.contains(&e) || e < 0
}

fn errno_name(e: i64) -> String {
    if e < 0 {
        return format!("killed by signal {}", -e);
    }
    if e == 0 {
        return "succeeded".into();
    }
    format!("{}", std::io::Error::from_raw_os_error(e as i32))
}

/// Run `harden` in a cell of `doc` and parse its report.
async fn facts_of(ctx: &Ctx, doc: &CellDocument) -> Result<(String, Value), Failure> {
    ctx.step("run `harden`");
    let (id, r) = ctx.run_doc(doc).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "`harden` ended with {:?}; stderr: {}",
        r.termination,
        r.stderr_str().trim()
    );
    let v = parse(ctx, &r.stdout_str())?;
    Ok((id, v))
}

fn parse(ctx: &Ctx, out: &str) -> Result<Value, Failure> {
    serde_json::from_str(out.trim())
        .map_err(|e| ctx.fail(format!("`harden` printed no JSON ({e}): {out:?}")))
}

async fn facts(ctx: &Ctx) -> Result<(String, Value), Failure> {
    let doc = ctx.doc(&["harden"]);
    facts_of(ctx, &doc).await
}

fn num(v: &Value, ptr: &str) -> Option<i64> {
    v.pointer(ptr).and_then(Value::as_i64)
}

/// Named capability sets that are not empty, as `set=0x...`.
fn held_capabilities(v: &Value) -> Vec<String> {
    ["eff", "prm", "inh", "bnd", "amb"]
        .iter()
        .filter_map(
            |set| match v.pointer(&format!("/caps/{set}")).and_then(Value::as_u64) {
                Some(0) => None,
                Some(m) => Some(format!("{set}=0x{m:x}")),
                None => Some(format!("{set}=unreported")),
            },
        )
        .collect()
}

async fn capabilities_empty(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let held = held_capabilities(&v);
    check!(
        ctx,
        held.is_empty(),
        "the workload holds capabilities: {}",
        held.join(" ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn no_new_privs(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let nnp = num(&v, "/no_new_privs");
    check!(
        ctx,
        nnp == Some(1),
        "no_new_privs is not set in the workload (prctl says {nnp:?})"
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn seccomp_filter(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let mode = num(&v, "/seccomp");
    check!(
        ctx,
        mode == Some(2),
        "no seccomp filter: the workload's seccomp mode is {mode:?}, want 2 (filter)"
    );
    ctx.destroy(&id).await?;
    Ok(())
}

/// `name: what happened` for every attempt in `obj` that was not refused.
fn allowed(v: &Value, obj: &str) -> Vec<String> {
    v.get(obj)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, e)| {
                    let e = e.as_i64().unwrap_or(0);
                    (!refused(e)).then(|| format!("{k}: {}", errno_name(e)))
                })
                .collect()
        })
        .unwrap_or_else(|| vec![format!("{obj}: not reported")])
}

async fn dangerous_syscalls(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let open = allowed(&v, "syscalls");
    check!(
        ctx,
        open.is_empty(),
        "dangerous syscalls were not refused (want EPERM, EACCES or ENOSYS):\n  {}",
        open.join("\n  ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn exec_hardened(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create `hold`");
    let doc = ctx.doc(&["hold"]);
    let h = ctx.create_running(&doc).await?;
    ctx.step("exec `harden` in the cell");
    let r = ctx.exec(&h.id, &["harden"]).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "exec `harden` ended with {:?}; stderr: {}",
        r.termination,
        r.stderr_str().trim()
    );
    let v = parse(&ctx, &r.stdout_str())?;
    let held = held_capabilities(&v);
    check!(
        ctx,
        held.is_empty(),
        "an exec'd command holds capabilities: {}",
        held.join(" ")
    );
    let (nnp, mode) = (num(&v, "/no_new_privs"), num(&v, "/seccomp"));
    check!(
        ctx,
        nnp == Some(1) && mode == Some(2),
        "an exec'd command runs with no_new_privs {nnp:?} and seccomp mode {mode:?} (want 1 and 2)"
    );
    let open = allowed(&v, "syscalls");
    check!(
        ctx,
        open.is_empty(),
        "an exec'd command may make dangerous syscalls:\n  {}",
        open.join("\n  ")
    );
    ctx.destroy(&h.id).await?;
    Ok(())
}

async fn readonly_root(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let e = num(&v, "/root_write").unwrap_or(0);
    check!(
        ctx,
        e != 0,
        "the root filesystem is writable: a file was created at /"
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn proc_masked(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let masked = v.get("masked").and_then(Value::as_object);
    check!(ctx, masked.is_some(), "`harden` reported no masked paths");
    let mut readable = Vec::new();
    for (path, f) in masked.into_iter().flatten() {
        let b = |k: &str| f.get(k).and_then(Value::as_bool).unwrap_or(false);
        let n = |k: &str| f.get(k).and_then(Value::as_i64).unwrap_or(0);
        if !b("exists") || n("open") != 0 {
            continue;
        }
        let leak = if b("dir") {
            n("entries") > 0
        } else if path.ends_with("kmsg") {
            // Never read (that would take the host's log): an open that worked is the leak.
            !b("null")
        } else {
            !b("null") && n("bytes") > 0
        };
        if leak {
            readable.push(format!("{path}: {f}"));
        }
    }
    check!(
        ctx,
        readable.is_empty(),
        "masked /proc paths are readable:\n  {}",
        readable.join("\n  ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn kernel_tunables_readonly(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let mut writable: Vec<String> = v
        .get("readonly")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, ro)| ro.as_bool() == Some(false))
                .map(|(p, _)| format!("{p}: mounted read-write"))
                .collect()
        })
        .unwrap_or_else(|| vec!["readonly: not reported".into()]);
    if let Some(m) = v.get("write_open").and_then(Value::as_object) {
        writable.extend(
            m.iter()
                .filter(|(_, e)| e.as_i64() == Some(0))
                .map(|(p, _)| format!("{p}: opened for writing")),
        );
    }
    check!(
        ctx,
        writable.is_empty(),
        "kernel interfaces are writable from the cell:\n  {}",
        writable.join("\n  ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn dev_minimal(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let dev: Vec<String> = v
        .get("dev")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let extra: Vec<&String> = dev
        .iter()
        .filter(|d| !DEV_ALLOWED.contains(&d.as_str()))
        .collect();
    check!(
        ctx,
        extra.is_empty(),
        "/dev holds nodes beyond the standard set: {extra:?} (all: {dev:?})"
    );
    let made = allowed(&v, "mknod");
    check!(
        ctx,
        made.iter().all(|m| !m.ends_with("succeeded")),
        "mknod of a block device worked: {made:?}"
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn mount_refused(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let mounted: Vec<String> = v
        .get("mounts")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| e.as_i64() == Some(0))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_else(|| vec!["mounts: not reported".into()]);
    check!(
        ctx,
        mounted.is_empty(),
        "the workload could mount: {}",
        mounted.join(", ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn cgroup_view(ctx: Ctx) -> Result<(), Failure> {
    let (id, v) = facts(&ctx).await?;
    let text = v.get("cgroup").and_then(Value::as_str).unwrap_or("");
    // `ID:CONTROLLERS:PATH`: inside its own cgroup namespace a cell is at `/` of every hierarchy.
    let outside: Vec<&str> = text
        .lines()
        .filter(|l| l.splitn(3, ':').nth(2).is_some_and(|p| p != "/"))
        .collect();
    check!(
        ctx,
        outside.is_empty(),
        "the workload sees cgroup paths outside its own: {outside:?} (no cgroup namespace)"
    );
    let foreign: Vec<String> = v
        .get("cgroup_mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m.get("root").and_then(Value::as_str) != Some("/"))
        .map(|m| m.to_string())
        .collect();
    check!(
        ctx,
        foreign.is_empty(),
        "cgroup mounts in the cell show another tree than its own: {foreign:?}"
    );
    let agents = v.get("release_agents").cloned().unwrap_or(Value::Null);
    check!(
        ctx,
        agents.as_array().is_some_and(Vec::is_empty),
        "a cgroup v1 release_agent is visible in the cell: {agents}"
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn nofile_is(ctx: &Ctx, doc: &CellDocument, want: OpenFiles) -> Result<(), Failure> {
    let (id, v) = facts_of(ctx, doc).await?;
    let got = (num(&v, "/rlimits/nofile/0"), num(&v, "/rlimits/nofile/1"));
    check!(
        ctx,
        got == (Some(want.soft as i64), Some(want.hard as i64)),
        "RLIMIT_NOFILE soft/hard is {got:?}, want ({}, {}) (all rlimits: {})",
        want.soft,
        want.hard,
        v.get("rlimits").cloned().unwrap_or(Value::Null)
    );
    ctx.destroy(&id).await?;
    Ok(())
}

async fn rlimits_declared(ctx: Ctx) -> Result<(), Failure> {
    let want = OpenFiles {
        soft: 200,
        hard: 300,
    };
    let doc = ctx.doc(&["harden"]).with_limits(Limits {
        open_files: Some(want),
        ..Limits::default()
    });
    nofile_is(&ctx, &doc, want).await
}

async fn rlimits_default(ctx: Ctx) -> Result<(), Failure> {
    let doc = ctx.doc(&["harden"]);
    nofile_is(&ctx, &doc, DEFAULT_OPEN_FILES).await
}

/// `cpuMax` of 1% (the smallest quota admission allows) for a 1.5 s busy loop. The loop may get
/// less (the host is busy), never more than three times the quota: CFS hands out at most the
/// quota per period, and the tolerance covers the loop's own measuring (below). An unlimited loop
/// gets far more even on a busy host: 2 cores at load 30 still give it about 6%.
///
/// The loop's CPU time is the smaller of the process clock and the time the loop saw itself run
/// (steps between clock reads short enough to have been on the CPU): the process clock is exact
/// on a Linux kernel, but gVisor's counts the time its task spent throttled by the host.
async fn cpu_max(ctx: Ctx) -> Result<(), Failure> {
    const QUOTA: u64 = 1_000;
    const PERIOD: u64 = 100_000;
    const TOLERANCE: f64 = 3.0;
    let doc = ctx.doc(&["spin", "1500"]).with_limits(Limits {
        cpu_max: Some(CpuMax {
            quota: QUOTA,
            period: PERIOD,
        }),
        ..Limits::default()
    });
    ctx.step("run `spin 1500` under cpuMax 1000/100000");
    let (id, r) = ctx.run_doc(&doc).await?;
    check!(
        ctx,
        r.termination == Termination::Exited { code: 0 },
        "`spin` ended with {:?}",
        r.termination
    );
    let v = parse(&ctx, &r.stdout_str())?;
    let (wall, cpu, ran) = (num(&v, "/wall_ms"), num(&v, "/cpu_ms"), num(&v, "/ran_ms"));
    let (Some(wall), Some(cpu), Some(ran)) = (wall, cpu, ran) else {
        return Err(ctx.fail(format!("`spin` printed {v}")));
    };
    let got = cpu.min(ran);
    let share = got as f64 / wall.max(1) as f64;
    let limit = QUOTA as f64 / PERIOD as f64 * TOLERANCE;
    let within = share <= limit;
    check!(
        ctx,
        within,
        "cpuMax not enforced: a busy loop got {got} ms of CPU in {wall} ms ({:.1}%; process \
         clock {cpu} ms, ran {ran} ms), the quota allows {:.0}% (with tolerance {:.0}%)",
        share * 100.0,
        QUOTA as f64 / PERIOD as f64 * 100.0,
        limit * 100.0
    );
    ctx.destroy(&id).await?;
    Ok(())
}
