//! The wire protocol between a cellcheck microVM host and the guest agent (see `PROTOCOL.md`).
//!
//! One JSON object per line, in both directions. The host sends a [`Request`] carrying a `seq`;
//! the agent answers with exactly one [`Reply`] carrying the same `seq`. Replies that are not
//! answers (the boot-time `ready` marker, errors for frames whose `seq` could not be read) carry
//! `seq: 0`, which the host never uses for a request.
//!
//! Captured output is bytes, carried as standard base64 ([`b64_encode`], [`b64_decode`]).

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. A `hello` with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// The job id of the cell's workload (started by `run`); execs get 1, 2, ...
pub const WORKLOAD_JOB: u32 = 0;

/// Longest accepted request line; a longer one is answered with `bad_frame` and dropped.
pub const MAX_FRAME: usize = 1 << 20;

/// What the agent writes on the console once it serves requests (the boot benchmark's marker).
pub const CONSOLE_READY_MARKER: &str = "cellcheck-guest-agent: ready";

/// A declared env pair, kept in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvPair {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub seq: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Version handshake; answered with [`ReplyBody::Hello`].
    Hello { version: u32 },
    /// Start the cell's workload as job 0 (once per guest boot).
    Run {
        argv: Vec<String>,
        env: Vec<EnvPair>,
        cwd: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// Enforced with the guest's cgroup v2 `memory.max` on the cell's cgroup.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_max_bytes: Option<u64>,
        /// Enforced with the guest's cgroup v2 `pids.max` on the cell's cgroup.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pids_max: Option<u64>,
    },
    /// Start another command in the cell (same cgroup), as a new job; `invalid_state` once the
    /// workload has ended.
    Exec {
        argv: Vec<String>,
        env: Vec<EnvPair>,
        cwd: String,
    },
    /// Answer when `job` has ended, or with `running` after `timeout_ms`.
    Wait { job: u32, timeout_ms: u64 },
    /// Signal one job's process group, or (no job) every process of the cell.
    Kill {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<u32>,
        signal: i32,
    },
    /// Drop an ended job's record (its captured output).
    Forget { job: u32 },
    /// Set the guest's hostname (a restored cell takes its new id).
    Hostname { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub seq: u64,
    #[serde(flatten)]
    pub body: ReplyBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ReplyBody {
    /// Sent unasked (seq 0) when the agent starts serving.
    Ready {
        version: u32,
    },
    Hello {
        version: u32,
        agent: String,
    },
    Started {
        job: u32,
        pid: i32,
    },
    Running {
        job: u32,
    },
    Exited {
        job: u32,
        end: JobEnd,
        /// base64
        stdout: String,
        /// base64
        stderr: String,
    },
    Done,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobEnd {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    /// Killed by the OOM killer of the cell's cgroup (`memory.events` `oom_kill` rose).
    OutOfMemory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not a JSON request of this protocol (or too long).
    BadFrame,
    UnsupportedVersion,
    /// `argv[0]` does not exist or cannot be executed in the guest.
    ProgramNotFound,
    /// The working directory does not exist (or is not a directory) in the guest's root.
    WorkingDirectoryNotFound,
    NoSuchJob,
    /// E.g. a second `run`, or `forget` of a running job.
    InvalidState,
    /// Anything the guest kernel refused (errno text in the message).
    Io,
}

impl Reply {
    pub fn error(seq: u64, kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply {
            seq,
            body: ReplyBody::Error {
                kind,
                message: message.into(),
            },
        }
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decode standard base64 (padding required, no whitespace).
pub fn b64_decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    if bytes.len() & 3 != 0 {
        return Err(format!(
            "base64 length {} is not a multiple of 4",
            bytes.len()
        ));
    }
    let val = |c: u8| -> Result<u32, String> {
        match c {
            b'A'..=b'Z' => Ok(u32::from(c - b'A')),
            b'a'..=b'z' => Ok(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Ok(u32::from(c - b'0') + 52),
            b'+' => Ok(62),
            b'/' => Ok(63),
            _ => Err(format!("invalid base64 byte {c:#04x}")),
        }
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (qi, q) in bytes.chunks(4).enumerate() {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && qi + 1 != quads) {
            return Err("misplaced base64 padding".into());
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length_and_byte() {
        let data: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for n in 0..data.len() {
            let enc = b64_encode(&data[..n]);
            assert_eq!(enc.len() % 4, 0);
            assert_eq!(b64_decode(&enc).unwrap(), &data[..n], "length {n}");
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert!(b64_decode("Zm8").is_err());
        assert!(b64_decode("Zm=8").is_err());
        assert!(b64_decode("Z=8=AAAA").is_err());
        assert!(b64_decode("Zm9*").is_err());
    }

    #[test]
    fn requests_are_flat_tagged_lines() {
        let r = Request {
            seq: 7,
            op: Op::Kill {
                job: None,
                signal: 9,
            },
        };
        let t = serde_json::to_string(&r).unwrap();
        assert_eq!(t, r#"{"seq":7,"op":"kill","signal":9}"#);
        assert_eq!(serde_json::from_str::<Request>(&t).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"seq":1,"op":"nope"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"hello","version":1}"#).is_err());
    }

    #[test]
    fn replies_carry_seq_and_kind() {
        let r = Reply {
            seq: 3,
            body: ReplyBody::Exited {
                job: 0,
                end: JobEnd::Signaled { signal: 15 },
                stdout: b64_encode(b"hi\n"),
                stderr: String::new(),
            },
        };
        let t = serde_json::to_string(&r).unwrap();
        assert!(
            t.starts_with(
                r#"{"seq":3,"reply":"exited","job":0,"end":{"kind":"signaled","signal":15}"#
            ),
            "{t}"
        );
        assert_eq!(serde_json::from_str::<Reply>(&t).unwrap(), r);
        let e = Reply::error(0, ErrorKind::BadFrame, "x");
        let t = serde_json::to_string(&e).unwrap();
        assert_eq!(
            t,
            r#"{"seq":0,"reply":"error","kind":"bad_frame","message":"x"}"#
        );
    }
}
