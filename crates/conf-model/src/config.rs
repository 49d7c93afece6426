//! Model configurations, the closed-form parameter counts and parameter matching.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{ConfidenceAwareGpt, MiniGpt};

/// Shape of a pre-norm GPT.
#[derive(Config, Debug, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length L; the positional table has L + 1 rows because the lookahead pass places
    /// one token at position L.
    pub context_length: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub mlp_hidden: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// Which confidence predictor the ConfidenceAwareGPT carries (`--conf-head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfHead {
    /// `Linear(d → 1)` on the final normalised hidden state (the LM head's input, as in the
    /// seed plan's model); its loss trains the trunk too.
    Final,
    /// `Linear(k·d → 1)` on the detached outputs of the last `k = min(3, N)` blocks; its loss
    /// trains the head only.
    Probe,
}

impl ConfHead {
    pub const PROBE_DEPTH: usize = 3;

    /// Blocks the probe reads (0 for the seed head).
    pub fn probe_blocks(self, n_layers: usize) -> usize {
        match self {
            Self::Final => 0,
            Self::Probe => Self::PROBE_DEPTH.min(n_layers),
        }
    }

    /// Input width of the head.
    pub fn input_width(self, d_model: usize, n_layers: usize) -> usize {
        match self {
            Self::Final => d_model,
            Self::Probe => self.probe_blocks(n_layers) * d_model,
        }
    }
}

impl std::str::FromStr for ConfHead {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "final" => Ok(Self::Final),
            "probe" => Ok(Self::Probe),
            "seed" => Err(
                "--conf-head: 'seed' is now called 'final' (the head on the final state)".into(),
            ),
            other => Err(format!(
                "--conf-head: unknown head '{other}' (expected final or probe)"
            )),
        }
    }
}

#[derive(Config, Debug, PartialEq)]
pub struct ConfidenceGptConfig {
    pub gpt: GptConfig,
    #[config(default = "ConfHead::Final")]
    pub conf_head: ConfHead,
    /// Initial bias of the confidence head: its first predictions, in nats.
    #[config(default = 2.0)]
    pub confidence_init_bias: f64,
}

/// Invalid model shapes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelConfigError {
    #[error("d_model {d_model} is not divisible by n_heads {n_heads}")]
    HeadsDoNotDivide { d_model: usize, n_heads: usize },
    #[error("{field} must be at least 1, got 0")]
    Zero { field: &'static str },
}

impl GptConfig {
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("mlp_hidden", self.mlp_hidden),
        ] {
            if value == 0 {
                return Err(ModelConfigError::Zero { field });
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelConfigError::HeadsDoNotDivide {
                d_model: self.d_model,
                n_heads: self.n_heads,
            });
        }
        Ok(())
    }

    /// Parameters shared by both models: embeddings, attention, MLP and the final LayerNorm.
    fn shared_params(&self) -> usize {
        let (v, d, h, n) = (
            self.vocab_size,
            self.d_model,
            self.mlp_hidden,
            self.n_layers,
        );
        let embeddings = v * d + (self.context_length + 1) * d;
        let attention = 4 * (d * d + d);
        let mlp = d * h + h + h * d + d;
        embeddings + n * (attention + mlp) + 2 * d
    }

    /// Closed-form parameter count of [`MiniGpt`]: each block adds two affine LayerNorms (4d).
    pub fn minigpt_params(&self) -> usize {
        self.shared_params() + self.n_layers * 4 * self.d_model
    }

    pub fn init_minigpt(&self, device: &Device) -> MiniGpt {
        MiniGpt::new(self, device)
    }
}

impl ConfidenceGptConfig {
    /// Closed-form parameter count of [`ConfidenceAwareGpt`]: each block has two AdaptiveLayers
    /// (`Linear(1 → 2d)`, 4d each) instead of two LayerNorms, plus the confidence head.
    pub fn params(&self) -> usize {
        let g = &self.gpt;
        let head = self.conf_head.input_width(g.d_model, g.n_layers) + 1;
        g.shared_params() + g.n_layers * 8 * g.d_model + head
    }

    pub fn init(&self, device: &Device) -> ConfidenceAwareGpt {
        ConfidenceAwareGpt::new(self, device)
    }

    /// The MiniGPT whose MLP width brings its parameter count closest to this model's (a tie
    /// picks the smaller width).
    pub fn matched_standard(&self) -> ParameterMatch {
        let target = self.params();
        let mut gpt = self.gpt.clone();
        gpt.mlp_hidden = 1;
        let base = gpt.minigpt_params() - gpt.n_layers * (2 * gpt.d_model + 1);
        let per_unit = gpt.n_layers * (2 * gpt.d_model + 1);
        let estimate = target.saturating_sub(base) / per_unit;
        let best = [estimate, estimate + 1]
            .into_iter()
            .filter(|&h| h >= 1)
            .min_by_key(|&h| (base + h * per_unit).abs_diff(target))
            .unwrap_or(1);
        gpt.mlp_hidden = best;
        let standard = gpt.minigpt_params();
        ParameterMatch {
            standard: gpt,
            standard_params: standard,
            confidence_params: target,
            relative_gap: standard.abs_diff(target) as f64 / target as f64,
        }
    }
}

/// A parameter-matched standard model and the two counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParameterMatch {
    pub standard: GptConfig,
    pub standard_params: usize,
    pub confidence_params: usize,
    /// |standard − confidence| / confidence.
    pub relative_gap: f64,
}
