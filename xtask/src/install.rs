//! The runtimes the built-in backends drive, installed from Debian packages when missing: as root
//! where apt works, `cargo xtask conformance` names each package, installs it and goes on;
//! `--no-install`, a non-root user or a host without apt make each missing runtime a skip naming
//! the command that would add it.
//!
//! A run is [`plan`] (pure: what is missing and what will be done about it, from [`Host`]), then
//! [`execute`]. Only runtimes of the backends this run selects, packaged for this host's
//! architecture, are ever installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A runtime binary, the Debian package that brings it, and the backends that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// The executable looked for (on `PATH`, then in the system dirs).
    pub binary: &'static str,
    pub package: &'static str,
    /// A variable that, when set, names the binary to use: the user chose it, so it is never
    /// installed over.
    pub env: Option<&'static str>,
    /// The built-in backends that cannot run (or, for criu, snapshot) without it.
    pub backends: &'static [&'static str],
}

/// The runtimes packaged for `arch` (Rust's `std::env::consts::ARCH` names): QEMU's package and
/// binary differ by architecture, gVisor exists for x86_64 and aarch64 only.
pub fn runtimes(arch: &str) -> Vec<Runtime> {
    let mut all = vec![
        Runtime {
            binary: "runc",
            package: "runc",
            env: Some("CELLCHECK_RUNC_BIN"),
            // The Python driver runs its cells with runc.
            backends: &["runc", "remote-python"],
        },
        Runtime {
            binary: "crun",
            package: "crun",
            env: Some("CELLCHECK_CRUN_BIN"),
            backends: &["crun"],
        },
    ];
    if matches!(arch, "x86_64" | "aarch64") {
        all.push(Runtime {
            binary: "runsc",
            package: "runsc",
            env: Some("CELLCHECK_RUNSC_BIN"),
            backends: &["runsc"],
        });
    }
    match arch {
        "x86_64" => all.push(qemu("qemu-system-x86_64", "qemu-system-x86")),
        "aarch64" => all.push(qemu("qemu-system-aarch64", "qemu-system-arm")),
        _ => {}
    }
    all.push(Runtime {
        binary: "criu",
        package: "criu",
        env: None,
        // The host backend's snapshots (and nested cells, which are host cells).
        backends: &["host", "nested"],
    });
    all
}

fn qemu(binary: &'static str, package: &'static str) -> Runtime {
    Runtime {
        binary,
        package,
        env: Some("CELLCHECK_QEMU_BIN"),
        backends: &["qemu"],
    }
}

/// The command that adds `package` (run as root).
pub fn command(package: &str) -> String {
    format!("apt-get install -y --no-install-recommends {package}")
}

/// What this host has, as far as installing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub root: bool,
    /// `apt-get` is there to install with.
    pub apt: bool,
    /// Each runtime binary's path, when found.
    pub found: BTreeMap<&'static str, PathBuf>,
    /// The runtime variables that are set, with their values.
    pub configured: BTreeMap<&'static str, String>,
}

impl Host {
    /// This host now.
    pub fn current(runtimes: &[Runtime]) -> Host {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut found = BTreeMap::new();
        let mut configured = BTreeMap::new();
        for r in runtimes {
            if let Some(p) = cellcheck_fixtures::host_tool(r.binary) {
                found.insert(r.binary, p);
            }
            if let Some(v) = r.env.and_then(|e| std::env::var(e).ok().map(|v| (e, v))) {
                configured.insert(v.0, v.1);
            }
        }
        Host {
            root,
            apt: cellcheck_fixtures::host_tool("apt-get").is_some(),
            found,
            configured,
        }
    }
}

/// What is done about one runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Found there.
    Present(PathBuf),
    /// Named by its variable (`VAR=value`): the user's choice, left alone.
    Configured(String),
    /// Missing; [`execute`] installs its package.
    Install,
    /// Missing and not installed, with why and the command that would add it.
    Skip(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub runtime: Runtime,
    pub action: Action,
}

impl Step {
    /// For a backend's skip reason: why its runtime is missing and what would add it.
    pub fn hint(&self) -> Option<String> {
        match &self.action {
            Action::Skip(why) => Some(format!("{} is missing: {why}", self.runtime.binary)),
            _ => None,
        }
    }
}

/// The step for each runtime a backend in `backends` needs (pure: a dry run of [`execute`]).
pub fn plan(
    runtimes: &[Runtime],
    backends: &BTreeSet<String>,
    host: &Host,
    no_install: bool,
) -> Vec<Step> {
    runtimes
        .iter()
        .filter(|r| r.backends.iter().any(|b| backends.contains(*b)))
        .map(|r| {
            let cmd = command(r.package);
            let action = if let Some((var, v)) =
                r.env.and_then(|e| host.configured.get(e).map(|v| (e, v)))
            {
                Action::Configured(format!("{var}={v}"))
            } else if let Some(p) = host.found.get(r.binary) {
                Action::Present(p.clone())
            } else if no_install {
                Action::Skip(format!("not installed (--no-install); `{cmd}` adds it"))
            } else if !host.root {
                Action::Skip(format!("not installed (not root); `{cmd}` as root adds it"))
            } else if !host.apt {
                Action::Skip(format!(
                    "not installed (no apt-get here); Debian's package {} adds it (`{cmd}`)",
                    r.package
                ))
            } else {
                Action::Install
            };
            Step {
                runtime: r.clone(),
                action,
            }
        })
        .collect()
}

/// Prints the plan, then installs each [`Action::Install`] step's package (after one `apt-get
/// update` when the package lists lack it), naming it before; returns the steps as they ended.
pub fn execute(steps: Vec<Step>) -> Vec<Step> {
    let mut updated = false;
    steps
        .into_iter()
        .map(|mut s| {
            let (bin, pkg) = (s.runtime.binary, s.runtime.package);
            match &s.action {
                Action::Present(p) => println!("runtime {bin}: {}", p.display()),
                Action::Configured(v) => println!("runtime {bin}: {v}"),
                Action::Skip(why) => println!("runtime {bin}: missing, {why}"),
                Action::Install => {
                    println!(
                        "runtime {bin}: missing; installing Debian package {pkg}: {}",
                        command(pkg)
                    );
                    s.action = install(&s.runtime, &mut updated);
                    match &s.action {
                        Action::Present(p) => println!("runtime {bin}: installed, {}", p.display()),
                        other => println!("runtime {bin}: {other:?}"),
                    }
                }
            }
            s
        })
        .collect()
}

fn install(r: &Runtime, updated: &mut bool) -> Action {
    let mut out = apt_get(
        &["install", "-y", "--no-install-recommends", r.package],
        r.package,
    );
    if out.is_err() && !*updated && lists_lack_it(out.as_ref().unwrap_err()) {
        *updated = true;
        if let Err(e) = apt_get(&["update"], "the package lists") {
            return Action::Skip(format!("`apt-get update` failed: {}", last_line(&e)));
        }
        out = apt_get(
            &["install", "-y", "--no-install-recommends", r.package],
            r.package,
        );
    }
    match (out, cellcheck_fixtures::host_tool(r.binary)) {
        (Ok(()), Some(p)) => Action::Present(p),
        (Ok(()), None) => Action::Skip(format!(
            "`{}` succeeded but left no {} on PATH or in the system dirs",
            command(r.package),
            r.binary
        )),
        (Err(e), _) => Action::Skip(format!(
            "`{}` failed: {}",
            command(r.package),
            last_line(&e)
        )),
    }
}

/// apt's words for a package its lists do not hold (never fetched, or stale after a release).
fn lists_lack_it(output: &str) -> bool {
    [
        "Unable to locate package",
        "has no installation candidate",
        "404  Not Found",
    ]
    .iter()
    .any(|w| output.contains(w))
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)")
}

/// `apt-get ARGS`, its progress shown while it runs; its whole output when it fails.
fn apt_get(args: &[&str], what: &str) -> Result<(), String> {
    let shown = format!("apt-get {}", args.join(" "));
    let stage = cellcheck_fixtures::progress::Stage::start_as("xtask", shown.clone());
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    // apt's own lines (fetching, unpacking, setting up) as the step's message.
    let ran = stage.follow(&mut cmd, &shown, |l| {
        let l = l.trim();
        (!l.is_empty()).then(|| format!("{what}: {l}"))
    });
    match ran {
        Ok((st, _)) if st.success() => Ok(()),
        Ok((st, all)) => Err(format!("{st}\n{all}")),
        Err((w, e)) => Err(format!("{w}: {e}")),
    }
}

/// The backends a run selects, for [`plan`]: those named, else every built-in one.
pub fn selected(named: &[String]) -> BTreeSet<String> {
    if named.is_empty() {
        cellcheck_registry::Registry::builtin()
            .names()
            .into_iter()
            .collect()
    } else {
        named.iter().cloned().collect()
    }
}

/// Where each runtime binary is now (`absent` when missing): host.json is stale when this
/// changes (a runtime was installed or removed since the probe).
pub fn fingerprint() -> BTreeMap<String, String> {
    runtimes(std::env::consts::ARCH)
        .iter()
        .map(|r| {
            let at = cellcheck_fixtures::host_tool(r.binary);
            let v = at
                .as_deref()
                .map_or("absent".into(), |p: &Path| p.display().to_string());
            (r.binary.to_string(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests;
