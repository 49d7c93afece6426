//! `lookahead`: parses the command line and dispatches; the work lives in the library crates.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use conf_cli::Failure;
use conf_cli::cli::Cli;

fn main() -> ExitCode {
    keep_freed_buffers();
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

/// A training step frees and allocates many 1–4 MB tensors. glibc serves blocks that size with
/// fresh mmaps (zeroed pages, a page fault each) and trims the heap behind them; raising both
/// thresholds keeps freed buffers for reuse (measured: about 7% of the step on flex,
/// docs/performance.md).
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
