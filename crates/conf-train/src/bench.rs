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
use crate::profile::{ProfileRequest, ProfileSummary, profile_steps};
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
    /// Timed steps an objective runs before the next takes its turn.
    pub turn_steps: usize,
    /// Steps each objective runs under libtorch's profiler after its timed ones (tch backends).
    pub profile: Option<ProfileRequest>,
}

impl BenchSettings {
    /// Every step an objective runs: warm-up, timed and profiled.
    fn steps(&self) -> usize {
        self.warmup_steps + self.timed_steps + self.profile.as_ref().map_or(0, |p| p.steps)
    }
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
    /// The profiled steps, when asked for.
    pub profile: Option<ProfileSummary>,
}

/// Times each of `objectives`' training steps, the objectives taking turns: after each one's
/// warm-up, every objective runs `turn_steps` timed steps, then the next, round the list until
/// each has run `timed_steps`. A slow spell of a shared host then falls on all of them alike,
/// so their ratios to one another keep to the code's. Each model is built from the device's
/// generator seeded with `settings.seed`, and trains as it would alone. With
/// `settings.profile`, each objective then runs its profiled steps, its trace written to
/// `OBJECTIVE.trace.json` in the request's folder; a profile that fails is a warning, the
/// timings stand.
pub fn time_objectives(
    objectives: &[ObjectiveKind],
    model: &ConfidenceGptConfig,
    confidence: ConfidenceSettings,
    corpus: &Corpus,
    split: &Split,
    settings: &BenchSettings,
    device: &Device,
) -> Vec<ObjectiveTiming> {
    let device = settings.execution.training_device(device);
    let start = |objective| {
        device.seed(settings.seed);
        let trainee = ObjectiveTrainee::new(
            objective,
            model,
            settings.precision,
            confidence,
            settings.optimizer.grad_clip,
            &device,
        );
        let parameters = trainee.parameters();
        let (extra_passes, step) = match trainee {
            ObjectiveTrainee::Standard(t) => (
                t.objective.extra_forward_passes(settings.seq_len),
                step_loop(t, corpus, split, settings),
            ),
            ObjectiveTrainee::Confidence(t) => (
                t.objective.extra_forward_passes(settings.seq_len),
                step_loop(t, corpus, split, settings),
            ),
        };
        StepRun {
            parameters,
            flops_per_token: flops_per_token(parameters, &model.gpt, extra_passes),
            step,
            timed_steps: 0,
            seconds: 0.0,
            last_lm_loss: f64::NAN,
        }
    };
    let mut runs: Vec<StepRun> = objectives.iter().copied().map(start).collect();
    for run in &mut runs {
        for _ in 0..settings.warmup_steps {
            run.step();
        }
    }
    for turn in turns(settings.timed_steps, settings.turn_steps) {
        for run in &mut runs {
            run.timed(turn);
        }
    }
    let mut profiles = Vec::with_capacity(runs.len());
    for (run, objective) in runs.iter_mut().zip(objectives) {
        let Some(request) = &settings.profile else {
            profiles.push(None);
            continue;
        };
        let trace = request.dir.join(format!("{}.trace.json", objective.name()));
        // The reported loss stays the last timed step's.
        let timed_loss = run.last_lm_loss;
        let profile = profile_steps(&device, request.steps, &trace, || run.step());
        run.last_lm_loss = timed_loss;
        profiles.push(
            profile
                .inspect_err(|e| tracing::warn!("{}: no profile: {e}", objective.name()))
                .ok(),
        );
    }
    runs.into_iter()
        .zip(profiles)
        .map(|(run, profile)| run.timing(settings, profile))
        .collect()
}

/// The length of each turn when `timed` steps are run `turn_steps` at a time.
fn turns(timed: usize, turn_steps: usize) -> impl Iterator<Item = usize> {
    let turn_steps = turn_steps.max(1);
    (0..timed)
        .step_by(turn_steps)
        .map(move |done| turn_steps.min(timed - done))
}

/// One objective's training loop, advanced a step at a time, with the time its timed steps took.
struct StepRun {
    parameters: usize,
    flops_per_token: f64,
    /// Runs the next optimizer step and waits for the device; returns the step's LM loss.
    step: Box<dyn FnMut() -> f64>,
    timed_steps: usize,
    seconds: f64,
    last_lm_loss: f64,
}

impl StepRun {
    fn step(&mut self) {
        self.last_lm_loss = (self.step)();
    }

    /// Runs `steps` timed steps.
    fn timed(&mut self, steps: usize) {
        let started = Instant::now();
        for _ in 0..steps {
            self.step();
        }
        self.seconds += started.elapsed().as_secs_f64();
        self.timed_steps += steps;
    }

    fn timing(self, settings: &BenchSettings, profile: Option<ProfileSummary>) -> ObjectiveTiming {
        let tokens = (self.timed_steps * settings.batch_size * settings.seq_len) as f64;
        ObjectiveTiming {
            parameters: self.parameters,
            flops_per_token: self.flops_per_token,
            timing: StepTiming {
                timed_steps: self.timed_steps,
                ms_per_step: 1e3 * self.seconds / self.timed_steps as f64,
                tokens_per_second: tokens / self.seconds,
                last_lm_loss: self.last_lm_loss,
            },
            profile,
        }
    }
}

/// The optimizer steps of `trainee` (on an autodiff device), one per call, each waited for on
/// the device (asynchronous devices, GPUs, queue the step); a call returns the step's LM loss.
fn step_loop<M, O>(
    mut trainee: Trainee<M, O>,
    corpus: &Corpus,
    split: &Split,
    settings: &BenchSettings,
) -> Box<dyn FnMut() -> f64>
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    let device = trainee.devices()[0].clone();
    let batches = TrainBatches::new(
        corpus,
        split,
        settings.seq_len,
        settings.batch_size,
        settings.steps(),
        settings.seed,
        device.clone(),
    );
    let mut optim = adamw(&trainee, &settings.optimizer);
    let lr = ModuleLearningRate::from(settings.optimizer.learning_rate);
    let workers = settings.execution.parallel_devices().unwrap_or_default();
    trainee.set_data_parallel(workers.len().max(1));
    let mut trainee = Some(trainee);
    let mut step = 0;
    Box::new(move || {
        let current = trainee.take().expect("the trainee is back after each step");
        let (grads, lm_loss) = if workers.is_empty() {
            let output = current.step(batches.batch(step).expect("window in range"));
            (output.grads, output.item.lm_loss().into_scalar::<f64>())
        } else {
            parallel_step(&current, &batches, step, &workers)
        };
        trainee = Some(current.optimize(&mut optim, lr.clone(), grads));
        device.sync().expect("the device finishes the step");
        step += 1;
        lm_loss
    })
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

#[cfg(test)]
mod tests {
    use super::turns;

    #[test]
    fn turns_cover_the_timed_steps_with_a_short_last_one() {
        let of = |timed, turn| turns(timed, turn).collect::<Vec<_>>();
        assert_eq!(of(10, 4), [4, 4, 2]);
        assert_eq!(of(6, 3), [3, 3]);
        assert_eq!(of(2, 5), [2]);
        assert_eq!(of(3, 0), [1, 1, 1], "at least a step a turn");
        assert!(of(0, 5).is_empty());
    }
}
