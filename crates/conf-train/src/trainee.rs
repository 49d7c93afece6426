//! A model and its objective as burn-train's learner model: `TrainStep` runs the objective
//! (pass 1 under autodiff, the rest without), clips the global gradient norm and steps AdamW;
//! `InferenceStep` runs the same objective on the evaluation windows.

use std::sync::Arc;

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::{Module, ModuleDisplay};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use conf_model::fused::on_cpu_pool;
use conf_model::{ConfidenceAwareGpt, ConfidenceGptConfig, MiniGpt, Precision};

use crate::weights::{AnyModel, Architecture};

use crate::batch::LookaheadBatch;
use crate::checkpoint::StepTracker;
use crate::objective::{
    ConfidenceSettings, DenseObjective, Objective, ObjectiveKind, SeedObjective, StandardObjective,
    TeacherObjective,
};
use crate::optim::clip_global_norm;
use crate::step::StepOutput;

/// `model` trained with `objective`.
///
/// The objective's type is a parameter of its own (in practice `Arc<dyn Objective<M>>`, see
/// [`ModelTrainee`]) because Burn's `Module` derive refuses a skipped field that names the
/// module's type parameter.
#[derive(Module, Debug)]
pub struct Trainee<M, O> {
    pub model: M,
    #[module(skip)]
    pub objective: O,
    /// Maximum global L2 norm of the gradient, applied before each optimizer step.
    #[module(skip)]
    grad_clip: f64,
    /// Counts the optimizer steps, records their learning rate and saves checkpoints; set by
    /// `training::fit` (a trainee timed alone has none).
    #[module(skip)]
    tracker: Option<Arc<StepTracker>>,
    /// The devices a step's batch is split across; each worker's gradient is scaled by its
    /// reciprocal, so that their sum is the gradient of the whole batch's mean loss.
    #[module(skip)]
    parts: usize,
}

/// A trainee whose objective is chosen at run time.
pub type ModelTrainee<M> = Trainee<M, Arc<dyn Objective<M>>>;

impl<M, O> Trainee<M, O> {
    pub fn new(model: M, objective: O, grad_clip: f64) -> Self {
        Self {
            model,
            objective,
            grad_clip,
            tracker: None,
            parts: 1,
        }
    }

    pub(crate) fn set_data_parallel(&mut self, parts: usize) {
        self.parts = parts;
    }

    pub(crate) fn set_tracker(&mut self, tracker: Arc<StepTracker>) {
        self.tracker = Some(tracker);
    }
}

impl<M, O> TrainStep for Trainee<M, O>
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    type Input = LookaheadBatch;
    type Output = StepOutput;

    fn step(&self, batch: LookaheadBatch) -> TrainOutput<StepOutput> {
        let device = batch.tokens.device();
        let step = || {
            let output = self.objective.compute(&self.model, batch);
            let grads = if self.parts > 1 {
                (output.total.clone() / self.parts as f64).backward()
            } else {
                output.total.backward()
            };
            (output, grads)
        };
        // A data-parallel worker's part stays on its own thread, outside rayon's pool, so
        // that the workers' steps never wait on each other inside the pool.
        let (output, grads) = if self.parts > 1 {
            step()
        } else {
            on_cpu_pool(&device, step)
        };
        TrainOutput::new(self, grads, StepOutput::new(output))
    }

    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> Self {
        let tracker = self.tracker.clone();
        let rate = lr.base();
        let device = self.devices().into_iter().next();
        let update = || {
            clip_global_norm(&self, &mut grads, self.grad_clip);
            optim.step(lr, self, grads)
        };
        // On flex, the clipping and AdamW's fused updates run on the pool too.
        let trainee = match device {
            Some(device) => on_cpu_pool(&device, update),
            None => update(),
        };
        if let Some(tracker) = tracker {
            tracker.after_step(&trainee, optim, rate);
        }
        trainee
    }
}

impl<M, O> InferenceStep for Trainee<M, O>
where
    M: Module + ModuleDisplay + Sync + 'static,
    O: Objective<M> + Clone + 'static,
{
    type Input = LookaheadBatch;
    type Output = StepOutput;

    fn step(&self, batch: LookaheadBatch) -> StepOutput {
        let device = batch.tokens.device();
        StepOutput::new(on_cpu_pool(&device, || {
            self.objective.compute(&self.model, batch)
        }))
    }
}

/// The trainee an objective implies: `standard` trains the parameter-matched MiniGPT, the
/// confidence objectives train ConfidenceAwareGPT.
pub enum ObjectiveTrainee {
    Standard(ModelTrainee<MiniGpt>),
    Confidence(ModelTrainee<ConfidenceAwareGpt>),
}

impl ObjectiveTrainee {
    /// Builds (and so initialises, from the device's generator) the model `objective` trains,
    /// its products in `precision`.
    pub fn new(
        objective: ObjectiveKind,
        model: &ConfidenceGptConfig,
        precision: Precision,
        confidence: ConfidenceSettings,
        grad_clip: f64,
        device: &Device,
    ) -> Self {
        let architecture = Architecture::of(objective, model);
        Self::with_model(
            objective,
            AnyModel::init(&architecture, device).with_precision(precision),
            confidence,
            grad_clip,
        )
    }

    /// `model` (built for [`Architecture::of`] this objective) with its objective.
    pub fn with_model(
        objective: ObjectiveKind,
        model: AnyModel,
        confidence: ConfidenceSettings,
        grad_clip: f64,
    ) -> Self {
        let (objective, model): (Arc<dyn Objective<ConfidenceAwareGpt>>, _) =
            match (objective, model) {
                (ObjectiveKind::Standard, AnyModel::Standard(standard)) => {
                    return Self::Standard(Trainee::new(
                        standard,
                        Arc::new(StandardObjective),
                        grad_clip,
                    ));
                }
                (ObjectiveKind::Seed, AnyModel::Confidence(m)) => {
                    (Arc::new(SeedObjective(confidence)), m)
                }
                (ObjectiveKind::Dense, AnyModel::Confidence(m)) => {
                    (Arc::new(DenseObjective(confidence)), m)
                }
                (ObjectiveKind::Teacher, AnyModel::Confidence(m)) => {
                    (Arc::new(TeacherObjective(confidence)), m)
                }
                (objective @ ObjectiveKind::Standard, AnyModel::Confidence(_))
                | (
                    objective @ (ObjectiveKind::Seed
                    | ObjectiveKind::Dense
                    | ObjectiveKind::Teacher),
                    AnyModel::Standard(_),
                ) => {
                    unreachable!("Architecture::of gives {} another model", objective.name())
                }
            };
        Self::Confidence(Trainee::new(model, objective, grad_clip))
    }

    pub fn parameters(&self) -> usize {
        match self {
            Self::Standard(t) => t.model.num_params(),
            Self::Confidence(t) => t.model.num_params(),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::data::dataloader::batcher::Batcher;
    use burn::module::{ModuleVisitor, Param};
    use conf_model::GptConfig;

    use super::*;
    use crate::LookaheadBatcher;
    use crate::lookahead::ConfInput;

    /// Under data parallel each worker's gradient is scaled so that the workers' sum is the
    /// gradient of the whole batch's mean loss, which clipping and AdamW then see.
    #[test]
    fn the_parts_gradients_sum_to_the_whole_batch_gradient() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let model = ConfidenceGptConfig::new(GptConfig::new(11, 8, 16, 1, 2, 32)).init(&device);
        let objective = DenseObjective(ConfidenceSettings {
            alpha: 1.0,
            conf_input: ConfInput::SelfConditioned,
        });
        let windows: Vec<conf_data::Window> = (0..4)
            .map(|i| conf_data::Window {
                index: i,
                tokens: (0..10).map(|t| ((t * 7 + i * 3) % 11) as u32).collect(),
            })
            .collect();
        let batch =
            |w: &[conf_data::Window]| LookaheadBatcher { seed: 2 }.batch(w.to_vec(), &device);
        let whole = Trainee::new(model, objective, 1.0);
        let mut part = whole.clone();
        part.set_data_parallel(2);
        let all = TrainStep::step(&whole, batch(&windows)).grads;
        let first = TrainStep::step(&part, batch(&windows[..2])).grads;
        let second = TrainStep::step(&part, batch(&windows[2..])).grads;

        /// Per parameter: the largest |whole − summed| and the largest |whole|.
        struct Compare<'a>(
            &'a GradientsParams,
            &'a GradientsParams,
            &'a GradientsParams,
            Vec<(f32, f32)>,
        );
        impl ModuleVisitor for Compare<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let get = |g: &GradientsParams| g.get::<D>(param.id).expect("a gradient");
                let whole = get(self.0);
                let summed = get(self.1) + get(self.2);
                let scale = whole.clone().abs().max().into_scalar::<f32>();
                let gap = (whole - summed).abs().max().into_scalar::<f32>();
                self.3.push((gap, scale));
            }
        }
        let mut compare = Compare(&all, &first, &second, Vec::new());
        whole.model.visit(&mut compare);
        assert!(compare.3.len() > 10, "every parameter compared");
        // Some gradients are zero up to rounding (attention's key bias: softmax ignores a
        // shift), so each is held to its own scale with a floor at a thousandth of the largest.
        let largest = compare.3.iter().map(|c| c.1).fold(0.0, f32::max);
        for (index, (gap, scale)) in compare.3.iter().enumerate() {
            assert!(
                *gap <= 1e-5 * scale.max(1e-3 * largest),
                "parameter {index}: {gap} of {scale} (largest {largest})"
            );
        }
    }
}
