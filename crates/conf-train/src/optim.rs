//! AdamW as PyTorch's: betas (0.9, 0.95), eps 1e-8, decoupled weight decay on every parameter
//! with two or more dimensions, global gradient-norm clipping, warmup then cosine.

use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{
    AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer,
    Optimizer,
};
use burn::prelude::*;
use conf_model::fused::{self, AdamWScalars};

/// Optimizer settings of a run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimizerSettings {
    pub learning_rate: f64,
    pub min_learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Maximum global L2 norm of the gradient (PyTorch's `clip_grad_norm_`).
    pub grad_clip: f64,
}

/// A float parameter with its module path (`blocks.0.attn.query.bias`), its shape and its
/// values flattened.
pub struct NamedParam {
    pub path: String,
    pub shape: Vec<usize>,
    pub values: Tensor<1>,
}

/// Every float parameter of `module`, in visiting order.
pub fn named_params<M: Module>(module: &M) -> Vec<NamedParam> {
    #[derive(Default)]
    struct Collect {
        path: Vec<String>,
        found: Vec<NamedParam>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val();
            self.found.push(NamedParam {
                path: self.path.join("."),
                shape: values.dims().to_vec(),
                values: values.flatten(0, D - 1),
            });
        }
    }
    let mut collect = Collect::default();
    module.visit(&mut collect);
    collect.found
}

/// Paths of the parameters with fewer than two dimensions (biases, gains, the probe bias):
/// the ones AdamW does not decay.
pub fn vector_param_paths<M: Module>(module: &M) -> Vec<String> {
    named_params(module)
        .into_iter()
        .filter(|p| p.shape.len() < 2)
        .map(|p| p.path)
        .collect()
}

/// AdamW with weight decay on matrices only; clipping is global, done before the step.
pub fn adamw<M: Module>(module: &M, settings: &OptimizerSettings) -> ModuleOptimizer {
    let no_decay = ParamGroup::from_paths(vector_param_paths(module));
    ModuleOptimizer::from(AdamW::new(settings.weight_decay)).with_group(
        no_decay,
        AdamW::new(0.0),
        None,
    )
}

/// Burn's AdamW (β (0.9, 0.95), ε 1e-8), with each parameter's update one fused pass on flex
/// and PyTorch's fused kernel on tch-cpu and tch-cuda (`conf_model::fused::adamw`); the state
/// is Burn's, so checkpoints are the same either way.
#[derive(Clone)]
pub struct AdamW {
    burn: burn::optim::AdamW,
    weight_decay: f64,
}

impl AdamW {
    const BETA_1: f32 = 0.9;
    const BETA_2: f32 = 0.95;
    const EPSILON: f32 = 1e-8;

    pub fn new(weight_decay: f64) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(Self::BETA_1)
            .with_beta_2(Self::BETA_2)
            .with_epsilon(Self::EPSILON)
            .with_weight_decay(weight_decay as f32)
            .build();
        Self { burn, weight_decay }
    }
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamWState<D>>,
    ) -> (Tensor<D>, Option<AdamWState<D>>) {
        if !fused::adamw_applies(&tensor) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (moment_1, moment_2, time) = match state {
            Some(s) => (
                s.momentum.moment_1,
                s.momentum.moment_2,
                s.momentum.time + 1,
            ),
            // Zero moments give exactly Burn's first step (`0 · β + g · (1 − β)`).
            None => (grad.zeros_like(), grad.zeros_like(), 1),
        };
        let scalars = AdamWScalars {
            learning_rate: lr as f32,
            beta_1: Self::BETA_1,
            beta_2: Self::BETA_2,
            epsilon: Self::EPSILON,
            keep: (1.0 - lr * self.weight_decay as f32 as f64) as f32,
            step: i32::try_from(time).unwrap_or(i32::MAX),
        };
        let [tensor, moment_1, moment_2] = fused::adamw(tensor, grad, moment_1, moment_2, scalars);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: AdamWState<D>, device: &Device) -> AdamWState<D> {
        burn::optim::AdamW::to_device(state, device)
    }
}

/// Linear warmup to the peak (step k of W gives `peak · (k + 1) / W`), then cosine decay to
/// `min_learning_rate` at the last step. One scheduler step per optimizer step.
pub fn warmup_cosine(
    settings: &OptimizerSettings,
    total_steps: usize,
) -> Result<ModuleLrScheduler, String> {
    let peak = settings.learning_rate;
    let warmup = settings.warmup_steps.min(total_steps.saturating_sub(1));
    let cosine = CosineAnnealingLrSchedulerConfig::new(peak, total_steps - warmup)
        .with_min_lr(settings.min_learning_rate);
    if warmup < 2 {
        return cosine.init();
    }
    let linear = LinearLrSchedulerConfig::new(peak / warmup as f64, peak, warmup - 1);
    SequentialLrSchedulerConfig::new(
        vec![
            LrSchedulerConfig::Linear(linear),
            LrSchedulerConfig::Cosine(cosine),
        ],
        vec![warmup],
    )
    .init()
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, `norm` their joint L2 norm,
/// as PyTorch's `clip_grad_norm_` does; returns that norm, `[1]` (`None` without gradients).
/// On a CPU the norm is read and the gradients are scaled only when it is over the limit. On
/// a GPU the factor stays a tensor on the device and every gradient is scaled: reading it would
/// hold the host until the backward had run, before it could queue the optimizer's update.
pub fn clip_global_norm<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Option<Tensor<1>> {
    let on_cpu = module.devices().first().is_some_and(fused::on_cpu);
    clip_global_norm_reading(module, grads, max_norm, on_cpu)
}

/// [`clip_global_norm`], the norm read on the host or not.
fn clip_global_norm_reading<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
    read_on_host: bool,
) -> Option<Tensor<1>> {
    /// Takes every gradient out flattened (a view), noting its parameter and shape.
    struct Take<'a> {
        grads: &'a mut GradientsParams,
        shapes: Vec<(ParamId, Vec<usize>)>,
        flat: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Take<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.shapes.push((param.id, g.dims().to_vec()));
                self.flat.push(g.flatten(0, D - 1));
            }
        }
    }
    /// Puts them back, in the same order, in their shapes.
    struct Put<'a, I: Iterator<Item = ((ParamId, Vec<usize>), Tensor<1>)>> {
        grads: &'a mut GradientsParams,
        taken: std::iter::Peekable<I>,
    }
    impl<I: Iterator<Item = ((ParamId, Vec<usize>), Tensor<1>)>> ModuleVisitor for Put<'_, I> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(((id, dims), g)) = self.taken.next_if(|((id, _), _)| *id == param.id) {
                let dims: [usize; D] = dims
                    .try_into()
                    .expect("a gradient has its parameter's rank");
                self.grads.register(id, g.reshape(dims));
            }
        }
    }
    let mut take = Take {
        grads,
        shapes: Vec::new(),
        flat: Vec::new(),
    };
    module.visit(&mut take);
    let (shapes, flat) = (take.shapes, take.flat);
    if flat.is_empty() {
        return None;
    }
    // One reduction over all gradients side by side: a copy of them, where a norm per
    // parameter would be a few operations each (on a GPU, kernel launches).
    let norm = Tensor::cat(flat.clone(), 0).powi_scalar(2).sum().sqrt();
    let flat = if read_on_host {
        let value = norm.clone().into_scalar::<f64>();
        if value > max_norm {
            let factor = Tensor::from_floats([(max_norm / (value + 1e-6)) as f32], &norm.device());
            fused::scale_all(flat, factor)
        } else {
            flat
        }
    } else {
        let factor = (norm.clone().add_scalar(1e-6).recip() * max_norm).clamp_max(1.0);
        fused::scale_all(flat, factor)
    };
    module.visit(&mut Put {
        grads,
        taken: shapes.into_iter().zip(flat).peekable(),
    });
    Some(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OptimizerSettings {
        OptimizerSettings {
            learning_rate: 1e-3,
            min_learning_rate: 1e-4,
            warmup_steps: 4,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }

    #[test]
    fn the_schedule_warms_up_linearly_then_decays_by_cosine_to_the_minimum() {
        let mut scheduler = warmup_cosine(&settings(), 20).unwrap();
        let lrs: Vec<f64> = (0..20).map(|_| scheduler.step().base()).collect();
        for (k, expected) in [0.25e-3, 0.5e-3, 0.75e-3, 1e-3].iter().enumerate() {
            assert!((lrs[k] - expected).abs() < 1e-12, "step {k}: {}", lrs[k]);
        }
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]), "{lrs:?}");
        let last = 1e-4 + 0.5 * 0.9e-3 * (1.0 + (15.0 / 16.0 * std::f64::consts::PI).cos());
        assert!((lrs[19] - last).abs() < 1e-12);
        assert!(lrs[19] > 1e-4);
    }

    #[test]
    fn weight_decay_shrinks_matrices_and_spares_vectors() {
        let device = Device::flex().autodiff();
        let model = conf_model::GptConfig::new(7, 8, 16, 2, 2, 32).init_minigpt(&device);
        let ids = Tensor::<2, Int>::from_data([[1, 2, 3, 4, 5, 6, 0, 1]], &device);
        // All-zero gradients: AdamW's update is then the decay alone.
        let loss = model.forward(ids, &conf_model::AttentionMask::Causal).sum() * 0.0;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let before_w = model.blocks[0].mlp.fc.weight.val();
        let before_g = model.blocks[0].ln1.gamma.val();
        let mut optim = adamw(&model, &settings());
        let model = optim.step(0.5, model, grads);
        let ratio = (model.blocks[0].mlp.fc.weight.val() / before_w)
            .mean()
            .into_scalar::<f64>();
        assert!((ratio - (1.0 - 0.5 * 0.1)).abs() < 1e-5, "{ratio}");
        let gain = (model.blocks[0].ln1.gamma.val() - before_g)
            .abs()
            .max()
            .into_scalar::<f64>();
        assert_eq!(gain, 0.0);
    }

    #[test]
    fn the_fused_adamw_steps_exactly_as_burns_adamw() {
        let device = Device::flex().autodiff();
        let burn_adamw = |model: &conf_model::MiniGpt| {
            let config = |decay: f32| {
                AdamWConfig::new()
                    .with_beta_1(0.9)
                    .with_beta_2(0.95)
                    .with_epsilon(1e-8)
                    .with_weight_decay(decay)
            };
            let no_decay = ParamGroup::from_paths(vector_param_paths(model));
            config(0.1)
                .init()
                .with_group(no_decay, config(0.0).build(), None)
        };
        let start = conf_model::GptConfig::new(7, 8, 16, 2, 2, 32).init_minigpt(&device);
        let first = named_params(&start)[0].values.clone();
        let (mut fused, mut reference) = (start.clone(), start);
        let (mut fused_optim, mut reference_optim) =
            (adamw(&fused, &settings()), burn_adamw(&reference));
        let ids = Tensor::<2, Int>::from_data([[1, 2, 3, 4, 5, 6, 0, 1]], &device);
        let grads_of = |model: &conf_model::MiniGpt| {
            let loss = model
                .forward(ids.clone(), &conf_model::AttentionMask::Causal)
                .powi_scalar(2)
                .mean();
            GradientsParams::from_grads(loss.backward(), model)
        };
        for (step, lr) in [1e-2, 5e-3, 2e-3].into_iter().enumerate() {
            let (fused_grads, reference_grads) = (grads_of(&fused), grads_of(&reference));
            fused = fused_optim.step(lr, fused, fused_grads);
            reference = reference_optim.step(lr, reference, reference_grads);
            let (ours, theirs) = (named_params(&fused), named_params(&reference));
            assert_eq!(ours.len(), theirs.len());
            for (a, b) in ours.iter().zip(&theirs) {
                let (a, b) = (a.values.to_data(), b.values.to_data());
                let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(worst <= 1e-7, "step {step}: a parameter differs by {worst}");
            }
        }
        // The comparison is of real updates, and of the fused path.
        let moved = (named_params(&fused)[0].values.clone() - first.clone())
            .abs()
            .max()
            .into_scalar::<f64>();
        assert!(moved > 1e-3, "{moved}");
        let inner = first.inner();
        let scalars = AdamWScalars {
            learning_rate: 0.1,
            beta_1: 0.9,
            beta_2: 0.9,
            epsilon: 1e-8,
            keep: 1.0,
            step: 1,
        };
        assert!(fused::adamw_applies(&inner));
        let [a, b, c, d] = [0, 1, 2, 3].map(|_| inner.clone());
        let [updated, ..] = fused::adamw(a, b, c, d, scalars);
        assert_eq!(updated.dims(), inner.dims());
    }

    #[test]
    fn vector_parameters_are_found_by_path() {
        let device = Device::flex();
        let model = conf_model::GptConfig::new(7, 8, 16, 2, 2, 32).init_minigpt(&device);
        let paths = vector_param_paths(&model);
        // Per block: 2 LayerNorms × 2 + 4 attention biases + 2 MLP biases; plus ln_f's 2.
        assert_eq!(paths.len(), 2 * (4 + 4 + 2) + 2, "{paths:?}");
        assert!(
            paths.iter().any(|p| p.ends_with("attn.query.bias")),
            "{paths:?}"
        );
        assert!(
            !paths
                .iter()
                .any(|p| p.ends_with("weight") && !p.contains("ln")),
            "{paths:?}"
        );
    }

    #[test]
    fn global_clipping_scales_all_gradients_by_one_factor_read_on_the_host_or_not() {
        let device = Device::flex().autodiff();
        let model = conf_model::GptConfig::new(7, 8, 16, 2, 2, 32).init_minigpt(&device);
        let ids = Tensor::<2, Int>::from_data([[1, 2, 3, 4, 5, 6, 0, 1]], &device);
        let loss = || {
            model
                .forward(ids.clone(), &conf_model::AttentionMask::Causal)
                .powi_scalar(2)
                .sum()
                * 100.0
        };
        let embedding = |grads: &GradientsParams| grads.get::<2>(model.tok_emb.weight.id).unwrap();
        let clip = |grads: &mut GradientsParams, max_norm: f64, read_on_host: bool| {
            clip_global_norm_reading(&model, grads, max_norm, read_on_host)
                .expect("the model has gradients")
                .into_scalar::<f64>()
        };
        let mut clipped = Vec::new();
        for read_on_host in [true, false] {
            let mut grads = GradientsParams::from_grads(loss().backward(), &model);
            let before = embedding(&grads);
            let norm = clip(&mut grads, 1.0, read_on_host);
            assert!(norm > 1.0, "{norm}");
            let after = embedding(&grads);
            let ratio = (after.clone() / before).mean().into_scalar::<f64>();
            assert!(
                (ratio - 1.0 / norm).abs() < 1e-4,
                "{ratio} vs {}",
                1.0 / norm
            );
            // Now within the limit: the norm is 1 and no gradient changes at all.
            let norm = clip(&mut grads, 1.5, read_on_host);
            assert!(
                (norm - 1.0).abs() < 1e-3,
                "read on the host: {read_on_host}: {norm}"
            );
            assert_eq!(embedding(&grads).into_data(), after.clone().into_data());
            clipped.push(after.into_data());
        }
        clipped[0].assert_approx_eq::<f32>(&clipped[1], Default::default());
    }
}
