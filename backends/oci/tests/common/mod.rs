//! Shared helpers for the real-runtime tests: one backend per test, a skip with the preflight's
//! reason where the runtime cannot run here, and a residue check after every cell.
#![allow(dead_code)]

use std::fs;
use std::path::Path;

use cellcheck_contract::{Availability, Backend, CellDocument, Footprint, PROBE_PATH};
use cellcheck_oci::{OciBackend, OciConfig, RuntimeKind};

pub const PROBE: &str = PROBE_PATH;

/// A fresh backend, or `None` (after printing why) when the runtime is unavailable here.
pub async fn backend(kind: RuntimeKind) -> Option<OciBackend> {
    let fx = cellcheck_fixtures::ensure().expect("fixtures build");
    let b = OciBackend::new(kind, OciConfig::from_fixtures(&fx));
    match b.preflight().await {
        Availability::Available { evidence } => {
            eprintln!("{}: available: {evidence}", kind.name());
            Some(b)
        }
        Availability::Unavailable { reason } => {
            eprintln!("SKIPPED: {} unavailable: {reason}", kind.name());
            None
        }
    }
}

/// A unique cell id for this test.
pub fn id(tag: &str) -> String {
    format!("{tag}-{:06x}", rand_u32() & 0xff_ffff)
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    t ^ std::process::id().rotate_left(16)
}

pub fn doc(id: &str, argv: &[&str]) -> CellDocument {
    CellDocument::new(id, argv.iter().copied())
}

/// Every process whose cmdline mentions `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return hits;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if text.contains(marker) {
                hits.push(format!("{pid}: {text}"));
            }
        }
    }
    hits
}

/// Zombie children of this test process (the shim must reap everything it starts).
pub fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut z = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(stat) = fs::read_to_string(e.path().join("stat")) {
            let Some(rest) = stat.rsplit(')').next() else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() > 2 && f[0] == "Z" && f[1] == me {
                z.push(stat);
            }
        }
    }
    z
}

/// Assert nothing of cell `id` is left on the host.
pub fn assert_no_residue(b: &OciBackend, id: &str) {
    let fp: Footprint = b.footprint(id);
    for m in &fp.process_markers {
        let p = processes_with(m);
        assert!(p.is_empty(), "processes of {id} left: {p:?}");
    }
    for p in fp.paths.iter().chain(fp.cgroup_dirs.iter()) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for m in &fp.mount_markers {
        assert!(!mounts.contains(m.as_str()), "mount with {m} left");
    }
}

/// After the last cell: the instance's state root is gone, no zombies remain.
pub fn assert_clean_root(b: &OciBackend) {
    let root = b.state_root();
    assert!(
        !root.exists()
            || fs::read_dir(root)
                .map(|mut d| d.next().is_none())
                .unwrap_or(true),
        "state root {} not empty: {:?}",
        root.display(),
        list(root)
    );
    let z = zombie_children();
    assert!(z.is_empty(), "zombies: {z:?}");
}

fn list(p: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                v.push(e.path().display().to_string());
                stack.push(e.path());
            }
        }
    }
    v
}
