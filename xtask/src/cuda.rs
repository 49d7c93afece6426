//! What the cuda backend needs beyond cargo, from PyPI alone (docs/backends.md#cuda):
//! - CubeCL's LLVM. cubecl-llvm links a static LLVM with NVPTX that its build dependency
//!   `tracel-llvm-bundler` downloads from GitHub unless a bundle is already installed in
//!   `$XDG_DATA_HOME/tracel/<bundle>/` (marked by `.tracel-llvm-installed`). PyPI's relocatable
//!   `mlc-llvm-static` SDK (plus its NVPTX extra) is such an LLVM: it is linked there, and
//!   builds get `XDG_DATA_HOME` pointing at this cache.
//! - `libdevice.10.bc` (CUDA's math library as LLVM bitcode) for kernels with exp, erf, tanh, …,
//!   from the `nvidia-cuda-nvcc` wheel; runs get `CUDA_PATH` pointing at it.
//!
//! Wheels are pinned and checked by SHA-256, kept in a cache outside the clone
//! (`$LOOKAHEAD_CUDA_SDK`, else `~/.cache/lookahead-cuda`); set-up is idempotent.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::backend::pip;

/// The bundle cubecl-llvm 0.11's `tracel-llvm-bundler` (23.1.0-4) installs and links.
const BUNDLE: &str = "tracel-llvm-23.1.0-4";
const MARKER: &str = ".tracel-llvm-installed";
const LLVM_VERSION: &str = "23.1.1";

struct Wheel {
    requirement: &'static str,
    /// How the wheel's file name starts.
    file_prefix: &'static str,
    sha256: &'static str,
}

const WHEELS: [Wheel; 3] = [
    Wheel {
        requirement: "mlc-llvm-static==23.1.1.post0",
        file_prefix: "mlc_llvm_static-23.1.1.post0-",
        sha256: "dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5",
    },
    Wheel {
        requirement: "mlc-llvm-static-extra-targets==23.1.1.post0",
        file_prefix: "mlc_llvm_static_extra_targets-23.1.1.post0-",
        sha256: "c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929",
    },
    Wheel {
        requirement: "nvidia-cuda-nvcc-cu12==12.8.93",
        file_prefix: "nvidia_cuda_nvcc_cu12-12.8.93-",
        sha256: "2d6dc36fb7cb5ac9c0b8825bc13d193c35487a315664007287d0126531238011",
    },
];

/// The cache: wheels, the installed SDK, the data directory the LLVM bundler reads.
fn cache_dir() -> PathBuf {
    std::env::var_os("LOOKAHEAD_CUDA_SDK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/lookahead-cuda")
        })
}

struct Layout {
    wheels: PathBuf,
    sdk: PathBuf,
    /// `XDG_DATA_HOME` of cuda builds.
    data_home: PathBuf,
}

impl Layout {
    fn new() -> Self {
        let cache = cache_dir();
        Self {
            wheels: cache.join("wheels"),
            sdk: cache.join("sdk"),
            data_home: cache.join("data"),
        }
    }

    fn llvm(&self) -> PathBuf {
        self.sdk.join("mlc_llvm_static/static")
    }

    fn bundle(&self) -> PathBuf {
        self.data_home.join("tracel").join(BUNDLE)
    }

    /// `CUDA_PATH` of cuda runs: it holds `nvvm/libdevice/libdevice.10.bc`.
    fn cuda_path(&self) -> PathBuf {
        self.sdk.join("nvidia/cuda_nvcc")
    }

    fn installed_marker(&self) -> PathBuf {
        self.sdk.join(".lookahead-installed")
    }

    fn ready(&self) -> bool {
        self.installed_marker().is_file()
            && self.bundle().join(MARKER).is_file()
            && self
                .cuda_path()
                .join("nvvm/libdevice/libdevice.10.bc")
                .is_file()
    }
}

/// The environment of cuda builds and runs, once `setup` has run.
pub fn env() -> anyhow::Result<Vec<(String, String)>> {
    let layout = Layout::new();
    if !layout.ready() {
        bail!(
            "cuda: CubeCL's LLVM and libdevice are not set up in {}; run `cargo xtask setup --backend cuda`",
            cache_dir().display()
        );
    }
    Ok(vec![
        (
            "XDG_DATA_HOME".into(),
            layout.data_home.display().to_string(),
        ),
        ("CUDA_PATH".into(), layout.cuda_path().display().to_string()),
    ])
}

/// Downloads the pinned wheels (checked), installs them and links the LLVM where the bundler
/// looks; every step is skipped when already done.
pub fn setup() -> anyhow::Result<()> {
    let layout = Layout::new();
    std::fs::create_dir_all(&layout.wheels)
        .with_context(|| format!("creating {}", layout.wheels.display()))?;
    let mut files = Vec::new();
    for wheel in &WHEELS {
        let file = match find_wheel(&layout.wheels, wheel) {
            Some(file) => file,
            None => {
                pip(&[
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--dest",
                    &layout.wheels.display().to_string(),
                    wheel.requirement,
                ])?;
                find_wheel(&layout.wheels, wheel)
                    .with_context(|| format!("pip downloaded no {}*.whl", wheel.file_prefix))?
            }
        };
        check_sha256(&file, wheel.sha256)?;
        files.push(file);
    }
    if !layout.installed_marker().is_file() {
        if layout.sdk.exists() {
            std::fs::remove_dir_all(&layout.sdk)
                .with_context(|| format!("removing the partial {}", layout.sdk.display()))?;
        }
        let mut args = vec![
            "install".to_string(),
            "--no-deps".into(),
            "--no-index".into(),
            "--target".into(),
            layout.sdk.display().to_string(),
        ];
        args.extend(files.iter().map(|f| f.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pip(&args)?;
        std::fs::write(layout.installed_marker(), b"")?;
    }
    let config = layout.llvm().join("bin/llvm-config");
    let out = Command::new(&config)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} (it needs python3)", config.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if version != LLVM_VERSION {
        bail!(
            "{} reports LLVM {version:?}, expected {LLVM_VERSION}",
            config.display()
        );
    }
    let bundle = layout.bundle();
    std::fs::create_dir_all(bundle.parent().expect("a parent"))?;
    if std::fs::read_link(&bundle).ok().as_deref() != Some(layout.llvm().as_path()) {
        let _ = std::fs::remove_file(&bundle);
        std::os::unix::fs::symlink(layout.llvm(), &bundle)
            .with_context(|| format!("linking {}", bundle.display()))?;
    }
    std::fs::write(bundle.join(MARKER), b"")?;
    let libdevice = layout.cuda_path().join("nvvm/libdevice/libdevice.10.bc");
    if !libdevice.is_file() {
        bail!("{} is missing from the nvcc wheel", libdevice.display());
    }
    println!(
        "cuda: LLVM {LLVM_VERSION} (NVPTX) for CubeCL in {}, libdevice in {}",
        bundle.display(),
        layout.cuda_path().display()
    );
    Ok(())
}

fn find_wheel(dir: &Path, wheel: &Wheel) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(wheel.file_prefix) && n.ends_with(".whl")
            })
        })
}

fn check_sha256(file: &Path, expected: &str) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let actual: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != expected {
        bail!(
            "{}: SHA-256 {actual}, expected {expected}; delete it and run the set-up again",
            file.display()
        );
    }
    Ok(())
}
