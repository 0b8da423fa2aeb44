//! `cargo xtask bench`: runs the backends' benchmark examples and gathers what they wrote.
//!
//! Each example writes `target/conformance/bench-<name>.json`; this collects every such file
//! into `bench.md`. Numbers are recorded, never asserted.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use cellcheck_registry::{Bench, Registry};

use crate::util::{out_dir, project_root};

fn example_exists(package: &str) -> bool {
    let dir = package.trim_start_matches("cellcheck-");
    project_root()
        .join("backends")
        .join(dir)
        .join("examples/bench.rs")
        .exists()
}

/// The registry's benchmarks, each selected by its own name or its backend's.
fn benches(registry: &Registry, only: &[String]) -> Result<Vec<Bench>> {
    let all: Vec<(String, Bench)> = registry
        .entries()
        .iter()
        .filter_map(|e| Some((e.name.clone(), e.bench.clone()?)))
        .collect();
    for o in only {
        if !all.iter().any(|(b, bench)| b == o || bench.name == o) {
            let known: Vec<&str> = all.iter().map(|(_, b)| b.name).collect();
            bail!(
                "bench: no benchmark for {o:?} (known: {})",
                known.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|(b, bench)| only.is_empty() || only.iter().any(|o| o == b || o == bench.name))
        .map(|(_, bench)| bench)
        .collect())
}

pub fn run(only: &[String]) -> Result<bool> {
    let mut ok = true;
    for bench in benches(&Registry::builtin(), only)? {
        let (name, package, example) = (bench.name, bench.package, bench.example);
        if !example_exists(package) {
            println!("bench {name}: skipped ({package} has no examples/bench.rs)");
            continue;
        }
        println!(
            "bench {name}: cargo run --release -p {package} --example {example} -- {}",
            bench.args.join(" ")
        );
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(project_root())
            .args([
                "run",
                "--release",
                "-p",
                package,
                "--example",
                example,
                "--",
            ])
            .args(bench.args)
            .status()
            .with_context(|| format!("run the {name} benchmark"))?;
        if !status.success() {
            println!("bench {name}: FAILED ({status})");
            ok = false;
        }
    }
    let md = collect(&out_dir())?;
    let path = out_dir().join("bench.md");
    std::fs::write(&path, &md).with_context(|| format!("write {}", path.display()))?;
    print!("{md}");
    println!("wrote {}", path.display());
    Ok(ok)
}

/// Renders every `bench-*.json` in `dir` as Markdown: numbers as tables, the rest as JSON.
pub fn collect(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.starts_with("bench-") && n.ends_with(".json")
        })
        .collect();
    files.sort();
    let mut md = String::from("# cellcheck benchmarks\n\nRecorded, not asserted.\n");
    if files.is_empty() {
        md.push_str("\nNo benchmark results found.\n");
    }
    for f in files {
        let name = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        md.push_str(&format!("\n## {}\n\n", name.trim_start_matches("bench-")));
        let text = std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => {
                let mut rows = Vec::new();
                flatten("", &v, &mut rows);
                md.push_str("| metric | value |\n| --- | --- |\n");
                for (k, val) in rows {
                    md.push_str(&format!("| `{k}` | {val} |\n"));
                }
            }
            Err(e) => md.push_str(&format!("unreadable ({e}): `{}`\n", f.display())),
        }
    }
    Ok(md)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                flatten(&key(k), v, out);
            }
        }
        serde_json::Value::Array(a) if a.len() > 8 => {
            out.push((prefix.to_string(), format!("{} values", a.len())));
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.replace('|', "\\|"))),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benches_are_chosen_by_bench_or_backend_name() {
        let r = Registry::builtin();
        let names = |only: &[&str]| -> Vec<&str> {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            benches(&r, &only).unwrap().iter().map(|b| b.name).collect()
        };
        assert_eq!(names(&[]), ["host", "runc", "runsc", "qemu", "remote"]);
        assert_eq!(names(&["remote-python"]), ["remote"]);
        assert_eq!(names(&["remote", "host"]), ["host", "remote"]);
        let e = benches(&r, &["crun".to_string()]).unwrap_err();
        assert!(format!("{e}").contains("no benchmark for \"crun\""), "{e}");
    }

    #[test]
    fn bench_files_become_tables() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("bench-host.json"),
            r#"{"create_wait_destroy_ms":{"median":4.2,"p90":6.0},"n":50,"samples":[1,2,3,4,5,6,7,8,9]}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("bench-runsc.json"), "not json").unwrap();
        std::fs::write(d.path().join("report.json"), "{}").unwrap();
        let md = collect(d.path()).unwrap();
        assert!(md.contains("## host"));
        assert!(
            md.contains("| `create_wait_destroy_ms.median` | 4.2 |"),
            "{md}"
        );
        assert!(md.contains("| `samples` | 9 values |"));
        assert!(md.contains("## runsc") && md.contains("unreadable"));
        assert!(!md.contains("## report"));
    }
}
