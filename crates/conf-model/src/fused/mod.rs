//! Fused operations for the flex CPU backend: exact GELU, LayerNorm without affine parameters,
//! the AdaptiveLayer and the attention's masked softmax, each one parallel pass forward and one
//! backward; the attention whole, per batch element and head; and the matrix product written
//! straight into its output.
//!
//! Burn runs these as chains of separately tracked element-wise operations under autodiff,
//! most of them on one core (docs/performance.md). On flex with f32 they go through a Burn
//! backend extension with their own backward; on every other backend and dtype the functions
//! here compute the same thing with Burn's own operations (`plain`), which the tests also use
//! as the reference.

#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod avx2;
#[cfg(all(feature = "flex", target_arch = "x86_64"))]
mod avx512;
#[cfg(feature = "tch")]
mod cuda_kernels;
#[cfg(feature = "flex")]
mod extension;
#[cfg(feature = "flex")]
mod head_attention;
#[cfg(feature = "flex")]
mod kernels;
#[cfg(feature = "flex")]
mod logit_rows;
#[cfg(feature = "flex")]
mod math;
mod pool;
#[cfg(feature = "flex")]
mod products;
#[cfg(feature = "tch")]
mod torch;
#[cfg(feature = "flex")]
mod update;

use burn::prelude::*;
use burn::tensor::activation;

pub use pool::on_cpu_pool;
#[cfg(feature = "tch")]
pub use torch::disable_onednn;
#[cfg(feature = "tch")]
pub(crate) use torch::{libtorch_on_cuda, start_profiler, stop_profiler};

/// Whether `x` takes the fused path (an f32 tensor on flex without gradient checkpointing, in
/// a build with the `flex` feature); elsewhere the functions here run Burn's own operations.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "flex")]
    return extension::applies(x);
    #[cfg(not(feature = "flex"))]
    {
        let _ = x;
        false
    }
}

/// Whether `device` computes on the host's CPU (flex, libtorch's CPU): there reading a value
/// back waits for no queued work, where on a GPU it stalls the host until the device catches up.
pub fn on_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if extension::is_flex(device) {
        return true;
    }
    #[cfg(feature = "tch")]
    if torch::libtorch_on_cuda(device) == Some(false) {
        return true;
    }
    let _ = device;
    false
}

/// The scalars of one AdamW step of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub learning_rate: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// `1 − learning_rate · weight_decay`, the decoupled decay's factor (1 without decay).
    pub keep: f32,
    /// The step t, from 1.
    pub step: i32,
}

impl AdamWScalars {
    /// The bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub fn corrections(self) -> (f32, f32) {
        (
            1.0 - self.beta_1.powi(self.step),
            1.0 - self.beta_2.powi(self.step),
        )
    }
}

/// Whether [`adamw`] takes `param`'s update: an f32 tensor on flex or libtorch (CPU or CUDA),
/// without autodiff (optimizers step on the inner tensors). Other devices use Burn's AdamW
/// itself.
pub fn adamw_applies<const D: usize>(param: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    let on_libtorch = torch::on_libtorch(param);
    #[cfg(not(feature = "tch"))]
    let on_libtorch = false;
    (applies(param) || on_libtorch) && !param.device().is_autodiff()
}

/// AdamW's update of one parameter where [`adamw_applies`]: the new parameter and first and
/// second moments as Burn's AdamW computes them, in one pass on flex (the same arithmetic) and
/// PyTorch's fused AdamW on libtorch (equal within rounding): one kernel, where Burn's AdamW
/// records about fifteen operations, each a kernel launch on a GPU and a new tensor.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    scalars: AdamWScalars,
) -> [Tensor<D>; 3] {
    assert!(
        [&param, &grad, &moment_1, &moment_2]
            .iter()
            .all(|t| adamw_applies(t)),
        "fused AdamW: the parameter, gradient and moments must be f32 on flex or libtorch, \
         without autodiff"
    );
    #[cfg(feature = "flex")]
    if applies(&param) {
        return extension::adamw(param, grad, moment_1, moment_2, scalars);
    }
    #[cfg(feature = "tch")]
    return torch::adamw(param, grad, moment_1, moment_2, scalars);
    #[allow(unreachable_code)]
    {
        let _ = (param, grad, moment_1, moment_2, scalars);
        unreachable!("adamw_applies holds only with the flex or tch feature")
    }
}

/// Each tensor times the one-element `factor` (all on one device, without autodiff): on
/// libtorch one multi-tensor kernel for all of them, elsewhere a product each.
pub fn scale_all(tensors: Vec<Tensor<1>>, factor: Tensor<1>) -> Vec<Tensor<1>> {
    #[cfg(feature = "tch")]
    if tensors
        .iter()
        .chain([&factor])
        .all(|t| torch::on_libtorch(t) && !t.device().is_autodiff())
    {
        return torch::scale_all(tensors, factor);
    }
    tensors.into_iter().map(|t| t * factor.clone()).collect()
}

/// Exact (erf) GELU, element-wise.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if extension::applies(&x) {
        return extension::gelu(x);
    }
    plain::gelu(x)
}

/// `(x − mean) / sqrt(var + eps)` over the last dimension (biased variance), no affine part.
pub fn normalise<const D: usize>(x: Tensor<D>, eps: f32) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if extension::applies(&x) {
        return extension::normalise(x, eps);
    }
    #[cfg(feature = "tch")]
    if torch::on_libtorch(&x) {
        return torch::layer_norm(x, None, None, eps as f64);
    }
    plain::normalise(x, eps)
}

/// Whether [`layer_norm`] takes a fused path for `x`: flex's normalisation (then gain and bias)
/// or libtorch's fused LayerNorm. Elsewhere callers keep Burn's `LayerNorm`, which some
/// backends run as one kernel.
pub fn layer_norm_applies<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    if torch::on_libtorch(x) {
        return true;
    }
    applies(x)
}

/// Whether [`linear`] takes `x`: an f32 or bf16 tensor on libtorch (in a build with the `tch`
/// feature).
pub fn linear_takes(x: &Tensor<2>) -> bool {
    #[cfg(feature = "tch")]
    return matches!(
        x.dtype(),
        burn::tensor::DType::F32 | burn::tensor::DType::BF16
    ) && torch::on_libtorch_device(x);
    #[cfg(not(feature = "tch"))]
    {
        let _ = x;
        false
    }
}

/// `x · weight + bias` on `[N, d_in]` rows with `weight: [d_in, d_out]` (Burn's `Linear`), the
/// product's operands in bf16 with `bf16`, its output f32 unless `out_bf16` (with `bf16`): on
/// libtorch one operation with its own backward, the bias in the product's epilogue (f32, or
/// bf16 out) or in the pass that converts the bf16 product back to f32, where Burn adds it in
/// a pass of its own. Only where [`linear_takes`].
pub fn linear(
    x: Tensor<2>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    bf16: bool,
    out_bf16: bool,
) -> Tensor<2> {
    assert!(bf16 || !out_bf16, "a bf16 output is that of a bf16 product");
    #[cfg(feature = "tch")]
    return torch::linear(x, weight, bias, bf16, out_bf16);
    #[cfg(not(feature = "tch"))]
    {
        let _ = (x, weight, bias, bf16, out_bf16);
        unreachable!("linear_takes holds only with the tch feature")
    }
}

/// `normalise(x) · gamma + beta` over the last dimension (Burn's `LayerNorm`).
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if torch::on_libtorch(&x) {
        return torch::layer_norm(x, Some(gamma), beta, eps);
    }
    let scaled = normalise(x, eps as f32) * gamma.unsqueeze::<D>();
    match beta {
        Some(beta) => scaled + beta.unsqueeze::<D>(),
        None => scaled,
    }
}

/// The AdaptiveLayer `normalise(x) · (1 + scale) + shift` with `[scale | shift] = c·W + b`:
/// `x: [B, T, d]`, `c: [B, T, 1]`, `weight: [1, 2d]`, `bias: [2d]`. Without `c`, zero
/// confidence everywhere: a LayerNorm with gain `1 + b_scale` and bias `b_shift`, which libtorch
/// runs as one fused LayerNorm (under half the modulated form's time at `[1024, 64]`).
pub fn adaptive_norm(
    x: Tensor<3>,
    c: Option<Tensor<3>>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    eps: f32,
) -> Tensor<3> {
    #[cfg(feature = "tch")]
    if torch::on_libtorch(&x) {
        return match c {
            Some(c) => torch::adaptive_norm(x, c, weight, bias, eps as f64),
            None => {
                let d = x.dims()[2];
                let gain = bias.clone().slice(0..d) + 1.0;
                torch::layer_norm(x, Some(gain), Some(bias.slice(d..2 * d)), eps as f64)
            }
        };
    }
    let c = c.unwrap_or_else(|| {
        let [batch, seq, _] = x.dims();
        Tensor::zeros([batch, seq, 1], &x.device())
    });
    #[cfg(feature = "flex")]
    if extension::applies(&x) {
        return extension::adaptive_norm(x, c, weight, bias, eps);
    }
    plain::adaptive_norm(x, c, weight, bias, eps)
}

/// Softmax over the last dimension of attention scores `[B, H, S, K]`. With `causal`, query i
/// sees keys `0..=i + (K − S)` (the keys are any cached ones followed by the queries' own) and
/// the hidden ones get probability 0.
pub fn attention_softmax(scores: Tensor<4>, causal: bool) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if extension::applies(&scores) {
        return extension::attention_softmax(scores, causal);
    }
    plain::attention_softmax(scores, causal)
}

/// The matrix product over the last two dimensions, `[.., M, K] · [.., K, N]`, with equal
/// batch dimensions (broadcast ones take Burn's matmul).
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if extension::applies(&lhs)
        && extension::applies(&rhs)
        && lhs.dims()[..D - 2] == rhs.dims()[..D - 2]
    {
        return extension::matmul(lhs, rhs);
    }
    plain::matmul(lhs, rhs)
}

/// `softmax(q·kᵀ / √dh) · v` for `q: [B, H, S, dh]` and `k`, `v: [B, H, K, dh]`, the softmax
/// causal or not as in [`attention_softmax`]. The output's memory is `[B, S, H, dh]` on flex,
/// so merging the heads back copies nothing.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if [&q, &k, &v].into_iter().all(extension::applies) && fused_shapes(&q, &k, &v, causal) {
        return extension::attention(q, k, v, causal);
    }
    #[cfg(feature = "tch")]
    if torch::attention_takes(&[&q, &k, &v]) && fused_shapes(&q, &k, &v, causal) {
        return torch::attention(q, k, v, causal);
    }
    plain::attention(q, k, v, causal)
}

/// Whether `x`'s backend has a fused attention that takes bf16 operands and keeps its softmax
/// statistics in f32: libtorch's ([`attention`]). Elsewhere bf16 operands would go through
/// Burn's decomposed softmax in bf16.
pub fn attends_in_bf16<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    return torch::on_libtorch_device(x);
    #[cfg(not(feature = "tch"))]
    {
        let _ = x;
        false
    }
}

/// The attention of the passes that extend cached keys without gradient: query i of
/// `q: [B, H, S, dh]` attends to cached keys and values (`past_*`, `[B, H, K, dh]`) and to
/// its own (`own_*`, like `q`), its own score first in the softmax row. With `causal`, the
/// dense objective's pass 2 ([`AttentionMask::PrefixAndSelf`](crate::AttentionMask)): query
/// i sees cached keys `0..=i`, one cached key per query. Without, the seed objective's
/// ([`AttentionMask::CacheAndSelf`](crate::AttentionMask)): every cached key. One fused
/// operation on flex (f32) and on libtorch (f32 or bf16) without autodiff.
pub fn prefix_and_self_attention(
    q: Tensor<4>,
    own_key: Tensor<4>,
    own_value: Tensor<4>,
    past_key: Tensor<4>,
    past_value: Tensor<4>,
    causal: bool,
) -> Tensor<4> {
    let [batch, heads, seq, head_dim] = q.dims();
    let cached = past_key.dims()[2];
    for (name, t, keys) in [
        ("own key", &own_key, seq),
        ("own value", &own_value, seq),
        ("cached key", &past_key, cached),
        ("cached value", &past_value, cached),
    ] {
        assert_eq!(
            t.dims(),
            [batch, heads, keys, head_dim],
            "prefix-and-self attention: the {name}s' shape does not fit the queries'"
        );
    }
    assert!(
        !causal || cached == seq,
        "prefix-and-self attention: {cached} cached keys for {seq} queries (causal: one per query)"
    );
    #[cfg(any(feature = "flex", feature = "tch"))]
    let tensors = [&q, &own_key, &own_value, &past_key, &past_value];
    #[cfg(any(feature = "flex", feature = "tch"))]
    let fusable =
        seq > 0 && cached > 0 && head_dim > 0 && tensors.iter().all(|t| !t.device().is_autodiff());
    #[cfg(feature = "flex")]
    if fusable && tensors.iter().all(|t| applies(*t)) {
        return extension::prefix_and_self_attention(
            q, own_key, own_value, past_key, past_value, causal,
        );
    }
    #[cfg(feature = "tch")]
    if fusable && torch::attention_takes(&tensors) {
        return torch::prefix_and_self_attention(
            q, own_key, own_value, past_key, past_value, causal,
        );
    }
    plain::prefix_and_self_attention(q, own_key, own_value, past_key, past_value, causal)
}

/// Per-token statistics of next-token predictions, without autodiff, `[B, T]` each.
#[derive(Debug, Clone)]
pub struct TokenStats {
    /// Cross-entropy of the real next token (nats).
    pub loss: Tensor<2>,
    /// Largest predicted probability.
    pub max_prob: Tensor<2>,
    /// 1 where the arg-max is the real next token, else 0.
    pub correct: Tensor<2>,
    /// Entropy of the predicted distribution (nats).
    pub entropy: Tensor<2>,
}

/// From `[loss, max_prob, correct, entropy]`, the order the fused kernels write them in.
impl From<[Tensor<2>; 4]> for TokenStats {
    fn from([loss, max_prob, correct, entropy]: [Tensor<2>; 4]) -> Self {
        Self {
            loss,
            max_prob,
            correct,
            entropy,
        }
    }
}

impl TokenStats {
    /// The statistics of positions `0..count` only.
    pub fn first_positions(self, count: usize) -> Self {
        let first = |t: Tensor<2>| {
            let batch = t.dims()[0];
            t.slice([0..batch, 0..count])
        };
        Self {
            loss: first(self.loss),
            max_prob: first(self.max_prob),
            correct: first(self.correct),
            entropy: first(self.entropy),
        }
    }
}

/// Cross-entropy of each position: `logits [B, T, V]`, `targets [B, T]` → `[B, T]`. On flex
/// and libtorch one operation each way: the backward `g · (softmax − onehot)` is recomputed
/// from the logits and each row's log-sum-exp, so no `[B, T, V]` tensor is kept beyond the
/// logits.
pub fn token_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    check_rows("targets", &logits, &targets.dims());
    let targets = same_graph(targets, &logits);
    #[cfg(feature = "flex")]
    if applies(&logits) && logits.dims()[2] > 0 {
        return extension::cross_entropy(logits, targets);
    }
    #[cfg(feature = "tch")]
    if torch::on_libtorch(&logits) {
        return torch::cross_entropy(logits, targets);
    }
    plain::token_cross_entropy(logits, targets)
}

/// [`TokenStats`] of `logits [B, T, V]` against `targets [B, T]`, computed without autodiff:
/// on flex one pass over each row, on libtorch from one log-softmax.
pub fn token_stats(logits: Tensor<3>, targets: Tensor<2, Int>) -> TokenStats {
    check_rows("targets", &logits, &targets.dims());
    let logits = logits.without_autodiff();
    let targets = targets.without_autodiff();
    #[cfg(feature = "flex")]
    if applies(&logits) && logits.dims()[2] > 0 {
        return extension::token_statistics(logits, targets).into();
    }
    #[cfg(feature = "tch")]
    if torch::on_libtorch(&logits) {
        return torch::token_statistics(logits, targets).into();
    }
    plain::token_stats(logits, targets)
}

/// One draw per (row, position) from `softmax(logits)` at temperature 1 by inverting the
/// cumulative distribution at the given uniforms: `[B, T, V]`, `[B, T] → [B, T]`, without
/// autodiff. On flex one pass over each row, on libtorch its softmax, cumulative sum and a
/// binary search; the draws equal the plain path's except where a uniform falls within
/// rounding of a cumulative probability.
pub fn sample_tokens(logits: Tensor<3>, uniforms: Tensor<2>) -> Tensor<2, Int> {
    check_rows("uniforms", &logits, &uniforms.dims());
    let logits = logits.without_autodiff();
    let uniforms = uniforms.without_autodiff();
    let int_dtype = logits.device().settings().int_dtype;
    #[allow(unused_mut)]
    let mut draws: Option<Tensor<2, Int>> = None;
    #[cfg(feature = "flex")]
    if applies(&logits) && applies(&uniforms) && logits.dims()[2] > 0 {
        draws = Some(extension::sample_tokens(logits.clone(), uniforms.clone()));
    }
    #[cfg(feature = "tch")]
    if torch::on_libtorch(&logits) && torch::on_libtorch(&uniforms) {
        draws = Some(torch::sample_tokens(logits.clone(), uniforms.clone()));
    }
    match draws {
        // The kernels write i64; the device's integers may be narrower.
        Some(draws) if draws.dtype() != int_dtype.into() => draws.cast(int_dtype),
        Some(draws) => draws,
        None => plain::sample_tokens(logits, uniforms),
    }
}

/// One value per row of logits `[B, T, V]`: `per_row` must be `[B, T]`, not merely as many.
fn check_rows(name: &str, logits: &Tensor<3>, per_row: &[usize; 2]) {
    let [b, t, _] = logits.dims();
    assert!(
        *per_row == [b, t],
        "{name} must be [{b}, {t}], one per row of logits {:?}; got {per_row:?}",
        logits.dims()
    );
}

/// `targets` on `logits`' device, with autodiff exactly when `logits` has it.
fn same_graph(targets: Tensor<2, Int>, logits: &Tensor<3>) -> Tensor<2, Int> {
    if logits.is_autodiff() {
        targets.to_device(&logits.device())
    } else {
        targets.without_autodiff()
    }
}

/// Shapes the fused attention takes: the same batch, heads and head width everywhere (no
/// broadcasting), as many keys as values, and no empty sequence or fewer keys than causal
/// queries need; others take Burn's operations.
#[cfg(any(feature = "flex", feature = "tch"))]
fn fused_shapes(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, causal: bool) -> bool {
    let ([b, h, queries, dh], [kb, kh, keys, kd], [vb, vh, values, vd]) =
        (q.dims(), k.dims(), v.dims());
    (kb, kh, kd) == (b, h, dh)
        && (vb, vh, vd) == (b, h, dh)
        && keys == values
        && queries > 0
        && keys > 0
        && dh > 0
        && (!causal || keys >= queries)
}

/// The same operations from Burn's own tensor operations: what every backend but flex runs,
/// and the reference the fused kernels are tested against.
pub mod plain {
    use super::*;

    pub fn token_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
        let log_probs = activation::log_softmax(logits, 2);
        -log_probs
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .squeeze_dim::<2>(2)
    }

    pub fn token_stats(logits: Tensor<3>, targets: Tensor<2, Int>) -> TokenStats {
        let log_probs = activation::log_softmax(logits, 2);
        let probs = log_probs.clone().exp();
        let entropy = -(probs.clone() * log_probs.clone())
            .sum_dim(2)
            .squeeze_dim::<2>(2);
        let loss = -log_probs
            .gather(2, targets.clone().unsqueeze_dim::<3>(2))
            .squeeze_dim::<2>(2);
        let (max_prob, argmax) = probs.max_dim_with_indices(2);
        let correct = argmax.squeeze_dim::<2>(2).equal(targets).float();
        TokenStats {
            loss,
            max_prob: max_prob.squeeze_dim::<2>(2),
            correct,
            entropy,
        }
    }

    pub fn sample_tokens(logits: Tensor<3>, uniforms: Tensor<2>) -> Tensor<2, Int> {
        let vocab = logits.dims()[2];
        let cdf = activation::softmax(logits, 2).cumsum(2);
        let below = cdf.lower(uniforms.unsqueeze_dim::<3>(2));
        below
            .int()
            .sum_dim(2)
            .clamp_max(vocab as i64 - 1)
            .squeeze_dim::<2>(2)
    }

    pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        activation::gelu(x)
    }

    pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
        lhs.matmul(rhs)
    }

    pub fn normalise<const D: usize>(x: Tensor<D>, eps: f32) -> Tensor<D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        (x - mean) / (var + eps as f64).sqrt()
    }

    pub fn adaptive_norm(
        x: Tensor<3>,
        c: Tensor<3>,
        weight: Tensor<2>,
        bias: Tensor<1>,
        eps: f32,
    ) -> Tensor<3> {
        let [batch, seq, d] = x.dims();
        let modulation = c.reshape([batch * seq, 1]).matmul(weight) + bias.unsqueeze::<2>();
        let modulation = modulation.reshape([batch, seq, 2 * d]);
        let scale = modulation.clone().slice([0..batch, 0..seq, 0..d]);
        let shift = modulation.slice([0..batch, 0..seq, d..2 * d]);
        normalise(x, eps) * (scale + 1.0) + shift
    }

    pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
        let scale = 1.0 / (q.dims()[3] as f64).sqrt();
        let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3)); // [B, H, S, K]
        attention_softmax(scores, causal).matmul(v)
    }

    /// Query k's scores are its own key's and the cached keys' `0..=k`, `[B, H, S, 1 + S]`
    /// with its own first, so that one causal softmax (query k sees the first k + 2 columns)
    /// masks them; half the scores of attending to `[past, own]` under an explicit
    /// `[S, 2S]` mask.
    pub fn prefix_and_self_attention(
        q: Tensor<4>,
        own_key: Tensor<4>,
        own_value: Tensor<4>,
        past_key: Tensor<4>,
        past_value: Tensor<4>,
        causal: bool,
    ) -> Tensor<4> {
        let [batch, heads, seq, head_dim] = q.dims();
        let cached = past_key.dims()[2];
        let q = q.mul_scalar(1.0 / (head_dim as f64).sqrt());
        let own_score = (q.clone() * own_key).sum_dim(3); // [B, H, S, 1]
        let prefix_scores = q.matmul(past_key.swap_dims(2, 3)); // [B, H, S, K]
        let weights = attention_softmax(Tensor::cat(vec![own_score, prefix_scores], 3), causal);
        let own_weight = weights.clone().slice([0..batch, 0..heads, 0..seq, 0..1]);
        let prefix_weights = weights.slice([0..batch, 0..heads, 0..seq, 1..cached + 1]);
        own_weight * own_value + prefix_weights.matmul(past_value)
    }

    pub fn attention_softmax(scores: Tensor<4>, causal: bool) -> Tensor<4> {
        if !causal {
            return activation::softmax(scores, 3);
        }
        let [_, _, queries, keys] = scores.dims();
        let device = scores.device();
        let hidden = Tensor::<2, Int>::ones([queries, keys], &device)
            .triu(1 + keys as i64 - queries as i64)
            .bool();
        let bias = Tensor::<2>::zeros([queries, keys], &device)
            .mask_fill(hidden, f32::NEG_INFINITY)
            .unsqueeze::<4>();
        activation::softmax(scores + bias, 3)
    }
}
