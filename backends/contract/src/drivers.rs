//! How a backend served by an outside driver is configured: one env var per driver, named after
//! the backend, so several drivers run side by side and each trial's rerun line carries only its
//! own driver.
//!
//! Backend `NAME` is configured by `CELLCHECK_<NAME>_DRIVER="cmd args"` (upper case, `-` as `_`);
//! `remote`'s is `CELLCHECK_REMOTE_DRIVER`. Driver names are lower-case words joined by `-`, so the
//! variable names its backend exactly.

/// The generic driver name: a driver configured under it may give any name in its `hello`.
pub const GENERIC_DRIVER: &str = "remote";

const PREFIX: &str = "CELLCHECK_";
const SUFFIX: &str = "_DRIVER";

/// Whether `name` may name a driver backend: `[a-z0-9]+(-[a-z0-9]+)*`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.split('-').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "driver name {name:?} is not lower-case letters and digits in words joined by '-'"
        ))
    }
}

/// The env var configuring driver backend `name` (a valid name, see [`check_name`]).
pub fn env_var(name: &str) -> String {
    format!(
        "{PREFIX}{}{SUFFIX}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

/// The backend an env var configures, if it is a driver variable.
pub fn name_of(var: &str) -> Option<String> {
    let mid = var.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let name = mid.to_ascii_lowercase().replace('_', "-");
    (check_name(&name).is_ok() && env_var(&name) == var).then_some(name)
}

/// Every driver this process's env configures: (name, command line), sorted by name; a blank
/// command configures nothing.
pub fn from_env() -> Vec<(String, String)> {
    from_vars(std::env::vars())
}

/// [`from_env`] over any set of variables.
pub fn from_vars(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vars
        .filter(|(_, v)| !v.trim().is_empty())
        .filter_map(|(k, v)| Some((name_of(&k)?, v)))
        .collect();
    out.sort();
    out
}

/// A driver command line as the suite runs it: split on whitespace.
pub fn argv(cmd: &str) -> Vec<String> {
    cmd.split_whitespace().map(String::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_variables_map_both_ways() {
        assert_eq!(env_var("remote"), "CELLCHECK_REMOTE_DRIVER");
        assert_eq!(env_var("bwrap-py"), "CELLCHECK_BWRAP_PY_DRIVER");
        assert_eq!(
            name_of("CELLCHECK_BWRAP_PY_DRIVER").as_deref(),
            Some("bwrap-py")
        );
        assert_eq!(
            name_of("CELLCHECK_REMOTE_DRIVER").as_deref(),
            Some("remote")
        );
        for not in [
            "CELLCHECK_DRIVER",
            "CELLCHECK__DRIVER",
            "CELLCHECK_A__B_DRIVER",
            "CELLCHECK_A_DRIVERS",
            "CELLCHECK_a_DRIVER",
            "CELLCHECK_BACKENDS",
        ] {
            assert_eq!(name_of(not), None, "{not}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", "a--b", "a b", "a=b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("x2-y").unwrap();
        let vars = [
            ("CELLCHECK_ZED_DRIVER", "z"),
            ("CELLCHECK_REMOTE_DRIVER", " "),
            ("CELLCHECK_A_B_DRIVER", "python3 d.py"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            from_vars(vars.into_iter()),
            [
                ("a-b".to_string(), "python3 d.py".to_string()),
                ("zed".to_string(), "z".to_string())
            ]
        );
    }
}
