//! Checkpoints every `save_interval` optimizer steps and at the end: model, optimizer and the
//! run state (step, evaluation history), each file written atomically, in a directory per step,
//! with the `latest` pointer rewritten last. A crash therefore leaves `latest` naming a complete
//! set; a checkpoint is written only when every parameter is finite, so a run that diverges
//! keeps its last good one. The learning-rate schedule, the data order and the sampling noise
//! are functions of the step, so (model, optimizer, step) is all a resume needs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use conf_data::write_atomic;
use serde::{Deserialize, Serialize};

use crate::history::{EvalRecord, TrainingLog};

const LATEST: &str = "latest";
const MODEL: &str = "model.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const STATE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn file_error(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The run state stored beside the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    pub history: Vec<EvalRecord>,
}

/// A loaded checkpoint.
pub struct Restored {
    pub model: ModuleRecord,
    pub optimizer: Bytes,
    pub state: CheckpointState,
}

/// Follows the optimizer steps of a run: the trainee reports each one (from
/// `TrainStep::optimize`, the one place burn-train hands it the updated model and optimizer),
/// and the tracker records its learning rate in the run's log and saves a checkpoint when one
/// is due. Shared by the trainee and the caller.
#[derive(Debug)]
pub struct StepTracker {
    dir: PathBuf,
    save_interval: usize,
    total_steps: usize,
    step: AtomicUsize,
    log: Arc<Mutex<TrainingLog>>,
    /// The last step saved (0 before any).
    saved: AtomicUsize,
}

impl StepTracker {
    pub fn new(
        dir: PathBuf,
        save_interval: usize,
        total_steps: usize,
        start_step: usize,
        log: Arc<Mutex<TrainingLog>>,
    ) -> Self {
        Self {
            dir,
            save_interval,
            total_steps,
            step: AtomicUsize::new(start_step),
            log,
            saved: AtomicUsize::new(start_step),
        }
    }

    pub fn last_saved(&self) -> Option<usize> {
        Some(self.saved.load(Ordering::SeqCst)).filter(|&s| s > 0)
    }

    /// Counts one optimizer step taken at learning rate `lr`, and saves when a checkpoint is
    /// due and the weights are finite.
    pub fn after_step<M: Module>(&self, module: &M, optimizer: &ModuleOptimizer, lr: f64) {
        let step = self.step.fetch_add(1, Ordering::SeqCst) + 1;
        self.log.lock().expect("training log lock").lr = lr;
        let due = step.is_multiple_of(self.save_interval) || step == self.total_steps;
        if !due || !all_finite(module) {
            return;
        }
        let history = self.log.lock().expect("training log lock").records.clone();
        match self.save(module, optimizer, CheckpointState { step, history }) {
            Ok(()) => self.saved.store(step, Ordering::SeqCst),
            Err(e) => tracing::error!("checkpoint at step {step} failed: {e}"),
        }
    }

    fn save<M: Module>(
        &self,
        module: &M,
        optimizer: &ModuleOptimizer,
        state: CheckpointState,
    ) -> Result<(), CheckpointError> {
        let dir = self.dir.join(format!("step-{:07}", state.step));
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
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let stale = path.is_dir()
                    && path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("step-") && *n != *name);
                if stale {
                    let _ = fs::remove_dir_all(path);
                }
            }
        }
        Ok(())
    }
}

/// The checkpoint `latest` names in `dir`, if there is one.
pub fn restore(dir: &Path) -> Result<Option<Restored>, CheckpointError> {
    let latest = dir.join(LATEST);
    let Ok(name) = fs::read_to_string(&latest) else {
        return Ok(None);
    };
    let set = dir.join(name.trim());
    let read = |file: &str| fs::read(set.join(file)).map_err(|e| file_error(&set.join(file), e));
    let state: CheckpointState =
        serde_json::from_slice(&read(STATE)?).map_err(|e| file_error(&set.join(STATE), e))?;
    let model = ModuleRecord::from_bytes(Bytes::from_bytes_vec(read(MODEL)?))
        .map_err(|e| file_error(&set.join(MODEL), e))?;
    let optimizer = Bytes::from_bytes_vec(read(OPTIMIZER)?);
    Ok(Some(Restored {
        model,
        optimizer,
        state,
    }))
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
