//! `cargo xtask ...`: project tasks that shell out to cargo, pip and the `lookahead` binary.

mod backend;
mod bench;
mod cuda;

use std::path::{Path, PathBuf};
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
    /// tch-cuda), Mesa's software Vulkan where there is no GPU driver (wgpu), CubeCL's LLVM and
    /// libdevice from PyPI (cuda).
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
    /// Time each objective's training step: `lookahead bench` on each backend and the PyTorch
    /// reference (bench/reference.py, from the tch-cpu set-up's venv) on the same shapes and
    /// thread counts, interleaved, medians over rounds, ratios to PyTorch's standard step and
    /// to each one's own; figures in results/bench/{shape}-threads{N}.json. Shapes: plan-b16
    /// (DESIGN §9's) and quick on CPU backends, gpu on CUDA ones, unless `--shape` names them.
    /// `--smoke` runs one short round of the quick shape.
    Bench {
        #[arg(long = "backend", value_enum, default_value = "flex")]
        backends: Vec<Backend>,
        #[arg(long)]
        smoke: bool,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Thread counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Data-parallel worker counts for lookahead's backends, comma-separated
        /// (`lookahead bench --devices`; on the CPU, workers sharing it).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        workers: Vec<usize>,
        /// Shapes, comma-separated: plan-b16, quick, quick-gpt2 (the quick shape with GPT-2's
        /// vocabulary on tinyshakespeare), gpu.
        #[arg(long = "shape", value_delimiter = ',')]
        shapes: Vec<bench::Shape>,
        /// Timed steps per objective and round (after 3 warm-up steps); default: each shape's
        /// own (60 at quick, whose steps take milliseconds; 10 at the others).
        #[arg(long)]
        steps: Option<usize>,
    },
    /// Build `lookahead` in release mode with these backends compiled in (and the environment
    /// they need), without running anything.
    Build {
        #[arg(long = "backend", value_enum, required = true)]
        backends: Vec<Backend>,
        /// Also pack what a GPU machine without Rust needs into this folder: the stripped,
        /// compressed binary and (for cuda) libdevice; `bench/gpu-check.sh` runs it there.
        #[arg(long, value_name = "DIR")]
        kit: Option<PathBuf>,
        /// With tch backends in a kit: build against the libtorch of this PyTorch version, the
        /// one on the GPU machine (`python3 -c 'import torch; print(torch.__version__)'` there),
        /// whose libraries the kit's binary then loads there.
        #[arg(long, value_name = "VERSION", requires = "kit")]
        kit_torch: Option<String>,
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
            backends,
            smoke,
            rounds,
            threads,
            workers,
            shapes,
            steps,
        } => {
            let gpu = backends
                .iter()
                .any(|b| matches!(b, Backend::Cuda | Backend::TchCuda));
            let plan = if smoke {
                bench::BenchPlan::smoke(backends)
            } else {
                bench::BenchPlan {
                    workers,
                    shapes: match (shapes.is_empty(), gpu) {
                        (false, _) => shapes,
                        (true, true) => vec![bench::GPU],
                        (true, false) => vec![bench::PLAN_B16, bench::QUICK],
                    },
                    backends,
                    threads,
                    rounds: rounds.max(1),
                    steps: steps.map(|n| n.max(1)),
                    warmup_steps: 3,
                }
            };
            bench::run(&plan)
        }
        Task::Build {
            backends,
            kit,
            kit_torch,
        } => {
            let env = match &kit_torch {
                Some(version) => BuildEnv::for_kit(&backends, version)?,
                None => BuildEnv::for_backends(&backends)?,
            };
            let binary = build_lookahead(&backends, &env)?;
            match kit {
                Some(dir) => pack_kit(&binary, &dir, &backends, &env, kit_torch.as_deref()),
                None => Ok(()),
            }
        }
        Task::Test { backends } => {
            let env = BuildEnv::for_backends(&backends)?;
            let features = backend::features(&backends);
            // Clippy also checks the cuda backend once its LLVM is set up (it cannot be built
            // without it).
            let mut linted = backends.clone();
            let lint_env = match env.with_cuda() {
                Some(cuda_env) => {
                    linted.push(Backend::Cuda);
                    cuda_env
                }
                None => {
                    eprintln!(
                        "note: cuda is not linted: `cargo xtask setup --backend cuda` sets up its LLVM"
                    );
                    env.clone()
                }
            };
            let lint_features = backend::features(&linted);
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
            // conf-model too: its unit tests of the backends' own operations (the tch
            // backends' CPU kernels against the libtorch operations their GPU runs).
            let mut command = vec!["test", "--release", "-p", "conf-cli"];
            if !features.is_empty() {
                command.extend(["-p", "conf-model", "--features", &features]);
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

/// Builds `lookahead` with the backends' features; returns the binary's path.
pub(crate) fn build_lookahead(backends: &[Backend], env: &BuildEnv) -> anyhow::Result<PathBuf> {
    let features = backend::features(backends);
    let mut args = vec!["build", "--release", "-p", "conf-cli"];
    if !features.is_empty() {
        args.extend(["--features", &features]);
    }
    cargo(&args, env)?;
    let target = match env.vars.iter().find(|(k, _)| k == "CARGO_TARGET_DIR") {
        Some((_, dir)) => PathBuf::from(dir),
        None => target_dir(),
    };
    Ok(target.join("release/lookahead"))
}

/// Cargo's target folder: `CARGO_TARGET_DIR`, else `target/` in the workspace.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `binary`, stripped and gzipped, with the run-time files of its backends and, for tch, the
/// PyTorch version whose libtorch it needs (the GPU machine's own).
fn pack_kit(
    binary: &Path,
    dir: &Path,
    backends: &[Backend],
    env: &BuildEnv,
    torch_version: Option<&str>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join("lookahead");
    std::fs::copy(binary, &copy)?;
    backend::run(Command::new("strip").arg(&copy))?;
    let gz = std::fs::File::create(dir.join("lookahead.gz"))?;
    backend::run(Command::new("gzip").arg("-c").arg(&copy).stdout(gz))?;
    std::fs::remove_file(&copy)?;
    if backends.contains(&Backend::Cuda) {
        let cuda_path = env
            .vars
            .iter()
            .find(|(k, _)| k == "CUDA_PATH")
            .map(|(_, v)| PathBuf::from(v))
            .context("no CUDA_PATH in the cuda environment")?;
        let libdevice = Path::new("nvvm/libdevice/libdevice.10.bc");
        std::fs::create_dir_all(dir.join("cuda").join(libdevice.parent().expect("a parent")))?;
        std::fs::copy(cuda_path.join(libdevice), dir.join("cuda").join(libdevice))?;
    }
    let torch_file = dir.join("torch-version");
    if backends.iter().any(|b| b.uses_libtorch()) {
        let version = torch_version.unwrap_or(backend::TORCH_VERSION);
        std::fs::write(&torch_file, format!("{version}\n"))?;
    } else if torch_file.exists() {
        std::fs::remove_file(&torch_file)?;
    }
    let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
    std::fs::write(dir.join("backends"), names.join(" ") + "\n")?;
    println!("kit for {} in {}", names.join(", "), dir.display());
    Ok(())
}

/// Runs cargo in the workspace root with the backend's build and run environment.
pub(crate) fn cargo(args: &[&str], env: &BuildEnv) -> anyhow::Result<()> {
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

/// The checkout `cargo xtask` runs in: `cargo run` sets `CARGO_MANIFEST_DIR` for the process.
/// The compile-time value is only the fallback: a build cache shared between checkouts (CI's)
/// can hold an xtask binary compiled in another one.
pub(crate) fn workspace_root() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        manifest_dir
            .parent()
            .expect("xtask sits in the workspace root")
            .to_path_buf()
    })
}
