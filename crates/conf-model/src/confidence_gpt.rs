//! ConfidenceAwareGPT: MiniGPT whose blocks are conditioned on a per-token confidence scalar
//! and which predicts, at each position, the loss it will incur two tokens ahead.

use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear};
use burn::prelude::*;

use crate::attention::{AttentionMask, CausalSelfAttention, LayerKv};
use crate::layers::{AdaptiveLayer, Mlp, apply_layer_norm, rows};
use crate::mini_gpt::{embed_at, layer_norm, positions, tied_logits};
use crate::{ConfidenceGptConfig, GptConfig, Precision, init};

/// A pre-norm block whose two LayerNorms are AdaptiveLayers driven by the confidence input.
#[derive(Module, Debug)]
pub struct MetaAwareBlock {
    pub adapt1: AdaptiveLayer,
    pub attn: CausalSelfAttention,
    pub adapt2: AdaptiveLayer,
    pub mlp: Mlp,
    pub dropout: Dropout,
}

impl MetaAwareBlock {
    pub fn new(config: &GptConfig, device: &Device) -> Self {
        Self {
            adapt1: AdaptiveLayer::new(config.d_model, device),
            attn: CausalSelfAttention::new(config.d_model, config.n_heads, device),
            adapt2: AdaptiveLayer::new(config.d_model, device),
            mlp: Mlp::new(config.d_model, config.mlp_hidden, device),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// `x: [B, T, d]`, `c: [B, T, 1]` (`None`: zero confidence); attends also to `past`
    /// keys/values under a mask that extends a cache ([`CausalSelfAttention::forward_kv`]).
    /// Returns the block output and the keys/values of `x`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        c: Option<Tensor<3>>,
        mask: &AttentionMask,
        past: Option<&LayerKv>,
    ) -> (Tensor<3>, LayerKv) {
        let normed = self.adapt1.forward(x.clone(), c.clone());
        let (attended, kv) = self.attn.forward_kv(normed, mask, past);
        let x = x + self.dropout.forward(attended);
        let mlp = self.mlp.forward(self.adapt2.forward(x.clone(), c));
        (x + self.dropout.forward(mlp), kv)
    }
}

/// Output of a ConfidenceAwareGPT forward pass.
#[derive(Debug, Clone)]
pub struct ConfidenceOutput {
    pub logits: Tensor<3>,     // [B, T, V]
    pub confidence: Tensor<2>, // [B, T], predicted loss at t+2 in nats
}

/// A ConfidenceAwareGPT pass stopped before the LM head.
#[derive(Debug, Clone)]
pub struct StateOutput {
    pub state: Tensor<3>, // [B, T, d], the final normalised state the LM head reads
    pub confidence: Tensor<2>, // [B, T]
}

#[derive(Module, Debug)]
pub struct ConfidenceAwareGpt {
    pub tok_emb: Embedding,
    pub pos_emb: Embedding,
    pub dropout: Dropout,
    pub blocks: Vec<MetaAwareBlock>,
    pub ln_f: LayerNorm,
    pub confidence_predictor: Linear,
    /// Blocks the probe head reads; 0 means the head on the final normalised state.
    pub probe_blocks: usize,
    /// The LM head's precision (the blocks carry their own; the confidence head is f32).
    #[module(skip)]
    pub precision: Precision,
}

impl ConfidenceAwareGpt {
    pub fn new(config: &ConfidenceGptConfig, device: &Device) -> Self {
        let gpt = &config.gpt;
        let head_in = config.conf_head.input_width(gpt.d_model, gpt.n_layers);
        let mut predictor = init::linear(head_in, 1, true, device);
        predictor.bias = Some(
            burn::nn::Initializer::Constant {
                value: config.confidence_init_bias,
            }
            .init([1], device),
        );
        Self {
            tok_emb: init::embedding(gpt.vocab_size, gpt.d_model, device),
            pos_emb: init::embedding(gpt.context_length + 1, gpt.d_model, device),
            dropout: DropoutConfig::new(gpt.dropout).init(),
            blocks: (0..gpt.n_layers)
                .map(|_| MetaAwareBlock::new(gpt, device))
                .collect(),
            ln_f: layer_norm(gpt.d_model, device),
            confidence_predictor: predictor,
            probe_blocks: config.conf_head.probe_blocks(gpt.n_layers),
            precision: Precision::F32,
        }
        .materialize()
    }

    /// The same model with its matrix products in `precision` (built in f32; the
    /// confidence head stays f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for block in &mut self.blocks {
            block.attn.precision = precision;
            block.mlp.precision = precision;
        }
        self.precision = precision;
        self
    }

    /// `ids: [B, T]`, `confidence_input: [B, T]` (the confidence history every block reads),
    /// at positions `0..T`.
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
        mask: &AttentionMask,
    ) -> ConfidenceOutput {
        let pos = positions(&ids, 0);
        self.run(ids, confidence_input, pos, mask, None).0
    }

    /// Like [`forward`](Self::forward), at explicit positions `[B, T]`: the reference path of
    /// the lookahead passes, for tests.
    #[cfg(feature = "test-util")]
    pub fn forward_at(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
        positions: Tensor<2, Int>,
        mask: &AttentionMask,
    ) -> ConfidenceOutput {
        self.run(ids, confidence_input, positions, mask, None).0
    }

    /// A causal pass that also returns every layer's keys and values, so a later pass can
    /// extend it without recomputing it.
    pub fn forward_cached(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
    ) -> (ConfidenceOutput, Vec<LayerKv>) {
        let pos = positions(&ids, 0);
        self.run(ids, confidence_input, pos, &AttentionMask::Causal, None)
    }

    /// [`forward_cached`](Self::forward_cached) without the LM head: the final normalised state
    /// and the confidence. An objective that trains on a few positions (seed: the last) takes
    /// their logits through [`lm_head`](Self::lm_head) apart, so the head's backward covers those
    /// rows only and not `[B, T, V]` gradients that are zero but for them.
    pub fn forward_cached_state(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
    ) -> (StateOutput, Vec<LayerKv>) {
        let pos = positions(&ids, 0);
        self.heads_but_lm(self.trunk(
            ids,
            Some(confidence_input),
            pos,
            &AttentionMask::Causal,
            None,
        ))
    }

    /// The tied LM head on final normalised states `[B, T, d]`: logits `[B, T, V]`.
    pub fn lm_head(&self, state: Tensor<3>) -> Tensor<3> {
        tied_logits(state, &self.tok_emb, self.precision)
    }

    /// New tokens `ids: [B, S]` at `positions: [B, S]` attending to the cached keys/values of
    /// an earlier pass and to their own, as `mask` allows: [`AttentionMask::PrefixAndSelf`] or
    /// [`AttentionMask::CacheAndSelf`], the masks that extend a cache.
    pub fn extend(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
        positions: Tensor<2, Int>,
        past: &[LayerKv],
        mask: &AttentionMask,
    ) -> ConfidenceOutput {
        self.run(ids, confidence_input, positions, mask, Some(past))
            .0
    }

    /// The confidence head's predictions of a causal pass at positions `0..T`, without the LM
    /// head: `[B, T]`, equal to [`forward`](Self::forward)'s `confidence`. The confidence
    /// history needs only these, and the LM head is the widest product of a forward pass.
    /// Without `confidence_input`, zero confidence everywhere (the history's own pass), which
    /// leaves each AdaptiveLayer a plain LayerNorm.
    pub fn predict_confidence(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Option<Tensor<2>>,
    ) -> Tensor<2> {
        let pos = positions(&ids, 0);
        let trunk = self.trunk(ids, confidence_input, pos, &AttentionMask::Causal, None);
        let head_input = match trunk.probed {
            Some(probed) => probed,
            None => apply_layer_norm(&self.ln_f, trunk.state),
        };
        self.confidence_head(head_input)
    }

    fn run(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
        positions: Tensor<2, Int>,
        mask: &AttentionMask,
        past: Option<&[LayerKv]>,
    ) -> (ConfidenceOutput, Vec<LayerKv>) {
        let trunk = self.trunk(ids, Some(confidence_input), positions, mask, past);
        let (StateOutput { state, confidence }, cache) = self.heads_but_lm(trunk);
        let output = ConfidenceOutput {
            logits: self.lm_head(state),
            confidence,
        };
        (output, cache)
    }

    /// The final LayerNorm and the confidence head on the probe's or the final state.
    fn heads_but_lm(&self, trunk: Trunk) -> (StateOutput, Vec<LayerKv>) {
        let state = apply_layer_norm(&self.ln_f, trunk.state); // [B, T, d]
        let confidence = self.confidence_head(trunk.probed.unwrap_or_else(|| state.clone()));
        (StateOutput { state, confidence }, trunk.cache)
    }

    /// The blocks over the embedded tokens.
    fn trunk(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Option<Tensor<2>>,
        positions: Tensor<2, Int>,
        mask: &AttentionMask,
        past: Option<&[LayerKv]>,
    ) -> Trunk {
        let c = confidence_input.map(|c| c.unsqueeze_dim::<3>(2)); // [B, T, 1]
        let mut x = self
            .dropout
            .forward(embed_at(&self.tok_emb, &self.pos_emb, ids, positions));
        let first_probed = self.blocks.len() - self.probe_blocks;
        let mut probed = Vec::with_capacity(self.probe_blocks);
        let mut cache = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (out, kv) = block.forward(x, c.clone(), mask, past.map(|p| &p[i]));
            x = out;
            cache.push(kv);
            if i >= first_probed {
                probed.push(x.clone());
            }
        }
        Trunk {
            state: x,
            // Detached: the confidence loss trains the probe only, never the trunk.
            probed: (!probed.is_empty()).then(|| Tensor::cat(probed, 2).detach()), // [B, T, k·d]
            cache,
        }
    }

    /// `[B, T, width] → [B, T]`, in f32 whatever the model's precision.
    fn confidence_head(&self, head_input: Tensor<3>) -> Tensor<2> {
        rows(&self.confidence_predictor, head_input, Precision::F32).squeeze_dim::<2>(2)
    }
}

/// What the blocks leave: the last block's output (before the final LayerNorm), the probed
/// blocks' outputs side by side if the head reads them, and every layer's keys and values.
struct Trunk {
    state: Tensor<3>,
    probed: Option<Tensor<3>>,
    cache: Vec<LayerKv>,
}
