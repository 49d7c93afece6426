//! Whether a backend computes what flex computes: the same weights (one record, saved and
//! loaded as a checkpoint is) and the same batch must give the same logits, confidence
//! predictions and losses, the same outputs and gradients of each fused operation, and after
//! one AdamW step the same parameters. `lookahead check-backend` runs it on a machine's
//! backend; `tests/backend_equivalence.rs` on every backend of a build.
//!
//! Tolerance: |a − b| ≤ 1e-4 · |b| + 1e-5 per value (f32; the backends sum in different
//! orders); after the optimizer step see [`STEP_ATOL`] and [`UPDATE_RTOL`].

use burn::data::dataloader::batcher::Batcher;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use burn::train::TrainStep;
use conf_model::init::Perturb;
use conf_model::{AttentionMask, ConfHead, ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig};
use conf_train::optim::{OptimizerSettings, adamw, named_params};
use conf_train::trainee::Trainee;
use conf_train::{
    ConfInput, ConfidenceSettings, DenseObjective, LookaheadBatch, LookaheadBatcher, Objective,
    SeedObjective, WindowParts,
};
use serde::Serialize;

pub const RTOL: f32 = 1e-4;
pub const ATOL: f32 = 1e-5;
/// Learning rate of the compared step. Adam's first step is about `lr · g / (|g| + eps)`: where
/// a gradient is near zero (or zero in exact arithmetic, as for key biases, which softmax
/// ignores) rounding moves an update by a fraction of `lr`. So after the step each value must
/// be within `RTOL · |x| + STEP_ATOL` and each tensor within `UPDATE_RTOL` of flex's update
/// (L2, plus `RTOL` of the tensor's norm).
pub const LR: f64 = 1e-3;
pub const STEP_ATOL: f32 = 0.1 * LR as f32;
pub const UPDATE_RTOL: f32 = 1e-2;
const VOCAB: usize = 29;
const SEQ: usize = 16;
const BATCH: usize = 3;

/// One comparison with flex.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was compared, e.g. "logits" or "after one step: blocks.0.mlp.fc.weight".
    pub what: String,
    /// The largest deviation from flex as a fraction of what the tolerance allows there:
    /// at most 1 passes; a value that is not finite fails.
    pub worst: f64,
    /// Where that deviation is and what the two backends give there.
    pub detail: String,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.worst <= 1.0
    }

    /// A condition of the comparison itself (flex's reference is not trivial, say).
    fn condition(what: &str, holds: bool, detail: String) -> Self {
        Self {
            what: what.into(),
            worst: if holds { 0.0 } else { f64::INFINITY },
            detail,
        }
    }
}

/// Every comparison of `other` with flex, in a fixed order.
pub fn check(other: &Device) -> Vec<Check> {
    let record = record_bytes(7);
    compare(other, &record, &record)
}

/// `other` holding the record `got` against flex holding `want`.
fn compare(other: &Device, got: &[u8], want: &[u8]) -> Vec<Check> {
    let flex = Device::flex();
    let mut checks = Vec::new();
    let reference = outputs(want, &flex);
    checks.extend(reference_is_informative(&reference));
    let compared = outputs(got, other);
    for (what, got, want) in [
        ("logits", &compared.logits, &reference.logits),
        ("confidence", &compared.confidence, &reference.confidence),
        ("LM loss", &compared.lm_loss, &reference.lm_loss),
        (
            "token losses",
            &compared.token_losses,
            &reference.token_losses,
        ),
        (
            "future losses",
            &compared.actual_future,
            &reference.actual_future,
        ),
        (
            "seed's future losses",
            &compared.seed_future,
            &reference.seed_future,
        ),
        ("confidence loss", &compared.conf_loss, &reference.conf_loss),
        ("total loss", &compared.total, &reference.total),
    ] {
        checks.push(values_close(what, got, want, ATOL));
    }
    let operations: [(&str, &[&str], Operation); 4] = [
        (
            "attention over cached keys",
            &["output", "dq", "dk", "dv"],
            cached_attention,
        ),
        (
            "AdaptiveLayer",
            &[
                "output",
                "dx",
                "dc",
                "dW",
                "db",
                "output at zero confidence",
                "dx at zero confidence",
                "db at zero confidence",
            ],
            adaptive_layer,
        ),
        (
            "attention extending a cache",
            &["prefix-and-self", "cache-and-self"],
            prefix_and_self,
        ),
        (
            "rows of logits",
            &[
                "cross-entropy",
                "cross-entropy: d logits",
                "token loss",
                "largest probability",
                "correct",
                "entropy",
                "draws",
            ],
            logit_rows,
        ),
    ];
    for (operation, names, run) in operations {
        let (got, want) = (run(other), run(&flex));
        for ((name, got), want) in names.iter().zip(&got).zip(&want) {
            checks.push(values_close(
                &format!("{operation}: {name}"),
                got,
                want,
                ATOL,
            ));
        }
    }
    checks.extend(one_step(other, got, want));
    checks
}

/// A fused operation run on fixed inputs: its outputs and gradients, in a fixed order.
type Operation = fn(&Device) -> Vec<Vec<f32>>;

/// A record of the comparison's model: its initialisation plus N(0, 0.05²) on every
/// parameter, drawn on flex from `seed`.
fn record_bytes(seed: u64) -> Vec<u8> {
    let flex = Device::flex();
    flex.seed(seed);
    config()
        .init(&flex)
        .map(&mut Perturb { std: 0.05 })
        .into_record()
        .into_bytes()
        .expect("a model record serialises")
        .to_vec()
}

fn config() -> ConfidenceGptConfig {
    ConfidenceGptConfig::new(GptConfig::new(VOCAB, SEQ, 32, 2, 4, 96))
        .with_conf_head(ConfHead::Final)
}

fn load(bytes: &[u8], device: &Device) -> ConfidenceAwareGpt {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .expect("the record just written deserialises");
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

/// A tensor's values on the host, as f32.
pub fn host_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 values")
}

/// Value by value within `RTOL · |flex| + atol`; reports the worst value.
fn values_close(what: &str, got: &[f32], want: &[f32], atol: f32) -> Check {
    if got.len() != want.len() {
        let detail = format!("{} values, flex gives {}", got.len(), want.len());
        return Check::condition(what, false, detail);
    }
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| match g.is_finite() {
            true => (g - w).abs() / (RTOL * w.abs() + atol),
            false => f32::INFINITY,
        })
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1));
    match worst {
        Some((i, ratio)) => Check {
            what: what.into(),
            worst: ratio.into(),
            detail: format!("value {i}: {}, flex {}", got[i], want[i]),
        },
        None => Check::condition(what, false, "no values".into()),
    }
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
        logits: host_values(forward.logits),
        confidence: host_values(forward.confidence),
        lm_loss: host_values(objective.lm_loss),
        conf_loss: host_values(objective.conf_loss.expect("dense has a confidence loss")),
        total: host_values(objective.total),
        token_losses: host_values(objective.tokens.loss),
        actual_future: host_values(lookahead.actual),
        seed_future: host_values(seed_future),
    }
}

/// Flex's outputs are finite and not all alike, so that agreeing with them means something.
fn reference_is_informative(reference: &Outputs) -> [Check; 3] {
    let spread = |v: &[f32]| {
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        hi - lo
    };
    let (logits, confidence, loss) = (
        spread(&reference.logits),
        spread(&reference.confidence),
        reference.lm_loss[0],
    );
    [
        Check::condition(
            "flex's logits vary",
            logits > 0.5 && reference.logits.len() == BATCH * SEQ * VOCAB,
            format!("{} values spread over {logits}", reference.logits.len()),
        ),
        Check::condition(
            "flex's confidence predictions vary",
            confidence > 1e-3 && reference.confidence.len() == BATCH * SEQ,
            format!(
                "{} values spread over {confidence}",
                reference.confidence.len()
            ),
        ),
        Check::condition(
            "flex's LM loss is that of a model near its initialisation",
            loss.is_finite() && loss > 2.0,
            format!("{loss} (ln {VOCAB} = {:.3})", (VOCAB as f32).ln()),
        ),
    ]
}

/// One AdamW step of the dense objective from `got` on `other` and from `want` on flex: each
/// parameter within tolerance of flex's, and flex's step moving every parameter (so that the
/// comparison is of the step and not of the load).
fn one_step(other: &Device, got: &[u8], want: &[u8]) -> Vec<Check> {
    let flex = Device::flex();
    let before = parameters(&load(want, &flex));
    let want = after_one_step(want, &flex);
    let got = after_one_step(got, other);
    if got.len() != want.len() {
        let detail = format!("{} parameters, flex has {}", got.len(), want.len());
        return vec![Check::condition("after one step", false, detail)];
    }
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
    let mut moved = 0;
    let mut checks: Vec<Check> = got
        .iter()
        .zip(&want)
        .zip(&before)
        .map(|(((path, g), (_, w)), (_, b))| {
            let step = norm(&mut w.iter().zip(b).map(|(w, b)| w - b));
            let error = norm(&mut g.iter().zip(w).map(|(g, w)| g - w));
            let size = norm(&mut w.iter().copied());
            moved += usize::from(step > 0.0);
            let what = format!("after one step: {path}");
            let mut check = values_close(&what, g, w, STEP_ATOL);
            let l2 = f64::from(error / (UPDATE_RTOL * step + RTOL * size));
            // A NaN on either side stays NaN, which fails.
            check.worst = match check.worst.is_nan() || l2.is_nan() {
                true => f64::NAN,
                false => check.worst.max(l2),
            };
            check.detail = format!(
                "L2 {error:.2e} from flex, whose step is {step:.2e}; {}",
                check.detail
            );
            check
        })
        .collect();
    checks.push(Check::condition(
        "flex's step moves every parameter",
        moved == want.len(),
        format!("{moved} of {}", want.len()),
    ));
    checks
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
        .map(|p| (p.path, host_values(p.values)))
        .collect()
}

/// Deterministic test values of `shape`, varied by `salt`, in about [−1.2, 1.2].
fn pattern<const D: usize>(shape: [usize; D], salt: usize, device: &Device) -> Tensor<D> {
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..n)
        .map(|i| (((i * 37 + salt * 11) % 23) as f32 - 11.0) / 9.0)
        .collect();
    Tensor::<1>::from_floats(values.as_slice(), device).reshape(shape)
}

/// A causal attention of 3 queries over 5 keys (2 of them cached), as generation runs it: the
/// output and the gradients of q, k and v of a weighted sum of it.
fn cached_attention(device: &Device) -> Vec<Vec<f32>> {
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
    let grad = |t: &Tensor<4>| host_values(t.grad(&grads).expect("a gradient"));
    vec![host_values(output), grad(&q), grad(&k), grad(&v)]
}

/// The AdaptiveLayer on `[2, 3, 8]` rows: its output and the gradients of x, c, W and b of a
/// weighted sum of it; then without c (zero confidence, a LayerNorm on libtorch): the output
/// and the gradients of x and b.
fn adaptive_layer(device: &Device) -> Vec<Vec<f32>> {
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
    vec![
        host_values(output),
        host_values(x.grad(&grads).expect("dx")),
        host_values(c.grad(&grads).expect("dc")),
        host_values(weight.grad(&grads).expect("dW")),
        host_values(bias.grad(&grads).expect("db")),
        host_values(unconditioned),
        host_values(x.grad(&grads_at_zero).expect("dx at zero confidence")),
        host_values(bias.grad(&grads_at_zero).expect("db at zero confidence")),
    ]
}

/// The attention of the passes that extend cached keys (no gradient): dense's, 5 queries over
/// their cached prefixes (causal) and their own keys; seed's, 2 queries over 6 cached keys
/// and their own.
fn prefix_and_self(device: &Device) -> Vec<Vec<f32>> {
    let heads = |rows, salt| pattern([2, rows, 3, 4], salt, device).swap_dims(1, 2);
    [(5, 5, true), (2, 6, false)]
        .map(|(queries, cached, causal)| {
            host_values(conf_model::fused::prefix_and_self_attention(
                heads(queries, 1),
                heads(queries, 2),
                heads(queries, 3),
                heads(cached, 4),
                heads(cached, 5),
                causal,
            ))
        })
        .to_vec()
}

/// The operations on rows of logits (`[2, 3, 40]`): the cross-entropy and its gradient through
/// a weighting, the four token statistics, and the draws at fixed uniforms.
fn logit_rows(device: &Device) -> Vec<Vec<f32>> {
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
    vec![
        host_values(losses),
        host_values(logits.grad(&grads).expect("d logits")),
        host_values(stats.loss),
        host_values(stats.max_prob),
        host_values(stats.correct),
        host_values(stats.entropy),
        host_values(draws.float()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_weights_fail_the_check_where_they_should() {
        let flex = Device::flex();
        let checks = compare(&flex, &record_bytes(8), &record_bytes(7));
        let failed = |what: &str| {
            let check = checks.iter().find(|c| c.what == what).expect(what);
            !check.passed()
        };
        for what in [
            "logits",
            "confidence",
            "total loss",
            "after one step: tok_emb.weight",
        ] {
            assert!(failed(what), "{what} should differ");
        }
        // The fused operations take fixed inputs, not the weights.
        assert!(!failed("AdaptiveLayer: dc"));
        assert!(!failed("flex's step moves every parameter"));
    }

    #[test]
    fn a_value_off_by_more_than_the_tolerance_or_not_finite_fails() {
        let want = [1.0, -2.0, 100.0];
        // 1e-4 · 100 + 1e-5 allowed at the third value.
        let within = values_close("x", &[1.0, -2.0, 100.00999], &want, ATOL);
        assert!(within.passed(), "{within:?}");
        let off = values_close("x", &[1.0, -2.0, 100.0102], &want, ATOL);
        assert!(!off.passed(), "{off:?}");
        assert!(off.detail.starts_with("value 2"), "{}", off.detail);
        let nan = values_close("x", &[f32::NAN, -2.0, 100.0], &want, ATOL);
        assert!(
            !nan.passed() && nan.detail.starts_with("value 0"),
            "{nan:?}"
        );
        assert!(
            !values_close("x", &[1.0], &want, ATOL).passed(),
            "a length differs"
        );
    }
}
