//! Starting jobs in the guest: the cell cgroup, argv resolution, pipes, namespace joins and the
//! fork/exec.

use super::*;

pub(super) fn make_cell_cgroup(memory_max: Option<u64>, pids_max: Option<u64>) -> io::Result<()> {
    fs::write(
        Path::new(CGROUP_ROOT).join("cgroup.subtree_control"),
        "+memory +pids",
    )?;
    fs::create_dir_all(CELL_CGROUP)?;
    if let Some(m) = memory_max {
        fs::write(Path::new(CELL_CGROUP).join("memory.max"), m.to_string())?;
    }
    if let Some(p) = pids_max {
        fs::write(Path::new(CELL_CGROUP).join("pids.max"), p.to_string())?;
    }
    Ok(())
}

pub(super) fn oom_kills() -> Option<u64> {
    let text = fs::read_to_string(Path::new(CELL_CGROUP).join("memory.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Find `argv0` the way execvp would, in the declared `PATH` (or a default one).
pub(super) fn resolve(argv0: &str, env: &[EnvPair]) -> Option<CString> {
    let executable = |p: &Path| {
        let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: access(2) on a valid C string.
        p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
    };
    if argv0.contains('/') {
        return executable(Path::new(argv0)).then(|| CString::new(argv0).ok())?;
    }
    let path = env
        .iter()
        .find(|e| e.name == "PATH")
        .map(|e| e.value.as_str())
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(argv0))
        .find(|p| executable(p))
        .and_then(|p| CString::new(p.into_os_string().into_encoded_bytes()).ok())
}

pub(super) fn cstrings<'a>(
    items: impl Iterator<Item = &'a str>,
) -> Result<Vec<CString>, ReplyBody> {
    items
        .map(|s| CString::new(s).map_err(|_| err(ErrorKind::BadFrame, "NUL in argv or env")))
        .collect()
}

pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Namespaces an exec joins (fds held by the agent).
pub(super) struct Join {
    pub(super) pidns: RawFd,
    pub(super) mntns: RawFd,
    pub(super) own_pidns: RawFd,
}

pub(super) enum SpawnError {
    Reply(ReplyBody),
    /// The workload's pid namespace cannot take new processes (its pid 1 has exited).
    NamespaceGone,
}

impl From<ReplyBody> for SpawnError {
    fn from(b: ReplyBody) -> Self {
        SpawnError::Reply(b)
    }
}

/// fork + execve with exactly `env` (declared order), stdin `/dev/null`, stdout/stderr pipes,
/// fds beyond 2 closed on exec, its own session, in the cell cgroup. Exec failures come back
/// through a close-on-exec pipe, so a missing program is an error here, not a exit code 127.
pub(super) fn spawn(
    argv: &[String],
    env: &[EnvPair],
    cwd: &str,
    cgroup: Option<&str>,
    join: Option<Join>,
) -> Result<Spawned, SpawnError> {
    if argv.is_empty() {
        return Err(err(ErrorKind::BadFrame, "argv must not be empty").into());
    }
    let Some(prog) = resolve(&argv[0], env) else {
        return Err(err(
            ErrorKind::ProgramNotFound,
            format!("{}: not found or not executable", argv[0]),
        )
        .into());
    };
    let c_argv = cstrings(argv.iter().map(String::as_str))?;
    let pairs: Vec<String> = env
        .iter()
        .map(|e| format!("{}={}", e.name, e.value))
        .collect();
    let c_env = cstrings(pairs.iter().map(String::as_str))?;
    let c_cwd = CString::new(cwd).map_err(|_| err(ErrorKind::BadFrame, "NUL in cwd"))?;
    let c_procs = cgroup
        .map(|c| CString::new(format!("{c}/cgroup.procs")))
        .transpose()
        .map_err(|_| err(ErrorKind::Io, "cgroup path"))?;
    let mut argv_p: Vec<*const libc::c_char> = c_argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());

    let io_err = |what: &str, e: io::Error| err(ErrorKind::Io, format!("{what}: {e}"));
    let (out_r, out_w) = pipe().map_err(|e| io_err("pipe", e))?;
    let (err_r, err_w) = pipe().map_err(|e| io_err("pipe", e))?;
    let (status_r, status_w) = pipe().map_err(|e| io_err("pipe", e))?;
    let (relay_r, relay_w) = pipe().map_err(|e| io_err("pipe", e))?;
    let devnull = fs::File::open("/dev/null").map_err(|e| io_err("/dev/null", e))?;

    // SAFETY: the agent is single-threaded, so the child may run arbitrary code; still, it only
    // uses async-signal-safe calls on data prepared above, then execs or _exits.
    let pid = unsafe {
        match &join {
            // Children of ours land in the workload's pid namespace until we switch back.
            Some(j) => {
                if libc::setns(j.pidns, libc::CLONE_NEWPID) != 0 {
                    return Err(SpawnError::NamespaceGone);
                }
                let pid = libc::fork();
                let e = io::Error::last_os_error();
                libc::setns(j.own_pidns, libc::CLONE_NEWPID);
                if pid < 0 {
                    // ENOMEM: the namespace's pid 1 is gone, nobody can enter it any more.
                    return Err(if e.raw_os_error() == Some(libc::ENOMEM) {
                        SpawnError::NamespaceGone
                    } else {
                        io_err("fork", e).into()
                    });
                }
                pid
            }
            // Fork-like clone into new pid and mount namespaces: the child is their pid 1.
            None => libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            ) as i32,
        }
    };
    if pid < 0 {
        return Err(io_err("clone", io::Error::last_os_error()).into());
    }
    if pid == 0 {
        // SAFETY: child side; every pointer was prepared before fork and stays valid.
        unsafe {
            let fail = |step: i32| -> ! {
                let e = *libc::__errno_location();
                let msg = [step, e];
                libc::write(status_w.as_raw_fd(), msg.as_ptr().cast(), 8);
                libc::_exit(127);
            };
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut mask);
            libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            match &join {
                Some(j) => {
                    if libc::setns(j.mntns, libc::CLONE_NEWNS) != 0 {
                        fail(5);
                    }
                }
                None => {
                    // A /proc of the new pid namespace, in a mount namespace of its own.
                    if libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                        || libc::mount(
                            c"proc".as_ptr(),
                            c"/proc".as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            std::ptr::null(),
                        ) != 0
                    {
                        fail(5);
                    }
                }
            }
            libc::setsid();
            if join.is_none() {
                // We are pid 1 of the new namespace. The workload must not be: the kernel drops
                // signals a namespace's init has no handler for, so it could not die of one. It
                // runs as our child; we reap everything and relay its raw wait status upward.
                let wl = libc::fork();
                if wl < 0 {
                    fail(6);
                }
                if wl > 0 {
                    for fd in [&out_w, &err_w, &status_w] {
                        libc::close(fd.as_raw_fd());
                    }
                    libc::close(devnull.as_raw_fd());
                    loop {
                        let mut st = 0;
                        let p = libc::waitpid(-1, &mut st, 0);
                        if p == wl {
                            libc::write(relay_w.as_raw_fd(), (&st as *const i32).cast(), 4);
                            libc::_exit(0);
                        }
                        if p < 0 && *libc::__errno_location() != libc::EINTR {
                            libc::_exit(1);
                        }
                    }
                }
            }
            // Only now, in the workload (or exec'd command) itself: the namespace's init that
            // relays the workload's end is the agent's helper, and must count against neither
            // the cell's pidsMax (1 is the workload alone) nor its memory.
            if let Some(p) = &c_procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    fail(1);
                }
                libc::close(fd);
            }
            if libc::dup2(devnull.as_raw_fd(), 0) < 0
                || libc::dup2(out_w.as_raw_fd(), 1) < 0
                || libc::dup2(err_w.as_raw_fd(), 2) < 0
            {
                fail(2);
            }
            if libc::chdir(c_cwd.as_ptr()) != 0 {
                fail(3);
            }
            // Every fd above 2 closes on exec, whatever opened it.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            libc::execve(prog.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
            fail(4);
        }
    }
    drop((out_w, err_w, status_w, relay_w, devnull));
    let mut msg = [0i32; 2];
    let n = loop {
        // SAFETY: reading 8 bytes into a local array.
        let n = unsafe { libc::read(status_r.as_raw_fd(), msg.as_mut_ptr().cast(), 8) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    if n == 8 {
        let mut st = 0;
        // SAFETY: reaping the child that failed before exec.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        let e = io::Error::from_raw_os_error(msg[1]);
        return Err(SpawnError::Reply(match (msg[0], msg[1]) {
            (4, libc::ENOENT | libc::EACCES | libc::ENOTDIR | libc::ENOEXEC) => {
                err(ErrorKind::ProgramNotFound, format!("{}: {e}", argv[0]))
            }
            (1, _) => err(ErrorKind::Io, format!("join cell cgroup: {e}")),
            (3, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => err(
                ErrorKind::WorkingDirectoryNotFound,
                format!("chdir {cwd}: {e}"),
            ),
            (3, _) => err(ErrorKind::Io, format!("chdir {cwd}: {e}")),
            (5, _) => err(ErrorKind::Io, format!("cell namespaces: {e}")),
            (6, _) => err(ErrorKind::Io, format!("fork the workload: {e}")),
            _ => err(ErrorKind::Io, format!("exec {}: {e}", argv[0])),
        }));
    }
    for fd in [&out_r, &err_r] {
        // SAFETY: setting O_NONBLOCK on fds we own.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    Ok(Spawned {
        pid,
        out: out_r,
        err: err_r,
        relay: join.is_none().then_some(relay_r),
    })
}

pub(super) struct Spawned {
    pub(super) pid: i32,
    pub(super) out: OwnedFd,
    pub(super) err: OwnedFd,
    /// From the namespace init `pid`: the workload's raw wait status, written before it exits.
    pub(super) relay: Option<OwnedFd>,
}
