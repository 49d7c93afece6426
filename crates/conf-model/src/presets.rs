//! Model shapes of the named presets (the experiment presets add steps, batch and schedule).

use crate::GptConfig;

/// A GPT shape without its vocabulary, which comes from the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub context_length: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
}

impl ModelShape {
    /// The confidence model's shape: MLP width 4d (the standard model's is then matched).
    pub fn gpt(&self, vocab_size: usize) -> GptConfig {
        GptConfig::new(
            vocab_size,
            self.context_length,
            self.d_model,
            self.n_layers,
            self.n_heads,
            4 * self.d_model,
        )
    }
}

pub const PRESET_NAMES: &str = "quick, seed, gpu";

pub fn model_shape(preset: &str) -> Option<ModelShape> {
    match preset {
        // Small enough that both models × 3 seeds train in under 5 minutes on 2 CPU cores.
        "quick" => Some(ModelShape {
            context_length: 64,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
        }),
        // The seed plan's run, on the benchmark shape of DESIGN §9.
        "seed" => Some(ModelShape {
            context_length: 128,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
        }),
        // GPT-2-small-like, for a real GPU.
        "gpu" => Some(ModelShape {
            context_length: 512,
            d_model: 768,
            n_layers: 12,
            n_heads: 12,
        }),
        _ => None,
    }
}
