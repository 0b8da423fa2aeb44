//! Running one trial: the fd sentinels, the count of active trials and [`run_scenario_async`].

use super::*;

/// Fds the harness holds open WITHOUT close-on-exec for its whole life: a pipe, a unix socket
/// pair and a file. A backend with sloppy spawn hygiene hands them to the workload.
#[derive(Debug)]
pub struct Sentinels {
    pub fds: Vec<(i32, &'static str)>,
}

static SENTINELS: OnceLock<Sentinels> = OnceLock::new();

pub fn sentinels() -> &'static Sentinels {
    SENTINELS.get_or_init(|| {
        let mut fds = Vec::new();
        // Raw libc on purpose: std and nix wrappers set O_CLOEXEC, which is exactly what we
        // must not do here.
        unsafe {
            let mut p = [0i32; 2];
            if libc::pipe(p.as_mut_ptr()) == 0 {
                fds.push((p[0], "pipe read end"));
                fds.push((p[1], "pipe write end"));
            }
            let mut s = [0i32; 2];
            if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, s.as_mut_ptr()) == 0 {
                fds.push((s[0], "unix socket"));
                fds.push((s[1], "unix socket peer"));
            }
            let path = b"/proc/self/exe\0";
            let f = libc::open(path.as_ptr().cast(), libc::O_RDONLY);
            if f >= 0 {
                fds.push((f, "file (the harness binary)"));
            }
        }
        Sentinels { fds }
    })
}

impl Sentinels {
    /// The sentinels that really are inheritable (FD_CLOEXEC clear).
    pub fn inheritable(&self) -> Vec<i32> {
        self.fds
            .iter()
            .map(|(fd, _)| *fd)
            .filter(|fd| {
                let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
                flags >= 0 && flags & libc::FD_CLOEXEC == 0
            })
            .collect()
    }
}

/// Trials currently running in this process (several under `cargo test`, one under nextest).
pub static ACTIVE_TRIALS: AtomicUsize = AtomicUsize::new(0);

/// Whether this trial is the only one running in the process, so backend-wide counts are exact.
pub fn alone() -> bool {
    ACTIVE_TRIALS.load(Ordering::SeqCst) == 1
}

/// The verdict of one scenario run, before expectations are applied.
#[derive(Debug)]
pub struct RunReport {
    pub passed: bool,
    /// The full failure context (empty when passed).
    pub message: String,
    pub duration: Duration,
    /// The part of `duration` the host audit took (snapshots and their comparison).
    pub audit: Duration,
}

/// Run one scenario against `backend` on the current tokio runtime: bounded, panics caught, then
/// every live cell destroyed and every touched cell checked for residue.
pub async fn run_scenario_async(backend: Arc<dyn Backend>, sc: Scenario) -> RunReport {
    ACTIVE_TRIALS.fetch_add(1, Ordering::SeqCst);
    // An error here (a bad CELLCHECK_TRACE) is told in the trace section of a failure; the suite
    // refuses to start with it.
    let _ = crate::trace::install();
    let start = Instant::now();
    audit::window().add_roots(audit::state_roots(&*backend));
    let trial = format!("{}::{}::{}", backend.name(), sc.family, sc.name);
    let audit_start = Instant::now();
    let window_i = audit::window().open(backend.name(), &trial);
    let mut audit_time = audit_start.elapsed();
    let fds_before = residue::own_fds();
    let ctx = Ctx::new(backend.clone(), sc.family, sc.name);
    let mut task = tokio::spawn((sc.run)(ctx.clone()));
    let abort = task.abort_handle();
    let total_bound = sc.timeout * TOTAL_BOUND_FACTOR;
    // Wake when the progress bound would run out, and look again: progress made meanwhile moves
    // the bound on.
    let ended = loop {
        let left = sc
            .timeout
            .saturating_sub(ctx.idle())
            .min(total_bound.saturating_sub(start.elapsed()));
        if left.is_zero() {
            break Err(ctx.idle() >= sc.timeout);
        }
        if let Ok(r) = tokio::time::timeout(left, &mut task).await {
            break Ok(r);
        }
    };
    let verdict: Result<(), String> = match ended {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(f))) => Err(f.to_string()),
        Ok(Err(join)) => Err(match join.try_into_panic() {
            Ok(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic payload".into());
                let st = ctx.st();
                format!(
                    "step: {}\nthe scenario panicked (backend or scenario code): {msg}",
                    st.step
                )
            }
            Err(e) => format!("scenario task failed: {e}"),
        }),
        Err(idle) => {
            abort.abort();
            Err(if idle {
                format!(
                    "step: {}\nscenario made no progress for {} s (hung backend?): no step begun and \
                     no create, wait, exec or destroy returned; it ran {} s in all",
                    ctx.st().step,
                    sc.timeout.as_secs(),
                    start.elapsed().as_secs()
                )
            } else {
                format!(
                    "step: {}\nscenario did not finish within {} s although it kept making \
                     progress ({} x its progress bound of {} s)",
                    ctx.st().step,
                    total_bound.as_secs(),
                    TOTAL_BOUND_FACTOR,
                    sc.timeout.as_secs()
                )
            })
        }
    };

    // Clean up what the scenario left live, also after a failure, then look for residue.
    let mut cleanup_errors = Vec::new();
    let cells: Vec<CellRec> = ctx.st().cells.clone();
    let mut done = std::collections::BTreeSet::new();
    for c in cells.iter().filter(|c| c.live) {
        if !done.insert(c.id.clone()) {
            continue;
        }
        let spawned = tokio::spawn({
            let b = backend.clone();
            let id = c.id.clone();
            async move { b.destroy(&id).await }
        });
        match tokio::time::timeout(Duration::from_secs(60), spawned).await {
            Ok(Ok(Ok(_))) => {
                ctx.mark_gone(&c.id);
                ctx.check_gone(&c.id);
            }
            Ok(Ok(Err(CellError::NotFound { .. }))) => {}
            Ok(Ok(Err(e))) => cleanup_errors.push(format!("cleanup destroy {}: {e}", c.id)),
            Ok(Err(e)) => cleanup_errors.push(format!("cleanup destroy {} panicked: {e}", c.id)),
            Err(_) => cleanup_errors.push(format!("cleanup destroy {} hung for 60 s", c.id)),
        }
    }
    let audit_start = Instant::now();
    let released = ctx.released_needles();
    let (leaks, after) = ctx
        .leftovers(&cells, Some(&fds_before), released.clone())
        .await;
    let leak_reports: Vec<String> = leaks.iter().map(|(_, t)| t.clone()).collect();
    // A cell that left nothing no longer needs its ledger entry; one that leaked keeps it, so
    // the next run removes what this one could only report.
    let cells: Vec<CellRec> = ctx.st().cells.clone();
    for c in &cells {
        if let Some(p) = &c.ledger {
            if !c.live && !leaks.iter().any(|(id, _)| id == &c.id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let mut needles: Vec<Needles> = cells.iter().map(|c| ctx.needles(c)).collect();
    needles.extend(released);
    let window = audit::window().close(window_i, needles, after);
    audit_time += audit_start.elapsed();
    ACTIVE_TRIALS.fetch_sub(1, Ordering::SeqCst);
    let mut host_audit = None;
    if let Some(w) = &window {
        for warn in &w.warnings {
            eprintln!("cellcheck: host audit warning: {warn}");
        }
        for b in &w.backends {
            eprintln!("{}", audit::console_line(b, w));
            audit::AuditLine::Window(audit::WindowLine {
                backend: b.clone(),
                closed_by: trial.clone(),
                clean: !w.leftovers.contains_key(b),
                leftovers: w.leftovers.get(b).cloned().unwrap_or_default(),
                warnings: w.warnings.clone(),
                audit_ms: audit_time.as_millis() as u64,
                check_ms: ctx.st().checks.as_millis() as u64,
                trial_ms: start.elapsed().as_millis() as u64,
            })
            .record();
        }
        if let Some(v) = w.leftovers.get(backend.name()) {
            host_audit = Some(format!(
                "host audit of backend {} (snapshots before its first trial and after its last \
                 in this process): {} leftover(s)\n  - {}",
                backend.name(),
                v.len(),
                v.join("\n  - ")
            ));
        }
    }

    let mut parts = Vec::new();
    if let Err(m) = &verdict {
        parts.push(m.clone());
    }
    let violations = ctx.st().violations.clone();
    if !violations.is_empty() {
        parts.push(violations.join("\n"));
    }
    if let Some(h) = host_audit {
        parts.push(h);
    }
    if !leak_reports.is_empty() {
        parts.push(format!("after the scenario: {}", leak_reports.join("\n")));
    }
    if !cleanup_errors.is_empty() {
        parts.push(cleanup_errors.join("\n"));
    }
    let passed = parts.is_empty();
    // Taken whether or not the trial failed, so passed trials' lines do not pile up. Cells the
    // scenario made without the harness (the property test's) carry the trial's token.
    let token = ctx.token().to_string();
    let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
    let trace = crate::trace::take_report(&ids, |c| c.contains(&token));
    let mut message = String::new();
    if !passed {
        message = format!(
            "backend: {}\nscenario: {}::{}\n{}",
            backend.name(),
            sc.family,
            sc.name,
            parts.join("\n")
        );
        if !ids.is_empty() {
            message.push_str(&format!("\ncells touched: {}", ids.join(", ")));
        }
        let outs = ctx.outputs_report();
        if !outs.is_empty() {
            message.push_str(&format!("\ncaptured output:{outs}"));
        }
        // Last, so the message ends with what the backend did on the way.
        if !trace.is_empty() {
            message.push('\n');
            message.push_str(&trace);
        }
    }
    RunReport {
        passed,
        message,
        duration: start.elapsed(),
        audit: audit_time,
    }
}

/// The built fixture root the backends' private copies are made from.
pub fn fixtures_rootfs() -> Option<PathBuf> {
    Some(cellcheck_fixtures::fixtures_dir().join("rootfs"))
}
