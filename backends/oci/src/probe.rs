//! What the host offers a runtime (binary, version, platform, cgroup hierarchies, CRIU), probed
//! once at construction, and the preflight that proves a trivial bundle runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cellcheck_contract::{Availability, Capabilities, CellDocument, CellError, Termination};

use crate::runtime::{self, RuntimeKind};
use crate::Inner;

/// The host facts a backend instance is built from.
pub(crate) struct HostFacts {
    pub bin: Result<PathBuf, String>,
    /// First line of `<runtime> --version` (empty when it could not be run).
    pub version: String,
    pub platform: Option<String>,
    pub hierarchies: Vec<PathBuf>,
    /// See [`crate::runtime::Runtime::unmount`].
    pub unmount: Option<PathBuf>,
    pub caps: Capabilities,
}

impl HostFacts {
    pub fn probe(kind: RuntimeKind, bin: Option<PathBuf>) -> Self {
        let bin = bin.map(Ok).unwrap_or_else(|| runtime::find_binary(kind));
        let version = bin
            .as_ref()
            .ok()
            .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
            .map(|o| first_line(&o.stdout))
            .unwrap_or_default();
        let platform = bin.as_ref().ok().and_then(|b| kind.platform(b));
        HostFacts {
            bin,
            version,
            platform,
            hierarchies: cgroup_hierarchies(),
            unmount: hybrid_cgroup2().filter(|_| kind.refuses_hybrid_cgroups()),
            caps: kind.capabilities(),
        }
    }
}

fn first_line(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Why runc/crun checkpointing is off: CRIU's own verdict, computed once.
pub(crate) fn criu_reason(kind: RuntimeKind) -> String {
    let out = std::process::Command::new("criu").arg("check").output();
    match out {
        Err(e) => format!("checkpoint needs CRIU: criu: {e}"),
        Ok(o) if o.status.success() => format!(
            "criu check passes, but checkpoint/restore through {} is not implemented by this backend",
            kind.name()
        ),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            let last = text
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("failed")
                .to_string();
            format!("criu check fails on this host: {last}")
        }
    }
}

/// Mounted cgroup hierarchies: the v2 root on a unified host, else every v1 (and hybrid v2) mount.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = fs::read_dir(base)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The cgroup2 mount of a hybrid host: v1 hierarchies under `/sys/fs/cgroup` and a cgroup2 mount
/// beside them that has controllers of its own (an empty one is no hybrid to crun).
fn hybrid_cgroup2() -> Option<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return None;
    }
    let unified = base.join("unified");
    let controllers = fs::read_to_string(unified.join("cgroup.controllers")).ok()?;
    (!controllers.trim().is_empty()).then_some(unified)
}

impl Inner {
    /// The runtime answers `--version` and runs a trivial bundle to exit 0 through this backend.
    pub(crate) async fn preflight(self: &Arc<Self>) -> Availability {
        let unavailable = |reason: String| Availability::Unavailable { reason };
        let rt = match self.rt() {
            Ok(rt) => rt,
            Err(e) => return unavailable(e.to_string()),
        };
        let version = match tokio::process::Command::new(&rt.bin)
            .arg("--version")
            .output()
            .await
        {
            Ok(o) if o.status.success() => first_line(&o.stdout),
            Ok(o) => {
                return unavailable(format!(
                    "{} --version failed: {}",
                    rt.bin.display(),
                    runtime::runtime_message(&String::from_utf8_lossy(&o.stderr))
                ))
            }
            Err(e) => return unavailable(format!("{}: {e}", rt.bin.display())),
        };
        let id = format!("preflight-{:08x}", rand::random::<u32>());
        let doc = CellDocument::new(id.clone(), ["/bin/true"]).with_timeout_ms(60_000);
        let t0 = Instant::now();
        let res = async {
            self.create(&doc).await?;
            let r = self.wait_outcome(&id).await;
            let d = self.destroy(&id, None).await;
            let r = r?;
            d?;
            Ok::<_, CellError>(r)
        }
        .await;
        let ms = t0.elapsed().as_millis();
        let platform = rt
            .platform
            .as_ref()
            .map(|p| format!(", platform {p}"))
            .unwrap_or_default();
        match res {
            Ok(r) if r.termination == (Termination::Exited { code: 0 }) => {
                Availability::Available {
                    evidence: format!(
                        "{version}{platform}: trivial bundle (/bin/true) exited 0 in {ms} ms"
                    ),
                }
            }
            Ok(r) => unavailable(format!(
                "{version}: trivial bundle ended {:?}: {}",
                r.termination,
                r.stderr_str().trim()
            )),
            Err(CellError::BackendFailure { reason, .. }) => unavailable(reason),
            Err(e) => unavailable(e.to_string()),
        }
    }
}
