//! Sampling text from a trained model; the confidence model also reports, for each generated
//! token, the loss it predicted (at that token's position) for two tokens ahead.

use burn::prelude::*;
use burn::tensor::TensorData;
use conf_model::{AttentionMask, ConfidenceAwareGpt, MiniGpt};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::lookahead::{ConfInput, confidence_history};
use crate::objective::sample_tokens;

/// Generated ids (prompt excluded) and, for the confidence model, its prediction at each.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub predicted_loss: Option<Vec<f32>>,
}

fn window(ids: &[u32], context: usize, device: &Device) -> Tensor<2, Int> {
    let start = ids.len().saturating_sub(context);
    let ids: Vec<i64> = ids[start..].iter().map(|&t| t as i64).collect();
    let len = ids.len();
    Tensor::from_data(TensorData::new(ids, [1, len]), device)
}

fn last(logits: Tensor<3>) -> Tensor<3> {
    let [b, t, v] = logits.dims();
    logits.slice([0..b, t - 1..t, 0..v])
}

fn uniform(rng: &mut ChaCha8Rng, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(vec![rng.random::<f32>()], [1, 1]), device)
}

/// Sampling from a trained model.
pub trait Generate {
    /// `n` tokens after `prompt` at temperature 1, seeded; the context is the last `context`
    /// ids.
    fn generate(&self, prompt: &[u32], n: usize, context: usize, seed: u64) -> Generated;
}

impl Generate for MiniGpt {
    fn generate(&self, prompt: &[u32], n: usize, context: usize, seed: u64) -> Generated {
        generate_standard(self, prompt, n, context, seed)
    }
}

/// The confidence model conditions on its own confidence history as in training, and records
/// the prediction made at each generated token.
impl Generate for ConfidenceAwareGpt {
    fn generate(&self, prompt: &[u32], n: usize, context: usize, seed: u64) -> Generated {
        generate_confidence(self, prompt, n, context, seed)
    }
}

fn generate_standard(
    model: &MiniGpt,
    prompt: &[u32],
    n: usize,
    context: usize,
    seed: u64,
) -> Generated {
    let device = model.devices()[0].clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let logits = model.forward(window(&ids, context, &device), &AttentionMask::Causal);
        let next = sample_tokens(last(logits), uniform(&mut rng, &device));
        ids.push(next.into_scalar::<i64>() as u32);
    }
    Generated {
        tokens: ids[prompt.len()..].to_vec(),
        predicted_loss: None,
    }
}

fn generate_confidence(
    model: &ConfidenceAwareGpt,
    prompt: &[u32],
    n: usize,
    context: usize,
    seed: u64,
) -> Generated {
    let device = model.devices()[0].clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = prompt.to_vec();
    let mut predicted = Vec::with_capacity(n);
    // One pass per step: its last position's prediction belongs to the token generated the
    // step before, and its logits give the next token.
    for step in 0..=n {
        let x = window(&ids, context, &device);
        let history = confidence_history(model, &x, ConfInput::SelfConditioned);
        let out = model.forward(x, history, &AttentionMask::Causal);
        if step > 0 {
            let [_, t] = out.confidence.dims();
            predicted.push(out.confidence.slice([0..1, t - 1..t]).into_scalar::<f32>());
        }
        if step < n {
            let next = sample_tokens(last(out.logits), uniform(&mut rng, &device));
            ids.push(next.into_scalar::<i64>() as u32);
        }
    }
    Generated {
        tokens: ids[prompt.len()..].to_vec(),
        predicted_loss: Some(predicted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conf_model::{ConfidenceGptConfig, GptConfig};

    #[test]
    fn generation_is_seeded_in_range_and_reports_one_prediction_per_token() {
        let device = Device::flex();
        let gpt = GptConfig::new(9, 8, 16, 1, 2, 32);
        let standard = gpt.init_minigpt(&device);
        let a = standard.generate(&[1, 2, 3], 12, 8, 5);
        assert_eq!(a, standard.generate(&[1, 2, 3], 12, 8, 5));
        assert_eq!(a.tokens.len(), 12);
        assert!(a.tokens.iter().all(|&t| t < 9));
        let conf = ConfidenceGptConfig::new(gpt).init(&device);
        let b = conf.generate(&[1, 2, 3], 12, 8, 5);
        assert_eq!(b.predicted_loss.as_ref().unwrap().len(), 12);
        // A fresh head predicts about its initial bias of 2 nats.
        assert!(
            b.predicted_loss
                .unwrap()
                .iter()
                .all(|p| (p - 2.0).abs() < 0.5)
        );
    }
}
