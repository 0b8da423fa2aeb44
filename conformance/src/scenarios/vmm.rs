//! A VM backend's boundary is its VMM process on the host. Found by looking (every process whose
//! command line or environment names the cell id), never by asking the backend, and checked from
//! `/proc`: no capability in any set, no_new_privs, a seccomp filter, mount/net/ipc/uts
//! namespaces other than the harness's, and a cgroup other than the harness's whose memory and
//! pids limits are set: memory at least the guest's RAM (QEMU's `-m`, else the declared
//! `memoryMaxBytes`) and at most [`VMM_OVERHEAD_BOUND`] above it, pids finite.

use std::path::{Path, PathBuf};

use cellcheck_contract::Limits;

use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "hardening";

/// What a VMM may take on top of its guest's RAM before its memory limit stops matching the cell.
pub const VMM_OVERHEAD_BOUND: u64 = 1 << 30;

/// The memory the scenario declares.
const DECLARED_MEMORY: u64 = 96 << 20;

pub fn scenarios() -> Vec<Scenario> {
    vec![scenario!(F, "vmm_confined", [VmmConfinement], vmm_confined)]
}

/// Pids of the processes whose cmdline or environ contains `needle`, but this one.
pub fn processes_naming(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let n = needle.as_bytes();
    let mut v: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|f| {
                std::fs::read(format!("/proc/{pid}/{f}"))
                    .is_ok_and(|b| b.windows(n.len()).any(|w| w == n))
            })
        })
        .collect();
    v.sort_unstable();
    v
}

/// One `Key:\tvalue` of `/proc/<pid>/status`.
fn status_field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// What is wrong with a VMM process's own confinement (`status` is its `/proc/<pid>/status`,
/// `harness_status` this process's), as named findings.
pub fn judge_status(status: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for key in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        match status_field(status, key) {
            Some(v) if u64::from_str_radix(&v, 16) == Ok(0) => {}
            v => bad.push(format!("{key} is {v:?}, want 0")),
        }
    }
    for (key, want) in [("NoNewPrivs", "1"), ("Seccomp", "2")] {
        let v = status_field(status, key);
        if v.as_deref() != Some(want) {
            bad.push(format!("{key} is {v:?}, want {want}"));
        }
    }
    bad
}

/// `(controllers, path)` of each line of a `/proc/<pid>/cgroup`.
fn cgroup_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            f.next()?;
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// The VMM's memory and pids limit files, found from its `/proc/<pid>/cgroup`: cgroup v2 when
/// the unified hierarchy has controllers, else the v1 `memory` and `pids` hierarchies.
fn limit_files(cgroup: &str) -> Option<(PathBuf, PathBuf)> {
    let root = Path::new("/sys/fs/cgroup");
    let lines = cgroup_lines(cgroup);
    let path_of = |ctl: &str| {
        lines
            .iter()
            .find(|(c, _)| c.split(',').any(|x| x == ctl))
            .map(|(_, p)| p.trim_start_matches('/').to_string())
    };
    if root.join("cgroup.controllers").exists() {
        let p = lines.iter().find(|(c, _)| c.is_empty())?.1.clone();
        let d = root.join(p.trim_start_matches('/'));
        Some((d.join("memory.max"), d.join("pids.max")))
    } else {
        Some((
            root.join("memory")
                .join(path_of("memory")?)
                .join("memory.limit_in_bytes"),
            root.join("pids").join(path_of("pids")?).join("pids.max"),
        ))
    }
}

/// QEMU's `-m N` (MiB) in bytes, from a NUL-separated cmdline.
fn guest_ram(cmdline: &[u8]) -> Option<u64> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let i = args.iter().position(|a| *a == b"-m")?;
    let v = std::str::from_utf8(args.get(i + 1)?).ok()?;
    // `-m 256` or `-m size=256M`.
    let v = v.trim_start_matches("size=").trim_end_matches(['M', 'm']);
    v.parse::<u64>().ok().map(|m| m << 20)
}

async fn vmm_confined(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("create a holding cell with memory and pids limits");
    let doc = ctx.doc(&["hold"]).with_limits(Limits {
        memory_max_bytes: Some(DECLARED_MEMORY),
        pids_max: Some(32),
        ..Limits::default()
    });
    let id = doc.spec.id.clone();
    let h = ctx.create_running(&doc).await?;
    ctx.step("find the cell's VMM by its id in /proc");
    let pids = processes_naming(&id);
    check!(
        ctx,
        !pids.is_empty(),
        "no process on the host names the cell id {id} in its command line or environment"
    );
    let mut bad = Vec::new();
    for pid in &pids {
        let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).unwrap_or_default();
        let status = String::from_utf8_lossy(&read("status")).into_owned();
        let name = status_field(&status, "Name").unwrap_or_default();
        let who = format!("pid {pid} ({name})");
        bad.extend(
            judge_status(&status)
                .into_iter()
                .map(|b| format!("{who}: {b}")),
        );
        for ns in ["mnt", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
            if theirs.is_none() || theirs == ours {
                bad.push(format!(
                    "{who}: {ns} namespace is the harness's ({theirs:?})"
                ));
            }
        }
        let cgroup = String::from_utf8_lossy(&read("cgroup")).into_owned();
        let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let Some((mem_file, pids_file)) = limit_files(&cgroup) else {
            bad.push(format!("{who}: no memory or pids cgroup in {cgroup:?}"));
            continue;
        };
        if limit_files(&mine) == Some((mem_file.clone(), pids_file.clone())) {
            bad.push(format!("{who}: runs in the harness's cgroup {cgroup:?}"));
        }
        let limit = |p: &Path| std::fs::read_to_string(p).map(|s| s.trim().to_string());
        let ram = guest_ram(&read("cmdline")).unwrap_or(DECLARED_MEMORY);
        match limit(&mem_file).map(|s| s.parse::<u64>()) {
            Ok(Ok(m)) if m >= ram && m <= ram + VMM_OVERHEAD_BOUND => {}
            other => bad.push(format!(
                "{who}: memory limit {} is {other:?}, want between the guest's {ram} bytes and \
                 {} more",
                mem_file.display(),
                VMM_OVERHEAD_BOUND
            )),
        }
        match limit(&pids_file).map(|s| s.parse::<u64>()) {
            Ok(Ok(_)) => {}
            other => bad.push(format!(
                "{who}: pids limit {} is {other:?}, want a number",
                pids_file.display()
            )),
        }
    }
    check!(
        ctx,
        bad.is_empty(),
        "the cell's VMM is not confined:\n  {}",
        bad.join("\n  ")
    );
    ctx.destroy(&h.id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unconfined_process_is_named_for_each_lack() {
        // This test process: whatever it holds, a confined VMM holds less. Judge a made-up one.
        let status = "Name:\tqemu\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n\
                      CapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\n";
        let bad = judge_status(status);
        assert_eq!(bad.len(), 5, "{bad:?}");
        assert!(bad.iter().any(|b| b.starts_with("CapEff")));
        assert!(bad.iter().any(|b| b.starts_with("Seccomp")));
        let ok = "CapInh:\t0\nCapPrm:\t0\nCapEff:\t0\nCapBnd:\t0\nCapAmb:\t0\nNoNewPrivs:\t1\n\
                  Seccomp:\t2\n";
        assert!(judge_status(ok).is_empty());
    }

    #[test]
    fn guest_ram_from_the_command_line() {
        assert_eq!(
            guest_ram(b"qemu\x00-m\x00256\x00-kernel\x00k\x00"),
            Some(256 << 20)
        );
        assert_eq!(guest_ram(b"qemu\0-kernel\0k\0"), None);
    }
}
