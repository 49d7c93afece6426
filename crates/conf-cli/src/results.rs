//! The results file: one schema type used by the writer, `results load` and the report.

use std::collections::BTreeMap;
use std::path::Path;

use conf_data::Tokenizer;
use conf_model::ParameterMatch;
use conf_train::ObjectiveKind;
use conf_train::calibration::{CalibrationBin, loss_calibration};
use conf_train::generate::Generated;
use conf_train::metrics::{MetricKind, MetricValues};
use conf_train::pipeline::{ModelOutcome, ModelPlan};
use conf_train::stop::RunStatus;
use serde::{Deserialize, Serialize};

use crate::config::ConfidenceExperimentConfig;
use crate::stats::{PairedDifference, SeedStats, paired_difference, seed_stats};

/// 2: metric keys typed, `grad_clip` a key, `lookahead_steps` gone, `conf_head` "final";
/// the experiment's id and status, each run's status and steps trained.
pub const SCHEMA_VERSION: u32 = 3;
/// Schema 2 lacks only the MFU fields (`peak_tflops`, a run's `mfu`), which default to none.
const OLDEST_LOADABLE: u32 = 2;
/// Predicted/actual pairs kept per seed: enough for a scatter plot, small enough for a file.
pub const PAIR_SAMPLE: usize = 2000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentResults {
    pub schema_version: u32,
    /// The experiment's id: its files are `{id}_results.json` and `{id}_runs/`.
    pub id: String,
    /// `incomplete` while it runs and when it was stopped: `experiment --resume` continues it.
    pub status: ExperimentStatus,
    /// UTC, RFC 3339, of the start.
    pub timestamp: String,
    pub git_commit: Option<String>,
    pub backend: String,
    pub device: String,
    /// The device's dense f32 peak (TFLOP/s), when known (`--peak-tflops`, or a GPU of
    /// crate::peak's table); each run's `mfu` is measured against it.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    pub config: ConfidenceExperimentConfig,
    pub parameter_counts: ParameterMatch,
    /// Per seed (as a string key).
    pub standard_model_results: BTreeMap<String, TrainingResult>,
    pub confidence_model_results: BTreeMap<String, TrainingResult>,
    /// Seconds of training steps summed over seeds, per model type.
    pub training_time: BTreeMap<String, f64>,
    pub summary: Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExperimentStatus {
    Complete,
    Incomplete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossPoint {
    pub step: usize,
    /// Mean LM loss over the training steps since the previous evaluation.
    pub train_loss: Option<f64>,
    pub eval_loss: f64,
    pub perplexity: f64,
    /// Learning rate of the step.
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepValue {
    pub step: usize,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingResult {
    /// `complete`, or `stopped` (dashboard) / `interrupted` (signal) after `steps_trained`.
    pub status: RunStatus,
    pub steps_trained: usize,
    pub final_eval_loss: f64,
    pub best_eval_loss: f64,
    pub final_perplexity: f64,
    pub final_train_loss: Option<f64>,
    pub loss_history: Vec<LossPoint>,
    /// Seconds of training steps (evaluation excluded).
    pub training_time: f64,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
    pub parameters: usize,
    /// Training FLOPs per token (see docs/results.md) and over the whole run.
    pub flops_per_token: f64,
    pub total_flops: f64,
    /// Model FLOP utilisation: `flops_per_token · tokens_per_second` over `peak_tflops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Every metric of the final model on the evaluation windows.
    pub final_metrics: MetricValues,
    /// A short text sampled from the final model (with per-token predictions for the
    /// confidence model).
    pub sample: GeneratedSample,
    /// Evaluation confidence MSE at each evaluation (confidence model only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_loss_history: Option<Vec<StepValue>>,
    /// Evaluation LM loss (mean token cross-entropy) at each evaluation (confidence model only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_loss_history: Option<Vec<StepValue>>,
    /// Final-model predicted and actual future losses, a sample of at most `PAIR_SAMPLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_predictions: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_future_losses: Option<Vec<f32>>,
    /// The reliability diagram of the final model (all evaluation pairs, 15 equal-mass bins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_bins: Option<Vec<CalibrationBin>>,
}

/// A short text sampled from a trained model after a prompt from the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratedSample {
    pub prompt: String,
    /// The generated tokens, each decoded on its own.
    pub tokens: Vec<String>,
    /// The confidence model's predicted loss (nats, two tokens ahead) at each token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_loss: Option<Vec<f32>>,
}

impl GeneratedSample {
    pub fn decode(prompt: &[u32], generated: &Generated, tokenizer: &dyn Tokenizer) -> Self {
        Self {
            prompt: tokenizer.decode(prompt),
            tokens: generated
                .tokens
                .iter()
                .map(|&t| tokenizer.decode(&[t]))
                .collect(),
            predicted_loss: generated.predicted_loss.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// The seeds summarised: those whose two runs both completed.
    pub seeds: Vec<String>,
    /// Seeds left out, with the reason (a run stopped early, or not run yet).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub excluded_seeds: BTreeMap<String, String>,
    /// Final metrics across seeds, per model type, then per metric.
    pub standard: BTreeMap<MetricKind, SeedStats>,
    pub confidence: BTreeMap<MetricKind, SeedStats>,
    /// confidence − standard on the metrics both have, paired by seed.
    pub paired_difference: BTreeMap<MetricKind, PairedDifference>,
    /// The confidence head against the entropy baseline (head − baseline), paired by seed:
    /// keys `spearman` and `auroc`.
    pub head_vs_entropy: BTreeMap<String, PairedDifference>,
}

impl TrainingResult {
    /// The record of one model's run: what `plan` asked for, what came out, and the decoded
    /// sample.
    /// One model's run; `peak_tflops` is the device's, for the MFU.
    pub fn new(
        plan: &ModelPlan,
        run: &ModelOutcome,
        sample: GeneratedSample,
        peak_tflops: Option<f64>,
    ) -> Self {
        let history = &run.report.history;
        let lm = MetricKind::LmLoss;
        let loss_history: Vec<LossPoint> = history
            .iter()
            .filter_map(|r| {
                let eval_loss = *r.valid.get(&lm)?;
                Some(LossPoint {
                    step: r.step,
                    train_loss: r.train.get(&lm).copied(),
                    eval_loss,
                    perplexity: eval_loss.exp(),
                    lr: r.lr,
                })
            })
            .collect();
        let final_eval_loss = run.final_metrics.get(&lm).copied().unwrap_or(f64::NAN);
        let best_eval_loss = loss_history
            .iter()
            .map(|p| p.eval_loss)
            .fold(final_eval_loss, f64::min);
        let settings = &plan.training;
        let steps = run.report.steps_trained;
        let tokens = (steps * settings.batch_size * settings.seq_len) as f64;
        let confidence = plan.objective != ObjectiveKind::Standard;
        let series = |kind: MetricKind| {
            history
                .iter()
                .filter_map(|r| {
                    r.valid.get(&kind).map(|&value| StepValue {
                        step: r.step,
                        value,
                    })
                })
                .collect::<Vec<_>>()
        };
        let s = &run.samples;
        let keep = s.predicted.len().min(PAIR_SAMPLE);
        // An even stride over all pairs, so the sample covers every evaluation window.
        let stride = (s.predicted.len() / keep.max(1)).max(1);
        let pick = |v: &[f32]| {
            v.iter()
                .step_by(stride)
                .take(keep)
                .copied()
                .collect::<Vec<_>>()
        };
        Self {
            status: run.status,
            steps_trained: steps,
            final_eval_loss,
            best_eval_loss,
            final_perplexity: final_eval_loss.exp(),
            final_train_loss: loss_history.last().and_then(|p| p.train_loss),
            loss_history,
            training_time: run.report.train_seconds,
            ms_per_step: run.report.ms_per_step,
            tokens_per_second: run.report.tokens_per_second,
            parameters: run.parameters,
            flops_per_token: run.flops_per_token,
            total_flops: run.flops_per_token * tokens,
            mfu: crate::peak::mfu(
                run.flops_per_token * run.report.tokens_per_second / 1e12,
                peak_tflops,
            ),
            final_metrics: run.final_metrics.clone(),
            sample,
            confidence_loss_history: confidence.then(|| series(MetricKind::ConfidenceLoss)),
            token_loss_history: confidence.then(|| series(MetricKind::LmLoss)),
            confidence_predictions: confidence.then(|| pick(&s.predicted)),
            actual_future_losses: confidence.then(|| pick(&s.actual)),
            calibration_bins: confidence.then(|| loss_calibration(&s.predicted, &s.actual).1),
        }
    }
}

impl Summary {
    /// Statistics over the seeds whose two runs both completed; a stopped run never enters a
    /// comparison.
    pub fn new(
        standard: &BTreeMap<String, TrainingResult>,
        confidence: &BTreeMap<String, TrainingResult>,
    ) -> Self {
        let mut seeds = Vec::new();
        let mut excluded_seeds = BTreeMap::new();
        let all: std::collections::BTreeSet<&String> =
            standard.keys().chain(confidence.keys()).collect();
        for seed in all {
            let state = |runs: &BTreeMap<String, TrainingResult>, model: &str| match runs.get(seed)
            {
                None => Some(format!("the {model} model has not run")),
                Some(r) if r.status != RunStatus::Complete => Some(format!(
                    "the {model} model was {} after {} steps",
                    match r.status {
                        RunStatus::Interrupted => "interrupted",
                        _ => "stopped",
                    },
                    r.steps_trained
                )),
                Some(_) => None,
            };
            match state(standard, "standard").or_else(|| state(confidence, "confidence")) {
                Some(reason) => {
                    excluded_seeds.insert(seed.clone(), reason);
                }
                None => seeds.push(seed.clone()),
            }
        }
        let per_metric = |results: &BTreeMap<String, TrainingResult>| {
            let mut values: BTreeMap<MetricKind, Vec<f64>> = BTreeMap::new();
            for r in seeds.iter().filter_map(|s| results.get(s)) {
                for (&k, &v) in &r.final_metrics {
                    values.entry(k).or_default().push(v);
                }
            }
            values
        };
        let (s, c) = (per_metric(standard), per_metric(confidence));
        let stats = |m: &BTreeMap<MetricKind, Vec<f64>>| {
            m.iter().map(|(&k, v)| (k, seed_stats(v))).collect()
        };
        let paired = s
            .iter()
            .filter(|(k, v)| c.get(*k).is_some_and(|w| w.len() == v.len()))
            .map(|(&k, v)| (k, paired_difference(v, &c[&k])))
            .collect();
        let mut head_vs_entropy = BTreeMap::new();
        for (name, head, baseline) in [
            (
                "spearman",
                MetricKind::Spearman,
                MetricKind::EntropySpearman,
            ),
            ("auroc", MetricKind::Auroc, MetricKind::EntropyAuroc),
        ] {
            if let (Some(h), Some(b)) = (c.get(&head), c.get(&baseline))
                && h.len() == b.len()
            {
                head_vs_entropy.insert(name.to_string(), paired_difference(b, h));
            }
        }
        Self {
            seeds,
            excluded_seeds,
            standard: stats(&s),
            confidence: stats(&c),
            paired_difference: paired,
            head_vs_entropy,
        }
    }
}

/// Errors of `results load`.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Reads and checks a results file: the schema, its version, and that every number the
/// experiment must produce is finite.
pub fn load(path: &Path) -> Result<ExperimentResults, ResultsError> {
    let invalid = |message: String| ResultsError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read: {e}")))?;
    let results: ExperimentResults =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not a results file: {e}")))?;
    if !(OLDEST_LOADABLE..=SCHEMA_VERSION).contains(&results.schema_version) {
        return Err(invalid(format!(
            "schema_version {} is not one of the supported {OLDEST_LOADABLE}..={SCHEMA_VERSION}",
            results.schema_version
        )));
    }
    for (model, runs) in [
        ("standard_model_results", &results.standard_model_results),
        (
            "confidence_model_results",
            &results.confidence_model_results,
        ),
    ] {
        if runs.is_empty() && results.status == ExperimentStatus::Complete {
            return Err(invalid(format!("{model} holds no seed")));
        }
        for (seed, r) in runs {
            for (field, v) in [
                ("final_eval_loss", r.final_eval_loss),
                ("best_eval_loss", r.best_eval_loss),
                ("final_perplexity", r.final_perplexity),
                ("training_time", r.training_time),
            ] {
                if !v.is_finite() {
                    return Err(invalid(format!(
                        "{model}.{seed}.{field} is {v}, not a finite number"
                    )));
                }
            }
        }
    }
    Ok(results)
}

impl ExperimentResults {
    /// What a reader must know before trusting the numbers: an incomplete experiment, runs
    /// stopped early, seeds left out of the comparison. Empty for a complete experiment.
    pub fn caveats(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.status == ExperimentStatus::Incomplete {
            out.push(format!(
                "INCOMPLETE experiment: {} of {} seeds summarised; `lookahead experiment --resume` with the same flags continues it",
                self.summary.seeds.len(),
                self.config.seeds.len()
            ));
        }
        for (seed, reason) in &self.summary.excluded_seeds {
            out.push(format!(
                "seed {seed} is left out of the comparison: {reason}"
            ));
        }
        out
    }

    /// Seconds of training steps summed over seeds, per model type.
    pub fn training_time_by_model(&self) -> BTreeMap<String, f64> {
        [
            ("standard", &self.standard_model_results),
            ("confidence", &self.confidence_model_results),
        ]
        .into_iter()
        .map(|(model, runs)| {
            (
                model.to_string(),
                runs.values().map(|r| r.training_time).sum(),
            )
        })
        .collect()
    }
}
