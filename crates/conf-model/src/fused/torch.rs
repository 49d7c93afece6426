//! Operations on libtorch (the tch backends) that Burn's autodiff records as chains of
//! element-wise operations, each a libtorch call and a graph node, as one operation each:
//! - the attention through PyTorch's own scaled-dot-product attention, forward and backward
//!   (its flash kernels, or the memory-efficient one on CUDA), in f32 or bf16; Burn's path
//!   records the decomposed softmax over `[B, H, S, K]` scores, in the tensors' precision, and
//!   on the CPU libtorch's vectorised exponential takes its slow path on every masked (−∞)
//!   score;
//! - LayerNorm (and the normalisation without gain and bias) through libtorch's fused
//!   `native_layer_norm`; its backward on the CPU one pass over the rows (flex's row kernel),
//!   on the GPU libtorch's own `native_layer_norm_backward`;
//! - the Linear on rows as one `addmm` (f32), the bias in the product's epilogue, or in bf16
//!   the product of bf16 operands with the f32 bias added as it converts back (or one bf16
//!   `addmm` for a consumer that takes bf16), with its own backward; Burn makes the product,
//!   then a pass over the output for the bias;
//! - the AdaptiveLayer, forward and backward: on the CPU one pass over the rows each (flex's
//!   row kernels on libtorch's memory); on CUDA one kernel each way of our own (`cuda_kernels`,
//!   compiled at run time); elsewhere that normalisation, its `Linear(1 → 2d)` modulation as one
//!   `addcmul` per half and the modulation as one more, where Burn records a product, a bias,
//!   two slices and three element-wise operations (and their backward zero-fills and copies the
//!   slices);
//! - the pass-2 attention (no gradient) of dense (causal) and seed as one attention over the
//!   cached keys that returns the rows' log-sum-exp (the CPU's flash kernel, CUDA's
//!   memory-efficient one), with the own key merged in by it.
//!
//! Besides: AdamW's update in place on every libtorch device as PyTorch's fused kernel, the
//! gradient clipping's scaling as one multi-tensor product (both in `cpp/libtorch_ops.cpp`,
//! which the build script compiles, as tch wraps neither), and the switch that turns
//! libtorch's oneDNN off.

// burn-tch is deprecated upstream; this module exists for the tch backends while Burn has them.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::{LibTorchDevice, TchTensor};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    Autodiff, Backend, BackendTensor, Dispatch, DispatchAutodiffContext, DispatchDevice,
    DispatchTensor, DispatchTensorKind, LibTorch, backend_extension,
};
use burn::prelude::*;
use burn::tensor::DType;
use std::ffi::{c_char, c_void};

use super::cuda_kernels;

/// Turns libtorch's oneDNN (MKLDNN) paths off for the whole process, as PyTorch's
/// `torch.backends.mkldnn.enabled = False` does; returns whether they are off now. f32 training
/// runs none of them, but while they are on, every matrix product libtorch hands to its BLAS
/// (the many small ones inside its CPU attention kernel too) first asks whether oneDNN should
/// take it in bf16, and on processors with AVX-512 BF16 that asks the precision settings through
/// string-keyed maps: a fifth of the attention's time at `[16, 4, 64, 16]` with 1 thread.
/// tch has no setter, so this calls libtorch's C++ one; off Linux x86-64 it does nothing.
pub fn disable_onednn() -> bool {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        use std::ffi::c_void;
        // `at::globalContext()`, `at::Context::setUserEnabledMkldnn(bool)` and
        // `at::Context::userEnabledMkldnn() const`, as the Itanium C++ ABI names them.
        unsafe extern "C" {
            #[link_name = "_ZN2at13globalContextEv"]
            fn global_context() -> *mut c_void;
            #[link_name = "_ZN2at7Context20setUserEnabledMkldnnEb"]
            fn set_user_enabled_mkldnn(context: *mut c_void, enabled: bool);
            #[link_name = "_ZNK2at7Context17userEnabledMkldnnEv"]
            fn user_enabled_mkldnn(context: *const c_void) -> bool;
        }
        // SAFETY: the global context lives as long as the process; the setter and getter read
        // and write one flag of it.
        unsafe {
            let context = global_context();
            set_user_enabled_mkldnn(context, false);
            !user_enabled_mkldnn(context)
        }
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    false
}

/// Whether the tensors of an attention (`[B, H, S|K, dh]`) take PyTorch's attention: on
/// libtorch, all f32 or all bf16.
pub fn attention_takes(tensors: &[&Tensor<4>]) -> bool {
    let dtype = tensors[0].dtype();
    matches!(dtype, DType::F32 | DType::BF16)
        && tensors
            .iter()
            .all(|t| on_libtorch_device(*t) && t.dtype() == dtype)
}

pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        causal,
    ))
}

/// Whether `x` is an f32 tensor on libtorch (any device).
pub fn on_libtorch<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && on_libtorch_device(x)
}

/// Whether `x` is on libtorch (any device, any type).
pub fn on_libtorch_device<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(
        x.device().without_autodiff().as_dispatch(),
        DispatchDevice::LibTorch(_)
    )
}

/// `normalise(x) · gamma + beta` over the last dimension (biased variance); without gain or
/// bias, 1 and 0.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Option<Tensor<1>>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Tensor<D> {
    let (width, device) = (x.dims()[D - 1], x.device());
    let gamma = gamma.unwrap_or_else(|| Tensor::ones([width], &device));
    let beta = beta.unwrap_or_else(|| Tensor::zeros([width], &device));
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// `x · weight + bias` on rows (`fused::linear`); with `bf16` the product's operands in bf16,
/// and with `out_bf16` its output too.
pub fn linear(
    x: Tensor<2>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    bf16: bool,
    out_bf16: bool,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        bf16,
        out_bf16,
    ))
}

/// The AdaptiveLayer `normalise(x) · (1 + scale) + shift`, `[scale | shift] = c·W + b`
/// (`fused::adaptive_norm`).
pub fn adaptive_norm(
    x: Tensor<3>,
    c: Tensor<3>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    eps: f64,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_adaptive_norm(
        x.into_dispatch(),
        c.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        eps,
    ))
}

/// The attention of the passes that extend cached keys (`fused::prefix_and_self_attention`):
/// query i over the cached keys (`0..=i` with `causal`, all without) and its own key.
pub fn prefix_and_self_attention(
    q: Tensor<4>,
    own_key: Tensor<4>,
    own_value: Tensor<4>,
    past_key: Tensor<4>,
    past_value: Tensor<4>,
    causal: bool,
) -> Tensor<4> {
    Tensor::from_dispatch(
        <Dispatch as TorchNoGradOps>::torch_prefix_and_self_attention(
            q.into_dispatch(),
            own_key.into_dispatch(),
            own_value.into_dispatch(),
            past_key.into_dispatch(),
            past_value.into_dispatch(),
            causal,
        ),
    )
}

/// Each row's cross-entropy (`fused::token_cross_entropy`): one log-softmax and a gather
/// forward; the backward `g · (softmax − onehot)` from the logits and each row's log-sum-exp.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// Loss, largest probability, correctness and entropy per row (`fused::token_stats`), from one
/// log-softmax.
pub fn token_statistics(logits: Tensor<3>, targets: Tensor<2, Int>) -> [Tensor<2>; 4] {
    let (loss, max_prob, correct, entropy) = <Dispatch as TorchNoGradOps>::torch_token_statistics(
        logits.into_dispatch(),
        targets.into_dispatch(),
    );
    [loss, max_prob, correct, entropy].map(Tensor::from_dispatch)
}

/// One draw per row at its uniform (`fused::sample_tokens`).
pub fn sample_tokens(logits: Tensor<3>, uniforms: Tensor<2>) -> Tensor<2, Int> {
    Tensor::from_dispatch(<Dispatch as TorchNoGradOps>::torch_sample_tokens(
        logits.into_dispatch(),
        uniforms.into_dispatch(),
    ))
}

/// AdamW's update of one parameter (`fused::adamw`) in PyTorch's fused kernel, in place on
/// the parameter and moments where Burn holds no other reference to them: the new parameter
/// and moments.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    s: super::AdamWScalars,
) -> [Tensor<D>; 3] {
    let (param, moment_1, moment_2) = <Dispatch as TorchNoGradOps>::torch_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        s,
    );
    [param, moment_1, moment_2].map(Tensor::from_dispatch)
}

/// [`super::scale_all`] on libtorch: one multi-tensor kernel (`torch._foreach_mul_`), in place
/// where nothing else reads a tensor's storage (else on a copy).
pub fn scale_all(tensors: Vec<Tensor<1>>, factor: Tensor<1>) -> Vec<Tensor<1>> {
    let mut handles: Vec<tch::Tensor> = tensors
        .into_iter()
        .map(|t| owned(libtorch_tensor(t)))
        .collect();
    let factor = libtorch_tensor(factor).tensor;
    let mut pointers: Vec<*mut c_void> =
        handles.iter_mut().map(|t| t.as_mut_ptr().cast()).collect();
    // SAFETY: every pointer is a tch tensor's `torch::Tensor*`, alive for the call; the scaled
    // ones are owned here.
    let error = unsafe {
        lookahead_foreach_mul_(
            pointers.as_mut_ptr(),
            pointers.len(),
            factor.as_ptr().cast(),
        )
    };
    check(error, "multi-tensor product");
    handles
        .into_iter()
        .map(|t| {
            Tensor::from_dispatch(DispatchTensor {
                kind: DispatchTensorKind::LibTorch(BackendTensor::Float(TchTensor::new(t))),
                autodiff: DispatchAutodiffContext::Disabled,
            })
        })
        .collect()
}

/// The libtorch tensor of an f32 tensor on libtorch without autodiff.
fn libtorch_tensor(x: Tensor<1>) -> TchTensor {
    match x.into_dispatch().kind {
        DispatchTensorKind::LibTorch(BackendTensor::Float(t)) => t,
        _ => panic!("expected a float tensor on libtorch without autodiff"),
    }
}

#[backend_extension(LibTorch)]
pub trait TorchNoGradOps: Backend {
    fn torch_prefix_and_self_attention(
        q: FloatTensor<Self>,
        own_key: FloatTensor<Self>,
        own_value: FloatTensor<Self>,
        past_key: FloatTensor<Self>,
        past_value: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;

    #[allow(clippy::type_complexity)]
    fn torch_token_statistics(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    fn torch_sample_tokens(
        logits: FloatTensor<Self>,
        uniforms: FloatTensor<Self>,
    ) -> IntTensor<Self>;

    #[allow(clippy::type_complexity)]
    fn torch_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: super::AdamWScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl TorchNoGradOps for LibTorch {
    /// One attention over the cached keys (query i sees `0..=i` when causal) that also
    /// returns each row's log-sum-exp, then the own key merged in by it: with `s` its score
    /// and `lse` the cached keys', the output moves toward the own value by `σ(s − lse)`, its
    /// share of the softmax. Causal, one call that skips the hidden blocks, where one over
    /// `[past, own]` keys under a mask computed every score (−32% at `[16, 4, 64, 16]` on the
    /// CPU, 1 thread) and copied the keys and values into one tensor each; not causal, no such
    /// copy. Where libtorch returns no log-sum-exp (devices other than the CPU and CUDA), that
    /// one call over `[past, own]`.
    fn torch_prefix_and_self_attention(
        q: TchTensor,
        own_key: TchTensor,
        own_value: TchTensor,
        past_key: TchTensor,
        past_value: TchTensor,
        causal: bool,
    ) -> TchTensor {
        let [q, own_key, own_value, past_key, past_value] =
            [&q, &own_key, &own_value, &past_key, &past_value].map(|t| &t.tensor);
        let mask = Mask::new(q, past_key, causal);
        let Some((mut output, past_log_sum_exp)) =
            attention_with_log_sum_exp(q, past_key, past_value, &mask)
        else {
            return TchTensor::new(attention_over_past_and_own(
                [q, own_key, own_value, past_key, past_value],
                causal,
            ));
        };
        let head_dim = *q.size().last().expect("a tensor with dimensions");
        // The own key's share in f32, as the kernels keep the softmax's statistics.
        let mut own_share = tch::Tensor::linalg_vecdot(q, own_key, -1).to_kind(tch::Kind::Float);
        let _ = own_share
            .g_mul_scalar_(1.0 / (head_dim as f64).sqrt())
            .g_sub_(&past_log_sum_exp)
            .sigmoid_();
        let _ = output.lerp_tensor_(own_value, &own_share.unsqueeze(-1).to_kind(q.kind()));
        TchTensor::new(output)
    }

    fn torch_token_statistics(
        logits: TchTensor,
        targets: TchTensor,
    ) -> (TchTensor, TchTensor, TchTensor, TchTensor) {
        let last = [-1i64];
        let log_probs = logits.tensor.log_softmax(-1, tch::Kind::Float);
        let index = target_index(&targets.tensor);
        let loss = -log_probs.gather(-1, &index, false).squeeze_dim(-1);
        let (max_log_prob, argmax) = log_probs.max_dim(-1, false);
        let correct = argmax
            .eq_tensor(&targets.tensor.to_kind(argmax.kind()))
            .to_kind(tch::Kind::Float);
        // −Σ p · ln p, the product written over p.
        let mut probs = log_probs.exp();
        let entropy = -probs
            .g_mul_(&log_probs)
            .sum_dim_intlist(&last[..], false, None);
        (
            TchTensor::new(loss),
            TchTensor::new(max_log_prob.exp()),
            TchTensor::new(correct),
            TchTensor::new(entropy),
        )
    }

    fn torch_sample_tokens(logits: TchTensor, uniforms: TchTensor) -> TchTensor {
        let vocab = *logits
            .tensor
            .size()
            .last()
            .expect("a tensor with dimensions");
        let mut cdf = logits.tensor.softmax(-1, tch::Kind::Float);
        let _ = cdf.cumsum_(-1, None);
        // The count of `cdf < u` by binary search in each row (side "left"), rather than a
        // comparison and a sum over all of it. Contiguous values: libtorch would copy them
        // anyway, with a warning on stderr (seed samples from a column of the uniforms).
        let draws = uniforms
            .tensor
            .contiguous()
            .unsqueeze(-1)
            .searchsorted(&cdf, false, false, "left", None::<tch::Tensor>)
            .squeeze_dim(-1)
            .clamp_max(vocab - 1);
        TchTensor::new(draws)
    }

    /// `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`, `p ← keep · p − lr · (m / c₁) /
    /// (√(v / c₂) + ε)`, all in one kernel: PyTorch's fused AdamW (`torch._fused_adamw_`).
    fn torch_adamw(
        param: TchTensor,
        grad: TchTensor,
        moment_1: TchTensor,
        moment_2: TchTensor,
        s: super::AdamWScalars,
    ) -> (TchTensor, TchTensor, TchTensor) {
        let (mut p, mut m, mut v) = (owned(param), owned(moment_1), owned(moment_2));
        // PyTorch's kernel takes the decay as a rate and the step for the corrections.
        let learning_rate = f64::from(s.learning_rate);
        let weight_decay = if learning_rate == 0.0 {
            0.0
        } else {
            (1.0 - f64::from(s.keep)) / learning_rate
        };
        // SAFETY: the four pointers are tch tensors' `torch::Tensor*`, alive for the call; the
        // three updated ones are owned here (nothing else reads their storage).
        let error = unsafe {
            lookahead_fused_adamw(
                p.as_mut_ptr().cast(),
                grad.tensor.as_ptr().cast(),
                m.as_mut_ptr().cast(),
                v.as_mut_ptr().cast(),
                learning_rate,
                f64::from(s.beta_1),
                f64::from(s.beta_2),
                weight_decay,
                f64::from(s.epsilon),
                f64::from(s.step),
            )
        };
        check(error, "fused AdamW");
        (TchTensor::new(p), TchTensor::new(m), TchTensor::new(v))
    }
}

unsafe extern "C" {
    /// `cpp/libtorch_ops.cpp`: returns null, or libtorch's error message (`malloc`ed).
    fn lookahead_fused_adamw(
        param: *mut c_void,
        grad: *const c_void,
        moment_1: *mut c_void,
        moment_2: *mut c_void,
        learning_rate: f64,
        beta_1: f64,
        beta_2: f64,
        weight_decay: f64,
        epsilon: f64,
        step: f64,
    ) -> *mut c_char;

    /// `cpp/libtorch_ops.cpp`: returns null, or libtorch's error message (`malloc`ed).
    fn lookahead_foreach_mul_(
        tensors: *mut *mut c_void,
        count: usize,
        factor: *const c_void,
    ) -> *mut c_char;

    /// `cpp/libtorch_ops.cpp`: returns null, or libtorch's error message (`malloc`ed).
    fn lookahead_layer_norm_backward(
        grad: *const c_void,
        input: *const c_void,
        mean: *const c_void,
        rstd: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        need: *const bool,
        out: *mut *mut c_void,
    ) -> *mut c_char;

    /// `cpp/libtorch_ops.cpp`: returns null, or libtorch's error message (`malloc`ed).
    fn lookahead_profiler_start(cuda: bool) -> *mut c_char;

    /// `cpp/libtorch_ops.cpp`: returns null, or libtorch's error message (`malloc`ed).
    fn lookahead_profiler_stop(path: *const c_char) -> *mut c_char;
}

/// Starts libtorch's profiler (Kineto) on this thread; with `cuda`, also the GPU's kernels.
pub fn start_profiler(cuda: bool) -> Result<(), String> {
    // SAFETY: no arguments to keep alive; the result is checked.
    libtorch_result(unsafe { lookahead_profiler_start(cuda) })
}

/// Stops libtorch's profiler; writes what it recorded to `trace` as a Chrome trace, if given.
pub fn stop_profiler(trace: Option<&std::ffi::CStr>) -> Result<(), String> {
    let path = trace.map_or(std::ptr::null(), |p| p.as_ptr());
    // SAFETY: `path` is null or a NUL-terminated string that outlives the call.
    libtorch_result(unsafe { lookahead_profiler_stop(path) })
}

/// Whether `device` (with or without autodiff) is libtorch's, and then whether a CUDA one.
pub fn libtorch_on_cuda(device: &Device) -> Option<bool> {
    match device.clone().without_autodiff().as_dispatch() {
        DispatchDevice::LibTorch(LibTorchDevice::Cpu) => Some(false),
        DispatchDevice::LibTorch(_) => Some(true),
        _ => None,
    }
}

/// Panics with libtorch's message if a call of `cpp/libtorch_ops.cpp` returned one.
fn check(error: *mut c_char, operation: &str) {
    if let Err(message) = libtorch_result(error) {
        panic!("libtorch's {operation}: {message}");
    }
}

/// The result of a call of `cpp/libtorch_ops.cpp`: libtorch's message if it returned one.
pub(super) fn libtorch_result(error: *mut c_char) -> Result<(), String> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string from `strdup`, freed here once.
    Err(unsafe {
        let message = std::ffi::CStr::from_ptr(error)
            .to_string_lossy()
            .into_owned();
        libc::free(error.cast());
        message
    })
}

/// A tensor to update in place: its own storage where nothing else reads it (as Burn's own
/// operations decide), else a copy.
fn owned(t: TchTensor) -> tch::Tensor {
    if t.can_mut() {
        t.tensor
    } else {
        t.tensor.copy()
    }
}

/// Targets `[B, T]` as the `[B, T, 1]` int64 index `gather` and `scatter_add` take.
fn target_index(targets: &tch::Tensor) -> tch::Tensor {
    targets.to_kind(tch::Kind::Int64).unsqueeze(-1)
}

/// Each row's cross-entropy, and its log-sum-exp and target index (for the backward).
fn cross_entropy_forward(
    logits: &tch::Tensor,
    targets: &tch::Tensor,
) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
    let index = target_index(targets);
    // One log_softmax kernel, where logsumexp is four operations with a logits-sized
    // temporary; the log-sum-exp is then the target's logit plus its loss.
    let loss = -logits
        .log_softmax(-1, tch::Kind::Float)
        .gather(-1, &index, false)
        .squeeze_dim(-1);
    let log_sum_exp = logits.gather(-1, &index, false).squeeze_dim(-1) + &loss;
    (loss, log_sum_exp, index)
}

#[backend_extension(LibTorch, Autodiff)]
pub trait TorchOps: Backend {
    fn torch_adaptive_norm(
        x: FloatTensor<Self>,
        c: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;
    fn torch_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn torch_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        bf16: bool,
        out_bf16: bool,
    ) -> FloatTensor<Self>;
}

/// The output of `x · weight + bias` (`[N, d_in] · [d_in, d_out]`, x f32 or bf16, the
/// parameters f32) and what its backward reads. In f32 one `addmm`, the bias in the product's
/// epilogue, where Burn's Linear makes a product and a pass over the output to add it. With
/// `bf16` the product of bf16 operands: with `out_bf16` one bf16 `addmm`, the bias in its
/// epilogue, for a consumer that takes bf16; else the product's conversion back to f32 and the
/// f32 bias in one pass (`bf16 + f32` is an f32 sum), where Burn makes a conversion and then
/// the bias's pass. The backward keeps the bf16 operands, so the gradients' products run in
/// bf16 as Burn's would.
fn linear_forward(
    x: &TchTensor,
    weight: &TchTensor,
    bias: &TchTensor,
    bf16: bool,
    out_bf16: bool,
) -> (TchTensor, LinearSaved) {
    let x_kind = x.tensor.kind();
    let (output, x, weight) = if bf16 {
        let bf16 = |t: &TchTensor| match t.tensor.kind() {
            // Burn's handle itself where x is bf16 already, so that Burn sees the backward's
            // reference and never updates x in place.
            tch::Kind::BFloat16 => t.clone(),
            _ => TchTensor::new(t.tensor.to_kind(tch::Kind::BFloat16)),
        };
        let (x, weight) = (bf16(x), bf16(weight));
        let output = if out_bf16 {
            bf16(bias).tensor.addmm(&x.tensor, &weight.tensor)
        } else {
            x.tensor.mm(&weight.tensor) + &bias.tensor
        };
        (output, x, weight)
    } else {
        let output = bias.tensor.addmm(&x.tensor, &weight.tensor);
        (output, x.clone(), weight.clone())
    };
    let saved = LinearSaved { x, weight, x_kind };
    (TchTensor::new(output), saved)
}

/// What the Linear's backward reads: its operands, in the product's precision, and the input's
/// own type, that of its gradient.
#[derive(Debug, Clone)]
struct LinearSaved {
    x: TchTensor,
    weight: TchTensor,
    x_kind: tch::Kind,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<LibTorch, 3> for LinearBackward {
    type State = LinearSaved;

    fn backward(self, ops: Ops<LinearSaved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        register_gradients(ops, grads, linear_backward);
    }
}

/// `dx = g · Wᵀ` (in x's type), `dW = xᵀ · g` (f32), their products in the operands'
/// precision, and `db = Σ g` over the rows (summed in f32), those `needed`.
fn linear_backward(
    s: &LinearSaved,
    grad: &tch::Tensor,
    [need_x, need_weight, need_bias]: [bool; 3],
) -> [Option<tch::Tensor>; 3] {
    let g = grad.to_kind(s.x.tensor.kind());
    [
        need_x.then(|| g.mm(&s.weight.tensor.tr()).to_kind(s.x_kind)),
        need_weight.then(|| s.x.tensor.tr().mm(&g).to_kind(tch::Kind::Float)),
        need_bias.then(|| grad.sum_dim_intlist(&[0i64][..], false, tch::Kind::Float)),
    ]
}

/// The output, and what the backward reads: the input and each row's mean and `1 / std`.
fn layer_norm_forward(
    x: &TchTensor,
    gamma: &TchTensor,
    beta: &TchTensor,
    eps: f64,
) -> (TchTensor, NormSaved) {
    let width = *x.tensor.size().last().expect("a tensor with dimensions");
    let (output, mean, rstd) =
        x.tensor
            .native_layer_norm([width], Some(&gamma.tensor), Some(&beta.tensor), eps);
    let saved = NormSaved {
        x: x.clone(),
        mean: TchTensor::new(mean),
        rstd: TchTensor::new(rstd),
        gamma: gamma.clone(),
        beta: beta.clone(),
    };
    (TchTensor::new(output), saved)
}

/// The AdaptiveLayer's output, and what its backward reads. On the CPU one pass over the rows
/// on this thread (`kernels::adaptive_norm_rows`, flex's kernel): normalised and modulated
/// while in cache, where libtorch's operations make four passes and three temporaries. On CUDA
/// our own kernel, one pass (`cuda_kernels`); libtorch's operations where it does not load.
fn adaptive_norm_forward(
    x: &TchTensor,
    c: &TchTensor,
    weight: &TchTensor,
    bias: &TchTensor,
    eps: f64,
) -> (TchTensor, AdaptiveSaved) {
    #[cfg(feature = "flex")]
    if x.tensor.device() == tch::Device::Cpu {
        return rows::adaptive_norm_forward(x, c, weight, bias, eps);
    }
    match cuda_kernels::adaptive_kernels([x, c, weight, bias].map(|t| &t.tensor)) {
        Some(kernels) => adaptive_norm_forward_kernels(kernels, x, c, weight, bias, eps),
        None => adaptive_norm_forward_ops(x, c, weight, bias, eps),
    }
}

/// [`adaptive_norm_forward`] through our CUDA kernels.
fn adaptive_norm_forward_kernels(
    kernels: &'static cuda_kernels::AdaptiveKernels,
    x: &TchTensor,
    c: &TchTensor,
    weight: &TchTensor,
    bias: &TchTensor,
    eps: f64,
) -> (TchTensor, AdaptiveSaved) {
    let [out, mean, rstd] =
        kernels.forward(&x.tensor, &c.tensor, &weight.tensor, &bias.tensor, eps);
    let saved = AdaptiveSaved::Kernels {
        kernels,
        x: x.clone(),
        mean: TchTensor::new(mean),
        rstd: TchTensor::new(rstd),
        c: c.clone(),
        weight: weight.clone(),
        bias: bias.clone(),
    };
    (TchTensor::new(out), saved)
}

/// [`adaptive_norm_forward`] in libtorch operations (the path of devices without a kernel of
/// ours).
fn adaptive_norm_forward_ops(
    x: &TchTensor,
    c: &TchTensor,
    weight: &TchTensor,
    bias: &TchTensor,
    eps: f64,
) -> (TchTensor, AdaptiveSaved) {
    let size = x.tensor.size();
    let width = *size.last().expect("a tensor with dimensions");
    // Unit gain and zero bias given explicitly: libtorch's LayerNorm kernel vectorises its
    // output only when it has both (without them, one value at a time: 1.8× the time).
    let options = (x.tensor.kind(), x.tensor.device());
    let (normalised, mean, rstd) = x.tensor.native_layer_norm(
        [width],
        Some(&tch::Tensor::ones([width], options)),
        Some(&tch::Tensor::zeros([width], options)),
        eps,
    );
    // `1 + c·w_scale + b_scale` and `c·w_shift + b_shift`, each one `addcmul` over c's rows:
    // contiguous, where a K = 1 `addmm` went through MKL's rank-1 update and left the
    // halves strided.
    let c_rows = c.tensor.reshape([-1, 1]);
    let half = |t: &tch::Tensor, i: i64| t.narrow(-1, i * width, width);
    let gain = (half(&bias.tensor, 0) + 1.0).addcmul(&c_rows, &half(&weight.tensor, 0));
    let shift = half(&bias.tensor, 1).addcmul(&c_rows, &half(&weight.tensor, 1));
    let (gain, mut output) = (gain.reshape(&size[..]), shift.reshape(&size[..]));
    let _ = output.addcmul_(&normalised, &gain);
    let saved = AdaptiveSaved::Ops {
        normalised: TchTensor::new(normalised),
        rstd: TchTensor::new(rstd),
        gain: TchTensor::new(gain),
        x: x.clone(),
        mean: TchTensor::new(mean),
        c: c.clone(),
        weight: weight.clone(),
    };
    (TchTensor::new(output), saved)
}

/// What the AdaptiveLayer's backward reads, by the path its forward took.
#[derive(Debug, Clone)]
enum AdaptiveSaved {
    /// The CPU's row kernels (flex's): `x̂` and each row's `1 / std`.
    #[cfg(feature = "flex")]
    Rows {
        normalised: TchTensor,
        rstd: TchTensor,
        c: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
    },
    /// libtorch's operations: `x̂`, `1 + scale`, and the input and each row's mean and
    /// `1 / std` for libtorch's normalisation backward.
    Ops {
        normalised: TchTensor,
        rstd: TchTensor,
        gain: TchTensor,
        x: TchTensor,
        mean: TchTensor,
        c: TchTensor,
        weight: TchTensor,
    },
    /// Our CUDA kernels: the input and each row's mean and `1 / std` (no `[N, d]` besides x).
    Kernels {
        kernels: &'static cuda_kernels::AdaptiveKernels,
        x: TchTensor,
        mean: TchTensor,
        rstd: TchTensor,
        c: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
    },
}

#[derive(Debug)]
struct AdaptiveNormBackward;

impl Backward<LibTorch, 4> for AdaptiveNormBackward {
    type State = AdaptiveSaved;

    fn backward(self, ops: Ops<AdaptiveSaved, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        register_gradients(ops, grads, adaptive_norm_backward);
    }
}

/// Takes the output's gradient, has `gradients` compute those of the parents that need one
/// (from the saved state, the output's gradient and which parents are tracked), and hands
/// each to its parent node.
fn register_gradients<S, const N: usize>(
    ops: Ops<S, N>,
    grads: &mut Gradients,
    gradients: impl FnOnce(&S, &tch::Tensor, [bool; N]) -> [Option<tch::Tensor>; N],
) {
    let grad = grads.consume::<LibTorch>(&ops.node).tensor;
    let computed = gradients(
        &ops.state,
        &grad,
        ops.parents.each_ref().map(Option::is_some),
    );
    for (parent, g) in ops.parents.into_iter().zip(computed) {
        if let (Some(node), Some(g)) = (parent, g) {
            grads.register::<LibTorch>(node.id, TchTensor::new(g));
        }
    }
}

/// The gradients of x, c, the weight and the bias (those `needed`) from the output's, by the
/// path the forward took.
fn adaptive_norm_backward(
    s: &AdaptiveSaved,
    grad: &tch::Tensor,
    needed: [bool; 4],
) -> [Option<tch::Tensor>; 4] {
    match s {
        #[cfg(feature = "flex")]
        AdaptiveSaved::Rows { .. } => rows::adaptive_norm_backward(s, grad).map(Some),
        AdaptiveSaved::Ops {
            normalised,
            rstd,
            gain,
            x,
            mean,
            c,
            weight,
        } => adaptive_norm_backward_ops(
            grad,
            [normalised, rstd, gain, x, mean, c, weight].map(|t| &t.tensor),
            needed,
        ),
        AdaptiveSaved::Kernels {
            kernels,
            x,
            mean,
            rstd,
            c,
            weight,
            bias,
        } => kernels.backward(
            grad,
            &x.tensor,
            &mean.tensor,
            &rstd.tensor,
            &c.tensor,
            &weight.tensor,
            &bias.tensor,
            needed,
        ),
    }
}

/// [`adaptive_norm_backward`] in libtorch's operations, from `[x̂, 1 / std, 1 + scale, x, mean,
/// c, weight]`. With `m = [scale | shift]` the modulation: `dscale = g · x̂`, `dshift = g`, then
/// `dW = cᵀ · dm`, `db = Σ dm`, `dc = dm · Wᵀ`, and `dx` through the normalisation from
/// `g · (1 + scale)`. Each half of `dm` is read by one product with `[c | 1]` for its parts of
/// `dW` and `db` together, and by one for `dc`: no `[N, 2d]` concatenation of `g · x̂` and `g`,
/// nor a separate sum (24 fewer bytes per element of `[N, d]` read or written than that form).
fn adaptive_norm_backward_ops(
    grad: &tch::Tensor,
    saved: [&tch::Tensor; 7],
    needed: [bool; 4],
) -> [Option<tch::Tensor>; 4] {
    let [normalised, rstd, gain, x, mean, c, weight] = saved;
    let [need_x, need_c, need_w, need_b] = needed;
    let width = *grad.size().last().expect("a tensor with dimensions");
    let rows = |t: &tch::Tensor| t.reshape([-1, width]);
    let d_shift = rows(grad);
    let d_scale = (need_c || need_w || need_b).then(|| &d_shift * rows(normalised));
    let c_size = c.size();
    let c = c.reshape([-1, 1]);
    let weight_half = |i: i64| weight.narrow(-1, i * width, width); // [1, d]
    // `[c | 1]ᵀ · dm_half` for each half: row 0 its part of the weight's gradient, row 1 of
    // the bias's; each gradient is then a tensor of its own (two rows of `2d`).
    let halves = (need_w || need_b).then(|| {
        let c_one = tch::Tensor::cat(&[&c, &c.ones_like()], 1).tr(); // [2, N]
        let d_scale = d_scale.as_ref().expect("computed for the parameters");
        [c_one.mm(d_scale), c_one.mm(&d_shift)] // [2, d] each
    });
    let gradient = |row: i64| {
        let [scale, shift] = halves.as_ref().expect("computed for the parameters");
        tch::Tensor::cat(&[scale.get(row), shift.get(row)], 0) // [2d]
    };
    [
        need_x.then(|| {
            // The normalisation's backward from `ĝ = g · (1 + scale)`.
            let [dx, _, _] = native_layer_norm_backward(
                &(grad * gain),
                x,
                mean,
                rstd,
                None,
                None,
                [true, false, false],
            );
            dx.expect("the input's gradient, asked for")
        }),
        need_c.then(|| {
            let d_scale = d_scale.as_ref().expect("computed for c");
            d_shift
                .mm(&weight_half(1).tr())
                .addmm(d_scale, &weight_half(0).tr())
                .reshape(&c_size[..])
        }),
        need_w.then(|| gradient(0).unsqueeze(0)),
        need_b.then(|| gradient(1)),
    ]
}

/// The AdaptiveLayer and LayerNorm's backward on libtorch's CPU memory through flex's row
/// kernels, run on the calling thread: handing each of them to rayon's pool from outside it
/// costs more than the work at these sizes (a thread wake-up each way).
#[cfg(feature = "flex")]
mod rows {
    use std::mem::MaybeUninit;

    use super::*;
    use crate::fused::kernels;

    /// The values of a contiguous f32 tensor on the CPU.
    fn values(t: &tch::Tensor) -> &[f32] {
        assert!(t.is_contiguous() && t.kind() == tch::Kind::Float);
        // SAFETY: a contiguous f32 CPU tensor holds `numel` floats at `data_ptr`, alive and
        // unaliased by writers while `t` is borrowed.
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) }
    }

    /// A new f32 tensor on the CPU for a kernel to write in full.
    fn empty(size: &[i64]) -> tch::Tensor {
        tch::Tensor::empty(size, (tch::Kind::Float, tch::Device::Cpu))
    }

    /// The memory of a contiguous f32 CPU tensor, for writing.
    fn memory(t: &mut tch::Tensor) -> &mut [MaybeUninit<f32>] {
        assert!(t.is_contiguous() && t.kind() == tch::Kind::Float);
        // SAFETY: as `values`; the exclusive borrow of `t` keeps every other view out.
        unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut MaybeUninit<f32>, t.numel()) }
    }

    pub(super) fn adaptive_norm_forward(
        x: &TchTensor,
        c: &TchTensor,
        weight: &TchTensor,
        bias: &TchTensor,
        eps: f64,
    ) -> (TchTensor, AdaptiveSaved) {
        let [x, c, w, b] = [x, c, weight, bias].map(|t| t.tensor.contiguous());
        let size = x.size();
        let (mut out, mut normalised) = (empty(&size), empty(&size));
        let mut rstd = vec![0.0; c.numel()];
        kernels::adaptive_norm_rows(
            values(&x),
            values(&c),
            values(&w),
            values(&b),
            eps as f32,
            memory(&mut out),
            memory(&mut normalised),
            &mut rstd,
        );
        let rstd = tch::Tensor::from_slice(&rstd).reshape(&c.size()[..]);
        let saved = AdaptiveSaved::Rows {
            normalised: TchTensor::new(normalised),
            rstd: TchTensor::new(rstd),
            c: TchTensor::new(c),
            weight: TchTensor::new(w),
            bias: TchTensor::new(b),
        };
        (TchTensor::new(out), saved)
    }

    pub(super) fn layer_norm_backward(s: &NormSaved, grad: &tch::Tensor) -> [tch::Tensor; 3] {
        let grad = grad.contiguous();
        let [x, mean, rstd, gamma] =
            [&s.x, &s.mean, &s.rstd, &s.gamma].map(|t| t.tensor.contiguous());
        let mut dx = empty(&grad.size());
        let mut sums = vec![0.0; 2 * gamma.numel()];
        kernels::layer_norm_backward_rows(
            values(&x),
            values(&mean),
            values(&rstd),
            values(&gamma),
            values(&grad),
            memory(&mut dx),
            &mut sums,
        );
        let (dgamma, dbeta) = sums.split_at(gamma.numel());
        [
            dx,
            tch::Tensor::from_slice(dgamma),
            tch::Tensor::from_slice(dbeta),
        ]
    }

    pub(super) fn adaptive_norm_backward(
        s: &AdaptiveSaved,
        grad: &tch::Tensor,
    ) -> [tch::Tensor; 4] {
        let AdaptiveSaved::Rows {
            normalised,
            rstd,
            c,
            weight,
            bias,
        } = s
        else {
            unreachable!("the rows' backward reads what the rows' forward saved");
        };
        let grad = grad.contiguous();
        let (c, weight) = (&c.tensor, &weight.tensor);
        let mut dx = empty(&grad.size());
        let mut dc = vec![0.0; c.numel()];
        let mut sums = vec![0.0; 2 * weight.numel()];
        kernels::adaptive_norm_backward_rows(
            values(&normalised.tensor),
            values(&rstd.tensor),
            values(c),
            values(weight),
            values(&bias.tensor),
            values(&grad),
            memory(&mut dx),
            &mut dc,
            &mut sums,
        );
        let (dw, db) = sums.split_at(weight.numel());
        [
            dx,
            tch::Tensor::from_slice(&dc).reshape(&c.size()[..]),
            tch::Tensor::from_slice(dw).reshape(&weight.size()[..]),
            tch::Tensor::from_slice(db),
        ]
    }
}

/// The mask of a causal attention of S queries over K ≥ S keys, the last S of them the
/// queries' own: PyTorch's `is_causal` where K = S; where earlier keys are cached (K > S) its
/// causal mask would start at the first key, so an additive `[S, K]` mask (−∞ on the hidden
/// keys) instead.
#[derive(Debug, Clone)]
struct Mask {
    is_causal: bool,
    bias: Option<TchTensor>,
}

impl Mask {
    fn new(q: &tch::Tensor, k: &tch::Tensor, causal: bool) -> Self {
        let (queries, keys) = (q.size()[2], k.size()[2]);
        if !causal || queries == keys {
            return Self {
                is_causal: causal,
                bias: None,
            };
        }
        let device = q.device();
        let hidden =
            tch::Tensor::ones([queries, keys], (tch::Kind::Bool, device)).triu(1 + keys - queries);
        let bias = tch::Tensor::zeros([queries, keys], (q.kind(), device))
            .masked_fill(&hidden, f64::NEG_INFINITY);
        Self {
            is_causal: false,
            bias: Some(TchTensor::new(bias)),
        }
    }

    fn bias(&self) -> Option<&tch::Tensor> {
        self.bias.as_ref().map(|b| &b.tensor)
    }
}

/// PyTorch's scaled-dot-product attention: its dispatcher picks the kernel for the device and
/// precision (on the CPU its flash kernel; on CUDA flash in bf16, the memory-efficient one in
/// f32 or under a mask), all of which keep the softmax statistics in f32.
/// `mask`: additive, or `true` where attended.
fn scaled_dot_product_attention(
    q: &tch::Tensor,
    k: &tch::Tensor,
    v: &tch::Tensor,
    mask: Option<&tch::Tensor>,
    is_causal: bool,
) -> tch::Tensor {
    tch::Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, None::<f64>, false)
}

/// The prefix-and-self attention as one scaled-dot-product attention over the cached keys
/// followed by the own ones (`[q, own key, own value, cached key, cached value]`), under a
/// mask that shows query i its own key alone among the own ones and, when causal, the cached
/// keys `0..=i` (one per query).
fn attention_over_past_and_own(tensors: [&tch::Tensor; 5], causal: bool) -> tch::Tensor {
    let [q, own_key, own_value, past_key, past_value] = tensors;
    let (queries, cached) = (q.size()[2], past_key.size()[2]);
    let device = q.device();
    let ones = |columns| tch::Tensor::ones([queries, columns], (tch::Kind::Bool, device));
    let past = if causal {
        ones(cached).tril(0)
    } else {
        ones(cached)
    };
    let own = tch::Tensor::eye(queries, (tch::Kind::Bool, device));
    scaled_dot_product_attention(
        q,
        &tch::Tensor::cat(&[past_key, own_key], 2),
        &tch::Tensor::cat(&[past_value, own_value], 2),
        Some(&tch::Tensor::cat(&[past, own], 1)),
        false,
    )
}

/// The attention's output and each query row's log-sum-exp of its scaled scores (f32), from
/// the kernel that returns both: on the CPU its flash kernel (f32, bf16), on CUDA the
/// memory-efficient one (tch does not bind CUDA's flash kernel with its statistics), whose
/// log-sum-exp is padded to a multiple of 32 rows. `None` on other devices, and where CUDA's
/// kernel refuses the inputs (the caller then makes one masked call; said once).
fn attention_with_log_sum_exp(
    q: &tch::Tensor,
    k: &tch::Tensor,
    v: &tch::Tensor,
    mask: &Mask,
) -> Option<(tch::Tensor, tch::Tensor)> {
    match q.device() {
        tch::Device::Cpu => Some(
            tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
                q,
                k,
                v,
                0.0,
                mask.is_causal,
                mask.bias(),
                None::<f64>,
            ),
        ),
        tch::Device::Cuda(_) => {
            let attention = tch::Tensor::f_internal_scaled_dot_product_efficient_attention(
                q,
                k,
                v,
                mask.bias(),
                true,
                0.0,
                mask.is_causal,
                None::<f64>,
            );
            match attention {
                Ok((output, log_sum_exp, _, _)) => {
                    Some((output, log_sum_exp.narrow(-1, 0, q.size()[2])))
                }
                Err(error) => {
                    static REFUSED: std::sync::Once = std::sync::Once::new();
                    REFUSED.call_once(|| {
                        tracing::warn!(
                            "libtorch's memory-efficient attention refused the prefix-and-self \
                             attention ({error}); it runs as one masked attention instead"
                        )
                    });
                    None
                }
            }
        }
        _ => None,
    }
}

impl TorchOps for LibTorch {
    fn torch_adaptive_norm(
        x: TchTensor,
        c: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
        eps: f64,
    ) -> TchTensor {
        adaptive_norm_forward(&x, &c, &weight, &bias, eps).0
    }

    fn torch_attention(q: TchTensor, k: TchTensor, v: TchTensor, causal: bool) -> TchTensor {
        let mask = Mask::new(&q.tensor, &k.tensor, causal);
        TchTensor::new(scaled_dot_product_attention(
            &q.tensor,
            &k.tensor,
            &v.tensor,
            mask.bias(),
            mask.is_causal,
        ))
    }

    fn torch_layer_norm(x: TchTensor, gamma: TchTensor, beta: TchTensor, eps: f64) -> TchTensor {
        let width = *x.tensor.size().last().expect("a tensor with dimensions");
        let output =
            x.tensor
                .layer_norm([width], Some(&gamma.tensor), Some(&beta.tensor), eps, true);
        TchTensor::new(output)
    }
    fn torch_cross_entropy(logits: TchTensor, targets: TchTensor) -> TchTensor {
        TchTensor::new(cross_entropy_forward(&logits.tensor, &targets.tensor).0)
    }

    fn torch_linear(
        x: TchTensor,
        weight: TchTensor,
        bias: TchTensor,
        bf16: bool,
        out_bf16: bool,
    ) -> TchTensor {
        linear_forward(&x, &weight, &bias, bf16, out_bf16).0
    }
}

/// What the cross-entropy's backward reads: the logits (shared), each row's log-sum-exp and
/// the target index.
#[derive(Debug, Clone)]
struct CrossEntropySaved {
    logits: TchTensor,
    log_sum_exp: TchTensor,
    index: TchTensor,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<LibTorch, 1> for CrossEntropyBackward {
    type State = CrossEntropySaved;

    /// `g · (e^(x − lse) − onehot(target))`: one tensor of the logits' size, written in place.
    fn backward(self, ops: Ops<CrossEntropySaved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node).tensor.unsqueeze(-1);
        let s = &ops.state;
        let [logits_node] = ops.parents;
        if let Some(node) = logits_node {
            let mut d = &s.logits.tensor - s.log_sum_exp.tensor.unsqueeze(-1);
            let _ = d.exp_();
            let _ = d.g_mul_(&grad);
            let _ = d.scatter_add_(-1, &s.index.tensor, &(-&grad));
            grads.register::<LibTorch>(node.id, TchTensor::new(d));
        }
    }
}

/// What LayerNorm's backward reads.
#[derive(Debug, Clone)]
struct NormSaved {
    x: TchTensor,
    mean: TchTensor,
    rstd: TchTensor,
    gamma: TchTensor,
    /// Read by libtorch's backward (the GPU's path), which sizes β's gradient by it.
    beta: TchTensor,
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<LibTorch, 3> for LayerNormBackward {
    type State = NormSaved;

    fn backward(self, ops: Ops<NormSaved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        register_gradients(ops, grads, layer_norm_backward);
    }
}

/// The gradients of x, γ and β (those `needed`) from the output's. With `x̂` the normalised
/// input and `ĝ = g · γ`: `dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂))`, `dγ = Σ g · x̂`,
/// `dβ = Σ g` (sums over every row). On the CPU one pass over the rows on this thread (flex's
/// row kernel; the same maths in about ten libtorch operations took 2.5× its time at
/// `[1024, 64]`, and libtorch's own CPU backward made the quick step ~5% slower), elsewhere
/// libtorch's own backward kernels.
fn layer_norm_backward(
    s: &NormSaved,
    grad: &tch::Tensor,
    needed: [bool; 3],
) -> [Option<tch::Tensor>; 3] {
    #[cfg(feature = "flex")]
    if grad.device() == tch::Device::Cpu {
        return rows::layer_norm_backward(s, grad).map(Some);
    }
    layer_norm_backward_ops(s, grad, needed)
}

/// [`layer_norm_backward`] in libtorch's own kernels (its GPU path).
fn layer_norm_backward_ops(
    s: &NormSaved,
    grad: &tch::Tensor,
    needed: [bool; 3],
) -> [Option<tch::Tensor>; 3] {
    native_layer_norm_backward(
        grad,
        &s.x.tensor,
        &s.mean.tensor,
        &s.rstd.tensor,
        Some(&s.gamma.tensor),
        Some(&s.beta.tensor),
        needed,
    )
}

/// LayerNorm's backward over the last dimension as PyTorch's autograd runs it
/// (`native_layer_norm_backward`, `cpp/libtorch_ops.cpp`): one kernel for x's gradient and one
/// for γ's and β's, where the same maths in libtorch operations made about ten passes over
/// `[N, d]`, memory-bound on a GPU. From the output's gradient, the input and each row's mean
/// and `1 / std` as `native_layer_norm` returned them; without `gamma` and `beta`, the
/// normalisation alone.
fn native_layer_norm_backward(
    grad: &tch::Tensor,
    x: &tch::Tensor,
    mean: &tch::Tensor,
    rstd: &tch::Tensor,
    gamma: Option<&tch::Tensor>,
    beta: Option<&tch::Tensor>,
    needed: [bool; 3],
) -> [Option<tch::Tensor>; 3] {
    let pointer = |t: Option<&tch::Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr().cast());
    let mut out = [std::ptr::null_mut::<c_void>(); 3];
    // SAFETY: the tensors are tch's `torch::Tensor*`, alive for the call (gamma and beta may
    // be null); `needed` and `out` hold three entries each.
    let error = unsafe {
        lookahead_layer_norm_backward(
            grad.as_ptr().cast(),
            x.as_ptr().cast(),
            mean.as_ptr().cast(),
            rstd.as_ptr().cast(),
            pointer(gamma),
            pointer(beta),
            needed.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    check(error, "LayerNorm backward");
    // SAFETY: a non-null entry is a `new`ed `torch::Tensor`, owned from here by tch's Tensor,
    // which deletes it.
    out.map(|t| (!t.is_null()).then(|| unsafe { tch::Tensor::from_ptr(t.cast()) }))
}

/// What the attention's backward reads: libtorch's own graph of the forward, from leaves that
/// alias q, k and v to the output, which holds what PyTorch's kernel saved for its backward.
#[derive(Debug, Clone)]
struct AttentionSaved {
    leaves: [TchTensor; 3],
    graph_output: TchTensor,
    /// Burn's handles on the inputs and the output the graph reads, so that Burn never
    /// updates them in place (libtorch would refuse the backward).
    _read: [TchTensor; 4],
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<LibTorch, 3> for AttentionBackward {
    type State = AttentionSaved;

    fn backward(self, ops: Ops<AttentionSaved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        // libtorch's backward of its attention, whichever kernel its dispatcher chose; it
        // starts from a scalar, so from the output weighted by its gradient.
        register_gradients(ops, grads, |s, grad, needed| {
            let leaves: Vec<&tch::Tensor> = (s.leaves.iter().zip(needed))
                .filter_map(|(leaf, needed)| needed.then_some(&leaf.tensor))
                .collect();
            if leaves.is_empty() {
                return [None, None, None];
            }
            let output = &s.graph_output.tensor;
            let weighted = tch::with_grad(|| (output * grad.to_kind(output.kind())).sum(None));
            let mut computed =
                tch::with_grad(|| tch::Tensor::run_backward(&[weighted], &leaves, false, false))
                    .into_iter();
            needed.map(|needed| needed.then(|| computed.next().expect("one per leaf")))
        });
    }
}

impl<C: CheckpointStrategy> TorchOps for Autodiff<LibTorch, C> {
    fn torch_adaptive_norm(
        x: FloatTensor<Self>,
        c: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        match AdaptiveNormBackward
            .prepare::<C>([x.node(), c.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [x, c, weight, bias] = [x, c, weight, bias].map(|t| t.into_primitive());
                let (output, saved) = adaptive_norm_forward(&x, &c, &weight, &bias, eps);
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => {
                let [x, c, weight, bias] = [x, c, weight, bias].map(|t| t.into_primitive());
                prep.finish(LibTorch::torch_adaptive_norm(x, c, weight, bias, eps))
            }
        }
    }

    fn torch_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gamma, beta) = (
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                );
                let (output, saved) = layer_norm_forward(&x, &gamma, &beta, eps);
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(LibTorch::torch_layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }

    fn torch_cross_entropy(logits: FloatTensor<Self>, targets: TchTensor) -> FloatTensor<Self> {
        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.into_primitive();
                let (loss, log_sum_exp, index) =
                    cross_entropy_forward(&logits.tensor, &targets.tensor);
                let saved = CrossEntropySaved {
                    logits,
                    log_sum_exp: TchTensor::new(log_sum_exp),
                    index: TchTensor::new(index),
                };
                prep.finish(saved, TchTensor::new(loss))
            }
            OpsKind::UnTracked(prep) => prep.finish(LibTorch::torch_cross_entropy(
                logits.into_primitive(),
                targets,
            )),
        }
    }

    fn torch_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        bf16: bool,
        out_bf16: bool,
    ) -> FloatTensor<Self> {
        match LinearBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [x, weight, bias] = [x, weight, bias].map(|t| t.into_primitive());
                let (output, saved) = linear_forward(&x, &weight, &bias, bf16, out_bf16);
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => {
                let [x, weight, bias] = [x, weight, bias].map(|t| t.into_primitive());
                prep.finish(LibTorch::torch_linear(x, weight, bias, bf16, out_bf16))
            }
        }
    }

    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let inputs = [q, k, v].map(|t| t.into_primitive());
                let leaves = inputs
                    .each_ref()
                    .map(|t| TchTensor::new(t.tensor.detach().requires_grad_(true)));
                let [q, k, v] = leaves.each_ref().map(|t| &t.tensor);
                let mask = Mask::new(q, k, causal);
                let graph_output = tch::with_grad(|| {
                    scaled_dot_product_attention(q, k, v, mask.bias(), mask.is_causal)
                });
                let output = TchTensor::new(graph_output.detach());
                let [q, k, v] = inputs;
                let saved = AttentionSaved {
                    leaves,
                    graph_output: TchTensor::new(graph_output),
                    _read: [q, k, v, output.clone()],
                };
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                prep.finish(LibTorch::torch_attention(q, k, v, causal))
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    fn max_difference(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        (a - b).abs().max().double_value(&[])
    }

    /// Each of the row kernels' gradients within 1e-4 of the GPU path's (libtorch's), which
    /// are not trivially small.
    fn assert_same_gradients(names: &[&str], rows: &[tch::Tensor], ops: &[Option<tch::Tensor>]) {
        assert_eq!((names.len(), rows.len()), (ops.len(), ops.len()));
        for ((name, a), b) in names.iter().zip(rows).zip(ops) {
            let b = b.as_ref().expect("every gradient asked for");
            let largest = b.abs().max().double_value(&[]);
            assert!(largest > 0.1, "{name}: a trivial gradient ({largest})");
            let difference = max_difference(a, b);
            assert!(
                difference < 1e-4,
                "{name}: the gradients differ by {difference}"
            );
        }
    }

    /// The multi-tensor product equals a product each (three tensors of different lengths, one
    /// of them non-contiguous), and a tensor that shares another's storage keeps its values.
    #[test]
    fn scale_all_equals_a_product_each_and_leaves_a_shared_storage_alone() {
        let device = Device::libtorch();
        let values = |t: &Tensor<1>| t.to_data().to_vec::<f32>().unwrap();
        let a = Tensor::<1>::from_floats([1.0, -2.0, 3.0], &device);
        let b = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], &device)
            .transpose()
            .flatten::<1>(0, 1);
        let c = Tensor::<1>::from_floats([0.5; 70], &device);
        let shared = c.clone();
        let factor = Tensor::<1>::from_floats([0.25], &device);
        let expected: Vec<Vec<f32>> = [&a, &b, &c]
            .iter()
            .map(|t| values(&((*t).clone() * factor.clone())))
            .collect();
        let scaled = scale_all(vec![a, b, c], factor);
        assert_eq!(scaled.iter().map(values).collect::<Vec<_>>(), expected);
        assert_eq!(values(&shared), vec![0.5; 70]);
    }

    /// The CPU's row kernels and the CUDA kernels (run on the host) against the libtorch
    /// operations of other devices, each through the forward and backward the autodiff calls:
    /// output and all four gradients, at a width that is not a multiple of the vector lanes.
    #[test]
    fn the_adaptive_layer_on_the_cpu_and_cuda_equals_its_libtorch_operations() {
        let options = (tch::Kind::Float, tch::Device::Cpu);
        tch::manual_seed(7);
        let [x, c, weight, bias] = [vec![3, 5, 24], vec![3, 5, 1], vec![1, 48], vec![48]]
            .map(|size| TchTensor::new(tch::Tensor::randn(size, options)));
        let grad = tch::Tensor::randn([3, 5, 24], options);
        let (out_ops, saved_ops) = adaptive_norm_forward_ops(&x, &c, &weight, &bias, 1e-5);
        let from_ops = adaptive_norm_backward(&saved_ops, &grad, [true; 4]);
        let (out_rows, saved_rows) = rows::adaptive_norm_forward(&x, &c, &weight, &bias, 1e-5);
        let host = cuda_kernels::on_the_host();
        let (out_kernels, saved_kernels) =
            adaptive_norm_forward_kernels(host, &x, &c, &weight, &bias, 1e-5);
        assert!(matches!(
            (&saved_ops, &saved_rows, &saved_kernels),
            (
                AdaptiveSaved::Ops { .. },
                AdaptiveSaved::Rows { .. },
                AdaptiveSaved::Kernels { .. }
            )
        ));
        for (out, saved) in [(out_rows, saved_rows), (out_kernels, saved_kernels)] {
            assert!(max_difference(&out.tensor, &out_ops.tensor) < 1e-5);
            let gradients = adaptive_norm_backward(&saved, &grad, [true; 4]).map(Option::unwrap);
            assert_same_gradients(&["x", "c", "weight", "bias"], &gradients, &from_ops);
        }
    }

    /// LayerNorm's backward on the CPU's row kernel against libtorch's own backward, which the
    /// GPU runs: the gradients of x, γ and β.
    #[test]
    fn the_layer_norm_backward_on_the_cpu_equals_its_libtorch_operations() {
        let options = (tch::Kind::Float, tch::Device::Cpu);
        tch::manual_seed(11);
        let [x, gamma, beta] = [vec![3, 5, 24], vec![24], vec![24]]
            .map(|size| TchTensor::new(tch::Tensor::randn(size, options)));
        let grad = tch::Tensor::randn([3, 5, 24], options);
        let (_, saved) = layer_norm_forward(&x, &gamma, &beta, 1e-5);
        let from_rows = rows::layer_norm_backward(&saved, &grad);
        let from_ops = layer_norm_backward_ops(&saved, &grad, [true; 3]);
        assert_same_gradients(&["x", "gamma", "beta"], &from_rows, &from_ops);
    }

    /// The prefix-and-self attention as one call over `[past, own]` keys (the path of devices
    /// without a log-sum-exp) against the attention over the cached keys with the own key
    /// merged in: causal (one cached key per query) and not (every cached key). In f32 equal
    /// to rounding; in bf16 about as far from f32's one call on the same inputs as bf16's own
    /// one call is, with the merge's own rounding to bf16 (its share is computed in f32).
    #[test]
    fn the_attention_over_past_and_own_keys_equals_the_merged_flash_attention() {
        tch::manual_seed(3);
        let f32 = |t: &tch::Tensor| t.to_kind(tch::Kind::Float);
        for kind in [tch::Kind::Float, tch::Kind::BFloat16] {
            for (seq, cached, causal) in [(1, 1, true), (6, 6, true), (1, 7, false), (4, 7, false)]
            {
                let heads = |rows| {
                    (tch::Tensor::randn([2, 3, rows, 8], (tch::Kind::Float, tch::Device::Cpu))
                        * 1.5)
                        .to_kind(kind)
                };
                let inputs = [
                    heads(seq),
                    heads(seq),
                    heads(seq),
                    heads(cached),
                    heads(cached),
                ];
                let [q, own_key, own_value, past_key, past_value] =
                    inputs.each_ref().map(|t| TchTensor::new(t.shallow_clone()));
                let merged = LibTorch::torch_prefix_and_self_attention(
                    q, own_key, own_value, past_key, past_value, causal,
                );
                assert_eq!(merged.tensor.kind(), kind);
                let exact =
                    attention_over_past_and_own(inputs.each_ref().map(f32).each_ref(), causal);
                let difference = max_difference(&exact, &f32(&merged.tensor));
                let tolerance = match kind {
                    tch::Kind::Float => 1e-5,
                    _ => {
                        // bf16's one call, plus one more rounding to bf16 (the merge's).
                        let one_call = attention_over_past_and_own(inputs.each_ref(), causal);
                        let rounding = exact.abs().max().double_value(&[]) * 2f64.powi(-8);
                        2.0 * max_difference(&exact, &f32(&one_call)) + rounding
                    }
                };
                assert!(
                    difference < tolerance,
                    "{kind:?}, {seq} queries, {cached} cached: {difference} (at most {tolerance})"
                );
            }
        }
    }
}
