//! Timing of training steps alone: batch, objective, backward, clipping and AdamW, without the
//! Learner, evaluation or checkpoints, so backends and objectives compare on the step itself.

use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::train::TrainStep;
use conf_data::{Corpus, Split, TrainWindows};
use serde::{Deserialize, Serialize};

use crate::batch::{LookaheadBatch, LookaheadBatcher};
use crate::optim::{OptimizerSettings, adamw};
use crate::step::StepOutput;

#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Steps run first and not timed (shader compilation, autotuning, allocator growth).
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub optimizer: OptimizerSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTiming {
    pub timed_steps: usize,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
    /// The LM loss of the last step, to show the steps computed something sensible.
    pub last_lm_loss: f64,
}

/// Runs `warmup_steps + timed_steps` optimizer steps of `trainee` (on an autodiff device) and
/// times the last `timed_steps`, waiting for the device after each step.
pub fn time_steps<M>(
    trainee: M,
    corpus: &Corpus,
    split: &Split,
    settings: &BenchSettings,
) -> StepTiming
where
    M: TrainStep<Input = LookaheadBatch, Output = StepOutput> + Module,
{
    let device = trainee.devices()[0].clone();
    let total = settings.warmup_steps + settings.timed_steps;
    let windows = TrainWindows::new(
        corpus.tokens.clone(),
        split.train.clone(),
        settings.seq_len,
        settings.seed,
        total * settings.batch_size,
    );
    let batcher = LookaheadBatcher {
        seed: settings.seed,
    };
    let mut optim = adamw(&trainee, &settings.optimizer);
    let lr = ModuleLearningRate::from(settings.optimizer.learning_rate);
    let mut trainee = trainee;
    let mut started = Instant::now();
    let mut last_lm_loss = f64::NAN;
    for step in 0..total {
        if step == settings.warmup_steps {
            started = Instant::now();
        }
        let items = (step * settings.batch_size..(step + 1) * settings.batch_size)
            .map(|i| windows.get(i).expect("window in range"))
            .collect();
        let output = trainee.step(batcher.batch(items, &device));
        let lm_loss = output.item.lm_loss();
        trainee = trainee.optimize(&mut optim, lr.clone(), output.grads);
        // Asynchronous devices (GPUs) have queued the step: wait for all of it.
        device.sync().expect("the device finishes the step");
        last_lm_loss = lm_loss.into_scalar::<f64>();
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
