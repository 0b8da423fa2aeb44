//! Self-tests of the suite: each injected fault must make the scenarios meant to catch it fail
//! with a message naming the leak, while the same scenarios pass on the plain host backend.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cellcheck_conformance::faulty::{Fault, FaultyBackend};
use cellcheck_conformance::{ids, roots, run_scenario, run_scenario_bounded};
use cellcheck_contract::Backend;
use libtest_mimic::{Arguments, Failed, Trial};

mod fault_cases;
use fault_cases::{Needles, CASES};

/// The fixtures with the private rootfs copy of the backend named `name`, as the suite hands
/// them to a backend it builds.
fn fixtures_for(name: &str) -> cellcheck_fixtures::Fixtures {
    let fx = cellcheck_fixtures::ensure().expect("fixtures");
    roots::fixtures_for(name, &fx).expect("a private rootfs copy")
}

/// The plain host backend, in its own rootfs copy.
fn host() -> Arc<dyn Backend> {
    static HOST: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    HOST.get_or_init(|| {
        Arc::new(cellcheck_host::HostBackend::new(
            cellcheck_host::HostConfig::from_fixtures(&fixtures_for("host")),
        ))
    })
    .clone()
}

/// The host backend a faulty backend wraps: in the rootfs copy of `faulty-host`, the name its
/// trials run under, so a fault writing into the root the backend was given writes there.
fn faulty_inner() -> Arc<dyn Backend> {
    static HOST: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    HOST.get_or_init(|| {
        Arc::new(cellcheck_host::HostBackend::new(
            cellcheck_host::HostConfig::from_fixtures(&fixtures_for("faulty-host")),
        ))
    })
    .clone()
}

/// A host backend that does not harden its cells (as a nested cell's outer layer): the inner
/// backend of the faults that forget hardening, which still claim it.
fn unhardened_host() -> Arc<dyn Backend> {
    static HOST: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut cfg = cellcheck_host::HostConfig::from_fixtures(&fixtures_for("faulty-host"));
        cfg.privileged = true;
        Arc::new(cellcheck_host::HostBackend::new(cfg))
    })
    .clone()
}

/// DropLimits over QEMU: the VM a limited cell gets must let an unlimited cell survive what the
/// limit forbids, or the guest runs out anyway and `limits::memory_oom` passes without a limit.
fn drop_limits_on_qemu() -> Result<(), Failed> {
    let cfg = cellcheck_qemu::QemuConfig::from_fixtures(&cellcheck_fixtures::ensure()?);
    let qemu = std::process::Command::new(&cfg.qemu_bin)
        .arg("--version")
        .output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        println!("skipped: {} is not runnable", cfg.qemu_bin.display());
        return Ok(());
    }
    let faulty = FaultyBackend::new(
        Arc::new(cellcheck_qemu::QemuBackend::new(cfg)),
        Fault::DropLimits,
    );
    let faulty = Arc::new(faulty);
    let verdict = run_scenario_bounded(faulty.clone(), "limits::memory_oom", Some(FAULT_BOUND));
    faulty.cleanup_created();
    let msg = verdict
        .err()
        .ok_or("limits::memory_oom passed on qemu despite DropLimits")?;
    println!("--- DropLimits caught by limits::memory_oom on qemu:\n{msg}\n");
    match msg.contains("expected OutOfMemory, got Exited") {
        true => Ok(()),
        false => Err("the failure message lacks \"expected OutOfMemory, got Exited\"".into()),
    }
}

/// The progress bound of a fault trial: a hung backend is caught within it, while one residue
/// check on a heavily loaded host (it took over 20 s at load 30) is not mistaken for a hang.
const FAULT_BOUND: Duration = Duration::from_secs(60);

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn fault_trial(
    name: String,
    fault: Fault,
    scenarios: &'static [&'static str],
    needles: Needles,
) -> Trial {
    Trial::test(name, move || {
        let mut problems = Vec::new();
        for sc in scenarios {
            let inner = if fault.needs_unhardened_inner() {
                unhardened_host()
            } else {
                faulty_inner()
            };
            let faulty = Arc::new(FaultyBackend::new(inner, fault));
            let verdict = run_scenario_bounded(faulty.clone(), sc, Some(FAULT_BOUND));
            let wanted = needles(&faulty);
            let leaked = faulty.leaked_pids();
            let cleaned = faulty.cleanup_created();
            for pid in &leaked {
                if pid_alive(*pid) {
                    problems.push(format!("{sc}: leaked pid {pid} survived cleanup"));
                }
            }
            match verdict {
                Ok(()) => problems.push(format!("{sc}: passed despite {fault:?}")),
                Err(msg) => {
                    println!("--- {fault:?} caught by {sc}:\n{msg}\n");
                    if wanted.is_empty() {
                        problems.push(format!("{sc}: nothing to look for in the message:\n{msg}"));
                    }
                    for n in &wanted {
                        if !msg.contains(n.as_str()) {
                            problems.push(format!("{sc}: failure message lacks {n:?}:\n{msg}"));
                        }
                    }
                }
            }
            if matches!(fault, Fault::SkipCgroupRemoval | Fault::LeaveStateFile)
                && cleaned.is_empty()
            {
                problems.push(format!(
                    "{sc}: {fault:?} left nothing to clean up, so it never ran"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Failed::from(problems.join("\n")))
        }
    })
}

/// A trial that fails over the host backend ends its message with what the host backend traced
/// for the trial's cell: its create, wait and destroy spans with their key events, in order.
fn trace_in_failure() -> Result<(), Failed> {
    let faulty = Arc::new(FaultyBackend::new(faulty_inner(), Fault::MisreportExit));
    let verdict = run_scenario_bounded(faulty.clone(), "exit::code_42", None);
    faulty.cleanup_created();
    let msg = match verdict {
        Ok(()) => return Err("exit::code_42 passed despite MisreportExit".into()),
        Err(m) => m,
    };
    let at = msg
        .rfind("\ntrace of cell ")
        .ok_or_else(|| format!("no trace section in:\n{msg}"))?;
    let (before, trace) = msg.split_at(at);
    // The cell the harness named is the one traced, and nothing follows the trace.
    let cell = before
        .lines()
        .find_map(|l| l.strip_prefix("cells touched: "))
        .ok_or_else(|| format!("no cells line in:\n{msg}"))?;
    let mut problems = Vec::new();
    if !trace.starts_with(&format!("\ntrace of cell {cell} (")) {
        problems.push(format!("the trace is not {cell:?}'s"));
    }
    let lines: Vec<&str> = trace.lines().skip(2).collect();
    if lines.iter().any(|l| !l.starts_with("  ")) {
        problems.push("something other than trace lines follows the trace".into());
    }
    // In order: each wanted line after the previous one.
    let mut from = 0;
    for want in [
        "host{op=\"create\" backend=host}: begin",
        "cgroup made",
        "init spawned",
        "host{op=\"create\" backend=host}: end after",
        "host{op=\"wait\" backend=host}: begin",
        "host{op=\"destroy\" backend=host}: begin",
        "teardown over",
    ] {
        match lines[from..].iter().position(|l| l.contains(want)) {
            Some(i) => from += i + 1,
            None => problems.push(format!("no {want:?} after line {from}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\nin:\n{msg}", problems.join("\n")).into())
    }
}

/// The harness's hang detector bounds progress, not total time: a scenario slowed down by a loaded
/// host must pass, a silent one and an endless one must fail, each saying which bound it hit.
fn watchdog_trial() -> Trial {
    use cellcheck_conformance::harness::{run_scenario_async, BoxFuture};
    use cellcheck_conformance::{Ctx, Failure, Scenario};
    fn steps(ctx: Ctx, n: u32) -> BoxFuture<'static, Result<(), Failure>> {
        Box::pin(async move {
            for i in 0..n {
                ctx.step(format!("step {i}"));
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Ok(())
        })
    }
    fn slow(ctx: Ctx) -> BoxFuture<'static, Result<(), Failure>> {
        steps(ctx, 6)
    }
    fn endless(ctx: Ctx) -> BoxFuture<'static, Result<(), Failure>> {
        steps(ctx, u32::MAX)
    }
    fn silent(ctx: Ctx) -> BoxFuture<'static, Result<(), Failure>> {
        Box::pin(async move {
            ctx.step("silent");
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        })
    }
    Trial::test(
        "harness::hang_detector_bounds_progress_not_total_time",
        || {
            let rt = tokio::runtime::Runtime::new().map_err(|e| Failed::from(e.to_string()))?;
            let run = |name, f| {
                let sc = Scenario::new("self", name, &[], f).with_timeout(Duration::from_secs(1));
                rt.block_on(run_scenario_async(host(), sc))
            };
            let slow = run("slow", slow as fn(Ctx) -> _);
            if !slow.passed {
                return Err(format!(
                    "a slow scenario that kept stepping failed:\n{}",
                    slow.message
                )
                .into());
            }
            let silent = run("silent", silent as fn(Ctx) -> _);
            if silent.passed || !silent.message.contains("made no progress for 1 s") {
                return Err(format!(
                    "a silent scenario was not caught as hung:\n{}",
                    silent.message
                )
                .into());
            }
            let endless = run("endless", endless as fn(Ctx) -> _);
            if endless.passed || !endless.message.contains("did not finish within 8 s") {
                return Err(
                    format!("an endless scenario was not bounded:\n{}", endless.message).into(),
                );
            }
            Ok(())
        },
    )
}

fn main() -> ExitCode {
    // Before any thread: the canary goes into this process's env.
    ids::canary();
    let args = Arguments::from_args();
    let mut trials: Vec<Trial> = CASES
        .iter()
        .map(|(f, s, n)| {
            // A fault proven by several cases gets one trial per case, named by its scenario.
            let shared = CASES.iter().filter(|(g, _, _)| g == f).count() > 1;
            let name = match s.first() {
                Some(sc) if shared => format!("faults::{f:?}::{}", sc.replace("::", "_")),
                _ => format!("faults::{f:?}"),
            };
            fault_trial(name, *f, s, *n)
        })
        .collect();
    let mut all: Vec<&'static str> = CASES
        .iter()
        .flat_map(|(_, s, _)| s.iter().copied())
        .collect();
    all.sort();
    all.dedup();
    trials.push(Trial::test(
        "faults::DropLimits::limits_memory_oom_qemu",
        drop_limits_on_qemu,
    ));
    trials.push(Trial::test(
        "faults::failure_message_ends_with_the_backends_trace",
        trace_in_failure,
    ));
    trials.push(Trial::test(
        "faults::plain_host_passes_the_same_scenarios",
        move || {
            // A scenario the plain host declares unsupported (the VMM checks: it has no VMM) is
            // proven by its fault alone.
            let caps = host().capabilities();
            let applies = |sc: &&&str| {
                cellcheck_conformance::scenarios::all()
                    .iter()
                    .find(|s| s.path() == **sc)
                    .is_none_or(|s| s.missing_capability(&caps).is_none())
            };
            let failures: Vec<String> = all
                .iter()
                .filter(applies)
                .filter_map(|sc| {
                    run_scenario(host(), sc)
                        .err()
                        .map(|m| format!("{sc}:\n{m}"))
                })
                .collect();
            if failures.is_empty() {
                Ok(())
            } else {
                Err(Failed::from(failures.join("\n")))
            }
        },
    ));
    trials.push(watchdog_trial());
    libtest_mimic::run(&args, trials).exit_code()
}
