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

/// How long a started freeze may take before the cell is thawed again and pause fails.
const FREEZE_BOUND: Duration = Duration::from_secs(5);

/// The `freezer.state` file of the v1 freezer cgroup holding `pid`, if the host has one and it is
/// the cell's own cgroup (named after the runtime's id `rid`: a pid reused after the workload
/// ended must not lead to someone else's cgroup).
pub(crate) fn v1_state_file(pid: u32, rid: &str) -> Option<PathBuf> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let rel = freezer_path(&cgroups)?;
    if Path::new(rel).file_name()? != rid {
        return None;
    }
    let (root, mountpoint) = freezer_mount(&mountinfo)?;
    let inner = Path::new(rel).strip_prefix(root).ok()?;
    let file = Path::new(mountpoint).join(inner).join("freezer.state");
    file.is_file().then_some(file)
}

/// The cgroup path of the `freezer` controller in a `/proc/<pid>/cgroup` text (v1 lines are
/// `id:controllers:path`; the v2 line has no controllers).
fn freezer_path(cgroups: &str) -> Option<&str> {
    cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',').any(|c| c == "freezer").then_some(path)
    })
}

/// The root within the hierarchy and the mount point of a v1 cgroup mount with the freezer.
fn freezer_mount(mountinfo: &str) -> Option<(&str, &str)> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
        if fstype != "cgroup" || !opts.split(',').any(|o| o == "freezer") {
            return None;
        }
        let f: Vec<&str> = left.split(' ').collect();
        Some((*f.get(3)?, *f.get(4)?))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_freezer_line_and_mount() {
        let cgroups = "12:pids:/x\n7:freezer:/cc-abc\n1:name=systemd:/y\n0::/\n";
        assert_eq!(freezer_path(cgroups), Some("/cc-abc"));
        assert_eq!(freezer_path("0::/user.slice\n"), None);
        let mi = "30 25 0:26 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                  35 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid shared:15 - cgroup cgroup rw,freezer\n\
                  36 25 0:32 / /sys/fs/cgroup/cpu,cpuacct rw shared:16 - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(freezer_mount(mi), Some(("/", "/sys/fs/cgroup/freezer")));
        assert_eq!(
            freezer_mount("30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            None
        );
    }
}
