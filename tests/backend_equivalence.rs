//! Every backend compiled into this build against flex: the same weights (one record, saved and
//! loaded as a checkpoint is) and the same batch give the same logits, confidence predictions
//! and losses, and one optimizer step gives the same parameters.
//!
//! Tolerance: |a − b| ≤ 1e-4 · |b| + 1e-5 per value (f32; the backends sum in different
//! orders); after the optimizer step see `STEP_ATOL` and `UPDATE_RTOL`. The default build holds flex alone; `cargo xtask test --backend wgpu --backend
//! tch-cpu` builds the others in and runs these.

// A flex-only build has nothing to compare with; the comparison code is then unused.
#![cfg_attr(not(any(feature = "wgpu", feature = "tch")), allow(dead_code))]

use burn::data::dataloader::batcher::Batcher;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use burn::train::TrainStep;
use conf_model::test_util::Perturb;
use conf_model::{AttentionMask, ConfHead, ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig};
use conf_train::optim::{OptimizerSettings, adamw, named_params};
use conf_train::trainee::Trainee;
use conf_train::{
    ConfInput, ConfidenceSettings, DenseObjective, LookaheadBatch, LookaheadBatcher, Objective,
    SeedObjective, WindowParts,
};

use conf_cli::backend::{BackendChoice, device};

const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;
/// Learning rate of the compared step. Adam's first step is about `lr · g / (|g| + eps)`: where
/// a gradient is near zero (or zero in exact arithmetic, as for key biases, which softmax
/// ignores) rounding moves an update by a fraction of `lr`. So after the step each value must
/// be within `RTOL · |x| + STEP_ATOL` and each tensor within `UPDATE_RTOL` of flex's update
/// (L2, plus `RTOL` of the tensor's norm).
const LR: f64 = 1e-3;
const STEP_ATOL: f32 = 0.1 * LR as f32;
const UPDATE_RTOL: f32 = 1e-2;
const VOCAB: usize = 29;
const SEQ: usize = 16;
const BATCH: usize = 3;

fn config() -> ConfidenceGptConfig {
    ConfidenceGptConfig::new(GptConfig::new(VOCAB, SEQ, 32, 2, 4, 96))
        .with_conf_head(ConfHead::Final)
}

fn record_bytes() -> Vec<u8> {
    let flex = Device::flex();
    flex.seed(7);
    let model = config().init(&flex).map(&mut Perturb { std: 0.05 });
    model
        .into_record()
        .into_bytes()
        .expect("record serialises")
        .to_vec()
}

fn load(bytes: &[u8], device: &Device) -> ConfidenceAwareGpt {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .expect("record deserialises");
    config().init(device).load_record(record)
}

fn batch(device: &Device) -> LookaheadBatch {
    // A fixed scramble of token ids; the sampling noise comes from the batcher's seed.
    let items = (0..BATCH)
        .map(|index| conf_data::Window {
            index,
            tokens: (0..SEQ + 2)
                .map(|t| ((index * 131 + t * 37 + t * t * 11) % VOCAB) as u32)
                .collect(),
        })
        .collect();
    LookaheadBatcher { seed: 5 }.batch(items, device)
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 values")
}

/// Compares two runs value by value; reports the worst value, never the whole vector.
fn assert_close(what: &str, backend: BackendChoice, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what} on {backend}: length");
    let worst = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| (i, g, w, (g - w).abs() - RTOL * w.abs()))
        .max_by(|a, b| a.3.total_cmp(&b.3))
        .expect("non-empty");
    let (i, g, w, excess) = worst;
    assert!(
        excess <= ATOL && g.is_finite(),
        "{what} on {backend}: value {i} is {g}, flex gives {w} (tolerance {RTOL:e}·|flex| + {ATOL:e})"
    );
}

/// Everything a forward pass and the dense objective produce, as host values.
struct Outputs {
    logits: Vec<f32>,
    confidence: Vec<f32>,
    lm_loss: Vec<f32>,
    conf_loss: Vec<f32>,
    total: Vec<f32>,
    token_losses: Vec<f32>,
    actual_future: Vec<f32>,
    /// The seed objective's future losses: its pass 2 attends over pass 1's cached keys (a
    /// causal attention with more keys than queries).
    seed_future: Vec<f32>,
}

fn outputs(bytes: &[u8], device: &Device) -> Outputs {
    let model = load(bytes, device);
    let batch = batch(device);
    let x = WindowParts::new(batch.tokens.clone()).x;
    let zeros = Tensor::<2>::zeros(x.dims(), device);
    let forward = model.forward(x, zeros, &AttentionMask::Causal);
    let settings = ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    };
    let seed = SeedObjective(settings).compute(&model, batch.clone());
    let seed_future = seed.lookahead.expect("seed measures the lookahead").actual;
    let objective = DenseObjective(settings).compute(&model, batch);
    let lookahead = objective.lookahead.expect("dense measures the lookahead");
    Outputs {
        logits: values(forward.logits),
        confidence: values(forward.confidence),
        lm_loss: values(objective.lm_loss),
        conf_loss: values(objective.conf_loss.expect("dense has a confidence loss")),
        total: values(objective.total),
        token_losses: values(objective.tokens.loss),
        actual_future: values(lookahead.actual),
        seed_future: values(seed_future),
    }
}

/// Every parameter after one AdamW step of the dense objective, by module path.
fn after_one_step(bytes: &[u8], device: &Device) -> Vec<(String, Vec<f32>)> {
    let device = device.clone().autodiff();
    let settings = ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    };
    let optimizer_settings = OptimizerSettings {
        learning_rate: LR,
        min_learning_rate: LR / 10.0,
        warmup_steps: 0,
        weight_decay: 0.1,
        grad_clip: 1.0,
    };
    let trainee = Trainee::new(
        load(bytes, &device),
        DenseObjective(settings),
        optimizer_settings.grad_clip,
    );
    let mut optim = adamw(&trainee, &optimizer_settings);
    let output = TrainStep::step(&trainee, batch(&device));
    let grads: GradientsParams = output.grads;
    let trainee = TrainStep::optimize(trainee, &mut optim, ModuleLearningRate::from(LR), grads);
    parameters(&trainee.model)
}

fn parameters<M: Module>(module: &M) -> Vec<(String, Vec<f32>)> {
    named_params(module)
        .into_iter()
        .map(|p| (p.path, values(p.values)))
        .collect()
}

/// A causal attention of 3 queries over 5 keys (2 of them cached), as generation runs it: the
/// output and the gradients of q, k and v of a weighted sum of it.
fn cached_attention(device: &Device) -> [Vec<f32>; 4] {
    let device = device.clone().autodiff();
    let input = |shape: [usize; 4], salt: usize| pattern(shape, salt, &device).require_grad();
    let (q, k, v) = (
        input([2, 2, 3, 4], 1),
        input([2, 2, 5, 4], 2),
        input([2, 2, 5, 4], 3),
    );
    let output = conf_model::fused::attention(q.clone(), k.clone(), v.clone(), true);
    let weights = input([2, 2, 3, 4], 4).detach();
    let grads = (output.clone() * weights).sum().backward();
    let grad = |t: &Tensor<4>| values(t.grad(&grads).expect("a gradient"));
    [values(output), grad(&q), grad(&k), grad(&v)]
}

/// Deterministic test values of `shape`, varied by `salt`, in about [−1.2, 1.2].
fn pattern<const D: usize>(shape: [usize; D], salt: usize, device: &Device) -> Tensor<D> {
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..n)
        .map(|i| (((i * 37 + salt * 11) % 23) as f32 - 11.0) / 9.0)
        .collect();
    Tensor::<1>::from_floats(values.as_slice(), device).reshape(shape)
}

/// The AdaptiveLayer on `[2, 3, 8]` rows: its output and the gradients of x, c, W and b of a
/// weighted sum of it; then without c (zero confidence, a LayerNorm on libtorch): the output
/// and the gradients of x and b.
fn adaptive_layer(device: &Device) -> [Vec<f32>; 8] {
    let device = device.clone().autodiff();
    let x = pattern([2, 3, 8], 1, &device).require_grad();
    let c = pattern([2, 3, 1], 2, &device).require_grad();
    let weight = pattern([1, 16], 3, &device).require_grad();
    let bias = pattern([16], 4, &device).require_grad();
    let run = |c: Option<Tensor<3>>| {
        let output =
            conf_model::fused::adaptive_norm(x.clone(), c, weight.clone(), bias.clone(), 1e-5);
        let grads = (output.clone() * pattern([2, 3, 8], 5, &device))
            .sum()
            .backward();
        (output, grads)
    };
    let (output, grads) = run(Some(c.clone()));
    let (unconditioned, grads_at_zero) = run(None);
    [
        values(output),
        values(x.grad(&grads).expect("dx")),
        values(c.grad(&grads).expect("dc")),
        values(weight.grad(&grads).expect("dW")),
        values(bias.grad(&grads).expect("db")),
        values(unconditioned),
        values(x.grad(&grads_at_zero).expect("dx at zero confidence")),
        values(bias.grad(&grads_at_zero).expect("db at zero confidence")),
    ]
}

/// The attention of the passes that extend cached keys (no gradient): dense's, 5 queries over
/// their cached prefixes (causal) and their own keys; seed's, 2 queries over 6 cached keys
/// and their own.
fn prefix_and_self(device: &Device) -> [Vec<f32>; 2] {
    let heads = |rows, salt| pattern([2, rows, 3, 4], salt, device).swap_dims(1, 2);
    [(5, 5, true), (2, 6, false)].map(|(queries, cached, causal)| {
        values(conf_model::fused::prefix_and_self_attention(
            heads(queries, 1),
            heads(queries, 2),
            heads(queries, 3),
            heads(cached, 4),
            heads(cached, 5),
            causal,
        ))
    })
}

/// The operations on rows of logits (`[2, 3, 40]`): the cross-entropy and its gradient through
/// a weighting, the four token statistics, and the draws at fixed uniforms.
fn logit_rows(device: &Device) -> [Vec<f32>; 7] {
    let autodiff = device.clone().autodiff();
    let logits = (pattern([2, 3, 40], 6, &autodiff) * 3.0).require_grad();
    let targets = Tensor::<2, Int>::from_ints([[0, 7, 39], [12, 3, 25]], &autodiff);
    let losses = conf_model::fused::token_cross_entropy(logits.clone(), targets.clone());
    let grads = (losses.clone() * pattern([2, 3], 7, &autodiff))
        .sum()
        .backward();
    let stats = conf_model::fused::token_stats(logits.clone(), targets);
    let uniforms = Tensor::<2>::from_floats([[0.05, 0.5, 0.93], [0.31, 0.77, 0.999]], device);
    let draws = conf_model::fused::sample_tokens(logits.clone().without_autodiff(), uniforms);
    [
        values(losses),
        values(logits.grad(&grads).expect("d logits")),
        values(stats.loss),
        values(stats.max_prob),
        values(stats.correct),
        values(stats.entropy),
        values(draws.float()),
    ]
}

/// Runs every comparison for one backend against flex.
fn matches_flex(backend: BackendChoice) {
    let other = device(backend, None).unwrap_or_else(|e| panic!("{e}"));
    let bytes = record_bytes();
    let want = outputs(&bytes, &Device::flex());
    let got = outputs(&bytes, &other);
    assert_close("logits", backend, &got.logits, &want.logits);
    assert_close("confidence", backend, &got.confidence, &want.confidence);
    assert_close("LM loss", backend, &got.lm_loss, &want.lm_loss);
    assert_close(
        "token losses",
        backend,
        &got.token_losses,
        &want.token_losses,
    );
    assert_close(
        "future losses",
        backend,
        &got.actual_future,
        &want.actual_future,
    );
    assert_close(
        "seed's future losses",
        backend,
        &got.seed_future,
        &want.seed_future,
    );
    assert_close("confidence loss", backend, &got.conf_loss, &want.conf_loss);
    assert_close("total loss", backend, &got.total, &want.total);
    let attention = [cached_attention(&other), cached_attention(&Device::flex())];
    for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
        let (got, want) = (&attention[0][i], &attention[1][i]);
        assert_close(
            &format!("attention over cached keys: {what}"),
            backend,
            got,
            want,
        );
    }
    let adaptive = [adaptive_layer(&other), adaptive_layer(&Device::flex())];
    let names = [
        "output",
        "dx",
        "dc",
        "dW",
        "db",
        "output at zero confidence",
        "dx at zero confidence",
        "db at zero confidence",
    ];
    for (i, what) in names.iter().enumerate() {
        let (got, want) = (&adaptive[0][i], &adaptive[1][i]);
        assert_close(&format!("AdaptiveLayer: {what}"), backend, got, want);
    }
    let attention = [prefix_and_self(&other), prefix_and_self(&Device::flex())];
    for (i, what) in ["prefix-and-self", "cache-and-self"].iter().enumerate() {
        let (got, want) = (&attention[0][i], &attention[1][i]);
        assert_close(&format!("{what} attention"), backend, got, want);
    }
    let rows = [logit_rows(&other), logit_rows(&Device::flex())];
    let names = [
        "cross-entropy",
        "cross-entropy: d logits",
        "token loss",
        "largest probability",
        "correct",
        "entropy",
        "draws",
    ];
    for (i, what) in names.iter().enumerate() {
        assert_close(
            &format!("rows of logits: {what}"),
            backend,
            &rows[0][i],
            &rows[1][i],
        );
    }

    let before = parameters(&load(&bytes, &Device::flex()));
    let want = after_one_step(&bytes, &Device::flex());
    let got = after_one_step(&bytes, &other);
    assert_eq!(got.len(), want.len());
    let mut moved = 0;
    for (((path, g), (_, w)), (_, b)) in got.iter().zip(&want).zip(&before) {
        let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
        let step = norm(&mut w.iter().zip(b).map(|(w, b)| w - b));
        let error = norm(&mut g.iter().zip(w).map(|(g, w)| g - w));
        let size = norm(&mut w.iter().copied());
        assert!(
            error <= UPDATE_RTOL * step + RTOL * size,
            "{path} on {backend}: {error:e} (L2) from flex after one step; flex's step is {step:e}"
        );
        let (i, excess) = g
            .iter()
            .zip(w)
            .map(|(g, w)| (g - w).abs() - RTOL * w.abs())
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .expect("non-empty");
        assert!(
            excess <= STEP_ATOL,
            "{path} after one step on {backend}: value {i} is {}, flex gives {}",
            g[i],
            w[i]
        );
        moved += usize::from(step > 0.0);
    }
    // The step changed every parameter, so the comparison is of the step and not of the load.
    assert_eq!(moved, want.len(), "parameters the step moved on flex");
}

#[test]
fn the_reference_outputs_are_nontrivial() {
    // Guards the comparisons below: flex's numbers are finite and not all alike.
    let out = outputs(&record_bytes(), &Device::flex());
    assert_eq!(out.logits.len(), BATCH * SEQ * VOCAB);
    assert_eq!(out.confidence.len(), BATCH * SEQ);
    assert_eq!(out.actual_future.len(), BATCH * SEQ);
    let spread = |v: &[f32]| {
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        hi - lo
    };
    assert!(
        spread(&out.logits) > 0.5,
        "logits spread {}",
        spread(&out.logits)
    );
    assert!(
        spread(&out.confidence) > 1e-3,
        "confidence spread {}",
        spread(&out.confidence)
    );
    assert!(
        out.lm_loss[0] > 2.0 && out.lm_loss[0].is_finite(),
        "LM loss {}",
        out.lm_loss[0]
    );
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

/// tch-cpu's AdamW update (`conf_model::fused::adamw`: in place, nine libtorch operations)
/// against Burn's AdamW on the same device over three steps (moments and bias corrections in
/// play, matrices decayed and vectors not), to rounding; a tensor that shares a parameter's
/// storage keeps its values (that parameter is updated on a copy).
#[cfg(feature = "tch")]
#[test]
fn tch_cpu_adamw_steps_as_burns_adamw() {
    use burn::module::ParamGroup;
    use burn::optim::AdamWConfig;
    use conf_train::optim::vector_param_paths;

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
    let start = GptConfig::new(VOCAB, SEQ, 16, 2, 2, 32).init_minigpt(&device);
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
