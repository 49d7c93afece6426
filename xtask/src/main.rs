//! `cargo xtask ...`: project tasks that only shell out to cargo and the `lookahead` binary.

use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks for the lookahead workspace")]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The checks CI runs: formatting, clippy with warnings as errors, the test suite.
    Ci,
    /// Build `lookahead` in release mode for a backend and run `lookahead experiment` on it;
    /// every argument after the backend is passed on.
    Experiment {
        #[arg(long, default_value = "flex")]
        backend: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Xtask::parse().task {
        Task::Ci => {
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo(&["test", "--workspace", "--release"])
        }
        Task::Experiment { backend, args } => {
            if backend != "flex" {
                bail!(
                    "--backend {backend}: this workspace builds only the flex backend so far; the others come behind conf-cli features"
                );
            }
            let mut command = vec![
                "run",
                "--release",
                "-p",
                "conf-cli",
                "--",
                "experiment",
                "--backend",
                "flex",
            ];
            command.extend(args.iter().map(String::as_str));
            cargo(&command)
        }
    }
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}
