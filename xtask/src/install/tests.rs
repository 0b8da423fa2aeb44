use super::*;

mod masked;

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn bare_host() -> Host {
    Host {
        root: true,
        apt: true,
        found: BTreeMap::new(),
        configured: BTreeMap::new(),
    }
}

fn actions(steps: &[Step]) -> Vec<(&str, &Action)> {
    steps
        .iter()
        .map(|s| (s.runtime.binary, &s.action))
        .collect()
}

#[test]
fn as_root_with_apt_every_missing_runtime_of_the_run_is_installed() {
    let rt = runtimes("x86_64");
    let all = set(&[
        "host",
        "runc",
        "crun",
        "runsc",
        "qemu",
        "nested",
        "remote-python",
    ]);
    let steps = plan(&rt, &all, &bare_host(), false);
    let bins: Vec<&str> = steps.iter().map(|s| s.runtime.binary).collect();
    assert_eq!(
        bins,
        ["runc", "crun", "runsc", "qemu-system-x86_64", "criu"]
    );
    assert!(
        steps.iter().all(|s| s.action == Action::Install),
        "{steps:#?}"
    );
    let pkgs: Vec<&str> = steps.iter().map(|s| s.runtime.package).collect();
    assert_eq!(pkgs, ["runc", "crun", "runsc", "qemu-system-x86", "criu"]);
    assert_eq!(
        command("qemu-system-x86"),
        "apt-get install -y --no-install-recommends qemu-system-x86"
    );
}

#[test]
fn only_the_selected_backends_runtimes_and_what_the_arch_has_are_planned() {
    let rt = runtimes("x86_64");
    let host_only = plan(&rt, &set(&["host"]), &bare_host(), false);
    assert_eq!(actions(&host_only), [("criu", &Action::Install)]);
    let python = plan(&rt, &set(&["remote-python"]), &bare_host(), false);
    assert_eq!(actions(&python), [("runc", &Action::Install)]);
    assert!(plan(&rt, &set(&["my-driver"]), &bare_host(), false).is_empty());
    // Never a package the host cannot use: another architecture's QEMU, or no gVisor at all.
    let arm: Vec<_> = runtimes("aarch64").into_iter().map(|r| r.package).collect();
    assert!(arm.contains(&"qemu-system-arm") && !arm.contains(&"qemu-system-x86"));
    let riscv: Vec<_> = runtimes("riscv64").into_iter().map(|r| r.binary).collect();
    assert_eq!(riscv, ["runc", "crun", "criu"]);
}

#[test]
fn without_installing_each_missing_runtime_names_the_command_that_adds_it() {
    let rt = runtimes("x86_64");
    let want = set(&["runc", "crun"]);
    let cases = [
        (bare_host(), true, "not installed (--no-install); `apt-get install -y --no-install-recommends runc` adds it"),
        (Host { root: false, ..bare_host() }, false, "not installed (not root); `apt-get install -y --no-install-recommends runc` as root adds it"),
        (Host { apt: false, ..bare_host() }, false, "not installed (no apt-get here); Debian's package runc adds it (`apt-get install -y --no-install-recommends runc`)"),
    ];
    for (host, no_install, want_why) in cases {
        let steps = plan(&rt, &want, &host, no_install);
        assert_eq!(steps[0].action, Action::Skip(want_why.into()), "{steps:#?}");
        assert_eq!(
            steps[0].hint().unwrap(),
            format!("runc is missing: {want_why}")
        );
        assert!(
            matches!(&steps[1].action, Action::Skip(w) if w.contains("--no-install-recommends crun"))
        );
    }
}

#[test]
fn a_present_or_configured_runtime_is_left_alone() {
    let rt = runtimes("x86_64");
    let mut host = bare_host();
    host.found.insert("runc", PathBuf::from("/usr/sbin/runc"));
    host.configured
        .insert("CELLCHECK_CRUN_BIN", "/opt/crun".into());
    let steps = plan(&rt, &set(&["runc", "crun"]), &host, false);
    assert_eq!(
        actions(&steps),
        [
            ("runc", &Action::Present("/usr/sbin/runc".into())),
            (
                "crun",
                &Action::Configured("CELLCHECK_CRUN_BIN=/opt/crun".into())
            ),
        ]
    );
    assert!(steps.iter().all(|s| s.hint().is_none()));
}

#[test]
fn apt_saying_it_lacks_the_package_leads_to_one_update() {
    assert!(lists_lack_it("E: Unable to locate package runsc"));
    assert!(lists_lack_it(
        "E: Package 'crun' has no installation candidate"
    ));
    assert!(lists_lack_it(
        "Err:1 http://deb.debian.org/debian bookworm/main amd64 runc amd64 1.1\n  404  Not Found"
    ));
    assert!(!lists_lack_it(
        "E: Could not get lock /var/lib/dpkg/lock-frontend"
    ));
    assert_eq!(last_line("a\nb\n\n"), "b");
}
