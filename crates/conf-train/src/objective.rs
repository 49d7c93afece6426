//! Training objectives: one trait, four implementations (`--objective`).
//!
//! Every objective reads a batch of `L + 2` token windows: `x = w[0..L]`, `y1 = w[1..L+1]`,
//! `y2 = w[2..L+2]`. Only pass 1 builds an autodiff graph; the history pass and pass 2 run on
//! `model.valid()` with inputs without autodiff.

use burn::prelude::*;
pub use conf_model::fused::{TokenStats, sample_tokens, token_cross_entropy, token_stats};
use conf_model::{ConfidenceAwareGpt, MiniGpt};

use crate::batch::LookaheadBatch;
use crate::lookahead::{ConfInput, confidence_history, dense_pass2, seed_pass2};
use crate::metrics::MetricKind;

/// The self-prediction against what happened, without autodiff, `[B, K]` each.
#[derive(Debug, Clone)]
pub struct LookaheadStats {
    /// Predicted future loss.
    pub predicted: Tensor<2>,
    /// Actual future loss (the confidence target).
    pub actual: Tensor<2>,
    /// The zero-cost baseline: pass 1's entropy at the position of the prediction.
    pub entropy: Tensor<2>,
}

/// What one objective step produces.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    /// `lm + alpha · conf`, the loss to differentiate. `[1]`
    pub total: Tensor<1>,
    /// The LM loss the objective trains. `[1]`
    pub lm_loss: Tensor<1>,
    /// MSE of the confidence prediction. `[1]`
    pub conf_loss: Option<Tensor<1>>,
    /// Pass 1 at all L positions (LM metrics always cover them all).
    pub tokens: TokenStats,
    pub lookahead: Option<LookaheadStats>,
}

/// A training objective for model type `M`.
pub trait Objective<M>: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Losses and statistics for a batch of windows.
    fn compute(&self, model: &M, batch: LookaheadBatch) -> ObjectiveOutput;
    /// The metrics its outputs define.
    fn metrics(&self) -> &'static [MetricKind];
    /// No-gradient forward passes over `seq_len` tokens it adds to the trained pass, for the
    /// cost accounting of [`crate::cost`].
    fn extra_forward_passes(&self, seq_len: usize) -> f64;
}

impl<M, T: Objective<M> + ?Sized> Objective<M> for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn compute(&self, model: &M, batch: LookaheadBatch) -> ObjectiveOutput {
        (**self).compute(model, batch)
    }

    fn metrics(&self) -> &'static [MetricKind] {
        (**self).metrics()
    }

    fn extra_forward_passes(&self, seq_len: usize) -> f64 {
        (**self).extra_forward_passes(seq_len)
    }
}

/// The objective names accepted by `--objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    Standard,
    Seed,
    Dense,
    Teacher,
}

impl ObjectiveKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Seed => "seed",
            Self::Dense => "dense",
            Self::Teacher => "teacher",
        }
    }
}

impl std::str::FromStr for ObjectiveKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(Self::Standard),
            "seed" => Ok(Self::Seed),
            "dense" => Ok(Self::Dense),
            "teacher" => Ok(Self::Teacher),
            other => Err(format!(
                "--objective: unknown objective '{other}' (expected standard, seed, dense or teacher)"
            )),
        }
    }
}

/// The three slices of a window batch.
pub struct WindowParts {
    pub x: Tensor<2, Int>,  // [B, L]
    pub y1: Tensor<2, Int>, // [B, L]
    pub y2: Tensor<2, Int>, // [B, L]
}

impl WindowParts {
    pub fn new(tokens: Tensor<2, Int>) -> Self {
        let [batch, len] = tokens.dims();
        let seq = len - 2;
        Self {
            x: tokens.clone().slice([0..batch, 0..seq]),
            y1: tokens.clone().slice([0..batch, 1..seq + 1]),
            y2: tokens.slice([0..batch, 2..seq + 2]),
        }
    }
}

/// Mean next-token cross-entropy: the LM loss of every objective. `[1]`
pub fn lm_loss(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    token_cross_entropy(logits, targets).mean()
}

fn mse(predicted: Tensor<2>, target: Tensor<2>) -> Tensor<1> {
    (predicted - target).powi_scalar(2).mean()
}

/// `standard`: mean next-token cross-entropy over all L positions (MiniGPT), on the first
/// `L + 1` tokens of the window.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardObjective;

impl Objective<MiniGpt> for StandardObjective {
    fn name(&self) -> &'static str {
        "standard"
    }

    fn metrics(&self) -> &'static [MetricKind] {
        &MetricKind::STANDARD
    }

    fn extra_forward_passes(&self, _seq_len: usize) -> f64 {
        0.0
    }

    fn compute(&self, model: &MiniGpt, batch: LookaheadBatch) -> ObjectiveOutput {
        let parts = WindowParts::new(batch.tokens);
        let logits = model.forward(parts.x, &conf_model::AttentionMask::Causal);
        let loss = lm_loss(logits.clone(), parts.y1.clone());
        ObjectiveOutput {
            total: loss.clone(),
            lm_loss: loss,
            conf_loss: None,
            tokens: token_stats(logits, parts.y1),
            lookahead: None,
        }
    }
}

/// Settings shared by the confidence objectives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceSettings {
    pub alpha: f64,
    pub conf_input: ConfInput,
}

impl ConfidenceSettings {
    /// Forward passes over L tokens the confidence history costs.
    fn history_passes(&self) -> f64 {
        match self.conf_input {
            ConfInput::SelfConditioned => 1.0,
            ConfInput::Zeros => 0.0,
        }
    }
}

/// `seed`: the seed's two-pass step, exactly. LM loss and confidence at the last position; a
/// sample of the next token; pass 2 on `[tokens_t, s]` with the history extended by the last
/// prediction; its last logits scored against the real `t+2`.
#[derive(Debug, Clone, Copy)]
pub struct SeedObjective(pub ConfidenceSettings);

impl Objective<ConfidenceAwareGpt> for SeedObjective {
    fn name(&self) -> &'static str {
        "seed"
    }

    fn metrics(&self) -> &'static [MetricKind] {
        &MetricKind::ALL
    }

    /// The history, and one token per row for pass 2 (pass 1's keys and values reused).
    fn extra_forward_passes(&self, seq_len: usize) -> f64 {
        self.0.history_passes() + 1.0 / seq_len as f64
    }

    fn compute(&self, model: &ConfidenceAwareGpt, input: LookaheadBatch) -> ObjectiveOutput {
        let WindowParts { x, y1, y2 } = WindowParts::new(input.tokens);
        let [batch, seq] = x.dims();
        let history = confidence_history(model, &x, self.0.conf_input);
        let (out, cache) = model.forward_cached_state(x, history);
        let width = out.state.dims()[2];
        let last = |t: Tensor<2, Int>| t.slice([0..batch, seq - 1..seq]);
        // The LM loss reads the last position only: its logits apart, so that the LM head's
        // backward covers B rows instead of B·L rows of zero gradient but for them.
        let last_state = out.state.clone().slice([0..batch, seq - 1..seq, 0..width]);
        let last_logits = model.lm_head(last_state); // [B, 1, V]
        let lm = lm_loss(last_logits.clone(), last(y1.clone()));
        let conf_last = out.confidence.clone().slice([0..batch, seq - 1..seq]); // [B, 1]

        let sample = sample_tokens(last_logits, input.uniforms.slice([0..batch, seq - 1..seq]));
        let cache: Vec<_> = cache.into_iter().map(|kv| kv.without_autodiff()).collect();
        let inference = model.valid();
        let future_logits = seed_pass2(
            &inference,
            &cache,
            sample,
            conf_last.clone().without_autodiff(),
        );
        let future = token_cross_entropy(future_logits, last(y2).without_autodiff()); // [B, 1]
        let conf_loss = mse(conf_last.clone(), future.clone());
        // Every position's logits for the statistics, outside the graph: no loss reads them.
        let tokens = token_stats(inference.lm_head(out.state.without_autodiff()), y1);
        let entropy = tokens.entropy.clone().slice([0..batch, seq - 1..seq]);
        confidence_output(
            self.0.alpha,
            lm,
            conf_loss,
            tokens,
            conf_last,
            future,
            entropy,
        )
    }
}

/// `dense`: the lookahead at every position in one extra pass. Sample `s_k` sits at position
/// k + 1, reads confidence `conf[:, k]`, attends to `x_0..x_k` and itself, and is scored
/// against the real `w[k + 2]`. LM and confidence losses over all L positions.
#[derive(Debug, Clone, Copy)]
pub struct DenseObjective(pub ConfidenceSettings);

impl Objective<ConfidenceAwareGpt> for DenseObjective {
    fn name(&self) -> &'static str {
        "dense"
    }

    fn metrics(&self) -> &'static [MetricKind] {
        &MetricKind::ALL
    }

    /// The history, and L sampled tokens attending to the reused prefix for pass 2.
    fn extra_forward_passes(&self, _seq_len: usize) -> f64 {
        self.0.history_passes() + 1.0
    }

    fn compute(&self, model: &ConfidenceAwareGpt, input: LookaheadBatch) -> ObjectiveOutput {
        let WindowParts { x, y1, y2 } = WindowParts::new(input.tokens);
        let history = confidence_history(model, &x, self.0.conf_input);
        let (out, cache) = model.forward_cached(x, history);
        let lm = lm_loss(out.logits.clone(), y1.clone());

        let samples = sample_tokens(out.logits.clone(), input.uniforms);
        let cache: Vec<_> = cache.into_iter().map(|kv| kv.without_autodiff()).collect();
        let future_logits = dense_pass2(
            &model.valid(),
            &cache,
            samples,
            out.confidence.clone().without_autodiff(),
        );
        let future = token_cross_entropy(future_logits, y2.without_autodiff()); // [B, L]
        let conf_loss = mse(out.confidence.clone(), future.clone());
        let tokens = token_stats(out.logits, y1);
        let entropy = tokens.entropy.clone();
        confidence_output(
            self.0.alpha,
            lm,
            conf_loss,
            tokens,
            out.confidence,
            future,
            entropy,
        )
    }
}

/// `teacher`: the cheap control. The confidence target at k is pass 1's own loss at k + 1 (the
/// real next token instead of a sampled one); no pass 2. Pass 1 runs on `L + 1` tokens so that
/// k = L − 1 has a target (scored against `w[L + 1]`); the LM loss covers the first L positions.
#[derive(Debug, Clone, Copy)]
pub struct TeacherObjective(pub ConfidenceSettings);

impl Objective<ConfidenceAwareGpt> for TeacherObjective {
    fn name(&self) -> &'static str {
        "teacher"
    }

    fn metrics(&self) -> &'static [MetricKind] {
        &MetricKind::ALL
    }

    /// The history only: the targets come from pass 1 itself.
    fn extra_forward_passes(&self, _seq_len: usize) -> f64 {
        self.0.history_passes()
    }

    fn compute(&self, model: &ConfidenceAwareGpt, input: LookaheadBatch) -> ObjectiveOutput {
        let tokens = input.tokens;
        let [batch, len] = tokens.dims();
        let seq = len - 2;
        let x = tokens.clone().slice([0..batch, 0..seq + 1]);
        let targets = tokens.slice([0..batch, 1..seq + 2]); // [B, L + 1]
        let history = confidence_history(model, &x, self.0.conf_input);
        let out = model.forward(x, history, &conf_model::AttentionMask::Causal);
        // Pass 1's own loss at every one of the L + 1 positions, once: the LM loss averages the
        // first L (only they get a gradient), and the target at k is the loss at k + 1. The
        // logits are read whole: slices of them would be copied, by the loss and by its
        // gradient.
        let all_losses = token_cross_entropy(out.logits.clone(), targets.clone()); // [B, L + 1]
        let lm = all_losses.clone().slice([0..batch, 0..seq]).mean();
        let future = all_losses.without_autodiff().slice([0..batch, 1..seq + 1]);
        let predicted = out.confidence.slice([0..batch, 0..seq]);
        let conf_loss = mse(predicted.clone(), future.clone());
        let tokens = token_stats(out.logits, targets).first_positions(seq);
        let entropy = tokens.entropy.clone();
        confidence_output(
            self.0.alpha,
            lm,
            conf_loss,
            tokens,
            predicted,
            future,
            entropy,
        )
    }
}

impl ObjectiveOutput {
    /// The same values, detached from any graph, for the metrics thread.
    pub fn without_autodiff(self) -> Self {
        Self {
            total: self.total.without_autodiff(),
            lm_loss: self.lm_loss.without_autodiff(),
            conf_loss: self.conf_loss.map(Tensor::without_autodiff),
            ..self
        }
    }
}

/// The output of a confidence objective: `total = lm + alpha · conf`.
fn confidence_output(
    alpha: f64,
    lm: Tensor<1>,
    conf_loss: Tensor<1>,
    tokens: TokenStats,
    predicted: Tensor<2>,
    actual: Tensor<2>,
    entropy: Tensor<2>,
) -> ObjectiveOutput {
    ObjectiveOutput {
        total: lm.clone() + conf_loss.clone() * alpha,
        lm_loss: lm,
        conf_loss: Some(conf_loss),
        tokens,
        lookahead: Some(LookaheadStats {
            predicted: predicted.without_autodiff(),
            actual: actual.without_autodiff(),
            entropy,
        }),
    }
}
