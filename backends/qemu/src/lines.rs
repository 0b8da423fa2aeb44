//! A line channel to QEMU (QMP or the guest agent) over the host end of a socketpair: bounded
//! reads that lose nothing on a timeout, and a line with an fd attached for QMP's `getfd`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A line channel with a persistent buffer, so a timed-out read loses nothing.
pub(crate) struct Lines {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl Lines {
    pub(crate) fn new(s: StdUnixStream) -> std::io::Result<Self> {
        s.set_nonblocking(true)?;
        let (r, w) = UnixStream::from_std(s)?.into_split();
        Ok(Lines {
            r: BufReader::new(r),
            w,
            buf: Vec::new(),
        })
    }

    pub(crate) async fn send(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.w.write_all(line).await?;
        self.w.write_all(b"\n").await
    }

    /// One line with `fd` attached (SCM_RIGHTS): how QMP's `getfd` receives a file.
    pub(crate) async fn send_with_fd(&mut self, line: &[u8], fd: i32) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let mut msg = line.to_vec();
        msg.push(b'\n');
        let sock: &UnixStream = self.w.as_ref();
        let raw = sock.as_raw_fd();
        let sent = loop {
            sock.writable().await?;
            let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(&msg)];
                let fds = [fd];
                sendmsg::<()>(
                    raw,
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        // The fd went with the first byte; the rest (if any) is a plain write.
        self.w.write_all(&msg[sent..]).await
    }

    /// The next full line (without its newline), or an error at EOF, at the deadline, or past
    /// [`MAX_REPLY`]. The deadline bounds silence, not the whole line: each chunk that arrives
    /// moves it on by the time first given, so a long reply from a guest slowed down by a
    /// loaded host still arrives, while a guest that stops sending is still caught.
    pub(crate) async fn next(&mut self, deadline: Instant) -> Result<Vec<u8>, &'static str> {
        let quiet = deadline.saturating_duration_since(Instant::now());
        let mut deadline = deadline;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = match tokio::time::timeout(left, self.r.fill_buf()).await {
                Err(_) => return Err("timed out"),
                Ok(Err(_)) => return Err("channel closed (QEMU exited?)"),
                Ok(Ok([])) => return Err("channel closed (QEMU exited?)"),
                Ok(Ok(c)) => c,
            };
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            self.buf.extend_from_slice(&chunk[..take]);
            self.r.consume(take);
            if done {
                let mut line = std::mem::take(&mut self.buf);
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_REPLY {
                return Err("reply line longer than the limit (the guest is not ours to trust)");
            }
            deadline = Instant::now() + quiet;
        }
    }
}

/// Longest reply line taken from the guest: a wait's captures, base64-encoded, fit well within.
const MAX_REPLY: usize = 256 << 20;
