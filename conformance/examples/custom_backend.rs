//! How a backend author outside this repository runs the suite: this file is what their
//! `tests/conformance.rs` (with `harness = false`) looks like. Here the "custom" backend is the
//! host backend wrapped in a thin newtype, so the example also runs:
//!
//! ```text
//! cargo run -p cellcheck-conformance --example custom_backend -- --list
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cellcheck_contract::{
    Availability, Backend, Capabilities, CellDocument, CellError, CellHandle, ExitReport,
    Footprint, TeardownReport,
};

/// A backend that delegates to another: stands in for "your backend".
struct MyBackend {
    inner: Arc<dyn Backend>,
}

impl MyBackend {
    /// Cheap: no I/O (the fixtures path is only computed, not built).
    fn new() -> Self {
        let dir = cellcheck_fixtures::fixtures_dir();
        let cfg = cellcheck_host::HostConfig::new(
            dir.join("bin/cellcheck-host-init"),
            dir.join("rootfs"),
        );
        MyBackend {
            inner: Arc::new(cellcheck_host::HostBackend::new(cfg)),
        }
    }
}

#[async_trait]
impl Backend for MyBackend {
    fn name(&self) -> &str {
        "mine"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn preflight(&self) -> Availability {
        self.inner.preflight().await
    }
    fn attributes(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("example".into(), "true".into())])
    }
    async fn create(&self, doc: &CellDocument) -> Result<CellHandle, CellError> {
        self.inner.create(doc).await
    }
    async fn wait(&self, id: &str) -> Result<ExitReport, CellError> {
        self.inner.wait(id).await
    }
    async fn destroy(&self, id: &str) -> Result<TeardownReport, CellError> {
        self.inner.destroy(id).await
    }
    fn footprint(&self, id: &str) -> Footprint {
        self.inner.footprint(id)
    }
    async fn list(&self) -> Vec<String> {
        self.inner.list().await
    }
}

fn main() -> std::process::ExitCode {
    cellcheck_conformance::Suite::new()
        .backend(|| Arc::new(MyBackend::new()))
        .run_from_args()
}
