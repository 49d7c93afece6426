//! The metrics of DESIGN §7, identified by [`MetricKind`], and their burn-train form for the
//! dashboard. Each reads a step's [`Samples`]; the definitions are those of
//! [`crate::calibration`], so dashboard, results and report agree.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::{Tensor, TensorReadError};
use burn::train::metric::state::NumericMetricState;
use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry,
    SerializedEntry,
};

use crate::calibration::{self, MetricResult};
use crate::objective::ObjectiveOutput;

/// One metric. Serialised (also as a map key in results files) under its display name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum MetricKind {
    /// Mean next-token cross-entropy over all L pass-1 positions (nats).
    #[serde(rename = "LM Loss")]
    LmLoss,
    /// `exp` of the epoch's mean LM loss.
    #[serde(rename = "Perplexity")]
    Perplexity,
    /// Top-1 accuracy over all L positions.
    #[serde(rename = "Accuracy")]
    Accuracy,
    /// Token ECE, 15 equal-width bins.
    #[serde(rename = "Token ECE")]
    TokenEce,
    /// The loss the optimizer sees: `lm + alpha · conf`.
    #[serde(rename = "Total Loss")]
    TotalLoss,
    /// MSE of the confidence prediction (the trained confidence loss).
    #[serde(rename = "Confidence MSE")]
    ConfidenceLoss,
    #[serde(rename = "Confidence MAE")]
    ConfidenceMae,
    #[serde(rename = "Loss ECE")]
    LossEce,
    #[serde(rename = "Confidence Pearson")]
    Pearson,
    #[serde(rename = "Confidence Spearman")]
    Spearman,
    #[serde(rename = "Confidence AUROC")]
    Auroc,
    #[serde(rename = "Entropy Spearman")]
    EntropySpearman,
    #[serde(rename = "Entropy AUROC")]
    EntropyAuroc,
}

/// Metric values of one split at one point, by metric.
pub type MetricValues = BTreeMap<MetricKind, f64>;

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
    /// Every metric of the confidence model: the LM metrics, then the confidence ones.
    pub const ALL: [MetricKind; 13] = {
        let (lm, conf) = (Self::STANDARD.len(), Self::CONFIDENCE.len());
        assert!(lm + conf == 13);
        let mut all = [Self::LmLoss; 13];
        let mut i = 0;
        while i < lm + conf {
            all[i] = if i < lm {
                Self::STANDARD[i]
            } else {
                Self::CONFIDENCE[i - lm]
            };
            i += 1;
        }
        all
    };

    /// Also averaged over the training steps (the dashboard's train split and the train means
    /// of each evaluation record). Ranking and calibration over a few training batches say
    /// little; they are evaluation metrics only, which also keeps the dashboard short.
    pub fn on_training_steps(self) -> bool {
        matches!(self, Self::LmLoss | Self::TotalLoss | Self::ConfidenceLoss)
    }

    /// Position on the dashboard: the losses and the confidence head's quality against its
    /// baseline first, so that a short terminal still shows them.
    pub fn dashboard_rank(self) -> usize {
        [
            Self::LmLoss,
            Self::ConfidenceLoss,
            Self::Spearman,
            Self::EntropySpearman,
            Self::Auroc,
            Self::EntropyAuroc,
            Self::TotalLoss,
            Self::Perplexity,
            Self::Accuracy,
            Self::TokenEce,
            Self::ConfidenceMae,
            Self::LossEce,
            Self::Pearson,
        ]
        .iter()
        .position(|&k| k == self)
        .unwrap_or(usize::MAX)
    }

    /// The metric shown under `name` (its display name), if it is one of ours.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The display name (dashboard, logs, results files).
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

/// Host copies of the per-token statistics of one step or of many (an epoch, an evaluation).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Per pass-1 token, all L positions of every row.
    pub token_loss: Vec<f32>,
    pub max_prob: Vec<f32>,
    pub correct: Vec<f32>,
    /// One entry per step (per worker's part of it under data parallel), weighted like a
    /// token mean would not be: the optimizer's loss.
    pub total: Vec<f32>,
    /// Per confidence prediction (empty for the standard model).
    pub predicted: Vec<f32>,
    pub actual: Vec<f32>,
    pub entropy: Vec<f32>,
}

impl Samples {
    /// One step's samples, read back from the device.
    pub fn of_step(o: &ObjectiveOutput) -> Self {
        let values = |t: &Tensor<2>| {
            t.clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap_or_default()
        };
        let look = o.lookahead.as_ref();
        Self {
            token_loss: values(&o.tokens.loss),
            max_prob: values(&o.tokens.max_prob),
            correct: values(&o.tokens.correct),
            total: vec![o.total.clone().into_scalar::<f32>()],
            predicted: look.map(|l| values(&l.predicted)).unwrap_or_default(),
            actual: look.map(|l| values(&l.actual)).unwrap_or_default(),
            entropy: look.map(|l| values(&l.entropy)).unwrap_or_default(),
        }
    }

    pub fn extend(&mut self, other: &Samples) {
        self.token_loss.extend(&other.token_loss);
        self.max_prob.extend(&other.max_prob);
        self.correct.extend(&other.correct);
        self.total.extend(&other.total);
        self.predicted.extend(&other.predicted);
        self.actual.extend(&other.actual);
        self.entropy.extend(&other.entropy);
    }

    /// The metrics of `kinds` that are defined on these samples.
    pub fn evaluate(&self, kinds: &[MetricKind]) -> MetricValues {
        kinds
            .iter()
            .filter_map(|&k| k.evaluate(self).ok().map(|v| (k, v)))
            .collect()
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
    type Input = Arc<Samples>;

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
        item: &Arc<Samples>,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let batch: &Samples = item;
        let value = self.kind.evaluate(batch).ok();
        self.last = value;
        if self.kind.is_mean() {
            let (mean_kind, count) = match self.kind {
                MetricKind::TotalLoss => (MetricKind::TotalLoss, 1),
                MetricKind::Accuracy => (MetricKind::Accuracy, item.correct.len()),
                _ => (MetricKind::LmLoss, item.token_loss.len()),
            };
            if let Ok(v) = mean_kind.evaluate(batch) {
                self.mean.update(v, count);
            }
            let epoch = match self.kind {
                MetricKind::Perplexity => self.mean.final_value_opt().map(f64::exp),
                _ => self.mean.final_value_opt(),
            };
            return Ok(self.entry(value, epoch, false));
        }
        self.samples.extend(item);
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
