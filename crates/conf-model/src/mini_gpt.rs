//! MiniGPT: the standard pre-norm GPT.
//!
//! `x = tok_emb(ids) + pos_emb(0..T)`, dropout; per block `x = x + Drop(Attn(LN1(x)))`,
//! `x = x + Drop(MLP(LN2(x)))`; `LN_f`; logits from the head tied to `tok_emb`.

use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, LayerNormConfig};
use burn::prelude::*;

use crate::attention::{AttentionMask, CausalSelfAttention};
use crate::layers::{LAYER_NORM_EPS, Mlp, apply_layer_norm};
use crate::{GptConfig, Precision, init};

#[derive(Module, Debug)]
pub struct Block {
    pub ln1: LayerNorm,
    pub attn: CausalSelfAttention,
    pub ln2: LayerNorm,
    pub mlp: Mlp,
    pub dropout: Dropout,
}

impl Block {
    pub fn new(config: &GptConfig, device: &Device) -> Self {
        Self {
            ln1: layer_norm(config.d_model, device),
            attn: CausalSelfAttention::new(config.d_model, config.n_heads, device),
            ln2: layer_norm(config.d_model, device),
            mlp: Mlp::new(config.d_model, config.mlp_hidden, device),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    pub fn forward(&self, x: Tensor<3>, mask: &AttentionMask) -> Tensor<3> {
        let x = x.clone()
            + self
                .dropout
                .forward(self.attn.forward(apply_layer_norm(&self.ln1, x), mask));
        x.clone()
            + self
                .dropout
                .forward(self.mlp.forward(apply_layer_norm(&self.ln2, x)))
    }
}

pub(crate) fn layer_norm(d_model: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d_model)
        .with_epsilon(LAYER_NORM_EPS)
        .init(device)
}

#[derive(Module, Debug)]
pub struct MiniGpt {
    pub tok_emb: Embedding,
    pub pos_emb: Embedding,
    pub dropout: Dropout,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    /// The LM head's precision (the blocks carry their own).
    #[module(skip)]
    pub precision: Precision,
}

impl MiniGpt {
    pub fn new(config: &GptConfig, device: &Device) -> Self {
        Self {
            tok_emb: init::embedding(config.vocab_size, config.d_model, device),
            pos_emb: init::embedding(config.context_length + 1, config.d_model, device),
            dropout: DropoutConfig::new(config.dropout).init(),
            blocks: (0..config.n_layers)
                .map(|_| Block::new(config, device))
                .collect(),
            ln_f: layer_norm(config.d_model, device),
            precision: Precision::F32,
        }
        .materialize()
    }

    /// The same model with its matrix products in `precision` (built in f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for block in &mut self.blocks {
            block.attn.precision = precision;
            block.mlp.precision = precision;
        }
        self.precision = precision;
        self
    }

    /// `ids: [B, T]` → logits `[B, T, V]`.
    pub fn forward(&self, ids: Tensor<2, Int>, mask: &AttentionMask) -> Tensor<3> {
        let pos = positions(&ids, 0);
        let mut x = embed_at(&self.tok_emb, &self.pos_emb, ids, pos);
        x = self.dropout.forward(x);
        for block in &self.blocks {
            x = block.forward(x, mask);
        }
        tied_logits(
            apply_layer_norm(&self.ln_f, x),
            &self.tok_emb,
            self.precision,
        )
    }
}

/// Positions `start..start + T` for every row of `ids: [B, T]`.
pub fn positions(ids: &Tensor<2, Int>, start: usize) -> Tensor<2, Int> {
    let [batch, seq] = ids.dims();
    Tensor::<1, Int>::arange(start as i64..(start + seq) as i64, &ids.device())
        .reshape([1, seq])
        .expand([batch, seq])
}

/// Token plus learned position embeddings: `[B, T] → [B, T, d]`.
pub(crate) fn embed_at(
    tok_emb: &Embedding,
    pos_emb: &Embedding,
    ids: Tensor<2, Int>,
    positions: Tensor<2, Int>,
) -> Tensor<3> {
    tok_emb.forward(ids) + pos_emb.forward(positions)
}

/// The LM head tied to the token embedding, without bias: `[B, T, d] → [B, T, V]`, its product
/// in `precision`.
pub(crate) fn tied_logits(h: Tensor<3>, tok_emb: &Embedding, precision: Precision) -> Tensor<3> {
    let [batch, seq, d] = h.dims();
    let weight = tok_emb.weight.val(); // [V, d]
    let vocab = weight.dims()[0];
    precision
        .matmul(h.reshape([batch * seq, d]), weight.transpose())
        .reshape([batch, seq, vocab])
}
