//! Project tasks: probe the host, pick the matrix, run the conformance suite, write reports.
//!
//! A plain binary, one module per command; `cargo xtask` with no arguments lists the commands.
//! Flags are declared once, below; the help is generated from these declarations.

mod bench;
mod classes;
mod clean;
mod conformance;
mod gate;
mod install;
mod matrix;
#[cfg(target_os = "linux")]
mod memory;
#[cfg(all(test, target_os = "linux"))]
mod new_backend;
mod nextest;
mod outside;
#[cfg(all(test, target_os = "linux"))]
mod outside_tests;
mod probe;
mod report;
#[cfg(target_os = "linux")]
mod soak;
#[cfg(target_os = "linux")]
mod stress;
mod util;
mod verdict;
#[cfg(test)]
mod workflow;

use std::process::ExitCode;

// Counts live heap bytes, so the soak tells a leak from memory the allocator keeps.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: memory::Counting = memory::Counting;

use clap::{CommandFactory, Parser, Subcommand};

/// cellcheck's project tasks.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Probe this host (each capability with evidence); writes target/conformance/host.json.
    Probe {
        /// Fail unless the probes derive this runner class.
        #[arg(long, value_name = "CLASS")]
        expect_class: Option<String>,
    },
    /// This runner class's backends and which of them this host can run.
    Matrix {
        /// Print every class's shards as a workflow matrix (JSON).
        #[arg(long)]
        github: bool,
    },
    /// Build the fixtures, probe, run the suite, write report.json, junit.xml, report.tap,
    /// matrix.md and report.html under target/conformance/.
    Conformance(conformance::Options),
    /// Run the backends' benchmark examples; collect them into target/conformance/bench.md.
    Bench {
        /// Only this backend's (or this bench's) benchmark; repeatable.
        #[arg(long = "backend", value_name = "NAME")]
        backends: Vec<String>,
    },
    /// Reconcile the ledger now: remove and list by name what the cells of dead harnesses left
    /// (destroyed through their backend, then by recorded pid and path; never by name pattern).
    Clean(clean::Options),
    /// Merge report.json files of shards and runner classes (found under each DIR) into one
    /// matrix (gate.json, gate.md, gate.html) and one exit code.
    Gate(gate::Options),
    /// Create → wait → destroy cycles per backend, sequential then K-way concurrent; prints fds,
    /// RSS and leftovers every 1,000 cycles; writes target/conformance/soak-<backend>.json.
    #[cfg(target_os = "linux")]
    Soak(soak::Options),
    /// The selected backends' trials N times while every core, a disk and fork are kept busy;
    /// reports every trial that ever failed, with all its messages (target/conformance/stress.json).
    #[cfg(target_os = "linux")]
    Stress(stress::Options),
}

fn main() -> ExitCode {
    if std::env::args().len() <= 1 {
        print!("{}", Cli::command().render_help());
        return ExitCode::SUCCESS;
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help, and errors, printed by clap as it formats them (exit 0 or 2).
        Err(e) => e.exit(),
    };
    let outcome = match cli.command {
        Cmd::Probe { expect_class } => probe::run(expect_class.as_deref()).map(|()| true),
        Cmd::Matrix { github } => matrix::run(github).map(|()| true),
        Cmd::Conformance(opts) => conformance::run(&opts),
        Cmd::Bench { backends } => bench::run(&backends),
        Cmd::Gate(opts) => gate::run(&opts),
        Cmd::Clean(opts) => clean::run(&opts),
        #[cfg(target_os = "linux")]
        Cmd::Soak(opts) => soak::run(&opts),
        #[cfg(target_os = "linux")]
        Cmd::Stress(opts) => stress::run(&opts),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_well_formed_and_its_help_names_every_command() {
        Cli::command().debug_assert();
        let help = Cli::command().render_help().to_string();
        for c in [
            "probe",
            "matrix",
            "conformance",
            "bench",
            "gate",
            "clean",
            "soak",
            "stress",
        ] {
            assert!(help.contains(c), "{c} missing from:\n{help}");
        }
    }
}
