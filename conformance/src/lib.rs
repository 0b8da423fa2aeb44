//! The shared conformance scenario set, runnable against any cellcheck backend.
//!
//! One scenario set (`src/scenarios/`, one module per family) runs against every registered
//! backend. Each (backend, scenario) pair becomes one libtest-mimic trial named
//! `{backend}::{family}::{scenario}`, so both `cargo test` and `cargo nextest run` drive it.
//!
//! # Running it against your backend
//!
//! In your crate, add a test target with `harness = false`:
//!
//! ```toml
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! and in `tests/conformance.rs`:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # struct MyBackend;
//! # impl MyBackend { fn new() -> Arc<dyn cellcheck_contract::Backend> { unimplemented!() } }
//! fn main() -> std::process::ExitCode {
//!     cellcheck_conformance::Suite::new()
//!         .backend(|| MyBackend::new()) // a factory: called lazily, once per process
//!         .run_from_args()
//! }
//! ```
//!
//! A backend that runs the fixture rootfs takes the built fixtures instead:
//! `.backend_with_fixtures("mine", |fx| Arc::new(Mine::new(&fx.rootfs)))`. Its `rootfs` is a
//! private copy (see [`roots`]): any change in it is that backend's.
//! The repository's `fixtures/outside-crate/` is a complete crate doing this (built and run by
//! xtask's tests, as an author outside the repository would).
//!
//! # What a run decides, and where
//!
//! - Skips are decided when listing: a scenario needing an unsupported [`Capability`], a backend
//!   whose preflight says unavailable, or an expectation with `outcome = "skip"` makes the trial
//!   ignored, and its reason is printed (and recorded in the results file). nextest shows an
//!   ignored trial only as SKIP, so each backend also lists a trial
//!   `{backend}::`[`REASONS_TRIAL`] that prints every skip and known failure of that backend with
//!   its reason, grouped; have nextest show its output (see the README's nextest configuration).
//! - `CELLCHECK_BACKENDS=host,runc` lists only those backends.
//! - `CELLCHECK_STRICT=1` turns every "could not run" skip (the backend's preflight says it is
//!   unavailable on this host) into a failure; a capability the backend declares unsupported, with
//!   its reason, stays a skip.
//! - `CELLCHECK_EXPECTATIONS` names the expectations file (see [`expectations`]), overriding the
//!   one a test target gives [`Suite::expectations_file`]; the file is checked before listing.
//! - `CELLCHECK_RESULTS=<path>` appends one JSON line per trial (see [`results`]).
//! - `CELLCHECK_PREFLIGHT_CACHE=0` disables the per-backend preflight cache and the cache of
//!   the basic-contract check (see the README).
//! - `CELLCHECK_TRACE` filters what backends trace into a failing trial's message (default
//!   `debug`, `off` for none); `RUST_LOG` prints traces live to stderr (see [`trace`]).
//!
//! Every scenario is followed by the residue checker ([`residue`]), scoped to the cells the
//! scenario touched, so scenarios may run in parallel in one process.
//!
//! [`Capability`]: cellcheck_contract::Capability

pub mod admission;
pub mod audit;
pub mod expectations;
pub mod faulty;
pub mod harness;
pub mod ids;
pub mod ledger;
pub mod preflight;
pub mod residue;
pub mod results;
pub mod roots;
pub mod scenarios;
mod suite;
pub mod trace;

pub use harness::{Ctx, Failure, Scenario};
pub use suite::{
    check_selection, rerun_command, run_scenario, run_scenario_bounded, shell_quote, Suite,
    REASONS_TRIAL,
};
