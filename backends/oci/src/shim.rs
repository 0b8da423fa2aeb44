//! A tiny subreaper between the harness and a runtime command that leaves processes behind.
//!
//! `runc create`, `runc exec --detach`, `runsc create` and `runsc restore --detach` exit while
//! what they started (the container's init, an exec'd process, the gVisor sandbox and gofer) lives
//! on. Orphans go to the nearest child subreaper, so the harness forks a shim that marks itself
//! `PR_SET_CHILD_SUBREAPER`, runs the runtime command, and then reaps every orphan until it has no
//! children left. It reports over a close-on-exec pipe: the runtime command's wait status, then the
//! wait status of the pid the runtime wrote to its pid file. That is how runc's and crun's exit status
//! is exact (an exit code and a signal stay distinct, unlike `runc run`'s `128+N`), and why nothing
//! a runtime starts is ever left a zombie, without making the whole test process a subreaper.
//!
//! The shim is a plain `fork` of the (multi-threaded) harness that never returns to Rust code: it
//! only calls async-signal-safe functions on memory prepared before the fork, then `_exit`s.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::sync::watch;

const TAG_RUNTIME: i32 = 1;
const TAG_TARGET: i32 = 2;
const TAG_EXEC_FAILED: i32 = 3;
const RECORD: usize = 12;
/// `CLOSE_RANGE_CLOEXEC` from linux/close_range.h.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// What the shim has reported so far. Each field goes from `None` to `Some` once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShimState {
    /// Wait status of the runtime command itself.
    pub runtime: Option<i32>,
    /// `errno` when the runtime binary could not be executed at all.
    pub exec_errno: Option<i32>,
    /// Wait status of the pid named in the pid file.
    pub target: Option<i32>,
    /// The shim reaped everything and exited (and was reaped by us).
    pub done: bool,
}

/// A running shim: watch its reports.
#[derive(Debug, Clone)]
pub struct Shim {
    pub pid: i32,
    state: watch::Receiver<ShimState>,
}

impl Shim {
    /// Run `argv` (argv[0] is an absolute path) with `stdio` as fds 0..=2, in its own session,
    /// under a fresh subreaper. `pid_file` is where the runtime writes the pid to report on.
    /// `unmount`: run the command in a private mount namespace without that mount (see
    /// [`crate::runtime::Runtime::unmount`]).
    pub fn spawn(
        argv: &[OsString],
        stdio: [&File; 3],
        pid_file: &Path,
        unmount: Option<&Path>,
    ) -> io::Result<Shim> {
        let c_argv: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(io::Error::other))
            .collect::<io::Result<_>>()?;
        let c_env: Vec<CString> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        let c_pid_file = CString::new(pid_file.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let c_unmount = unmount
            .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other))
            .transpose()?;
        let unmount_p = c_unmount.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let mut argv_p: Vec<*const libc::c_char> = c_argv.iter().map(|c| c.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut env_p: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
        env_p.push(std::ptr::null());
        // Stdio fds must not sit on 0..=2 already, or dup2 in order would clobber one another.
        let high: Vec<OwnedFd> = stdio
            .iter()
            .map(|f| dup_high(f.as_raw_fd()))
            .collect::<io::Result<_>>()?;
        let fds = [
            high[0].as_raw_fd(),
            high[1].as_raw_fd(),
            high[2].as_raw_fd(),
        ];

        let mut pipe = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned here.
        let (rd, wr) = unsafe { (File::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };

        // SAFETY: the child runs only `shim_main`, which calls async-signal-safe functions on
        // memory prepared above and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                shim_main(
                    argv_p.as_ptr(),
                    env_p.as_ptr(),
                    fds,
                    c_pid_file.as_ptr(),
                    unmount_p,
                    wr.as_raw_fd(),
                )
            }
        }
        drop(wr);
        drop(high);
        let (tx, rx) = watch::channel(ShimState::default());
        std::thread::Builder::new()
            .name(format!("cellcheck-shim-{pid}"))
            .spawn(move || read_reports(pid, rd, tx))?;
        Ok(Shim { pid, state: rx })
    }

    pub fn state(&self) -> ShimState {
        *self.state.borrow()
    }

    /// Wait until `pred` holds for the reported state (or the shim is gone).
    pub async fn until(&self, pred: impl Fn(&ShimState) -> bool) -> ShimState {
        let mut rx = self.state.clone();
        let r = rx.wait_for(|s| pred(s) || s.done).await;
        match r {
            Ok(s) => *s,
            Err(_) => *self.state.borrow(),
        }
    }

    /// The runtime command's wait status (or `Err(errno)` when it could not be executed).
    pub async fn runtime_status(&self) -> Result<i32, i32> {
        let s = self
            .until(|s| s.runtime.is_some() || s.exec_errno.is_some())
            .await;
        match (s.runtime, s.exec_errno) {
            (_, Some(e)) => Err(e),
            (Some(st), None) => Ok(st),
            (None, None) => Err(libc::ECHILD),
        }
    }

    /// The target's wait status; `None` when the shim ended without one.
    pub async fn target_status(&self) -> Option<i32> {
        self.until(|s| s.target.is_some()).await.target
    }

    /// Wait until the shim reaped everything and exited.
    pub async fn done(&self) {
        self.until(|s| s.done).await;
    }
}

fn dup_high(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl duplicates a valid fd into a new one we own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: n is a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn read_reports(pid: i32, mut rd: File, tx: watch::Sender<ShimState>) {
    let mut buf = [0u8; RECORD];
    loop {
        match rd.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        let word = |i: usize| i32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let (tag, value) = (word(0), word(8));
        tx.send_modify(|s| match tag {
            TAG_RUNTIME => s.runtime = Some(value),
            TAG_TARGET => s.target = Some(value),
            TAG_EXEC_FAILED => s.exec_errno = Some(value),
            _ => {}
        });
    }
    // EOF: the shim exited (its write end closed); reap it.
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0 {
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    tx.send_modify(|s| s.done = true);
}

unsafe fn report(fd: RawFd, tag: i32, pid: i32, value: i32) {
    let mut rec = [0u8; RECORD];
    rec[..4].copy_from_slice(&tag.to_ne_bytes());
    rec[4..8].copy_from_slice(&pid.to_ne_bytes());
    rec[8..].copy_from_slice(&value.to_ne_bytes());
    // A 12-byte write to a pipe is atomic; if the harness is gone there is nobody to tell.
    libc::write(fd, rec.as_ptr().cast(), RECORD);
}

unsafe fn errno() -> i32 {
    *libc::__errno_location()
}

/// Parse a decimal pid from a file without allocating.
unsafe fn read_pid(path: *const libc::c_char) -> i32 {
    let fd = libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return 0;
    }
    let mut buf = [0u8; 32];
    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
    libc::close(fd);
    let mut pid: i32 = 0;
    for &b in buf.iter().take(n.max(0) as usize) {
        if !b.is_ascii_digit() {
            break;
        }
        pid = pid.saturating_mul(10).saturating_add((b - b'0') as i32);
    }
    pid
}

/// Enter a private mount namespace and detach `path` there (only syscalls: safe after `fork`
/// and in `pre_exec`). Returns 0, or -1 with `errno` set.
pub(crate) unsafe fn private_unmount(path: *const libc::c_char) -> i32 {
    if libc::unshare(libc::CLONE_NEWNS) != 0 {
        return -1;
    }
    // Nothing done in this namespace may propagate back to the host's.
    let root = c"/".as_ptr();
    if libc::mount(
        std::ptr::null(),
        root,
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return -1;
    }
    libc::umount2(path, libc::MNT_DETACH)
}

unsafe fn shim_main(
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdio: [RawFd; 3],
    pid_file: *const libc::c_char,
    unmount: *const libc::c_char,
    out: RawFd,
) -> ! {
    libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    let child = libc::fork();
    if child == 0 {
        // The runtime gets its own session: terminal signals for the harness never reach it.
        libc::setsid();
        for (i, fd) in stdio.iter().enumerate() {
            libc::dup2(*fd, i as i32);
        }
        // Nothing above 2 may leak into the runtime (and from there into a detached sandbox).
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // The Rust runtime ignores SIGPIPE; an ignored signal would survive exec.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if !unmount.is_null() && private_unmount(unmount) != 0 {
            report(out, TAG_EXEC_FAILED, 0, errno());
            libc::_exit(127);
        }
        libc::execve(*argv, argv, envp);
        report(out, TAG_EXEC_FAILED, 0, errno());
        libc::_exit(127);
    }
    if child < 0 {
        report(out, TAG_EXEC_FAILED, 0, errno());
        libc::_exit(1);
    }
    let mut target: i32 = 0;
    // Children reaped before the target was known (cannot allocate here, so a fixed stash).
    let mut stash = [(0i32, 0i32); 64];
    let mut stashed = 0usize;
    loop {
        let mut st = 0;
        let pid = libc::waitpid(-1, &mut st, libc::__WALL);
        if pid < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            break;
        }
        if pid == child {
            report(out, TAG_RUNTIME, pid, st);
            if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
                target = read_pid(pid_file);
                for &(p, s) in stash.iter().take(stashed) {
                    if p == target && target > 0 {
                        report(out, TAG_TARGET, p, s);
                    }
                }
            }
        } else if target > 0 && pid == target {
            report(out, TAG_TARGET, pid, st);
        } else if stashed < stash.len() {
            stash[stashed] = (pid, st);
            stashed += 1;
        }
    }
    libc::_exit(0)
}
