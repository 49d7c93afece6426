//! The `lookahead` command: command-line parsing, backend dispatch, the experiment runner, the
//! results file and the report. The training itself lives in the library crates.

pub mod backend;
pub mod bf16_training;
pub mod cli;
pub mod commands;
pub mod config;
pub mod equivalence;
pub mod peak;
pub mod presets;
pub mod report;
pub mod results;
pub mod signals;
pub mod stats;

use crate::cli::Command;

/// Exit codes of the command-line contract: 0 ok, 1 run failed, 2 bad usage or input, and
/// 128 + the signal (130 also for the dashboard's stop) for a run stopped early.
pub enum Failure {
    BadInput(anyhow::Error),
    Run(anyhow::Error),
    Stopped { code: u8, message: String },
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Run(e.into())
    }
}

/// Runs one subcommand.
pub fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Data(args) => commands::data::run(args),
        Command::Model(args) => commands::model::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Experiment(args) => commands::experiment::run(args),
        Command::Results(command) => commands::results::run(command),
        Command::Report { files } => commands::report::run(files),
        Command::Bench(args) => commands::bench::run(args),
        Command::CheckBackend(args) => commands::check_backend::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Sample(args) => commands::sample::run(args),
    }
}
