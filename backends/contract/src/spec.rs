//! The `ExecutionCell` document and its admission rules.
//!
//! Admission ([`CellDocument::admit`]) runs before a backend creates anything: a document that breaks
//! a rule is refused with [`CellError::InvalidSpec`] naming the field (a dotted path) and the rule.

use serde::{Deserialize, Serialize};

use crate::CellError;

pub const API_VERSION: &str = "cellcheck.dev/v1";
pub const KIND: &str = "ExecutionCell";
/// Longest id: 1 leading character plus 127 more.
pub const MAX_ID_LEN: usize = 128;
/// Longest hostname Linux accepts (`HOST_NAME_MAX`); a cell's hostname is its id cut to this.
pub const MAX_HOSTNAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CellDocument {
    pub api_version: String,
    pub kind: String,
    pub spec: CellSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CellSpec {
    pub id: String,
    pub run: RunSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<Authority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<Lifetime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunSpec {
    pub argv: Vec<String>,
    /// Absolute path inside the cell; `/` when absent. It must exist in the cell's root: a missing
    /// one fails `create` with [`CellError::NotFound`] of kind
    /// [`crate::ResourceKind::WorkingDirectory`], and is never created in the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// The declared env: the workload gets exactly these pairs, in this order, and nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuMax>,
    /// Most processes (tasks) the cell's workload may hold at once: the workload and what it
    /// starts, never the backend's own helpers (1 means the workload alone, unable to fork).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `RLIMIT_NOFILE` of the workload; [`DEFAULT_OPEN_FILES`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<OpenFiles>,
}

/// A soft and a hard limit on open files (`RLIMIT_NOFILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenFiles {
    pub soft: u64,
    pub hard: u64,
}

/// What a workload gets when the document declares no `limits.openFiles`: a soft limit below the
/// hard one, so a runtime that silently raises soft to hard is seen.
pub const DEFAULT_OPEN_FILES: OpenFiles = OpenFiles {
    soft: 1024,
    hard: 4096,
};

/// The smallest `memoryMaxBytes` admitted: 32 MiB. A limit is charged with more than the workload
/// on every kind of backend that runs one: a runtime's own init before it execs the workload (runc's
/// needs about 2 MiB and is refused a limit below its usage), gVisor's whole sandbox (killed while
/// setting up under 8 MiB). Below this no backend could even start the cell, so such a limit is
/// refused at admission rather than failing create on some backends and not others.
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;

/// The smallest `cpuMax.quota` admitted, in microseconds: the kernel refuses a CFS quota under
/// 1 ms (EINVAL). Rounding a smaller quota up would give the workload more CPU than declared.
pub const MIN_CPU_QUOTA_US: u64 = 1000;

/// The largest `openFiles.hard` admitted: the kernel's default `fs.nr_open`.
pub const MAX_OPEN_FILES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuMax {
    /// Microseconds of CPU per period.
    pub quota: u64,
    /// Period in microseconds.
    pub period: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authority {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_refs: Vec<String>,
    /// Egress rules as `host:port` strings; empty means no network beyond loopback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lifetime {
    /// After this many seconds the backend destroys the cell on its own.
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Environment {
    /// Image reference; absent means the backend's default root (the fixture rootfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A document that passed admission. Backends take only this, so nothing unadmitted is ever created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedCell {
    doc: CellDocument,
}

impl AdmittedCell {
    pub fn document(&self) -> &CellDocument {
        &self.doc
    }
    pub fn spec(&self) -> &CellSpec {
        &self.doc.spec
    }
    pub fn id(&self) -> &str {
        &self.doc.spec.id
    }
    pub fn argv(&self) -> &[String] {
        &self.doc.spec.run.argv
    }
    pub fn env(&self) -> &[EnvVar] {
        &self.doc.spec.run.env
    }
    pub fn working_directory(&self) -> &str {
        self.doc
            .spec
            .run
            .working_directory
            .as_deref()
            .unwrap_or("/")
    }
    pub fn timeout_ms(&self) -> Option<u64> {
        self.doc.spec.run.timeout_ms
    }
    pub fn limits(&self) -> Limits {
        self.doc.spec.run.limits.clone().unwrap_or_default()
    }
    /// The workload's `RLIMIT_NOFILE`: declared, else [`DEFAULT_OPEN_FILES`].
    pub fn open_files(&self) -> OpenFiles {
        self.limits().open_files.unwrap_or(DEFAULT_OPEN_FILES)
    }
    pub fn ttl_seconds(&self) -> Option<u64> {
        self.doc.spec.lifetime.map(|l| l.ttl_seconds)
    }
    /// The cell's hostname: its id truncated to its first [`MAX_HOSTNAME_LEN`] bytes (ids may be
    /// up to [`MAX_ID_LEN`] long, a Linux hostname at most 64; ids are ASCII, so the cut is
    /// always on a character boundary).
    pub fn hostname(&self) -> &str {
        let id = self.id();
        &id[..id.len().min(MAX_HOSTNAME_LEN)]
    }
    /// The declared env as `NAME=value` strings, in declared order.
    pub fn env_pairs(&self) -> Vec<String> {
        self.env()
            .iter()
            .map(|e| format!("{}={}", e.name, e.value))
            .collect()
    }
    /// The same document under another id (restore into a new cell); the new id is admitted too.
    pub fn with_id(&self, id: &str) -> Result<AdmittedCell, CellError> {
        let mut doc = self.doc.clone();
        doc.spec.id = id.to_string();
        doc.admit()
    }
}

impl CellDocument {
    /// A minimal valid document running `argv` under `id`.
    pub fn new(id: impl Into<String>, argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        CellDocument {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            spec: CellSpec {
                id: id.into(),
                run: RunSpec {
                    argv: argv.into_iter().map(Into::into).collect(),
                    ..RunSpec::default()
                },
                ..CellSpec::default()
            },
        }
    }

    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.run.env.push(EnvVar {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    pub fn with_timeout_ms(mut self, ms: u64) -> Self {
        self.spec.run.timeout_ms = Some(ms);
        self
    }

    pub fn with_ttl_seconds(mut self, ttl: u64) -> Self {
        self.spec.lifetime = Some(Lifetime { ttl_seconds: ttl });
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.spec.run.limits = Some(limits);
        self
    }

    /// Parse a JSON document. A parse failure is an invalid spec too (field `document`).
    pub fn from_json(text: &str) -> Result<Self, CellError> {
        serde_json::from_str(text).map_err(|e| CellError::invalid("document", e.to_string()))
    }

    /// Check every admission rule; the first broken one is returned.
    pub fn admit(&self) -> Result<AdmittedCell, CellError> {
        if self.api_version != API_VERSION {
            return Err(CellError::invalid(
                "apiVersion",
                format!(
                    "unknown apiVersion {:?}, expected {API_VERSION:?}",
                    self.api_version
                ),
            ));
        }
        if self.kind != KIND {
            return Err(CellError::invalid(
                "kind",
                format!("unknown kind {:?}, expected {KIND:?}", self.kind),
            ));
        }
        validate_id(&self.spec.id).map_err(|r| CellError::invalid("spec.id", r))?;
        let run = &self.spec.run;
        if run.argv.is_empty() {
            return Err(CellError::invalid("spec.run.argv", "must not be empty"));
        }
        for (i, a) in run.argv.iter().enumerate() {
            if a.is_empty() {
                return Err(CellError::invalid(
                    format!("spec.run.argv[{i}]"),
                    "must not be empty",
                ));
            }
            if a.contains('\0') {
                return Err(CellError::invalid(
                    format!("spec.run.argv[{i}]"),
                    "must not contain NUL",
                ));
            }
        }
        if let Some(wd) = &run.working_directory {
            if !wd.starts_with('/') || wd.contains('\0') {
                return Err(CellError::invalid(
                    "spec.run.workingDirectory",
                    "must be an absolute path without NUL",
                ));
            }
        }
        for (i, e) in run.env.iter().enumerate() {
            if e.name.is_empty() {
                return Err(CellError::invalid(
                    format!("spec.run.env[{i}].name"),
                    "must not be empty",
                ));
            }
            if e.name.contains('=') {
                return Err(CellError::invalid(
                    format!("spec.run.env[{i}].name"),
                    "must not contain '='",
                ));
            }
            if e.name.contains('\0') {
                return Err(CellError::invalid(
                    format!("spec.run.env[{i}].name"),
                    "must not contain NUL",
                ));
            }
            if e.value.contains('\0') {
                return Err(CellError::invalid(
                    format!("spec.run.env[{i}].value"),
                    "must not contain NUL",
                ));
            }
            if run.env[..i].iter().any(|p| p.name == e.name) {
                return Err(CellError::invalid(
                    format!("spec.run.env[{i}].name"),
                    format!("duplicate name {:?}", e.name),
                ));
            }
        }
        if run.timeout_ms == Some(0) {
            return Err(CellError::invalid(
                "spec.run.timeoutMs",
                "must be greater than zero",
            ));
        }
        if let Some(l) = self.spec.lifetime {
            if l.ttl_seconds == 0 {
                return Err(CellError::invalid(
                    "spec.lifetime.ttlSeconds",
                    "must be greater than zero",
                ));
            }
            if let Some(t) = run.timeout_ms {
                if t > l.ttl_seconds.saturating_mul(1000) {
                    return Err(CellError::invalid(
                        "spec.run.timeoutMs",
                        format!("{t} ms exceeds the ttl of {} s", l.ttl_seconds),
                    ));
                }
            }
        }
        if let Some(l) = &run.limits {
            if l.memory_max_bytes.is_some_and(|m| m < MIN_MEMORY_BYTES) {
                return Err(CellError::invalid(
                    "spec.run.limits.memoryMaxBytes",
                    format!("must be at least {MIN_MEMORY_BYTES} (32 MiB)"),
                ));
            }
            if l.pids_max == Some(0) {
                return Err(CellError::invalid(
                    "spec.run.limits.pidsMax",
                    "must be greater than zero",
                ));
            }
            if let Some(o) = l.open_files {
                // Below 3 not even stdio fits; above nr_open the kernel refuses setrlimit.
                if !(3..=MAX_OPEN_FILES).contains(&o.hard) {
                    return Err(CellError::invalid(
                        "spec.run.limits.openFiles.hard",
                        format!("must be between 3 and {MAX_OPEN_FILES}"),
                    ));
                }
                if !(3..=o.hard).contains(&o.soft) {
                    return Err(CellError::invalid(
                        "spec.run.limits.openFiles.soft",
                        "must be at least 3 and at most the hard limit",
                    ));
                }
            }
            if let Some(c) = l.cpu_max {
                if c.period == 0 || c.quota == 0 {
                    return Err(CellError::invalid(
                        "spec.run.limits.cpuMax",
                        "quota and period must be greater than zero",
                    ));
                }
                if !(1000..=1_000_000).contains(&c.period) {
                    return Err(CellError::invalid(
                        "spec.run.limits.cpuMax.period",
                        "must be between 1000 and 1000000 microseconds",
                    ));
                }
                if c.quota < MIN_CPU_QUOTA_US {
                    return Err(CellError::invalid(
                        "spec.run.limits.cpuMax.quota",
                        format!("must be at least {MIN_CPU_QUOTA_US} microseconds"),
                    ));
                }
            }
        }
        if let Some(a) = &self.spec.authority {
            for (i, s) in a.secret_refs.iter().enumerate() {
                if s.is_empty() || s.contains('\0') {
                    return Err(CellError::invalid(
                        format!("spec.authority.secretRefs[{i}]"),
                        "must be non-empty without NUL",
                    ));
                }
            }
            for (i, s) in a.egress.iter().enumerate() {
                if s.is_empty() || s.contains('\0') {
                    return Err(CellError::invalid(
                        format!("spec.authority.egress[{i}]"),
                        "must be non-empty without NUL",
                    ));
                }
            }
        }
        if let Some(env) = &self.spec.environment {
            if let Some(img) = &env.image {
                if img.is_empty() || img.contains('\0') {
                    return Err(CellError::invalid(
                        "spec.environment.image",
                        "must be non-empty without NUL",
                    ));
                }
            }
        }
        Ok(AdmittedCell { doc: self.clone() })
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` and no `..`: safe as a hostname part, a path component and a
/// runtime container id.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("longer than {MAX_ID_LEN} characters"));
    }
    let mut chars = id.chars();
    let first = chars.next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric() {
        return Err("must start with a letter or digit".into());
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {bad:?} not allowed (only A-Z a-z 0-9 . _ -)"
        ));
    }
    if id.contains("..") {
        return Err("must not contain '..'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(doc: &CellDocument) -> String {
        match doc.admit() {
            Err(CellError::InvalidSpec { field, .. }) => field,
            other => panic!("expected invalid spec, got {other:?}"),
        }
    }

    #[test]
    fn the_hostname_is_the_id_cut_to_64_bytes() {
        for (len, want) in [(1, 1), (63, 63), (64, 64), (65, 64), (MAX_ID_LEN, 64)] {
            let id: String = "a1.b-".chars().cycle().take(len).collect();
            let cell = CellDocument::new(&id, ["/bin/true"]).admit().unwrap();
            assert_eq!(cell.hostname(), &id[..want], "id of {len}");
        }
    }

    #[test]
    fn minimal_document_is_admitted() {
        let d = CellDocument::new("a-1", ["/bin/true"]).with_env("K", "v=1");
        let a = d.admit().unwrap();
        assert_eq!(a.env_pairs(), vec!["K=v=1".to_string()]);
        assert_eq!(a.working_directory(), "/");
    }

    #[test]
    fn each_rule_names_its_field() {
        let base = CellDocument::new("ok", ["/bin/true"]);
        let mut d = base.clone();
        d.spec.id = String::new();
        assert_eq!(field_of(&d), "spec.id");
        d.spec.id = "a/b".into();
        assert_eq!(field_of(&d), "spec.id");
        d.spec.id = "a..b".into();
        assert_eq!(field_of(&d), "spec.id");
        d.spec.id = "x".repeat(129);
        assert_eq!(field_of(&d), "spec.id");
        let mut d = base.clone();
        d.spec.run.argv.clear();
        assert_eq!(field_of(&d), "spec.run.argv");
        let mut d = base.clone();
        d.spec.run.argv.push("a\0b".into());
        assert_eq!(field_of(&d), "spec.run.argv[1]");
        let d = base.clone().with_env("A=B", "x");
        assert_eq!(field_of(&d), "spec.run.env[0].name");
        let d = base.clone().with_env("A", "x\0");
        assert_eq!(field_of(&d), "spec.run.env[0].value");
        let d = base.clone().with_env("A", "1").with_env("A", "2");
        assert_eq!(field_of(&d), "spec.run.env[1].name");
        let d = base.clone().with_ttl_seconds(1).with_timeout_ms(1001);
        assert_eq!(field_of(&d), "spec.run.timeoutMs");
        let d = base.clone().with_limits(Limits {
            memory_max_bytes: Some(0),
            ..Limits::default()
        });
        assert_eq!(field_of(&d), "spec.run.limits.memoryMaxBytes");
        let limited = |l: Limits| base.clone().with_limits(l);
        let memory = |m| Limits {
            memory_max_bytes: Some(m),
            ..Limits::default()
        };
        let quota = |quota| Limits {
            cpu_max: Some(CpuMax {
                quota,
                period: 100_000,
            }),
            ..Limits::default()
        };
        assert_eq!(
            field_of(&limited(memory(MIN_MEMORY_BYTES - 1))),
            "spec.run.limits.memoryMaxBytes"
        );
        assert!(limited(memory(MIN_MEMORY_BYTES)).admit().is_ok());
        assert_eq!(
            field_of(&limited(quota(MIN_CPU_QUOTA_US - 1))),
            "spec.run.limits.cpuMax.quota"
        );
        assert!(limited(quota(MIN_CPU_QUOTA_US)).admit().is_ok());
        let open = |soft, hard| {
            base.clone().with_limits(Limits {
                open_files: Some(OpenFiles { soft, hard }),
                ..Limits::default()
            })
        };
        assert_eq!(field_of(&open(10, 5)), "spec.run.limits.openFiles.soft");
        assert_eq!(field_of(&open(2, 5)), "spec.run.limits.openFiles.soft");
        assert_eq!(field_of(&open(3, 2)), "spec.run.limits.openFiles.hard");
        assert_eq!(
            field_of(&open(3, MAX_OPEN_FILES + 1)),
            "spec.run.limits.openFiles.hard"
        );
        assert_eq!(
            open(64, 64).admit().unwrap().open_files(),
            OpenFiles { soft: 64, hard: 64 }
        );
        assert_eq!(base.admit().unwrap().open_files(), DEFAULT_OPEN_FILES);
        let mut d = base.clone();
        d.api_version = "v0".into();
        assert_eq!(field_of(&d), "apiVersion");
    }

    #[test]
    fn json_round_trip_uses_camel_case() {
        let d = CellDocument::new("j", ["/bin/true"])
            .with_timeout_ms(5)
            .with_ttl_seconds(1);
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains("\"apiVersion\""), "{text}");
        assert!(text.contains("\"timeoutMs\":5"), "{text}");
        assert_eq!(CellDocument::from_json(&text).unwrap(), d);
        assert!(matches!(
            CellDocument::from_json("{\"apiVersion\":1}"),
            Err(CellError::InvalidSpec { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn admission_never_panics(id in ".{0,140}", arg in ".{0,8}", key in ".{0,6}", val in ".{0,6}",
                                  t in proptest::option::of(0u64..5000), ttl in proptest::option::of(0u64..5)) {
            let mut d = CellDocument::new(id, [arg]).with_env(key, val);
            d.spec.run.timeout_ms = t;
            d.spec.lifetime = ttl.map(|ttl_seconds| Lifetime { ttl_seconds });
            match d.admit() {
                Ok(_) | Err(CellError::InvalidSpec { .. }) => {}
                Err(e) => panic!("admission returned a non-spec error: {e}"),
            }
        }
    }
}
