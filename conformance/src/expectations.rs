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
//! wins.
//!
//! The suite and `cargo xtask` check a file the same way, with [`Expectations::load_checked`]:
//! an unknown field, an entry naming a backend that is not registered, a scenario glob matching
//! no trial of its backend, or an entry past its expiry is an error naming the file, the entry
//! and the problem.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
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

/// What an expectations file is checked against: every backend the run knows (registered in the
/// suite, built in, or configured), each with the `family::scenario` paths of its trials.
pub type Catalog = BTreeMap<String, BTreeSet<String>>;

/// What is wrong with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryProblemKind {
    /// `backend` names no backend of the catalog.
    UnknownBackend,
    /// `scenario` matches no trial of its backend.
    MatchesNoTrial,
    /// Today is past `expires`.
    Expired,
}

/// One entry's problem, naming the file and the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryProblem {
    pub file: PathBuf,
    /// 1-based, in file order.
    pub entry: usize,
    /// `backend × class × scenario`.
    pub label: String,
    pub kind: EntryProblemKind,
    pub detail: String,
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: entry {} ({}): {}",
            self.file.display(),
            self.entry,
            self.label,
            self.detail
        )
    }
}

/// Why an expectations file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectationsError {
    /// Unreadable, not TOML, an unknown field, a bad date or an empty field.
    Read { file: PathBuf, message: String },
    /// Parsed, but entries are wrong for this run's backends and trials.
    Entries(Vec<EntryProblem>),
}

impl fmt::Display for ExpectationsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectationsError::Read { file, message } => {
                write!(f, "{}: {message}", file.display())
            }
            ExpectationsError::Entries(ps) => {
                let lines: Vec<String> = ps.iter().map(|p| p.to_string()).collect();
                f.write_str(&lines.join("\n"))
            }
        }
    }
}

impl std::error::Error for ExpectationsError {}

impl Expectations {
    /// Parse the file's text; every entry must have a valid `expires` date and non-empty fields.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: File = toml::from_str(text).map_err(|e| {
            // toml names the field and the line; say which entry that is, too.
            let entry = e
                .span()
                .map(|s| {
                    text[..s.start.min(text.len())]
                        .matches("[[expect]]")
                        .count()
                })
                .filter(|&n| n > 0)
                .map(|n| format!("entry {n}: "))
                .unwrap_or_default();
            format!("expectations: {entry}{}", e.message())
        })?;
        for (i, e) in f.expect.iter().enumerate() {
            for (field, v) in [
                ("backend", &e.backend),
                ("class", &e.class),
                ("scenario", &e.scenario),
                ("reason", &e.reason),
            ] {
                if v.trim().is_empty() {
                    return Err(format!("expectations: entry {}: `{field}` is empty", i + 1));
                }
            }
            e.expires_date()
                .map_err(|m| format!("expectations: entry {}: expires: {m}", i + 1))?;
        }
        Ok(Expectations { entries: f.expect })
    }

    /// Every problem of the entries against `catalog` on `today`, in file order: an unknown
    /// backend, a scenario glob matching no trial of its backend, an expired entry.
    pub fn problems(&self, file: &Path, catalog: &Catalog, today: Date) -> Vec<EntryProblem> {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let mut push = |kind, detail: String| {
                out.push(EntryProblem {
                    file: file.to_path_buf(),
                    entry: i + 1,
                    label: format!("{} × {} × {}", e.backend, e.class, e.scenario),
                    kind,
                    detail,
                })
            };
            match catalog.get(&e.backend) {
                None => push(
                    EntryProblemKind::UnknownBackend,
                    format!(
                        "unknown backend {:?}; known: {}",
                        e.backend,
                        catalog.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ),
                Some(paths) if !paths.iter().any(|p| glob_match(&e.scenario, p)) => push(
                    EntryProblemKind::MatchesNoTrial,
                    format!(
                        "scenario {:?} matches no trial of backend {}: remove or correct it",
                        e.scenario, e.backend
                    ),
                ),
                Some(_) => {}
            }
            // parse() checked the date.
            if e.expired_on(today).unwrap_or(false) {
                push(
                    EntryProblemKind::Expired,
                    format!(
                        "expired on {} ({}): fix the backend or renew the entry with a new reason",
                        e.expires,
                        e.describe()
                    ),
                );
            }
        }
        out
    }

    /// Read `path` and check it against `catalog` on `today`: the one validation the suite and
    /// xtask both apply (xtask reports [`Expectations::problems`] in its verdict).
    pub fn load_checked(
        path: &Path,
        required: bool,
        catalog: &Catalog,
        today: Date,
    ) -> Result<Self, ExpectationsError> {
        let exps = Self::read(path, required)?;
        let problems = exps.problems(path, catalog, today);
        if problems.is_empty() {
            Ok(exps)
        } else {
            Err(ExpectationsError::Entries(problems))
        }
    }

    /// Read and parse `path`. A missing file is no expectations unless `required` (a file the
    /// user named must exist).
    pub fn read(path: &Path, required: bool) -> Result<Self, ExpectationsError> {
        let read_err = |message: String| ExpectationsError::Read {
            file: path.to_path_buf(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t).map_err(read_err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) => Err(read_err(format!("expectations: {e}"))),
        }
    }

    /// The file a run reads and whether the user named it: `CELLCHECK_EXPECTATIONS` if set,
    /// else `default` (none: no expectations).
    pub fn source(default: Option<&Path>) -> Option<(PathBuf, bool)> {
        match std::env::var_os("CELLCHECK_EXPECTATIONS").filter(|v| !v.is_empty()) {
            Some(p) => Some((PathBuf::from(p), true)),
            None => default.map(|d| (d.to_path_buf(), false)),
        }
    }

    /// This repository's file, `<workspace>/matrix/expectations.toml`.
    pub fn repository_file() -> PathBuf {
        cellcheck_fixtures::workspace_root().join("matrix/expectations.toml")
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
    fn the_variable_overrides_the_default_file() {
        // The only test in this crate touching the variable.
        let default = Path::new("/repo/matrix/expectations.toml");
        std::env::set_var("CELLCHECK_EXPECTATIONS", "/elsewhere/exp.toml");
        assert_eq!(
            Expectations::source(Some(default)),
            Some((PathBuf::from("/elsewhere/exp.toml"), true))
        );
        assert_eq!(
            Expectations::source(None),
            Some((PathBuf::from("/elsewhere/exp.toml"), true))
        );
        std::env::set_var("CELLCHECK_EXPECTATIONS", "");
        assert_eq!(
            Expectations::source(Some(default)),
            Some((default.to_path_buf(), false))
        );
        std::env::remove_var("CELLCHECK_EXPECTATIONS");
        assert_eq!(Expectations::source(None), None);
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

    fn catalog() -> Catalog {
        let paths: BTreeSet<String> = ["isolation::env_inside", "snapshot::restore_twice"]
            .map(String::from)
            .into();
        [("runsc".to_string(), paths.clone()), ("runc".into(), paths)].into()
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("exp.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const TODAY: Date = (2024, 2, 1);

    #[test]
    fn a_valid_file_is_accepted() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), SAMPLE);
        let e = Expectations::load_checked(&p, true, &catalog(), TODAY).unwrap();
        assert_eq!(e.entries.len(), 2);
    }

    fn entry_error(text: &str, today: Date) -> (PathBuf, Vec<EntryProblem>) {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), text);
        match Expectations::load_checked(&p, true, &catalog(), today) {
            Err(ExpectationsError::Entries(ps)) => (p, ps),
            other => panic!("want entry problems, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_backend_is_an_error_naming_file_and_entry() {
        let (p, ps) = entry_error(&SAMPLE.replacen("\"runsc\"", "\"runsk\"", 1), TODAY);
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].kind, EntryProblemKind::UnknownBackend);
        let m = ps[0].to_string();
        assert!(
            m.starts_with(&format!(
                "{}: entry 1 (runsk × linux-* × isolation::env_*)",
                p.display()
            )),
            "{m}"
        );
        assert!(m.contains("known: runc, runsc"), "{m}");
    }

    #[test]
    fn a_glob_matching_no_trial_is_an_error() {
        let (_, ps) = entry_error(&SAMPLE.replace("snapshot::*", "snapshots::*"), TODAY);
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].kind, EntryProblemKind::MatchesNoTrial);
        assert_eq!(ps[0].entry, 2);
        assert!(ps[0]
            .to_string()
            .contains("\"snapshots::*\" matches no trial of backend runsc"));
    }

    #[test]
    fn an_expired_entry_is_an_error() {
        // Entry 2 expires 2024-02-29: valid on that day, expired the day after.
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), SAMPLE);
        assert!(Expectations::load_checked(&p, true, &catalog(), (2024, 2, 29)).is_ok());
        let (_, ps) = entry_error(SAMPLE, (2024, 3, 1));
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].kind, EntryProblemKind::Expired);
        assert!(
            ps[0]
                .to_string()
                .contains("entry 2 (runsc × * × snapshot::*): expired on 2024-02-29"),
            "{}",
            ps[0]
        );
    }

    #[test]
    fn an_unknown_field_is_an_error_naming_file_entry_and_field() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            &SAMPLE.replace("expires = \"2024", "expire = \"2024"),
        );
        let e = Expectations::load_checked(&p, true, &catalog(), TODAY).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, ExpectationsError::Read { .. }), "{m}");
        assert!(m.starts_with(&p.display().to_string()), "{m}");
        assert!(m.contains("entry 2"), "{m}");
        assert!(m.contains("expire"), "{m}");
    }

    #[test]
    fn a_named_file_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing.toml");
        let e = Expectations::load_checked(&p, true, &catalog(), TODAY).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
        assert!(Expectations::load_checked(&p, false, &catalog(), TODAY)
            .unwrap()
            .entries
            .is_empty());
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
