//! Helpers shared by the host crate's unit and integration tests; public only so that both kinds
//! can reach them, not part of the backend's interface.

use std::process::{Command, Stdio};

/// Run the test `name` of the current test binary in `n` processes at once, each with `env` set,
/// and assert that each ran exactly that test and passed. nextest runs every trial in a process
/// of its own, so what backends share across processes (cgroup parents, the state base) is only
/// raced this way.
pub fn run_test_in_processes(name: &str, n: usize, env: (&str, &str)) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(env.0, env.1)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn the test binary")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait for the test binary");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{name}: {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
