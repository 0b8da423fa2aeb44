//! One QEMU process and its two channels: QMP (control) and the guest agent (second serial port).
//!
//! Both channels are `socketpair`s whose QEMU ends are inherited by the child (`-chardev
//! socket,fd=N`): no socket files to name, race on or clean up, no 108-byte path limit for long
//! cell ids, and the agent's boot-time `ready` line can never be missed. QEMU runs in the
//! foreground as our child (`-daemonize` off) with stdin `/dev/null`, stdout/stderr into files of
//! the cell's work dir, and `PR_SET_PDEATHSIG` so it cannot outlive a crashed caller.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cellcheck_contract::{CellError, Retry};
use cellcheck_guest_agent::{Op, Reply, ReplyBody, Request, PROTOCOL_VERSION};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::confine::{self, VmmCgroup};
use crate::lines::Lines;
use crate::Accel;

/// Fixed fd numbers the QEMU child finds its channel ends (and an incoming snapshot) at.
const AGENT_FD: i32 = 3;
const QMP_FD: i32 = 4;
const INCOMING_FD: i32 = 5;

/// What to boot.
#[derive(Debug, Clone)]
pub(crate) struct VmSpec {
    pub qemu_bin: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accel: Accel,
    pub memory_mib: u64,
    /// The cell's work dir: console log and QEMU's own log go here.
    pub dir: PathBuf,
    /// A snapshot's migration stream to start from instead of booting.
    pub incoming: Option<PathBuf>,
    /// The name of the VMM's own cgroup (see [`crate::confine`]); `None` for the accelerator
    /// probe's throwaway VM.
    pub cgroup: Option<String>,
}

impl VmSpec {
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-machine",
            "q35",
            "-smp",
            "1",
            "-nic",
            "none",
        ]
        .map(String::from)
        .to_vec();
        a.push("-accel".into());
        a.push(match self.accel {
            Accel::Tcg => format!("tcg,tb-size={}", confine::TCG_TB_MIB),
            Accel::Kvm => "kvm".into(),
        });
        a.push("-sandbox".into());
        a.push(confine::SANDBOX.into());
        a.push("-m".into());
        a.push(self.memory_mib.to_string());
        // The guest's own clocks stop while the VM is paused; its RTC follows the host's realtime
        // (QEMU's default, stated because the suite reads it to see a pause from inside).
        a.push("-rtc".into());
        a.push("base=utc,clock=host".into());
        a.push("-kernel".into());
        a.push(self.kernel.display().to_string());
        a.push("-initrd".into());
        a.push(self.initramfs.display().to_string());
        a.push("-append".into());
        // panic=-1 with -no-reboot: if the agent (pid 1) dies, QEMU exits instead of hanging.
        // no_timer_check: under TCG on a loaded host the vCPU thread can be starved while the kernel
        // counts timer interrupts during IO-APIC setup; the check then fails and the kernel panics
        // with "IO-APIC + timer doesn't work!" within its first 0.1 s (seen on 1 of 19 boots at
        // load 20). The timer works; only the check's busy-wait window is too short for a guest
        // that gets a fraction of a core, so the check is skipped, as VM images commonly do.
        a.push("console=ttyS0 quiet panic=-1 no_timer_check".into());
        // ttyS0: console into the work dir (also the residue marker: the path names the cell).
        a.push("-serial".into());
        a.push(format!("file:{}", self.console_log().display()));
        a.push("-chardev".into());
        a.push(format!("socket,id=agent,fd={AGENT_FD}"));
        // ttyS1: the agent channel.
        a.push("-serial".into());
        a.push("chardev:agent".into());
        a.push("-chardev".into());
        a.push(format!("socket,id=qmp,fd={QMP_FD}"));
        a.push("-mon".into());
        a.push("chardev=qmp,mode=control".into());
        if self.incoming.is_some() {
            a.push("-incoming".into());
            a.push(format!("fd:{INCOMING_FD}"));
        }
        a
    }
}

fn failure(reason: impl Into<String>, retry: Retry) -> CellError {
    CellError::BackendFailure {
        reason: reason.into(),
        retry,
    }
}

/// A running QEMU.
pub(crate) struct Vm {
    pub spec: VmSpec,
    child: Mutex<Option<Child>>,
    qmp: Mutex<Lines>,
    agent: Mutex<AgentChan>,
    /// Removed once QEMU is reaped.
    cgroup: Option<VmmCgroup>,
}

struct AgentChan {
    lines: Lines,
    seq: u64,
}

impl Vm {
    /// Start QEMU and wait until the agent answers `hello` (boot) or the incoming migration is in
    /// and the guest runs (restore), within `bound`. On any failure QEMU is killed and reaped.
    pub async fn start(spec: VmSpec, bound: Duration) -> Result<Vm, CellError> {
        let deadline = Instant::now() + bound;
        let (agent_host, agent_qemu) = StdUnixStream::pair()?;
        let (qmp_host, qmp_qemu) = StdUnixStream::pair()?;
        let incoming: Option<OwnedFd> = match &spec.incoming {
            Some(p) => Some(
                fs::File::open(p)
                    .map_err(|e| {
                        failure(
                            format!("open snapshot {}: {e}", p.display()),
                            Retry::NotRetryable,
                        )
                    })?
                    .into(),
            ),
            None => None,
        };
        let qemu_log = fs::File::create(spec.dir.join("qemu.log"))?;
        let cgroup = match &spec.cgroup {
            Some(leaf) => Some(
                VmmCgroup::create(Path::new(confine::CGROUP_ROOT), leaf, spec.memory_mib).map_err(
                    |e| failure(format!("qemu: the VMM's cgroup: {e}"), Retry::NotRetryable),
                )?,
            ),
            None => None,
        };
        let procs = cgroup
            .as_ref()
            .map(VmmCgroup::procs_files)
            .unwrap_or_default();
        let mut cmd = Command::new(&spec.qemu_bin);
        cmd.args(spec.args())
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log)
            .kill_on_drop(true);
        let fds = [
            (agent_qemu.as_raw_fd(), AGENT_FD),
            (qmp_qemu.as_raw_fd(), QMP_FD),
            (incoming.as_ref().map_or(-1, |f| f.as_raw_fd()), INCOMING_FD),
        ];
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // Move each inherited end to its fixed number (via a high fd, so no two collide);
                // dup2 leaves the copies without close-on-exec, every other fd of ours keeps it.
                let mut high = [-1; 3];
                for (i, (fd, _)) in fds.iter().enumerate() {
                    if *fd >= 0 {
                        high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                        if high[i] < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                for (i, (_, to)) in fds.iter().enumerate() {
                    if high[i] >= 0 && libc::dup2(high[i], *to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                confine::enter(&procs)
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(failure(
                    format!("spawn {}: {e}", spec.qemu_bin.display()),
                    Retry::NotRetryable,
                ));
            }
        };
        drop((agent_qemu, qmp_qemu, incoming));
        tracing::debug!(
            pid = child.id(),
            accel = spec.accel.as_str(),
            restore = spec.incoming.is_some(),
            "qemu spawned"
        );
        let started = Instant::now();
        let vm = Vm {
            child: Mutex::new(Some(child)),
            qmp: Mutex::new(Lines::new(qmp_host)?),
            agent: Mutex::new(AgentChan {
                lines: Lines::new(agent_host)?,
                seq: 0,
            }),
            spec,
            cgroup,
        };
        match vm.bring_up(deadline, bound).await {
            Ok(()) => {
                tracing::debug!(
                    after_ms = started.elapsed().as_millis() as u64,
                    "vm up, agent answered hello"
                );
                Ok(vm)
            }
            Err(e) => {
                let e = vm.exited_error().await.unwrap_or(e);
                tracing::debug!(error = %e, "vm did not come up; killing qemu");
                vm.kill().await;
                Err(e)
            }
        }
    }

    async fn bring_up(&self, deadline: Instant, bound: Duration) -> Result<(), CellError> {
        {
            let mut q = self.qmp.lock().await;
            // Greeting, then capabilities negotiation.
            self.qmp_line(&mut q, deadline).await?;
        }
        self.qmp_cmd("qmp_capabilities", json!({}), deadline)
            .await?;
        if self.spec.incoming.is_some() {
            // The stream loads, then the guest starts on its own (no -S).
            loop {
                let st = self.qmp_cmd("query-status", json!({}), deadline).await?;
                match st.get("status").and_then(Value::as_str) {
                    Some("running") => break,
                    // Snapshots are taken of a stopped guest, so the loaded one stays paused.
                    Some("paused") | Some("postmigrate") => {
                        self.qmp_cmd("cont", json!({}), deadline).await?;
                    }
                    Some("inmigrate") | Some("prelaunch") => {}
                    other => {
                        return Err(failure(
                            format!("restore: guest is {other:?} after loading the snapshot"),
                            Retry::NotRetryable,
                        ))
                    }
                }
                if Instant::now() >= deadline {
                    return Err(failure(
                        format!("restore: snapshot not loaded within {} s", bound.as_secs()),
                        Retry::Unknown,
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let mut a = self.agent.lock().await;
            loop {
                match a.lines.next(deadline).await {
                    Ok(line) => {
                        if let Ok(Reply {
                            seq: 0,
                            body: ReplyBody::Ready { .. },
                        }) = serde_json::from_slice(&line)
                        {
                            tracing::debug!("guest booted, agent ready");
                            break;
                        }
                    }
                    Err(why) => {
                        return Err(self.boot_error(why, bound).await);
                    }
                }
            }
        }
        let r = self
            .agent_request(
                Op::Hello {
                    version: PROTOCOL_VERSION,
                },
                deadline,
            )
            .await?;
        match r {
            ReplyBody::Hello { .. } => Ok(()),
            other => Err(failure(
                format!("agent refused hello: {other:?}"),
                Retry::NotRetryable,
            )),
        }
    }

    /// If QEMU has exited (give it a moment to finish dying), why, from its log.
    async fn exited_error(&self) -> Option<CellError> {
        let mut c = self.child.lock().await;
        let child = c.as_mut()?;
        let st = tokio::time::timeout(Duration::from_millis(300), child.wait())
            .await
            .ok()?
            .ok()?;
        let qemu_log = last_line(&self.spec.dir.join("qemu.log"));
        let console = crate::console::summary(&self.spec.console_log());
        let what = if self.spec.incoming.is_some() {
            "restore"
        } else {
            "boot"
        };
        Some(failure(
            format!("qemu exited during {what} ({st}): {qemu_log} (console: {console})"),
            Retry::NotRetryable,
        ))
    }

    async fn boot_error(&self, why: &str, bound: Duration) -> CellError {
        let console = crate::console::summary(&self.spec.console_log());
        match self.exited_error().await {
            Some(e) => e,
            None => failure(
                format!(
                    "{}: guest did not reach the agent within {} s ({why}; console: {console})",
                    self.spec.accel.as_str(),
                    bound.as_secs()
                ),
                Retry::Unknown,
            ),
        }
    }

    async fn qmp_line(&self, q: &mut Lines, deadline: Instant) -> Result<Value, CellError> {
        let line = q
            .next(deadline)
            .await
            .map_err(|why| failure(format!("qmp: {why}"), Retry::Unknown))?;
        serde_json::from_slice(&line)
            .map_err(|e| failure(format!("qmp: bad line: {e}"), Retry::Unknown))
    }

    /// Run one QMP command; events arriving meanwhile are skipped.
    pub async fn qmp_cmd(
        &self,
        cmd: &str,
        args: Value,
        deadline: Instant,
    ) -> Result<Value, CellError> {
        tracing::debug!(cmd, "qmp command");
        let mut q = self.qmp.lock().await;
        let msg = json!({"execute": cmd, "arguments": args});
        q.send(msg.to_string().as_bytes())
            .await
            .map_err(|e| failure(format!("qmp {cmd}: {e}"), Retry::Unknown))?;
        loop {
            let v = self.qmp_line(&mut q, deadline).await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                tracing::debug!(cmd, error = %e, "qmp command failed");
                return Err(failure(format!("qmp {cmd}: {e}"), Retry::NotRetryable));
            }
        }
    }

    /// QMP `getfd`: hand QEMU `file` under `name` (its seccomp sandbox forbids spawning, so a
    /// migration stream goes to a file we open, never through `exec:`).
    pub async fn qmp_getfd(
        &self,
        name: &str,
        file: &fs::File,
        deadline: Instant,
    ) -> Result<(), CellError> {
        let mut q = self.qmp.lock().await;
        let msg = json!({"execute": "getfd", "arguments": {"fdname": name}});
        q.send_with_fd(msg.to_string().as_bytes(), file.as_raw_fd())
            .await
            .map_err(|e| failure(format!("qmp getfd: {e}"), Retry::Unknown))?;
        loop {
            let v = self.qmp_line(&mut q, deadline).await?;
            if v.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = v.get("error") {
                return Err(failure(format!("qmp getfd: {e}"), Retry::NotRetryable));
            }
        }
    }

    /// One agent request and its reply (matched by `seq`; strays from timed-out requests are
    /// skipped). Holding the agent lock for the whole exchange keeps snapshots between requests.
    pub async fn agent_request(&self, op: Op, deadline: Instant) -> Result<ReplyBody, CellError> {
        let mut a = self.agent.lock().await;
        agent_exchange(&mut a, op, deadline).await
    }

    /// Hold the agent channel (no request in flight) while `f` runs: used around snapshots.
    pub async fn with_agent_quiet<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _a = self.agent.lock().await;
        f.await
    }

    /// QMP `quit`, then SIGKILL if QEMU lingers; always reaped. Idempotent.
    pub async fn shutdown(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.qmp_cmd("quit", json!({}), deadline),
        )
        .await;
        let mut c = self.child.lock().await;
        if let Some(child) = c.as_mut() {
            if tokio::time::timeout(Duration::from_secs(3), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        *c = None;
        self.remove_cgroup();
    }

    /// SIGKILL and reap (failed starts).
    pub async fn kill(&self) {
        let mut c = self.child.lock().await;
        if let Some(child) = c.as_mut() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        *c = None;
        self.remove_cgroup();
    }

    /// The VMM's cgroup, once QEMU is reaped (a cgroup with a task cannot be removed).
    fn remove_cgroup(&self) {
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
    }

    /// Best effort for `Drop` paths (no runtime needed): SIGKILL; tokio reaps orphaned children.
    pub fn kill_now(&self) {
        if let Ok(mut c) = self.child.try_lock() {
            if let Some(child) = c.as_mut() {
                let _ = child.start_kill();
                // A SIGKILLed QEMU is gone within milliseconds; its cgroup can go only after.
                let until = Instant::now() + Duration::from_secs(2);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            *c = None;
        }
        self.remove_cgroup();
    }
}

/// A VM dropped without `shutdown` or `kill` (a create cancelled half-way, a panic) still takes
/// QEMU and its cgroup with it; after those two this finds nothing left to do.
impl Drop for Vm {
    fn drop(&mut self) {
        self.kill_now();
    }
}

async fn agent_exchange(
    a: &mut AgentChan,
    op: Op,
    deadline: Instant,
) -> Result<ReplyBody, CellError> {
    a.seq += 1;
    let seq = a.seq;
    // Names only: a request carries the workload's env, which may hold secrets. Long-poll waits
    // come every slice, so they are at trace level.
    let name = op_name(&op);
    if matches!(op, Op::Wait { .. }) {
        tracing::trace!(seq, op = name, "agent request");
    } else {
        tracing::debug!(seq, op = name, "agent request");
    }
    let line = serde_json::to_vec(&Request { seq, op })
        .map_err(|e| failure(e.to_string(), Retry::NotRetryable))?;
    a.lines
        .send(&line)
        .await
        .map_err(|e| failure(format!("agent: {e}"), Retry::Unknown))?;
    loop {
        let line = a
            .lines
            .next(deadline)
            .await
            .map_err(|why| failure(format!("agent: {why}"), Retry::Unknown))?;
        if let Ok(r) = serde_json::from_slice::<Reply>(&line) {
            if r.seq == seq {
                match &r.body {
                    ReplyBody::Running { .. } => tracing::trace!(seq, "agent reply: running"),
                    ReplyBody::Exited { job, end, .. } => {
                        tracing::debug!(seq, job, ?end, "agent reply: exited")
                    }
                    ReplyBody::Error { kind, message } => {
                        tracing::debug!(seq, ?kind, message, "agent reply: error")
                    }
                    ReplyBody::Started { job, pid } => {
                        tracing::debug!(seq, job, pid, "agent reply: started")
                    }
                    other => tracing::debug!(seq, reply = ?other, "agent reply"),
                }
                return Ok(r.body);
            }
        }
    }
}

/// The request's name in the protocol.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Hello { .. } => "hello",
        Op::Run { .. } => "run",
        Op::Exec { .. } => "exec",
        Op::Wait { .. } => "wait",
        Op::Kill { .. } => "kill",
        Op::Forget { .. } => "forget",
        Op::Hostname { .. } => "hostname",
    }
}

/// The last non-empty line of a log file, for error messages.
pub(crate) fn last_line(p: &Path) -> String {
    fs::read(p)
        .ok()
        .and_then(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "empty".into())
}
