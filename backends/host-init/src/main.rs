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

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Failure> {
    let src_c = src.map(cstr);
    let fs_c = fstype.map(cstr);
    let data_c = data.map(cstr);
    let t = cstr(target.as_os_str());
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            t.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(fail(
            "setup",
            format!(
                "mount {} on {} ({})",
                src.unwrap_or("-"),
                target.display(),
                fstype.unwrap_or("bind/remount")
            ),
        ));
    }
    Ok(())
}

fn bind(src: &Path, target: &Path, readonly: bool) -> Result<(), Failure> {
    let s = src.to_string_lossy();
    mount(Some(&s), target, None, libc::MS_BIND | libc::MS_REC, None)?;
    if readonly {
        mount(
            None,
            target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// Make `target` exist as the same kind of node as `source` (directory or file). Works where the
/// parent is writable (our tmpfs mounts); elsewhere the error names the path.
fn ensure_mount_point(source: &Path, target: &Path) -> Result<(), Failure> {
    if target.exists() {
        return Ok(());
    }
    let is_dir = std::fs::metadata(source)
        .map(|m| m.is_dir())
        .unwrap_or(true);
    let res = if is_dir {
        std::fs::create_dir_all(target)
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::File::create(target).map(drop))
    };
    res.map_err(|e| {
        (
            "setup",
            e.raw_os_error().unwrap_or(0),
            format!(
                "bind target {} does not exist in the cell's root and cannot be created: {e}",
                target.display()
            ),
        )
    })
}

/// `/proc` entries that leak host facts or drive the kernel: files read as /dev/null,
/// directories as an empty read-only tmpfs.
const MASKED: &[&str] = &[
    "kcore",
    "keys",
    "kmsg",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "acpi",
    "asound",
    "scsi",
];

/// `/proc` trees that stay visible but read-only: kernel tunables and the sysrq trigger.
const READONLY: &[&str] = &["sys", "bus", "fs", "irq", "sysrq-trigger"];

fn mask_proc(proc: &Path, nodev: libc::c_ulong) -> Result<(), Failure> {
    for name in MASKED {
        let p = proc.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => mount(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                nodev | libc::MS_RDONLY,
                None,
            )?,
            Ok(_) => bind(Path::new("/dev/null"), &p, true)?,
            Err(_) => {}
        }
    }
    for name in READONLY {
        let p = proc.join(name);
        if p.exists() {
            mount(
                Some(&p.to_string_lossy()),
                &p,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            // A bind remount keeps proc's nosuid/nodev/noexec only if they are asked for again.
            mount(
                None,
                &p,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nodev,
                None,
            )?;
        }
    }
    Ok(())
}

fn build_root(cfg: &Config) -> Result<(), Failure> {
    let root = Path::new(&cfg.newroot);
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    bind(Path::new(&cfg.rootfs), root, true)?;
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("proc"), &root.join("proc"), Some("proc"), nodev, None)?;
    mask_proc(&root.join("proc"), nodev)?;
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(name);
        let inner = dev.join(name);
        std::fs::File::create(&inner).map_err(|e| {
            (
                "setup",
                e.raw_os_error().unwrap_or(0),
                format!("create {}: {e}", inner.display()),
            )
        })?;
        bind(&host, &inner, false)?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, dev.join(link));
    }
    let _ = std::fs::create_dir(dev.join("shm"));
    mount(
        Some("tmpfs"),
        &root.join("tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount(
        Some("tmpfs"),
        &root.join("run"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755"),
    )?;
    // Read-only sysfs: in the cell's own netns it shows only `lo`; it also gives nested cells a
    // `/sys/fs/cgroup` mount point to bind the host's cgroups onto.
    mount(
        Some("sysfs"),
        &root.join("sys"),
        Some("sysfs"),
        nodev | libc::MS_RDONLY,
        None,
    )?;
    for b in &cfg.binds {
        let target = root.join(b.target.trim_start_matches('/'));
        ensure_mount_point(Path::new(&b.source), &target)?;
        bind(Path::new(&b.source), &target, b.readonly)?;
    }
    let root_c = cstr(root.as_os_str());
    let dot = cstr(".");
    // SAFETY: plain syscalls on valid paths. pivot_root(".", ".") stacks the old root on top of
    // the new one, so detaching "." afterwards drops the host's tree from this namespace.
    unsafe {
        if libc::chdir(root_c.as_ptr()) != 0 {
            return Err(fail("setup", "chdir new root"));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(fail("setup", "pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(fail("setup", "detach old root"));
        }
        let slash = cstr("/");
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(fail("setup", "chdir /"));
        }
    }
    Ok(())
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

fn end_status(st: i32) -> Status {
    if libc::WIFSIGNALED(st) {
        Status::Signaled(libc::WTERMSIG(st))
    } else {
        Status::Exited(libc::WEXITSTATUS(st))
    }
}

/// Close every fd >= `from`, or where that is refused, mark them close-on-exec.
fn close_from(from: i32) {
    // SAFETY: close_range on fds this process owns.
    if unsafe { libc::syscall(libc::SYS_close_range, from as u32, u32::MAX, 0) } == 0 {
        return;
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if !fds.is_empty() {
        for fd in fds.into_iter().filter(|fd| *fd >= from) {
            // SAFETY: closing an fd number; the directory's own fd is already closed.
            unsafe { libc::close(fd) };
        }
        return;
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reading our own limit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let max = rl.rlim_cur.min(1 << 20) as i32;
    for fd in from..max {
        // SAFETY: closing fds of our own process.
        unsafe { libc::close(fd) };
    }
}

/// Candidate paths for argv[0]: itself when it has a slash, else each dir of the declared PATH
/// (or a standard one; the workload's env never gets a PATH it did not declare).
fn candidates(cfg: &Config) -> Vec<CString> {
    let a0 = &cfg.argv[0];
    if a0.contains('/') {
        return vec![cstr(a0)];
    }
    let path = cfg
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| cstr(format!("{d}/{a0}")))
        .collect()
}

/// Fork the workload (or exec'd command). Returns its pid once it has exec'd; a failure to chdir
/// or exec comes back through a close-on-exec pipe as the failed step.
fn spawn_workload(
    cfg: &Config,
    reset_oom: bool,
    gate: &dyn Fn(libc::pid_t) -> Result<(), Failure>,
) -> Result<libc::pid_t, Failure> {
    let argv: Vec<CString> = cfg.argv.iter().map(cstr).collect();
    let envp: Vec<CString> = cfg.env.iter().map(cstr).collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let cands = candidates(cfg);
    let cwd = cstr(if cfg.cwd.is_empty() { "/" } else { &cfg.cwd });
    let filters = if cfg.privileged {
        Vec::new()
    } else {
        harden::filters().map_err(|m| ("setup", libc::EINVAL, m))?
    };
    let nofile = cfg.nofile.map(|(soft, hard)| libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });
    let mut p = [0i32; 2];
    // SAFETY: creating a pipe into a local array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fail("setup", "exec error pipe"));
    }
    let (rd, wr) = (p[0], p[1]);
    let mut g = [0i32; 2];
    // SAFETY: creating a pipe into a local array.
    if unsafe { libc::pipe2(g.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fail("setup", "gate pipe"));
    }
    let (gate_rd, gate_wr) = (g[0], g[1]);
    // SAFETY: single-threaded; the child uses only syscalls and the buffers prepared above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail("setup", "fork workload"));
    }
    if pid == 0 {
        // SAFETY: child side; only async-signal-safe calls until execve or _exit.
        unsafe {
            let tell = |tag: u8, e: i32| {
                let mut buf = [tag, 0, 0, 0, 0];
                buf[1..].copy_from_slice(&e.to_ne_bytes());
                libc::write(wr, buf.as_ptr().cast(), 5);
                libc::_exit(127);
            };
            // Our copy of the gate's write end would keep the read below from ever seeing EOF.
            libc::close(gate_wr);
            let mut b = [0u8; 1];
            while libc::read(gate_rd, b.as_mut_ptr().cast(), 1) < 0 && errno() == libc::EINTR {}
            if b[0] != b'g' {
                libc::_exit(127);
            }
            let empty = signal_set(&[]);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if reset_oom {
                let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                tell(b'C', errno());
            }
            // Everything above stdio closes on exec (the error pipe included, which is how the
            // parent learns the exec worked).
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
                let max = rl.rlim_cur.min(1 << 20) as i32;
                for fd in 3..max {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            if let Some(rl) = &nofile {
                if libc::setrlimit(libc::RLIMIT_NOFILE, rl) != 0 {
                    tell(b'R', errno());
                }
            }
            if !cfg.privileged {
                if let Err(e) = harden::drop_privileges(&filters) {
                    tell(b'H', e);
                }
            }
            let mut last = libc::ENOENT;
            for c in &cands {
                libc::execve(c.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
                let e = errno();
                // Like execvp: keep looking past missing entries, remember a permission error.
                if e != libc::ENOENT && e != libc::ENOTDIR {
                    last = e;
                    if e != libc::EACCES {
                        break;
                    }
                }
            }
            tell(b'X', last);
        }
    }
    // SAFETY: closing the parent's copies of the child's ends.
    unsafe {
        libc::close(wr);
        libc::close(gate_rd);
    }
    let gated = gate(pid);
    if gated.is_ok() {
        // SAFETY: one byte from a local buffer.
        unsafe { libc::write(gate_wr, b"g".as_ptr().cast(), 1) };
    }
    // SAFETY: closing our end; without the byte the child exits without running anything.
    unsafe { libc::close(gate_wr) };
    if let Err(f) = gated {
        let mut st = 0;
        // SAFETY: reaping the child we just released to its exit.
        unsafe {
            libc::close(rd);
            libc::waitpid(pid, &mut st, 0);
        }
        return Err(f);
    }
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        // SAFETY: reading into the local buffer.
        let n = unsafe { libc::read(rd, buf[got..].as_mut_ptr().cast(), 5 - got) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    // SAFETY: closing the read end we own.
    unsafe { libc::close(rd) };
    if got == 0 {
        return Ok(pid);
    }
    let mut st = 0;
    // SAFETY: reaping the failed child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    let e = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let msg = std::io::Error::from_raw_os_error(e);
    Err(match buf[0] {
        b'C' => ("cwd", e, format!("chdir {}: {msg}", cfg.cwd)),
        b'R' => (
            "setup",
            e,
            format!("setrlimit RLIMIT_NOFILE {:?}: {msg}", cfg.nofile),
        ),
        b'H' => (
            "setup",
            e,
            format!("dropping privileges before exec: {msg}"),
        ),
        _ => ("program", e, format!("exec {}: {msg}", cfg.argv[0])),
    })
}

fn exec_main(state_dir: &str, name: &str) -> i32 {
    if !wait_go() {
        return 1;
    }
    match exec_inner(state_dir, name) {
        Ok(code) => code,
        Err(f) => {
            report_failure(f);
            1
        }
    }
}

fn exec_inner(state_dir: &str, name: &str) -> Result<i32, Failure> {
    let cfg = read_config(state_dir, name)?;
    // Open every namespace first: after joining the mount namespace, /proc is the cell's.
    let mut fds = Vec::new();
    // The cgroup namespace before the mount namespace, like the rest: its path is the host's.
    for ns in ["ipc", "uts", "net", "pid", "cgroup", "mnt"] {
        let p = cstr(format!("/proc/{}/ns/{ns}", cfg.target_pid));
        // SAFETY: opening a valid path.
        let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(fail("gone", format!("open {ns} namespace of the cell")));
        }
        fds.push((ns, fd));
    }
    for (ns, fd) in fds {
        // SAFETY: joining a namespace through an fd we opened; single-threaded.
        if unsafe { libc::setns(fd, 0) } != 0 {
            return Err(fail("setup", format!("join {ns} namespace")));
        }
        // SAFETY: closing the namespace fd.
        unsafe { libc::close(fd) };
    }
    let child = spawn_workload(&cfg, false, &|_| Ok(()))?;
    report(&Status::Started(child as u32));
    let mut st = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(child, &mut st, 0) } < 0 {
        if errno() != libc::EINTR {
            return Err(fail("setup", "wait for the command"));
        }
    }
    report(&end_status(st));
    Ok(0)
}
