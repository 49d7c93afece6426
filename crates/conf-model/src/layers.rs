//! The MLP and the AdaptiveLayer that conditions a block on the confidence input.

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;

use crate::{Precision, fused, init};

pub const LAYER_NORM_EPS: f64 = 1e-5;

/// `Linear(d, h) → GELU (exact, erf) → Linear(h, d)`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc: Linear,
    pub proj: Linear,
    #[module(skip)]
    pub precision: Precision,
}

impl Mlp {
    /// In f32 ([`Precision`]; the models' `with_precision` sets another).
    pub fn new(d_model: usize, hidden: usize, device: &Device) -> Self {
        Self {
            fc: init::linear(d_model, hidden, true, device),
            proj: init::linear(hidden, d_model, true, device),
            precision: Precision::F32,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // In bf16 on libtorch the hidden layer stays bf16 (libtorch's GELU computes in f32
        // and rounds its output), as under PyTorch's autocast.
        let hidden = fused::gelu(rows_for_bf16(&self.fc, x, self.precision));
        rows(&self.proj, hidden, self.precision)
    }
}

/// `AdaptiveLayer(x, c) = LN_noaffine(x) · (1 + scale) + shift` with
/// `[scale | shift] = Linear(1 → 2d)(c)`. The Linear starts at zero, so a fresh block is a
/// plain pre-norm block with unit LayerNorm gain whatever the confidence input.
#[derive(Module, Debug)]
pub struct AdaptiveLayer {
    pub modulation: Linear,
    pub d_model: usize,
}

impl AdaptiveLayer {
    pub fn new(d_model: usize, device: &Device) -> Self {
        Self {
            modulation: init::zero_linear(1, 2 * d_model, device),
            d_model,
        }
    }

    /// `x: [B, T, d]`, `c: [B, T, 1]` (`None`: zero confidence) → `[B, T, d]`.
    pub fn forward(&self, x: Tensor<3>, c: Option<Tensor<3>>) -> Tensor<3> {
        let bias = self.modulation.bias.as_ref();
        fused::adaptive_norm(
            x,
            c,
            self.modulation.weight.val(),
            bias.expect("the modulation has a bias").val(),
            LAYER_NORM_EPS as f32,
        )
    }
}

/// `linear` on `x: [B, T, d_in]` as one `[B·T, d_in]` matrix: one gemm (and one for the
/// weight's gradient) instead of a broadcast batched product over B that the backward pass
/// reduces from a `[B, d_in, d_out]` temporary. The same values, computed faster. The product
/// in `precision`, the bias added in f32, the output f32.
pub fn rows(linear: &Linear, x: Tensor<3>, precision: Precision) -> Tensor<3> {
    rows_to(linear, x, precision, false)
}

/// [`rows`] for a consumer that takes bf16 operands (the attention, the MLP's GELU and second
/// product): in bf16 on libtorch the output stays bf16, one bf16 product with the bias in its
/// epilogue, where an f32 output would be written, read back and converted again (on the GPU
/// these passes are memory-bound, docs/backends.md#precision). Elsewhere as [`rows`].
pub fn rows_for_bf16(linear: &Linear, x: Tensor<3>, precision: Precision) -> Tensor<3> {
    rows_to(linear, x, precision, true)
}

fn rows_to(linear: &Linear, x: Tensor<3>, precision: Precision, keep_bf16: bool) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let y = apply_linear(linear, x.reshape([batch * seq, d_in]), precision, keep_bf16); // [B·T, d_out]
    let d_out = y.dims()[1];
    y.reshape([batch, seq, d_out])
}

/// Burn's `Linear` on `[N, d_in]` rows: on libtorch one operation ([`fused::linear`], its
/// output bf16 with `keep_bf16` in bf16), on flex its product through [`fused::matmul`],
/// elsewhere Burn's own (which some backends run as one fused kernel).
fn apply_linear(linear: &Linear, x: Tensor<2>, precision: Precision, keep_bf16: bool) -> Tensor<2> {
    if let Some(bias) = &linear.bias
        && fused::linear_takes(&x)
    {
        let bf16 = precision == Precision::Bf16;
        return fused::linear(x, linear.weight.val(), bias.val(), bf16, bf16 && keep_bf16);
    }
    if precision != Precision::Bf16 && !fused::applies(&x) {
        return linear.forward(x);
    }
    let y = precision.matmul(x, linear.weight.val());
    match &linear.bias {
        Some(bias) => y + bias.val().unsqueeze::<2>(),
        None => y,
    }
}

/// LayerNorm without affine parameters over the last dimension.
pub fn normalise(x: Tensor<3>) -> Tensor<3> {
    fused::normalise(x, LAYER_NORM_EPS as f32)
}

/// Burn's `LayerNorm` (built with [`LAYER_NORM_EPS`]), through the fused normalisation on flex
/// or libtorch's fused LayerNorm on the tch backends (the same values and parameters, fewer
/// operations under autodiff); elsewhere Burn's own, which some backends run as one kernel.
pub fn apply_layer_norm(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
    if !fused::layer_norm_applies(&x) {
        return norm.forward(x);
    }
    let beta = norm.beta.as_ref().map(|beta| beta.val());
    fused::layer_norm(x, norm.gamma.val(), beta, LAYER_NORM_EPS)
}
