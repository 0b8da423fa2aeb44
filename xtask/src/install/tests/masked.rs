//! The main command on a host whose runtimes and busybox are hidden: each is masked by an empty
//! file bind-mounted over it in a private mount namespace (`unshare --mount`), so nothing is
//! uninstalled and nothing leaks to the host. Inside, `--no-install` names each runtime's install
//! command, busybox is fetched without the system package and the host backend still runs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cellcheck_conformance::results::Outcome;

use super::super::*;
use crate::conformance::{run_in, Options};
use crate::report::Report;

const INNER: &str = "install::tests::masked::inside_a_private_mount_namespace";
const WORK: &str = "CELLCHECK_MASKED_TEST_WORK";
const BUILT: &str = "CELLCHECK_MASKED_TEST_BUILT";
/// The mount namespace of the test that starts the inner one, which must not be the inner's.
const OUTER_NS: &str = "CELLCHECK_MASKED_TEST_OUTER_NS";

fn mount_ns() -> PathBuf {
    std::fs::read_link("/proc/self/ns/mnt").unwrap()
}

#[test]
fn with_runtimes_and_busybox_hidden_the_main_command_runs_the_host_and_names_each_install() {
    let built = cellcheck_fixtures::ensure().unwrap();
    let work = tempfile::tempdir().unwrap();
    let rt = runtimes(std::env::consts::ARCH);
    let before: Vec<Option<PathBuf>> = rt
        .iter()
        .map(|r| cellcheck_fixtures::host_tool(r.binary))
        .collect();
    // This test binary again, running only the inner test, in a mount namespace of its own
    // whose mounts never propagate back.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", INNER, "--ignored", "--nocapture"])
        .env(WORK, work.path())
        .env(BUILT, &built.dir)
        .env(OUTER_NS, mount_ns())
        .env("CELLCHECK_FIXTURES_DIR", work.path().join("fixtures"))
        .env_remove("CELLCHECK_BUSYBOX")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!(
        "{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(
        stdout.contains("1 passed"),
        "the inner test did not run:\n{all}"
    );
    // The console names each step the run would take.
    for r in &rt {
        let line = format!(
            "runtime {}: missing, not installed (--no-install); `{}` adds it",
            r.binary,
            command(r.package)
        );
        assert!(stdout.contains(&line), "{line:?} missing from:\n{all}");
    }
    // Nothing of the namespace leaked: the host's runtimes are where they were, and no mount of
    // ours is in this namespace.
    let after: Vec<Option<PathBuf>> = rt
        .iter()
        .map(|r| cellcheck_fixtures::host_tool(r.binary))
        .collect();
    assert_eq!(before, after);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours = work.path().to_string_lossy().to_string();
    assert!(!mountinfo.contains(&ours), "{mountinfo}");
}

/// Binds the empty file `empty` over every executable `binary` a lookup finds.
fn mask(binary: &str, empty: &Path) {
    for _ in 0..8 {
        let Some(p) = cellcheck_fixtures::host_tool(binary) else {
            return;
        };
        bind(empty, &p);
    }
    panic!("{binary} still found after masking it 8 times");
}

fn bind(from: &Path, over: &Path) {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let (src, dst) = (c(from), c(over));
    // SAFETY: valid NUL-terminated paths; a bind mount takes no fs type or data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    let err = std::io::Error::last_os_error();
    assert_eq!(
        rc,
        0,
        "bind {} over {}: {err}",
        from.display(),
        over.display()
    );
}

#[test]
#[ignore = "the inside of the test above: it runs this in a private mount namespace"]
fn inside_a_private_mount_namespace() {
    let work = PathBuf::from(std::env::var_os(WORK).expect("run by the test above"));
    let built = PathBuf::from(std::env::var_os(BUILT).expect("run by the test above"));
    let outer = PathBuf::from(std::env::var_os(OUTER_NS).expect("run by the test above"));
    assert_ne!(mount_ns(), outer, "never mask in the outer mount namespace");

    let empty = work.join("empty");
    std::fs::write(&empty, "").unwrap();
    let rt = runtimes(std::env::consts::ARCH);
    for r in &rt {
        mask(r.binary, &empty);
    }
    for b in cellcheck_fixtures::SYSTEM_BUSYBOX {
        if Path::new(b).exists() {
            bind(&empty, Path::new(b));
        }
    }

    // Fixtures from the static binaries alone: the rootfs needs a busybox, fetched from Debian.
    let fx_dir = work.join("fixtures");
    std::fs::create_dir_all(fx_dir.join("bin")).unwrap();
    for e in std::fs::read_dir(built.join("bin")).unwrap().flatten() {
        std::fs::copy(e.path(), fx_dir.join("bin").join(e.file_name())).unwrap();
    }
    let fx = cellcheck_fixtures::ensure_in(&fx_dir).unwrap();
    let fetched = std::fs::read(fx_dir.join("busybox/busybox")).expect("busybox was fetched");
    assert_eq!(
        std::fs::read(fx.rootfs.join("bin/busybox")).unwrap(),
        fetched
    );

    // The plan: every runtime missing; with --no-install each names its command, without it
    // (root, apt) each would be installed.
    let host = Host::current(&rt);
    assert!(host.found.is_empty(), "{host:?}");
    let wanted = selected(&[]);
    for s in plan(&rt, &wanted, &host, true) {
        let cmd = command(s.runtime.package);
        assert!(
            matches!(&s.action, Action::Skip(w) if w.contains(&cmd)),
            "{s:?}"
        );
    }
    if host.root && host.apt {
        let dry = plan(&rt, &wanted, &host, false);
        assert_eq!(dry.len(), rt.len());
        assert!(dry.iter().all(|s| s.action == Action::Install), "{dry:#?}");
    }

    // The main command, as the user runs it, over one host trial.
    let out = work.join("out");
    let opts = Options {
        no_install: true,
        filter: Some("test(=host::exit::code_42)".into()),
        repeat: 1,
        ..Default::default()
    };
    let passed = run_in(&opts, &out).unwrap();
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    let report: Report = serde_json::from_str(&text).unwrap();
    let log = std::fs::read_to_string(out.join("nextest.log")).unwrap_or_default();
    assert!(passed, "{:#?}\n{log}", report.problems);
    let host_trial = report
        .results
        .iter()
        .find(|r| r.id == "host::exit::code_42")
        .unwrap_or_else(|| panic!("{:#?}", report.results));
    assert_eq!(host_trial.outcome, Outcome::Pass, "{host_trial:#?}");
    for r in &rt {
        for b in r
            .backends
            .iter()
            .filter(|b| !["host", "nested"].contains(b))
        {
            let row = report.backends.iter().find(|s| s.name == *b).unwrap();
            assert!(!row.usable, "{row:?}");
            assert!(row.why.contains(&command(r.package)), "{row:?}");
            let skip = report.results.iter().find(|t| t.backend == *b).unwrap();
            assert_eq!(skip.outcome, Outcome::Skip, "{skip:#?}");
            assert!(skip.reason.contains(&command(r.package)), "{skip:#?}");
        }
    }
}
