//! Cost accounting in model FLOPs (DESIGN §9): what a training step of each objective costs,
//! for the FLOP figures of results and benchmarks.

use conf_model::GptConfig;

/// Training FLOPs per token of a model with `parameters` parameters and `gpt`'s shape: 6N for
/// the trained pass plus 12·n_layers·L·d for its attention, and 2N + 4·n_layers·L·d for each
/// extra no-gradient forward pass over L tokens (see `Objective::extra_forward_passes`).
pub fn flops_per_token(parameters: usize, gpt: &GptConfig, extra_forward_passes: f64) -> f64 {
    let n = parameters as f64;
    let attention = (gpt.n_layers * gpt.context_length * gpt.d_model) as f64;
    6.0 * n + 12.0 * attention + extra_forward_passes * (2.0 * n + 4.0 * attention)
}
