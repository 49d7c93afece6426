//! Model FLOP utilisation (MFU): the model FLOPs a run computes per second (`cost.rs`:
//! 6N + attention, plus the no-gradient passes) over the device's dense peak for the precision
//! it computes in. Peaks of known NVIDIA GPUs from their datasheets (dense, without sparsity);
//! any other device needs `--peak-tflops`.

use conf_model::Precision;

/// A GPU by a part of the name `nvidia-smi` gives it, with its dense peaks in TFLOP/s.
struct Peak {
    name: &'static str,
    f32: f64,
    tf32: f64,
    bf16: f64,
}

/// Most specific names first: "H100 PCIe" before "H100".
const PEAKS: [Peak; 5] = [
    Peak {
        name: "H100 PCIe",
        f32: 51.2,
        tf32: 378.0,
        bf16: 756.0,
    },
    Peak {
        name: "H100",
        f32: 66.9,
        tf32: 494.7,
        bf16: 989.4,
    },
    Peak {
        name: "H200",
        f32: 66.9,
        tf32: 494.7,
        bf16: 989.4,
    },
    Peak {
        name: "A100",
        f32: 19.5,
        tf32: 156.0,
        bf16: 312.0,
    },
    Peak {
        name: "L40S",
        f32: 91.6,
        tf32: 183.0,
        bf16: 362.1,
    },
];

/// The dense peak of the GPU called `gpu_name`, when it is one of the table's.
pub fn dense_peak_tflops(gpu_name: &str, precision: Precision) -> Option<f64> {
    let peak = PEAKS.iter().find(|p| gpu_name.contains(p.name))?;
    Some(match precision {
        Precision::F32 => peak.f32,
        Precision::Tf32 => peak.tf32,
        Precision::Bf16 => peak.bf16,
    })
}

/// The name of NVIDIA GPU `index`, from `nvidia-smi`, where there is a driver.
pub fn gpu_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            &format!("--id={index}"),
        ])
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// `tflops` over `peak`, both in TFLOP/s.
pub fn mfu(tflops: f64, peak: Option<f64>) -> Option<f64> {
    peak.filter(|p| *p > 0.0).map(|p| tflops / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_have_their_datasheet_peaks() {
        let sxm = "NVIDIA H100 80GB HBM3";
        assert_eq!(dense_peak_tflops(sxm, Precision::Bf16), Some(989.4));
        assert_eq!(dense_peak_tflops(sxm, Precision::F32), Some(66.9));
        assert_eq!(
            dense_peak_tflops("NVIDIA H100 PCIe", Precision::Bf16),
            Some(756.0)
        );
        assert_eq!(
            dense_peak_tflops("NVIDIA A100-SXM4-80GB", Precision::Tf32),
            Some(156.0)
        );
        assert_eq!(dense_peak_tflops("NVIDIA H200", Precision::F32), Some(66.9));
        assert_eq!(dense_peak_tflops("AMD EPYC 7B13", Precision::F32), None);
        // 23.4 TFLOP/s of f32 on an H100 SXM is 35% of its peak.
        let m = mfu(23.4, dense_peak_tflops(sxm, Precision::F32)).unwrap();
        assert!((m - 0.3498).abs() < 1e-3, "{m}");
        assert_eq!(mfu(1.0, None), None);
    }
}
