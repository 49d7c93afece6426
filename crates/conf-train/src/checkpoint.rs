//! Checkpoints every `save_interval` optimizer steps, at the end, and where a run is stopped:
//! model, optimizer and the run state (step, evaluation history, time spent, and what the run
//! must match to be resumed), each file written atomically, in a directory per step, with the
//! `latest` pointer rewritten last. A crash therefore leaves `latest` naming a complete set; a
//! checkpoint is written only when every parameter is finite, so a run that diverges keeps its
//! last good one. The learning-rate schedule, the data order and the sampling noise are
//! functions of the step, so (model, optimizer, step) is all a resume needs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use burn::train::Interrupter;
use conf_data::write_atomic;
use serde::{Deserialize, Serialize};

use crate::history::{EvalRecord, TrainingLog};
use crate::loader::StepTimer;
use crate::optim::named_params;
use crate::training::TrainingSettings;

/// A run's checkpoint directory, inside its artifact directory.
pub const CHECKPOINTS: &str = "checkpoints";
const LATEST: &str = "latest";
pub(crate) const MODEL: &str = "model.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const STATE: &str = "state.json";
const SET_PREFIX: &str = "step-";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// The checkpoint cannot continue this run: a different model or schedule, none at all, or
    /// an earlier run's checkpoints where a fresh run was asked for.
    #[error("{0}")]
    Mismatch(String),
}

fn file_error(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// What a resumed run must share with the run that wrote the checkpoint: its schedule and data
/// (the training settings less where it writes and how it shows progress) and every
/// parameter's path and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub schedule: TrainingSettings,
    pub parameters: Vec<(String, Vec<usize>)>,
}

impl RunIdentity {
    pub fn of<M: Module>(settings: &TrainingSettings, module: &M) -> Self {
        Self {
            schedule: TrainingSettings {
                artifact_dir: PathBuf::new(),
                no_tui: false,
                save_interval: 1,
                resume: false,
                ..settings.clone()
            },
            parameters: named_params(module)
                .into_iter()
                .map(|p| (p.path, p.shape))
                .collect(),
        }
    }

    /// The first difference from `saved`, as a message naming the setting and both values.
    pub fn difference(&self, saved: &RunIdentity) -> Option<String> {
        let as_map = |s: &TrainingSettings| match serde_json::to_value(s) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => Default::default(),
        };
        let (here, there) = (as_map(&self.schedule), as_map(&saved.schedule));
        let setting = here.iter().find_map(|(key, value)| {
            let saved = there.get(key).unwrap_or(&serde_json::Value::Null);
            (value != saved)
                .then(|| format!("{key} is {value} for this run but {saved} in the checkpoint"))
        });
        setting.or_else(|| {
            let differing = self
                .parameters
                .iter()
                .zip(&saved.parameters)
                .find(|(a, b)| a != b);
            match differing {
                Some(((path, here), (_, there))) => Some(format!(
                    "the model differs: {path} has shape {here:?} here but {there:?} in the checkpoint"
                )),
                None if self.parameters.len() != saved.parameters.len() => Some(format!(
                    "the model differs: {} parameters here, {} in the checkpoint",
                    self.parameters.len(),
                    saved.parameters.len()
                )),
                None => None,
            }
        })
    }
}

/// The run state stored beside the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub history: Vec<EvalRecord>,
    /// Seconds of training steps and of the whole run up to this step, over every resume.
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub identity: RunIdentity,
}

/// A loaded checkpoint.
pub struct Restored {
    pub model: ModuleRecord,
    pub optimizer: Bytes,
    pub state: CheckpointState,
}

/// Follows the optimizer steps of a run: the trainee reports each one (from
/// `TrainStep::optimize`, the one place burn-train hands it the updated model and optimizer),
/// and the tracker records its learning rate in the run's log, prints progress when asked, and
/// saves a checkpoint when one is due or the run is being stopped. Shared by the trainee and
/// the caller.
pub struct StepTracker {
    dir: PathBuf,
    save_interval: usize,
    total_steps: usize,
    step: AtomicUsize,
    log: Arc<Mutex<TrainingLog>>,
    identity: RunIdentity,
    /// Time before this launch (restored from a checkpoint), and this launch's clocks.
    earlier: (f64, f64),
    timer: StepTimer,
    launched: Instant,
    /// The run's interrupter: a stop requested through it is saved at the step it ends.
    interrupter: Mutex<Option<Interrupter>>,
    /// Print a progress line at most this often (plain output); never when `None`.
    progress: Option<std::time::Duration>,
    last_progress: Mutex<Instant>,
    /// The last step saved (0 before any).
    saved: AtomicUsize,
}

impl std::fmt::Debug for StepTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepTracker")
            .field("dir", &self.dir)
            .field("step", &self.steps())
            .finish_non_exhaustive()
    }
}

/// Where a tracked run starts.
pub struct TrackerStart {
    pub step: usize,
    pub train_seconds: f64,
    pub wall_seconds: f64,
}

impl StepTracker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: PathBuf,
        save_interval: usize,
        total_steps: usize,
        start: TrackerStart,
        log: Arc<Mutex<TrainingLog>>,
        identity: RunIdentity,
        timer: StepTimer,
        progress: Option<std::time::Duration>,
    ) -> Self {
        Self {
            dir,
            save_interval,
            total_steps,
            step: AtomicUsize::new(start.step),
            log,
            identity,
            earlier: (start.train_seconds, start.wall_seconds),
            timer,
            launched: Instant::now(),
            interrupter: Mutex::new(None),
            progress,
            last_progress: Mutex::new(Instant::now()),
            saved: AtomicUsize::new(start.step),
        }
    }

    pub(crate) fn watch(&self, interrupter: Interrupter) {
        *self.interrupter.lock().expect("interrupter lock") = Some(interrupter);
    }

    /// Optimizer steps taken, over every resume.
    pub fn steps(&self) -> usize {
        self.step.load(Ordering::SeqCst)
    }

    pub fn last_saved(&self) -> Option<usize> {
        Some(self.saved.load(Ordering::SeqCst)).filter(|&s| s > 0)
    }

    /// Seconds of training steps and of the whole run so far, over every resume.
    pub fn seconds(&self) -> (f64, f64) {
        (
            self.earlier.0 + self.timer.seconds(),
            self.earlier.1 + self.launched.elapsed().as_secs_f64(),
        )
    }

    /// Counts one optimizer step taken at learning rate `lr`, and saves when a checkpoint is
    /// due or the run is being stopped, if the weights are finite.
    pub fn after_step<M: Module>(&self, module: &M, optimizer: &ModuleOptimizer, lr: f64) {
        let step = self.step.fetch_add(1, Ordering::SeqCst) + 1;
        self.log
            .lock()
            .expect("training log lock")
            .record_lr(step, lr);
        self.print_progress(step);
        let stopping = self
            .interrupter
            .lock()
            .expect("interrupter lock")
            .as_ref()
            .is_some_and(Interrupter::should_stop);
        let due = step.is_multiple_of(self.save_interval) || step == self.total_steps || stopping;
        if !due || !all_finite(module) {
            return;
        }
        let history = self.log.lock().expect("training log lock").records.clone();
        let (train_seconds, wall_seconds) = self.seconds();
        let state = CheckpointState {
            step,
            history,
            train_seconds,
            wall_seconds,
            identity: self.identity.clone(),
        };
        match self.save(module, optimizer, state) {
            Ok(()) => self.saved.store(step, Ordering::SeqCst),
            Err(e) => tracing::error!("checkpoint at step {step} failed: {e}"),
        }
    }

    fn print_progress(&self, step: usize) {
        let Some(every) = self.progress else {
            return;
        };
        let mut last = self.last_progress.lock().expect("progress lock");
        if last.elapsed() < every {
            return;
        }
        *last = Instant::now();
        let (train_seconds, _) = self.seconds();
        let ms = 1e3 * train_seconds / step.max(1) as f64;
        let left = (self.total_steps - step.min(self.total_steps)) as f64 * ms / 1e3;
        eprintln!(
            "  step {step}/{} · {ms:.1} ms/step · about {left:.0} s of steps left",
            self.total_steps
        );
    }

    fn save<M: Module>(
        &self,
        module: &M,
        optimizer: &ModuleOptimizer,
        state: CheckpointState,
    ) -> Result<(), CheckpointError> {
        let dir = self.dir.join(format!("{SET_PREFIX}{:07}", state.step));
        let model = module
            .clone()
            .into_record()
            .into_bytes()
            .map_err(|e| file_error(&dir.join(MODEL), e))?;
        write_atomic(&dir.join(MODEL), &model).map_err(|e| file_error(&dir.join(MODEL), e))?;
        let optim = optimizer
            .into_bytes()
            .map_err(|e| file_error(&dir.join(OPTIMIZER), e))?;
        write_atomic(&dir.join(OPTIMIZER), &optim)
            .map_err(|e| file_error(&dir.join(OPTIMIZER), e))?;
        let json = serde_json::to_vec_pretty(&state).expect("state serialises");
        write_atomic(&dir.join(STATE), &json).map_err(|e| file_error(&dir.join(STATE), e))?;
        let name = dir
            .file_name()
            .expect("named")
            .to_string_lossy()
            .into_owned();
        write_atomic(&self.dir.join(LATEST), name.as_bytes())
            .map_err(|e| file_error(&self.dir.join(LATEST), e))?;
        // Older sets are no longer needed once `latest` names this one.
        for stale in checkpoint_sets(&self.dir) {
            if stale.file_name().is_some_and(|n| *n != *name) {
                let _ = fs::remove_dir_all(stale);
            }
        }
        Ok(())
    }
}

/// The checkpoint set directories in `dir`.
fn checkpoint_sets(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(SET_PREFIX))
        })
        .collect()
}

/// Whether `dir` holds anything of a checkpoint: the `latest` pointer or a set.
pub fn has_checkpoints(dir: &Path) -> bool {
    dir.join(LATEST).exists() || !checkpoint_sets(dir).is_empty()
}

/// The checkpoint set `latest` names in `dir`. Sets without a `latest` pointer are an error,
/// never silently ignored: they are what is left of an earlier run.
pub fn latest_set(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let latest = dir.join(LATEST);
    match fs::read_to_string(&latest) {
        Ok(name) => Ok(dir.join(name.trim())),
        Err(_) if checkpoint_sets(dir).is_empty() => Err(CheckpointError::Mismatch(format!(
            "there is no checkpoint in {}",
            dir.display()
        ))),
        Err(e) => Err(file_error(
            &latest,
            format!(
                "{e}; the checkpoint sets beside it cannot be trusted without it (remove {} to start over)",
                dir.display()
            ),
        )),
    }
}

/// The optimizer step a checkpoint set was taken at, from its name.
pub fn step_of(set: &Path) -> Option<usize> {
    set.file_name()?
        .to_str()?
        .strip_prefix(SET_PREFIX)?
        .parse()
        .ok()
}

/// The checkpoint `latest` names in `dir`.
pub fn restore(dir: &Path) -> Result<Restored, CheckpointError> {
    let set = latest_set(dir).map_err(|e| match e {
        CheckpointError::Mismatch(message) => CheckpointError::Mismatch(format!(
            "--resume: {message} to continue (drop --resume to start the run)"
        )),
        other => other,
    })?;
    let read = |file: &str| fs::read(set.join(file)).map_err(|e| file_error(&set.join(file), e));
    let state: CheckpointState =
        serde_json::from_slice(&read(STATE)?).map_err(|e| file_error(&set.join(STATE), e))?;
    let model = ModuleRecord::from_bytes(Bytes::from_bytes_vec(read(MODEL)?))
        .map_err(|e| file_error(&set.join(MODEL), e))?;
    let optimizer = Bytes::from_bytes_vec(read(OPTIMIZER)?);
    Ok(Restored {
        model,
        optimizer,
        state,
    })
}

fn all_finite<M: Module>(module: &M) -> bool {
    struct Finite(bool);
    impl ModuleVisitor for Finite {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.0 {
                let sum = param.val().abs().sum().into_scalar::<f64>();
                self.0 = sum.is_finite();
            }
        }
    }
    let mut check = Finite(true);
    module.visit(&mut check);
    check.0
}
