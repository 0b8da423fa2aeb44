//! Unique names: cell ids, marker values, secrets, and the process-wide canary.

use std::sync::OnceLock;

use rand::Rng;

/// The env var every document the harness builds declares, so a cell's processes are findable
/// by marker (never by name).
pub const MARKER_VAR: &str = "CELLCHECK_MARKER";

/// The marker a document declares in its env, if any.
pub fn declared_marker(doc: &cellcheck_contract::CellDocument) -> Option<String> {
    doc.spec
        .run
        .env
        .iter()
        .find(|e| e.name == MARKER_VAR)
        .map(|e| e.value.clone())
}

/// Env vars whose name starts with this are declared secrets: after destroy their values must be
/// nowhere on the host (no file of the audited areas, no process's cmdline or environ).
pub const SECRET_VAR_PREFIX: &str = "CELLCHECK_SECRET";

/// The values of the secrets a document declares.
pub fn declared_secrets(doc: &cellcheck_contract::CellDocument) -> Vec<String> {
    doc.spec
        .run
        .env
        .iter()
        .filter(|e| e.name.starts_with(SECRET_VAR_PREFIX) && !e.value.is_empty())
        .map(|e| e.value.clone())
        .collect()
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `len` random characters from `[a-z0-9]`.
pub fn random_token(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A scenario name shortened for ids: hostname-safe (`_` becomes `-`), at most 16 characters.
pub fn short_name(scenario: &str) -> String {
    let s: String = scenario
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(16)
        .collect();
    let s = s.trim_matches('-').to_ascii_lowercase();
    if s.is_empty() {
        "x".into()
    } else {
        s
    }
}

/// `cc-<token>-<short>-<nn>`. The counter is zero-padded to two digits so that, below 100 cells
/// per trial, no id is a prefix of another (markers are matched as substrings).
pub fn cell_id(token: &str, short: &str, n: u32) -> String {
    format!("cc-{token}-{short}-{n:02}")
}

/// The ambient env var the harness sets on itself at startup: no workload may ever see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    pub name: String,
    pub value: String,
}

static CANARY: OnceLock<Canary> = OnceLock::new();

/// The canary, set in this process's env on first call. Call it before starting threads
/// ([`crate::Suite::run_from_args`] does), since changing the env is not thread-safe.
pub fn canary() -> &'static Canary {
    CANARY.get_or_init(|| {
        let tok = random_token(10);
        let c = Canary {
            name: format!("CELLCHECK_CANARY_{}", tok.to_ascii_uppercase()),
            value: format!("ambient-{}", random_token(16)),
        };
        std::env::set_var(&c.name, &c.value);
        c
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellcheck_contract::spec::validate_id;

    #[test]
    fn ids_are_valid_hostname_safe_and_unique() {
        let tok = random_token(8);
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..99 {
            let id = cell_id(&tok, &short_name("daemon_exit_with_a_very_long_name"), n);
            assert!(validate_id(&id).is_ok(), "{id}");
            assert!(id.len() <= 63, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            assert!(seen.insert(id));
        }
        let ids: Vec<_> = seen.iter().collect();
        for a in &ids {
            for b in &ids {
                assert!(a == b || !b.starts_with(a.as_str()), "{a} prefixes {b}");
            }
        }
    }

    #[test]
    fn short_names_never_empty_or_dashed_at_ends() {
        assert_eq!(short_name("code_42"), "code-42");
        assert_eq!(short_name("__"), "x");
        assert_eq!(short_name("Abc_"), "abc");
        assert_eq!(short_name("a_very_long_scenario_name").len(), 16);
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(random_token(12), random_token(12));
        assert!(random_token(8).bytes().all(|b| ALPHABET.contains(&b)));
    }
}
