//! `cargo xtask matrix`: which backends this runner class runs, and which of them this host can.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::classes::{self, ClassMatrix};
use crate::probe::{self, HostReport};

/// One backend of the class, decided against this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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

pub fn run(github: bool) -> Result<()> {
    let all = classes::load_all()?;
    let problems = classes::check_against_registry(&all, &cellcheck_registry::Registry::builtin());
    if !problems.is_empty() {
        bail!(
            "matrix/ and the backend registry disagree:\n  {}",
            problems.join("\n  ")
        );
    }
    if github {
        println!("{}", serde_json::to_string(&github_matrix(&all))?);
        return Ok(());
    }
    let host = probe::load_or_probe()?;
    let m = ClassMatrix::load(&host.class)?;
    println!("class {} (matrix/{}.toml)", host.class, host.class);
    for s in select(&m, &host) {
        let mark = if s.usable { "run " } else { "skip" };
        println!("  {mark} {:<13} {}", s.name, s.why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeRow;

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
        let all: Vec<_> = crate::classes::CLASSES
            .iter()
            .map(|c| ClassMatrix::load(c).unwrap())
            .collect();
        let j = github_matrix(&all);
        let n: u32 = all.iter().map(|m| m.partitions).sum();
        assert_eq!(j["include"].as_array().unwrap().len(), n as usize);
        assert_eq!(j["include"][0]["partition"], "1/2");
    }
}
