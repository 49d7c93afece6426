//! Collects each evaluation's metrics (burn-train's `LearningResult` carries none), prints a
//! readable line per evaluation when there is no dashboard, and stops a run whose loss stops
//! being finite.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use burn::train::Interrupter;
use burn::train::logger::MetricLogger;
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};
use serde::{Deserialize, Serialize};

use crate::metrics::MetricKind;

/// Metrics of one split at one evaluation point.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps done.
    pub step: usize,
    pub train: BTreeMap<String, f64>,
    pub valid: BTreeMap<String, f64>,
}

/// Shared between the logger (on burn-train's thread) and the caller.
#[derive(Debug, Default)]
pub struct RunLog {
    pub records: Vec<EvalRecord>,
    /// Set when a non-finite loss stopped the run.
    pub failure: Option<String>,
}

pub struct HistoryLogger {
    log: Arc<Mutex<RunLog>>,
    names: HashMap<MetricId, String>,
    current: EvalRecord,
    eval_interval: usize,
    total_steps: usize,
    start_step: usize,
    train_updates: usize,
    print: bool,
    interrupter: Interrupter,
}

impl HistoryLogger {
    pub fn new(
        log: Arc<Mutex<RunLog>>,
        eval_interval: usize,
        total_steps: usize,
        start_step: usize,
        print: bool,
        interrupter: Interrupter,
    ) -> Self {
        Self {
            log,
            names: HashMap::new(),
            current: EvalRecord::default(),
            eval_interval,
            total_steps,
            start_step,
            train_updates: 0,
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

    fn check_finite(&mut self, values: &BTreeMap<&str, f64>) {
        let total = values.get(MetricKind::TotalLoss.name()).copied();
        if total.is_none_or(f64::is_finite) {
            return;
        }
        let step = self.start_step + self.train_updates;
        let parts: Vec<String> = values.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let message = format!("non-finite loss at step {step}: {}", parts.join(", "));
        let mut log = self.log.lock().expect("run log lock");
        if log.failure.is_none() {
            log.failure = Some(message.clone());
            self.interrupter.stop(Some(&message));
        }
    }

    fn print_line(&self, record: &EvalRecord) {
        let show = |m: &BTreeMap<String, f64>, kind: MetricKind| {
            m.get(kind.name()).map_or("-".into(), |v| format!("{v:.4}"))
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
        if record.valid.contains_key(MetricKind::ConfidenceLoss.name()) {
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
    fn log(&mut self, update: MetricsUpdate, epoch: usize, split: &Split) {
        let mut batch_values = BTreeMap::new();
        for numeric in &update.entries_numeric {
            let Some(name) = self.names.get(&numeric.entry.metric_id).cloned() else {
                continue;
            };
            match &numeric.numeric_entry {
                Some(NumericEntry::Final(v)) => {
                    let target = match split {
                        Split::Train => &mut self.current.train,
                        _ => &mut self.current.valid,
                    };
                    if v.is_finite() {
                        target.insert(name, *v);
                    }
                }
                Some(entry) if matches!(split, Split::Train) => {
                    batch_values.insert(name, entry.current());
                }
                _ => {}
            }
        }
        if !batch_values.is_empty() {
            self.train_updates += 1;
            let values = batch_values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            self.check_finite(&values);
        }
        let _ = epoch;
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
        self.names
            .insert(definition.metric_id.clone(), definition.name.to_string());
    }

    fn log_epoch_summary(&mut self, summary: EpochSummary) {
        if matches!(summary.split, Split::Valid) {
            let mut record = std::mem::take(&mut self.current);
            record.step = self.step_of(summary.epoch_number);
            if self.print {
                self.print_line(&record);
            }
            self.log.lock().expect("run log lock").records.push(record);
        }
    }
}
