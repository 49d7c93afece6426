//! `cargo xtask ...`: project tasks that shell out to cargo, pip and the `lookahead` binary.

mod backend;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use backend::{Backend, BuildEnv};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks for the lookahead workspace")]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a backend needs: libtorch through a project-local Python venv (tch-cpu,
    /// tch-cuda), Mesa's software Vulkan where there is no GPU driver (wgpu).
    Setup {
        #[arg(long, value_enum)]
        backend: Backend,
    },
    /// Build `lookahead` in release mode with a backend's feature and run `lookahead experiment`
    /// on it; every argument after the backend is passed on.
    Experiment {
        #[arg(long, value_enum, default_value = "flex")]
        backend: Backend,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Time each objective's training step on a backend (`lookahead bench`) at the benchmark
    /// shape (the `plan` preset, batch 16; `gpu` preset on CUDA backends); `--smoke` runs a
    /// few steps of the quick preset. Figures go to results/bench/{backend}.json.
    Bench {
        #[arg(long, value_enum, default_value = "flex")]
        backend: Backend,
        #[arg(long)]
        smoke: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Lint conf-cli with these backends and cuda compiled in, then run its tests with these
    /// backends: the cross-backend equivalence tests and a short training of both models on each.
    Test {
        #[arg(long = "backend", value_enum, required = true)]
        backends: Vec<Backend>,
    },
}

fn main() -> anyhow::Result<()> {
    match Xtask::parse().task {
        Task::Setup { backend } => backend::setup(backend),
        Task::Experiment { backend, args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_lookahead(backend, "experiment", &args)
        }
        Task::Bench {
            backend,
            smoke,
            args,
        } => {
            let output = format!("results/bench/{}.json", backend.name());
            std::fs::create_dir_all(workspace_root().join("results/bench"))?;
            let mut bench_args: Vec<&str> = if smoke {
                vec!["--preset", "quick", "--steps", "2", "--warmup-steps", "1"]
            } else if matches!(backend, Backend::Cuda | Backend::TchCuda) {
                vec!["--preset", "gpu"]
            } else {
                vec!["--preset", "plan", "--batch-size", "16"]
            };
            bench_args.extend(["--output", &output]);
            bench_args.extend(args.iter().map(String::as_str));
            run_lookahead(backend, "bench", &bench_args)
        }
        Task::Test { backends } => {
            let env = BuildEnv::for_backends(&backends)?;
            let features = backend::features(&backends);
            // Clippy also type-checks the cuda backend, which cannot be linked without CubeCL's
            // LLVM download (docs/backends.md).
            let mut linted = backends.clone();
            linted.push(Backend::Cuda);
            let lint_features = backend::features(&linted);
            let lint_env = env.with_cuda_check();
            cargo(
                &[
                    "clippy",
                    "-p",
                    "conf-cli",
                    "--all-targets",
                    "--release",
                    "--features",
                    &lint_features,
                    "--",
                    "-D",
                    "warnings",
                ],
                &lint_env,
            )?;
            let mut command = vec!["test", "--release", "-p", "conf-cli"];
            if !features.is_empty() {
                command.extend(["--features", &features]);
            }
            cargo(&command, &env)
        }
    }
}

/// `lookahead SUBCOMMAND --backend B ARGS...` from a release build with B's feature, in B's
/// build and run environment.
fn run_lookahead(backend: Backend, subcommand: &str, args: &[&str]) -> anyhow::Result<()> {
    let env = BuildEnv::for_backends(&[backend])?;
    let features = backend::features(&[backend]);
    let mut command = vec!["run", "--release", "-p", "conf-cli"];
    if !features.is_empty() {
        command.extend(["--features", &features]);
    }
    command.extend(["--", subcommand, "--backend", backend.name()]);
    command.extend(args);
    cargo(&command, &env)
}

/// Runs cargo in the workspace root with the backend's build and run environment.
fn cargo(args: &[&str], env: &BuildEnv) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (key, value) in &env.vars {
        eprintln!("+ {key}={value}");
    }
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.vars.iter().map(|(k, v)| (k, v)))
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
}
