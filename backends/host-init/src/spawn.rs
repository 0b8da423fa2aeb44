//! Starting workloads: exact fds, env and hardening at exec, and the one-shot `exec` mode.

use super::*;

pub(super) fn end_status(st: i32) -> Status {
    if libc::WIFSIGNALED(st) {
        Status::Signaled(libc::WTERMSIG(st))
    } else {
        Status::Exited(libc::WEXITSTATUS(st))
    }
}

/// Close every fd >= `from`, or where that is refused, mark them close-on-exec.
pub(super) fn close_from(from: i32) {
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
pub(super) fn candidates(cfg: &Config) -> Vec<CString> {
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
pub(super) fn spawn_workload(
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

pub(super) fn exec_main(state_dir: &str, name: &str) -> i32 {
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

pub(super) fn exec_inner(state_dir: &str, name: &str) -> Result<i32, Failure> {
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
