//! `cargo xtask probe`: what this host can run, each answer backed by something that was run.
//!
//! The backend rows come from the backend registry: each backend's own `preflight()`, or its own
//! probe (QEMU's accelerators), so the probe and the backends never disagree.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cellcheck_registry::Registry;
use serde::{Deserialize, Serialize};

use crate::classes::derive_class;
use crate::util::out_dir;

pub const SCHEMA: &str = "cellcheck-host/1";

/// How long a written host.json is reused by `conformance` and `matrix`.
const FRESH_FOR: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRow {
    pub present: bool,
    pub evidence: String,
}

impl ProbeRow {
    pub fn present(evidence: impl Into<String>) -> ProbeRow {
        ProbeRow {
            present: true,
            evidence: evidence.into(),
        }
    }
    pub fn absent(evidence: impl Into<String>) -> ProbeRow {
        ProbeRow {
            present: false,
            evidence: evidence.into(),
        }
    }
}

/// `target/conformance/host.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub schema: String,
    pub class: String,
    /// How the class was decided (derived from probes, or forced by `CELLCHECK_HOST_CLASS`).
    pub class_reason: String,
    pub os: String,
    pub arch: String,
    pub kernel: String,
    /// Seconds since the epoch when the probe ran.
    pub probed_at: u64,
    pub probe_ms: u64,
    pub probes: BTreeMap<String, ProbeRow>,
    /// Where each runtime binary was when the probe ran ([`crate::install::fingerprint`]): a
    /// runtime installed or removed since makes this report stale.
    #[serde(default)]
    pub runtimes: BTreeMap<String, String>,
}

impl HostReport {
    #[cfg(test)]
    pub fn empty(class: &str) -> HostReport {
        HostReport {
            schema: SCHEMA.into(),
            class: class.into(),
            class_reason: "test".into(),
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            kernel: String::new(),
            probed_at: 0,
            probe_ms: 0,
            probes: BTreeMap::new(),
            runtimes: BTreeMap::new(),
        }
    }
}

pub fn host_json_path() -> PathBuf {
    out_dir().join("host.json")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            crate::util::run_bounded(
                std::process::Command::new("uname").arg("-r"),
                Duration::from_secs(5),
            )
            .last_line()
            .to_string()
        })
}

/// Runs every probe now, with a row for each row `registry`'s backends stand on.
pub fn probe_host(registry: &Registry) -> Result<HostReport> {
    let start = std::time::Instant::now();
    let probes = collect_rows(registry)?;
    let os = std::env::consts::OS.to_string();
    let derived = derive_class(&os, &probes);
    let (class, class_reason) = match std::env::var("CELLCHECK_HOST_CLASS") {
        Ok(c) if !c.is_empty() => {
            if !crate::classes::CLASSES.contains(&c.as_str()) {
                bail!("CELLCHECK_HOST_CLASS={c:?} is not a runner class");
            }
            let why = format!("forced by CELLCHECK_HOST_CLASS (the probes say {derived})");
            (c, why)
        }
        _ => (
            derived.to_string(),
            match derived {
                "linux-kvm" => "a guest booted with KVM".to_string(),
                "macos" => "macOS".to_string(),
                _ => "no guest booted with KVM".to_string(),
            },
        ),
    };
    Ok(HostReport {
        schema: SCHEMA.into(),
        class,
        class_reason,
        os,
        arch: std::env::consts::ARCH.into(),
        kernel: kernel_release(),
        probed_at: now_secs(),
        probe_ms: start.elapsed().as_millis() as u64,
        probes,
        runtimes: crate::install::fingerprint(),
    })
}

fn collect_rows(registry: &Registry) -> Result<BTreeMap<String, ProbeRow>> {
    let mut rows = BTreeMap::new();
    #[cfg(target_os = "linux")]
    {
        rows.insert("root".to_string(), linux::root());
        rows.insert("user-namespaces".to_string(), linux::user_namespaces());
        rows.insert("namespaces".to_string(), linux::other_namespaces());
        rows.insert("cgroup".to_string(), linux::cgroups());
        rows.insert("criu".to_string(), linux::criu());
        rows.extend(linux::backend_rows(registry)?);
        rows.insert("apple-vz".to_string(), ProbeRow::absent("not macOS"));
    }
    #[cfg(target_os = "macos")]
    {
        let _ = registry; // no built-in backend runs on macOS yet
        rows.insert("apple-vz".to_string(), macos::virtualization());
    }
    Ok(rows)
}

pub fn write(report: &HostReport) -> Result<PathBuf> {
    let path = host_json_path();
    std::fs::create_dir_all(path.parent().expect("has a parent"))
        .with_context(|| format!("create {}", out_dir().display()))?;
    let text = serde_json::to_string_pretty(report)? + "\n";
    // Written aside then renamed: another run reading it never sees half a file.
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// host.json when it is fresh and describes this host and class request; else a new probe
/// (written).
pub fn load_or_probe() -> Result<HostReport> {
    if let Some(r) = load_fresh() {
        return Ok(r);
    }
    let r = probe_host(&Registry::builtin())?;
    write(&r)?;
    Ok(r)
}

fn load_fresh() -> Option<HostReport> {
    let text = std::fs::read_to_string(host_json_path()).ok()?;
    let r: HostReport = serde_json::from_str(&text).ok()?;
    let forced = std::env::var("CELLCHECK_HOST_CLASS").unwrap_or_default();
    let age = now_secs().saturating_sub(r.probed_at);
    let fresh = r.schema == SCHEMA
        && age < FRESH_FOR.as_secs()
        && r.kernel == kernel_release()
        && r.runtimes == crate::install::fingerprint()
        && (forced.is_empty() || forced == r.class);
    fresh.then_some(r)
}

pub fn print_table(r: &HostReport) {
    println!(
        "host: {} {} kernel {} -> class {} ({})",
        r.os, r.arch, r.kernel, r.class, r.class_reason
    );
    let width = r.probes.keys().map(String::len).max().unwrap_or(0);
    for (name, row) in &r.probes {
        let mark = if row.present { "yes" } else { "no " };
        println!("  {name:<width$}  {mark}  {}", one_line(&row.evidence, 160));
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

pub fn run(expect_class: Option<&str>) -> Result<()> {
    let r = probe_host(&Registry::builtin())?;
    let path = write(&r)?;
    print_table(&r);
    println!("wrote {} in {} ms", path.display(), r.probe_ms);
    if let Some(want) = expect_class {
        let derived = derive_class(&r.os, &r.probes);
        if derived != want {
            bail!("this runner probes as {derived}, but the job is for {want}: its runner or setup is wrong");
        }
    }
    Ok(())
}

#[cfg(target_os = "macos")]
mod macos {
    use super::ProbeRow;
    use std::process::Command;
    use std::time::Duration;

    /// Virtualization.framework needs the hypervisor: `kern.hv_support` says whether it is there.
    pub fn virtualization() -> ProbeRow {
        let r = crate::util::run_bounded(
            Command::new("sysctl").args(["-n", "kern.hv_support"]),
            Duration::from_secs(10),
        );
        match r.last_line() {
            "1" => ProbeRow::present("sysctl kern.hv_support = 1 (the hypervisor is available)"),
            other => ProbeRow::absent(format!(
                "sysctl kern.hv_support = {other:?} {}",
                r.error.unwrap_or_default()
            )),
        }
    }
}

#[cfg(target_os = "linux")]
pub(crate) mod linux;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_is_flattened_for_the_table() {
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }
}
