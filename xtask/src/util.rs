//! Small shared helpers: where things are, today's date, running a command with a bound.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (xtask lives one level below it).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// `<target>/conformance`, where every report lands.
pub fn out_dir() -> PathBuf {
    cellcheck_fixtures::target_dir().join("conformance")
}

/// What a bounded command did.
#[derive(Debug)]
pub struct Ran {
    /// `None` when it was killed at the bound or could not start.
    pub code: Option<i32>,
    pub output: String,
    pub elapsed: Duration,
    pub error: Option<String>,
}

impl Ran {
    /// The last non-empty line of the output, for one-line evidence.
    pub fn last_line(&self) -> &str {
        self.output
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
    }
}

/// Runs `cmd` with output captured into a temporary file (never a pipe, so a daemonizing child
/// cannot keep us waiting for EOF) and kills it, by its own pid, after `bound`.
pub fn run_bounded(cmd: &mut Command, bound: Duration) -> Ran {
    let start = Instant::now();
    let file = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => return failed(start, format!("temp file: {e}")),
    };
    let (out, err) = match (file.try_clone(), file.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return failed(start, "dup of temp file failed".into()),
    };
    let mut child = match cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn() {
        Ok(c) => c,
        Err(e) => return failed(start, e.to_string()),
    };
    let code = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st.code().or(Some(-1)),
            Ok(None) if start.elapsed() >= bound => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return failed(start, e.to_string()),
        }
    };
    use std::io::{Read, Seek};
    let mut file = file;
    let mut output = String::new();
    let _ = file.rewind();
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    output.push_str(&String::from_utf8_lossy(&bytes));
    let error = code
        .is_none()
        .then(|| format!("killed after {} s", bound.as_secs()));
    Ran {
        code,
        output,
        elapsed: start.elapsed(),
        error,
    }
}

fn failed(start: Instant, error: String) -> Ran {
    Ran {
        code: None,
        output: String::new(),
        elapsed: start.elapsed(),
        error: Some(error),
    }
}

/// A result for tests, from its trial id.
#[cfg(test)]
pub fn sample(
    id: &str,
    outcome: cellcheck_conformance::results::Outcome,
    reason: &str,
    ms: u64,
) -> cellcheck_conformance::results::TrialResult {
    let mut r = cellcheck_conformance::results::synthetic(id, outcome, reason);
    r.duration_ms = ms;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_command_is_killed_at_its_bound() {
        let r = run_bounded(Command::new("sleep").arg("5"), Duration::from_millis(200));
        assert_eq!(r.code, None);
        assert!(r.elapsed < Duration::from_secs(3));
        let r = run_bounded(
            Command::new("sh").args(["-c", "echo one; echo two >&2; exit 3"]),
            Duration::from_secs(5),
        );
        assert_eq!(r.code, Some(3));
        assert!(r.output.contains("one") && r.output.contains("two"));
        assert_eq!(r.last_line(), "two");
    }
}
