//! One protocol connection to a driver: a writer thread, a reader thread, and a table of requests
//! waiting for their answers. Plain threads (not tasks), so a connection works with or without a
//! tokio runtime and a blocking caller never starves the reader.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cellcheck_contract::CellError;
use serde_json::Value;

use crate::protocol::{Request, Response, MAX_LINE_BYTES, PROTOCOL_VERSION};

/// Which way a protocol line went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to driver (a request).
    ToDriver,
    /// Driver to client (a response, or whatever the driver wrote).
    FromDriver,
}

/// Sees every line exchanged (for transcripts and schema checks).
pub type Tap = Arc<dyn Fn(Direction, &str) + Send + Sync>;

/// The other end's process (or cell): how to stop it and how it ended.
pub trait Peer: Send + Sync {
    /// Stop it for good and reap it. Idempotent.
    fn kill(&self);
    /// Wait up to `grace` for it to end; describe how it ended ("exited with status 3", "was
    /// killed by signal 9"), or `None` if it is still running.
    fn ended(&self, grace: Duration) -> Option<String>;
}

type Outcome = Result<Value, CellError>;

/// Where one request's answer lands; both blocking and async waiters can wait on it.
struct Slot {
    value: Mutex<Option<Outcome>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
}

impl Slot {
    fn fill(&self, v: Outcome) {
        let mut g = self.value.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(v);
        }
        drop(g);
        self.cv.notify_all();
        self.notify.notify_one();
    }
    fn take(&self) -> Option<Outcome> {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

struct Pending {
    op: String,
    slot: Arc<Slot>,
}

struct Shared {
    label: String,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Why the connection is down, once it is.
    dead: Mutex<Option<String>>,
    peer: Box<dyn Peer>,
    tap: Option<Tap>,
}

impl Shared {
    fn is_dead(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Take the connection down: every waiting request fails naming `what` and its own operation.
    fn fail(&self, what: &str, kill: bool) {
        {
            let mut d = self.dead.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_none() {
                *d = Some(what.to_string());
            }
        }
        if kill {
            self.peer.kill();
        }
        let drained: Vec<(u64, Pending)> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (id, p) in drained {
            p.slot.fill(Err(CellError::failure(format!(
                "{}: {what} during {} (request {id})",
                self.label, p.op
            ))));
        }
    }
}

/// A live connection. Dropping it closes the driver's input and kills it if it does not end.
pub struct Conn {
    shared: Arc<Shared>,
    writer: Mutex<Option<mpsc::Sender<String>>>,
    next_id: AtomicU64,
}

/// A short, printable excerpt of a line a driver sent.
fn excerpt(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim_end();
    if s.chars().count() > 160 {
        format!("{:?}...", s.chars().take(160).collect::<String>())
    } else {
        format!("{s:?}")
    }
}

impl Conn {
    /// Start the reader and writer threads over `reader`/`writer` (the driver's stdout/stdin).
    pub fn start(
        label: String,
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        peer: Box<dyn Peer>,
        tap: Option<Tap>,
    ) -> Conn {
        let shared = Arc::new(Shared {
            label,
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            peer,
            tap,
        });
        let (tx, rx) = mpsc::channel::<String>();
        let sw = shared.clone();
        std::thread::Builder::new()
            .name("cellcheck-remote-writer".into())
            .spawn(move || writer_loop(sw, writer, rx))
            .expect("spawn writer thread");
        let sr = shared.clone();
        std::thread::Builder::new()
            .name("cellcheck-remote-reader".into())
            .spawn(move || reader_loop(sr, reader))
            .expect("spawn reader thread");
        Conn {
            shared,
            writer: Mutex::new(Some(tx)),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// Why the connection is down, if it is.
    pub fn dead(&self) -> Option<String> {
        self.shared.is_dead()
    }

    fn submit(
        &self,
        op: &str,
        params: Value,
        deadline: Duration,
    ) -> Result<(u64, Arc<Slot>), CellError> {
        if let Some(why) = self.shared.is_dead() {
            return Err(CellError::failure(format!(
                "{}: {why}; cannot send {op}",
                self.shared.label
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            v: PROTOCOL_VERSION,
            id,
            op: op.to_string(),
            params,
            deadline_ms: Some(deadline.as_millis() as u64),
        };
        let line = serde_json::to_string(&req)
            .map_err(|e| CellError::failure(format!("encode {op} request: {e}")))?;
        let slot = Arc::new(Slot {
            value: Mutex::new(None),
            cv: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        });
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Pending {
                    op: op.to_string(),
                    slot: slot.clone(),
                },
            );
        // The connection may have died between the check and the insert; fail rather than hang.
        if let Some(why) = self.shared.is_dead() {
            self.shared.fail(&why, false);
        }
        let sent = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|tx| tx.send(line).is_ok())
            .unwrap_or(false);
        if !sent {
            self.shared.fail("connection already closed", false);
        }
        Ok((id, slot))
    }

    fn timed_out(&self, op: &str, id: u64, deadline: Duration) -> CellError {
        let what = format!(
            "driver did not answer request {id} within {} ms; killed it",
            deadline.as_millis()
        );
        self.shared.fail(&what, true);
        CellError::failure(format!("{}: {what} during {op}", self.shared.label))
    }

    /// Send `op` and wait for its answer, at most `deadline` (then the driver is killed).
    pub async fn call(&self, op: &str, params: Value, deadline: Duration) -> Outcome {
        let (id, slot) = self.submit(op, params, deadline)?;
        // The request's name and number only: its parameters carry the document's env.
        tracing::debug!(driver = %self.shared.label, id, op, "driver request");
        let start = std::time::Instant::now();
        let end = tokio::time::Instant::now() + deadline;
        let answer = loop {
            if let Some(v) = slot.take() {
                break v;
            }
            if tokio::time::timeout_at(end, slot.notify.notified())
                .await
                .is_err()
            {
                break slot
                    .take()
                    .unwrap_or_else(|| Err(self.timed_out(op, id, deadline)));
            }
        };
        let ms = start.elapsed().as_millis() as u64;
        match &answer {
            Ok(_) => tracing::debug!(id, op, ms, "driver answered"),
            Err(e) => tracing::debug!(id, op, ms, error = %e, "driver answered with an error"),
        }
        answer
    }

    /// Like [`Conn::call`] for synchronous callers (never inside a current-thread runtime's only
    /// thread while that runtime must make progress: the answer comes from a plain thread, so
    /// blocking here is safe).
    pub fn call_blocking(&self, op: &str, params: Value, deadline: Duration) -> Outcome {
        let (id, slot) = self.submit(op, params, deadline)?;
        let end = Instant::now() + deadline;
        let mut g = slot.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = g.take() {
                return v;
            }
            let now = Instant::now();
            if now >= end {
                drop(g);
                return slot
                    .take()
                    .unwrap_or_else(|| Err(self.timed_out(op, id, deadline)));
            }
            g = slot
                .cv
                .wait_timeout(g, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Close the driver's input (its signal to clean up and exit), wait up to `grace` for it to
    /// end, then kill it. Returns how it ended.
    pub fn close(&self, grace: Duration) -> String {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let how = match self.shared.peer.ended(grace) {
            Some(h) => h,
            None => {
                self.shared.peer.kill();
                format!(
                    "did not exit within {} ms of closing its input; killed",
                    grace.as_millis()
                )
            }
        };
        self.shared
            .fail(&format!("connection closed (driver {how})"), false);
        how
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.shared.is_dead().is_none() {
            self.close(Duration::from_secs(10));
        } else {
            self.shared.peer.kill();
        }
    }
}

fn writer_loop(shared: Arc<Shared>, mut w: Box<dyn Write + Send>, rx: mpsc::Receiver<String>) {
    for line in rx {
        if let Some(tap) = &shared.tap {
            tap(Direction::ToDriver, &line);
        }
        let r = w
            .write_all(line.as_bytes())
            .and_then(|_| w.write_all(b"\n"))
            .and_then(|_| w.flush());
        if let Err(e) = r {
            // A peer that stopped reading has usually died; the reader reports how.
            if shared.is_dead().is_none() {
                let how = shared
                    .peer
                    .ended(Duration::from_millis(500))
                    .map(|h| format!("driver {h}"))
                    .unwrap_or_else(|| format!("writing to the driver failed: {e}"));
                shared.fail(&how, true);
            }
            return;
        }
    }
    // Channel closed: dropping `w` closes the driver's stdin.
}

fn reader_loop(shared: Arc<Shared>, r: Box<dyn Read + Send>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut r)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(n) => n,
            Err(e) => {
                shared.fail(&format!("reading from the driver failed: {e}"), true);
                return;
            }
        };
        if n == 0 {
            break;
        }
        if buf.len() > MAX_LINE_BYTES {
            shared.fail(
                &format!("driver sent a line longer than {MAX_LINE_BYTES} bytes"),
                true,
            );
            return;
        }
        if buf.last() != Some(&b'\n') {
            // A final line without newline: the driver is going away mid-message.
            shared.fail(
                &format!(
                    "driver sent an unterminated line {} and closed its output",
                    excerpt(&buf)
                ),
                true,
            );
            return;
        }
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t.trim_end_matches(['\n', '\r']),
            Err(_) => {
                shared.fail(
                    &format!("driver sent a non-UTF-8 line {}", excerpt(&buf)),
                    true,
                );
                return;
            }
        };
        if let Some(tap) = &shared.tap {
            tap(Direction::FromDriver, text);
        }
        let resp: Response = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                shared.fail(
                    &format!("driver sent a malformed line {} ({e})", excerpt(&buf)),
                    true,
                );
                return;
            }
        };
        let id = resp.id;
        let outcome = match resp.outcome() {
            Ok(o) => o,
            Err(why) => {
                shared.fail(
                    &format!("driver sent a malformed response to request {id}: {why}"),
                    true,
                );
                return;
            }
        };
        let pending = shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match pending {
            Some(p) => p.slot.fill(outcome),
            None => {
                shared.fail(
                    &format!("driver answered request {id}, which is not waiting for an answer"),
                    true,
                );
                return;
            }
        }
    }
    // EOF: the driver closed its output. Say how it ended, if it did.
    let how = match shared.peer.ended(Duration::from_secs(2)) {
        Some(h) => format!("driver {h}"),
        None => "driver closed its output but kept running; killed it".to_string(),
    };
    shared.fail(&how, true);
}
