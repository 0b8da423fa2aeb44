//! Pausing a runc cell on a cgroup v1 host through its freezer cgroup.
//!
//! `runc pause` (1.1) on v1 writes `FROZEN` and reads `freezer.state` back about 1,000 times,
//! thawing and sleeping 10 ms every 50 tries, then gives up with "unable to freeze" after roughly
//! 250 ms. A freeze completes only once every task of the cgroup has been scheduled, so on a
//! loaded host a cell that is doing nothing unusual fails to pause. The kernel's v1 freezer
//! finishes a freeze by itself once started; here the backend starts it and waits for the state to
//! read `FROZEN`, bounded like the host backend's freeze. runc reads the paused state from the same
//! file, so `runc state`, `runc resume` and `runc delete` treat the cell as paused.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use procfs::process::Process;

/// How long a started freeze may take before the cell is thawed again and pause fails.
const FREEZE_BOUND: Duration = Duration::from_secs(5);

/// The `freezer.state` file of the v1 freezer cgroup holding `pid`, if the host has one and it is
/// the cell's own cgroup (named after the runtime's id `rid`: a pid reused after the workload
/// ended must not lead to someone else's cgroup).
pub(crate) fn v1_state_file(pid: u32, rid: &str) -> Option<PathBuf> {
    let cgroups = Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .cgroups()
        .ok()?;
    let rel = cgroups
        .into_iter()
        .find(|g| g.controllers.iter().any(|c| c == "freezer"))?
        .pathname;
    if Path::new(&rel).file_name()? != rid {
        return None;
    }
    let mount = Process::myself()
        .ok()?
        .mountinfo()
        .ok()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup" && m.super_options.contains_key("freezer"))?;
    let inner = Path::new(&rel).strip_prefix(&mount.root).ok()?;
    let file = mount.mount_point.join(inner).join("freezer.state");
    file.is_file().then_some(file)
}

/// Start the freeze and wait until the kernel says it is done; thaw again if it is not within
/// [`FREEZE_BOUND`], so a failed pause leaves the cell running.
pub(crate) async fn freeze(state: &Path) -> Result<(), String> {
    let start = Instant::now();
    fs::write(state, "FROZEN").map_err(|e| format!("{}: {e}", state.display()))?;
    loop {
        let now = fs::read_to_string(state).map_err(|e| format!("{}: {e}", state.display()))?;
        if now.trim() == "FROZEN" {
            tracing::debug!(
                after_ms = start.elapsed().as_millis() as u64,
                "freezer state reached"
            );
            return Ok(());
        }
        if start.elapsed() > FREEZE_BOUND {
            let _ = fs::write(state, "THAWED");
            return Err(format!(
                "the cell did not freeze within {} s ({} stayed {})",
                FREEZE_BOUND.as_secs(),
                state.display(),
                now.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
