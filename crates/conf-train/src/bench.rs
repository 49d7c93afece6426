//! Timing of training steps alone: batch, objective, backward, clipping and AdamW, without the
//! Learner, evaluation or checkpoints, so backends and objectives compare on the step itself.

use std::time::Instant;

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::{Module, ModuleDisplay};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::train::TrainStep;
use conf_data::{Corpus, Split};
use conf_model::{ConfidenceGptConfig, Precision};
use serde::{Deserialize, Serialize};

use crate::cost::flops_per_token;
use crate::loader::TrainBatches;
use crate::objective::{ConfidenceSettings, Objective, ObjectiveKind};
use crate::optim::{OptimizerSettings, adamw};
use crate::trainee::{ObjectiveTrainee, Trainee};
use crate::training::Execution;

#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Steps run first and not timed (shader compilation, autotuning, allocator growth).
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// Weight decay and clipping as in training, at the constant peak learning rate.
    pub optimizer: OptimizerSettings,
    /// Gradient checkpointing and data parallel, as in training: with several devices each
    /// step's batch is split across them, one worker thread each, gradients summed on the first.
    pub execution: Execution,
    /// The matrix products' precision, as in training.
    pub precision: Precision,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTiming {
    pub timed_steps: usize,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
    /// The LM loss of the last step, to show the steps computed something sensible.
    pub last_lm_loss: f64,
}

/// One objective's step timed, with what its model costs.
#[derive(Debug, Clone)]
pub struct ObjectiveTiming {
    pub parameters: usize,
    /// Training FLOPs per token (see [`crate::cost`]).
    pub flops_per_token: f64,
    pub timing: StepTiming,
}

/// Builds the model `objective` trains from the device's generator, seeded with
/// `settings.seed`, and times its steps.
pub fn time_objective(
    objective: ObjectiveKind,
    model: &ConfidenceGptConfig,
    confidence: ConfidenceSettings,
    corpus: &Corpus,
    split: &Split,
    settings: &BenchSettings,
    device: &Device,
) -> ObjectiveTiming {
    let device = settings.execution.training_device(device);
    device.seed(settings.seed);
    let grad_clip = settings.optimizer.grad_clip;
    let trainee = ObjectiveTrainee::new(
        objective,
        model,
        settings.precision,
        confidence,
        grad_clip,
        &device,
    );
    let parameters = trainee.parameters();
    let (extra_passes, timing) = match trainee {
        ObjectiveTrainee::Standard(t) => (
            t.objective.extra_forward_passes(settings.seq_len),
            time_steps(t, corpus, split, settings),
        ),
        ObjectiveTrainee::Confidence(t) => (
            t.objective.extra_forward_passes(settings.seq_len),
            time_steps(t, corpus, split, settings),
        ),
    };
    ObjectiveTiming {
        parameters,
        flops_per_token: flops_per_token(parameters, &model.gpt, extra_passes),
        timing,
    }
}

/// Runs `warmup_steps + timed_steps` optimizer steps of `trainee` (on an autodiff device) and
/// times the last `timed_steps`, waiting for the device after each step.
pub fn time_steps<M, O>(
    trainee: Trainee<M, O>,
    corpus: &Corpus,
    split: &Split,
    settings: &BenchSettings,
) -> StepTiming
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    let device = trainee.devices()[0].clone();
    let total = settings.warmup_steps + settings.timed_steps;
    let batches = TrainBatches::new(
        corpus,
        split,
        settings.seq_len,
        settings.batch_size,
        total,
        settings.seed,
        device.clone(),
    );
    let mut optim = adamw(&trainee, &settings.optimizer);
    let lr = ModuleLearningRate::from(settings.optimizer.learning_rate);
    let workers = settings.execution.parallel_devices().unwrap_or_default();
    let mut trainee = trainee;
    trainee.set_data_parallel(workers.len().max(1));
    let mut started = Instant::now();
    let mut last_lm_loss = f64::NAN;
    for step in 0..total {
        if step == settings.warmup_steps {
            started = Instant::now();
        }
        let (grads, lm_loss) = if workers.is_empty() {
            let output = trainee.step(batches.batch(step).expect("window in range"));
            (output.grads, output.item.lm_loss().into_scalar::<f64>())
        } else {
            parallel_step(&trainee, &batches, step, &workers)
        };
        trainee = trainee.optimize(&mut optim, lr.clone(), grads);
        // Asynchronous devices (GPUs) have queued the step: wait for all of it.
        device.sync().expect("the device finishes the step");
        last_lm_loss = lm_loss;
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens = (settings.timed_steps * settings.batch_size * settings.seq_len) as f64;
    StepTiming {
        timed_steps: settings.timed_steps,
        ms_per_step: 1e3 * seconds / settings.timed_steps as f64,
        tokens_per_second: tokens / seconds,
        last_lm_loss,
    }
}

/// One step split across `workers` as burn-train's multi-device strategy runs it: each worker
/// thread takes its part of the batch on its device with its own copy of the model, and the
/// gradients are summed on the first device. Returns them with the mean LM loss of the parts.
fn parallel_step<M, O>(
    trainee: &Trainee<M, O>,
    batches: &TrainBatches,
    step: usize,
    workers: &[Device],
) -> (GradientsParams, f64)
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    let parts = workers.len();
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, device)| {
                let worker = trainee.clone().fork(device);
                let batch = batches
                    .on(device)
                    .batch_part(step, (i, parts))
                    .expect("window in range");
                scope.spawn(move || {
                    let output = worker.step(batch);
                    (output.grads, output.item.lm_loss().into_scalar::<f64>())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker finishes its part"))
            .collect()
    });
    let main = &workers[0];
    let mut sum = GradientsAccumulator::<Trainee<M, O>>::new();
    let mut lm_loss = 0.0;
    for (grads, loss) in outputs {
        sum.accumulate(trainee, grads.to_device(main, trainee));
        lm_loss += loss / parts as f64;
    }
    (sum.grads(), lm_loss)
}
