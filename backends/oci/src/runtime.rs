//! The runtime CLI: which binary, which global flags, how to read what it says, and every way
//! runc, crun and runsc differ, as methods of [`RuntimeKind`].

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use cellcheck_contract::{Capabilities, Capability, Termination};

/// The OCI runtimes this crate drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    Runc,
    Crun,
    Runsc,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
            RuntimeKind::Runsc => "runsc",
        }
    }

    /// The variable that overrides the binary, e.g. `CELLCHECK_RUNSC_BIN`.
    pub fn bin_env(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "CELLCHECK_RUNC_BIN",
            RuntimeKind::Crun => "CELLCHECK_CRUN_BIN",
            RuntimeKind::Runsc => "CELLCHECK_RUNSC_BIN",
        }
    }

    /// Whether the pid in a `create --pid-file` is the workload (runc, crun: the container's init
    /// execs it) rather than a sandbox around it (runsc: the workload runs in gVisor's sentry).
    pub fn workload_is_host_process(self) -> bool {
        match self {
            RuntimeKind::Runc | RuntimeKind::Crun => true,
            RuntimeKind::Runsc => false,
        }
    }

    /// Whether the runtime refuses a hybrid cgroup host outright (crun: "cgroups in hybrid mode
    /// not supported", with its cgroup manager disabled too); it then runs without the cgroup2
    /// mount, see [`Runtime::unmount`].
    pub fn refuses_hybrid_cgroups(self) -> bool {
        match self {
            RuntimeKind::Crun => true,
            RuntimeKind::Runc | RuntimeKind::Runsc => false,
        }
    }

    /// What the backend offers through this runtime (probes CRIU where checkpointing needs it).
    pub fn capabilities(self) -> Capabilities {
        let base = Capabilities::default()
            .with(Capability::Exec)
            .with(Capability::Pause)
            .with(Capability::Timeout)
            .with(Capability::Ttl)
            .with(Capability::NetworkIsolation)
            .with(Capability::PidIsolation)
            .with(Capability::Hostname)
            // All from the bundle: no capabilities, noNewPrivileges, the default seccomp
            // profile, a read-only root, masked/read-only paths, a tmpfs /dev with the standard
            // nodes, a cgroup namespace and RLIMIT_NOFILE as declared.
            .with(Capability::DropCapabilities)
            .with(Capability::NoNewPrivs)
            .with(Capability::Seccomp)
            .with(Capability::ReadonlyRoot)
            .with(Capability::ProcMasking)
            .with(Capability::MinimalDev)
            .with(Capability::CgroupIsolation)
            .with(Capability::Rlimits)
            .with(Capability::CpuLimit)
            .without(
                Capability::VmmConfinement,
                "no VMM process: runc and crun cells run on the host kernel, runsc's sentry is checked from inside by the hardening family",
            );
        match self {
            RuntimeKind::Runc | RuntimeKind::Crun => base
                .with(Capability::HostPid)
                .with(Capability::MemoryLimit)
                .with(Capability::PidsLimit)
                .without(Capability::Snapshot, crate::probe::criu_reason(self)),
            RuntimeKind::Runsc => base
                .with(Capability::Snapshot)
                .without(
                    Capability::HostPid,
                    "the workload runs inside gVisor's sentry; host pids are the sandbox and gofer, not the workload",
                )
                .without(
                    Capability::MemoryLimit,
                    "runsc applies memory limits to the whole sandbox's host cgroup (sentry included), not to the workload",
                )
                .without(
                    Capability::PidsLimit,
                    "the workload's tasks live in gVisor's sentry, not on the host; runsc would apply pidsMax to the sandbox's host cgroup (the sentry's and gofer's threads), so the backend does not pass it",
                ),
        }
    }

    /// runsc's platform: `CELLCHECK_RUNSC_PLATFORM`, else systrap where this runsc knows it, else
    /// ptrace (KVM needs working nested virtualization, which a CI runner rarely has). Other
    /// runtimes have none.
    pub fn platform(self, bin: &Path) -> Option<String> {
        if self != RuntimeKind::Runsc {
            return None;
        }
        if let Ok(p) = std::env::var("CELLCHECK_RUNSC_PLATFORM") {
            return Some(p);
        }
        let help = std::process::Command::new(bin)
            .arg("flags")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default();
        Some(
            if help.contains("systrap") {
                "systrap"
            } else {
                "ptrace"
            }
            .into(),
        )
    }

    /// Flags every command gets besides `--root` (runsc re-reads its flags per command, so
    /// `--network=none` must be repeated, not only given to `create`).
    fn extra_global_args(self, platform: Option<&str>) -> Vec<OsString> {
        match self {
            // runsc ignores the bundle's seccomp profile unless told to load it in the sandbox.
            RuntimeKind::Runsc => ["--network=none", "--oci-seccomp"]
                .into_iter()
                .map(String::from)
                .chain(platform.map(|p| format!("--platform={p}")))
                .map(OsString::from)
                .collect(),
            RuntimeKind::Runc | RuntimeKind::Crun => Vec::new(),
        }
    }

    /// Flags for `create`/`restore` so the runtime's errors (runc: `log`) and the workload's exit
    /// (runsc: the sandbox's boot log under `bundle/logs/`) can be read afterwards. crun prints
    /// its errors to the stderr it shares with the workload.
    pub fn create_log_args(self, bundle: &Path, log: &Path) -> std::io::Result<Vec<OsString>> {
        Ok(match self {
            RuntimeKind::Runsc => {
                let logs = bundle.join("logs");
                crate::layout::mkdir_private(&logs)?;
                vec![
                    format!("--debug-log={}/", logs.display()).into(),
                    "--debug-command=boot".into(),
                ]
            }
            RuntimeKind::Runc => vec!["--log".into(), log.into()],
            RuntimeKind::Crun => Vec::new(),
        })
    }

    /// Flags for `exec` so its errors (runc) or the exec'd process's wait status (runsc:
    /// [`parse_runsc_exit_log`]) land in `log`; crun prints its errors to stderr.
    pub fn exec_log_args(self, log: &Path) -> Vec<OsString> {
        match self {
            RuntimeKind::Runc => vec!["--log".into(), log.into()],
            RuntimeKind::Runsc => vec![
                format!("--debug-log={}", log.display()).into(),
                "--debug-command=exec".into(),
            ],
            RuntimeKind::Crun => Vec::new(),
        }
    }

    /// What the runtime keeps for container `rid` under its `--root` (`state`).
    pub fn state_entries(self, state: &Path, rid: &str) -> Vec<PathBuf> {
        match self {
            RuntimeKind::Runsc => vec![
                state.join(format!("{rid}_sandbox:{rid}.state")),
                state.join(format!("{rid}_sandbox:{rid}.lock")),
            ],
            RuntimeKind::Runc | RuntimeKind::Crun => vec![state.join(rid)],
        }
    }

    /// How the workload ended, from the wait status of the pid-file's process (`None`: the shim
    /// ended without one) and the bundle dir.
    pub fn termination(self, status: Option<i32>, bundle: &Path) -> Option<Termination> {
        match self {
            RuntimeKind::Runc | RuntimeKind::Crun => status.map(termination),
            RuntimeKind::Runsc => {
                // The pid is the sandbox, which exits once its workload has. Its boot log says
                // exactly how the workload ended; `runsc wait` would answer with a folded `128+N`
                // code (exit 7 read as a wait status is signal 7; 129..=192 are ambiguous).
                if let Some(t) = read_boot_log(&bundle.join("logs")) {
                    return Some(t);
                }
                // No log line (the sandbox itself was killed): the sandbox's own status, which
                // folds the workload's signal into its exit code.
                status.map(|st| {
                    if libc::WIFEXITED(st) {
                        termination_from_folded_code(libc::WEXITSTATUS(st))
                    } else {
                        termination(st)
                    }
                })
            }
        }
    }

    /// How `exec` runs a process and learns its status.
    pub fn exec_style(self) -> ExecStyle {
        match self {
            RuntimeKind::Runc | RuntimeKind::Crun => ExecStyle::DetachedUnderShim,
            RuntimeKind::Runsc => ExecStyle::Attached,
        }
    }
}

/// How a runtime's `exec` is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStyle {
    /// `exec --detach` under a shim, which reports the process's raw wait status.
    DetachedUnderShim,
    /// `exec` in the foreground; its exit code folds a signal into `128+N`, its log does not.
    Attached,
}

/// The boot log's verdict, from the sandbox's debug log dir.
fn read_boot_log(dir: &Path) -> Option<Termination> {
    let rd = fs::read_dir(dir).ok()?;
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("boot"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .find_map(|t| parse_runsc_boot_log(&t))
}

/// Resolve a binary: the override if set, else the first `name` on `PATH`.
pub fn find_binary(kind: RuntimeKind) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(kind.bin_env()) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(kind.name());
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(format!(
        "{}: not found on PATH (set {} to its path)",
        kind.name(),
        kind.bin_env()
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// One runtime binary with its own state root.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub kind: RuntimeKind,
    pub bin: PathBuf,
    /// Passed as `--root`; never the runtime's global default.
    pub state: PathBuf,
    /// runsc only: `--platform`.
    pub platform: Option<String>,
    /// A mount every command of this runtime runs without, in a private mount namespace: crun
    /// refuses a hybrid cgroup host (a cgroup2 mount with controllers beside the v1 ones) even
    /// with its cgroup manager disabled; without the cgroup2 mount it sees a v1 host and manages
    /// the cell's v1 cgroups like runc does. `None` elsewhere.
    pub unmount: Option<PathBuf>,
}

/// What a short runtime command returned.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub ok: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// The runtime's own message, for errors.
    pub fn message(&self, kind: RuntimeKind) -> String {
        let m = runtime_message(&self.stderr);
        if m.is_empty() {
            format!("{} exited {}", kind.name(), self.status)
        } else {
            m
        }
    }
}

impl Runtime {
    /// Global flags every command of this runtime gets.
    pub fn global_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--root".into(), self.state.clone().into()];
        a.extend(self.kind.extra_global_args(self.platform.as_deref()));
        a
    }

    /// Full argv (binary first) for `args`.
    pub fn argv(&self, args: &[OsString]) -> Vec<OsString> {
        let mut v = vec![self.bin.clone().into_os_string()];
        v.extend(self.global_args());
        v.extend(args.iter().cloned());
        v
    }

    /// Run a short command that starts nothing detached (state, start, kill, delete, pause, ...),
    /// with its output piped back.
    pub async fn run(&self, args: &[&str]) -> RunOutput {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        self.run_os(&args).await
    }

    /// A command for `args`, in the runtime's private mount namespace where it needs one.
    pub fn command(&self, args: &[OsString]) -> std::process::Command {
        let argv = self.argv(args);
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if let Some(path) = &self.unmount {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::process::CommandExt;
            let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
            // SAFETY: the closure only makes syscalls on memory prepared before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if crate::shim::private_unmount(path.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    pub async fn run_os(&self, args: &[OsString]) -> RunOutput {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = match cmd.output().await {
            Ok(o) => RunOutput {
                ok: o.status.success(),
                status: o.status.to_string(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            Err(e) => RunOutput {
                ok: false,
                status: "not run".into(),
                stdout: String::new(),
                stderr: format!("{}: {e}", self.bin.display()),
            },
        };
        // The command without the binary and global flags, which every command repeats.
        let cmd: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        if out.ok {
            tracing::debug!(cmd = %cmd.join(" "), status = %out.status, "runtime command");
        } else {
            tracing::debug!(
                cmd = %cmd.join(" "),
                status = %out.status,
                message = %out.message(self.kind),
                "runtime command failed"
            );
        }
        out
    }
}

/// The meaningful part of a runtime's stderr: runc's logrus `msg="..."` fields, else the last
/// non-empty lines as they are (crun and runsc print plain text).
pub fn runtime_message(stderr: &str) -> String {
    let mut msgs = Vec::new();
    for line in stderr.lines() {
        if let Some(i) = line.find("msg=\"") {
            let rest = &line[i + 5..];
            let mut out = String::new();
            let mut chars = rest.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => break,
                    c => out.push(c),
                }
            }
            msgs.push(out);
        }
    }
    if !msgs.is_empty() {
        return msgs.join("; ");
    }
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(2)..].join("; ")
}

/// Whether a runtime's message says the program `argv0` is missing or not executable.
///
/// runc: `exec: "/x": stat /x: no such file or directory` (or `executable file not found`);
/// crun: `executable file `/x` not found`; runsc (at start): `failed to load /x: no such file`.
pub fn is_missing_program(msg: &str, argv0: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    let names_it = msg.contains(&format!("\"{argv0}\""))
        || msg.contains(&format!("`{argv0}`"))
        || msg.contains(&format!("load {argv0}:"))
        || msg.contains(&format!("stat {argv0}:"));
    names_it
        && (m.contains("no such file or directory")
            || m.contains("executable file not found")
            || m.contains("not found")
            || m.contains("permission denied")
            || m.contains("exec format error"))
}

/// Whether a runtime's message says the working directory `cwd` is missing from the root.
///
/// `chdir to cwd ("/x") set in config.json failed: no such file or directory`, from runc and crun
/// releases that did not yet create a missing cwd; runc, crun (since 2022) and runsc create it
/// instead of failing, which the suite shows as their known failure.
pub fn is_missing_cwd(msg: &str, cwd: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    msg.contains(&format!("chdir to cwd (\"{cwd}\")"))
        && (m.contains("no such file or directory") || m.contains("not a directory"))
}

/// A raw `waitpid` status as a [`Termination`].
pub fn termination(status: i32) -> Termination {
    if libc::WIFSIGNALED(status) {
        Termination::Signaled {
            signal: libc::WTERMSIG(status),
        }
    } else {
        Termination::Exited {
            code: libc::WEXITSTATUS(status),
        }
    }
}

/// An exit code from a runtime that folds a signal into `128 + N` (runsc's sandbox process, when
/// its boot log has no verdict). Exit codes 129..=192 of a program are indistinguishable from a signal there.
pub fn termination_from_folded_code(code: i32) -> Termination {
    if (129..=128 + 64).contains(&code) {
        Termination::Signaled { signal: code - 128 }
    } else {
        Termination::Exited { code }
    }
}

/// The raw wait status a runsc command logs as it ends (`Exiting with status: N`, the last such
/// line): for `runsc exec`, the exec'd process's, whose signal its exit code folds into `128+N`.
pub fn parse_runsc_exit_log(log: &str) -> Option<Termination> {
    let status = log
        .lines()
        .rev()
        .find_map(|l| l.split("Exiting with status: ").nth(1))?;
    status
        .trim()
        .parse::<u32>()
        .ok()
        .map(|st| termination(st as i32))
}

/// The sandbox's boot log line `application exiting with exit status N` / `killed by signal N`.
pub fn parse_runsc_boot_log(log: &str) -> Option<Termination> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("application exiting with"))?;
    let tail = line.split("application exiting with").nth(1)?.trim();
    let num = |p: &str| {
        tail.strip_prefix(p)
            .and_then(|n| n.trim().parse::<i32>().ok())
    };
    if let Some(code) = num("exit status") {
        Some(Termination::Exited { code })
    } else {
        num("killed by signal").map(|signal| Termination::Signaled { signal })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_logrus_message_is_extracted() {
        let e = r#"time="2026-11-23T12:19:02Z" level=error msg="runc create failed: unable to start container process: exec: \"/bin/nope\": stat /bin/nope: no such file or directory""#;
        let m = runtime_message(e);
        assert_eq!(
            m,
            r#"runc create failed: unable to start container process: exec: "/bin/nope": stat /bin/nope: no such file or directory"#
        );
        assert!(is_missing_program(&m, "/bin/nope"));
        assert!(!is_missing_program(&m, "/bin/sh"));
    }

    #[test]
    fn runsc_and_crun_missing_program_messages() {
        let runsc = "starting container: starting root container: starting sandbox: creating process: failed to load /bin/nope: no such file or directory";
        assert!(is_missing_program(&runtime_message(runsc), "/bin/nope"));
        let crun =
            "crun: executable file `/bin/nope` not found in $PATH: No such file or directory";
        assert!(is_missing_program(crun, "/bin/nope"));
        let cwd = r#"chdir to cwd ("/nope") set in config.json failed: no such file or directory"#;
        assert!(!is_missing_program(cwd, "/bin/true"));
        assert!(is_missing_cwd(cwd, "/nope"));
        assert!(!is_missing_cwd(cwd, "/no"));
        assert!(!is_missing_cwd(crun, "/bin/nope"));
    }

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(termination(3 << 8), Termination::Exited { code: 3 });
        assert_eq!(termination(9), Termination::Signaled { signal: 9 });
        assert_eq!(
            termination_from_folded_code(137),
            Termination::Signaled { signal: 9 }
        );
        assert_eq!(
            termination_from_folded_code(3),
            Termination::Exited { code: 3 }
        );
        let log = "I1123 12:20:23.583087    9103 boot.go:389] application exiting with killed by signal 9\n";
        assert_eq!(
            parse_runsc_boot_log(log),
            Some(Termination::Signaled { signal: 9 })
        );
        let log =
            "x\nI1123 12:22:57.648040   15617 boot.go:389] application exiting with exit status 3";
        assert_eq!(
            parse_runsc_boot_log(log),
            Some(Termination::Exited { code: 3 })
        );
        assert_eq!(parse_runsc_boot_log("nothing"), None);
    }

    #[test]
    fn runsc_exec_log_gives_the_exact_wait_status() {
        // Lines as `runsc exec` logged them: a real exit 143, exit 7, death by SIGTERM.
        let line = |st: u32| {
            format!("I1206 16:11:16.987293   16337 main.go:266] Exiting with status: {st}\n")
        };
        assert_eq!(
            parse_runsc_exit_log(&format!("I1206 x.go:1] Execute\n{}", line(36608))),
            Some(Termination::Exited { code: 143 })
        );
        assert_eq!(
            parse_runsc_exit_log(&line(1792)),
            Some(Termination::Exited { code: 7 })
        );
        assert_eq!(
            parse_runsc_exit_log(&line(15)),
            Some(Termination::Signaled { signal: 15 })
        );
        assert_eq!(parse_runsc_exit_log("I1206 x.go:1] Execute\n"), None);
    }

    #[test]
    fn runsc_repeats_its_global_flags() {
        let rt = Runtime {
            kind: RuntimeKind::Runsc,
            bin: "/usr/bin/runsc".into(),
            state: "/run/x/state".into(),
            platform: Some("ptrace".into()),
            unmount: None,
        };
        let argv = rt.argv(&["start".into(), "id".into()]);
        let s: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            s,
            [
                "/usr/bin/runsc",
                "--root",
                "/run/x/state",
                "--network=none",
                "--oci-seccomp",
                "--platform=ptrace",
                "start",
                "id"
            ]
        );
    }
}
