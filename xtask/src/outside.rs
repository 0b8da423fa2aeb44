//! Backends from outside this repository in a run: drivers (`--driver NAME=CMD`, served through
//! the remote backend under their own names) and outside crates (`--crate PATH`, whose own
//! `harness = false` test target runs the suite under nextest).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cellcheck_contract::drivers;

use crate::nextest::{PACKAGE, TEST};
use crate::util::project_root;

/// `--driver NAME=CMD`: a valid driver name and a non-empty command.
pub fn parse_driver(v: &str) -> Result<(String, String), String> {
    let Some((name, cmd)) = v.split_once('=') else {
        return Err(format!(
            "{v:?}: want NAME=CMD (e.g. bwrap=\"python3 driver.py\")"
        ));
    };
    drivers::check_name(name)?;
    if cmd.trim().is_empty() {
        return Err(format!("{v:?}: the driver command is empty"));
    }
    Ok((name.to_string(), cmd.to_string()))
}

/// Starts the driver, shakes hands and compares the backend its `hello` names with `name`, so a
/// mismatch is an error before anything runs (the suite checks it again in each trial process).
#[cfg(target_os = "linux")]
pub fn check_driver(name: &str, cmd: &str) -> Result<()> {
    let what = format!("--driver {name}={cmd}");
    // Its hello carries the fixtures' paths, as in the suite.
    let fx = cellcheck_fixtures::ensure().context("build the fixtures")?;
    let opts = cellcheck_remote::RemoteOptions {
        fixtures: Some(cellcheck_remote::protocol::FixturePaths::of(&fx)),
        ..Default::default()
    };
    let b = cellcheck_remote::RemoteBackend::with_options(name, drivers::argv(cmd), opts)
        .map_err(|e| anyhow::anyhow!("{what}: the driver failed its handshake: {e}"))?;
    let hello = b.driver_info().backend.clone();
    if let Some(why) = cellcheck_remote::hello_name_mismatch(name, &hello) {
        bail!("{what}: {why}");
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn check_driver(name: &str, cmd: &str) -> Result<()> {
    bail!("--driver {name}={cmd}: drivers run on Linux only")
}

/// A test target a run drives under nextest: this repository's suite or an outside crate's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The crate's directory; `None` for this repository's suite.
    pub dir: Option<PathBuf>,
    pub package: String,
    pub test: String,
}

impl Target {
    /// This repository's conformance test target.
    pub fn suite() -> Target {
        Target {
            dir: None,
            package: PACKAGE.into(),
            test: TEST.into(),
        }
    }

    /// The crate at `dir`: its package name and its one `harness = false` test target (or the
    /// one named `conformance` among several).
    pub fn outside(dir: &Path) -> Result<Target> {
        let manifest = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest)
            .with_context(|| format!("--crate {}: read {}", dir.display(), manifest.display()))?;
        let (package, test) = target_of_manifest(&text)
            .map_err(|e| anyhow::anyhow!("--crate {}: {e}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--crate {}", dir.display()))?;
        Ok(Target {
            dir: Some(dir),
            package,
            test,
        })
    }

    /// `cargo nextest SUB` over this target's trials that `filter` (a nextest filterset) selects,
    /// from its directory (so an outside crate's own `.config/nextest.toml` applies).
    pub fn nextest(&self, sub: &str, filter: Option<&str>) -> Command {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        match &self.dir {
            None => {
                c.current_dir(project_root())
                    .args(["nextest", sub, "-p", &self.package]);
            }
            Some(d) => {
                // A profile the caller's environment names (nextest sets NEXTEST_PROFILE for the
                // tests it runs, e.g. `ci` here) is one of this repository's, not the crate's.
                c.current_dir(d)
                    .env_remove("NEXTEST_PROFILE")
                    .args(["nextest", sub, "--manifest-path"])
                    .arg(d.join("Cargo.toml"));
            }
        }
        c.args(["--test", &self.test]);
        // The reasons trials print what the reports already carry per trial; left out of the run
        // (and of its partitions) alike. One expression: nextest joins several `-E` with "or".
        let base = format!("not test(/::{}$/)", cellcheck_conformance::REASONS_TRIAL);
        c.arg("-E").arg(match filter {
            Some(f) => format!("({f}) and {base}"),
            None => base,
        });
        c
    }

    pub fn describe(&self) -> String {
        match &self.dir {
            None => format!("{} --test {}", self.package, self.test),
            Some(d) => format!(
                "crate {} ({} --test {})",
                d.display(),
                self.package,
                self.test
            ),
        }
    }
}

/// The package name and the suite's test target of a crate's Cargo.toml.
fn target_of_manifest(text: &str) -> Result<(String, String), String> {
    let v: toml::Value = toml::from_str(text).map_err(|e| format!("Cargo.toml: {e}"))?;
    let package = v
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .ok_or("Cargo.toml has no [package] name")?
        .to_string();
    let tests: Vec<String> = v
        .get("test")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
        .filter(|t| t.get("harness").and_then(|h| h.as_bool()) == Some(false))
        .filter_map(|t| t.get("name").and_then(|n| n.as_str()).map(String::from))
        .collect();
    let test = match tests.as_slice() {
        [] => {
            return Err(
                "Cargo.toml has no [[test]] with harness = false (the suite's test target)".into(),
            )
        }
        [one] => one.clone(),
        many => many
            .iter()
            .find(|t| *t == "conformance")
            .cloned()
            .ok_or_else(|| {
                format!(
                    "Cargo.toml has several harness = false tests ({}) and none named conformance",
                    many.join(", ")
                )
            })?,
    };
    Ok((package, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_flags_are_checked() {
        assert_eq!(
            parse_driver("bwrap-py=python3 d.py --x=1").unwrap(),
            ("bwrap-py".to_string(), "python3 d.py --x=1".to_string())
        );
        for bad in ["nocmd", "=cmd", "Bad=cmd", "a_b=cmd", "x= "] {
            assert!(parse_driver(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_outside_crate_names_its_suite_target() {
        let one = "[package]\nname = \"mine\"\n[[test]]\nname = \"suite\"\nharness = false\n";
        assert_eq!(
            target_of_manifest(one).unwrap(),
            ("mine".to_string(), "suite".to_string())
        );
        let two = format!("{one}[[test]]\nname = \"conformance\"\nharness = false\n");
        assert_eq!(target_of_manifest(&two).unwrap().1, "conformance");
        let amb = format!("{one}[[test]]\nname = \"other\"\nharness = false\n");
        assert!(target_of_manifest(&amb)
            .unwrap_err()
            .contains("suite, other"));
        let none = "[package]\nname = \"mine\"\n[[test]]\nname = \"t\"\n";
        assert!(target_of_manifest(none)
            .unwrap_err()
            .contains("harness = false"));
        assert!(target_of_manifest("[lib]\n")
            .unwrap_err()
            .contains("[package]"));
    }
}
