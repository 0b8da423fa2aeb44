//! The in-cell init the host backend starts: sets up the cell's namespaces and root, runs the
//! workload, reports its end.
//!
//! Modes (the only arguments; everything else comes from a config file that is removed once read):
//!
//! - `cellcheck-host-init cell <state-dir>`: started by the backend already inside fresh mount,
//!   UTS, IPC and network namespaces, with a pending pid namespace. It waits for the go byte on
//!   fd 3, forks pid 1 of the cell, reports pid 1's host pid and waits for it. Pid 1 assembles the
//!   root (read-only rootfs, proc, a minimal /dev, tmpfs /tmp and /run, read-only sysfs, extra
//!   binds), pivots into it, sets the hostname, brings `lo` up, and forks the workload with exactly
//!   the declared env and fds 0, 1, 2. Unless the cell is privileged (a nested cell's outer
//!   layer), pid 1 first enters a cgroup namespace rooted at the cell's cgroups; `/proc` always gets
//!   masked and read-only paths, and the workload execs with RLIMIT_NOFILE as declared, no
//!   capability in any set, no_new_privs and a seccomp filter (see `harden`). It forwards
//!   SIGTERM/SIGINT/SIGHUP to the workload, reaps orphans, reports how the workload ended and
//!   exits, which kills whatever is left in the cell.
//! - `cellcheck-host-init exec <state-dir> <name>`: joins the namespaces of a live cell and runs
//!   one command there (cgroup namespace included) with the same hygiene and hardening, reporting
//!   its start and end.
//!
//! The workload is never pid 1: pid 1 ignores signals it has no handler for, so a workload that
//! kills itself with SIGTERM would survive.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cellcheck_host_init::{Config, Status, STATUS_FD, SYNC_FD};

mod harden;
mod rootfs;
mod spawn;

use rootfs::*;
use spawn::*;

fn main() {
    // Whatever the starter leaked (beyond stdio and our two pipes) must not reach the cell.
    close_from(STATUS_FD + 1);
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("cell") if args.len() == 3 => cell_main(&args[2]),
        Some("exec") if args.len() == 4 => exec_main(&args[2], &args[3]),
        _ => {
            report(&Status::Failed {
                step: "setup".into(),
                errno: libc::EINVAL,
                message: "usage: cellcheck-host-init cell <state-dir> | exec <state-dir> <name>"
                    .into(),
            });
            2
        }
    };
    std::process::exit(code);
}

/// A failed step: (step, errno, message).
type Failure = (&'static str, i32, String);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(step: &'static str, what: impl std::fmt::Display) -> Failure {
    let e = std::io::Error::last_os_error();
    (step, e.raw_os_error().unwrap_or(0), format!("{what}: {e}"))
}

fn report(s: &Status) {
    let line = s.encode();
    // SAFETY: a write of our own buffer to the status fd; a short or failed write only loses a report.
    unsafe {
        libc::write(STATUS_FD, line.as_ptr().cast(), line.len());
    }
}

fn report_failure((step, errno, message): Failure) {
    report(&Status::Failed {
        step: step.into(),
        errno,
        message,
    });
}

/// Read one byte from the backend on [`SYNC_FD`]; false if it went away instead.
fn read_sync() -> bool {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reading one byte into a local buffer.
        let n = unsafe { libc::read(SYNC_FD, b.as_mut_ptr().cast(), 1) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return n == 1;
    }
}

fn wait_go() -> bool {
    let ok = read_sync();
    // SAFETY: closing an fd we own and no longer use.
    unsafe { libc::close(SYNC_FD) };
    ok
}

fn read_config(state_dir: &str, name: &str) -> Result<Config, Failure> {
    let path = Path::new(state_dir).join(name);
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| {
            (
                "setup",
                e.raw_os_error().unwrap_or(0),
                format!("read {}: {e}", path.display()),
            )
        })?;
    // The file holds declared env values: it lives only as long as it takes to read it.
    let _ = std::fs::remove_file(&path);
    Config::decode(&bytes).map_err(|e| ("setup", libc::EINVAL, e.to_string()))
}

fn cstr(s: impl AsRef<OsStr>) -> CString {
    // Admission and the config format exclude NUL; an embedded NUL would be a bug upstream.
    CString::new(s.as_ref().as_bytes()).unwrap_or_default()
}

fn cell_main(state_dir: &str) -> i32 {
    // Pid 1 keeps the sync fd: the backend acks the workload's fork on it.
    if !read_sync() {
        return 1;
    }
    let cfg = match read_config(state_dir, "config") {
        Ok(c) => c,
        Err(f) => {
            report_failure(f);
            return 1;
        }
    };
    // SAFETY: single-threaded process; the child only runs our own code below.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        report_failure(fail("setup", "fork pid 1"));
        return 1;
    }
    if pid == 0 {
        let code = match pid1(&cfg) {
            Ok(c) => c,
            Err(f) => {
                report_failure(f);
                1
            }
        };
        // SAFETY: leaving the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(code) };
    }
    report(&Status::Pid1(pid as u32));
    // Only pid 1 may hold the pipes, so the status pipe's end is the end of the cell.
    // SAFETY: closing our copies of the pipes.
    unsafe {
        libc::close(STATUS_FD);
        libc::close(SYNC_FD);
    }
    let mut st = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0 && errno() == libc::EINTR {}
    0
}

fn loopback_up() -> Result<(), Failure> {
    // SAFETY: an ioctl on our own socket with a zeroed, correctly sized ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(fail("setup", "socket for lo"));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) == 0
        };
        let err = if ok {
            None
        } else {
            Some(fail("setup", "bring lo up"))
        };
        libc::close(s);
        err.map_or(Ok(()), Err)
    }
}

fn write_file(path: &str, text: &str) {
    let _ = std::fs::write(path, text);
}

fn signal_set(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: initialising a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

const FORWARDED: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn pid1(cfg: &Config) -> Result<i32, Failure> {
    // SAFETY: if the outer init is killed, the cell must die with it.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // The backend has moved us into the cell's cgroups: from here on they are the cell's `/`.
    // SAFETY: a plain syscall on this single-threaded process.
    if !cfg.privileged && unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        return Err(fail("setup", "cgroup namespace"));
    }
    build_root(cfg)?;
    let host = cstr(&cfg.hostname);
    // SAFETY: valid buffer and length.
    if unsafe { libc::sethostname(host.as_ptr(), cfg.hostname.len()) } != 0 {
        return Err(fail("setup", "sethostname"));
    }
    loopback_up()?;
    // The OOM killer must pick the workload, never the init that reports its end.
    write_file("/proc/self/oom_score_adj", "-1000");
    let set = signal_set(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    // SAFETY: blocking signals in our single thread, so sigwaitinfo below sees them.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let child = spawn_workload(cfg, true, &|pid| {
        // Hold the workload until the backend has found its host pid: it may exit at once.
        report(&Status::Forked(pid as u32));
        if read_sync() {
            Ok(())
        } else {
            Err(("setup", libc::EPIPE, "the backend went away".into()))
        }
    })?;
    // SAFETY: the sync fd is done with.
    unsafe { libc::close(SYNC_FD) };
    report(&Status::Started(child as u32));
    loop {
        // SAFETY: waiting on the blocked set; info is a local.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig < 0 {
            continue;
        }
        if FORWARDED.contains(&sig) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        // SIGCHLD: reap everything that ended; orphans are ours too.
        loop {
            let mut st = 0;
            // SAFETY: reaping our children.
            let p = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
            if p <= 0 {
                break;
            }
            if p == child {
                report(&end_status(st));
                return Ok(0);
            }
        }
    }
}
