//! A driver as a child process: stdin/stdout carry the protocol, stderr is its log.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellcheck_contract::CellError;

use crate::conn::{Conn, Peer, Tap};

const STDERR_TAIL_BYTES: usize = 2048;

/// The driver process we started, in its own process group (so its helpers go with it).
pub(crate) struct ChildPeer {
    pid: i32,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    stderr_tail: Arc<Mutex<VecDeque<u8>>>,
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("exited with signal {s}"),
        _ => format!("ended ({st})"),
    }
}

impl ChildPeer {
    fn tail(&self) -> String {
        let t = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = t.as_slices();
        let s = String::from_utf8_lossy(&[a, b].concat()).trim().to_string();
        if s.is_empty() {
            String::new()
        } else {
            format!("; its stderr ended with: {s:?}")
        }
    }

    fn poll(&self) -> Option<ExitStatus> {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if st.is_none() {
            if let Ok(Some(s)) = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_wait()
            {
                *st = Some(s);
            }
        }
        *st
    }
}

impl Peer for ChildPeer {
    fn kill(&self) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if st.is_some() {
            return;
        }
        // The group is ours while its leader is unreaped, so this reaches only what we started.
        // SAFETY: plain syscall on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
        }
        if let Ok(s) = self.child.lock().unwrap_or_else(|p| p.into_inner()).wait() {
            *st = Some(s);
        }
    }

    fn ended(&self, grace: Duration) -> Option<String> {
        let end = Instant::now() + grace;
        loop {
            if let Some(s) = self.poll() {
                // Give the stderr thread a moment to take the last words.
                std::thread::sleep(Duration::from_millis(20));
                return Some(format!("{}{}", describe(s), self.tail()));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Start `argv` and connect to it. Its stderr lines are forwarded to ours, prefixed with `name`.
pub(crate) fn spawn(name: &str, argv: &[String], tap: Option<Tap>) -> Result<Conn, CellError> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| CellError::invalid("driver", "empty driver command line"))?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| CellError::Unavailable {
            reason: format!("cannot start driver {prog:?}: {e}"),
        })?;
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_BYTES)));
    let t = tail.clone();
    let prefix = format!("[{name} driver] ");
    // Not joined: a helper the driver leaked may hold its stderr; this thread then just idles.
    let _ = std::thread::Builder::new()
        .name("cellcheck-remote-stderr".into())
        .spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let _ = std::io::stderr()
                    .lock()
                    .write_all(&[prefix.as_bytes(), &line].concat());
                let mut q = t.lock().unwrap_or_else(|p| p.into_inner());
                for b in &line {
                    if q.len() == STDERR_TAIL_BYTES {
                        q.pop_front();
                    }
                    q.push_back(*b);
                }
                line.clear();
            }
        });
    let pid = child.id() as i32;
    let peer = ChildPeer {
        pid,
        child: Mutex::new(child),
        status: Mutex::new(None),
        stderr_tail: tail,
    };
    Ok(Conn::start(
        format!("{name} driver (pid {pid})"),
        Box::new(stdout),
        Box::new(stdin),
        Box::new(peer),
        tap,
    ))
}
