//! Real cells on this host: every test drives the real init, namespaces and cgroups (root only).
//! After every test, nothing of its cells may be left: no cgroup dir, no state dir, no process.
//! This file: lifecycle, exit, isolation, limits and configuration; `operations.rs` has timeout,
//! TTL, pause, exec, load and tracing.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use cellcheck_contract::spec::Limits;
use cellcheck_contract::{
    Backend, Capability, CellDocument, CellError, ResourceKind, Support, Termination,
};
use cellcheck_host::{BindMount, HostBackend, HostConfig};

use common::*;

#[tokio::test]
async fn exit_code_and_output() {
    let Some(b) = backend() else { return };
    let d = sh("echo out; echo err >&2; exit 7");
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 7 });
    assert_eq!(r.stdout_str(), "out\n");
    assert_eq!(r.stderr_str(), "err\n");
    // Waiting again gives the same report.
    assert_eq!(b.wait(&id).await.unwrap(), r);
    assert_eq!(b.list().await, vec![id.clone()]);
    let t = b.destroy(&id).await.unwrap();
    assert!(!t.killed_running);
    assert_eq!(t.remaining_cells, 0);
    assert_clean(&b.footprint(&id));
}

#[tokio::test]
async fn signal_death_is_reported() {
    let Some(b) = backend() else { return };
    let d = probe(&["signal", "TERM"]);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.termination, Termination::Signaled { signal: 15 });
    finish(&b, &id).await;
}

#[tokio::test]
async fn missing_program_is_not_found_and_leaves_nothing() {
    let Some(b) = backend() else { return };
    for argv0 in ["/no/such/program", "no-such-program", "/etc/passwd"] {
        let d = CellDocument::new("missing", [argv0]);
        let fp = b.footprint("missing");
        let e = b.create(&d).await.unwrap_err();
        assert_eq!(
            e,
            CellError::NotFound {
                kind: ResourceKind::Program,
                id: argv0.into()
            }
        );
        assert!(b.list().await.is_empty());
        assert_clean(&fp);
        assert!(!b.config().state_root.exists());
        assert_eq!(
            b.destroy("missing").await.unwrap_err(),
            CellError::cell_not_found("missing")
        );
    }
}

#[tokio::test]
async fn bad_documents_are_refused_before_anything_exists() {
    let Some(b) = backend() else { return };
    let d = CellDocument::new("bad/id", ["/bin/true"]);
    assert!(matches!(
        b.create(&d).await,
        Err(CellError::InvalidSpec { .. })
    ));
    let d = CellDocument::new("ok", ["/bin/true"]).with_env("A=B", "x");
    assert!(matches!(
        b.create(&d).await,
        Err(CellError::InvalidSpec { .. })
    ));
    assert_clean(&b.footprint("ok"));
    let mut d = CellDocument::new("cwd", ["/bin/true"]);
    d.spec.run.working_directory = Some("/does/not/exist".into());
    match b.create(&d).await {
        Err(CellError::NotFound {
            kind: ResourceKind::WorkingDirectory,
            id,
        }) => assert_eq!(id, "/does/not/exist"),
        other => panic!("expected NotFound(working directory), got {other:?}"),
    }
    assert_clean(&b.footprint("cwd"));
    assert!(!b.config().state_root.exists());
}

#[tokio::test]
async fn env_is_exactly_the_declared_set() {
    let Some(b) = backend() else { return };
    let d = probe(&["hold"])
        .with_env("ZED", "last=first")
        .with_env("A", "")
        .with_env("SECRET", "s3cr3t value");
    let id = d.spec.id.clone();
    let h = b.create(&d).await.unwrap();
    let pid = h.host_pid.expect("host pid");
    // Create returns once the workload's exec is past its point of no return; its environ is
    // laid out a moment later.
    assert!(cellcheck_fixtures::await_exec_settled(
        pid,
        std::time::Duration::from_secs(10)
    ));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert_eq!(environ, b"ZED=last=first\0A=\0SECRET=s3cr3t value\0");
    // No host process has the secret on its command line.
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            assert!(
                !c.windows(6).any(|w| w == b"s3cr3t"),
                "secret in argv of {:?}",
                e.path()
            );
        }
    }
    // The config file that carried it is gone.
    let left: Vec<_> = std::fs::read_dir(b.state_dir(&id))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.contains("config")), "{left:?}");
    finish(&b, &id).await;

    let d = probe(&["env"]).with_env("K", "v").with_env("PATHLESS", "1");
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.stdout, b"K=v\0PATHLESS=1\0");
    finish(&b, &id).await;
}

#[tokio::test]
async fn fds_are_exactly_stdio_even_when_the_caller_leaks() {
    let Some(b) = backend() else { return };
    // Fds without close-on-exec in the caller, the kind a sloppy harness leaks.
    let mut held = Vec::new();
    for _ in 0..3 {
        // SAFETY: opening /dev/null without O_CLOEXEC on purpose.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        assert!(fd >= 0);
        held.push(fd);
    }
    let d = probe(&["hold"]);
    let id = d.spec.id.clone();
    let h = b.create(&d).await.unwrap();
    let pid = h.host_pid.unwrap();
    // The probe's own start-up briefly holds an fd; it says when it holds nothing of its own.
    cellcheck_fixtures::ready::await_ready(pid, std::time::Duration::from_secs(15))
        .unwrap_or_else(|s| panic!("probe never became ready: {s:?}"));
    let fds: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(fds, ["0", "1", "2"].map(String::from).into());
    let state = b.state_dir(&id);
    let out = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    assert_eq!(
        out,
        state.join("stdout"),
        "stdout is the backend's capture file"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
        Path::new("/dev/null")
    );
    finish(&b, &id).await;

    let d = probe(&["fds"]);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    assert_eq!(b.wait(&id).await.unwrap().stdout_str(), "0 1 2\n");
    finish(&b, &id).await;
    for fd in held {
        // SAFETY: closing the fds opened above.
        unsafe { libc::close(fd) };
    }
}

#[tokio::test]
async fn hostname_network_and_pid_views_are_the_cells() {
    let Some(b) = backend() else { return };
    for (args, want) in [(&["hostname"][..], "ID\n"), (&["netifs"][..], "lo\n")] {
        let d = probe(args);
        let id = d.spec.id.clone();
        b.create(&d).await.unwrap();
        let r = b.wait(&id).await.unwrap();
        assert_eq!(r.stdout_str(), want.replace("ID", &id), "{args:?}");
        finish(&b, &id).await;
    }
    let d = probe(&["pids"]);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let out = b.wait(&id).await.unwrap().stdout_str();
    // Only the cell's init and the probe itself.
    assert_eq!(out, "1 2\nself=2\n");
    finish(&b, &id).await;
    // Loopback is up.
    let d = sh("cat /sys/class/net/lo/operstate /sys/class/net/lo/flags");
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let out = b.wait(&id).await.unwrap().stdout_str();
    let flags =
        u32::from_str_radix(out.lines().nth(1).unwrap().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is up: {out}");
    finish(&b, &id).await;
}

#[tokio::test]
async fn an_id_of_the_full_length_runs_and_its_hostname_is_its_first_64_bytes() {
    let Some(b) = backend() else { return };
    let id: String = format!("long{:08x}-", rand::random::<u32>())
        .chars()
        .cycle()
        .take(cellcheck_contract::spec::MAX_ID_LEN)
        .collect();
    b.create(&probe_id(&id, &["hostname"])).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.stdout_str(), format!("{}\n", &id[..64]), "{r:?}");
    finish(&b, &id).await;
}

#[tokio::test]
async fn memory_limit_ends_in_out_of_memory() {
    let Some(b) = backend() else { return };
    let d = probe(&["alloc", "256"]).with_limits(Limits {
        memory_max_bytes: Some(32 << 20),
        ..Limits::default()
    });
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(
        r.termination,
        Termination::OutOfMemory,
        "{}",
        r.stdout_str()
    );
    finish(&b, &id).await;
    // Within the limit it runs to the end.
    let d = probe(&["alloc", "8"]).with_limits(Limits {
        memory_max_bytes: Some(64 << 20),
        ..Limits::default()
    });
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.termination, Termination::Exited { code: 0 });
    assert_eq!(r.stdout_str(), "allocated=8\n");
    finish(&b, &id).await;
}

#[tokio::test]
async fn pids_limit_caps_fork() {
    let Some(b) = backend() else { return };
    let d = probe(&["fork", "20"]).with_limits(Limits {
        pids_max: Some(8),
        ..Limits::default()
    });
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let out = b.wait(&id).await.unwrap().stdout_str();
    // pidsMax counts the workload's tasks alone (not the backend's init): the probe and 7 children.
    assert_eq!(out, "forked=7 failed=13\n");
    finish(&b, &id).await;
}

#[tokio::test]
async fn destroy_kills_daemonized_grandchildren() {
    let Some(b) = backend() else { return };
    let marker = format!("mark-{:08x}", rand::random::<u32>());
    let d = probe(&["daemon"]).with_env("CELLCHECK_MARK", &marker);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let t0 = Instant::now();
    while processes_with(&marker).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "daemon did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = b.destroy(&id).await.unwrap();
    assert!(t.killed_running);
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
    assert_clean(&b.footprint(&id));

    // A daemon left behind by a workload that exited is gone too.
    let d = probe(&["daemon-exit"]).with_env("CELLCHECK_MARK", &marker);
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.code(), Some(0));
    assert_eq!(
        processes_with(&marker),
        Vec::<u32>::new(),
        "pid 1's exit ends the cell"
    );
    finish(&b, &id).await;
}

#[tokio::test]
async fn ids_duplicate_twice_and_reuse() {
    let Some(b) = backend() else { return };
    let d = probe_id("same", &["hold"]);
    b.create(&d).await.unwrap();
    assert_eq!(
        b.create(&d).await.unwrap_err(),
        CellError::AlreadyExists { id: "same".into() }
    );
    let t = b.destroy("same").await.unwrap();
    assert!(t.killed_running);
    assert_eq!(
        b.destroy("same").await.unwrap_err(),
        CellError::cell_not_found("same")
    );
    assert_clean(&b.footprint("same"));
    b.create(&d).await.unwrap();
    let other = probe_id("other", &["hold"]);
    b.create(&other).await.unwrap();
    assert_eq!(
        b.list().await,
        vec!["other".to_string(), "same".to_string()]
    );
    assert_eq!(b.destroy("same").await.unwrap().remaining_cells, 1);
    finish(&b, "other").await;
}

#[tokio::test]
async fn concurrent_destroys_exactly_one_wins() {
    let Some(b) = backend() else { return };
    for round in 0..3 {
        let id = format!("race{round}");
        b.create(&probe_id(&id, &["tree", "3"])).await.unwrap();
        let (x, y, z) = tokio::join!(b.destroy(&id), b.destroy(&id), b.destroy(&id));
        let oks = [&x, &y, &z].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "{x:?} {y:?} {z:?}");
        for r in [x, y, z] {
            if let Err(e) = r {
                assert_eq!(e, CellError::cell_not_found(&id));
            }
        }
        assert_clean(&b.footprint(&id));
    }
    assert!(!b.config().state_root.exists());
}

#[tokio::test]
async fn dropping_the_backend_destroys_its_cells() {
    let Some(b) = backend() else { return };
    let d = probe(&["tree", "2"]);
    let fp = b.footprint(&d.spec.id);
    b.create(&d).await.unwrap();
    let root = b.config().state_root.clone();
    drop(b);
    assert_clean(&fp);
    assert!(!root.exists());
}

#[tokio::test]
async fn capabilities_preflight_and_attributes() {
    let Some(b) = backend() else { return };
    let caps = b.capabilities();
    for c in Capability::ALL {
        if c == Capability::Snapshot {
            match caps.support(c) {
                Support::Unsupported { reason } => {
                    assert!(reason.starts_with("criu"), "{reason}")
                }
                Support::Supported => panic!("snapshot is not implemented"),
            }
        } else if c == Capability::VmmConfinement {
            assert!(!caps.has(c), "the host backend has no VMM");
        } else {
            assert!(caps.has(c), "{c}");
        }
    }
    assert_eq!(b.capabilities(), caps);
    let a = b.attributes();
    assert!(["v1", "v2"].contains(&a["cgroup"].as_str()) || a["cgroup"].starts_with("mixed"));
    let av = b.preflight().await;
    assert!(av.is_available(), "{av:?}");
    assert!(b.list().await.is_empty());
    assert!(!b.config().state_root.exists());
    assert_eq!(
        b.snapshot("x").await.unwrap_err(),
        CellError::Unsupported {
            capability: Capability::Snapshot
        }
    );
}

#[tokio::test]
async fn missing_init_is_unavailable_with_the_path() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the host backend needs root");
        return;
    }
    let b = HostBackend::new(HostConfig::new("/nonexistent/init", "/nonexistent/rootfs"));
    match b.preflight().await {
        cellcheck_contract::Availability::Unavailable { reason } => {
            assert!(reason.contains("/nonexistent/init"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cpu_max_is_written_to_the_cells_cgroup() {
    let Some(b) = backend() else { return };
    let mut d = probe(&["hold"]);
    d.spec.run.limits = Some(Limits {
        cpu_max: Some(cellcheck_contract::spec::CpuMax {
            quota: 20_000,
            period: 100_000,
        }),
        ..Limits::default()
    });
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let fp = b.footprint(&id);
    let cpu_dir = fp
        .cgroup_dirs
        .iter()
        .find(|p| p.starts_with("/sys/fs/cgroup/cpu/"));
    let unified = fp.cgroup_dirs.iter().find(|p| p.join("cpu.max").exists());
    match (cpu_dir, unified) {
        (Some(dir), _) => {
            let q = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap();
            let p = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap();
            assert_eq!((q.trim(), p.trim()), ("20000", "100000"));
        }
        (None, Some(dir)) => {
            let m = std::fs::read_to_string(dir.join("cpu.max")).unwrap();
            assert_eq!(m.trim(), "20000 100000");
        }
        (None, None) => eprintln!("no cpu controller on this host; cpuMax is not enforced"),
    }
    finish(&b, &id).await;
}

/// What nested cells need: the host's cgroups and the fixtures inside, and namespaces creatable.
#[tokio::test]
async fn extra_binds_support_nested_cells() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the host backend needs root");
        return;
    }
    let fx = cellcheck_fixtures::ensure().unwrap();
    let mut cfg = HostConfig::from_fixtures(&fx);
    // Namespaces inside a cell need what a hardened cell refuses.
    cfg.privileged = true;
    cfg.extra_binds = vec![
        BindMount {
            source: "/sys/fs/cgroup".into(),
            target: "/sys/fs/cgroup".into(),
            readonly: false,
        },
        BindMount {
            source: fx.dir.clone(),
            target: "/run/fixtures".into(),
            readonly: true,
        },
    ];
    let b = HostBackend::new(cfg);
    let d = sh(
        "test -x /run/fixtures/bin/cellcheck-host-init || exit 10; \
         test -e /sys/fs/cgroup/pids/cgroup.procs -o -e /sys/fs/cgroup/cgroup.controllers || exit 11; \
         touch /run/fixtures/x 2>/dev/null && exit 12; \
         /bin/busybox unshare -m -u -i -n -p -f /bin/busybox hostname inner || exit 13; \
         hostname",
    );
    let id = d.spec.id.clone();
    b.create(&d).await.unwrap();
    let r = b.wait(&id).await.unwrap();
    assert_eq!(r.code(), Some(0), "{}", r.stderr_str());
    assert_eq!(
        r.stdout_str(),
        format!("{id}\n"),
        "the inner uts namespace did not leak out"
    );
    finish(&b, &id).await;
}

#[tokio::test]
async fn an_abandoned_create_still_ends_in_a_live_cell_that_destroy_removes() {
    let Some(b) = backend() else { return };
    let d = probe(&["hold"]);
    let id = d.spec.id.clone();
    let r = tokio::time::timeout(Duration::from_micros(1), b.create(&d)).await;
    if r.is_err() {
        let t0 = Instant::now();
        while !b.list().await.contains(&id) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "create never finished"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(
        b.create(&d).await.unwrap_err(),
        CellError::AlreadyExists { id: id.clone() }
    );
    let t = b.destroy(&id).await.unwrap();
    assert!(t.killed_running);
    assert_clean(&b.footprint(&id));
}
