//! The dashboard's metrics as burn-train metrics. Each reads the step summary; the definitions
//! are those of [`crate::calibration`], so dashboard, results and report agree.

use std::sync::Arc;

use burn::tensor::TensorReadError;
use burn::train::metric::state::NumericMetricState;
use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry,
    SerializedEntry,
};

use crate::calibration::{self, MetricResult};
use crate::step::StepSummary;

/// Which quantity a [`LookaheadMetric`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Mean next-token cross-entropy over all L pass-1 positions (nats).
    LmLoss,
    /// `exp` of the epoch's mean LM loss.
    Perplexity,
    /// Top-1 accuracy over all L positions.
    Accuracy,
    /// Token ECE, 15 equal-width bins.
    TokenEce,
    /// The loss the optimizer sees: `lm + alpha · conf`.
    TotalLoss,
    /// MSE of the confidence prediction (the trained confidence loss).
    ConfidenceLoss,
    ConfidenceMae,
    LossEce,
    Pearson,
    Spearman,
    Auroc,
    EntropySpearman,
    EntropyAuroc,
}

impl MetricKind {
    pub const STANDARD: [MetricKind; 5] = [
        Self::LmLoss,
        Self::Perplexity,
        Self::Accuracy,
        Self::TokenEce,
        Self::TotalLoss,
    ];
    pub const CONFIDENCE: [MetricKind; 8] = [
        Self::ConfidenceLoss,
        Self::ConfidenceMae,
        Self::LossEce,
        Self::Pearson,
        Self::Spearman,
        Self::Auroc,
        Self::EntropySpearman,
        Self::EntropyAuroc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::LmLoss => "LM Loss",
            Self::Perplexity => "Perplexity",
            Self::Accuracy => "Accuracy",
            Self::TokenEce => "Token ECE",
            Self::TotalLoss => "Total Loss",
            Self::ConfidenceLoss => "Confidence MSE",
            Self::ConfidenceMae => "Confidence MAE",
            Self::LossEce => "Loss ECE",
            Self::Pearson => "Confidence Pearson",
            Self::Spearman => "Confidence Spearman",
            Self::Auroc => "Confidence AUROC",
            Self::EntropySpearman => "Entropy Spearman",
            Self::EntropyAuroc => "Entropy AUROC",
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Self::Accuracy
                | Self::Pearson
                | Self::Spearman
                | Self::Auroc
                | Self::EntropySpearman
                | Self::EntropyAuroc
        )
    }

    /// Means over tokens aggregate exactly from per-batch means; the rest need every sample.
    fn is_mean(self) -> bool {
        matches!(
            self,
            Self::LmLoss | Self::Perplexity | Self::Accuracy | Self::TotalLoss
        )
    }

    /// The metric over a set of samples.
    pub fn evaluate(self, s: &Samples) -> MetricResult {
        use calibration::*;
        let (p, a, e) = (&s.predicted[..], &s.actual[..], &s.entropy[..]);
        match self {
            Self::LmLoss => mean(&s.token_loss),
            Self::Perplexity => mean(&s.token_loss).map(f64::exp),
            Self::Accuracy => mean(&s.correct),
            Self::TokenEce => token_ece(&s.max_prob, &s.correct),
            Self::TotalLoss => mean(&s.total),
            Self::ConfidenceLoss => mse(p, a),
            Self::ConfidenceMae => mae(p, a),
            Self::LossEce => loss_calibration(p, a).0,
            Self::Pearson => pearson(p, a),
            Self::Spearman => spearman(p, a),
            Self::Auroc => auroc_above_median(p, a),
            Self::EntropySpearman => spearman(e, a),
            Self::EntropyAuroc => auroc_above_median(e, a),
        }
    }
}

fn mean(values: &[f32]) -> MetricResult {
    if values.is_empty() {
        return Err(calibration::Undefined("no samples"));
    }
    Ok(values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64)
}

/// Samples gathered over an epoch (or one batch).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub token_loss: Vec<f32>,
    pub max_prob: Vec<f32>,
    pub correct: Vec<f32>,
    /// One entry per step, weighted like a token mean would not be: the optimizer's loss.
    pub total: Vec<f32>,
    pub predicted: Vec<f32>,
    pub actual: Vec<f32>,
    pub entropy: Vec<f32>,
}

impl Samples {
    pub fn push(&mut self, s: &StepSummary) {
        self.token_loss.extend(&s.token_loss);
        self.max_prob.extend(&s.max_prob);
        self.correct.extend(&s.correct);
        self.total.push(s.total as f32);
        self.predicted.extend(&s.predicted);
        self.actual.extend(&s.actual);
        self.entropy.extend(&s.entropy);
    }

    pub fn of(s: &StepSummary) -> Self {
        let mut samples = Self::default();
        samples.push(s);
        samples
    }
}

/// One metric of [`MetricKind`] for the dashboard. Token means aggregate per batch; the
/// calibration and ranking metrics keep every sample of the epoch and compute the final value
/// over all of them at the epoch's end.
#[derive(Clone)]
pub struct LookaheadMetric {
    kind: MetricKind,
    name: MetricName,
    mean: NumericMetricState,
    samples: Samples,
    last: Option<f64>,
}

impl LookaheadMetric {
    pub fn new(kind: MetricKind) -> Self {
        Self {
            kind,
            name: Arc::new(kind.name().to_string()),
            mean: NumericMetricState::new(),
            samples: Samples::default(),
            last: None,
        }
    }

    fn epoch_value(&self) -> Option<f64> {
        if self.kind == MetricKind::Perplexity {
            return self.mean.final_value_opt().map(f64::exp);
        }
        self.kind.evaluate(&self.samples).ok()
    }

    fn entry(&self, batch: Option<f64>, epoch: Option<f64>, final_entry: bool) -> SerializedEntry {
        let show = |v: Option<f64>| v.map_or("N/A".to_string(), |v| format!("{v:.4}"));
        let formatted = format!("epoch {} - batch {}", show(epoch), show(batch));
        let serialized = match (final_entry, epoch, batch) {
            (true, Some(v), _) => NumericEntry::Final(v).serialize(),
            (false, _, Some(v)) => NumericEntry::Value(v).serialize(),
            _ => SerializedEntry::NOT_AVAILABLE.to_string(),
        };
        SerializedEntry::new(formatted, serialized)
    }
}

/// `NumericMetricState` reports its mean as NaN before any update; this keeps that out.
trait FinalValue {
    fn final_value_opt(&self) -> Option<f64>;
}

impl FinalValue for NumericMetricState {
    fn final_value_opt(&self) -> Option<f64> {
        Some(self.final_value().current()).filter(|v| v.is_finite())
    }
}

impl Metric for LookaheadMetric {
    type Input = Arc<StepSummary>;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: self.kind.higher_is_better(),
        }
        .into()
    }

    fn update(
        &mut self,
        item: &Arc<StepSummary>,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let batch = Samples::of(item);
        let value = self.kind.evaluate(&batch).ok();
        self.last = value;
        if self.kind.is_mean() {
            let (mean_kind, count) = match self.kind {
                MetricKind::TotalLoss => (MetricKind::TotalLoss, 1),
                MetricKind::Accuracy => (MetricKind::Accuracy, item.correct.len()),
                _ => (MetricKind::LmLoss, item.token_loss.len()),
            };
            if let Ok(v) = mean_kind.evaluate(&batch) {
                self.mean.update(v, count);
            }
            let epoch = match self.kind {
                MetricKind::Perplexity => self.mean.final_value_opt().map(f64::exp),
                _ => self.mean.final_value_opt(),
            };
            return Ok(self.entry(value, epoch, false));
        }
        self.samples.push(item);
        Ok(self.entry(value, None, false))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        let epoch = if self.kind.is_mean() && self.kind != MetricKind::Perplexity {
            self.mean.final_value_opt()
        } else {
            self.epoch_value()
        };
        Ok(self.entry(self.last, epoch, true))
    }

    fn clear(&mut self) {
        self.mean.reset();
        self.samples = Samples::default();
        self.last = None;
    }
}

impl Numeric for LookaheadMetric {
    fn value(&self) -> Option<NumericEntry> {
        self.last.map(NumericEntry::Value)
    }

    fn running_value(&self) -> Option<NumericEntry> {
        if self.kind.is_mean() {
            let v = self.mean.final_value_opt()?;
            let v = if self.kind == MetricKind::Perplexity {
                v.exp()
            } else {
                v
            };
            return Some(NumericEntry::Value(v));
        }
        None
    }

    fn final_value(&self) -> NumericEntry {
        let v = if self.kind.is_mean() && self.kind != MetricKind::Perplexity {
            self.mean.final_value_opt()
        } else {
            self.epoch_value()
        };
        NumericEntry::Final(v.unwrap_or(f64::NAN))
    }
}
