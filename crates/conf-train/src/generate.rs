//! Sampling text from a trained model, one token at a time; the confidence model also reports,
//! for each generated token, the loss it predicted (at that token's position) for two tokens
//! ahead.
//!
//! The next token is drawn on the host from the last position's logits: one row of V numbers,
//! where temperature and nucleus filtering are a sort and a sum. At temperature 1 without a
//! nucleus this is the inverse-CDF draw the training objectives make on the device.

use burn::prelude::*;
use burn::tensor::TensorData;
use conf_model::{AttentionMask, ConfidenceAwareGpt, MiniGpt};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::lookahead::{ConfInput, confidence_history};

/// How the next token is drawn from the model's distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 takes the most likely token (the first, on a tie).
    pub temperature: f64,
    /// Nucleus: draw only from the most likely tokens whose probabilities sum to at least this.
    pub top_p: f64,
}

impl Sampling {
    /// The model's own distribution.
    pub const PLAIN: Self = Self {
        temperature: 1.0,
        top_p: 1.0,
    };

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "--temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }

    /// The token drawn from `logits` at the uniform `u` in `[0, 1)`.
    pub fn draw(&self, logits: &[f32], u: f64) -> u32 {
        let argmax = || {
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature == 0.0 {
            return argmax();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut p: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / self.temperature).exp())
            .collect();
        if self.top_p < 1.0 {
            let total: f64 = p.iter().sum();
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let mut kept = 0.0;
            let mut cut = order.len();
            for (rank, &i) in order.iter().enumerate() {
                kept += p[i] / total;
                if kept >= self.top_p {
                    cut = rank + 1;
                    break;
                }
            }
            for &i in &order[cut..] {
                p[i] = 0.0;
            }
        }
        let total: f64 = p.iter().sum();
        let target = u * total;
        let mut cdf = 0.0;
        for (i, &pi) in p.iter().enumerate() {
            cdf += pi;
            if cdf > target && pi > 0.0 {
                return i as u32;
            }
        }
        // Rounding left the target at the very top: the last token that can be drawn.
        p.iter().rposition(|&pi| pi > 0.0).unwrap_or(0) as u32
    }
}

/// What a generation needs besides the prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    pub new_tokens: usize,
    /// The model sees at most the last `context` ids.
    pub context: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// The confidence model's input, as it was trained (ignored by MiniGPT).
    pub conf_input: ConfInput,
}

/// One generated token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// The confidence model's prediction, at this token, of its loss two tokens ahead.
    pub predicted_loss: Option<f32>,
}

/// Generated ids (prompt excluded) and, for the confidence model, its prediction at each.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub predicted_loss: Option<Vec<f32>>,
}

/// Sampling from a trained model.
pub trait Generate {
    /// Generates after `prompt`, calling `emit` with each token as soon as it is complete (for
    /// the confidence model, when its prediction is known: one pass later).
    fn generate_each(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        emit: &mut dyn FnMut(GeneratedToken),
    );

    /// Every token of [`Generate::generate_each`], collected.
    fn generate(&self, prompt: &[u32], options: &GenerateOptions) -> Generated {
        let mut tokens = Vec::with_capacity(options.new_tokens);
        let mut predicted = Vec::with_capacity(options.new_tokens);
        self.generate_each(prompt, options, &mut |token| {
            tokens.push(token.id);
            predicted.extend(token.predicted_loss);
        });
        Generated {
            tokens,
            predicted_loss: self.predicts().then_some(predicted),
        }
    }

    /// Whether the model predicts its future loss.
    fn predicts(&self) -> bool;
}

fn window(ids: &[u32], context: usize, device: &Device) -> Tensor<2, Int> {
    let start = ids.len().saturating_sub(context);
    let ids: Vec<i64> = ids[start..].iter().map(|&t| t as i64).collect();
    let len = ids.len();
    Tensor::from_data(TensorData::new(ids, [1, len]), device)
}

/// The last position's logits of `[1, T, V]`, on the host.
fn last_row(logits: Tensor<3>) -> Vec<f32> {
    let [b, t, v] = logits.dims();
    logits
        .slice([0..b, t - 1..t, 0..v])
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float logits")
}

impl Generate for MiniGpt {
    fn generate_each(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        emit: &mut dyn FnMut(GeneratedToken),
    ) {
        let device = self.devices()[0].clone();
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let mut ids = prompt.to_vec();
        for _ in 0..options.new_tokens {
            let logits = self.forward(
                window(&ids, options.context, &device),
                &AttentionMask::Causal,
            );
            let id = options
                .sampling
                .draw(&last_row(logits), f64::from(rng.random::<f32>()));
            ids.push(id);
            emit(GeneratedToken {
                id,
                predicted_loss: None,
            });
        }
    }

    fn predicts(&self) -> bool {
        false
    }
}

/// The confidence model conditions on its confidence input as in training; one pass per
/// step: its last position's prediction belongs to the token generated the step before, and
/// its logits give the next token.
impl Generate for ConfidenceAwareGpt {
    fn generate_each(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        emit: &mut dyn FnMut(GeneratedToken),
    ) {
        let device = self.devices()[0].clone();
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let mut ids = prompt.to_vec();
        let mut pending = None;
        for step in 0..=options.new_tokens {
            let x = window(&ids, options.context, &device);
            let history = confidence_history(self, &x, options.conf_input);
            let out = self.forward(x, history, &AttentionMask::Causal);
            if let Some(id) = pending.take() {
                let [_, t] = out.confidence.dims();
                let predicted = out.confidence.slice([0..1, t - 1..t]).into_scalar::<f32>();
                emit(GeneratedToken {
                    id,
                    predicted_loss: Some(predicted),
                });
            }
            if step < options.new_tokens {
                let id = options
                    .sampling
                    .draw(&last_row(out.logits), f64::from(rng.random::<f32>()));
                ids.push(id);
                pending = Some(id);
            }
        }
    }

    fn predicts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conf_model::{ConfidenceGptConfig, GptConfig};

    fn options(new_tokens: usize, sampling: Sampling, seed: u64) -> GenerateOptions {
        GenerateOptions {
            new_tokens,
            context: 8,
            sampling,
            seed,
            conf_input: ConfInput::SelfConditioned,
        }
    }

    #[test]
    fn generation_is_seeded_in_range_and_reports_one_prediction_per_token() {
        let device = Device::flex();
        let gpt = GptConfig::new(9, 8, 16, 1, 2, 32);
        let standard = gpt.init_minigpt(&device);
        let a = standard.generate(&[1, 2, 3], &options(12, Sampling::PLAIN, 5));
        assert_eq!(
            a,
            standard.generate(&[1, 2, 3], &options(12, Sampling::PLAIN, 5))
        );
        assert_ne!(
            a,
            standard.generate(&[1, 2, 3], &options(12, Sampling::PLAIN, 6))
        );
        assert_eq!(a.tokens.len(), 12);
        assert!(a.tokens.iter().all(|&t| t < 9));
        assert_eq!(a.predicted_loss, None);
        let conf = ConfidenceGptConfig::new(gpt).init(&device);
        let b = conf.generate(&[1, 2, 3], &options(12, Sampling::PLAIN, 5));
        assert_eq!(b.predicted_loss.as_ref().unwrap().len(), 12);
        // A fresh head predicts about its initial bias of 2 nats.
        assert!(
            b.predicted_loss
                .unwrap()
                .iter()
                .all(|p| (p - 2.0).abs() < 0.5)
        );
    }

    #[test]
    fn temperature_zero_is_greedy_whatever_the_seed() {
        let device = Device::flex();
        let gpt = GptConfig::new(9, 8, 16, 1, 2, 32);
        device.seed(3);
        let model = gpt.init_minigpt(&device);
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
        };
        let a = model.generate(&[1, 2], &options(10, greedy, 1));
        assert_eq!(a, model.generate(&[1, 2], &options(10, greedy, 99)));
        // Each token is the argmax of the model's logits after the ids before it.
        let mut ids = vec![1, 2];
        for &token in &a.tokens {
            let logits = last_row(model.forward(window(&ids, 8, &device), &AttentionMask::Causal));
            let best = (0..logits.len())
                .max_by(|&x, &y| logits[x].total_cmp(&logits[y]).then(y.cmp(&x)))
                .unwrap();
            assert_eq!(token as usize, best);
            ids.push(token);
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2 (and ~0 for the fourth).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), -60.0];
        let plain = Sampling::PLAIN;
        assert_eq!(plain.draw(&logits, 0.0), 0);
        assert_eq!(plain.draw(&logits, 0.49), 0);
        assert_eq!(plain.draw(&logits, 0.51), 1);
        assert_eq!(plain.draw(&logits, 0.79), 1);
        assert_eq!(plain.draw(&logits, 0.81), 2);
        assert_eq!(plain.draw(&logits, 0.999_999_999), 2);
        // top-p 0.7 keeps {0, 1} (0.5 + 0.3 ≥ 0.7), renormalised to 5/8 and 3/8.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.7,
        };
        assert_eq!(nucleus.draw(&logits, 0.62), 0);
        assert_eq!(nucleus.draw(&logits, 0.63), 1);
        assert_eq!(nucleus.draw(&logits, 0.999), 1);
        // A low temperature sharpens: at T = 0.1, 0.5^10 / (0.5^10 + 0.3^10 + …) ≈ 0.994.
        let cold = Sampling {
            temperature: 0.1,
            top_p: 1.0,
        };
        assert_eq!(cold.draw(&logits, 0.99), 0);
        assert_eq!(cold.draw(&logits, 0.995), 1);
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
        };
        assert_eq!(greedy.draw(&logits, 0.999), 0);
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let bad = |temperature, top_p| Sampling { temperature, top_p }.validate().unwrap_err();
        assert!(bad(-1.0, 1.0).contains("--temperature"));
        assert!(bad(f64::NAN, 1.0).contains("--temperature"));
        assert!(bad(1.0, 0.0).contains("--top-p"));
        assert!(bad(1.0, 1.5).contains("--top-p"));
    }
}
