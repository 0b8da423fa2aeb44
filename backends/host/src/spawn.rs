//! Spawning `cellcheck-host-init` with the hygiene the contract demands of everything the
//! backend runs (an empty env, stdio owned by the backend, no fd beyond the sync and status
//! pipes, a session of its own), and reading the status lines it reports.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use cellcheck_host_init::{Status, STATUS_FD, SYNC_FD};

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 into a local array; the fds are owned right after.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// A started init: the process, the go-byte writer, the status reader.
pub(crate) struct Started {
    pub(crate) child: Child,
    pub(crate) sync: Option<fs::File>,
    pub(crate) status: StatusReader,
}

/// Start `cellcheck-host-init <args>` with the hygiene the contract demands of everything we run.
pub(crate) fn spawn_init(
    init: &Path,
    args: &[&std::ffi::OsStr],
    stdout: fs::File,
    stderr: fs::File,
    new_namespaces: bool,
) -> io::Result<Started> {
    let (sync_r, sync_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (sr, sw) = (sync_r.as_raw_fd(), status_w.as_raw_fd());
    let mut cmd = Command::new(init);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: the closure only makes async-signal-safe syscalls (fcntl, dup2, close, unshare,
    // setsid) on fd numbers captured above.
    unsafe {
        cmd.pre_exec(move || {
            // Move both ends above the target numbers first, so dup2 never clobbers the other.
            let a = libc::fcntl(sr, libc::F_DUPFD_CLOEXEC, 10);
            let b = libc::fcntl(sw, libc::F_DUPFD_CLOEXEC, 10);
            if a < 0 || b < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::dup2(a, SYNC_FD) < 0 || libc::dup2(b, STATUS_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(a);
            libc::close(b);
            if new_namespaces
                && libc::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWUTS
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWPID,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Its own session: terminal signals for the caller never reach a cell.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(sync_r);
    drop(status_w);
    Ok(Started {
        child,
        sync: Some(fs::File::from(sync_w)),
        status: StatusReader::new(status_r),
    })
}

/// Reads [`Status`] lines; the startup phase reads with a deadline.
pub(crate) struct StatusReader {
    inner: BufReader<fs::File>,
}

impl StatusReader {
    pub(crate) fn new(fd: OwnedFd) -> Self {
        StatusReader {
            inner: BufReader::new(fs::File::from(fd)),
        }
    }

    /// The next status line; `Ok(None)` at EOF. With a deadline, waits for data with poll first.
    pub(crate) fn next(&mut self, deadline: Option<Instant>) -> io::Result<Option<Status>> {
        loop {
            if let Some(d) = deadline {
                if self.inner.buffer().is_empty() {
                    let left = d.saturating_duration_since(Instant::now());
                    let mut pfd = libc::pollfd {
                        fd: self.inner.get_ref().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: polling one valid fd.
                    let n = unsafe {
                        libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32)
                    };
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "init did not report in time",
                        ));
                    }
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                }
            }
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if let Some(s) = Status::decode(&line) {
                return Ok(Some(s));
            }
        }
    }
}

pub(crate) fn open_capture(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

pub(crate) fn write_secret(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}
