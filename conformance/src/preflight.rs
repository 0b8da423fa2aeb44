//! Preflight results cached per backend, so one-process-per-trial runners (nextest) pay a
//! backend's functional check once every few minutes instead of once per trial; the
//! basic-contract check (`suite/contract.rs`) is cached the same way ([`cached`]).
//!
//! The cache lives at `<target>/cellcheck/preflight/<backend>.json` (the contract check's at
//! `<backend>.contract.json`), is keyed by everything that
//! configures the backend ([`config_key`]: the fixtures build, the backend's attributes, the
//! `CELLCHECK_*` settings), and expires after [`MAX_AGE`]. `CELLCHECK_PREFLIGHT_CACHE=0` disables it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellcheck_contract::{Availability, Backend};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const MAX_AGE: Duration = Duration::from_secs(300);

/// One cached answer: what it is for (`stem`, `key`), when it was computed, and the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry<T> {
    stem: String,
    key: String,
    at_unix: u64,
    value: T,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn cache_dir() -> PathBuf {
    cellcheck_fixtures::target_dir().join("cellcheck/preflight")
}

fn enabled() -> bool {
    std::env::var("CELLCHECK_PREFLIGHT_CACHE").map_or(true, |v| v != "0")
}

/// A key that changes whenever the fixtures are rebuilt.
pub fn fixtures_key(fx: Option<&cellcheck_fixtures::Fixtures>) -> String {
    let Some(fx) = fx else {
        return "no-fixtures".into();
    };
    let part = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}:{t}", m.len())
        }
        Err(_) => "missing".into(),
    };
    format!(
        "{}|probe={}|init={}",
        fx.dir.display(),
        part(&fx.probe),
        part(&fx.host_init)
    )
}

/// Variables that select trials or are per process, never a backend's configuration.
const NOT_CONFIG: &[&str] = &[
    "CELLCHECK_BACKENDS",
    "CELLCHECK_STRICT",
    "CELLCHECK_PREFLIGHT_CACHE",
    "CELLCHECK_EXPECTATIONS",
    "CELLCHECK_HOST_CLASS",
    "CELLCHECK_CANARY_",
];

/// Everything that configures `backend`, so one configuration's answer (another driver command,
/// another runtime binary, other fixtures) is never reported for another: the fixtures key, the
/// backend's attributes and every `CELLCHECK_*` variable that is not in [`NOT_CONFIG`].
pub fn config_key(backend: &dyn Backend, fixtures_key: &str) -> String {
    // A private rootfs copy's path differs in every process; the copies are identical.
    let attributes = backend
        .attributes()
        .into_iter()
        .map(|(k, v)| (k, crate::roots::normalize(&v)))
        .collect();
    config_key_of(&attributes, fixtures_key, std::env::vars_os())
}

fn config_key_of(
    attributes: &std::collections::BTreeMap<String, String>,
    fixtures_key: &str,
    env: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> String {
    let mut settings: Vec<String> = env
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            (k.starts_with("CELLCHECK_") && !NOT_CONFIG.iter().any(|n| k.starts_with(n)))
                .then(|| format!("{k}={}", v.to_string_lossy()))
        })
        .collect();
    settings.sort();
    format!("{fixtures_key}|attributes={attributes:?}|env={settings:?}")
}

fn read<T: DeserializeOwned>(path: &Path, stem: &str, key: &str) -> Option<T> {
    let e: Entry<T> = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let age = now_unix().checked_sub(e.at_unix)?;
    (e.stem == stem && e.key == key && age <= MAX_AGE.as_secs()).then_some(e.value)
}

fn write<T: Serialize>(path: &Path, e: &Entry<T>) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    // Write then rename, so a concurrent reader never sees half a file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(e).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `compute`'s answer for `key`, shared by the processes of a run through
/// `<cache_dir>/<stem>.json` while fresh. Processes that ask at once take turns on
/// `<stem>.lock`, so the answer is computed once, not once by each. Returns the answer and
/// whether it was cached.
pub async fn cached<T, F>(stem: &str, key: &str, compute: F) -> (T, bool)
where
    T: Serialize + DeserializeOwned,
    F: std::future::Future<Output = T>,
{
    if !enabled() {
        return (compute.await, false);
    }
    let path = cache_dir().join(format!("{stem}.json"));
    let _ = std::fs::create_dir_all(cache_dir());
    let _turn = crate::ledger::FileLock::take(&cache_dir().join(format!("{stem}.lock")));
    if let Some(v) = read(&path, stem, key) {
        return (v, true);
    }
    let value = compute.await;
    let e = Entry {
        stem: stem.to_string(),
        key: key.to_string(),
        at_unix: now_unix(),
        value,
    };
    if let Err(err) = write(&path, &e) {
        eprintln!("cellcheck: cannot cache at {}: {err}", path.display());
    }
    (e.value, false)
}

/// The backend's preflight, from the cache when fresh. Returns the answer and whether it was cached.
pub async fn preflight(backend: &dyn Backend, key: &str) -> (Availability, bool) {
    cached(backend.name(), key, backend.preflight()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entry_is_keyed_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        let mut e = Entry {
            stem: "b".into(),
            key: "k1".into(),
            at_unix: now_unix(),
            value: Availability::Unavailable {
                reason: "nope".into(),
            },
        };
        write(&p, &e).unwrap();
        assert_eq!(read(&p, "b", "k1"), Some(e.value.clone()));
        assert_eq!(read::<Availability>(&p, "b", "k2"), None);
        assert_eq!(read::<Availability>(&p, "c", "k1"), None);
        e.at_unix -= MAX_AGE.as_secs() + 1;
        write(&p, &e).unwrap();
        assert_eq!(read::<Availability>(&p, "b", "k1"), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_answer_is_computed_once_per_key_and_then_read() {
        if !enabled() {
            return;
        }
        let stem = format!("selftest-{}", std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ask = |key: &str, v: u32| rt.block_on(cached(&stem, key, async move { v }));
        assert_eq!(ask("k1", 1), (1, false));
        // Cached: the new computation is not run.
        assert_eq!(ask("k1", 2), (1, true));
        assert_eq!(ask("k2", 3), (3, false));
        for ext in ["json", "lock"] {
            std::fs::remove_file(cache_dir().join(format!("{stem}.{ext}"))).unwrap();
        }
    }

    #[test]
    fn the_key_changes_with_what_configures_a_backend_only() {
        use std::collections::BTreeMap;
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect::<Vec<(std::ffi::OsString, std::ffi::OsString)>>()
                .into_iter()
        };
        let attrs = BTreeMap::new();
        let base = config_key_of(
            &attrs,
            "fx",
            env(&[("CELLCHECK_REMOTE_DRIVER", "/bin/false"), ("HOME", "/root")]),
        );
        let other_driver = config_key_of(
            &attrs,
            "fx",
            env(&[
                ("CELLCHECK_REMOTE_DRIVER", "python3 d.py"),
                ("HOME", "/root"),
            ]),
        );
        assert_ne!(base, other_driver);
        assert_ne!(
            base,
            config_key_of(
                &attrs,
                "fx2",
                env(&[("CELLCHECK_REMOTE_DRIVER", "/bin/false")])
            )
        );
        let mut runtime = BTreeMap::new();
        runtime.insert("runtime".to_string(), "runc 1.1".to_string());
        assert_ne!(
            base,
            config_key_of(
                &runtime,
                "fx",
                env(&[("CELLCHECK_REMOTE_DRIVER", "/bin/false")])
            )
        );
        // Selection, strictness, the per-process canary and unrelated variables do not count.
        let same = config_key_of(
            &attrs,
            "fx",
            env(&[
                ("CELLCHECK_BACKENDS", "remote"),
                ("CELLCHECK_STRICT", "1"),
                ("CELLCHECK_CANARY_ABC", "x"),
                ("CELLCHECK_REMOTE_DRIVER", "/bin/false"),
                ("PATH", "/x"),
            ]),
        );
        assert_eq!(base, same);
    }
}
