//! The two models as burn-train learner models: `TrainStep` runs the objective (pass 1 under
//! autodiff, the rest without), `InferenceStep` the same objective on the evaluation windows.

use std::sync::Arc;

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use conf_model::{ConfidenceAwareGpt, MiniGpt};

use crate::batch::LookaheadBatch;
use crate::checkpoint::Checkpointer;
use crate::objective::{Objective, StandardObjective};
use crate::optim::clip_global_norm;
use crate::step::StepOutput;

/// Maximum global gradient norm; fixed by the design, as PyTorch's `clip_grad_norm_(…, 1.0)`.
pub const GRAD_CLIP: f64 = 1.0;

/// MiniGPT trained with next-token cross-entropy.
#[derive(Module, Debug)]
pub struct StandardTrainee {
    pub model: MiniGpt,
    #[module(skip)]
    checkpointer: Option<Arc<Checkpointer>>,
}

impl StandardTrainee {
    pub fn new(model: MiniGpt) -> Self {
        Self {
            model,
            checkpointer: None,
        }
    }
}

/// ConfidenceAwareGPT trained with one of the confidence objectives.
#[derive(Module, Debug)]
pub struct ConfidenceTrainee {
    pub model: ConfidenceAwareGpt,
    #[module(skip)]
    pub objective: Arc<dyn Objective<ConfidenceAwareGpt>>,
    #[module(skip)]
    checkpointer: Option<Arc<Checkpointer>>,
}

impl ConfidenceTrainee {
    pub fn new(
        model: ConfidenceAwareGpt,
        objective: Arc<dyn Objective<ConfidenceAwareGpt>>,
    ) -> Self {
        Self {
            model,
            objective,
            checkpointer: None,
        }
    }
}

/// A learner model that saves checkpoints after its optimizer steps.
pub trait Checkpointed {
    fn set_checkpointer(&mut self, checkpointer: Arc<Checkpointer>);
}

impl Checkpointed for StandardTrainee {
    fn set_checkpointer(&mut self, checkpointer: Arc<Checkpointer>) {
        self.checkpointer = Some(checkpointer);
    }
}

impl Checkpointed for ConfidenceTrainee {
    fn set_checkpointer(&mut self, checkpointer: Arc<Checkpointer>) {
        self.checkpointer = Some(checkpointer);
    }
}

fn train_output<M: Module>(module: &M, output: crate::ObjectiveOutput) -> TrainOutput<StepOutput> {
    let grads = output.total.backward();
    TrainOutput::new(module, grads, StepOutput::new(output))
}

fn clipped_step<M: Module>(
    module: M,
    optim: &mut ModuleOptimizer,
    lr: ModuleLearningRate,
    mut grads: GradientsParams,
    checkpointer: Option<Arc<Checkpointer>>,
) -> M {
    clip_global_norm(&module, &mut grads, GRAD_CLIP);
    let module = optim.step(lr, module, grads);
    if let Some(checkpointer) = checkpointer {
        checkpointer.after_step(&module, optim);
    }
    module
}

impl TrainStep for StandardTrainee {
    type Input = LookaheadBatch;
    type Output = StepOutput;

    fn step(&self, batch: LookaheadBatch) -> TrainOutput<StepOutput> {
        train_output(self, StandardObjective.compute(&self.model, batch))
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        let checkpointer = self.checkpointer.clone();
        clipped_step(self, optim, lr, grads, checkpointer)
    }
}

impl InferenceStep for StandardTrainee {
    type Input = LookaheadBatch;
    type Output = StepOutput;

    fn step(&self, batch: LookaheadBatch) -> StepOutput {
        StepOutput::new(StandardObjective.compute(&self.model, batch))
    }
}

impl TrainStep for ConfidenceTrainee {
    type Input = LookaheadBatch;
    type Output = StepOutput;

    fn step(&self, batch: LookaheadBatch) -> TrainOutput<StepOutput> {
        train_output(self, self.objective.compute(&self.model, batch))
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        let checkpointer = self.checkpointer.clone();
        clipped_step(self, optim, lr, grads, checkpointer)
    }
}

impl InferenceStep for ConfidenceTrainee {
    type Input = LookaheadBatch;
    type Output = StepOutput;

    fn step(&self, batch: LookaheadBatch) -> StepOutput {
        StepOutput::new(self.objective.compute(&self.model, batch))
    }
}
