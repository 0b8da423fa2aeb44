//! The built-in backends, each listed once: its name, its factory over the built fixtures, the
//! probe row that decides whether this host can run it, and its benchmark.
//!
//! The conformance test target, xtask's probe, `cargo xtask bench` and the matrix checks all read
//! [`Registry::builtin`]. Adding a backend is its crate, one [`Entry`] in [`Registry::builtin`]
//! and its `[[backend]]` in every Linux `matrix/<class>.toml` (xtask's tests check the pairing).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use cellcheck_contract::{Availability, Backend};
use cellcheck_fixtures::Fixtures;

/// Builds a backend over the built fixtures. Cheap: no I/O beyond what the backend's own
/// constructor does (the suite calls it lazily, once per process).
pub type Factory = Arc<dyn Fn(&Fixtures) -> Arc<dyn Backend> + Send + Sync>;

/// Several probe rows answered at once: (row, availability) each.
pub type RowsFuture = Pin<Box<dyn Future<Output = Vec<(String, Availability)>> + Send>>;

/// Answers several probe rows at once (e.g. QEMU's accelerators: one guest boot per row).
pub type RowsProbe = fn() -> RowsFuture;

/// How the probe row(s) that decide a backend are produced.
#[derive(Clone)]
pub enum Probe {
    /// The backend's own `preflight()` answers the row named after the backend.
    Preflight,
    /// A probe of its own answers these rows; each runner class names the one that decides.
    Rows {
        rows: &'static [&'static str],
        probe: RowsProbe,
    },
    /// The backend stands on another entry's row (e.g. nested cells run on the host backend).
    SameAs(&'static str),
}

/// What `cargo xtask bench` runs for a backend: an example of the backend's crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bench {
    /// The bench's own name; `bench-<name>.json` is what the example writes.
    pub name: &'static str,
    pub package: &'static str,
    pub example: &'static str,
    /// Arguments after `--`.
    pub args: &'static [&'static str],
}

/// One backend.
#[derive(Clone)]
pub struct Entry {
    /// The backend's [`Backend::name`], the first part of its trial names.
    pub name: String,
    pub factory: Factory,
    pub probe: Probe,
    pub bench: Option<Bench>,
    /// What the user set to add this backend (e.g. `CELLCHECK_REMOTE_DRIVER="cmd"`), if it is
    /// not built in: the user asked for it, so its being unavailable is a failure, not a skip.
    pub configured_by: Option<String>,
}

impl Entry {
    pub fn new<F>(name: &str, probe: Probe, factory: F) -> Entry
    where
        F: Fn(&Fixtures) -> Arc<dyn Backend> + Send + Sync + 'static,
    {
        Entry {
            name: name.to_string(),
            factory: Arc::new(factory),
            probe,
            bench: None,
            configured_by: None,
        }
    }

    /// A backend served by the driver `cmd` (split on whitespace), configured by the user under
    /// `name`: its `hello` must give that name (see [`cellcheck_remote::configured_driver`]).
    pub fn driver(name: &str, cmd: &str) -> Entry {
        let what = format!("{}={cmd:?}", cellcheck_contract::drivers::env_var(name));
        let argv = cellcheck_contract::drivers::argv(cmd);
        let owned = name.to_string();
        Entry::new(name, Probe::Preflight, move |fx| {
            driver_backend(&owned, argv.clone(), fx)
        })
        .configured_by(what)
    }

    /// Marks the backend as configured by the user through `what`.
    pub fn configured_by(mut self, what: impl Into<String>) -> Entry {
        self.configured_by = Some(what.into());
        self
    }

    pub fn with_bench(mut self, bench: Bench) -> Entry {
        self.bench = Some(bench);
        self
    }

    /// The probe rows a runner class may name for this backend.
    pub fn rows(&self) -> Vec<String> {
        match &self.probe {
            Probe::Preflight => vec![self.name.clone()],
            Probe::Rows { rows, .. } => rows.iter().map(|r| r.to_string()).collect(),
            Probe::SameAs(row) => vec![row.to_string()],
        }
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("rows", &self.rows())
            .field("bench", &self.bench)
            .field("configured_by", &self.configured_by)
            .finish_non_exhaustive()
    }
}

/// Why a registry is not well formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    DuplicateName(String),
    /// `SameAs` names a row no entry produces.
    DanglingRow {
        backend: String,
        row: String,
    },
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::DuplicateName(n) => write!(f, "backend {n:?} is registered twice"),
            RegistryError::DanglingRow { backend, row } => write!(
                f,
                "backend {backend:?} stands on probe row {row:?}, which no backend produces"
            ),
        }
    }
}

impl std::error::Error for RegistryError {}

/// An ordered list of backends (matrix order).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds `entry` at the end.
    pub fn with(mut self, entry: Entry) -> Registry {
        self.entries.push(entry);
        self
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Every row the probe produces for these backends, in entry order.
    pub fn produced_rows(&self) -> Vec<String> {
        let mut rows = Vec::new();
        for e in &self.entries {
            if !matches!(e.probe, Probe::SameAs(_)) {
                rows.extend(e.rows());
            }
        }
        rows
    }

    /// Names are unique and every `SameAs` row is produced by some entry.
    pub fn check(&self) -> Result<(), RegistryError> {
        for (i, e) in self.entries.iter().enumerate() {
            if self.entries[..i].iter().any(|o| o.name == e.name) {
                return Err(RegistryError::DuplicateName(e.name.clone()));
            }
        }
        let produced = self.produced_rows();
        for e in &self.entries {
            if let Probe::SameAs(row) = e.probe {
                if !produced.iter().any(|r| r == row) {
                    return Err(RegistryError::DanglingRow {
                        backend: e.name.clone(),
                        row: row.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Adds a backend per driver the env configures (`CELLCHECK_<NAME>_DRIVER="cmd args"`, see
    /// [`cellcheck_contract::drivers`]), each under its own name (it has no matrix entry: it
    /// exists only when configured); `CELLCHECK_REMOTE_DRIVER` is backend `remote`.
    pub fn with_env_drivers(self) -> Registry {
        cellcheck_contract::drivers::from_env()
            .into_iter()
            .fold(self, |r, (name, cmd)| r.with(Entry::driver(&name, &cmd)))
    }

    /// This repository's backends, in matrix order.
    #[cfg(target_os = "linux")]
    pub fn builtin() -> Registry {
        use cellcheck_host::{HostBackend, HostConfig};
        use cellcheck_oci::{OciBackend, OciConfig};
        use cellcheck_qemu::{QemuBackend, QemuConfig};

        let oci_bench = |name, runtime| Bench {
            name,
            package: "cellcheck-oci",
            example: "bench-oci",
            args: runtime,
        };
        Registry::new()
            .with(
                Entry::new("host", Probe::Preflight, |fx| {
                    Arc::new(HostBackend::new(HostConfig::from_fixtures(fx)))
                })
                .with_bench(Bench {
                    name: "host",
                    package: "cellcheck-host",
                    example: "bench-host",
                    args: &[],
                }),
            )
            .with(
                Entry::new("runc", Probe::Preflight, |fx| {
                    Arc::new(OciBackend::runc(OciConfig::from_fixtures(fx)))
                })
                .with_bench(oci_bench("runc", &["--runtime", "runc"])),
            )
            .with(Entry::new("crun", Probe::Preflight, |fx| {
                Arc::new(OciBackend::crun(OciConfig::from_fixtures(fx)))
            }))
            .with(
                Entry::new("runsc", Probe::Preflight, |fx| {
                    Arc::new(OciBackend::runsc(OciConfig::from_fixtures(fx)))
                })
                .with_bench(oci_bench("runsc", &["--runtime", "runsc"])),
            )
            .with(
                Entry::new(
                    "qemu",
                    Probe::Rows {
                        rows: &["kvm", "qemu-tcg"],
                        probe: qemu_rows,
                    },
                    |fx| Arc::new(QemuBackend::new(QemuConfig::from_fixtures(fx))),
                )
                .with_bench(Bench {
                    name: "qemu",
                    package: "cellcheck-qemu",
                    example: "bench-qemu",
                    args: &[],
                }),
            )
            .with(Entry::new(
                "nested",
                // Nested cells are host cells served by a driver inside a host cell.
                Probe::SameAs("host"),
                cellcheck_remote::nested::NestedBackend::for_suite,
            ))
            .with(
                Entry::new("remote-python", Probe::Preflight, |fx| {
                    cellcheck_remote::remote_with_fixtures(
                        "remote-python",
                        cellcheck_remote::python_runc_driver_argv(),
                        fx,
                    )
                })
                // The driver protocol's own overhead (the example drives `cellcheck-driver host`).
                .with_bench(Bench {
                    name: "remote",
                    package: "cellcheck-remote",
                    example: "bench-remote",
                    args: &[],
                }),
            )
    }

    #[cfg(not(target_os = "linux"))]
    pub fn builtin() -> Registry {
        Registry::new()
    }
}

#[cfg(target_os = "linux")]
fn driver_backend(name: &str, argv: Vec<String>, fx: &Fixtures) -> Arc<dyn Backend> {
    cellcheck_remote::configured_driver(name, argv, fx)
}

// Drivers are spawned by the remote backend, which is built on Linux only.
#[cfg(not(target_os = "linux"))]
fn driver_backend(name: &str, _argv: Vec<String>, _fx: &Fixtures) -> Arc<dyn Backend> {
    unimplemented!("driver backend {name:?}: drivers run on Linux only")
}

/// QEMU's accelerator rows: a guest boots to its agent with KVM, and with TCG.
#[cfg(target_os = "linux")]
fn qemu_rows() -> RowsFuture {
    use cellcheck_qemu::{probe_accelerator, Accel};
    Box::pin(async {
        let (kvm, tcg) = tokio::join!(probe_accelerator(Accel::Kvm), probe_accelerator(Accel::Tcg));
        vec![("kvm".to_string(), kvm), ("qemu-tcg".to_string(), tcg)]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_is_well_formed() {
        let r = Registry::builtin();
        r.check().unwrap();
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                r.names(),
                [
                    "host",
                    "runc",
                    "crun",
                    "runsc",
                    "qemu",
                    "nested",
                    "remote-python"
                ]
            );
            assert_eq!(r.get("qemu").unwrap().rows(), ["kvm", "qemu-tcg"]);
            assert_eq!(r.get("nested").unwrap().rows(), ["host"]);
            assert!(!r.produced_rows().contains(&"nested".to_string()));
        }
    }

    #[test]
    fn duplicates_and_dangling_rows_are_refused() {
        let unused = |_: &Fixtures| -> Arc<dyn Backend> { unreachable!("never built") };
        let r = Registry::new()
            .with(Entry::new("a", Probe::Preflight, unused))
            .with(Entry::new("a", Probe::Preflight, unused));
        assert_eq!(r.check(), Err(RegistryError::DuplicateName("a".into())));
        let r = Registry::new().with(Entry::new("b", Probe::SameAs("nosuch"), unused));
        let e = r.check().unwrap_err();
        assert!(e.to_string().contains("nosuch"), "{e}");
    }
}
