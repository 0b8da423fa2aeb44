//! Project tasks: probe the host, pick the matrix, run the conformance suite, write reports.
//!
//! A plain binary, one module per command; `cargo xtask` with no arguments lists the commands.

mod bench;
mod conformance;
mod matrix;
mod probe;
mod report;
mod results;
mod util;
mod verdict;
#[cfg(test)]
mod workflow;

use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <command>

commands:
  probe [--expect-class CLASS]
      probe this host (each capability with evidence); writes target/conformance/host.json
  matrix [--github]
      this runner class's backends and which of them this host can run;
      --github prints every class's shards as a workflow matrix (JSON)
  conformance [--backend NAME]... [--strict] [--repeat N] [--partition K/N] [--no-build]
      build the fixtures, probe, run the suite, write report.json, junit.xml, report.tap,
      matrix.md and report.html under target/conformance/
  bench [--backend NAME]...
      run the backends' benchmark examples; collect them into target/conformance/bench.md
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    };
    let outcome = match cmd.as_str() {
        "probe" => probe::run(rest).map(|()| true),
        "matrix" => matrix::run(rest).map(|()| true),
        "conformance" => conformance::run(rest),
        "bench" => bench::run(rest),
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            Ok(true)
        }
        other => {
            eprint!("unknown command {other:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
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
