//! The rerun line of a trial: the command, with every variable that selected or configured it.

/// The command that reruns `trial` in this process's configuration (see [`rerun_command`]).
pub(super) fn rerun_hint(trial: &str) -> String {
    let pkg = std::env::var("CARGO_PKG_NAME").unwrap_or_else(|_| "cellcheck-conformance".into());
    let test = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            Some((base, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => base.to_string(),
            _ => s,
        })
        .unwrap_or_else(|| "conformance".into());
    rerun_command(trial, &pkg, &test, std::env::vars())
}

/// The command that reruns `trial` (`backend::family::scenario`) alone, with every variable that
/// selected or configured it: the backend by name (a driver backend is listed only when
/// selected and configured) and each `CELLCHECK_*` setting in `env`, shell-quoted. The results
/// file (`CELLCHECK_RESULTS`) is where a run writes, not what it tests, so it is left out.
pub fn rerun_command(
    trial: &str,
    pkg: &str,
    test: &str,
    env: impl Iterator<Item = (String, String)>,
) -> String {
    let backend = trial.split("::").next().unwrap_or_default();
    let mut vars: Vec<(String, String)> = env
        .filter(|(k, _)| {
            k.starts_with("CELLCHECK_")
                && k != "CELLCHECK_BACKENDS"
                && k != "CELLCHECK_RESULTS"
                && !k.starts_with("CELLCHECK_CANARY_")
                && !matches!(cellcheck_contract::drivers::name_of(k), Some(d) if d != backend)
        })
        .collect();
    vars.sort();
    vars.dedup_by(|a, b| a.0 == b.0);
    vars.insert(0, ("CELLCHECK_BACKENDS".into(), backend.to_string()));
    let prefix: String = vars
        .iter()
        .map(|(k, v)| format!("{k}={} ", shell_quote(v)))
        .collect();
    format!("{prefix}cargo nextest run -p {pkg} --test {test} -E 'test(={trial})'")
}

/// `v` as one shell word: bare when it is plainly safe, else single-quoted.
pub fn shell_quote(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,:=+@".contains(c))
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::rerun_command;

    #[test]
    fn a_rerun_line_carries_what_selected_and_configured_the_trial() {
        let env = [
            ("CELLCHECK_REMOTE_DRIVER", "python3 my driver.py"),
            ("CELLCHECK_BACKENDS", "host,remote"),
            ("CELLCHECK_CANARY_XYZ", "ambient"),
            ("CELLCHECK_EXPECTATIONS", "/x/exp.toml"),
            ("HOME", "/root"),
            ("CELLCHECK_FIXTURES_DIR", "it's"),
            ("CELLCHECK_RESULTS", "/x/results.jsonl"),
            ("CELLCHECK_OTHER_PY_DRIVER", "python3 other.py"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let line = rerun_command("remote::exit::code_0", "p", "conformance", env.into_iter());
        assert_eq!(
            line,
            "CELLCHECK_BACKENDS=remote CELLCHECK_EXPECTATIONS=/x/exp.toml \
             CELLCHECK_FIXTURES_DIR='it'\\''s' CELLCHECK_REMOTE_DRIVER='python3 my driver.py' \
             cargo nextest run -p p --test conformance -E 'test(=remote::exit::code_0)'"
        );
    }
}
