//! The lookahead passes and objectives, asserted with numbers.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{Distribution, Tolerance};
use conf_model::init::Perturb;
use conf_model::{
    AttentionMask, ConfHead, ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig, positions,
};
use conf_train::batch::{LookaheadBatch, LookaheadBatcher};
use conf_train::lookahead::*;
use conf_train::objective::*;

const L: usize = 12;
const V: usize = 13;

// The reference paths the fast paths of `conf_train::lookahead` must equal.

/// Sample k sees prefix keys `0..=k` and its own key only, `[L, 2L]`.
fn dense_extension_mask(seq: usize, device: &Device) -> Tensor<2, Bool> {
    let ones = Tensor::<2, Int>::ones([seq, seq], device);
    let future_prefix = ones.clone().triu(1);
    let other_samples = ones.clone().triu(1) + ones.tril(-1);
    Tensor::cat(vec![future_prefix, other_samples], 1).bool()
}

/// The tree mask of the reference 2L pass, `[2L, 2L]`: the prefix is causal and never sees the
/// samples; sample k sees `x_0..x_k` and itself.
fn dense_tree_mask(seq: usize, device: &Device) -> Tensor<2, Bool> {
    let ones = Tensor::<2, Int>::ones([seq, seq], device);
    let top = Tensor::cat(vec![ones.clone().triu(1), ones.clone()], 1);
    let bottom = dense_extension_mask(seq, device).int();
    Tensor::cat(vec![top, bottom], 0).bool()
}

/// Pass 2 of `dense`, reference path: the full 2L pass `[x, s]` under the tree mask.
fn dense_pass2_reference(
    valid: &ConfidenceAwareGpt,
    x: Tensor<2, Int>,
    history: Tensor<2>,
    samples: Tensor<2, Int>,
    conf: Tensor<2>,
) -> Tensor<3> {
    let [batch, seq] = x.dims();
    let device = x.device();
    let pos = Tensor::cat(vec![positions(&x, 0), positions(&samples, 1)], 1);
    let ids = Tensor::cat(vec![x, samples], 1);
    let conf = Tensor::cat(vec![history, conf], 1);
    let mask = AttentionMask::explicit(dense_tree_mask(seq, &device));
    let logits = valid.forward_at(ids, conf, pos, &mask).logits;
    let vocab = logits.dims()[2];
    logits.slice([0..batch, seq..2 * seq, 0..vocab])
}

/// Pass 2 of `seed`, reference path: the model on `[tokens_t, s]` with confidence
/// `[prev_conf, conf_last]`; the last position's logits, `[B, 1, V]`.
fn seed_pass2_reference(
    valid: &ConfidenceAwareGpt,
    x: Tensor<2, Int>,
    history: Tensor<2>,
    sample: Tensor<2, Int>,
    conf: Tensor<2>,
) -> Tensor<3> {
    let [batch, seq] = x.dims();
    let ids = Tensor::cat(vec![x, sample], 1);
    let conf = Tensor::cat(vec![history, conf], 1);
    let logits = valid.forward(ids, conf, &AttentionMask::Causal).logits;
    let vocab = logits.dims()[2];
    logits.slice([0..batch, seq..seq + 1, 0..vocab])
}

fn model(head: ConfHead, device: &Device) -> ConfidenceAwareGpt {
    model_of_length(head, L, device)
}

fn model_of_length(head: ConfHead, max_len: usize, device: &Device) -> ConfidenceAwareGpt {
    let flex = Device::flex();
    flex.seed(11);
    let config =
        ConfidenceGptConfig::new(GptConfig::new(V, max_len, 32, 2, 4, 128)).with_conf_head(head);
    let record = config
        .init(&flex)
        .map(&mut Perturb { std: 0.08 })
        .into_record();
    config.init(device).load_record(record)
}

fn windows(batch: usize, device: &Device) -> LookaheadBatch {
    windows_of(batch, L + 2, device)
}

/// `batch` random windows of `len` tokens.
fn windows_of(batch: usize, len: usize, device: &Device) -> LookaheadBatch {
    use burn::data::dataloader::batcher::Batcher;
    let flex = Device::flex();
    flex.seed(batch as u64);
    let ids = Tensor::<2>::random([batch, len], Distribution::Uniform(0.0, V as f64), &flex).int();
    let ids: Vec<i64> = ids.into_data().try_into_vec_as().unwrap();
    let items = ids
        .chunks(len)
        .enumerate()
        .map(|(index, w)| conf_data::Window {
            index,
            tokens: w.iter().map(|&t| t as u32).collect(),
        })
        .collect();
    LookaheadBatcher { seed: 17 }.batch(items, device)
}

fn settings(alpha: f64) -> ConfidenceSettings {
    ConfidenceSettings {
        alpha,
        conf_input: ConfInput::SelfConditioned,
    }
}

fn close(a: Tensor<3>, b: Tensor<3>) {
    a.into_data()
        .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));
}

struct Setup {
    model: ConfidenceAwareGpt,
    x: Tensor<2, Int>,
    history: Tensor<2>,
    samples: Tensor<2, Int>,
    conf: Tensor<2>,
    cache: Vec<conf_model::LayerKv>,
}

fn setup() -> Setup {
    let device = Device::flex();
    let model = model(ConfHead::Final, &device);
    let batch = windows(3, &device);
    let x = WindowParts::new(batch.tokens).x;
    let history = confidence_history(&model, &x, ConfInput::SelfConditioned);
    let (out, cache) = model.forward_cached(x.clone(), history.clone());
    let samples = sample_tokens(out.logits, batch.uniforms);
    Setup {
        model,
        x,
        history,
        samples,
        conf: out.confidence,
        cache,
    }
}

#[test]
fn dense_fast_path_equals_the_full_tree_masked_pass() {
    let s = setup();
    let fast = dense_pass2(&s.model, &s.cache, s.samples.clone(), s.conf.clone());
    let reference = dense_pass2_reference(&s.model, s.x, s.history, s.samples, s.conf);
    assert_eq!(fast.dims(), [3, L, V]);
    close(fast, reference);
}

#[test]
fn dense_at_every_position_equals_running_the_model_on_prefix_and_sample_alone() {
    let s = setup();
    let dense = dense_pass2(&s.model, &s.cache, s.samples.clone(), s.conf.clone());
    for k in 0..L {
        let ids = Tensor::cat(
            vec![
                s.x.clone().slice([0..3, 0..k + 1]),
                s.samples.clone().slice([0..3, k..k + 1]),
            ],
            1,
        );
        let conf = Tensor::cat(
            vec![
                s.history.clone().slice([0..3, 0..k + 1]),
                s.conf.clone().slice([0..3, k..k + 1]),
            ],
            1,
        );
        let alone = s.model.forward(ids, conf, &AttentionMask::Causal).logits;
        close(
            alone.slice([0..3, k + 1..k + 2, 0..V]),
            dense.clone().slice([0..3, k..k + 1, 0..V]),
        );
    }
}

#[test]
fn dense_at_the_last_position_equals_seed_for_the_same_sample() {
    let s = setup();
    let dense = dense_pass2(&s.model, &s.cache, s.samples.clone(), s.conf.clone());
    let sample = s.samples.slice([0..3, L - 1..L]);
    let conf = s.conf.slice([0..3, L - 1..L]);
    let seed = seed_pass2(&s.model, &s.cache, sample.clone(), conf.clone());
    let seed_reference = seed_pass2_reference(&s.model, s.x, s.history, sample, conf);
    close(seed.clone(), seed_reference);
    close(seed, dense.slice([0..3, L - 1..L, 0..V]));
}

#[test]
fn the_confidence_history_shifts_zero_confidence_predictions_right_by_one() {
    let s = setup();
    // L = 12: the pass runs over all 12 tokens; 17: over the first 16, all it needs.
    assert_eq!(history_tokens(L), L);
    assert_eq!(history_tokens(17), 16);
    assert_eq!(
        (history_tokens(0), history_tokens(1), history_tokens(2)),
        (0, 0, 2)
    );
    let device = Device::flex();
    let longer = model_of_length(ConfHead::Final, 17, &device);
    let longer_x = WindowParts::new(windows_of(3, 17 + 2, &device).tokens).x;
    for (model, x) in [(&s.model, s.x.clone()), (&longer, longer_x)] {
        let [rows, seq] = x.dims();
        let history = confidence_history(model, &x, ConfInput::SelfConditioned);
        let zeros = Tensor::<2>::zeros([rows, seq], &device);
        let predictions = model
            .forward(x.clone(), zeros, &AttentionMask::Causal)
            .confidence;
        let history: Vec<f32> = history.into_data().try_into_vec_as().unwrap();
        let predictions: Vec<f32> = predictions.into_data().try_into_vec_as().unwrap();
        // Exactly where the pass covers the whole window; up to rounding where it covers fewer
        // rows, which may take other matrix-kernel paths.
        let exact = history_tokens(seq) == seq;
        for row in 0..rows {
            assert_eq!(history[row * seq], 0.0);
            let shifted = &history[row * seq + 1..(row + 1) * seq];
            let own = &predictions[row * seq..(row + 1) * seq - 1];
            for (h, p) in shifted.iter().zip(own) {
                let bound = if exact { 0.0 } else { 1e-6 * p.abs() };
                assert!((h - p).abs() <= bound, "{seq} tokens: {h} vs {p}");
            }
        }
    }
    let off = confidence_history(&s.model, &s.x, ConfInput::Zeros);
    assert_eq!(off.abs().sum().into_scalar::<f32>(), 0.0);
}

fn scalars(out: &ObjectiveOutput) -> Vec<f32> {
    let mut v = vec![out.total.clone().into_scalar::<f32>()];
    let look = out.lookahead.as_ref().unwrap();
    v.extend(
        look.actual
            .clone()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap(),
    );
    v
}

#[test]
fn a_fixed_seed_reproduces_the_samples_and_the_losses() {
    let device = Device::flex().autodiff();
    let model = model(ConfHead::Final, &device);
    let batch = windows(4, &device);
    let other_noise = LookaheadBatch {
        uniforms: Tensor::random([4, L], Distribution::Uniform(0.0, 1.0), &device),
        ..batch.clone()
    };
    for objective in [
        &DenseObjective(settings(1.0)) as &dyn Objective<ConfidenceAwareGpt>,
        &SeedObjective(settings(1.0)),
    ] {
        let a = scalars(&objective.compute(&model, batch.clone()));
        let b = scalars(&objective.compute(&model, batch.clone()));
        let c = scalars(&objective.compute(&model, other_noise.clone()));
        assert_eq!(a, b, "{}", objective.name());
        assert_ne!(
            a,
            c,
            "{}: other noise samples other tokens",
            objective.name()
        );
    }
    let batcher = LookaheadBatcher { seed: 3 };
    assert_eq!(batcher.uniforms(7, L), batcher.uniforms(7, L));
    assert_ne!(batcher.uniforms(7, L), batcher.uniforms(8, L));
    assert_ne!(
        batcher.uniforms(7, L),
        LookaheadBatcher { seed: 4 }.uniforms(7, L)
    );
}

#[test]
fn sampling_follows_the_softmax_distribution() {
    let device = Device::flex();
    let probs = [0.5f32, 0.3, 0.0, 0.2];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let n = 20_000;
    let logits = Tensor::<1>::from_floats(logits.as_slice(), &device)
        .reshape([1, 1, 4])
        .expand([1, n, 4]);
    let uniforms: Vec<f32> = LookaheadBatcher { seed: 1 }.uniforms(0, n);
    let uniforms = Tensor::<1>::from_floats(uniforms.as_slice(), &device).reshape([1, n]);
    let samples: Vec<i64> = sample_tokens(logits, uniforms)
        .into_data()
        .try_into_vec_as()
        .unwrap();
    for (token, p) in probs.iter().enumerate() {
        let freq = samples.iter().filter(|&&s| s == token as i64).count() as f32 / n as f32;
        assert!((freq - p).abs() < 0.015, "token {token}: {freq} vs {p}");
    }
}

fn grad_vec<const D: usize>(param: &Param<Tensor<D>>, grads: &burn::tensor::Gradients) -> Vec<f32> {
    param
        .grad(grads)
        .map(|g| g.into_data().try_into_vec_as::<f32>().unwrap())
        .unwrap_or_default()
}

fn assert_same(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(max < 1e-6, "max difference {max}");
}

#[test]
fn the_second_pass_contributes_no_gradient() {
    let device = Device::flex().autodiff();
    let model = model(ConfHead::Final, &device);
    let batch = windows(3, &device);
    let out = DenseObjective(settings(0.7)).compute(&model, batch.clone());
    let actual = out.lookahead.as_ref().unwrap().actual.clone();
    assert!(!actual.is_autodiff(), "pass 2's losses carry no graph");
    let grads = out.total.backward();

    // The same loss with pass 2's result as a plain constant gives the same gradient.
    let parts = WindowParts::new(batch.tokens);
    let history = confidence_history(&model, &parts.x, ConfInput::SelfConditioned);
    let pass1 = model.forward(parts.x, history, &AttentionMask::Causal);
    let conf_loss = (pass1.confidence - actual).powi_scalar(2).mean();
    let manual = lm_loss(pass1.logits, parts.y1) + conf_loss * 0.7;
    let manual_grads = manual.backward();
    for (a, b) in [
        (
            grad_vec(&model.blocks[0].attn.key.weight, &grads),
            grad_vec(&model.blocks[0].attn.key.weight, &manual_grads),
        ),
        (
            grad_vec(&model.tok_emb.weight, &grads),
            grad_vec(&model.tok_emb.weight, &manual_grads),
        ),
        (
            grad_vec(&model.confidence_predictor.weight, &grads),
            grad_vec(&model.confidence_predictor.weight, &manual_grads),
        ),
    ] {
        assert_same(&a, &b);
    }
}

#[test]
fn seeds_last_position_logits_apart_give_the_gradient_of_the_full_logits_last_row() {
    let device = Device::flex().autodiff();
    let model = model(ConfHead::Final, &device);
    let batch = windows(3, &device);
    let out = SeedObjective(settings(0.7)).compute(&model, batch.clone());
    let actual = out.lookahead.as_ref().unwrap().actual.clone(); // [B, 1]
    let grads = out.total.backward();

    // The seed step written over pass 1's full logits, their last row sliced.
    let parts = WindowParts::new(batch.tokens);
    let [rows, seq] = parts.x.dims();
    let history = confidence_history(&model, &parts.x, ConfInput::SelfConditioned);
    let pass1 = model.forward(parts.x, history, &AttentionMask::Causal);
    let vocab = pass1.logits.dims()[2];
    let last_logits = pass1.logits.slice([0..rows, seq - 1..seq, 0..vocab]);
    let lm = lm_loss(last_logits, parts.y1.slice([0..rows, seq - 1..seq]));
    let conf_last = pass1.confidence.slice([0..rows, seq - 1..seq]);
    let manual = lm + (conf_last - actual).powi_scalar(2).mean() * 0.7;
    let manual_grads = manual.backward();
    for (a, b) in [
        (
            grad_vec(&model.tok_emb.weight, &grads),
            grad_vec(&model.tok_emb.weight, &manual_grads),
        ),
        (
            grad_vec(&model.blocks[1].mlp.fc.weight, &grads),
            grad_vec(&model.blocks[1].mlp.fc.weight, &manual_grads),
        ),
        (
            grad_vec(&model.confidence_predictor.weight, &grads),
            grad_vec(&model.confidence_predictor.weight, &manual_grads),
        ),
    ] {
        assert!(
            a.iter().any(|g| g.abs() > 1e-6),
            "a zero gradient proves nothing"
        );
        assert_same(&a, &b);
    }
}

#[test]
fn with_the_probe_the_trunk_gets_the_plain_lm_gradient_whatever_alpha() {
    let device = Device::flex().autodiff();
    let model = model(ConfHead::Probe, &device);
    let batch = windows(3, &device);
    let parts = WindowParts::new(batch.tokens.clone());
    let history = confidence_history(&model, &parts.x, ConfInput::SelfConditioned);
    let lm_only = lm_loss(
        model
            .forward(parts.x, history, &AttentionMask::Causal)
            .logits,
        parts.y1,
    );
    let lm_grads = lm_only.backward();
    for alpha in [0.0, 1.0] {
        let grads = DenseObjective(settings(alpha))
            .compute(&model, batch.clone())
            .total
            .backward();
        for (a, b) in [
            (
                grad_vec(&model.blocks[1].mlp.fc.weight, &grads),
                grad_vec(&model.blocks[1].mlp.fc.weight, &lm_grads),
            ),
            (
                grad_vec(&model.blocks[0].adapt1.modulation.weight, &grads),
                grad_vec(&model.blocks[0].adapt1.modulation.weight, &lm_grads),
            ),
            (
                grad_vec(&model.pos_emb.weight, &grads),
                grad_vec(&model.pos_emb.weight, &lm_grads),
            ),
        ] {
            assert_same(&a, &b);
        }
        let head = grad_vec(&model.confidence_predictor.weight, &grads);
        let head_norm: f32 = head.iter().map(|g| g * g).sum();
        assert_eq!(
            head_norm > 0.0,
            alpha > 0.0,
            "alpha {alpha}: head gradient {head_norm}"
        );
    }
}

#[test]
fn teacher_targets_are_pass_one_losses_one_position_ahead() {
    let device = Device::flex();
    let model = model(ConfHead::Final, &device);
    let out = TeacherObjective(settings(1.0)).compute(&model, windows(2, &device));
    let look = out.lookahead.unwrap();
    assert_eq!(look.actual.dims(), [2, L]);
    assert_eq!(out.tokens.loss.dims(), [2, L]);
    // The target at k is the loss at k + 1 of the same pass, so it overlaps the LM losses.
    let actual: Vec<f32> = look.actual.into_data().try_into_vec_as().unwrap();
    let losses: Vec<f32> = out.tokens.loss.into_data().try_into_vec_as().unwrap();
    for row in 0..2 {
        for k in 0..L - 1 {
            let (a, b) = (actual[row * L + k], losses[row * L + k + 1]);
            assert!((a - b).abs() < 1e-5, "row {row} k {k}: {a} vs {b}");
        }
    }
}

#[test]
fn objectives_report_the_shapes_their_metrics_need() {
    let device = Device::flex();
    let model = model(ConfHead::Final, &device);
    let batch = windows(2, &device);
    let seed = SeedObjective(settings(1.0)).compute(&model, batch.clone());
    assert_eq!(
        seed.tokens.loss.dims(),
        [2, L],
        "LM metrics cover all L positions"
    );
    assert_eq!(seed.lookahead.unwrap().predicted.dims(), [2, 1]);
    let dense = DenseObjective(settings(1.0)).compute(&model, batch);
    let look = dense.lookahead.unwrap();
    assert_eq!(look.predicted.dims(), [2, L]);
    let total = dense.total.into_scalar::<f32>();
    let parts = dense.lm_loss.into_scalar::<f32>() + dense.conf_loss.unwrap().into_scalar::<f32>();
    assert!((total - parts).abs() < 1e-5);
}
