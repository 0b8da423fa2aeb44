//! The agent that runs as init (pid 1) inside a cellcheck microVM guest.
//!
//! It mounts the pseudo filesystems, brings up `lo` (the guest has no other interface), opens the
//! agent channel (the second serial port, `/dev/ttyS1`, raw mode) and serves the line protocol of
//! `cellcheck_guest_agent` (documented in `PROTOCOL.md`). It is single-threaded: one `poll` loop
//! over the channel and the captured stdout/stderr pipes of the jobs, woken by SIGCHLD so every
//! child, orphans included, is reaped.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use cellcheck_guest_agent::{
    b64_encode, EnvPair, ErrorKind, JobEnd, Op, Reply, ReplyBody, Request, CONSOLE_READY_MARKER,
    MAX_FRAME, PROTOCOL_VERSION, WORKLOAD_JOB,
};

mod spawn;
use spawn::*;

const CHANNEL: &str = "/dev/ttyS1";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CELL_CGROUP: &str = "/sys/fs/cgroup/cell";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn log(msg: &str) {
    // stderr of init is /dev/console, which the host keeps as the console log.
    let _ = writeln!(io::stderr(), "cellcheck-guest-agent: {msg}");
}

fn main() {
    if let Err(e) = setup() {
        log(&format!("setup failed: {e}"));
    }
    let channel = match open_channel() {
        Ok(c) => c,
        Err(e) => {
            // Nothing can be served; exiting pid 1 panics the kernel and the VM stops (-no-reboot).
            log(&format!("cannot open {CHANNEL}: {e}"));
            std::process::exit(1);
        }
    };
    let mut agent = Agent::new(channel);
    agent.send(&Reply {
        seq: 0,
        body: ReplyBody::Ready {
            version: PROTOCOL_VERSION,
        },
    });
    log("ready");
    debug_assert!(CONSOLE_READY_MARKER.ends_with("ready"));
    agent.serve();
}

fn setup() -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags); 5] = [
        ("proc", "/proc", "proc", flags),
        ("sysfs", "/sys", "sysfs", flags),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        ),
        ("cgroup2", CGROUP_ROOT, "cgroup2", flags),
    ];
    for (src, dst, fstype, fl) in mounts {
        let _ = fs::create_dir_all(dst);
        if let Err(e) = mount(Some(src), dst, Some(fstype), fl, None::<&str>) {
            log(&format!("mount {fstype} on {dst}: {e}"));
        }
    }
    let _ = fs::set_permissions("/tmp", std::os::unix::fs::PermissionsExt::from_mode(0o1777));
    // Allocations succeed and the cell's memory.max decides, as on a host: without this, a
    // request larger than the small guest's RAM fails in malloc instead of meeting the OOM killer.
    if let Err(e) = fs::write("/proc/sys/vm/overcommit_memory", "1") {
        log(&format!("overcommit_memory: {e}"));
    }
    if let Err(e) = loopback_up() {
        log(&format!("lo up: {e}"));
    }
    // SIGCHLD must interrupt poll (no SA_RESTART), so a handler that does nothing is installed.
    extern "C" fn on_sigchld(_: libc::c_int) {}
    // SAFETY: installing a handler that touches nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_NOCLDSTOP;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
    }
    Ok(())
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a throwaway socket for the SIOC[GS]IFFLAGS ioctls on a zeroed, named ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn open_channel() -> io::Result<fs::File> {
    use nix::sys::termios::{self, ControlFlags, FlushArg, SetArg};
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(CHANNEL)?;
    let mut t = termios::tcgetattr(&f).map_err(io::Error::from)?;
    // Raw bytes both ways: no echo, no line editing, no CR/NL translation, no flow control.
    termios::cfmakeraw(&mut t);
    t.control_flags |= ControlFlags::CLOCAL | ControlFlags::CREAD;
    t.control_flags &= !ControlFlags::CRTSCTS;
    termios::tcsetattr(&f, SetArg::TCSANOW, &t).map_err(io::Error::from)?;
    // Drop whatever the host wrote before we listened; it retries its hello.
    let _ = termios::tcflush(&f, FlushArg::TCIFLUSH);
    Ok(f)
}

/// A started process whose end and output the host will collect.
struct Job {
    /// The job's process, or for a job in fresh namespaces their init (the workload's parent).
    pid: i32,
    relay: Option<OwnedFd>,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Option<JobEnd>,
    /// `memory.events` `oom_kill` when the job started, to tell an OOM kill from a plain SIGKILL.
    oom_kills_at_start: Option<u64>,
}

struct PendingWait {
    seq: u64,
    job: u32,
    deadline: Instant,
}

struct Agent {
    channel: fs::File,
    inbuf: Vec<u8>,
    discarding: bool,
    jobs: BTreeMap<u32, Job>,
    next_job: u32,
    waits: Vec<PendingWait>,
    cgroup: bool,
    /// The workload's pid and mount namespaces, which execs join (like `runc exec`).
    workload_ns: Option<(OwnedFd, OwnedFd)>,
    /// The agent's own pid namespace, to return to after forking into the workload's.
    own_pidns: Option<OwnedFd>,
}

impl Agent {
    fn new(channel: fs::File) -> Self {
        Agent {
            channel,
            inbuf: Vec::new(),
            discarding: false,
            jobs: BTreeMap::new(),
            next_job: WORKLOAD_JOB + 1,
            waits: Vec::new(),
            cgroup: false,
            workload_ns: None,
            own_pidns: fs::File::open("/proc/self/ns/pid").ok().map(OwnedFd::from),
        }
    }

    fn send(&mut self, r: &Reply) {
        let mut line = serde_json::to_vec(r).unwrap_or_else(|e| {
            format!(
                "{{\"seq\":{},\"reply\":\"error\",\"kind\":\"io\",\"message\":\"encode: {e}\"}}",
                r.seq
            )
            .into_bytes()
        });
        line.push(b'\n');
        if let Err(e) = self.channel.write_all(&line) {
            log(&format!("channel write: {e}"));
        }
    }

    fn serve(&mut self) -> ! {
        loop {
            self.reap();
            self.answer_waits();
            let mut fds = vec![libc::pollfd {
                fd: self.channel.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let mut owners = Vec::new();
            for (&id, job) in &self.jobs {
                for (i, fd) in [&job.out, &job.err].into_iter().enumerate() {
                    if let Some(fd) = fd {
                        fds.push(libc::pollfd {
                            fd: fd.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        });
                        owners.push((id, i));
                    }
                }
            }
            let now = Instant::now();
            let timeout = self
                .waits
                .iter()
                .map(|w| w.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            // SAFETY: fds is a valid array of pollfd for the duration of the call.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout.as_millis().clamp(1, 1000) as libc::c_int,
                )
            };
            if n <= 0 {
                continue; // timeout or EINTR (SIGCHLD): reap and re-check at the top
            }
            for (k, &(id, which)) in owners.iter().enumerate() {
                if fds[k + 1].revents != 0 {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        drain(job, which);
                    }
                }
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.read_channel();
            }
        }
    }

    fn read_channel(&mut self) {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(self.channel.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        for &b in &buf[..n as usize] {
            if b == b'\n' {
                let line = std::mem::take(&mut self.inbuf);
                if std::mem::take(&mut self.discarding) {
                    self.send(&Reply::error(0, ErrorKind::BadFrame, "frame too long"));
                } else {
                    self.handle_line(&line);
                }
            } else if !self.discarding {
                self.inbuf.push(b);
                if self.inbuf.len() > MAX_FRAME {
                    self.inbuf.clear();
                    self.discarding = true;
                }
            }
        }
    }

    fn handle_line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let req: Request = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                // Answer under the frame's seq when it has one, so the host is not left waiting.
                let seq = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
                    .unwrap_or(0);
                self.send(&Reply::error(seq, ErrorKind::BadFrame, e.to_string()));
                return;
            }
        };
        let seq = req.seq;
        let body = match req.op {
            Op::Hello { version } if version == PROTOCOL_VERSION => ReplyBody::Hello {
                version: PROTOCOL_VERSION,
                agent: format!("cellcheck-guest-agent {}", env!("CARGO_PKG_VERSION")),
            },
            Op::Hello { version } => err(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {version} not spoken (this agent speaks {PROTOCOL_VERSION})"
                ),
            ),
            Op::Run {
                argv,
                env,
                cwd,
                hostname,
                memory_max_bytes,
                pids_max,
            } => self.run(
                &argv,
                &env,
                &cwd,
                hostname.as_deref(),
                memory_max_bytes,
                pids_max,
            ),
            Op::Exec { argv, env, cwd } => match self.jobs.get(&WORKLOAD_JOB) {
                None => err(ErrorKind::InvalidState, "exec before run"),
                // The cell lives as long as its workload: nothing runs in it afterwards.
                Some(j) if j.end.is_some() => err(ErrorKind::InvalidState, "exited"),
                Some(_) => {
                    let id = self.next_job;
                    match self.start(id, &argv, &env, &cwd) {
                        Ok(pid) => {
                            self.next_job += 1;
                            ReplyBody::Started { job: id, pid }
                        }
                        Err(b) => b,
                    }
                }
            },
            Op::Wait { job, timeout_ms } => {
                if !self.jobs.contains_key(&job) {
                    err(ErrorKind::NoSuchJob, format!("no job {job}"))
                } else {
                    self.waits.push(PendingWait {
                        seq,
                        job,
                        deadline: Instant::now() + Duration::from_millis(timeout_ms),
                    });
                    self.answer_waits();
                    return;
                }
            }
            Op::Kill { job, signal } => self.kill(job, signal),
            Op::Forget { job } => match self.jobs.get(&job) {
                None => err(ErrorKind::NoSuchJob, format!("no job {job}")),
                Some(j) if j.end.is_none() => err(ErrorKind::InvalidState, "job still running"),
                Some(_) => {
                    self.jobs.remove(&job);
                    ReplyBody::Done
                }
            },
            Op::Hostname { name } => match nix::unistd::sethostname(&name) {
                Ok(()) => ReplyBody::Done,
                Err(e) => err(ErrorKind::Io, format!("sethostname: {e}")),
            },
        };
        self.send(&Reply { seq, body });
    }

    fn run(
        &mut self,
        argv: &[String],
        env: &[EnvPair],
        cwd: &str,
        hostname: Option<&str>,
        memory_max: Option<u64>,
        pids_max: Option<u64>,
    ) -> ReplyBody {
        if self.jobs.contains_key(&WORKLOAD_JOB) {
            return err(ErrorKind::InvalidState, "the workload was already started");
        }
        if let Some(h) = hostname {
            if let Err(e) = nix::unistd::sethostname(h) {
                return err(ErrorKind::Io, format!("sethostname: {e}"));
            }
        }
        if let Err(e) = make_cell_cgroup(memory_max, pids_max) {
            if memory_max.is_some() || pids_max.is_some() {
                return err(ErrorKind::Io, format!("cell cgroup: {e}"));
            }
            log(&format!("cell cgroup (no limits asked): {e}"));
        } else {
            self.cgroup = true;
        }
        match self.start(WORKLOAD_JOB, argv, env, cwd) {
            Ok(pid) => ReplyBody::Started {
                job: WORKLOAD_JOB,
                pid,
            },
            Err(b) => b,
        }
    }

    fn start(
        &mut self,
        id: u32,
        argv: &[String],
        env: &[EnvPair],
        cwd: &str,
    ) -> Result<i32, ReplyBody> {
        let oom = if self.cgroup { oom_kills() } else { None };
        let cg = self.cgroup.then_some(CELL_CGROUP);
        let join = match (&self.workload_ns, &self.own_pidns) {
            (Some((pidns, mntns)), Some(own)) if id != WORKLOAD_JOB => Some(Join {
                pidns: pidns.as_raw_fd(),
                mntns: mntns.as_raw_fd(),
                own_pidns: own.as_raw_fd(),
            }),
            _ => None,
        };
        let sp = spawn(argv, env, cwd, cg, join).map_err(|e| match e {
            SpawnError::Reply(b) => b,
            // The workload's namespace died with its pid 1: the workload has ended, though it
            // is not reaped yet. An exec runs nowhere else.
            SpawnError::NamespaceGone => err(ErrorKind::InvalidState, "exited"),
        })?;
        let pid = sp.pid;
        if id == WORKLOAD_JOB {
            let ns =
                |kind: &str| fs::File::open(format!("/proc/{pid}/ns/{kind}")).map(OwnedFd::from);
            self.workload_ns = ns("pid").and_then(|p| Ok((p, ns("mnt")?))).ok();
        }
        self.jobs.insert(
            id,
            Job {
                pid,
                out: Some(sp.out),
                err: Some(sp.err),
                relay: sp.relay,
                stdout: Vec::new(),
                stderr: Vec::new(),
                end: None,
                oom_kills_at_start: oom,
            },
        );
        Ok(pid)
    }

    fn kill(&mut self, job: Option<u32>, signal: i32) -> ReplyBody {
        match job {
            Some(id) => match self.jobs.get(&id) {
                None => err(ErrorKind::NoSuchJob, format!("no job {id}")),
                Some(j) if j.end.is_some() => ReplyBody::Done,
                // SAFETY: plain kill(2) of the job's process group (it called setsid).
                Some(j) => match unsafe { libc::kill(-j.pid, signal) } {
                    0 => ReplyBody::Done,
                    _ => err(
                        ErrorKind::Io,
                        format!("kill: {}", io::Error::last_os_error()),
                    ),
                },
            },
            None => {
                // Every process of the cell: all but pid 1 (ourselves) and kernel threads.
                // SAFETY: kill(-1) signals every process we may signal except ourselves (init).
                match unsafe { libc::kill(-1, signal) } {
                    0 => ReplyBody::Done,
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() == Some(libc::ESRCH) {
                            ReplyBody::Done
                        } else {
                            err(ErrorKind::Io, format!("kill: {e}"))
                        }
                    }
                }
            }
        }
    }

    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on any child; as pid 1 that includes every orphan of the guest.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let oom_now = if self.cgroup { oom_kills() } else { None };
            if let Some(job) = self
                .jobs
                .values_mut()
                .find(|j| j.pid == pid && j.end.is_none())
            {
                if let Some(relay) = job.relay.take() {
                    let mut st = 0i32;
                    // SAFETY: reading 4 bytes the init wrote before it exited.
                    let n =
                        unsafe { libc::read(relay.as_raw_fd(), (&mut st as *mut i32).cast(), 4) };
                    if n == 4 {
                        status = st;
                    }
                }
                let end = if libc::WIFEXITED(status) {
                    JobEnd::Exited {
                        code: libc::WEXITSTATUS(status),
                    }
                } else {
                    let sig = libc::WTERMSIG(status);
                    let oom_rose =
                        matches!((job.oom_kills_at_start, oom_now), (Some(a), Some(b)) if b > a);
                    if sig == libc::SIGKILL && oom_rose {
                        JobEnd::OutOfMemory
                    } else {
                        JobEnd::Signaled { signal: sig }
                    }
                };
                // What the job wrote before it ended is in the pipes now: take it, then let go of
                // the pipes, so a daemonized grandchild holding them cannot delay the report.
                drain(job, 0);
                drain(job, 1);
                job.out = None;
                job.err = None;
                job.end = Some(end);
            }
        }
    }

    fn answer_waits(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.waits.len() {
            let w = &self.waits[i];
            let body = match self.jobs.get(&w.job) {
                None => Some(err(ErrorKind::NoSuchJob, format!("no job {}", w.job))),
                Some(j) => match j.end {
                    Some(end) => Some(ReplyBody::Exited {
                        job: w.job,
                        end,
                        stdout: b64_encode(&j.stdout),
                        stderr: b64_encode(&j.stderr),
                    }),
                    None if now >= w.deadline => Some(ReplyBody::Running { job: w.job }),
                    None => None,
                },
            };
            match body {
                Some(body) => {
                    let w = self.waits.remove(i);
                    self.send(&Reply { seq: w.seq, body });
                }
                None => i += 1,
            }
        }
    }
}

fn err(kind: ErrorKind, message: impl Into<String>) -> ReplyBody {
    ReplyBody::Error {
        kind,
        message: message.into(),
    }
}

/// Read what is available from one of a job's pipes (0 = stdout, 1 = stderr); close it at EOF.
fn drain(job: &mut Job, which: usize) {
    let (slot, buf) = if which == 0 {
        (&mut job.out, &mut job.stdout)
    } else {
        (&mut job.err, &mut job.stderr)
    };
    let Some(fd) = slot else { return };
    let mut chunk = [0u8; 16384];
    loop {
        // SAFETY: non-blocking read into a stack buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if n > 0 {
            buf.extend_from_slice(&chunk[..n as usize]);
        } else if n == 0 {
            *slot = None;
            return;
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return; // EAGAIN: nothing more for now
            }
        }
    }
}
