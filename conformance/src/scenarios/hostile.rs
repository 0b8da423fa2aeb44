//! A hostile script (busybox sh, `hostile.sh`) tries to escape the cell the ways a real workload
//! would: mounts, a node for the host's disk, new namespaces, kernel tunables, the kernel's memory
//! and log, the root, `/sys`, the host cgroup's release_agent, the hostname, chroot and a host
//! process. Each attempt names the capability that promises it fails; an attempt is judged on a
//! backend that declares that capability (the others are listed as not judged, with the reason),
//! and the two attempts no isolation may let through (the host's disk, a host process) are judged
//! on every backend. Killing the host process is also checked from outside: it must still live.

use std::process::{Child, Command, Stdio};

use cellcheck_contract::{Capability, EnvVar, Support, Termination};

use crate::harness::{Ctx, Failure, Scenario};
use crate::{check, scenario};

const F: &str = "hardening";

const SCRIPT: &str = include_str!("hostile.sh");

pub fn scenarios() -> Vec<Scenario> {
    vec![scenario!(
        F,
        "hostile_script",
        [PidIsolation],
        hostile_script
    )]
}

/// Every attempt the script makes, with the capability whose promise it tests (`None`: judged on
/// every backend, since no kind of isolation may let it through).
pub const ATTEMPTS: &[(&str, Option<Capability>)] = &[
    ("mount_tmpfs", Some(Capability::DropCapabilities)),
    ("mount_proc", Some(Capability::DropCapabilities)),
    ("mount_cgroup", Some(Capability::DropCapabilities)),
    ("mknod_block", Some(Capability::MinimalDev)),
    ("read_host_disk", None),
    ("unshare_user", Some(Capability::Seccomp)),
    ("unshare_mount", Some(Capability::Seccomp)),
    ("write_proc_sys", Some(Capability::ProcMasking)),
    ("read_kcore", Some(Capability::ProcMasking)),
    ("open_kmsg", Some(Capability::ProcMasking)),
    ("dmesg", Some(Capability::Seccomp)),
    ("write_root", Some(Capability::ReadonlyRoot)),
    ("write_sys", Some(Capability::ProcMasking)),
    ("release_agent", Some(Capability::CgroupIsolation)),
    ("sethostname", Some(Capability::DropCapabilities)),
    ("chroot", Some(Capability::DropCapabilities)),
    ("kill_host_process", Some(Capability::PidIsolation)),
];

/// One line of the script: `hostile <name> refused|succeeded <detail>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub name: String,
    pub succeeded: bool,
    pub detail: String,
}

/// The script's attempt lines, and whether it reached its end (`hostile done`). Other lines
/// (a shell's complaint) are ignored; a malformed `hostile` line is an error naming it.
pub fn parse(out: &str) -> Result<(Vec<Attempt>, bool), String> {
    let mut v = Vec::new();
    let mut done = false;
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("hostile ") else {
            continue;
        };
        if rest == "done" {
            done = true;
            continue;
        }
        let mut f = rest.splitn(3, ' ');
        let (name, verdict) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let succeeded = match verdict {
            "succeeded" => true,
            "refused" => false,
            _ => return Err(format!("malformed line {line:?}")),
        };
        v.push(Attempt {
            name: name.to_string(),
            succeeded,
            detail: f.next().unwrap_or("").trim().to_string(),
        });
    }
    Ok((v, done))
}

/// MAJOR:MINOR of a block device of this host: the first disk in `/proc/partitions` that is not
/// a loop, ram, zram, optical or network device, else the device of `/`.
pub fn host_disk() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/partitions").unwrap_or_default();
    let skip = ["loop", "ram", "zram", "sr", "nbd", "md", "dm-"];
    let from_table = text.lines().skip(2).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let name = *f.get(3)?;
        if skip.iter().any(|s| name.starts_with(s)) {
            return None;
        }
        Some((f[0].parse().ok()?, f[1].parse().ok()?))
    });
    from_table.or_else(|| {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata("/").ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        (major != 0).then_some((major, minor))
    })
}

/// A host process the script tries to kill; killed and reaped when dropped, so no child of the
/// harness outlives the trial.
struct Victim(Child);

impl Victim {
    fn start() -> std::io::Result<Victim> {
        Command::new("sleep")
            .arg("600")
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Victim)
    }

    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn hostile_script(ctx: Ctx) -> Result<(), Failure> {
    ctx.step("find a block device of the host");
    let Some((major, minor)) = host_disk() else {
        return Err(
            ctx.fail("no block device found on this host (/proc/partitions, the device of /)")
        );
    };
    let mut victim =
        Victim::start().map_err(|e| ctx.fail(format!("start the victim process: {e}")))?;
    let mut doc = ctx.doc(&[]);
    doc.spec.run.argv = ["/bin/sh", "-c", SCRIPT]
        .into_iter()
        .map(String::from)
        .collect();
    doc.spec.run.env.extend([
        EnvVar {
            name: "HOSTILE_DISK".into(),
            value: format!("{major}:{minor}"),
        },
        EnvVar {
            name: "HOSTILE_VICTIM".into(),
            value: victim.0.id().to_string(),
        },
    ]);
    ctx.step("run the hostile script");
    let (id, r) = ctx.run_doc(&doc).await?;
    let out = r.stdout_str();
    let (attempts, done) = parse(&out).map_err(|e| ctx.fail(e))?;
    check!(
        ctx,
        done && r.termination == Termination::Exited { code: 0 },
        "the script did not run to its end ({:?}); stdout:\n{}\nstderr:\n{}",
        r.termination,
        out.trim(),
        r.stderr_str().trim()
    );
    let caps = ctx.caps();
    let mut escaped = Vec::new();
    let mut unjudged = Vec::new();
    let mut missing = Vec::new();
    for (name, cap) in ATTEMPTS {
        let Some(a) = attempts.iter().find(|a| a.name == *name) else {
            missing.push(*name);
            continue;
        };
        match cap.map(|c| (c, caps.support(c))) {
            Some((c, Support::Unsupported { reason })) => {
                unjudged.push(format!("{name} ({c} unsupported: {reason})"))
            }
            _ if a.succeeded => escaped.push(format!("{name}: succeeded ({})", a.detail)),
            _ => {}
        }
    }
    check!(
        ctx,
        missing.is_empty(),
        "the script never reported {missing:?}; stdout:\n{}",
        out.trim()
    );
    let outside = victim.alive();
    if !outside && !escaped.iter().any(|e| e.starts_with("kill_host_process")) {
        escaped.push("kill_host_process: the host victim died".into());
    }
    let note = if unjudged.is_empty() {
        String::new()
    } else {
        format!("\nnot judged here:\n  {}", unjudged.join("\n  "))
    };
    check!(
        ctx,
        escaped.is_empty(),
        "escape attempts were not refused:\n  {}{note}",
        escaped.join("\n  ")
    );
    ctx.destroy(&id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_attempts_and_the_end() {
        let out = "noise\nhostile mount_tmpfs refused mount: permission denied\n\
                   hostile write_root succeeded created /.hostile-7\nhostile done\n";
        let (v, done) = parse(out).unwrap();
        assert!(done);
        assert_eq!(v.len(), 2);
        assert!(!v[0].succeeded && v[0].detail == "mount: permission denied");
        assert!(v[1].succeeded && v[1].name == "write_root");
        assert!(parse("hostile x maybe\n").is_err());
        assert!(!parse("hostile x refused\n").unwrap().1);
    }

    #[test]
    fn the_script_makes_every_attempt_listed() {
        for (name, _) in ATTEMPTS {
            assert!(
                SCRIPT.contains(&format!("try {name} ")),
                "{name} is not tried by hostile.sh"
            );
        }
        let tried = SCRIPT.lines().filter(|l| l.starts_with("try ")).count();
        assert_eq!(
            tried,
            ATTEMPTS.len(),
            "hostile.sh tries what ATTEMPTS does not list"
        );
    }
}
