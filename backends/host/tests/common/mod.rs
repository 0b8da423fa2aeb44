//! What every host test file shares: the backend, documents, and the check that nothing of a
//! cell is left on the host.
// Each test binary uses a part of these.
#![allow(dead_code)]

use cellcheck_contract::{Backend, CellDocument, Footprint, PROBE_PATH};
use cellcheck_host::{HostBackend, HostConfig};

/// The backend, or `None` (with the reason printed) where these tests cannot run.
pub fn backend() -> Option<HostBackend> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the host backend needs root");
        return None;
    }
    let fx = cellcheck_fixtures::ensure().expect("fixtures");
    Some(HostBackend::new(HostConfig::from_fixtures(&fx)))
}

pub fn probe(args: &[&str]) -> CellDocument {
    probe_id(&format!("t{:08x}", rand::random::<u32>()), args)
}

pub fn probe_id(id: &str, args: &[&str]) -> CellDocument {
    let mut argv = vec![PROBE_PATH.to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    CellDocument::new(id, argv)
}

pub fn sh(script: &str) -> CellDocument {
    CellDocument::new(
        format!("s{:08x}", rand::random::<u32>()),
        ["/bin/sh", "-c", script],
    )
}

pub fn processes_with(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        for f in ["cmdline", "environ"] {
            if let Ok(b) = std::fs::read(e.path().join(f)) {
                if b.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                    out.push(pid);
                    break;
                }
            }
        }
    }
    out
}

/// Nothing of the cell is left on the host.
pub fn assert_clean(fp: &Footprint) {
    for d in &fp.cgroup_dirs {
        assert!(!d.exists(), "cgroup dir left: {}", d.display());
    }
    for p in &fp.paths {
        assert!(!p.exists(), "path left: {}", p.display());
    }
    for m in &fp.process_markers {
        assert_eq!(processes_with(m), Vec::<u32>::new(), "processes with {m}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for m in &fp.mount_markers {
        assert!(!mounts.contains(m.as_str()), "mount with {m} left");
    }
}

pub async fn finish(b: &HostBackend, id: &str) {
    let fp = b.footprint(id);
    b.destroy(id).await.expect("destroy");
    assert_clean(&fp);
    if b.list().await.is_empty() {
        assert!(!b.config().state_root.exists(), "state root left");
    }
}
