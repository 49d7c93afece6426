//! The one place that maps `--backend` and `--device` to a Burn `Device`.
//!
//! Which backends exist in a binary is decided by conf-cli's Cargo features (`flex`, `wgpu`,
//! `tch`, `cuda`); everything after this function is backend-agnostic.

use burn::prelude::*;
use conf_model::Precision;

#[cfg(not(any(feature = "flex", feature = "wgpu", feature = "tch", feature = "cuda")))]
compile_error!("conf-cli needs at least one backend feature: flex, wgpu, tch or cuda");

/// Backends the command line knows; which are compiled in is decided by Cargo features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Pure-Rust CPU backend (feature `flex`, the default).
    Flex,
    /// Any GPU through wgpu (Vulkan, Metal, DX12), or Mesa's software Vulkan (feature `wgpu`).
    Wgpu,
    /// libtorch on the CPU (feature `tch`).
    TchCpu,
    /// libtorch on an NVIDIA GPU (feature `tch`).
    TchCuda,
    /// CUDA through CubeCL (feature `cuda`).
    Cuda,
}

impl BackendChoice {
    pub const ALL: [Self; 5] = [
        Self::Flex,
        Self::Wgpu,
        Self::TchCpu,
        Self::TchCuda,
        Self::Cuda,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::TchCpu => "tch-cpu",
            Self::TchCuda => "tch-cuda",
            Self::Cuda => "cuda",
        }
    }

    /// The conf-cli feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::TchCpu | Self::TchCuda => "tch",
            Self::Cuda => "cuda",
        }
    }

    pub fn is_compiled(self) -> bool {
        match self {
            Self::Flex => cfg!(feature = "flex"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::TchCpu | Self::TchCuda => cfg!(feature = "tch"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Whether `--device N` picks among several devices of this backend.
    pub fn takes_index(self) -> bool {
        matches!(self, Self::Wgpu | Self::TchCuda | Self::Cuda)
    }

    /// The first backend this binary holds, in the order of `ALL` (flex in a default build).
    pub fn default_compiled() -> Self {
        Self::ALL
            .into_iter()
            .find(|b| b.is_compiled())
            .expect("at least one backend feature is enabled")
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "--backend {backend}: this binary was built without it; build with \
         `cargo build --release -p conf-cli --features {feature}` or run \
         `cargo xtask experiment --backend {backend}` (`cargo xtask setup --backend {backend}` \
         first); compiled in: {compiled}"
    )]
    NotCompiled {
        backend: BackendChoice,
        feature: &'static str,
        compiled: String,
    },
    #[error("--device {index}: --backend {backend} runs on the CPU and has no device index")]
    NoDeviceIndex {
        backend: BackendChoice,
        index: usize,
    },
    #[error("--backend {backend}{device}: no usable device: {reason}")]
    Unavailable {
        backend: BackendChoice,
        device: String,
        reason: String,
    },
}

impl BackendError {
    /// Usage errors (a backend this binary lacks) exit with 2; a missing device with 1.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Unavailable { .. })
    }
}

/// The device for `--backend` and `--device`, checked with a small computation so that a
/// missing GPU or library is reported here, never replaced by another device.
pub fn device(choice: BackendChoice, index: Option<usize>) -> Result<Device, BackendError> {
    if !choice.is_compiled() {
        let compiled: Vec<&str> = BackendChoice::ALL
            .into_iter()
            .filter(|b| b.is_compiled())
            .map(BackendChoice::name)
            .collect();
        return Err(BackendError::NotCompiled {
            backend: choice,
            feature: choice.feature(),
            compiled: compiled.join(", "),
        });
    }
    if let Some(index) = index.filter(|_| !choice.takes_index()) {
        return Err(BackendError::NoDeviceIndex {
            backend: choice,
            index,
        });
    }
    let device = compiled_device(choice, index);
    probe(&device).map_err(|reason| BackendError::Unavailable {
        backend: choice,
        device: index.map(|i| format!(" --device {i}")).unwrap_or_default(),
        reason: match choice {
            // cudarc's own message (logged above) lists the library names it tried.
            BackendChoice::Cuda => format!(
                "{reason} (is there an NVIDIA GPU with its driver, libcuda.so.1 on the library path?)"
            ),
            _ => reason,
        },
    })?;
    Ok(device)
}

/// The variable through which libtorch lets its CUDA f32 matrix products use TF32 (read once,
/// at its first product; NVIDIA's PyTorch containers set it to 1).
pub const TF32_SWITCH: &str = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE";

/// Whether `backend` computes in `precision`, judged from `tf32_switch`, the value of
/// [`TF32_SWITCH`] in the environment. bf16 runs on every backend (on the CPU backends it
/// reproduces a GPU's bf16 products, more slowly than f32). TF32 is a switch of libtorch's
/// CUDA products, on exactly when the variable is 1, so tch-cuda takes tf32 with it and f32
/// without it; the other backends have no such switch.
pub fn check_precision(
    backend: BackendChoice,
    precision: Precision,
    tf32_switch: Option<&str>,
) -> Result<(), String> {
    let switched_on = tf32_switch == Some("1");
    match (precision, backend) {
        (Precision::Tf32, BackendChoice::TchCuda) if !switched_on => Err(format!(
            "tf32 on tch-cuda needs {TF32_SWITCH}=1 in lookahead's environment \
             (libtorch's TF32 switch)"
        )),
        (Precision::Tf32, BackendChoice::TchCuda) => Ok(()),
        (Precision::Tf32, other) => Err(format!(
            "tf32 is libtorch's switch for its CUDA products (tch-cuda); {other} has none: \
             use f32 or bf16"
        )),
        (Precision::F32, BackendChoice::TchCuda) if switched_on => Err(format!(
            "f32 on tch-cuda with {TF32_SWITCH}=1 in the environment: libtorch would run the \
             f32 products in TF32; unset it, or ask for --precision tf32"
        )),
        _ => Ok(()),
    }
}

#[allow(unused_variables)] // `index` is unused in a CPU-only build
fn compiled_device(choice: BackendChoice, index: Option<usize>) -> Device {
    match choice {
        #[cfg(feature = "flex")]
        BackendChoice::Flex => Device::flex(),
        // Without --device wgpu takes its best adapter, which is the software one (lavapipe) on a
        // machine without a GPU; with --device N it must be the N-th discrete GPU.
        #[cfg(feature = "wgpu")]
        BackendChoice::Wgpu => Device::wgpu(match index {
            Some(i) => burn::tensor::DeviceKind::DiscreteGpu(i),
            None => burn::tensor::DeviceKind::DefaultDevice,
        }),
        // burn-tch is deprecated upstream but is still Burn's libtorch backend.
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        BackendChoice::TchCpu => {
            // f32 on the CPU uses no oneDNN kernel; its checks slow every small product.
            conf_model::fused::disable_onednn();
            Device::libtorch()
        }
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        BackendChoice::TchCuda => Device::libtorch_cuda(index.unwrap_or(0)),
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda => Device::cuda(index.unwrap_or(0)),
        #[allow(unreachable_patterns)]
        other => unreachable!("{other} is checked to be compiled in"),
    }
}

/// Name of the thread that runs the probe; its panics are expected and not printed.
const PROBE_THREAD: &str = "backend-probe";

/// Runs `2 * [1, 2]` on the device. Backends report a missing driver or GPU by panicking on
/// first use; the probe runs on its own thread so the panic is caught and its message returned.
fn probe(device: &Device) -> Result<(), String> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(PROBE_THREAD) {
                previous(info);
            }
        }));
    });
    let outcome = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(PROBE_THREAD.into())
            .spawn_scoped(scope, || {
                let x = Tensor::<1>::from_floats([1.0, 2.0], device);
                (x.clone() + x).into_data().try_to_vec::<f32>()
            })
            .expect("a thread starts")
            .join()
    });
    // Libraries append stack traces (libtorch inside a Debug string, as an escaped "\n");
    // the first line says what is wrong.
    let first_line = |text: String| {
        let line = text.lines().next().unwrap_or_default();
        line.split("\\n").next().unwrap_or_default().to_string()
    };
    match outcome {
        Ok(Ok(values)) if values == [2.0, 4.0] => Ok(()),
        Ok(Ok(values)) => Err(format!("2 * [1, 2] gave {values:?}")),
        Ok(Err(e)) => Err(first_line(format!("{e:?}"))),
        Err(payload) => Err(first_line(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend failed to start".into()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_is_libtorchs_cuda_switch_and_f32_refuses_it_on() {
        use BackendChoice::{Cuda, Flex, TchCpu, TchCuda};
        let ok = |b, p, switch| check_precision(b, p, switch).is_ok();
        for backend in BackendChoice::ALL {
            assert!(ok(backend, Precision::Bf16, None), "{backend}: bf16");
            assert!(ok(backend, Precision::F32, None), "{backend}: f32");
        }
        assert!(ok(TchCuda, Precision::Tf32, Some("1")));
        let refused = check_precision(TchCuda, Precision::Tf32, Some("0")).unwrap_err();
        assert!(refused.contains(TF32_SWITCH), "{refused}");
        for backend in [Flex, TchCpu, Cuda] {
            assert!(!ok(backend, Precision::Tf32, Some("1")), "{backend}: tf32");
        }
        let silent_tf32 = check_precision(TchCuda, Precision::F32, Some("1")).unwrap_err();
        assert!(silent_tf32.contains("unset it"), "{silent_tf32}");
        assert!(
            ok(Flex, Precision::F32, Some("1")),
            "the switch is libtorch's alone"
        );
    }

    #[cfg(feature = "tch")]
    #[test]
    fn tch_cpu_computes_with_libtorchs_onednn_switched_off() {
        assert!(device(BackendChoice::TchCpu, None).is_ok());
        // Reads libtorch's own flag back through the same calls (their names and ABI).
        assert_eq!(
            conf_model::fused::disable_onednn(),
            cfg!(all(target_os = "linux", target_arch = "x86_64"))
        );
    }

    #[test]
    fn flex_is_the_default_and_computes() {
        assert_eq!(BackendChoice::default_compiled(), BackendChoice::Flex);
        assert!(device(BackendChoice::Flex, None).is_ok());
    }

    #[test]
    fn a_cpu_backend_refuses_a_device_index() {
        let err = device(BackendChoice::Flex, Some(1)).unwrap_err();
        assert!(err.is_usage());
        assert_eq!(
            err.to_string(),
            "--device 1: --backend flex runs on the CPU and has no device index"
        );
    }

    #[test]
    fn a_backend_not_compiled_in_names_its_feature_and_xtask() {
        for choice in BackendChoice::ALL.into_iter().filter(|b| !b.is_compiled()) {
            let err = device(choice, None).unwrap_err();
            assert!(err.is_usage());
            let text = err.to_string();
            assert!(
                text.contains(&format!("--features {}", choice.feature())),
                "{text}"
            );
            assert!(
                text.contains(&format!("cargo xtask experiment --backend {choice}")),
                "{text}"
            );
        }
    }
}
