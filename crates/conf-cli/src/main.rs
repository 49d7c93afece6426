//! `lookahead`: parses the command line and dispatches; the work lives in the library crates.

mod backend;
#[cfg(test)]
mod backend_equivalence;
mod cli;
mod commands;
mod config;
mod report;
mod results;
mod stats;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Exit codes of the command-line contract: 0 ok, 1 run failed, 2 bad usage or input.
pub enum Failure {
    BadInput(anyhow::Error),
    Run(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::Run(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // burn-train logs every iteration at info; RUST_LOG=burn_train=info shows it.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,burn_train=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Data(args) => commands::data::run(args),
        Command::Model(args) => commands::model::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Experiment(args) => commands::experiment::run(args),
        Command::Results(command) => commands::results::run(command),
        Command::Report { files } => commands::report::run(files),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
