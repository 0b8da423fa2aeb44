//! The bundle generator: an admitted cell becomes an OCI runtime `config.json`.
//!
//! Pure functions only (no I/O besides [`write_config`]), so every rule is unit-tested without a
//! runtime; the same document drives runc, crun and runsc.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cellcheck_contract::{AdmittedCell, EnvVar, Limits, OpenFiles};
use serde_json::{json, Value};

/// OCI runtime spec version the bundle declares (all three runtimes here speak 1.0.2).
pub const OCI_VERSION: &str = "1.0.2";

/// What a bundle needs besides the cell document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleOptions {
    /// Absolute path of the shared read-only root filesystem (never copied).
    pub rootfs: PathBuf,
    /// The cell's cgroup, relative to each hierarchy's root (e.g. `/cellcheck-ab12-cell`).
    pub cgroups_path: String,
    /// Whether `pidsMax` goes into `linux.resources.pids`. Not for runsc: it applies that limit to
    /// the sandbox's host cgroup, whose tasks are the sentry's and gofer's threads, not the
    /// workload's (a small count kills the sandbox while it starts; the backend declares
    /// `PidsLimit` unsupported for that reason).
    pub pids_limit: bool,
}

/// Paths runtimes usually mask inside a container (kernel interfaces that leak host facts).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/kmsg",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// Paths runtimes usually make read-only inside a container.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

pub use cellcheck_host_init::deny::NAMESPACE_CLONE_FLAGS;

/// Syscalls the default seccomp profile refuses with EPERM: the host backend's list (one list
/// for both), by name so the runtime's libseccomp resolves them for the bundle's arch.
pub fn denied_syscalls() -> Vec<&'static str> {
    cellcheck_host_init::deny::denied()
        .map(|(n, _)| n)
        .collect()
}

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The default `linux.seccomp` profile: allow by default, EPERM for [`denied_syscalls`] and for
/// clone with a namespace flag (one rule per flag: a rule's conditions are ANDed). clone3 passes
/// its flags in memory a filter cannot read, so it answers ENOSYS and libc falls back to clone.
pub fn seccomp() -> Value {
    let mut syscalls = vec![json!({
        "names": denied_syscalls(),
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": EPERM,
    })];
    syscalls.extend(NAMESPACE_CLONE_FLAGS.iter().map(|&flag| {
        json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [ { "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" } ],
        })
    }));
    syscalls.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
    }));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": syscalls,
    })
}

/// `NAME=value` strings in declared order: exactly the declared set, nothing added.
pub fn env_strings(env: &[EnvVar]) -> Vec<String> {
    env.iter()
        .map(|e| format!("{}={}", e.name, e.value))
        .collect()
}

/// The OCI `process` object for `args` with exactly `env`, as the workload and execs get it.
pub fn process(args: &[String], env: &[EnvVar], cwd: &str, nofile: OpenFiles) -> Value {
    json!({
        "terminal": false,
        "user": { "uid": 0, "gid": 0 },
        "args": args,
        "env": env_strings(env),
        "cwd": cwd,
        "noNewPrivileges": true,
        "rlimits": [ { "type": "RLIMIT_NOFILE", "hard": nofile.hard, "soft": nofile.soft } ],
    })
}

/// `linux.resources` from the declared limits; `None` fields are left out (no limit), and so is
/// a value past the OCI fields' int64 (no machine has that much memory or that many pids: the same
/// as no limit).
pub fn resources(limits: &Limits, pids_limit: bool) -> Value {
    let mut r = serde_json::Map::new();
    let int64 = |v: u64| i64::try_from(v).ok();
    if let Some(bytes) = limits.memory_max_bytes.and_then(int64) {
        // No swap limit: hosts without swap accounting would refuse the bundle.
        r.insert("memory".into(), json!({ "limit": bytes }));
    }
    if let Some(pids) = limits.pids_max.and_then(int64).filter(|_| pids_limit) {
        r.insert("pids".into(), json!({ "limit": pids }));
    }
    if let Some(cpu) = limits.cpu_max {
        r.insert(
            "cpu".into(),
            json!({ "quota": cpu.quota, "period": cpu.period }),
        );
    }
    Value::Object(r)
}

fn mounts() -> Value {
    json!([
        { "destination": "/proc", "type": "proc", "source": "proc",
          "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
          "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
        { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
          "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
        { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
          "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
        { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
          "options": ["nosuid", "noexec", "nodev"] },
        // The root is read-only and shared by every cell: each cell gets its own /tmp.
        { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
          "options": ["nosuid", "nodev", "mode=1777", "size=65536k"] },
        { "destination": "/sys", "type": "sysfs", "source": "sysfs",
          "options": ["nosuid", "noexec", "nodev", "ro"] },
    ])
}

/// The whole `config.json` for `cell`.
pub fn config(cell: &AdmittedCell, opts: &BundleOptions) -> Value {
    json!({
        "ociVersion": OCI_VERSION,
        "process": process(
            cell.argv(),
            cell.env(),
            cell.working_directory(),
            cell.open_files(),
        ),
        "root": { "path": opts.rootfs, "readonly": true },
        "hostname": cell.hostname(),
        "mounts": mounts(),
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
                { "type": "mount" }, { "type": "network" }, { "type": "cgroup" },
            ],
            "cgroupsPath": opts.cgroups_path,
            "resources": resources(&cell.limits(), opts.pids_limit),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp(),
        },
    })
}

/// Write `value` as `path` with mode 0600 (the declared env may hold secrets), never following or
/// reusing an existing file.
pub fn write_config(path: &Path, value: &Value) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellcheck_contract::spec::CpuMax;
    use cellcheck_contract::CellDocument;

    fn opts() -> BundleOptions {
        BundleOptions {
            rootfs: PathBuf::from("/fx/rootfs"),
            cgroups_path: "/cellcheck-t-c1".into(),
            pids_limit: true,
        }
    }

    #[test]
    fn process_has_exactly_the_declared_env_in_order() {
        let cell = CellDocument::new("c1", ["/bin/x", "a b"])
            .with_env("Z", "1")
            .with_env("A", "x=y")
            .admit()
            .unwrap();
        let c = config(&cell, &opts());
        assert_eq!(c["process"]["env"], json!(["Z=1", "A=x=y"]));
        assert_eq!(c["process"]["args"], json!(["/bin/x", "a b"]));
        assert_eq!(c["process"]["terminal"], json!(false));
        assert_eq!(c["process"]["cwd"], json!("/"));
        assert_eq!(c["process"]["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(c["process"]["noNewPrivileges"], json!(true));
        let none = CellDocument::new("c1", ["/bin/x"]).admit().unwrap();
        assert_eq!(config(&none, &opts())["process"]["env"], json!([]));
    }

    #[test]
    fn root_hostname_namespaces_and_mounts() {
        let cell = CellDocument::new("c1", ["/bin/x"]).admit().unwrap();
        let c = config(&cell, &opts());
        assert_eq!(c["ociVersion"], json!(OCI_VERSION));
        assert_eq!(c["root"], json!({"path": "/fx/rootfs", "readonly": true}));
        assert_eq!(c["hostname"], json!("c1"));
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network", "cgroup"]);
        let mounts = c["mounts"].as_array().unwrap();
        let dest = |d: &str| mounts.iter().find(|m| m["destination"] == d).cloned();
        assert_eq!(dest("/tmp").unwrap()["type"], json!("tmpfs"));
        assert_eq!(dest("/proc").unwrap()["type"], json!("proc"));
        assert!(dest("/sys").unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
        for d in ["/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"] {
            assert!(dest(d).is_some(), "{d} missing");
        }
        assert_eq!(c["linux"]["cgroupsPath"], json!("/cellcheck-t-c1"));
        assert!(c["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore")));
        assert!(c["linux"]["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/sys")));
    }

    #[test]
    fn rlimit_nofile_is_the_declared_one_or_the_default() {
        let nofile = |c: &Value| c["process"]["rlimits"].clone();
        let cell = CellDocument::new("c1", ["/bin/x"])
            .with_limits(Limits {
                open_files: Some(OpenFiles {
                    soft: 200,
                    hard: 300,
                }),
                ..Limits::default()
            })
            .admit()
            .unwrap();
        assert_eq!(
            nofile(&config(&cell, &opts())),
            json!([{"type": "RLIMIT_NOFILE", "soft": 200, "hard": 300}])
        );
        let none = CellDocument::new("c1", ["/bin/x"]).admit().unwrap();
        let d = cellcheck_contract::DEFAULT_OPEN_FILES;
        assert_eq!(
            nofile(&config(&none, &opts())),
            json!([{"type": "RLIMIT_NOFILE", "soft": d.soft, "hard": d.hard}])
        );
    }

    #[test]
    fn seccomp_refuses_the_dangerous_syscalls_and_namespace_clones() {
        let cell = CellDocument::new("c1", ["/bin/x"]).admit().unwrap();
        let s = &config(&cell, &opts())["linux"]["seccomp"];
        assert_eq!(s["defaultAction"], json!("SCMP_ACT_ALLOW"));
        let rules = s["syscalls"].as_array().unwrap();
        let denied = &rules[0];
        assert_eq!(denied["action"], json!("SCMP_ACT_ERRNO"));
        assert_eq!(denied["errnoRet"], json!(1));
        for name in [
            "mount", "unshare", "keyctl", "bpf", "ptrace", "syslog", "reboot",
        ] {
            assert!(
                denied["names"].as_array().unwrap().contains(&json!(name)),
                "{name} not denied"
            );
        }
        // One rule per namespace flag (conditions in one rule are ANDed).
        let clone: Vec<&Value> = rules
            .iter()
            .filter(|r| r["names"] == json!(["clone"]))
            .collect();
        assert_eq!(clone.len(), NAMESPACE_CLONE_FLAGS.len());
        for (r, &flag) in clone.iter().zip(NAMESPACE_CLONE_FLAGS) {
            assert_eq!(
                r["args"],
                json!([{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}])
            );
            assert_eq!(r["errnoRet"], json!(1));
        }
        // CLONE_NEWUSER and CLONE_NEWNS are among them; plain fork flags are not.
        assert!(NAMESPACE_CLONE_FLAGS.contains(&0x1000_0000));
        assert!(NAMESPACE_CLONE_FLAGS.contains(&0x0002_0000));
        assert!(!NAMESPACE_CLONE_FLAGS.contains(&0x0001_0000)); // CLONE_THREAD
        let clone3 = rules
            .iter()
            .find(|r| r["names"] == json!(["clone3"]))
            .unwrap();
        assert_eq!(clone3["errnoRet"], json!(38));
    }

    #[test]
    fn working_directory_and_long_ids() {
        let mut d = CellDocument::new("x".repeat(128), ["/bin/x"]);
        d.spec.run.working_directory = Some("/tmp".into());
        let cell = d.admit().unwrap();
        let c = config(&cell, &opts());
        assert_eq!(c["process"]["cwd"], json!("/tmp"));
        assert_eq!(
            c["hostname"].as_str().unwrap().len(),
            cellcheck_contract::spec::MAX_HOSTNAME_LEN
        );
    }

    #[test]
    fn limits_map_to_linux_resources() {
        let cell = CellDocument::new("c1", ["/bin/x"])
            .with_limits(Limits {
                memory_max_bytes: Some(64 << 20),
                cpu_max: Some(CpuMax {
                    quota: 50_000,
                    period: 100_000,
                }),
                pids_max: Some(32),
                open_files: None,
            })
            .admit()
            .unwrap();
        let r = &config(&cell, &opts())["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], json!(64u64 << 20));
        assert_eq!(r["pids"]["limit"], json!(32));
        assert_eq!(r["cpu"], json!({"quota": 50_000, "period": 100_000}));
        let sandbox = BundleOptions {
            pids_limit: false,
            ..opts()
        };
        assert_eq!(
            config(&cell, &sandbox)["linux"]["resources"]["pids"],
            json!(null)
        );
        let huge = CellDocument::new("c1", ["/bin/x"])
            .with_limits(Limits {
                memory_max_bytes: Some(u64::MAX),
                pids_max: Some(u64::MAX),
                ..Limits::default()
            })
            .admit()
            .unwrap();
        assert_eq!(config(&huge, &opts())["linux"]["resources"], json!({}));
        let none = CellDocument::new("c1", ["/bin/x"]).admit().unwrap();
        assert_eq!(config(&none, &opts())["linux"]["resources"], json!({}));
    }

    #[test]
    fn config_is_written_0600_and_never_over_an_existing_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cellcheck-oci-bundle-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        let _ = fs::remove_file(&p);
        write_config(&p, &json!({"a": 1})).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        let again = write_config(&p, &json!({"a": 2}));
        let text = fs::read_to_string(&p).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, 0o600);
        assert!(again.is_err());
        assert!(text.contains("\"a\": 1"), "{text}");
    }
}
