//! The AdaptiveLayer as one CUDA kernel each way on libtorch's CUDA devices
//! (`cpp/adaptive_norm.cuh`). libtorch's operations make it about eight passes over `[N, d]`
//! forward and thirteen backward (32 and 52 bytes per element in f32); the kernels read x once
//! and write the output once forward (8 bytes), and read the gradient and x once and write x's
//! gradient once backward (12 bytes), and they keep neither `x̂` nor `1 + scale` between the
//! passes. NVRTC compiles them on first use on each device (`cpp/cuda_kernels.cpp`); where that
//! fails it says so once and the caller runs libtorch's operations.

use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::{Mutex, PoisonError};

use super::torch::libtorch_result;

/// The kernels' text: NVRTC's on the GPU, and the tests' emulation's on the host.
const SOURCE: &str = include_str!("../../cpp/adaptive_norm.cuh");
/// Threads per block, a multiple of 32.
const THREADS: u32 = 256;
/// Columns per thread at most (`PER_THREAD` in the source): rows up to 2048 wide.
const PER_THREAD: i64 = 8;
/// Blocks of the backward per multiprocessor, each summing the parameters' gradients over a
/// share of the rows: a few waves of them (more blocks, more sums to add; fewer, an idle GPU).
const BLOCKS_PER_PROCESSOR: i64 = 8;

unsafe extern "C" {
    /// `cpp/cuda_kernels.cpp`; each returns null, or the error's message (`malloc`ed).
    fn lookahead_nvrtc_compile(
        nvrtc: *const c_char,
        source: *const c_char,
        major: i32,
        minor: i32,
        image: *mut *mut c_char,
        size: *mut usize,
    ) -> *mut c_char;
    fn lookahead_cuda_device(
        ordinal: i32,
        major: *mut i32,
        minor: *mut i32,
        processors: *mut i32,
    ) -> *mut c_char;
    fn lookahead_cuda_load(
        ordinal: i32,
        image: *const c_char,
        names: *const *const c_char,
        count: i32,
        functions: *mut *mut c_void,
    ) -> *mut c_char;
    fn lookahead_cuda_launch(
        ordinal: i32,
        function: *mut c_void,
        grid: u32,
        threads: u32,
        args: *mut *mut c_void,
    ) -> *mut c_char;
}

/// The AdaptiveLayer's kernels, loaded on one CUDA device (or run on the host, in the tests).
#[derive(Debug)]
pub(super) struct AdaptiveKernels {
    on: Target,
    /// The device's multiprocessors.
    processors: i64,
}

#[derive(Debug)]
enum Target {
    /// `[forward, backward]` on CUDA device `ordinal`.
    Device { ordinal: i32, kernels: [Kernel; 2] },
    /// `cpp/cuda_emulation.cpp`, on tensors in the host's memory.
    #[cfg(test)]
    Host,
}

const FORWARD: usize = 0;
const BACKWARD: usize = 1;

/// A kernel loaded in the device's primary context, which lives as long as the process.
#[derive(Debug, Clone, Copy)]
struct Kernel(*mut c_void);

// SAFETY: a CUfunction is a handle the driver lets any thread launch.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

/// The kernels for the AdaptiveLayer of `x` (with `c`, the weight and the bias): where all four
/// are f32 on one CUDA device and rows are at most 2048 wide, and the kernels load there.
pub(super) fn adaptive_kernels(tensors: [&tch::Tensor; 4]) -> Option<&'static AdaptiveKernels> {
    let tch::Device::Cuda(ordinal) = tensors[0].device() else {
        return None;
    };
    let width = *tensors[0].size().last()?;
    let fits = tensors
        .iter()
        .all(|t| t.kind() == tch::Kind::Float && t.device() == tensors[0].device());
    (fits && width <= PER_THREAD * i64::from(THREADS))
        .then(|| loaded(ordinal))
        .flatten()
}

/// The kernels on CUDA device `ordinal`, compiled and loaded on its first use; `None` where
/// that failed (said once per device).
fn loaded(ordinal: usize) -> Option<&'static AdaptiveKernels> {
    type Loaded = Vec<(usize, Option<&'static AdaptiveKernels>)>;
    static LOADED: Mutex<Loaded> = Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&(_, kernels)) = loaded.iter().find(|(o, _)| *o == ordinal) {
        return kernels;
    }
    let kernels = match load(ordinal as i32) {
        Ok(kernels) => Some(&*Box::leak(Box::new(kernels))),
        Err(error) => {
            tracing::warn!(
                "the AdaptiveLayer's CUDA kernels did not load on cuda:{ordinal} ({error}); \
                 it runs as libtorch's operations instead"
            );
            None
        }
    };
    loaded.push((ordinal, kernels));
    kernels
}

fn load(ordinal: i32) -> Result<AdaptiveKernels, String> {
    let (mut major, mut minor, mut processors) = (0, 0, 0);
    // SAFETY: three writable integers.
    libtorch_result(unsafe {
        lookahead_cuda_device(ordinal, &mut major, &mut minor, &mut processors)
    })?;
    let started = std::time::Instant::now();
    let image = compile(None, major, minor)?;
    let names = [
        c"lookahead_adaptive_norm_forward",
        c"lookahead_adaptive_norm_backward",
    ]
    .map(CStr::as_ptr);
    let mut functions = [std::ptr::null_mut(); 2];
    // SAFETY: `image` is a whole cubin; two names and two slots for their functions.
    libtorch_result(unsafe {
        lookahead_cuda_load(
            ordinal,
            image.as_ptr().cast(),
            names.as_ptr(),
            2,
            functions.as_mut_ptr(),
        )
    })?;
    tracing::info!(
        "the AdaptiveLayer's CUDA kernels compiled for sm_{major}{minor} and loaded on \
         cuda:{ordinal} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(AdaptiveKernels {
        on: Target::Device {
            ordinal,
            kernels: functions.map(Kernel),
        },
        processors: i64::from(processors.max(1)),
    })
}

/// The kernels as a cubin for compute capability `major.minor`, compiled by the NVRTC library
/// at `nvrtc` (else PyTorch's own). Needs no GPU.
pub(super) fn compile(nvrtc: Option<&CStr>, major: i32, minor: i32) -> Result<Vec<u8>, String> {
    let source = CString::new(SOURCE).expect("the kernels' source has no NUL");
    let (mut image, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: NUL-terminated strings alive for the call; on success `image` holds `size` bytes
    // from `malloc`, copied and freed here once.
    unsafe {
        libtorch_result(lookahead_nvrtc_compile(
            nvrtc.map_or(std::ptr::null(), CStr::as_ptr),
            source.as_ptr(),
            major,
            minor,
            &mut image,
            &mut size,
        ))?;
        let bytes = std::slice::from_raw_parts(image.cast::<u8>(), size).to_vec();
        libc::free(image.cast());
        Ok(bytes)
    }
}

/// A kernel argument: a device pointer (null for an output not wanted), or a scalar.
enum Arg {
    Pointer(*mut c_void),
    Int(i32),
    Float(f32),
}

impl Arg {
    fn of(t: &tch::Tensor) -> Self {
        Self::Pointer(t.data_ptr())
    }

    fn of_optional(t: Option<&tch::Tensor>) -> Self {
        Self::Pointer(t.map_or(std::ptr::null_mut(), tch::Tensor::data_ptr))
    }

    fn address(&mut self) -> *mut c_void {
        match self {
            Self::Pointer(p) => (p as *mut *mut c_void).cast(),
            Self::Int(i) => (i as *mut i32).cast(),
            Self::Float(f) => (f as *mut f32).cast(),
        }
    }
}

impl AdaptiveKernels {
    /// Runs kernel `which` over `grid` blocks of [`THREADS`].
    fn launch(&self, which: usize, grid: i64, mut args: Vec<Arg>) {
        let grid = u32::try_from(grid).expect("a grid of at most 2³² − 1 blocks");
        let mut addresses: Vec<*mut c_void> = args.iter_mut().map(Arg::address).collect();
        // SAFETY: the arguments match the kernel's parameters in order and type (the source's
        // signatures); the tensors behind the pointers are alive and contiguous f32 where the
        // kernel runs, and on a device the launch is queued on the stream their own operations
        // run on.
        let error = unsafe {
            match &self.on {
                Target::Device { ordinal, kernels } => lookahead_cuda_launch(
                    *ordinal,
                    kernels[which].0,
                    grid,
                    THREADS,
                    addresses.as_mut_ptr(),
                ),
                #[cfg(test)]
                Target::Host => tests::lookahead_emulate_kernel(
                    which as i32,
                    grid,
                    THREADS,
                    addresses.as_mut_ptr(),
                ),
            }
        };
        if let Err(message) = libtorch_result(error) {
            panic!("the AdaptiveLayer's CUDA kernel: {message}");
        }
    }

    /// The output `x̂ · (1 + c·w_s + b_s) + c·w_h + b_h`, and each row's mean and `1 / std`.
    pub(super) fn forward(
        &self,
        x: &tch::Tensor,
        c: &tch::Tensor,
        weight: &tch::Tensor,
        bias: &tch::Tensor,
        eps: f64,
    ) -> [tch::Tensor; 3] {
        let [x, c, w, b] = [x, c, weight, bias].map(tch::Tensor::contiguous);
        let width = *x.size().last().expect("a tensor with dimensions");
        let rows = x.numel() as i64 / width.max(1);
        let options = (tch::Kind::Float, x.device());
        let out = tch::Tensor::empty(x.size(), options);
        let [mean, inv_std] = [(); 2].map(|_| tch::Tensor::empty([rows], options));
        if rows > 0 {
            let args = vec![
                Arg::of(&x),
                Arg::of(&c),
                Arg::of(&w),
                Arg::of(&b),
                Arg::of(&out),
                Arg::of(&mean),
                Arg::of(&inv_std),
                Arg::Int(width as i32),
                Arg::Float(eps as f32),
            ];
            self.launch(FORWARD, rows, args);
        }
        [out, mean, inv_std]
    }

    /// The gradients of x, c, the weight and the bias (those `needed`) from the output's,
    /// x and each row's mean and `1 / std`. The parameters' are each block's sums added up in
    /// order, so they do not depend on how the GPU scheduled the blocks.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        grad: &tch::Tensor,
        x: &tch::Tensor,
        mean: &tch::Tensor,
        inv_std: &tch::Tensor,
        c: &tch::Tensor,
        weight: &tch::Tensor,
        bias: &tch::Tensor,
        needed: [bool; 4],
    ) -> [Option<tch::Tensor>; 4] {
        let [need_x, need_c, need_w, need_b] = needed;
        let [grad, x, c, w, b] = [grad, x, c, weight, bias].map(tch::Tensor::contiguous);
        let width = *x.size().last().expect("a tensor with dimensions");
        let rows = mean.numel() as i64;
        let options = (tch::Kind::Float, x.device());
        let dx = need_x.then(|| tch::Tensor::empty(x.size(), options));
        let dc = need_c.then(|| tch::Tensor::empty(c.size(), options));
        let grid = rows.min(BLOCKS_PER_PROCESSOR * self.processors).max(1);
        let partials = tch::Tensor::zeros([grid, 4, width], options);
        if rows > 0 {
            let args = vec![
                Arg::of(&grad),
                Arg::of(&x),
                Arg::of(mean),
                Arg::of(inv_std),
                Arg::of(&c),
                Arg::of(&w),
                Arg::of(&b),
                Arg::of_optional(dx.as_ref()),
                Arg::of_optional(dc.as_ref()),
                Arg::of(&partials),
                Arg::Int(rows as i32),
                Arg::Int(width as i32),
            ];
            self.launch(BACKWARD, grid, args);
        }
        // [dw_s | dw_h | db_s | db_h]; each gradient a tensor of its own.
        let sums = partials.sum_dim_intlist([0i64].as_slice(), false, tch::Kind::Float);
        let part = |first: i64| sums.narrow(0, first, 2).reshape([2 * width]).copy();
        [
            dx,
            dc,
            need_w.then(|| part(0).reshape(w.size())),
            need_b.then(|| part(2)),
        ]
    }
}

/// The kernels as the tests run them: on the host, at the launch geometry of a GPU with one
/// multiprocessor (the backward's blocks then each sum more than one row).
#[cfg(test)]
pub(super) fn on_the_host() -> &'static AdaptiveKernels {
    static HOST: AdaptiveKernels = AdaptiveKernels {
        on: Target::Host,
        processors: 1,
    };
    &HOST
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        /// `cpp/cuda_emulation.cpp`: kernel `which` run on the host.
        pub(super) fn lookahead_emulate_kernel(
            which: i32,
            grid: u32,
            threads: u32,
            args: *mut *mut c_void,
        ) -> *mut c_char;
    }

    /// The AdaptiveLayer in libtorch's operations, its gradients by libtorch's autograd: the
    /// output, each row's mean and `1 / std`, and the gradients of x, c, the weight and the
    /// bias for the output's gradient `grad`.
    fn reference(inputs: [&tch::Tensor; 4], grad: &tch::Tensor, eps: f64) -> [tch::Tensor; 7] {
        let [x, c, w, b] = inputs.map(|t| t.detach().set_requires_grad(true));
        let width = *x.size().last().unwrap();
        let mean = x.mean_dim([-1i64].as_slice(), true, tch::Kind::Float);
        let variance = (&x - &mean)
            .square()
            .mean_dim([-1i64].as_slice(), true, tch::Kind::Float);
        let inv_std = (variance + eps).rsqrt();
        let xhat = (&x - &mean) * &inv_std;
        let half = |t: &tch::Tensor, i: i64| t.narrow(-1, i * width, width);
        let scale = &c * half(&w, 0).squeeze_dim(0) + half(&b, 0);
        let shift = &c * half(&w, 1).squeeze_dim(0) + half(&b, 1);
        let out = &xhat * (scale + 1.0) + shift;
        (&out * grad).sum(tch::Kind::Float).backward();
        let rows = mean.numel() as i64;
        [
            out.detach(),
            mean.detach().reshape([rows]),
            inv_std.detach().reshape([rows]),
            x.grad(),
            c.grad(),
            w.grad(),
            b.grad(),
        ]
    }

    /// `a` within `2e-5 · (1 + max |b|)` of `b`, which is not trivially small.
    fn assert_close(name: &str, a: &tch::Tensor, b: &tch::Tensor) {
        assert_eq!(a.size(), b.size(), "{name}: shapes");
        let largest = b.abs().max().double_value(&[]);
        assert!(largest > 0.1, "{name}: a trivial reference ({largest})");
        let difference = (a - b).abs().max().double_value(&[]);
        assert!(
            difference <= 2e-5 * (1.0 + largest),
            "{name}: off by {difference} (largest {largest})"
        );
    }

    /// The kernels' text, run on the host with the GPU's block size and the Rust that launches
    /// it, against libtorch's operations and autograd: the output, the rows' statistics and all
    /// four gradients; at widths below one column per thread, between, and at the most a block
    /// takes (2048), with more rows than the backward has blocks.
    #[test]
    fn the_adaptive_layer_kernels_equal_libtorchs_operations_and_autograd() {
        let kernels = on_the_host();
        let options = (tch::Kind::Float, tch::Device::Cpu);
        tch::manual_seed(5);
        for (batch, seq, width) in [(2, 5, 40), (3, 3, 600), (1, 2, 2048)] {
            let x = tch::Tensor::randn([batch, seq, width], options) * 2.0 + 0.5;
            let c = tch::Tensor::rand([batch, seq, 1], options) * 3.0;
            let w = tch::Tensor::randn([1, 2 * width], options);
            let b = tch::Tensor::randn([2 * width], options) * 0.1;
            let grad = tch::Tensor::randn([batch, seq, width], options);
            let expected = reference([&x, &c, &w, &b], &grad, 1e-5);
            let [out, mean, inv_std] = kernels.forward(&x, &c, &w, &b, 1e-5);
            let gradients = kernels.backward(&grad, &x, &mean, &inv_std, &c, &w, &b, [true; 4]);
            let computed = [out, mean.shallow_clone(), inv_std.shallow_clone()]
                .into_iter()
                .chain(gradients.map(Option::unwrap));
            let names = ["output", "mean", "1 / std", "x", "c", "weight", "bias"];
            for ((name, a), b) in names.iter().zip(computed).zip(&expected) {
                assert_close(&format!("{name} at width {width}"), &a, b);
            }
            // Only what is asked for: no x's or bias's gradient, the others unchanged.
            let some = kernels.backward(
                &grad,
                &x,
                &mean,
                &inv_std,
                &c,
                &w,
                &b,
                [false, true, true, false],
            );
            assert!(some[0].is_none() && some[3].is_none());
            assert_close("c, alone", some[1].as_ref().unwrap(), &expected[4]);
            assert_close("weight, alone", some[2].as_ref().unwrap(), &expected[5]);
        }
    }

    /// The kernels' text compiles with the NVRTC of PyPI's PyTorch (which the tch set-up's venv
    /// holds; without one, as with a libtorch of the user's own, there is nothing to compile
    /// with) into cubins for the A100 (8.0) and the H100 and H200 (9.0): the run-time
    /// compilation a GPU does on first use, without a GPU.
    #[test]
    fn the_kernels_compile_with_pytorchs_nvrtc() {
        let Some(venv) = std::env::var_os("VIRTUAL_ENV") else {
            eprintln!("no VIRTUAL_ENV (PyPI's PyTorch): no NVRTC to compile the kernels with");
            return;
        };
        let nvrtc = nvrtc_in(std::path::Path::new(&venv)).unwrap_or_else(|| {
            panic!(
                "no libnvrtc.so.* in {}'s site-packages/nvidia (PyPI's PyTorch brings it)",
                venv.to_string_lossy()
            )
        });
        let path = CString::new(nvrtc.to_string_lossy().as_bytes()).unwrap();
        for (major, minor) in [(8, 0), (9, 0)] {
            let cubin = compile(Some(&path), major, minor)
                .unwrap_or_else(|e| panic!("sm_{major}{minor}: {e}"));
            assert!(
                cubin.starts_with(b"\x7fELF") && cubin.len() > 1000,
                "sm_{major}{minor}: not a cubin ({} bytes)",
                cubin.len()
            );
        }
    }

    /// NVRTC's library in a venv: `lib/python*/site-packages/nvidia/*/lib/libnvrtc.so.N`.
    fn nvrtc_in(venv: &std::path::Path) -> Option<std::path::PathBuf> {
        let entries = |dir: &std::path::Path| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
        };
        entries(&venv.join("lib"))
            .map(|python| python.join("site-packages/nvidia"))
            .flat_map(|nvidia| entries(&nvidia).collect::<Vec<_>>())
            .flat_map(|package| entries(&package.join("lib")).collect::<Vec<_>>())
            .find(|library| {
                library
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so."))
            })
    }
}
