//! ConfidenceAwareGPT: MiniGPT whose blocks are conditioned on a per-token confidence scalar
//! and which predicts, at each position, the loss it will incur two tokens ahead.

use burn::nn::{Dropout, DropoutConfig, Embedding, LayerNorm, Linear};
use burn::prelude::*;

use crate::attention::{AttentionMask, CausalSelfAttention};
use crate::layers::{AdaptiveLayer, Mlp};
use crate::mini_gpt::{embed, layer_norm, tied_logits};
use crate::{ConfHead, ConfidenceGptConfig, GptConfig, init};

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

    /// `x: [B, T, d]`, `c: [B, T, 1]`.
    pub fn forward(&self, x: Tensor<3>, c: Tensor<3>, mask: &AttentionMask) -> Tensor<3> {
        let attended = self
            .attn
            .forward(self.adapt1.forward(x.clone(), c.clone()), mask);
        let x = x + self.dropout.forward(attended);
        x.clone()
            + self
                .dropout
                .forward(self.mlp.forward(self.adapt2.forward(x, c)))
    }
}

/// Output of a ConfidenceAwareGPT forward pass.
#[derive(Debug, Clone)]
pub struct ConfidenceOutput {
    pub logits: Tensor<3>,     // [B, T, V]
    pub confidence: Tensor<2>, // [B, T], predicted loss at t+2 in nats
}

#[derive(Module, Debug)]
pub struct ConfidenceAwareGpt {
    pub tok_emb: Embedding,
    pub pos_emb: Embedding,
    pub dropout: Dropout,
    pub blocks: Vec<MetaAwareBlock>,
    pub ln_f: LayerNorm,
    pub confidence_predictor: Linear,
    /// Blocks the probe head reads; 0 means the seed head on the final normalised state.
    pub probe_blocks: usize,
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
        }
        .materialize()
    }

    pub fn conf_head(&self) -> ConfHead {
        if self.probe_blocks == 0 {
            ConfHead::Seed
        } else {
            ConfHead::Probe
        }
    }

    /// `ids: [B, T]`, `confidence_input: [B, T]` (the confidence history every block reads).
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        confidence_input: Tensor<2>,
        mask: &AttentionMask,
    ) -> ConfidenceOutput {
        let c = confidence_input.unsqueeze_dim::<3>(2); // [B, T, 1]
        let mut x = self
            .dropout
            .forward(embed(&self.tok_emb, &self.pos_emb, ids));
        let first_probed = self.blocks.len() - self.probe_blocks;
        let mut probed = Vec::with_capacity(self.probe_blocks);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, c.clone(), mask);
            if i >= first_probed {
                probed.push(x.clone());
            }
        }
        let h = self.ln_f.forward(x); // [B, T, d]
        let head_input = if probed.is_empty() {
            h.clone()
        } else {
            // Detached: the confidence loss trains the probe only, never the trunk.
            Tensor::cat(probed, 2).detach() // [B, T, k·d]
        };
        let confidence = self
            .confidence_predictor
            .forward(head_input)
            .squeeze_dim::<2>(2);
        ConfidenceOutput {
            logits: tied_logits(h, &self.tok_emb),
            confidence,
        }
    }
}
