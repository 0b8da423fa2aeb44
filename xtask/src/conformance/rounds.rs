//! The run's middle steps: [`rounds`] runs the planned trials under nextest (repeated, by
//! target), [`fill`] turns what they wrote into one result per planned trial.

use super::*;

/// What `repeat` nextest runs recorded.
pub struct Rounds {
    /// Each round's results (the last line per trial within the round).
    pub per_round: Vec<Vec<TrialResult>>,
    /// Whether every nextest run exited 0.
    pub nextest_ok: bool,
    pub log: PathBuf,
}

/// Step 2, rounds: runs the plan's trials `repeat` times under nextest, showing progress.
pub fn rounds(plan: &Plan, repeat: u32, dir: &Path) -> Result<Rounds> {
    let results_path = dir.join("results.jsonl");
    let log_path = dir.join("nextest.log");
    // The suite writes its audit lines beside the results file.
    for p in [&results_path, &log_path, &audit_path(dir)] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
    let mut out = Rounds {
        per_round: Vec::new(),
        nextest_ok: true,
        log: log_path.clone(),
    };
    if !plan.listed.iter().any(|l| l.selected) {
        return Ok(out);
    }
    // The suite records ignored trials when nextest lists them, so they count towards progress.
    let per_round = plan
        .listed
        .iter()
        .filter(|l| {
            l.selected
                || (l.ignored
                    && !l.filtered_out
                    && !plan.unusable.contains_key(backend_of(&l.name)))
        })
        .count();
    let total = per_round * repeat as usize;
    let mut lines_seen = 0;
    for round in 1..=repeat {
        if repeat > 1 {
            println!("round {round}/{repeat}");
        }
        let done_before = (round as usize - 1) * per_round;
        let progress = Progress::start(
            results_path.clone(),
            file_len(&results_path),
            done_before,
            total,
        );
        // One target after the other: each process set of a target gets the env of its own.
        let mut status = Ok(true);
        for (target, env) in plan.targets() {
            status = run_target(plan, &target, &env, dir, &results_path, &log_path);
            match &status {
                Ok(ok) => out.nextest_ok &= ok,
                Err(_) => break,
            }
        }
        progress.finish();
        status?;
        let all = results::read_file(&results_path).map_err(anyhow::Error::msg)?;
        out.per_round
            .push(results::last_per_id(all[lines_seen..].to_vec()));
        lines_seen = all.len();
    }
    Ok(out)
}

/// One `cargo nextest run` of `target`, its output appended to the log.
fn run_target(
    plan: &Plan,
    target: &Target,
    env: &[(String, String)],
    dir: &Path,
    results_path: &Path,
    log_path: &Path,
) -> Result<bool> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut c = target.nextest("run", plan.filter.as_deref());
    c.arg("--no-fail-fast");
    if let Some((k, n)) = plan.partition {
        c.arg("--partition").arg(format!("count:{k}/{n}"));
    }
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .env("CELLCHECK_RESULTS", results_path)
        .env("CELLCHECK_AUDIT_RESULTS", audit_path(dir))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = c
        .status()
        .with_context(|| format!("run `cargo nextest run` of {}", target.describe()))?;
    Ok(status.success())
}

/// Step 3, fill: one result per trial (repeats folded), completed with what no trial recorded.
pub fn fill(plan: &Plan, rounds: &Rounds) -> Vec<TrialResult> {
    let folded = results::fold(rounds.per_round.concat());
    with_reruns(
        complete(folded, &plan.listed, &plan.unusable, plan.first_shard()),
        plan,
    )
}
