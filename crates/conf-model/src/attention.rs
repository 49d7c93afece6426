//! Causal multi-head self-attention with separate q, k, v and output projections.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::init;

/// Which keys each query may attend to.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Query t attends to keys 0..=t.
    Causal,
    /// `mask[q, k] = true` hides key k from query q; shared by every row and head. `[T, T]`
    Explicit(Box<Tensor<2, Bool>>),
}

#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    pub n_heads: usize,
}

impl CausalSelfAttention {
    pub fn new(d_model: usize, n_heads: usize, device: &Device) -> Self {
        Self {
            query: init::linear(d_model, d_model, true, device),
            key: init::linear(d_model, d_model, true, device),
            value: init::linear(d_model, d_model, true, device),
            output: init::linear(d_model, d_model, true, device),
            n_heads,
        }
    }

    /// `[B, T, d] → [B, T, d]`; scores scaled by 1/sqrt(d / heads), masked to −inf.
    pub fn forward(&self, x: Tensor<3>, mask: &AttentionMask) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let q = self.split_heads(self.query.forward(x.clone())); // [B, H, T, dh]
        let k = self.split_heads(self.key.forward(x.clone()));
        let v = self.split_heads(self.value.forward(x));
        let (mask, is_causal) = match mask {
            AttentionMask::Causal => (None, true),
            AttentionMask::Explicit(m) => {
                let m = m
                    .clone()
                    .unsqueeze::<4>()
                    .expand([batch, self.n_heads, seq, seq]);
                (Some(m), false)
            }
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal,
        };
        let context = attention(q, k, v, mask, None, options); // [B, H, T, dh]
        let context = context.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.output.forward(context)
    }

    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [batch, seq, d_model] = x.dims();
        x.reshape([batch, seq, self.n_heads, d_model / self.n_heads])
            .swap_dims(1, 2)
    }
}

/// The lower-triangular mask as an explicit `[T, T]` tensor (true above the diagonal).
pub fn causal_mask(seq: usize, device: &Device) -> Tensor<2, Bool> {
    Tensor::<2, Int>::ones([seq, seq], device).triu(1).bool()
}
