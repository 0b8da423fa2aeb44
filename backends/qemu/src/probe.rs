//! The functional accelerator probe: boot the real guest to the agent, within a bound.
//!
//! Verdicts are cached in `<target>/cellcheck/qemu-accel-<kvm|tcg>.json` for [`CACHE_TTL`], so
//! the nextest process-per-trial model pays for a probe (a hanging KVM guest costs its whole
//! bound) once per few minutes, not once per trial. A verdict holds for the QEMU binary it was
//! made with: one installed, replaced or removed since is probed anew.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cellcheck_contract::{Availability, CellError};
use serde::{Deserialize, Serialize};

use crate::vm::{Vm, VmSpec};
use crate::{Accel, QemuConfig};

pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// A KVM guest that works boots in well under a second; one that hangs never does.
const KVM_BOUND: Duration = Duration::from_secs(15);

#[derive(Serialize, Deserialize)]
struct Cached {
    at_unix: u64,
    kernel: Option<PathBuf>,
    /// [`binary_id`] of the QEMU the verdict was made with.
    #[serde(default)]
    qemu: String,
    availability: Availability,
}

/// Where the configured QEMU binary is, if anywhere.
pub(crate) fn binary_path() -> Option<PathBuf> {
    let bin = crate::qemu_bin();
    if bin.components().count() > 1 {
        bin.exists().then_some(bin)
    } else {
        cellcheck_fixtures::host_tool(&bin.to_string_lossy())
    }
}

/// Where the configured QEMU binary is and which file it is (size, mtime), or `absent`.
fn binary_id() -> String {
    let id = binary_path().and_then(|p| {
        let m = fs::metadata(&p).ok()?;
        let t = m.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some(format!("{}:{}:{}", p.display(), m.len(), t.as_nanos()))
    });
    id.unwrap_or_else(|| "absent".into())
}

fn cache_path(a: Accel) -> PathBuf {
    cellcheck_fixtures::target_dir()
        .join("cellcheck")
        .join(format!("qemu-accel-{}.json", a.as_str()))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh cached verdict for `a`, if any.
pub(crate) fn cached(a: Accel) -> Option<Availability> {
    let c: Cached = serde_json::from_slice(&fs::read(cache_path(a)).ok()?).ok()?;
    (now_unix().saturating_sub(c.at_unix) < CACHE_TTL.as_secs() && c.qemu == binary_id())
        .then_some(c.availability)
}

fn store(a: Accel, kernel: Option<PathBuf>, availability: &Availability) {
    let p = cache_path(a);
    let Some(dir) = p.parent() else { return };
    let _ = fs::create_dir_all(dir);
    let tmp = p.with_extension(format!("{}.tmp", std::process::id()));
    let c = Cached {
        at_unix: now_unix(),
        kernel,
        qemu: binary_id(),
        availability: availability.clone(),
    };
    if let Ok(text) = serde_json::to_vec_pretty(&c) {
        if fs::write(&tmp, text).is_ok() {
            let _ = fs::rename(&tmp, &p);
        }
    }
}

/// Can QEMU with accelerator `a` boot the fixture guest to its agent on this host? Builds the
/// fixtures and guest artifacts if needed; answers from the cache when a verdict is fresh.
pub async fn probe_accelerator(a: Accel) -> Availability {
    if let Some(v) = cached(a) {
        return v;
    }
    let built = tokio::task::spawn_blocking(|| {
        cellcheck_fixtures::ensure()
            .map(|fx| QemuConfig::from_fixtures(&fx))
            .map_err(|e| e.to_string())
    })
    .await;
    match built {
        Ok(Ok(config)) => probe_with(&config, a).await,
        Ok(Err(e)) => Availability::Unavailable {
            reason: format!("{}: fixtures: {e}", a.as_str()),
        },
        Err(e) => Availability::Unavailable {
            reason: format!("{}: fixture build task: {e}", a.as_str()),
        },
    }
}

/// [`probe_accelerator`] for a given configuration (its QEMU binary and guest).
pub async fn probe_with(config: &QemuConfig, a: Accel) -> Availability {
    // A missing guest is this configuration's problem, not the host's: never from or to the cache.
    if let Err(e) = &config.guest {
        return Availability::Unavailable {
            reason: format!("{}: no guest: {e}", a.as_str()),
        };
    }
    if let Some(v) = cached(a) {
        return v;
    }
    let v = run_probe(config, a).await;
    store(a, config.guest.as_ref().ok().map(|g| g.kernel.clone()), &v);
    v
}

async fn run_probe(config: &QemuConfig, a: Accel) -> Availability {
    let name = a.as_str();
    let unavailable = |reason: String| Availability::Unavailable { reason };
    let version = match tokio::process::Command::new(&config.qemu_bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Ok(o) => {
            return unavailable(format!(
                "{name}: {} --version failed ({})",
                config.qemu_bin.display(),
                o.status
            ))
        }
        Err(e) => return unavailable(format!("{name}: {}: {e}", config.qemu_bin.display())),
    };
    if a == Accel::Kvm {
        if let Err(e) = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return unavailable(format!("kvm: /dev/kvm: {e}"));
        }
    }
    let guest = match &config.guest {
        Ok(g) => g.clone(),
        Err(e) => return unavailable(format!("{name}: no guest: {e}")),
    };
    let bound = match a {
        Accel::Kvm => KVM_BOUND,
        Accel::Tcg => config.boot_timeout,
    };
    let root = config.run_root.join(format!(
        "qemu-probe-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    // Removed however the probe ends, a caller's timeout dropping this future included.
    let _cleanup = RemoveOnDrop(root.clone());
    let dir = root.join(name);
    if let Err(e) = fs::create_dir_all(&dir) {
        return unavailable(format!("{name}: create {}: {e}", dir.display()));
    }
    let spec = VmSpec {
        qemu_bin: config.qemu_bin.clone(),
        kernel: guest.kernel,
        initramfs: guest.initramfs,
        accel: a,
        memory_mib: config.memory_mib,
        dir: dir.clone(),
        incoming: None,
        cgroup: None,
    };
    let start = Instant::now();
    let verdict = match Vm::start(spec, bound).await {
        Ok(vm) => {
            let took = start.elapsed();
            vm.shutdown().await;
            Availability::Available {
                evidence: format!(
                    "{version}, {name}: {} booted to the guest agent in {} ms",
                    guest.kernel_origin,
                    took.as_millis()
                ),
            }
        }
        Err(CellError::BackendFailure { reason, .. }) => unavailable(match a {
            Accel::Kvm if reason.contains("did not reach") => {
                format!(
                    "kvm: /dev/kvm present but {}",
                    reason.trim_start_matches("kvm: ")
                )
            }
            _ => reason,
        }),
        Err(e) => unavailable(format!("{name}: {e}")),
    };
    verdict
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
