//! `cargo xtask matrix`: which backends this runner class runs, and which of them this host can.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::probe::{self, HostReport};
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

/// One backend of the class, decided against this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selected {
    pub name: String,
    pub usable: bool,
    /// The probe's evidence, or why the backend cannot run.
    pub why: String,
}

/// Decides each backend of the class from the host report. A missing probe row is unusable
/// (never assumed present).
pub fn select(m: &ClassMatrix, host: &HostReport) -> Vec<Selected> {
    m.backends
        .iter()
        .map(|b| {
            if !b.implemented {
                return Selected {
                    name: b.name.clone(),
                    usable: false,
                    why: format!("{}: no implementation yet", b.name),
                };
            }
            match host.probes.get(&b.probe) {
                Some(p) => Selected {
                    name: b.name.clone(),
                    usable: p.present,
                    why: format!("{}: {}", b.probe, p.evidence),
                },
                None => Selected {
                    name: b.name.clone(),
                    usable: false,
                    why: format!("{}: not probed on this host", b.probe),
                },
            }
        })
        .collect()
}

/// The `strategy.matrix` a workflow consumes: one entry per class and shard.
pub fn github_matrix(classes: &[ClassMatrix]) -> serde_json::Value {
    let include: Vec<serde_json::Value> = classes
        .iter()
        .flat_map(|m| {
            (1..=m.partitions).map(move |k| {
                serde_json::json!({
                    "class": m.class,
                    "runner": m.runner,
                    "partition": format!("{k}/{}", m.partitions),
                    "backends": m.names().join(","),
                })
            })
        })
        .collect();
    serde_json::json!({ "include": include })
}

pub fn run(args: &[String]) -> Result<()> {
    let mut github = false;
    for a in args {
        match a.as_str() {
            "--github" => github = true,
            other => {
                bail!("matrix: unknown argument {other:?} (usage: cargo xtask matrix [--github])")
            }
        }
    }
    if github {
        let all = CLASSES
            .iter()
            .map(|c| ClassMatrix::load(c))
            .collect::<Result<Vec<_>>>()?;
        println!("{}", serde_json::to_string(&github_matrix(&all))?);
        return Ok(());
    }
    let host = probe::load_or_probe()?;
    let m = ClassMatrix::load(&host.class)?;
    println!("class {} (matrix/{}.toml)", host.class, host.class);
    for s in select(&m, &host) {
        let mark = if s.usable { "run " } else { "skip" };
        println!("  {mark} {:<10} {}", s.name, s.why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeRow;

    #[test]
    fn every_class_file_parses_and_names_its_class() {
        for c in CLASSES {
            let m = ClassMatrix::load(c).unwrap();
            assert_eq!(m.class, c);
            assert!(m.partitions >= 1);
        }
        let nokvm = ClassMatrix::load("linux-nokvm").unwrap();
        assert_eq!(
            nokvm.names(),
            ["host", "runc", "crun", "runsc", "qemu", "nested"]
        );
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
    fn selection_follows_probe_rows_and_never_assumes() {
        let m = ClassMatrix::load("linux-nokvm").unwrap();
        let mut host = HostReport::empty("linux-nokvm");
        host.probes
            .insert("host".into(), ProbeRow::present("ran /bin/true"));
        host.probes.insert(
            "crun".into(),
            ProbeRow::absent("crun: cannot use hybrid cgroups"),
        );
        let s = select(&m, &host);
        let by = |n: &str| s.iter().find(|x| x.name == n).unwrap().clone();
        assert!(by("host").usable);
        assert!(by("nested").usable);
        assert!(!by("crun").usable);
        assert!(by("crun").why.contains("hybrid"));
        assert!(!by("runsc").usable);
        assert!(by("runsc").why.contains("not probed"));

        let mac = ClassMatrix::load("macos").unwrap();
        let mut host = HostReport::empty("macos");
        host.probes
            .insert("apple-vz".into(), ProbeRow::present("kern.hv_support: 1"));
        let s = select(&mac, &host);
        assert!(!s[0].usable);
        assert!(s[0].why.contains("no implementation yet"));
    }

    #[test]
    fn github_matrix_has_one_entry_per_shard() {
        let all: Vec<_> = CLASSES
            .iter()
            .map(|c| ClassMatrix::load(c).unwrap())
            .collect();
        let j = github_matrix(&all);
        let n: u32 = all.iter().map(|m| m.partitions).sum();
        assert_eq!(j["include"].as_array().unwrap().len(), n as usize);
        assert_eq!(j["include"][0]["partition"], "1/2");
    }
}
