//! One training run of one model through burn-train's Learner.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::train::logger::FileMetricLogger;
use burn::train::metric::IterationSpeedMetric;
use burn::train::{InferenceStep, Learner, LearnerModel, SupervisedTraining, TrainStep};
use conf_data::{Corpus, EvalWindows, Split, TrainWindows};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::batch::{LookaheadBatch, LookaheadBatcher};
use crate::checkpoint::Checkpointer;
use crate::history::{EvalRecord, HistoryLogger, RunLog};
use crate::loader::{StepLoader, StepTimer};
use crate::metrics::Samples;
use crate::metrics::{LookaheadMetric, MetricKind};
use crate::optim::{OptimizerSettings, adamw, warmup_cosine};
use crate::renderer::QuietRenderer;
use crate::step::StepOutput;
use crate::trainee::Checkpointed;

/// The schedule and data of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub training_steps: usize,
    pub eval_interval: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Evaluation windows used at each evaluation (all that fit when `None`).
    pub eval_windows: Option<usize>,
    pub seed: u64,
    pub optimizer: OptimizerSettings,
    /// Where burn-train writes its logs for this run.
    pub artifact_dir: PathBuf,
    /// Burn's dashboard when stdout is a terminal, unless this is set.
    pub no_tui: bool,
    /// Optimizer steps between checkpoints (one is also written at the end).
    pub save_interval: usize,
    /// Continue from the latest checkpoint in `artifact_dir/checkpoints` when there is one.
    pub resume: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Settings(String),
    #[error("{0}")]
    NonFinite(String),
    #[error("training stopped: {0}")]
    Interrupted(String),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

/// What a run returns besides the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub history: Vec<EvalRecord>,
    /// The whole run, evaluations included.
    pub wall_seconds: f64,
    /// Training steps only (from the first batch request of each epoch to its end).
    pub train_seconds: f64,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
}

pub struct TrainedModel<M> {
    pub model: M,
    pub report: RunReport,
    /// The step of the last checkpoint written, if any.
    pub checkpoint_step: Option<usize>,
}

impl RunSettings {
    fn validate(&self) -> Result<(), TrainError> {
        for (name, value) in [
            ("training_steps", self.training_steps),
            ("eval_interval", self.eval_interval),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("save_interval", self.save_interval),
        ] {
            if value == 0 {
                return Err(TrainError::Settings(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// Trains `trainee` (built on an autodiff device) on `corpus` and evaluates it every
/// `eval_interval` steps on the fixed evaluation windows, showing `metrics`.
pub fn fit<M>(
    trainee: M,
    metrics: &[MetricKind],
    corpus: &Corpus,
    split: &Split,
    settings: &RunSettings,
) -> Result<TrainedModel<M>, TrainError>
where
    M: LearnerModel + TrainStep<Input = LookaheadBatch, Output = StepOutput> + Checkpointed,
    M: InferenceStep<Input = LookaheadBatch, Output = StepOutput>,
{
    settings.validate()?;
    let mut trainee = trainee;
    let device = trainee.devices()[0].clone();
    let batcher = LookaheadBatcher {
        seed: settings.seed,
    };
    let windows = TrainWindows::new(
        corpus.tokens.clone(),
        split.train.clone(),
        settings.seq_len,
        settings.seed,
        settings.training_steps * settings.batch_size,
    );
    let step_timer = StepTimer::default();
    let train_loader = StepLoader::new(
        windows,
        batcher,
        settings.batch_size,
        settings.eval_interval,
        settings.training_steps,
        device.clone(),
    )
    .with_timer(step_timer.clone());
    let eval = eval_windows(corpus, split, settings);
    let valid_loader = DataLoaderBuilder::new(batcher)
        .batch_size(settings.batch_size)
        .build(eval);

    let mut optim = adamw(&trainee, &settings.optimizer);
    let mut scheduler = warmup_cosine(&settings.optimizer, settings.training_steps)
        .map_err(TrainError::Settings)?;
    let log = Arc::new(Mutex::new(RunLog::default()));

    let checkpoints = settings.artifact_dir.join("checkpoints");
    let restored = if settings.resume {
        crate::checkpoint::restore(&checkpoints)?
    } else {
        // A fresh run never mixes with the checkpoints of an earlier one.
        let _ = std::fs::remove_dir_all(&checkpoints);
        None
    };
    let start = restored.as_ref().map_or(0, |r| r.state.step);
    if let Some(restored) = restored {
        tracing::info!(step = start, "resuming from {}", checkpoints.display());
        trainee = trainee.load_record(restored.model);
        optim = optim
            .from_bytes(restored.optimizer)
            .map_err(|e| TrainError::Settings(format!("{}: {e}", checkpoints.display())))?;
        for _ in 0..start {
            scheduler.step();
        }
        train_loader.set_next_step(start);
        log.lock().expect("run log lock").records = restored.state.history;
    }
    let checkpointer = Arc::new(Checkpointer::new(
        checkpoints,
        settings.save_interval,
        settings.training_steps,
        start,
        log.clone(),
    ));
    trainee.set_checkpointer(checkpointer.clone());
    let spe = settings.eval_interval;
    let num_epochs = if start >= settings.training_steps {
        0
    } else {
        settings.training_steps.div_ceil(spe) - start / spe
    };

    // A checkpoint taken at an evaluation step precedes that evaluation: redo it.
    let evaluated = |log: &Arc<Mutex<RunLog>>| {
        log.lock()
            .expect("run log lock")
            .records
            .iter()
            .any(|r| r.step == start)
    };
    if start > 0
        && (start.is_multiple_of(spe) || start == settings.training_steps)
        && !evaluated(&log)
    {
        let (valid, _) = evaluate(&trainee.valid(), metrics, corpus, split, settings);
        let record = EvalRecord {
            step: start,
            valid,
            ..EvalRecord::default()
        };
        log.lock().expect("run log lock").records.push(record);
    }

    let dashboard = !settings.no_tui && std::io::stdout().is_terminal();
    let mut training =
        SupervisedTraining::new(&settings.artifact_dir, Arc::new(train_loader), valid_loader)
            .num_epochs(num_epochs);
    let history = HistoryLogger::new(
        log.clone(),
        settings.eval_interval,
        settings.training_steps,
        start,
        !dashboard,
        training.interrupter(),
    );
    // The binary owns the process-wide logger; burn's would replace it with a file.
    training = training
        .with_application_logger(None)
        .with_metric_logger(FileMetricLogger::new(&settings.artifact_dir))
        .with_metric_logger(history);
    if !dashboard {
        training = training.renderer(Box::new(QuietRenderer));
    }
    training = training.metric_train_numeric(IterationSpeedMetric::new());
    for &kind in metrics {
        training = training
            .metric_train_numeric(LookaheadMetric::new(kind))
            .metric_valid_numeric(LookaheadMetric::new(kind));
    }

    let started = Instant::now();
    let (model, interrupted) = if num_epochs == 0 {
        (trainee.valid(), None)
    } else {
        let result = training.launch(Learner::new(trainee, optim, scheduler));
        (result.model, result.interrupted)
    };
    let wall_seconds = started.elapsed().as_secs_f64();
    let train_seconds = step_timer.seconds();

    let log = std::mem::take(&mut *log.lock().expect("run log lock"));
    if let Some(failure) = log.failure {
        let kept = match checkpointer.last_saved() {
            Some(step) => format!(
                "the last good checkpoint (step {step}) is in {}",
                settings.artifact_dir.join("checkpoints").display()
            ),
            None => "no checkpoint was written before it".to_string(),
        };
        return Err(TrainError::NonFinite(format!("{failure}; {kept}")));
    }
    if let Some(interruption) = interrupted {
        return Err(TrainError::Interrupted(
            interruption.reason.unwrap_or_default(),
        ));
    }
    let steps = (settings.training_steps - start).max(1) as f64;
    let tokens = steps * (settings.batch_size * settings.seq_len) as f64;
    Ok(TrainedModel {
        checkpoint_step: checkpointer.last_saved(),
        model,
        report: RunReport {
            history: log.records,
            wall_seconds,
            train_seconds,
            ms_per_step: train_seconds * 1000.0 / steps,
            tokens_per_second: tokens / train_seconds,
        },
    })
}

/// The fixed evaluation windows of a run.
fn eval_windows(corpus: &Corpus, split: &Split, settings: &RunSettings) -> EvalWindows {
    EvalWindows::new(
        corpus.tokens.clone(),
        split.val.clone(),
        settings.seq_len,
        settings.eval_windows,
    )
}

/// Every metric of `kinds` on the fixed evaluation windows, with the samples they came from,
/// computed by the model's inference step (the same conditioning and lookahead as training).
pub fn evaluate<M>(
    model: &M,
    kinds: &[MetricKind],
    corpus: &Corpus,
    split: &Split,
    settings: &RunSettings,
) -> (BTreeMap<String, f64>, Samples)
where
    M: InferenceStep<Input = LookaheadBatch, Output = StepOutput> + Module,
{
    let device = model.devices()[0].clone();
    let batcher = LookaheadBatcher {
        seed: settings.seed,
    };
    let eval = eval_windows(corpus, split, settings);
    let mut samples = Samples::default();
    let indices: Vec<usize> = (0..eval.len()).collect();
    for chunk in indices.chunks(settings.batch_size) {
        let items = chunk.iter().filter_map(|&i| eval.get(i).ok()).collect();
        let output = model.step(batcher.batch(items, &device));
        samples.push(&output.summary());
    }
    let values = kinds
        .iter()
        .filter_map(|&k| k.evaluate(&samples).ok().map(|v| (k.name().to_string(), v)))
        .collect();
    (values, samples)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookahead::ConfInput;
    use crate::objective::{ConfidenceSettings, DenseObjective, Objective, StandardObjective};
    use crate::trainee::{ConfidenceTrainee, StandardTrainee};
    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataset::Dataset;
    use burn::prelude::*;
    use conf_data::{CorpusRequest, load_corpus};
    use conf_model::{ConfidenceGptConfig, GptConfig};

    const SEQ: usize = 32;

    fn settings(dir: &std::path::Path, steps: usize, eval_interval: usize) -> RunSettings {
        RunSettings {
            training_steps: steps,
            eval_interval,
            batch_size: 16,
            seq_len: SEQ,
            eval_windows: Some(32),
            seed: 42,
            optimizer: OptimizerSettings {
                learning_rate: 3e-3,
                min_learning_rate: 3e-4,
                warmup_steps: 10,
                weight_decay: 0.1,
                grad_clip: 1.0,
            },
            artifact_dir: dir.to_path_buf(),
            no_tui: true,
            save_interval: 20,
            resume: false,
        }
    }

    fn corpus() -> (Corpus, Split) {
        let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
        let split = Split::contiguous(&corpus, 0.1, SEQ).unwrap();
        (corpus, split)
    }

    fn gpt(vocab: usize) -> GptConfig {
        GptConfig::new(vocab, SEQ, 32, 2, 4, 128)
    }

    #[test]
    fn the_standard_model_closes_a_third_of_the_gap_to_the_entropy_floor() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, split) = corpus();
        let oracle = corpus.oracle.clone().unwrap();
        let run = settings(dir.path(), 120, 40);
        let device = Device::flex().autodiff();
        device.seed(42);
        let trainee = StandardTrainee::new(gpt(corpus.vocab_size()).init_minigpt(&device));

        // Loss before training and the exact source's floor, on the evaluation windows.
        let eval = EvalWindows::new(corpus.tokens.clone(), split.val.clone(), SEQ, Some(32));
        let items: Vec<_> = (0..eval.len()).map(|i| eval.get(i).unwrap()).collect();
        let floor = items
            .iter()
            .map(|w| {
                oracle.token_losses(&w.tokens[..SEQ + 1])[1..]
                    .iter()
                    .sum::<f64>()
            })
            .sum::<f64>()
            / (items.len() * SEQ) as f64;
        let batch = LookaheadBatcher { seed: 42 }.batch(items, &Device::flex());
        let initial = StandardObjective
            .compute(&trainee.model.valid(), batch)
            .lm_loss
            .into_scalar::<f64>();

        let trained = fit(trainee, &MetricKind::STANDARD, &corpus, &split, &run).unwrap();
        let history = &trained.report.history;
        assert_eq!(
            history.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![40, 80, 120]
        );
        let last = history.last().unwrap().valid[MetricKind::LmLoss.name()];
        eprintln!("initial {initial:.3} final {last:.3} floor {floor:.3}");
        assert!(
            initial - last >= 0.3 * (initial - floor),
            "{initial} → {last}, floor {floor}"
        );
        let ppl = history.last().unwrap().valid[MetricKind::Perplexity.name()];
        assert!((ppl - last.exp()).abs() < 1e-6 * ppl);
        for record in history {
            for kind in MetricKind::STANDARD {
                assert!(
                    record.valid[kind.name()].is_finite(),
                    "{} at {}",
                    kind.name(),
                    record.step
                );
            }
        }
        assert!(trained.report.tokens_per_second > 0.0);
    }

    #[test]
    fn the_confidence_model_trains_with_the_dense_objective_and_reports_calibration() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, split) = corpus();
        let run = settings(dir.path(), 50, 25);
        let device = Device::flex().autodiff();
        device.seed(42);
        let trainee = ConfidenceTrainee::new(
            ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device),
            Arc::new(DenseObjective(ConfidenceSettings {
                alpha: 1.0,
                conf_input: ConfInput::SelfConditioned,
            })),
        );
        let metrics: Vec<MetricKind> = MetricKind::STANDARD
            .into_iter()
            .chain(MetricKind::CONFIDENCE)
            .collect();
        let trained = fit(trainee, &metrics, &corpus, &split, &run).unwrap();
        let history = &trained.report.history;
        assert_eq!(history.len(), 2);
        let first = &history[0].valid;
        let last = &history[1].valid;
        for kind in &metrics {
            assert!(
                last.contains_key(kind.name()),
                "{} missing: {last:?}",
                kind.name()
            );
        }
        assert!(last[MetricKind::LmLoss.name()] < first[MetricKind::LmLoss.name()]);
        for record in history {
            let v = &record.valid;
            for kind in [MetricKind::Auroc, MetricKind::EntropyAuroc] {
                assert!((0.0..=1.0).contains(&v[kind.name()]));
            }
            for kind in [
                MetricKind::Pearson,
                MetricKind::Spearman,
                MetricKind::EntropySpearman,
            ] {
                assert!((-1.0..=1.0).contains(&v[kind.name()]));
            }
            // total = lm + alpha · conf with alpha = 1; the batches are equal in size, so the
            // epoch means add up exactly.
            let parts = v[MetricKind::LmLoss.name()] + v[MetricKind::ConfidenceLoss.name()];
            assert!(
                (v[MetricKind::TotalLoss.name()] - parts).abs() < 1e-4,
                "{v:?}"
            );
        }
    }

    /// Dense, but the loss turns to NaN from the `after`-th call on.
    #[derive(Debug)]
    struct NanAfter {
        inner: DenseObjective,
        after: usize,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Objective<conf_model::ConfidenceAwareGpt> for NanAfter {
        fn name(&self) -> &'static str {
            "nan-after"
        }

        fn compute(
            &self,
            model: &conf_model::ConfidenceAwareGpt,
            batch: LookaheadBatch,
        ) -> crate::ObjectiveOutput {
            let mut out = self.inner.compute(model, batch);
            let calls = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if calls >= self.after {
                out.total = out.total * f64::NAN;
            }
            out
        }
    }

    #[test]
    fn a_non_finite_loss_stops_the_run_naming_the_step_and_the_loss_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (corpus, split) = corpus();
        let run = settings(dir.path(), 40, 10);
        let device = Device::flex().autodiff();
        let trainee = ConfidenceTrainee::new(
            ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device),
            Arc::new(NanAfter {
                inner: DenseObjective(ConfidenceSettings {
                    alpha: 1.0,
                    conf_input: ConfInput::SelfConditioned,
                }),
                after: 5,
                calls: Default::default(),
            }),
        );
        let metrics: Vec<MetricKind> = MetricKind::STANDARD
            .into_iter()
            .chain(MetricKind::CONFIDENCE)
            .collect();
        let err = match fit(trainee, &metrics, &corpus, &split, &run) {
            Ok(_) => panic!("a NaN loss must stop the run"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("non-finite loss at step 6"), "{err}");
        assert!(
            err.contains("Total Loss = NaN")
                && err.contains("LM Loss")
                && err.contains("Confidence MSE"),
            "{err}"
        );
    }

    fn params(model: &conf_model::ConfidenceAwareGpt) -> Vec<f32> {
        let mut all = Vec::new();
        for t in [
            model.tok_emb.weight.val(),
            model.blocks[1].mlp.fc.weight.val(),
        ] {
            all.extend(t.into_data().try_into_vec_as::<f32>().unwrap());
        }
        all.extend(
            model
                .confidence_predictor
                .weight
                .val()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap(),
        );
        all
    }

    #[test]
    fn a_run_that_diverges_keeps_its_last_good_checkpoint_and_resumes_exactly() {
        let (corpus, split) = corpus();
        let dense = DenseObjective(ConfidenceSettings {
            alpha: 1.0,
            conf_input: ConfInput::SelfConditioned,
        });
        let metrics: Vec<MetricKind> = MetricKind::STANDARD
            .into_iter()
            .chain(MetricKind::CONFIDENCE)
            .collect();
        let device = Device::flex().autodiff();
        // One initial model for all three runs: tests share the process-wide generator, so
        // re-seeding it would not guarantee equal initialisations.
        let initial = ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device);
        let fresh = |_: &Device| initial.clone();

        // The reference: 60 steps in one go.
        let reference_dir = tempfile::tempdir().unwrap();
        let run = settings(reference_dir.path(), 60, 20);
        let reference = fit(
            ConfidenceTrainee::new(fresh(&device), Arc::new(dense)),
            &metrics,
            &corpus,
            &split,
            &run,
        )
        .unwrap();
        assert_eq!(reference.checkpoint_step, Some(60));

        // The same run, but its loss turns NaN at step 41 (after 40 steps and two evaluations
        // of two batches each): it stops, naming the step and the checkpoint it keeps.
        let dir = tempfile::tempdir().unwrap();
        let run = settings(dir.path(), 60, 20);
        let diverging = Arc::new(NanAfter {
            inner: dense,
            after: 44,
            calls: Default::default(),
        });
        let err = match fit(
            ConfidenceTrainee::new(fresh(&device), diverging),
            &metrics,
            &corpus,
            &split,
            &run,
        ) {
            Ok(_) => panic!("must stop"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("step 41") && err.contains("step 40") && err.contains("checkpoints"),
            "{err}"
        );

        // Resumed with a healthy objective, it ends exactly where the reference did.
        let resume = RunSettings {
            resume: true,
            ..run
        };
        let resumed = fit(
            ConfidenceTrainee::new(fresh(&device), Arc::new(dense)),
            &metrics,
            &corpus,
            &split,
            &resume,
        )
        .unwrap();
        let (a, b) = (params(&resumed.model.model), params(&reference.model.model));
        let max_diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            max_diff == 0.0,
            "resumed weights differ from the reference by up to {max_diff}"
        );
        let steps = |h: &[EvalRecord]| h.iter().map(|r| r.step).collect::<Vec<_>>();
        assert_eq!(steps(&resumed.report.history), vec![20, 40, 60]);
        // Equal up to the last digit of the decimal text the history is stored in.
        // Iteration speed is a timing, the one train metric that may differ.
        let same = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
            a.len() == b.len()
                && a.iter()
                    .filter(|(k, _)| k.as_str() != "Iteration Speed")
                    .all(|(k, v)| (v - b[k]).abs() <= 1e-12 * v.abs().max(1.0))
        };
        for (a, b) in resumed.report.history.iter().zip(&reference.report.history) {
            assert!(same(&a.valid, &b.valid), "evaluation at step {}", a.step);
        }
        assert!(same(
            &resumed.report.history[0].train,
            &reference.report.history[0].train
        ));
    }
}
