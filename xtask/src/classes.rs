//! Runner classes: `matrix/<class>.toml`, how a host's class is derived from its probe rows, and
//! the check that every class's backends and the backend registry name each other.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cellcheck_registry::Registry;
use serde::{Deserialize, Serialize};

use crate::probe::ProbeRow;
use crate::util::project_root;

/// The runner classes, in the order reports list them.
pub const CLASSES: [&str; 3] = ["linux-nokvm", "linux-kvm", "macos"];

/// `matrix/<class>.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassMatrix {
    pub class: String,
    pub partitions: u32,
    pub runner: String,
    #[serde(rename = "backend")]
    pub backends: Vec<MatrixBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixBackend {
    pub name: String,
    /// The host-probe row that decides whether this backend can run.
    pub probe: String,
    #[serde(default = "yes")]
    pub implemented: bool,
}

fn yes() -> bool {
    true
}

impl ClassMatrix {
    pub fn parse(text: &str, origin: &str) -> Result<ClassMatrix> {
        let m: ClassMatrix = toml::from_str(text).with_context(|| format!("parse {origin}"))?;
        if m.partitions == 0 {
            bail!("{origin}: partitions must be at least 1");
        }
        if m.backends.is_empty() {
            bail!("{origin}: no [[backend]] listed");
        }
        Ok(m)
    }

    pub fn load_from(dir: &Path, class: &str) -> Result<ClassMatrix> {
        if !CLASSES.contains(&class) {
            bail!(
                "unknown runner class {class:?} (known: {})",
                CLASSES.join(", ")
            );
        }
        let path = dir.join(format!("{class}.toml"));
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let m = ClassMatrix::parse(&text, &path.display().to_string())?;
        if m.class != class {
            bail!("{}: says class {:?}", path.display(), m.class);
        }
        Ok(m)
    }

    pub fn load(class: &str) -> Result<ClassMatrix> {
        ClassMatrix::load_from(&project_root().join("matrix"), class)
    }

    pub fn names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }
}

/// The class from the probe rows: KVM counts only when a guest booted with it.
pub fn derive_class(os: &str, probes: &BTreeMap<String, ProbeRow>) -> &'static str {
    if os == "macos" {
        "macos"
    } else if probes.get("kvm").is_some_and(|p| p.present) {
        "linux-kvm"
    } else {
        "linux-nokvm"
    }
}

/// Every registry entry has a `[[backend]]` in every Linux class, standing on a row the entry
/// produces; every implemented backend of any class is in the registry. Returns every mismatch.
pub fn check_against_registry(classes: &[ClassMatrix], registry: &Registry) -> Vec<String> {
    let mut problems = Vec::new();
    for m in classes {
        for b in &m.backends {
            if !b.implemented {
                continue;
            }
            match registry.get(&b.name) {
                None => problems.push(format!(
                    "matrix/{}.toml lists {:?}, which is not in the backend registry",
                    m.class, b.name
                )),
                Some(e) if !e.rows().contains(&b.probe) => problems.push(format!(
                    "matrix/{}.toml: {:?} stands on probe row {:?}, but the registry's entry \
                     produces {:?}",
                    m.class,
                    b.name,
                    b.probe,
                    e.rows()
                )),
                Some(_) => {}
            }
        }
        if !m.class.starts_with("linux-") {
            continue;
        }
        for e in registry.entries() {
            if !m.backends.iter().any(|b| b.name == e.name) {
                problems.push(format!(
                    "backend {:?} is in the registry but has no [[backend]] in matrix/{}.toml",
                    e.name, m.class
                ));
            }
        }
    }
    problems
}

/// Every class file of `matrix/`.
pub fn load_all() -> Result<Vec<ClassMatrix>> {
    CLASSES.iter().map(|c| ClassMatrix::load(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_file_parses_and_names_its_class() {
        for c in CLASSES {
            let m = ClassMatrix::load(c).unwrap();
            assert_eq!(m.class, c);
            assert!(m.partitions >= 1);
        }
        let nokvm = ClassMatrix::load("linux-nokvm").unwrap();
        // The registry is the one list of built-in backends (its own test pins it).
        assert_eq!(nokvm.names(), Registry::builtin().names());
        let kvm = ClassMatrix::load("linux-kvm").unwrap();
        assert_eq!(kvm.names(), nokvm.names());
        assert_eq!(kvm.backends[4].probe, "kvm");
        assert_eq!(nokvm.backends[4].probe, "qemu-tcg");
    }

    #[test]
    fn unknown_fields_and_classes_are_refused() {
        let err = ClassMatrix::parse(
            "class='x'\npartitions=1\nrunner='r'\n[[backend]]\nname='a'\nprobe='a'\ncolour='red'\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
        assert!(ClassMatrix::load("windows").is_err());
    }

    #[test]
    fn class_counts_kvm_only_when_a_guest_booted() {
        let mut p = BTreeMap::new();
        assert_eq!(derive_class("linux", &p), "linux-nokvm");
        p.insert(
            "kvm".into(),
            ProbeRow::absent("/dev/kvm present but guest did not reach the agent"),
        );
        assert_eq!(derive_class("linux", &p), "linux-nokvm");
        p.insert("kvm".into(), ProbeRow::present("guest booted in 900 ms"));
        assert_eq!(derive_class("linux", &p), "linux-kvm");
        assert_eq!(derive_class("macos", &p), "macos");
    }

    #[test]
    fn registry_and_matrix_name_each_other() {
        let problems = check_against_registry(&load_all().unwrap(), &Registry::builtin());
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
