//! `.github/workflows/conformance.yml` must agree with `matrix/`: one job per runner class, the
//! class's backends, one shard per partition. Checked like a generated file: by a plain test.

use serde_yaml::Value;

use crate::classes::{ClassMatrix, CLASSES};
use crate::util::project_root;

fn workflow() -> Value {
    let path = project_root().join(".github/workflows/conformance.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn steps(job: &Value) -> Vec<&Value> {
    job.get("steps")
        .and_then(Value::as_sequence)
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn runs(job: &Value) -> Vec<String> {
    steps(job)
        .iter()
        .map(|s| str_of(s, "run").to_string())
        .collect()
}

#[test]
fn workflow_jobs_match_the_runner_classes() {
    let wf = workflow();
    let jobs = wf.get("jobs").and_then(Value::as_mapping).expect("jobs");
    // Every job that runs the suite is a class, and every class has its job.
    let suite_jobs: Vec<String> = jobs
        .iter()
        .filter(|(_, j)| {
            runs(j)
                .iter()
                .any(|r| r.contains("cargo xtask conformance"))
        })
        .map(|(k, _)| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(suite_jobs, CLASSES, "jobs running the suite");

    for class in CLASSES {
        let m = ClassMatrix::load(class).unwrap();
        let job = &jobs[class];
        let env = &job["env"];
        assert_eq!(str_of(env, "CELLCHECK_HOST_CLASS"), class);
        assert_eq!(
            str_of(env, "CELLCHECK_EXPECT_BACKENDS"),
            m.names().join(","),
            "{class}: backends differ from matrix/{class}.toml"
        );
        assert_eq!(str_of(job, "runs-on"), m.runner, "{class}: runner");

        let shards: Vec<String> = job["strategy"]["matrix"]["partition"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{class}: no partition matrix"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (1..=m.partitions)
            .map(|k| format!("{k}/{}", m.partitions))
            .collect();
        assert_eq!(
            shards, want,
            "{class}: shards vs partitions = {}",
            m.partitions
        );

        let r = runs(job);
        assert!(
            r.iter()
                .any(|l| l.contains(&format!("cargo xtask probe --expect-class {class}"))),
            "{class}: no probe step asserting the class"
        );
        // The shard comes through the step's env, never expanded into its script.
        assert!(
            steps(job).iter().any(|s| str_of(s, "run")
                .contains("cargo xtask conformance --strict --partition \"$PARTITION\"")
                && str_of(&s["env"], "PARTITION") == "${{ matrix.partition }}"),
            "{class}: the suite must run strict and sharded"
        );
        let upload = steps(job)
            .into_iter()
            .find(|s| str_of(s, "uses").starts_with("actions/upload-artifact@"))
            .unwrap_or_else(|| panic!("{class}: no upload step"));
        assert_eq!(
            str_of(upload, "if"),
            "always()",
            "{class}: upload also on failure"
        );
        assert_eq!(str_of(&upload["with"], "path"), "target/conformance/");
    }

    let kvm = runs(&jobs["linux-kvm"]).join("\n");
    assert!(
        kvm.contains("KERNEL==\"kvm\"") && kvm.contains("udevadm trigger"),
        "the KVM job must open /dev/kvm with a udev rule"
    );
    let nokvm = runs(&jobs["linux-nokvm"]).join("\n");
    assert!(
        nokvm.contains("rm -f /dev/kvm"),
        "the no-KVM job must hide KVM"
    );
}

#[test]
fn actions_are_pinned_and_checkouts_keep_no_credentials() {
    let path = project_root().join(".github/workflows/conformance.yml");
    let text = std::fs::read_to_string(path).unwrap();
    for line in text
        .lines()
        .filter(|l| l.trim_start().starts_with("- uses:"))
    {
        let (_, rest) = line.split_once("uses:").unwrap();
        let (action, comment) = rest.split_once('#').unwrap_or((rest, ""));
        let sha = action.trim().rsplit_once('@').map(|(_, s)| s).unwrap_or("");
        assert!(
            sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
            "not pinned by a full commit: {line}"
        );
        assert!(comment.trim().starts_with('v'), "no tag comment: {line}");
    }
    let wf = workflow();
    assert_eq!(str_of(&wf["permissions"], "contents"), "read");
    for (name, job) in wf["jobs"].as_mapping().unwrap() {
        for s in steps(job) {
            if str_of(s, "uses").starts_with("actions/checkout@") {
                assert_eq!(
                    s["with"]["persist-credentials"].as_bool(),
                    Some(false),
                    "{name:?}: checkout must not persist credentials"
                );
            }
        }
    }
}

#[test]
fn the_gate_job_merges_every_class_after_all_of_them() {
    let wf = workflow();
    let gate = &wf["jobs"]["gate"];
    let needs: Vec<&str> = gate["needs"]
        .as_sequence()
        .expect("gate needs the class jobs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut classes = CLASSES.to_vec();
    classes.sort();
    let mut needs_sorted = needs.clone();
    needs_sorted.sort();
    assert_eq!(needs_sorted, classes);
    assert_eq!(
        str_of(gate, "if"),
        "always()",
        "the gate also runs after a red shard"
    );
    assert!(steps(gate)
        .iter()
        .any(|s| str_of(s, "uses").starts_with("actions/download-artifact@")));
    assert!(runs(gate)
        .iter()
        .any(|r| r.contains("cargo xtask gate artifacts/")));
}
