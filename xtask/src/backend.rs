//! What each backend needs to build and run, and how `cargo xtask setup` provides it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// PyTorch release whose libtorch burn-tch 0.22 (through torch-sys 0.22) is built against.
pub const TORCH_VERSION: &str = "2.9.0";
/// Reads `lookahead export` files in `bench/reference.py`.
const SAFETENSORS_VERSION: &str = "0.8.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Flex,
    Wgpu,
    TchCpu,
    TchCuda,
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::TchCpu => "tch-cpu",
            Self::TchCuda => "tch-cuda",
            Self::Cuda => "cuda",
        }
    }

    /// The conf-cli feature to add to the default build (flex is in every build).
    fn feature(self) -> Option<&'static str> {
        match self {
            Self::Flex => None,
            Self::Wgpu => Some("wgpu"),
            Self::TchCpu | Self::TchCuda => Some("tch"),
            Self::Cuda => Some("cuda"),
        }
    }

    /// Whether the backend runs on libtorch (built and run against a PyTorch's libraries).
    pub fn uses_libtorch(self) -> bool {
        matches!(self, Self::TchCpu | Self::TchCuda)
    }
}

/// The conf-cli features for these backends, comma-separated.
pub fn features(backends: &[Backend]) -> String {
    let mut features: Vec<&str> = backends.iter().filter_map(|b| b.feature()).collect();
    features.dedup();
    features.sort_unstable();
    features.dedup();
    features.join(",")
}

/// Environment variables the build and the run need.
#[derive(Debug, Default, Clone)]
pub struct BuildEnv {
    pub vars: Vec<(String, String)>,
}

impl BuildEnv {
    pub fn for_backends(backends: &[Backend]) -> anyhow::Result<Self> {
        let mut env = Self::default();
        if backends.iter().any(|b| b.uses_libtorch()) {
            env.vars.extend(libtorch_env()?);
        }
        if backends.contains(&Backend::Cuda) {
            env.vars.extend(cuda_env());
            env.vars.extend(crate::cuda::env()?);
        }
        if backends.contains(&Backend::Wgpu)
            && cfg!(target_os = "linux")
            && vulkan_drivers().is_empty()
        {
            bail!("wgpu: no Vulkan driver found; run `cargo xtask setup --backend wgpu`");
        }
        Ok(env)
    }
}

impl BuildEnv {
    /// The build environment of a kit for a GPU machine whose PyTorch is `torch_version`
    /// (`build --kit --kit-torch`): tch builds against that version's libtorch (from PyPI, in
    /// a cache), whose CUDA libraries are found on the GPU machine and need not be here; in a
    /// target folder of its own, so that the usual builds stay as they are.
    pub fn for_kit(backends: &[Backend], torch_version: &str) -> anyhow::Result<Self> {
        let others: Vec<Backend> = backends
            .iter()
            .copied()
            .filter(|b| !b.uses_libtorch())
            .collect();
        let mut env = Self::for_backends(&others)?;
        if others.len() < backends.len() {
            let libtorch = kit_libtorch(torch_version)?;
            env.vars.extend([
                ("LIBTORCH".into(), libtorch.display().to_string()),
                ("LIBTORCH_BYPASS_VERSION_CHECK".into(), "1".into()),
                (
                    "RUSTFLAGS".into(),
                    "-C link-arg=-Wl,--allow-shlib-undefined".into(),
                ),
            ]);
        }
        let target = crate::target_dir().join(format!("kit-torch-{torch_version}"));
        env.vars
            .push(("CARGO_TARGET_DIR".into(), target.display().to_string()));
        Ok(env)
    }

    /// This environment plus what a cuda build needs, once `setup --backend cuda` has run.
    pub fn with_cuda(&self) -> Option<Self> {
        let cuda = crate::cuda::env().ok()?;
        let mut vars = self.vars.clone();
        vars.extend(cuda_env());
        vars.extend(cuda);
        Some(Self { vars })
    }
}

/// Where `setup` puts the Python environment that provides libtorch: `$LOOKAHEAD_VENV`, else
/// `.venv` in the workspace.
fn venv_dir() -> PathBuf {
    std::env::var_os("LOOKAHEAD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join(".venv"))
}

/// The venv's Python when it can import torch (the PyTorch reference of the benchmark).
pub fn torch_python() -> Option<PathBuf> {
    let python = venv_dir().join("bin/python");
    Command::new(&python)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(python)
}

fn library_path_var() -> &'static str {
    if cfg!(target_os = "macos") {
        "DYLD_LIBRARY_PATH"
    } else {
        "LD_LIBRARY_PATH"
    }
}

fn prepend_path(var: &str, dir: &Path) -> (String, String) {
    let value = match std::env::var(var) {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    };
    (var.to_string(), value)
}

/// `LIBTORCH` when the user has one; otherwise the venv's PyTorch, found by torch-sys through
/// `LIBTORCH_USE_PYTORCH=1`, with its library folder on the loader's path for the run.
fn libtorch_env() -> anyhow::Result<Vec<(String, String)>> {
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = PathBuf::from(libtorch).join("lib");
        if !lib.is_dir() {
            bail!("LIBTORCH: {} has no lib folder", lib.display());
        }
        return Ok(vec![prepend_path(library_path_var(), &lib)]);
    }
    let venv = venv_dir();
    let (version, torch_dir) = venv_torch(&venv).with_context(|| {
        format!(
            "libtorch: no PyTorch in {}; run `cargo xtask setup --backend tch-cpu` (or set \
             LIBTORCH to a libtorch {TORCH_VERSION} folder)",
            venv.display()
        )
    })?;
    if version.split('+').next() != Some(TORCH_VERSION) {
        bail!(
            "libtorch: {} holds PyTorch {version}, burn-tch needs {TORCH_VERSION}; run `cargo xtask setup --backend tch-cpu`",
            venv.display()
        );
    }
    Ok(vec![
        ("VIRTUAL_ENV".into(), venv.display().to_string()),
        prepend_path("PATH", &venv.join("bin")),
        ("LIBTORCH_USE_PYTORCH".into(), "1".into()),
        prepend_path(library_path_var(), &torch_dir.join("lib")),
    ])
}

/// libtorch `version` from PyPI's PyTorch wheel (its CUDA libraries left out), installed once
/// into `~/.cache/lookahead-torch/{version}`; returns its folder (`include/`, `lib/`).
fn kit_libtorch(version: &str) -> anyhow::Result<PathBuf> {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
    let dir = home.join(".cache/lookahead-torch").join(version);
    let marker = dir.join(".lookahead-installed");
    if !marker.is_file() {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the partial {}", dir.display()))?;
        }
        pip(&[
            "install",
            "--no-deps",
            "--no-compile",
            "--only-binary=:all:",
            "--target",
            &dir.display().to_string(),
            &format!("torch=={version}"),
        ])?;
        std::fs::write(&marker, b"")?;
    }
    let libtorch = dir.join("torch");
    if !libtorch.join("include").is_dir() || !libtorch.join("lib").is_dir() {
        bail!(
            "{}: no include/ and lib/ in PyTorch {version}'s wheel",
            libtorch.display()
        );
    }
    Ok(libtorch)
}

/// PyTorch's version and package folder in a venv.
fn venv_torch(venv: &Path) -> anyhow::Result<(String, PathBuf)> {
    let python = venv.join("bin").join("python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, torch; print(torch.__version__); print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import torch: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next().context("no torch version")?.trim().to_string();
    let dir = PathBuf::from(lines.next().context("no torch folder")?.trim());
    Ok((version, dir))
}

/// cudarc learns the CUDA version from `nvcc`, else from the driver; with neither (a build
/// machine without a GPU), CUDA 12.8, the version of the PyTorch and nvcc wheels used here.
fn cuda_env() -> Vec<(String, String)> {
    if std::env::var_os("CUDARC_CUDA_VERSION").is_some() || succeeds("nvcc", &["--version"]) {
        return vec![];
    }
    let version = driver_cuda_version().unwrap_or_else(|| "12080".into());
    vec![("CUDARC_CUDA_VERSION".into(), version)]
}

/// The driver's CUDA version from nvidia-smi.
fn driver_cuda_version() -> Option<String> {
    let out = Command::new("nvidia-smi").output().ok()?;
    cudarc_version(&String::from_utf8_lossy(&out.stdout))
}

/// "CUDA Version: 13.0" in nvidia-smi's banner as cudarc's "13000".
fn cudarc_version(nvidia_smi: &str) -> Option<String> {
    let version = nvidia_smi
        .split("CUDA Version:")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let (major, minor) = version.split_once('.')?;
    Some(format!(
        "{}{:02}0",
        major.parse::<u32>().ok()?,
        minor.parse::<u32>().ok()?
    ))
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Vulkan driver manifests the loader will find.
fn vulkan_drivers() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for var in ["VK_DRIVER_FILES", "VK_ICD_FILENAMES"] {
        if let Some(files) = std::env::var_os(var) {
            found.extend(std::env::split_paths(&files).filter(|p| p.is_file()));
        }
    }
    for dir in [
        "/usr/share/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
        "/etc/vulkan/icd.d",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            found.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "json")),
            );
        }
    }
    found
}

pub fn setup(backend: Backend) -> anyhow::Result<()> {
    match backend {
        Backend::Flex => {
            println!(
                "flex is Burn's pure-Rust CPU backend and needs nothing: cargo run --release -- experiment"
            );
            Ok(())
        }
        Backend::Wgpu => setup_wgpu(),
        Backend::TchCpu | Backend::TchCuda => setup_libtorch(backend),
        Backend::Cuda => {
            crate::cuda::setup()?;
            match cuda_env().first() {
                Some((_, version)) => println!(
                    "cuda: cudarc builds for CUDA {version} (no nvcc here; CUDARC_CUDA_VERSION overrides)"
                ),
                None => println!(
                    "cuda: cudarc builds for the CUDA version nvcc or CUDARC_CUDA_VERSION gives"
                ),
            }
            println!(
                "cuda: the driver (libcuda) and NVRTC are loaded at run time, on the GPU machine; \
                 next: cargo xtask experiment --backend cuda"
            );
            Ok(())
        }
    }
}

fn setup_wgpu() -> anyhow::Result<()> {
    if !cfg!(target_os = "linux") {
        println!("wgpu uses the system's Metal or DirectX 12 driver: nothing to install");
        return Ok(());
    }
    if vulkan_drivers().is_empty() {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !(root && succeeds("apt-get", &["--version"])) {
            bail!(
                "wgpu: no Vulkan driver found. Install your GPU's Vulkan driver, or Mesa's software \
                 Vulkan (lavapipe): `sudo apt-get install mesa-vulkan-drivers` on Debian/Ubuntu, \
                 `sudo dnf install mesa-vulkan-drivers` on Fedora"
            );
        }
        println!(
            "wgpu: no Vulkan driver found; installing Mesa's (lavapipe runs Vulkan on the CPU)"
        );
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "mesa-vulkan-drivers",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let drivers = vulkan_drivers();
    if drivers.is_empty() {
        bail!("wgpu: still no Vulkan driver manifest after installing mesa-vulkan-drivers");
    }
    for driver in drivers {
        println!("wgpu: Vulkan driver {}", driver.display());
    }
    println!("next: cargo xtask experiment --backend wgpu");
    Ok(())
}

fn setup_libtorch(backend: Backend) -> anyhow::Result<()> {
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        println!(
            "LIBTORCH={} is set: torch-sys builds against it (it must be libtorch {TORCH_VERSION})",
            PathBuf::from(libtorch).display()
        );
        return Ok(());
    }
    let venv = venv_dir();
    let python = venv.join("bin").join("python");
    let ready = venv_torch(&venv).is_ok_and(|(v, _)| v.split('+').next() == Some(TORCH_VERSION))
        && Command::new(&python)
            .args([
                "-c",
                &format!(
                    "import safetensors; assert safetensors.__version__ == '{SAFETENSORS_VERSION}'"
                ),
            ])
            .output()
            .is_ok_and(|o| o.status.success());
    if ready {
        println!(
            "{}: PyTorch {TORCH_VERSION} and safetensors {SAFETENSORS_VERSION} are installed",
            venv.display()
        );
    } else {
        if !venv.join("bin").join("python").is_file() {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
        }
        // PyPI's Linux wheel carries CUDA 12.8 and serves tch-cpu and tch-cuda alike.
        run(Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--disable-pip-version-check",
            &format!("torch=={TORCH_VERSION}"),
            &format!("safetensors=={SAFETENSORS_VERSION}"),
        ]))?;
    }
    let probe = "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())";
    run(Command::new(&python).args(["-c", probe]))?;
    println!("next: cargo xtask experiment --backend {}", backend.name());
    Ok(())
}

/// `python3 -m pip ARGS` (`$PYTHON` if set), failing when it fails.
pub(crate) fn pip(args: &[&str]) -> anyhow::Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(&python)
        .args(["-m", "pip", "--disable-pip-version-check"])
        .args(args))
}

/// Runs `command` (echoed), failing when it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed with {status}", command.get_program());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_deduplicated_and_flex_needs_none() {
        assert_eq!(features(&[Backend::Flex]), "");
        assert_eq!(
            features(&[Backend::Wgpu, Backend::TchCpu, Backend::TchCuda]),
            "tch,wgpu"
        );
        assert_eq!(features(&[Backend::Cuda, Backend::Flex]), "cuda");
    }

    #[test]
    fn the_driver_banner_gives_cudarcs_version() {
        let banner =
            "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0     |";
        assert_eq!(cudarc_version(banner).as_deref(), Some("13000"));
        assert_eq!(
            cudarc_version("CUDA Version: 12.8 |").as_deref(),
            Some("12080")
        );
        assert_eq!(cudarc_version("no GPU"), None);
    }
}
