//! One training run of one model through burn-train's Learner.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleDisplay};
use burn::prelude::Device;
use burn::train::logger::FileMetricLogger;
use burn::train::metric::IterationSpeedMetric;
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, SupervisedTraining,
};
use conf_data::{Corpus, EvalWindows, Split};
use serde::{Deserialize, Serialize};

use crate::batch::LookaheadBatcher;
use crate::checkpoint::{CheckpointError, RunIdentity, StepTracker, TrackerStart};
use crate::history::{EvalRecord, HistoryLogger, TrainingLog};
use crate::loader::{StepLoader, StepTimer, TrainBatches};
use crate::metrics::{LookaheadMetric, MetricValues, Samples};
use crate::objective::Objective;
use crate::optim::{OptimizerSettings, adamw, warmup_cosine};
use crate::renderer::QuietRenderer;
use crate::stop::{RunStatus, StopRequest};
use crate::trainee::Trainee;

/// The schedule and data of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSettings {
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
    /// How the steps execute; not part of a run's identity (it changes no result beyond
    /// float rounding), so it is not serialised.
    #[serde(skip)]
    pub execution: Execution,
}

/// How a run's steps execute: what it changes is memory, time and where the work happens, not
/// the maths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Execution {
    /// Keep only compute-bound results (matmuls, embeddings, reductions) for the backward pass
    /// and recompute the memory-bound ones (element-wise, GELU, reshapes) from them: less
    /// memory, more time. Burn's `BalancedCheckpointing`.
    pub gradient_checkpointing: bool,
    /// Data parallel: every step's batch is split evenly across these devices (one worker
    /// each) and the gradients are summed on the first, where the optimizer steps. Fewer than
    /// two: the model's own device alone.
    pub devices: Vec<Device>,
}

impl Execution {
    /// `device` as training needs it: with autodiff, and gradient checkpointing when asked.
    /// A model trained with checkpointing must be built on this device: its parameters carry
    /// the strategy, and moving a module does not change it.
    pub fn training_device(&self, device: &Device) -> Device {
        let device = device.clone().autodiff();
        if self.gradient_checkpointing {
            device.gradient_checkpointing()
        } else {
            device
        }
    }

    /// Whether a step's `batch_size` windows split evenly across the devices.
    pub fn check_batch_size(&self, batch_size: usize) -> Result<(), String> {
        let devices = self.devices.len();
        if devices > 1 && !batch_size.is_multiple_of(devices) {
            return Err(format!(
                "batch_size {batch_size} does not split evenly across the {devices} devices of --devices"
            ));
        }
        Ok(())
    }

    /// The data-parallel devices prepared for training, when there are at least two.
    pub fn parallel_devices(&self) -> Option<Vec<Device>> {
        (self.devices.len() > 1).then(|| {
            self.devices
                .iter()
                .map(|d| self.training_device(d))
                .collect()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{name} must be at least 1, got 0")]
    NotPositive { name: &'static str },
    #[error("{0}")]
    Settings(String),
    #[error("{0}")]
    NonFinite(String),
    /// The run's output directory cannot be made.
    #[error("{path}: cannot write the run's outputs there: {message}")]
    Output { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
}

impl TrainError {
    /// Whether the caller's input is at fault (settings, output place, a checkpoint that does
    /// not fit) rather than the run.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::NotPositive { .. } | Self::Settings(_) | Self::Output { .. } => true,
            Self::Checkpoint(e) => matches!(e, CheckpointError::Mismatch(_)),
            Self::Weights(_) => true,
            Self::NonFinite(_) => false,
        }
    }
}

/// What a run returns besides the model. Times and rates cover the whole run, over every
/// resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingReport {
    pub history: Vec<EvalRecord>,
    /// Optimizer steps trained (fewer than configured when the run was stopped).
    pub steps_trained: usize,
    /// The whole run, evaluations included.
    pub wall_seconds: f64,
    /// Training steps only (from the first batch request of each epoch to its end).
    pub train_seconds: f64,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
}

pub struct TrainedModel<T> {
    pub model: T,
    pub status: RunStatus,
    pub report: TrainingReport,
    /// The step of the last checkpoint written, if any.
    pub checkpoint_step: Option<usize>,
}

impl TrainingSettings {
    /// The counts that must be at least 1; the error names the first that is 0.
    pub fn validate(&self) -> Result<(), TrainError> {
        for (name, value) in [
            ("training_steps", self.training_steps),
            ("eval_interval", self.eval_interval),
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("save_interval", self.save_interval),
        ] {
            if value == 0 {
                return Err(TrainError::NotPositive { name });
            }
        }
        self.execution
            .check_batch_size(self.batch_size)
            .map_err(TrainError::Settings)
    }
}

/// Trains `trainee` (built on an autodiff device) on `corpus` and evaluates it every
/// `eval_interval` steps on the fixed evaluation windows, showing its objective's metrics.
///
/// A run stopped from the dashboard or through `stop` ends at the step in progress, saves a
/// checkpoint there and returns what it trained with its [`RunStatus`]; a non-finite loss is an
/// error that keeps the last good checkpoint.
pub fn fit<M, O>(
    trainee: Trainee<M, O>,
    corpus: &Corpus,
    split: &Split,
    settings: &TrainingSettings,
    stop: &StopRequest,
) -> Result<TrainedModel<Trainee<M, O>>, TrainError>
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    settings.validate()?;
    std::fs::create_dir_all(&settings.artifact_dir).map_err(|e| TrainError::Output {
        path: settings.artifact_dir.clone(),
        message: e.to_string(),
    })?;
    let mut trainee = trainee;
    let device = trainee.devices()[0].clone();
    let metrics = trainee.objective.metrics();
    let step_timer = StepTimer::default();
    let batches = TrainBatches::new(
        corpus,
        split,
        settings.seq_len,
        settings.batch_size,
        settings.training_steps,
        settings.seed,
        device.clone(),
    );
    let parallel = settings.execution.parallel_devices();
    let parts = parallel.as_ref().map_or(1, Vec::len);
    let train_loader = StepLoader::new(batches, settings.eval_interval, settings.training_steps)
        .with_timer(step_timer.clone())
        .split_into(parts);
    trainee.set_data_parallel(parts);
    let valid_loader = DataLoaderBuilder::new(LookaheadBatcher {
        seed: settings.seed,
    })
    .batch_size(settings.batch_size)
    .build(eval_windows(corpus, split, settings));

    let mut optim = adamw(&trainee, &settings.optimizer);
    let mut scheduler = warmup_cosine(&settings.optimizer, settings.training_steps)
        .map_err(TrainError::Settings)?;
    let log = Arc::new(Mutex::new(TrainingLog::default()));
    let identity = RunIdentity::of(settings, &trainee);

    let checkpoints = settings.artifact_dir.join(crate::checkpoint::CHECKPOINTS);
    let mut start = TrackerStart {
        step: 0,
        train_seconds: 0.0,
        wall_seconds: 0.0,
    };
    if settings.resume {
        let restored = crate::checkpoint::restore(&checkpoints)?;
        if let Some(difference) = identity.difference(&restored.state.identity) {
            return Err(CheckpointError::Mismatch(format!(
                "--resume: {difference} ({}); resume with the run's own settings",
                checkpoints.display()
            ))
            .into());
        }
        start = TrackerStart {
            step: restored.state.step,
            train_seconds: restored.state.train_seconds,
            wall_seconds: restored.state.wall_seconds,
        };
        tracing::info!(step = start.step, "resuming from {}", checkpoints.display());
        trainee = trainee.load_record(restored.model);
        optim = optim
            .from_bytes(restored.optimizer)
            .map_err(|e| TrainError::Settings(format!("{}: {e}", checkpoints.display())))?;
        let mut log = log.lock().expect("training log lock");
        for step in 1..=start.step {
            log.record_lr(step, scheduler.step().base());
        }
        train_loader.set_next_step(start.step);
        log.records = restored.state.history;
    } else if crate::checkpoint::has_checkpoints(&checkpoints) {
        // Never silently replace an earlier run's checkpoints.
        return Err(CheckpointError::Mismatch(format!(
            "{} holds the checkpoints of an earlier run: --resume continues it; remove the directory to start over",
            checkpoints.display()
        ))
        .into());
    }
    let first = start.step;
    let dashboard = !settings.no_tui && std::io::stdout().is_terminal();
    let tracker = Arc::new(StepTracker::new(
        checkpoints,
        settings.save_interval,
        settings.training_steps,
        start,
        log.clone(),
        identity,
        step_timer.clone(),
        (!dashboard).then_some(PROGRESS_EVERY),
    ));
    trainee.set_tracker(tracker.clone());
    let spe = settings.eval_interval;
    let num_epochs = if first >= settings.training_steps {
        0
    } else {
        settings.training_steps.div_ceil(spe) - first / spe
    };

    // A checkpoint taken at an evaluation step precedes that evaluation: redo it.
    let evaluated = |log: &Arc<Mutex<TrainingLog>>| {
        log.lock()
            .expect("training log lock")
            .records
            .iter()
            .any(|r| r.step == first)
    };
    if first > 0
        && (first.is_multiple_of(spe) || first == settings.training_steps)
        && !evaluated(&log)
    {
        let (valid, _) = evaluate(&trainee.valid(), corpus, split, settings);
        let mut log = log.lock().expect("training log lock");
        let record = EvalRecord {
            step: first,
            lr: log.lr_at(first),
            valid,
            ..EvalRecord::default()
        };
        log.records.push(record);
    }

    let mut training =
        SupervisedTraining::new(&settings.artifact_dir, Arc::new(train_loader), valid_loader)
            .num_epochs(num_epochs);
    if let Some(devices) = parallel {
        training = training.with_training_strategy(
            ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice).into(),
        );
    }
    let interrupter = training.interrupter();
    tracker.watch(interrupter.clone());
    stop.attach(interrupter.clone());
    let history = HistoryLogger::new(
        log.clone(),
        settings.eval_interval,
        settings.training_steps,
        first,
        parts,
        !dashboard,
        interrupter,
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
    let mut shown = metrics.to_vec();
    shown.sort_by_key(|k| k.dashboard_rank());
    for kind in shown {
        if kind.on_training_steps() {
            training = training.metric_train_numeric(LookaheadMetric::new(kind));
        }
        training = training.metric_valid_numeric(LookaheadMetric::new(kind));
    }

    let (model, interrupted) = if num_epochs == 0 {
        (trainee.valid(), None)
    } else {
        let result = training.launch(Learner::new(trainee, optim, scheduler));
        (result.model, result.interrupted)
    };
    stop.detach();
    step_timer.end_epoch();

    let log = std::mem::take(&mut *log.lock().expect("training log lock"));
    if let Some(failure) = log.failure {
        let kept = match tracker.last_saved() {
            Some(step) => format!(
                "the last good checkpoint (step {step}) is in {}",
                settings
                    .artifact_dir
                    .join(crate::checkpoint::CHECKPOINTS)
                    .display()
            ),
            None => "no checkpoint was written before it".to_string(),
        };
        return Err(TrainError::NonFinite(format!("{failure}; {kept}")));
    }
    let steps = tracker.steps();
    let status = match (interrupted, stop.requested()) {
        _ if steps >= settings.training_steps => RunStatus::Complete,
        (_, Some(_)) => RunStatus::Interrupted,
        _ => RunStatus::Stopped,
    };
    let (train_seconds, wall_seconds) = tracker.seconds();
    let tokens = (steps * settings.batch_size * settings.seq_len) as f64;
    let rate = |value: f64| if steps == 0 { 0.0 } else { value };
    Ok(TrainedModel {
        checkpoint_step: tracker.last_saved(),
        model,
        status,
        report: TrainingReport {
            history: log.records,
            steps_trained: steps,
            wall_seconds,
            train_seconds,
            ms_per_step: rate(train_seconds * 1000.0 / steps.max(1) as f64),
            tokens_per_second: rate(tokens / train_seconds.max(f64::MIN_POSITIVE)),
        },
    })
}

/// How often plain output prints a progress line between evaluations.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The fixed evaluation windows of a run.
fn eval_windows(corpus: &Corpus, split: &Split, settings: &TrainingSettings) -> EvalWindows {
    EvalWindows::new(
        corpus.tokens.clone(),
        split.val.clone(),
        settings.seq_len,
        settings.eval_windows,
    )
}

/// Every metric of the trainee's objective on the fixed evaluation windows, with the samples
/// they came from, computed by its inference step (the same conditioning and lookahead as
/// training).
pub fn evaluate<M, O>(
    trainee: &Trainee<M, O>,
    corpus: &Corpus,
    split: &Split,
    settings: &TrainingSettings,
) -> (MetricValues, Samples)
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    let device = trainee.devices()[0].clone();
    let batcher = LookaheadBatcher {
        seed: settings.seed,
    };
    let eval = eval_windows(corpus, split, settings);
    let mut samples = Samples::default();
    let indices: Vec<usize> = (0..eval.len()).collect();
    for chunk in indices.chunks(settings.batch_size) {
        let items = chunk.iter().filter_map(|&i| eval.get(i).ok()).collect();
        let output = InferenceStep::step(trainee, batcher.batch(items, &device));
        samples.extend(&output.samples());
    }
    (samples.evaluate(trainee.objective.metrics()), samples)
}
