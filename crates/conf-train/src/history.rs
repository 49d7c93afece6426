//! Collects each evaluation's metrics (burn-train's `LearningResult` carries none), prints a
//! readable line per evaluation when there is no dashboard, and stops a run whose loss stops
//! being finite.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::train::Interrupter;
use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};
use serde::{Deserialize, Serialize};

use crate::metrics::{MetricKind, MetricValues};

/// The metrics of both splits at one evaluation point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps done.
    pub step: usize,
    /// Learning rate of the last of those steps.
    pub lr: f64,
    /// Means over the training steps since the previous evaluation.
    pub train: MetricValues,
    /// On the evaluation windows.
    pub valid: MetricValues,
}

/// Shared between the logger (on burn-train's thread), the step tracker and the caller.
#[derive(Debug, Default)]
pub struct TrainingLog {
    pub records: Vec<EvalRecord>,
    /// Learning rate of each optimizer step (index: step − 1). Kept per step because
    /// burn-train's logger thread reads it for an evaluation after training has gone on.
    lrs: Vec<f64>,
    /// Set when a non-finite loss stopped the run.
    pub failure: Option<String>,
}

impl TrainingLog {
    /// Records that optimizer step `step` (from 1) ran at learning rate `lr` (steps are
    /// recorded in order; a gap, which no caller leaves, would take this rate too).
    pub fn record_lr(&mut self, step: usize, lr: f64) {
        if self.lrs.len() < step {
            self.lrs.resize(step, lr);
        }
        self.lrs[step - 1] = lr;
    }

    /// The learning rate of the last optimizer step up to `step` (0 before any).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.lrs[..step.min(self.lrs.len())]
            .last()
            .copied()
            .unwrap_or(0.0)
    }
}

pub struct HistoryLogger {
    log: Arc<Mutex<TrainingLog>>,
    /// Our metrics among burn-train's (its own, such as the iteration speed, are left out).
    kinds: HashMap<MetricId, MetricKind>,
    current: EvalRecord,
    eval_interval: usize,
    total_steps: usize,
    start_step: usize,
    /// Training items logged: one per step, or one per worker and step under data parallel.
    train_updates: usize,
    items_per_step: usize,
    print: bool,
    interrupter: Interrupter,
}

impl HistoryLogger {
    pub fn new(
        log: Arc<Mutex<TrainingLog>>,
        eval_interval: usize,
        total_steps: usize,
        start_step: usize,
        items_per_step: usize,
        print: bool,
        interrupter: Interrupter,
    ) -> Self {
        Self {
            log,
            kinds: HashMap::new(),
            current: EvalRecord::default(),
            eval_interval,
            total_steps,
            start_step,
            train_updates: 0,
            items_per_step: items_per_step.max(1),
            print,
            interrupter,
        }
    }

    /// Evaluation `epoch` (from 1) of this launch; a resumed run's first epoch ends on the next
    /// multiple of `eval_interval`.
    fn step_of(&self, epoch: usize) -> usize {
        let base = self.start_step / self.eval_interval * self.eval_interval;
        (base + epoch * self.eval_interval).min(self.total_steps)
    }

    fn check_finite(&mut self, values: &MetricValues) {
        let total = values.get(&MetricKind::TotalLoss).copied();
        if total.is_none_or(f64::is_finite) {
            return;
        }
        let step = self.start_step + self.train_updates.div_ceil(self.items_per_step);
        let parts: Vec<String> = values
            .iter()
            .map(|(k, v)| format!("{} = {v}", k.name()))
            .collect();
        let message = format!("non-finite loss at step {step}: {}", parts.join(", "));
        let mut log = self.log.lock().expect("training log lock");
        if log.failure.is_none() {
            log.failure = Some(message.clone());
            self.interrupter.stop(Some(&message));
        }
    }

    fn print_line(&self, record: &EvalRecord) {
        let show = |m: &MetricValues, kind: MetricKind| {
            m.get(&kind).map_or("-".into(), |v| format!("{v:.4}"))
        };
        let mut line = format!(
            "step {:>6} | train loss {} | eval loss {} ppl {} acc {} ece {}",
            record.step,
            show(&record.train, MetricKind::LmLoss),
            show(&record.valid, MetricKind::LmLoss),
            show(&record.valid, MetricKind::Perplexity),
            show(&record.valid, MetricKind::Accuracy),
            show(&record.valid, MetricKind::TokenEce),
        );
        if record.valid.contains_key(&MetricKind::ConfidenceLoss) {
            line.push_str(&format!(
                " | conf mse {} spearman {} (entropy {}) auroc {}",
                show(&record.valid, MetricKind::ConfidenceLoss),
                show(&record.valid, MetricKind::Spearman),
                show(&record.valid, MetricKind::EntropySpearman),
                show(&record.valid, MetricKind::Auroc),
            ));
        }
        println!("{line}");
    }
}

impl MetricLogger for HistoryLogger {
    fn log(&mut self, update: MetricsUpdate, _epoch: usize, split: &Split) {
        let mut batch_values = MetricValues::new();
        for numeric in &update.entries_numeric {
            let Some(&kind) = self.kinds.get(&numeric.entry.metric_id) else {
                continue;
            };
            match &numeric.numeric_entry {
                Some(NumericEntry::Final(v)) => {
                    let target = match split {
                        Split::Train => &mut self.current.train,
                        _ => &mut self.current.valid,
                    };
                    if v.is_finite() {
                        target.insert(kind, *v);
                    }
                }
                Some(entry) if matches!(split, Split::Train) => {
                    batch_values.insert(kind, entry.current());
                }
                _ => {}
            }
        }
        if !batch_values.is_empty() {
            self.train_updates += 1;
            self.check_finite(&batch_values);
        }
    }

    fn read_numeric(
        &mut self,
        _name: &str,
        _epoch: usize,
        _split: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        Err("the history logger keeps epoch summaries only".into())
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        if let Some(kind) = MetricKind::from_name(&definition.name) {
            self.kinds.insert(definition.metric_id.clone(), kind);
        }
    }

    fn log_epoch_summary(&mut self, summary: EpochSummary) {
        if matches!(summary.split, Split::Valid) {
            let mut record = std::mem::take(&mut self.current);
            record.step = self.step_of(summary.epoch_number);
            // Resumed between evaluations, the first interval's train means cover only the
            // steps since the resume: not a mean over the interval, so not recorded.
            let resumed_mid_interval = !self.start_step.is_multiple_of(self.eval_interval)
                && record.step - self.start_step < self.eval_interval;
            if resumed_mid_interval {
                record.train.clear();
            }
            let mut log = self.log.lock().expect("training log lock");
            record.lr = log.lr_at(record.step);
            if self.print {
                self.print_line(&record);
            }
            log.records.push(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_gets_the_learning_rate_of_its_own_step_whatever_ran_since() {
        let mut log = TrainingLog::default();
        assert_eq!(log.lr_at(0), 0.0);
        for step in 1..=5 {
            log.record_lr(step, step as f64 / 10.0);
        }
        assert_eq!(log.lr_at(3), 0.3);
        assert_eq!(log.lr_at(5), 0.5);
        assert_eq!(log.lr_at(9), 0.5, "past the last step: the last rate");
    }
}
