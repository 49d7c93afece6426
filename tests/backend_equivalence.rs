//! Every backend compiled into this build against flex (`conf_cli::equivalence`, which
//! `lookahead check-backend` runs too): the same weights and batch give the same outputs,
//! losses and gradients, and one optimizer step the same parameters. The default build holds
//! flex alone; `cargo xtask test --backend wgpu --backend tch-cpu` builds the others in and
//! runs these. The GPU backends' are ignored unless asked for (`-- --ignored`) on a machine
//! with an NVIDIA GPU; without Rust there, `lookahead check-backend --backend cuda`. Besides,
//! bf16 training reaches f32's eval loss on the CPU backends (`conf_cli::bf16_training`; on a
//! GPU `lookahead check-backend --bf16-training`).

// A flex-only build has nothing to compare with; the comparison code is then unused.
#![cfg_attr(
    not(any(feature = "wgpu", feature = "tch", feature = "cuda")),
    allow(dead_code)
)]

use burn::prelude::*;
use conf_cli::backend::{BackendChoice, device};
use conf_cli::{bf16_training, equivalence};

fn matches_flex(backend: BackendChoice) {
    let other = device(backend, None).unwrap_or_else(|e| panic!("{e}"));
    let checks = equivalence::check(&other);
    let off: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| format!("{}: {:.3} × tolerance ({})", c.what, c.worst, c.detail))
        .collect();
    assert!(
        off.is_empty(),
        "{backend} differs from flex:\n{}",
        off.join("\n")
    );
}

#[test]
fn flex_against_itself_passes_every_comparison_of_an_informative_reference() {
    // Guards the comparisons below: flex's reference is finite and varied, and flex agrees
    // with itself run to run. That a computation which differs fails is tested in the module.
    let checks = equivalence::check(&Device::flex());
    assert!(checks.len() > 40, "{} comparisons", checks.len());
    for check in &checks {
        assert!(check.passed(), "{check:?}");
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_matches_flex() {
    matches_flex(BackendChoice::Wgpu);
}

#[cfg(feature = "tch")]
#[test]
fn tch_cpu_matches_flex() {
    matches_flex(BackendChoice::TchCpu);
}

#[cfg(feature = "tch")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn tch_cuda_matches_flex() {
    matches_flex(BackendChoice::TchCuda);
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_matches_flex() {
    matches_flex(BackendChoice::Cuda);
}

/// bf16 training on `backend` reaches its f32 training's eval loss, and f32 learns the source
/// (`conf_cli::bf16_training`, which `lookahead check-backend --bf16-training` runs too).
fn bf16_trains_to_the_f32_eval_loss(device: &Device) {
    let checks = bf16_training::check(device).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(checks.len(), 2);
    for check in &checks {
        assert!(
            check.passed(),
            "{}: {} ({})",
            check.what,
            check.worst,
            check.detail
        );
    }
}

#[test]
fn on_flex_bf16_training_reaches_the_f32_eval_loss() {
    bf16_trains_to_the_f32_eval_loss(&Device::flex());
}

/// On libtorch bf16 also takes the attention (PyTorch's fused kernel, backward through
/// libtorch's graph).
#[cfg(feature = "tch")]
#[test]
fn on_tch_cpu_bf16_training_reaches_the_f32_eval_loss() {
    bf16_trains_to_the_f32_eval_loss(
        &device(BackendChoice::TchCpu, None).unwrap_or_else(|e| panic!("{e}")),
    );
}

/// tch-cpu's AdamW update (`conf_model::fused::adamw`: PyTorch's fused kernel, in place)
/// against Burn's AdamW on the same device over three steps (moments and bias corrections in
/// play, matrices decayed and vectors not), to rounding; a tensor that shares a parameter's
/// storage keeps its values (that parameter is updated on a copy).
#[cfg(feature = "tch")]
#[test]
fn tch_cpu_adamw_steps_as_burns_adamw() {
    use burn::module::ParamGroup;
    use burn::optim::{AdamWConfig, GradientsParams};
    use conf_cli::equivalence::{LR, host_values as values};
    use conf_model::{AttentionMask, GptConfig};
    use conf_train::optim::{OptimizerSettings, adamw, named_params, vector_param_paths};

    let device = device(BackendChoice::TchCpu, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .autodiff();
    let settings = OptimizerSettings {
        learning_rate: LR,
        min_learning_rate: LR / 10.0,
        warmup_steps: 0,
        weight_decay: 0.1,
        grad_clip: 1.0,
    };
    let start = GptConfig::new(29, 16, 16, 2, 2, 32).init_minigpt(&device);
    let burns = |decay: f32| {
        AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_epsilon(1e-8)
            .with_weight_decay(decay)
    };
    let mut reference_optim = burns(0.1).init().with_group(
        ParamGroup::from_paths(vector_param_paths(&start)),
        burns(0.0).build(),
        None,
    );
    let mut optim = adamw(&start, &settings);
    let shared = named_params(&start)[0].values.clone();
    let shared_before = values(shared.clone());
    let inner = shared.clone().inner();
    assert!(
        conf_model::fused::adamw_applies(&inner),
        "the fused update runs"
    );
    let ids = Tensor::<2, Int>::from_data([[1, 2, 3, 4, 5, 6, 0, 1]], &device);
    let grads_of = |model: &conf_model::MiniGpt| {
        let loss = model
            .forward(ids.clone(), &AttentionMask::Causal)
            .powi_scalar(2)
            .mean();
        GradientsParams::from_grads(loss.backward(), model)
    };
    let (mut ours, mut theirs) = (start.clone(), start);
    for (step, lr) in [1e-2, 5e-3, 2e-3].into_iter().enumerate() {
        let (our_grads, their_grads) = (grads_of(&ours), grads_of(&theirs));
        ours = optim.step(lr, ours, our_grads);
        theirs = reference_optim.step(lr, theirs, their_grads);
        for (a, b) in named_params(&ours).into_iter().zip(named_params(&theirs)) {
            let (a, b) = (values(a.values), values(b.values));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst <= 1e-6, "step {step}: a parameter differs by {worst}");
        }
    }
    assert_eq!(
        values(shared),
        shared_before,
        "a tensor sharing a parameter's storage"
    );
    let moved = values(named_params(&ours)[0].values.clone())
        .iter()
        .zip(&shared_before)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(moved > 1e-3, "the parameters moved by {moved} only");
}
