//! The no-gradient passes of the lookahead step: the confidence history and pass 2, whose fast
//! paths reuse pass 1's keys and values (the plain reference paths they equal live in the
//! tests, `tests/objectives.rs`).

use burn::prelude::*;
use conf_model::{AttentionMask, ConfidenceAwareGpt, LayerKv, positions};
use serde::{Deserialize, Serialize};

/// The confidence input of pass 1 (`--conf-input`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfInput {
    /// Position i receives the model's own prediction made at i − 1 (`c_0 = 0`), from a
    /// no-gradient pass with zero confidence.
    #[serde(rename = "self")]
    SelfConditioned,
    /// Zeros everywhere.
    #[serde(rename = "zeros")]
    Zeros,
}

impl std::str::FromStr for ConfInput {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "self" => Ok(Self::SelfConditioned),
            "zeros" => Ok(Self::Zeros),
            other => Err(format!(
                "--conf-input: unknown mode '{other}' (expected self or zeros)"
            )),
        }
    }
}

/// The confidence history for `x: [B, T]`, without autodiff: `[B, T]`.
pub fn confidence_history(
    model: &ConfidenceAwareGpt,
    x: &Tensor<2, Int>,
    mode: ConfInput,
) -> Tensor<2> {
    let x = x.clone().without_autodiff();
    let [batch, seq] = x.dims();
    let zeros = Tensor::<2>::zeros([batch, seq], &x.device());
    match mode {
        ConfInput::Zeros => zeros,
        ConfInput::SelfConditioned if seq > 1 => {
            // Shift right by one: position i reads the prediction made at i − 1, so the pass
            // needs the first seq − 1 positions (causal: the others change nothing).
            let run = history_tokens(seq);
            let predictions = model
                .valid()
                .predict_confidence(x.slice([0..batch, 0..run]), None);
            Tensor::cat(
                vec![
                    zeros.slice([0..batch, 0..1]),
                    predictions.slice([0..batch, 0..seq - 1]),
                ],
                1,
            )
        }
        ConfInput::SelfConditioned => zeros,
    }
}

/// Tokens the history pass runs over for a window of `seq` tokens: the `seq − 1` it needs,
/// rounded up to a multiple of 16 where the window is that long. libtorch's CPU attention
/// takes 1.5–1.7× as long over 63 or 127 tokens as over 64 or 128
/// (docs/performance.md); one more token costs ~1/seq of the pass.
pub fn history_tokens(seq: usize) -> usize {
    seq.saturating_sub(1).next_multiple_of(16).min(seq)
}

/// Pass 2 of `dense`, fast path: sample `s_k` at position k + 1 with confidence `conf[:, k]`
/// attends to pass 1's cached keys/values of `x_0..x_k` and to itself. `[B, L, V]` logits.
pub fn dense_pass2(
    valid: &ConfidenceAwareGpt,
    cache: &[LayerKv],
    samples: Tensor<2, Int>,
    conf: Tensor<2>,
) -> Tensor<3> {
    let pos = positions(&samples, 1);
    valid
        .extend(samples, conf, pos, cache, &AttentionMask::PrefixAndSelf)
        .logits
}

/// Pass 2 of `seed`, fast path: one sampled token per row at position L, attending to all of
/// pass 1's cached keys/values and itself. `[B, 1, V]` logits.
pub fn seed_pass2(
    valid: &ConfidenceAwareGpt,
    cache: &[LayerKv],
    sample: Tensor<2, Int>,
    conf: Tensor<2>,
) -> Tensor<3> {
    let seq = cache[0].key.dims()[2];
    let pos = positions(&sample, seq);
    valid
        .extend(sample, conf, pos, cache, &AttentionMask::CacheAndSelf)
        .logits
}
