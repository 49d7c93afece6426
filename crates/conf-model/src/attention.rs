//! Causal multi-head self-attention with separate q, k, v and output projections, and the
//! key/value cache that lets a later pass extend an earlier one.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::layers::{rows, rows_for_bf16};
use crate::{Precision, fused, init};

/// Which keys each query may attend to.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Query t attends to keys 0..=t.
    Causal,
    /// `mask[q, k] = true` hides key k from query q; shared by every row and head.
    /// `[T_query, T_key]`.
    Explicit(Box<Tensor<2, Bool>>),
    /// Every query attends to every key.
    Unmasked,
    /// Query k attends to cached keys `0..=k` and to its own key only: the dense objective's
    /// pass 2, where each sampled token extends its own prefix. Needs as many cached keys as
    /// queries.
    PrefixAndSelf,
    /// Every query attends to all cached keys and to its own key only: the seed objective's
    /// pass 2, where one sampled token per row follows the whole window.
    CacheAndSelf,
}

impl AttentionMask {
    pub fn explicit(mask: Tensor<2, Bool>) -> Self {
        Self::Explicit(Box::new(mask))
    }
}

/// One layer's keys and values: `[B, H, T, d/H]` each.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub key: Tensor<4>,
    pub value: Tensor<4>,
}

impl LayerKv {
    /// The same keys and values without autodiff, for a pass that builds no graph.
    pub fn without_autodiff(self) -> Self {
        Self {
            key: self.key.without_autodiff(),
            value: self.value.without_autodiff(),
        }
    }
}

#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    pub n_heads: usize,
    /// The projections' precision; the attention's is f32, or bf16 where
    /// [`fused::attends_in_bf16`].
    #[module(skip)]
    pub precision: Precision,
}

impl CausalSelfAttention {
    /// In f32 ([`Precision`]; the models' `with_precision` sets another).
    pub fn new(d_model: usize, n_heads: usize, device: &Device) -> Self {
        Self {
            query: init::linear(d_model, d_model, true, device),
            key: init::linear(d_model, d_model, true, device),
            value: init::linear(d_model, d_model, true, device),
            output: init::linear(d_model, d_model, true, device),
            n_heads,
            precision: Precision::F32,
        }
    }

    /// `[B, T, d] → [B, T, d]`; scores scaled by 1/sqrt(d / heads), masked to −inf.
    pub fn forward(&self, x: Tensor<3>, mask: &AttentionMask) -> Tensor<3> {
        self.forward_kv(x, mask, None).0
    }

    /// Attends from the new tokens `x: [B, S, d]` to their own keys/values, and to `past` ones
    /// under the two masks that extend a cache ([`AttentionMask::PrefixAndSelf`],
    /// [`AttentionMask::CacheAndSelf`]), which need them; the others take none. Returns the
    /// output and the new tokens' keys/values.
    pub fn forward_kv(
        &self,
        x: Tensor<3>,
        mask: &AttentionMask,
        past: Option<&LayerKv>,
    ) -> (Tensor<3>, LayerKv) {
        let [batch, seq, d_model] = x.dims();
        // bf16 q, k, v where the backend's fused attention takes them (an explicit mask goes
        // through Burn's softmax): on libtorch the products' own bf16 outputs, and the bf16
        // context straight into the output's product, whose output is f32.
        let in_bf16 = self.precision == Precision::Bf16
            && !matches!(mask, AttentionMask::Explicit(_))
            && fused::attends_in_bf16(&x);
        let project = |linear: &Linear, x: Tensor<3>| {
            self.split_heads(if in_bf16 {
                rows_for_bf16(linear, x, self.precision)
            } else {
                rows(linear, x, self.precision)
            })
        };
        let q = project(&self.query, x.clone()); // [B, H, S, dh]
        let own = LayerKv {
            key: project(&self.key, x.clone()),
            value: project(&self.value, x),
        };
        let operand = |t: Tensor<4>| if in_bf16 { t.cast(DType::BF16) } else { t };
        let context_rows = |context: Tensor<4>| {
            rows(
                &self.output,
                context.swap_dims(1, 2).reshape([batch, seq, d_model]),
                self.precision,
            )
        };
        let q = operand(q);
        if let AttentionMask::PrefixAndSelf | AttentionMask::CacheAndSelf = mask {
            let past = past.expect("PrefixAndSelf and CacheAndSelf attend to cached keys");
            let context = fused::prefix_and_self_attention(
                q,
                operand(own.key.clone()),
                operand(own.value.clone()),
                operand(past.key.clone()),
                operand(past.value.clone()),
                matches!(mask, AttentionMask::PrefixAndSelf),
            );
            return (context_rows(context), own);
        }
        assert!(
            past.is_none(),
            "only PrefixAndSelf and CacheAndSelf attend to cached keys"
        );
        let (k, v) = (operand(own.key.clone()), operand(own.value.clone()));
        let context = if q.is_autodiff() || fused::applies(&q) {
            // The trained pass, and every f32 pass on flex. Burn's `attention` under autodiff
            // falls back to decomposed ops whose row maximum is not detached (its backward
            // scatters into a fresh [B, H, S, K] tensor) and rebuilds the causal mask on every
            // call; this form differentiates through one masked softmax, and on flex is one
            // fused operation whose output needs no copy to merge the heads. Same values.
            softmax_attention(q, k, v, mask)
        } else {
            // The no-gradient passes elsewhere: Burn's fused kernel.
            let (bias, is_causal) = match mask {
                AttentionMask::Causal => (None, true),
                AttentionMask::Unmasked => (None, false),
                AttentionMask::Explicit(m) => (
                    Some(additive(m).expand([batch, self.n_heads, seq, seq])),
                    false,
                ),
                AttentionMask::PrefixAndSelf | AttentionMask::CacheAndSelf => {
                    unreachable!("handled above")
                }
            };
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal,
            };
            attention(q, k, v, None, bias, options) // [B, H, S, dh]
        };
        (context_rows(context), own)
    }

    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [batch, seq, d_model] = x.dims();
        x.reshape([batch, seq, self.n_heads, d_model / self.n_heads])
            .swap_dims(1, 2)
    }
}

/// `softmax(q·kᵀ / √dh + mask) · v` for the trained pass: `q: [B, H, S, dh]`, `k`,
/// `v: [B, H, K, dh]` → `[B, H, S, dh]`. Causal and unmasked attention is one fused operation
/// with its own backward where the backend has it ([`fused::attention`]); an explicit mask
/// goes through Burn's softmax as an additive bias.
pub fn softmax_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &AttentionMask,
) -> Tensor<4> {
    match mask {
        AttentionMask::Causal => fused::attention(q, k, v, true),
        AttentionMask::Unmasked => fused::attention(q, k, v, false),
        AttentionMask::Explicit(m) => {
            let scale = 1.0 / (q.dims()[3] as f64).sqrt();
            let scores = fused::matmul(q.mul_scalar(scale), k.swap_dims(2, 3)); // [B, H, S, K]
            fused::matmul(softmax(scores + additive(m), 3), v)
        }
        AttentionMask::PrefixAndSelf | AttentionMask::CacheAndSelf => {
            panic!("PrefixAndSelf and CacheAndSelf attend to cached keys")
        }
    }
}

/// A boolean mask (true hides) as an additive −inf bias `[1, 1, S, K]`: burn-tch passes
/// boolean masks to libtorch with the opposite meaning (docs/backends.md).
fn additive(mask: &Tensor<2, Bool>) -> Tensor<4> {
    Tensor::<2>::zeros(mask.dims(), &mask.device())
        .mask_fill(mask.clone(), f32::NEG_INFINITY)
        .unsqueeze::<4>()
}

/// The lower-triangular mask as an explicit `[T, T]` tensor (true above the diagonal).
pub fn causal_mask(seq: usize, device: &Device) -> Tensor<2, Bool> {
    Tensor::<2, Int>::ones([seq, seq], device).triu(1).bool()
}
