//! `lookahead`: parses the command line and dispatches; the work lives in the library crates.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use conf_cli::Failure;
use conf_cli::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // burn-train logs every iteration at info; RUST_LOG=burn_train=info shows it.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,burn_train=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in a redirected log.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match conf_cli::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Stopped { code, message }) => {
            eprintln!("stopped: {message}");
            ExitCode::from(code)
        }
    }
}
