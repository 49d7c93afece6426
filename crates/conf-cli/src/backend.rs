//! The one place that maps `--backend` to a Burn `Device`.

use burn::prelude::Device;

/// Backends the command line knows; which are compiled in is decided by Cargo features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Pure-Rust CPU backend (default).
    Flex,
    Wgpu,
    TchCpu,
    TchCuda,
    Cuda,
}

impl BackendChoice {
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::TchCpu => "tch-cpu",
            Self::TchCuda => "tch-cuda",
            Self::Cuda => "cuda",
        }
    }
}

/// The device for a backend, or why this binary cannot provide it.
pub fn device(choice: BackendChoice) -> Result<Device, String> {
    match choice {
        BackendChoice::Flex => Ok(Device::flex()),
        other => Err(format!(
            "--backend {}: this binary was built without it; only flex is available in this build",
            other.name()
        )),
    }
}
