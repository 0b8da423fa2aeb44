//! Known failures and justified skips: `matrix/expectations.toml`.
//!
//! ```toml
//! [[expect]]
//! backend = "runsc"              # exact backend name
//! class = "linux-nokvm"          # runner class glob, "*" for any
//! scenario = "isolation::env_*"  # glob over "{family}::{scenario}"
//! outcome = "known-failure"      # or "skip"
//! reason = "why"
//! link = "https://..."
//! expires = "2027-06-30"         # YYYY-MM-DD
//! ```
//!
//! A known failure still runs: failing is the expected result (`xfail`), passing fails the trial
//! (`xpass`). A skip lists the trial as ignored with the entry's reason. The first matching entry
//! wins. Expiry is not applied here (an expired entry still matches); `cargo xtask` validates the
//! file's dates and staleness with [`Expectations::parse`] and [`Expectation::expired_on`], for
//! the same file the suite reads ([`Expectations::path_in`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpectedOutcome {
    KnownFailure,
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    pub backend: String,
    pub class: String,
    pub scenario: String,
    pub outcome: ExpectedOutcome,
    pub reason: String,
    #[serde(default)]
    pub link: Option<String>,
    pub expires: String,
}

/// A calendar date, compared as (year, month, day).
pub type Date = (i32, u32, u32);

impl Expectation {
    pub fn matches(&self, backend: &str, class: &str, family_scenario: &str) -> bool {
        self.backend == backend
            && glob_match(&self.class, class)
            && glob_match(&self.scenario, family_scenario)
    }

    pub fn expires_date(&self) -> Result<Date, String> {
        parse_date(&self.expires)
    }

    /// Whether `today` is after the expiry date.
    pub fn expired_on(&self, today: Date) -> Result<bool, String> {
        Ok(today > self.expires_date()?)
    }

    /// `reason` plus the link, for messages.
    pub fn describe(&self) -> String {
        match &self.link {
            Some(l) if !l.is_empty() => format!("{} {}", self.reason, l),
            _ => self.reason.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    pub entries: Vec<Expectation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    expect: Vec<Expectation>,
}

impl Expectations {
    /// Parse the file's text; every entry must have a valid `expires` date and non-empty fields.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: File = toml::from_str(text).map_err(|e| format!("expectations: {e}"))?;
        for (i, e) in f.expect.iter().enumerate() {
            for (field, v) in [
                ("backend", &e.backend),
                ("class", &e.class),
                ("scenario", &e.scenario),
                ("reason", &e.reason),
            ] {
                if v.trim().is_empty() {
                    return Err(format!("expectations: entry {i}: `{field}` is empty"));
                }
            }
            e.expires_date()
                .map_err(|m| format!("expectations: entry {i}: expires: {m}"))?;
        }
        Ok(Expectations { entries: f.expect })
    }

    /// Load from `path`; a missing file means no expectations.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// `CELLCHECK_EXPECTATIONS`, else `<workspace>/matrix/expectations.toml`.
    pub fn default_path() -> PathBuf {
        Self::path_in(&cellcheck_fixtures::workspace_root())
    }

    /// `CELLCHECK_EXPECTATIONS`, else `<root>/matrix/expectations.toml`: the one source the suite
    /// and xtask both read, so xtask's checks (expiry, staleness) cover whichever file is used.
    pub fn path_in(root: &Path) -> PathBuf {
        std::env::var_os("CELLCHECK_EXPECTATIONS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("matrix/expectations.toml"))
    }

    pub fn lookup(
        &self,
        backend: &str,
        class: &str,
        family_scenario: &str,
    ) -> Option<&Expectation> {
        self.entries
            .iter()
            .find(|e| e.matches(backend, class, family_scenario))
    }
}

/// The runner class: `CELLCHECK_HOST_CLASS`, else `class` in `<target>/conformance/host.json`
/// (written by `cargo xtask probe`), else `macos` on macOS and `linux-nokvm` elsewhere.
pub fn host_class() -> String {
    if let Ok(c) = std::env::var("CELLCHECK_HOST_CLASS") {
        if !c.is_empty() {
            return c;
        }
    }
    let p = cellcheck_fixtures::target_dir().join("conformance/host.json");
    if let Ok(text) = std::fs::read_to_string(p) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(c) = v.get("class").and_then(|c| c.as_str()) {
                return c.to_string();
            }
        }
    }
    if cfg!(target_os = "macos") {
        "macos".into()
    } else {
        "linux-nokvm".into()
    }
}

/// Glob with `*` (any run, also empty) and `?` (one character); everything else literal.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Greedy matching with backtracking to the last star: linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Strict `YYYY-MM-DD` with a real calendar day.
pub fn parse_date(s: &str) -> Result<Date, String> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 10
        || b[4] != b'-'
        || b[7] != b'-'
        || !digits(0..4)
        || !digits(5..7)
        || !digits(8..10)
    {
        return Err(format!("{s:?} is not YYYY-MM-DD"));
    }
    let y: i32 = s[0..4].parse().map_err(|_| format!("{s:?}: bad year"))?;
    let m: u32 = s[5..7].parse().map_err(|_| format!("{s:?}: bad month"))?;
    let d: u32 = s[8..10].parse().map_err(|_| format!("{s:?}: bad day"))?;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(format!("{s:?}: month out of range")),
    };
    if d == 0 || d > days {
        return Err(format!("{s:?}: day out of range"));
    }
    Ok((y, m, d))
}

/// Today's UTC date.
pub fn today_utc() -> Date {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_from_days((secs / 86_400) as i64)
}

/// Days since 1970-01-01 to a civil date (proleptic Gregorian).
fn civil_from_days(z: i64) -> Date {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_and_xtask_read_the_same_file() {
        // The only test in this crate touching the variable.
        let root = Path::new("/repo");
        std::env::set_var("CELLCHECK_EXPECTATIONS", "/elsewhere/exp.toml");
        assert_eq!(
            Expectations::path_in(root),
            PathBuf::from("/elsewhere/exp.toml")
        );
        std::env::set_var("CELLCHECK_EXPECTATIONS", "");
        assert_eq!(
            Expectations::path_in(root),
            root.join("matrix/expectations.toml")
        );
        std::env::remove_var("CELLCHECK_EXPECTATIONS");
        assert_eq!(
            Expectations::path_in(root),
            root.join("matrix/expectations.toml")
        );
    }

    #[test]
    fn glob_basics() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "isolation::env"));
        assert!(glob_match("isolation::env_*", "isolation::env_exact"));
        assert!(glob_match("isolation::env_*", "isolation::env_"));
        assert!(!glob_match("isolation::env_*", "isolation::environ"));
        assert!(glob_match("*::code_4?", "exit::code_42"));
        assert!(!glob_match("*::code_4?", "exit::code_4"));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(!glob_match("a*b*c", "aXXbYYbd"));
        assert!(glob_match("exit::code_42", "exit::code_42"));
        assert!(!glob_match("exit::code_42", "exit::code_420"));
        assert!(glob_match("**x", "x"));
    }

    const SAMPLE: &str = r#"
[[expect]]
backend = "runsc"
class = "linux-*"
scenario = "isolation::env_*"
outcome = "known-failure"
reason = "runsc adds HOME"
link = "https://example.org/1"
expires = "2027-06-30"

[[expect]]
backend = "runsc"
class = "*"
scenario = "snapshot::*"
outcome = "skip"
reason = "criu"
expires = "2024-02-29"
"#;

    #[test]
    fn parse_and_lookup() {
        let e = Expectations::parse(SAMPLE).unwrap();
        assert_eq!(e.entries.len(), 2);
        let k = e
            .lookup("runsc", "linux-nokvm", "isolation::env_inside")
            .unwrap();
        assert_eq!(k.outcome, ExpectedOutcome::KnownFailure);
        assert_eq!(k.describe(), "runsc adds HOME https://example.org/1");
        assert!(e
            .lookup("runc", "linux-nokvm", "isolation::env_inside")
            .is_none());
        assert!(e
            .lookup("runsc", "macos", "isolation::env_inside")
            .is_none());
        assert_eq!(
            e.lookup("runsc", "macos", "snapshot::restore_twice")
                .unwrap()
                .outcome,
            ExpectedOutcome::Skip
        );
        assert!(e.entries[1].expired_on((2024, 3, 1)).unwrap());
        assert!(!e.entries[1].expired_on((2024, 2, 29)).unwrap());
    }

    #[test]
    fn parse_rejects_bad_entries() {
        assert!(Expectations::parse("").unwrap().entries.is_empty());
        let bad_date = SAMPLE.replace("2027-06-30", "2027-02-30");
        assert!(Expectations::parse(&bad_date).unwrap_err().contains("day"));
        let bad_outcome = SAMPLE.replace("\"skip\"", "\"maybe\"");
        assert!(Expectations::parse(&bad_outcome).is_err());
        let unknown = SAMPLE.replace("link =", "lnk =");
        assert!(Expectations::parse(&unknown).is_err());
        let empty_reason = SAMPLE.replace("\"criu\"", "\"  \"");
        assert!(Expectations::parse(&empty_reason)
            .unwrap_err()
            .contains("reason"));
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("2024-02-29"), Ok((2024, 2, 29)));
        assert!(parse_date("2023-02-29").is_err());
        assert!(parse_date("2023-13-01").is_err());
        assert!(parse_date("2023-1-01").is_err());
        assert!(parse_date("20x3-01-01").is_err());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert!(today_utc() > (2024, 1, 1));
    }
}
