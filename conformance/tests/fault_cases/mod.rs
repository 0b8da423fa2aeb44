//! The fault self-tests' table: each fault, the scenarios meant to catch it, and what must name
//! the leak in their failure message.

use cellcheck_conformance::faulty::{self, Fault, FaultyBackend};
use cellcheck_conformance::ids;
use cellcheck_contract::DEFAULT_OPEN_FILES;

/// What names the leak in the failure message, computed once the fault has run.
pub type Needles = fn(&FaultyBackend) -> Vec<String>;

pub const CASES: &[(Fault, &[&str], Needles)] = &[
    (
        Fault::LeakProcess,
        &["residue::after_exit", "lifecycle::destroy_running"],
        |f| f.leaked_pids().iter().map(|p| format!("pid {p}")).collect(),
    ),
    (
        Fault::LeakAmbientEnv,
        &[
            "isolation::no_ambient_canary",
            "isolation::env_inside",
            "isolation::environ_exact",
        ],
        |_| vec![ids::canary().name.clone()],
    ),
    (
        Fault::LeakFd,
        &["isolation::fds_inside", "isolation::fds_host"],
        |_| vec!["fd 7".into()],
    ),
    (
        Fault::MisreportExit,
        &["exit::code_42", "exit::code_0"],
        |_| vec!["code".into(), "got Exited".into()],
    ),
    (
        Fault::SkipCgroupRemoval,
        &["lifecycle::create_wait_destroy", "residue::after_exit"],
        |_| vec!["cgroup dir".into(), "cellcheck-faulty-cc-".into()],
    ),
    (Fault::LeaveStateFile, &["residue::after_exit"], |_| {
        vec!["path".into(), "cellcheck-faulty-cc-".into()]
    }),
    (
        Fault::PanicOnDoubleDestroy,
        &["lifecycle::double_destroy"],
        |_| vec!["panicked".into()],
    ),
    (Fault::HangOnWait, &["exit::code_42"], |_| {
        vec!["made no progress for 60 s".into()]
    }),
    (Fault::UndeclaredCgroupDir, &["residue::after_exit"], |f| {
        made_or_missing(f, &["cgroup dir", "[host audit]"])
    }),
    (Fault::UndeclaredFile, &["residue::after_exit"], |f| {
        made_or_missing(f, &["path", "[host audit]"])
    }),
    (Fault::UndeclaredMount, &["residue::after_exit"], |f| {
        made_or_missing(f, &["mount", "source cellcheck-faulty, type tmpfs"])
    }),
    (Fault::UndeclaredNetns, &["residue::after_exit"], |f| {
        made_or_missing(f, &["netns cellcheck-cc-"])
    }),
    (Fault::UnmarkedHelper, &["residue::after_exit"], |f| {
        let mut v: Vec<String> = f
            .leaked_pids()
            .iter()
            .map(|p| format!("pid {p} (state"))
            .collect();
        v.push("a descendant of the harness that mentions no cell".into());
        v
    }),
    (Fault::Zombie, &["residue::after_exit"], |f| {
        f.leaked_pids()
            .iter()
            .map(|p| format!("unreaped zombie child pid {p}"))
            .collect()
    }),
    (Fault::LateKill, &["lifecycle::destroy_running"], |_| {
        vec![
            "returned Ok while process pid".into(),
            "could still run".into(),
        ]
    }),
    (Fault::SecretToFile, &["isolation::secret_hygiene"], |f| {
        made_or_missing(f, &["holds a declared secret"])
    }),
    (Fault::WriteSharedRootfs, &["residue::after_exit"], |f| {
        made_or_missing(
            f,
            &[
                "rootfs changed",
                "added in the private rootfs copy of backend faulty-host (cell cc-",
            ],
        )
    }),
    (Fault::CreateMissingCwd, &["residue::after_exit"], |f| {
        made_or_missing(
            f,
            &[
                "rootfs changed",
                "/work added in the private rootfs copy of backend faulty-host, which only its \
                 cells use (trial of it in this window: faulty-host::residue::after_exit)",
            ],
        )
    }),
    (
        Fault::AdmissionTooStrict,
        &[
            "spec::admits_env_unicode_value",
            "spec::admits_argv_unicode",
        ],
        |_| vec!["InvalidSpec".into(), "not ASCII".into()],
    ),
    (
        Fault::AdmissionTooStrict,
        &["spec::admits_id_128_chars", "isolation::hostname_long_id"],
        |_| vec!["InvalidSpec".into(), "longer than 64".into()],
    ),
    (Fault::AdmissionTooLax, &["spec::refused_table"], |_| {
        vec![
            "env_duplicate: created cell".into(),
            "timeout_over_ttl: created cell".into(),
        ]
    }),
    (
        Fault::FoldExitAsSignal,
        &["exit::codes_126_to_192", "exit::signals_beside_codes"],
        |_| vec!["exit 129".into(), "Signaled { signal: 1 }".into()],
    ),
    (
        Fault::FoldExitAsSignal,
        &["exec::codes_and_signals"],
        |_| vec!["exit 129: got Signaled { signal: 1 }".into()],
    ),
    (
        Fault::FoldSignalAsExit,
        &["exit::signals_beside_codes"],
        |_| vec!["death by signal 9".into(), "Exited { code: 137 }".into()],
    ),
    (Fault::MangleOutput, &["exit::output_bytes_exact"], |_| {
        vec!["stdout bytes".into()]
    }),
    (
        Fault::MergeStreams,
        &["exit::streams_apart", "exit::output_bytes_exact"],
        |_| vec!["stdout".into()],
    ),
    (Fault::ForgetOutputOnRewait, &["exit::wait_twice"], |_| {
        vec!["second wait".into()]
    }),
    (
        Fault::TimeoutOnlyWhileWaiting,
        &["exit::timeout_unwaited"],
        |_| vec!["still alive".into(), "while nobody waits".into()],
    ),
    (
        Fault::TtlDroppedWithTimeout,
        &["exit::timeout_with_ttl"],
        |_| vec!["still listed".into(), "TTL is 3 s".into()],
    ),
    (Fault::CrossTalk, &["lifecycle::many_cells"], |_| {
        vec!["not their own cell's".into()]
    }),
    (Fault::ExecAmbientEnv, &["exec::env_exact"], |_| {
        vec![ids::canary().name.clone()]
    }),
    (Fault::ExecLeaksFd, &["exec::fds_only_stdio"], |_| {
        vec!["0 1 2 7".into()]
    }),
    (
        Fault::ExecMisreportEnd,
        &["exec::codes_and_signals"],
        |_| {
            vec![
                "exit 42: got Exited { code: 43 }".into(),
                "signal 15: got".into(),
            ]
        },
    ),
    (Fault::ExecSharedReport, &["exec::concurrent"], |_| {
        vec!["concurrent execs got wrong reports".into()]
    }),
    (Fault::ExecIgnoresTimeout, &["exec::timeout"], |_| {
        vec!["expected DeadlineExceeded".into()]
    }),
    (
        Fault::ExecAfterEndUntyped,
        &["exec::after_workload_ended"],
        |_| vec!["BackendFailure".into()],
    ),
    (
        Fault::IgnoreWorkingDirectory,
        &["isolation::working_directory"],
        |_| vec!["expected \"/bin\"".into()],
    ),
    (
        Fault::MissingCwdStartsAtRoot,
        &["isolation::missing_working_directory"],
        |_| {
            vec![
                "expected NotFound(working directory".into(),
                "got Ok(".into(),
            ]
        },
    ),
    (
        Fault::MakeMissingCwd,
        &["isolation::missing_working_directory"],
        |f| made_or_missing(f, &["got Ok(", "the directory was made in the root"]),
    ),
    (
        Fault::CapabilitiesUnstable,
        &["lifecycle::capabilities_stable_and_typed"],
        |_| vec!["capabilities changed between calls".into()],
    ),
    (
        Fault::UnsupportedUntyped,
        &["lifecycle::capabilities_stable_and_typed"],
        |_| {
            vec![
                "pause is declared unsupported".into(),
                "BackendFailure".into(),
            ]
        },
    ),
    (
        Fault::PauseNoop,
        &["pause::stops_the_clock_without_exec"],
        |_| vec!["did not stop".into()],
    ),
    (Fault::PauseNoop, &["pause::counter_stops"], |_| {
        vec!["the counter moved from".into(), "could add at most".into()]
    }),
    (
        Fault::Unhardened,
        &["hardening::capabilities_empty"],
        |_| {
            vec![
                "the workload holds capabilities".into(),
                "eff=0x".into(),
                "bnd=0x".into(),
            ]
        },
    ),
    (Fault::Unhardened, &["hardening::no_new_privs"], |_| {
        vec!["no_new_privs is not set".into(), "Some(0)".into()]
    }),
    (Fault::Unhardened, &["hardening::seccomp_filter"], |_| {
        vec!["no seccomp filter".into(), "Some(0)".into()]
    }),
    (
        Fault::Unhardened,
        &["hardening::dangerous_syscalls"],
        |_| vec!["dangerous syscalls were not refused".into()],
    ),
    (Fault::Unhardened, &["hardening::exec_hardened"], |_| {
        vec!["an exec'd command holds capabilities".into()]
    }),
    (Fault::Unhardened, &["hardening::mount_refused"], |_| {
        vec!["the workload could mount".into(), "tmpfs".into()]
    }),
    (Fault::Unhardened, &["hardening::cgroup_view"], |_| {
        vec!["no cgroup namespace".into()]
    }),
    (Fault::Unhardened, &["hardening::hostile_script"], |_| {
        vec![
            "escape attempts were not refused".into(),
            "mount_tmpfs: succeeded".into(),
            "unshare_user: succeeded".into(),
            "chroot: succeeded".into(),
        ]
    }),
    (Fault::ExtraDevice, &["hardening::dev_minimal"], |_| {
        vec![
            "/dev holds nodes beyond the standard set".into(),
            format!("{:?}", faulty::EXTRA_DEVICE),
        ]
    }),
    (Fault::WritableRoot, &["hardening::readonly_root"], |_| {
        vec!["the root filesystem is writable".into()]
    }),
    (Fault::WritableRoot, &["hardening::hostile_script"], |_| {
        vec![
            "escape attempts were not refused".into(),
            "write_root: succeeded (created /.hostile-".into(),
        ]
    }),
    (
        Fault::WrongHostPid,
        &["lifecycle::host_pid_is_the_workload"],
        |_| vec!["but the workload runs as host pid".into()],
    ),
    (Fault::UnconfinedVmm, &["hardening::vmm_confined"], |_| {
        vec![
            "the cell's VMM is not confined".into(),
            "CapEff is".into(),
            "NoNewPrivs is Some(\"0\"), want 1".into(),
            "Seccomp is Some(\"0\"), want 2".into(),
        ]
    }),
    (Fault::DropLimits, &["limits::memory_oom"], |_| {
        vec!["expected OutOfMemory, got Exited".into()]
    }),
    (Fault::DropLimits, &["limits::pids_max"], |_| {
        vec!["all 64 forks succeeded under pidsMax = 16".into()]
    }),
    (Fault::DropLimits, &["hardening::cpu_max"], |_| {
        vec!["cpuMax not enforced: a busy loop got".into()]
    }),
    (
        Fault::DropOpenFiles,
        &["hardening::rlimits_declared"],
        |_| {
            vec![
                "want (200, 300)".into(),
                format!(
                    "is (Some({}), Some({}))",
                    DEFAULT_OPEN_FILES.soft, DEFAULT_OPEN_FILES.hard
                ),
            ]
        },
    ),
];

/// What an undeclared fault made, by name, plus `also`; a needle no message has when the fault
/// made nothing (so it never ran).
fn made_or_missing(f: &FaultyBackend, also: &[&str]) -> Vec<String> {
    let made = f.made();
    let mut v: Vec<String> = also.iter().map(|s| s.to_string()).collect();
    if made.is_empty() {
        v.push(format!("<{:?} made nothing>", f.fault()));
    }
    v.extend(made);
    v
}
