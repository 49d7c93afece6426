//! The fused flex operations against Burn's own operations (`fused::plain`): values, and
//! gradients through a fixed weighting so that every output element has its own gradient.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{Distribution, Tolerance};
use conf_model::fused::{self, plain};
use conf_model::layers::{LAYER_NORM_EPS, apply_layer_norm};

fn normal<const D: usize>(shape: [usize; D], mean: f64, std: f64, device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(mean, std), device)
}

/// Runs `fused_op` and `plain_op` on the same leaf; asserts equal values and equal input
/// gradients within `tolerance`, on `device` (with autodiff).
fn assert_same<const D: usize>(
    device: &Device,
    x: Tensor<D>,
    fused_op: impl Fn(Tensor<D>) -> Tensor<D>,
    plain_op: impl Fn(Tensor<D>) -> Tensor<D>,
    tolerance: f32,
) {
    assert!(fused::applies(&x), "the fused path is what is tested");
    let weights = normal(x.dims(), 0.0, 1.0, device);
    let x = x.require_grad();
    let ours = fused_op(x.clone());
    let theirs = plain_op(x.clone());
    ours.clone()
        .into_data()
        .assert_approx_eq::<f32>(&theirs.clone().into_data(), Tolerance::absolute(tolerance));
    let g_ours = x.grad(&(ours * weights.clone()).sum().backward()).unwrap();
    let g_theirs = x.grad(&(theirs * weights).sum().backward()).unwrap();
    assert!(
        g_theirs.clone().abs().max().into_scalar::<f32>() > 1e-2,
        "a zero gradient proves nothing"
    );
    g_ours
        .into_data()
        .assert_approx_eq::<f32>(&g_theirs.into_data(), Tolerance::absolute(tolerance));
}

#[test]
fn fused_gelu_equals_burns_exact_gelu_in_values_and_gradients() {
    let device = Device::flex().autodiff();
    // 40k elements: several parallel tasks, values across the curve's bend.
    let x = normal([4, 100, 100], 0.0, 2.0, &device);
    assert_same(&device, x, fused::gelu, plain::gelu, 2e-6);
}

#[test]
fn fused_normalisation_equals_burns_in_values_and_gradients() {
    let device = Device::flex().autodiff();
    let x = normal([3, 50, 48], 1.5, 3.0, &device);
    let eps = LAYER_NORM_EPS as f32;
    assert_same(
        &device,
        x,
        |x| fused::normalise(x, eps),
        |x| plain::normalise(x, eps),
        2e-5,
    );
}

#[test]
fn a_layer_norm_through_the_fused_normalisation_equals_burns_layer_norm() {
    let device = Device::flex().autodiff();
    let mut norm = burn::nn::LayerNormConfig::new(24)
        .with_epsilon(LAYER_NORM_EPS)
        .init(&device);
    // Fresh leaves away from gain 1 and bias 0.
    norm.gamma = Param::from_tensor(normal([24], 1.0, 0.5, &device));
    norm.beta = Some(Param::from_tensor(normal([24], 0.0, 0.5, &device)));
    let x = normal([2, 9, 24], -0.5, 2.0, &device);
    let ours = apply_layer_norm(&norm, x.clone());
    let burns = norm.forward(x);
    ours.clone()
        .into_data()
        .assert_approx_eq::<f32>(&burns.clone().into_data(), Tolerance::absolute(1e-5));
    let g_ours = ours.powi_scalar(2).sum().backward();
    let g_burns = burns.powi_scalar(2).sum().backward();
    let gamma = |g| norm.gamma.grad(g).unwrap().into_data();
    gamma(&g_ours).assert_approx_eq::<f32>(&gamma(&g_burns), Tolerance::absolute(1e-4));
    let beta = |g| norm.beta.as_ref().unwrap().grad(g).unwrap().into_data();
    beta(&g_ours).assert_approx_eq::<f32>(&beta(&g_burns), Tolerance::absolute(1e-4));
}

#[test]
fn the_fused_adaptive_layer_equals_its_plain_form_in_values_and_all_four_gradients() {
    let device = Device::flex().autodiff();
    let d = 24;
    // 3 · 40 rows: several parallel tasks, so the parameter sums add partial sums.
    let x = normal([3, 40, d], 0.5, 1.0, &device).require_grad();
    let c = normal([3, 40, 1], 1.0, 1.0, &device).require_grad();
    let weight = normal([1, 2 * d], 0.0, 1.0, &device).require_grad();
    let bias = normal([2 * d], 0.0, 1.0, &device).require_grad();
    let weights = normal([3, 40, d], 0.0, 1.0, &device);
    let eps = LAYER_NORM_EPS as f32;
    let run = |op: fn(Tensor<3>, Tensor<3>, Tensor<2>, Tensor<1>, f32) -> Tensor<3>| {
        let y = op(x.clone(), c.clone(), weight.clone(), bias.clone(), eps);
        let grads = (y.clone() * weights.clone()).sum().backward();
        let data = |t: Option<Tensor<3>>| t.unwrap().into_data();
        (
            y.into_data(),
            [
                data(x.grad(&grads)),
                data(c.grad(&grads)),
                weight.grad(&grads).unwrap().into_data(),
                bias.grad(&grads).unwrap().into_data(),
            ],
        )
    };
    assert!(fused::applies(&x));
    let (y_fused, g_fused) = run(|x, c, w, b, eps| fused::adaptive_norm(x, Some(c), w, b, eps));
    let (y_plain, g_plain) = run(plain::adaptive_norm);
    y_fused.assert_approx_eq::<f32>(&y_plain, Tolerance::absolute(2e-5));
    for (name, (ours, theirs)) in ["x", "c", "weight", "bias"]
        .iter()
        .zip(g_fused.iter().zip(&g_plain))
    {
        let largest = theirs.iter::<f32>().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(largest > 1e-2, "{name}: a zero gradient proves nothing");
        // Sums over 120 rows: relative to the largest entry.
        ours.assert_approx_eq::<f32>(theirs, Tolerance::absolute(1e-5 * largest.max(1.0)));
    }
}

#[test]
fn fused_attention_softmax_equals_the_masked_softmax_in_values_and_gradients() {
    let device = Device::flex().autodiff();
    // Queries over their own keys, over cached keys followed by their own, and unmasked.
    for (queries, keys, causal) in [(33, 33, true), (5, 12, true), (20, 20, false)] {
        let scores = normal([2, 3, queries, keys], 0.0, 3.0, &device);
        assert_same(
            &device,
            scores,
            |s| fused::attention_softmax(s, causal),
            |s| plain::attention_softmax(s, causal),
            1e-6,
        );
    }
}

#[test]
fn a_causal_softmax_gives_the_keys_after_each_query_nothing() {
    let device = Device::flex();
    let p = fused::attention_softmax(normal([1, 2, 6, 6], 0.0, 1.0, &device), true);
    let hidden = Tensor::<2, Int>::ones([6, 6], &device).triu(1).float();
    let leaked = (p.clone() * hidden.unsqueeze::<4>())
        .abs()
        .max()
        .into_scalar::<f32>();
    assert_eq!(leaked, 0.0);
    let row_sums = p.sum_dim(3);
    row_sums.into_data().assert_approx_eq::<f32>(
        &Tensor::<4>::ones([1, 2, 6, 1], &device).into_data(),
        Tolerance::absolute(1e-6),
    );
}

#[test]
fn the_fused_operations_without_autodiff_give_the_same_values() {
    let device = Device::flex();
    let x = normal([2, 16, 32], 0.0, 2.0, &device);
    let close = |a: Tensor<3>, b: Tensor<3>| {
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(2e-5))
    };
    close(fused::gelu(x.clone()), plain::gelu(x.clone()));
    close(fused::normalise(x.clone(), 1e-5), plain::normalise(x, 1e-5));
}

#[test]
fn under_gradient_checkpointing_the_plain_path_runs_with_the_same_gradients() {
    let fused_device = Device::flex().autodiff();
    let checkpointed = Device::flex().autodiff().gradient_checkpointing();
    // One input for both runs, drawn once: re-seeding each device raced with the other tests
    // drawing from the same generator, so the two runs could see different inputs.
    let input = normal([2, 8, 16], 0.0, 1.0, &Device::flex()).into_data();
    let run = |device: &Device, fused_path: bool| {
        let x = Tensor::<3>::from_data(input.clone(), device).require_grad();
        assert_eq!(fused::applies(&x), fused_path);
        let y = fused::gelu(fused::normalise(x.clone(), 1e-5)).reshape([2, 1, 8, 16]);
        let y = fused::attention_softmax(y.slice([0..2, 0..1, 0..8, 0..8]), true);
        x.grad(&y.powi_scalar(2).sum().backward())
            .unwrap()
            .into_data()
    };
    run(&checkpointed, false)
        .assert_approx_eq::<f32>(&run(&fused_device, true), Tolerance::absolute(1e-6));
}

#[test]
fn the_fused_matrix_product_equals_burns_on_views_in_values_and_both_gradients() {
    let device = Device::flex().autodiff();
    // The attention's shapes: heads split off a [B, T, H, dh] layout (strided views), keys
    // transposed; then Linear's one large 2-D product (gemm's own threads) and the tied head's
    // transposed weight.
    let cases = [
        (
            normal([2, 8, 3, 5], 0.0, 1.0, &device),
            normal([2, 6, 3, 5], 0.0, 1.0, &device),
            true,
        ),
        (
            normal([1, 1, 300, 200], 0.0, 1.0, &device),
            normal([1, 1, 150, 200], 0.0, 1.0, &device),
            false,
        ),
    ];
    for (a, b, split_heads) in cases {
        let layout = |t: Tensor<4>| if split_heads { t.swap_dims(1, 2) } else { t };
        let (a, b) = (a.require_grad(), b.require_grad());
        // Each product builds its own graph from the leaves (a backward consumes its graph).
        let operands = || (layout(a.clone()), layout(b.clone()).swap_dims(2, 3));
        let (lhs, rhs) = operands();
        assert!(fused::applies(&lhs));
        let [batch, heads, rows, _] = lhs.dims();
        let weights = normal([batch, heads, rows, rhs.dims()[3]], 0.0, 1.0, &device);
        let ours = fused::matmul(lhs, rhs);
        let (lhs, rhs) = operands();
        let theirs = plain::matmul(lhs, rhs);
        ours.clone()
            .into_data()
            .assert_approx_eq::<f32>(&theirs.clone().into_data(), Tolerance::absolute(1e-4));
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_theirs = (theirs * weights).sum().backward();
        for leaf in [&a, &b] {
            let (ours, theirs) = (leaf.grad(&g_ours).unwrap(), leaf.grad(&g_theirs).unwrap());
            assert!(theirs.clone().abs().max().into_scalar::<f32>() > 1e-2);
            ours.into_data()
                .assert_approx_eq::<f32>(&theirs.into_data(), Tolerance::absolute(1e-3));
        }
        // Without autodiff: the backend's own operation, the same values.
        let (lhs, rhs) = operands();
        let (lhs, rhs) = (lhs.inner(), rhs.inner());
        fused::matmul(lhs.clone(), rhs.clone())
            .into_data()
            .assert_approx_eq::<f32>(&lhs.matmul(rhs).into_data(), Tolerance::absolute(1e-4));
    }
}

#[test]
fn fused_attention_equals_its_plain_form_in_values_and_the_three_gradients() {
    let device = Device::flex().autodiff();
    // (queries, keys, causal): a causal pass, one over cached keys, an unmasked one.
    for (queries, keys, causal) in [(7, 7, true), (5, 9, true), (6, 4, false)] {
        // Heads split off [B, T, H, dh] rows as the model does (strided views).
        let leaf = |rows| normal([2, rows, 3, 8], 0.0, 1.5, &device).require_grad();
        let (q, k, v) = (leaf(queries), leaf(keys), leaf(keys));
        let heads = |t: &Tensor<4>| t.clone().swap_dims(1, 2);
        let weights = normal([2, 3, queries, 8], 0.0, 1.0, &device);
        let ours = fused::attention(heads(&q), heads(&k), heads(&v), causal);
        let theirs = plain::attention(heads(&q), heads(&k), heads(&v), causal);
        ours.clone()
            .into_data()
            .assert_approx_eq::<f32>(&theirs.clone().into_data(), Tolerance::absolute(1e-5));
        // Merging the heads back, as the model does.
        let merge = |t: Tensor<4>| t.swap_dims(1, 2).reshape([2, queries, 24]);
        let weights = merge(weights);
        let g_ours = (merge(ours) * weights.clone()).sum().backward();
        let g_theirs = (merge(theirs) * weights).sum().backward();
        for (name, leaf) in [("q", &q), ("k", &k), ("v", &v)] {
            let (ours, theirs) = (leaf.grad(&g_ours).unwrap(), leaf.grad(&g_theirs).unwrap());
            assert!(
                theirs.clone().abs().max().into_scalar::<f32>() > 1e-2,
                "{name}: a zero gradient proves nothing"
            );
            ours.into_data()
                .assert_approx_eq::<f32>(&theirs.into_data(), Tolerance::absolute(1e-5));
        }
        // Without autodiff: the backend's own operation, the same values.
        let inner = |t: &Tensor<4>| heads(t).inner();
        fused::attention(inner(&q), inner(&k), inner(&v), causal)
            .into_data()
            .assert_approx_eq::<f32>(
                &plain::attention(inner(&q), inner(&k), inner(&v), causal).into_data(),
                Tolerance::absolute(1e-5),
            );
    }
}

#[test]
fn fused_prefix_and_self_attention_equals_its_plain_form_and_sees_no_later_key() {
    let device = Device::flex();
    for seq in [1, 2, 9] {
        // Heads split off [B, T, H, dh] rows as the model does (strided views).
        let heads = || normal([2, seq, 3, 8], 0.0, 1.5, &device).swap_dims(1, 2);
        let inputs = [heads(), heads(), heads(), heads(), heads()];
        let fused_on = |[q, own_k, own_v, past_k, past_v]: [Tensor<4>; 5]| {
            fused::prefix_and_self_attention(q, own_k, own_v, past_k, past_v, true)
        };
        let [q, own_k, own_v, past_k, past_v] = inputs.clone();
        let ours = fused_on(inputs.clone());
        ours.clone().into_data().assert_approx_eq::<f32>(
            &plain::prefix_and_self_attention(q, own_k, own_v, past_k, past_v, true).into_data(),
            Tolerance::absolute(1e-5),
        );
        // The last position's own and cached keys and values change only the last row.
        let last = [0..2, 0..3, seq - 1..seq, 0..8];
        let changed = inputs.clone().map(|t| {
            let [b, h, _, dh] = t.dims();
            let moved = t.clone().slice(last.clone()) + 3.0;
            let t = t.slice_assign(last.clone(), moved);
            assert_eq!(t.dims(), [b, h, seq, dh]);
            t
        });
        let [_, own_k, own_v, past_k, past_v] = changed;
        let moved = fused_on([inputs[0].clone(), own_k, own_v, past_k, past_v]);
        let earlier = [0..2, 0..3, 0..seq - 1, 0..8];
        moved
            .clone()
            .slice(earlier.clone())
            .into_data()
            .assert_eq(&ours.clone().slice(earlier).into_data(), true);
        let change = (moved.slice(last.clone()) - ours.slice(last)).abs().max();
        assert!(
            change.into_scalar::<f32>() > 0.1,
            "the last row sees its own keys"
        );
    }
}

#[test]
fn fused_cache_and_self_attention_equals_attention_over_all_keys_and_sees_no_other_own_key() {
    let device = Device::flex();
    let cached = 7;
    for seq in [1, 3] {
        let heads = |rows| normal([2, rows, 3, 8], 0.0, 1.5, &device).swap_dims(1, 2);
        let [q, own_k, own_v] = [heads(seq), heads(seq), heads(seq)];
        let [past_k, past_v] = [heads(cached), heads(cached)];
        let on = |own_k: Tensor<4>, own_v: Tensor<4>| {
            fused::prefix_and_self_attention(
                q.clone(),
                own_k,
                own_v,
                past_k.clone(),
                past_v.clone(),
                false,
            )
        };
        let ours = on(own_k.clone(), own_v.clone());
        assert_eq!(ours.dims(), [2, 3, seq, 8]);
        ours.clone().into_data().assert_approx_eq::<f32>(
            &plain::prefix_and_self_attention(
                q.clone(),
                own_k.clone(),
                own_v.clone(),
                past_k.clone(),
                past_v.clone(),
                false,
            )
            .into_data(),
            Tolerance::absolute(1e-5),
        );
        if seq == 1 {
            // One query: attention over the cached keys followed by its own, unmasked.
            let keys = Tensor::cat(vec![past_k.clone(), own_k.clone()], 2);
            let values = Tensor::cat(vec![past_v.clone(), own_v.clone()], 2);
            ours.clone().into_data().assert_approx_eq::<f32>(
                &plain::attention(q.clone(), keys, values, false).into_data(),
                Tolerance::absolute(1e-5),
            );
        }
        // Query 0's own key and value change its row only.
        let first = [0..2, 0..3, 0..1, 0..8];
        let moved = |t: Tensor<4>| {
            let shifted = t.clone().slice(first.clone()) + 3.0;
            t.slice_assign(first.clone(), shifted)
        };
        let changed = on(moved(own_k.clone()), moved(own_v.clone()));
        let later = [0..2, 0..3, 1..seq, 0..8];
        changed
            .clone()
            .slice(later.clone())
            .into_data()
            .assert_eq(&ours.clone().slice(later).into_data(), true);
        let change = (changed.slice(first.clone()) - ours.slice(first))
            .abs()
            .max();
        assert!(
            change.into_scalar::<f32>() > 0.1,
            "a query sees its own key"
        );
    }
}

fn random_targets(batch: usize, seq: usize, vocab: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<2>::random(
        [batch, seq],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    )
    .int()
}

#[test]
fn fused_cross_entropy_equals_log_softmax_and_gather_in_values_and_gradients() {
    let device = Device::flex().autodiff();
    device.seed(11);
    // Rows of 3 (shorter than a vector lane), 65 (a character vocabulary, a tail) and 1,000
    // (several blocks), with large logits so that the log-sum-exp's shift matters.
    for vocab in [3, 65, 1000] {
        let targets = random_targets(4, 9, vocab, &device);
        let logits = normal([4, 9, vocab], 20.0, 4.0, &device);
        assert_same(
            &device,
            logits,
            |x| fused::token_cross_entropy(x, targets.clone()).unsqueeze_dim(2),
            |x| plain::token_cross_entropy(x, targets.clone()).unsqueeze_dim(2),
            // Losses up to ~30 and gradients up to ~60 (the weights broadcast over the row).
            1e-4,
        );
    }
}

#[test]
fn fused_token_statistics_equal_the_plain_ones() {
    let device = Device::flex();
    device.seed(12);
    for vocab in [3, 65, 1000] {
        let logits = normal([4, 33, vocab], 0.0, 3.0, &device);
        let mut targets = random_targets(4, 33, vocab, &device);
        // Half the rows' targets are their arg-max, so `correct` has both values.
        let argmax = logits.clone().argmax(2).squeeze_dim::<2>(2);
        let half = Tensor::<2>::random([4, 33], Distribution::Bernoulli(0.5), &device).bool();
        targets = targets.mask_where(half, argmax);
        let ours = fused::token_stats(logits.clone(), targets.clone());
        let theirs = plain::token_stats(logits, targets);
        let correct: f32 = theirs.correct.clone().mean().into_scalar();
        assert!((0.3..0.9).contains(&correct), "{correct}");
        for (name, a, b) in [
            ("loss", ours.loss, theirs.loss),
            ("max_prob", ours.max_prob, theirs.max_prob),
            ("correct", ours.correct, theirs.correct),
            ("entropy", ours.entropy, theirs.entropy),
        ] {
            assert_eq!(a.dims(), [4, 33], "{name}");
            a.into_data()
                .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(2e-5));
        }
    }
}

#[test]
fn fused_sampling_draws_the_plain_paths_tokens_from_each_rows_distribution() {
    let device = Device::flex();
    device.seed(13);
    for vocab in [3, 65, 1000] {
        let logits = normal([8, 50, vocab], 0.0, 2.0, &device);
        let mut uniforms = Tensor::<2>::random([8, 50], Distribution::Default, &device);
        // The ends of [0, 1): the first token, and the last where rounding leaves all below.
        uniforms = uniforms.slice_assign(
            [0..1, 0..2],
            Tensor::from_floats([[0.0, 0.999_999_9]], &device),
        );
        let ours = fused::sample_tokens(logits.clone(), uniforms.clone());
        let theirs = plain::sample_tokens(logits, uniforms);
        assert_eq!(ours.dtype(), theirs.dtype());
        let ours: Vec<i64> = ours.into_data().convert::<i64>().try_to_vec().unwrap();
        let theirs: Vec<i64> = theirs.into_data().convert::<i64>().try_to_vec().unwrap();
        assert_eq!(ours, theirs, "vocabulary {vocab}");
        assert_eq!(ours[0], 0);
        let distinct: std::collections::BTreeSet<_> = ours.iter().collect();
        assert!(
            distinct.len() > vocab.min(20) / 2,
            "draws spread over the vocabulary"
        );
    }
}

#[test]
#[should_panic(expected = "target 7 outside the vocabulary of 5 tokens")]
fn a_target_outside_the_vocabulary_is_refused_naming_it() {
    let device = Device::flex();
    let logits = normal([1, 2, 5], 0.0, 1.0, &device);
    let targets = Tensor::<2, Int>::from_ints([[1, 7]], &device);
    let _ = fused::token_cross_entropy(logits, targets);
}

#[test]
#[should_panic(expected = "uniforms must be [2, 3], one per row of logits [2, 3, 5]; got [3, 2]")]
fn uniforms_of_the_right_count_but_the_wrong_shape_are_refused() {
    let device = Device::flex();
    let logits = normal([2, 3, 5], 0.0, 1.0, &device);
    let uniforms = Tensor::<2>::zeros([3, 2], &device);
    let _ = fused::sample_tokens(logits, uniforms);
}

#[test]
#[should_panic(expected = "targets must be [2, 3], one per row of logits [2, 3, 5]; got [6, 1]")]
fn targets_of_the_right_count_but_the_wrong_shape_are_refused() {
    let device = Device::flex();
    let logits = normal([2, 3, 5], 0.0, 1.0, &device);
    let targets = Tensor::<2, Int>::zeros([6, 1], &device);
    let _ = fused::token_stats(logits, targets);
}

/// libtorch's attention (PyTorch's own kernel, its backward through libtorch's graph) against
/// the plain form on libtorch, values and the three gradients, for a causal pass, one over
/// cached keys and an unmasked one: in f32 within 1e-5; in bf16 against the plain form of the
/// rounded operands, within 3% of the largest value (the backward's bf16 products round its
/// gradients by a few of bf16's 2⁻⁸ steps; a wrong mask or gradient is off by far more).
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // burn-tch is deprecated upstream but is still Burn's libtorch backend
fn libtorch_attention_equals_its_plain_form_in_f32_and_within_rounding_in_bf16() {
    use burn::tensor::DType;
    let device = Device::libtorch().autodiff();
    device.seed(5);
    let assert_close = |dtype, ours: Tensor<4>, theirs: Tensor<4>, what: &str| {
        let largest = theirs.clone().abs().max().into_scalar::<f32>();
        assert!(largest > 1e-2, "{what}: a zero tensor proves nothing");
        let tolerance = match dtype {
            DType::F32 => 1e-5,
            _ => 3e-2 * largest,
        };
        ours.into_data()
            .assert_approx_eq::<f32>(&theirs.into_data(), Tolerance::absolute(tolerance));
    };
    for dtype in [DType::F32, DType::BF16] {
        for (queries, keys, causal) in [(7, 7, true), (5, 9, true), (6, 4, false)] {
            let leaf = |rows| normal([2, rows, 3, 8], 0.0, 1.5, &device).require_grad();
            let (q, k, v) = (leaf(queries), leaf(keys), leaf(keys));
            let heads = |t: &Tensor<4>| t.clone().swap_dims(1, 2);
            let operand = |t: &Tensor<4>| heads(t).cast(dtype);
            assert!(fused::attends_in_bf16(&heads(&q)));
            let ours = fused::attention(operand(&q), operand(&k), operand(&v), causal);
            assert_eq!(ours.dtype(), dtype);
            let ours = ours.cast(DType::F32);
            let rounded = |t: &Tensor<4>| operand(t).cast(DType::F32);
            let theirs = plain::attention(rounded(&q), rounded(&k), rounded(&v), causal);
            assert_close(dtype, ours.clone(), theirs.clone(), "output");
            let weights = normal([2, 3, queries, 8], 0.0, 1.0, &device);
            let g_ours = (ours * weights.clone()).sum().backward();
            let g_theirs = (theirs * weights).sum().backward();
            for (name, leaf) in [("q", &q), ("k", &k), ("v", &v)] {
                let (ours, theirs) = (leaf.grad(&g_ours).unwrap(), leaf.grad(&g_theirs).unwrap());
                assert_close(dtype, ours, theirs, name);
            }
        }
    }
}

/// The attention of the no-gradient passes that extend cached keys on libtorch in bf16 (one
/// attention over the cached keys that returns the rows' log-sum-exp, the own key merged in by
/// it) against the plain form of the rounded operands, within 1% of the largest value: dense's
/// causal form and seed's over every cached key.
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // burn-tch is deprecated upstream but is still Burn's libtorch backend
fn libtorch_prefix_and_self_attention_in_bf16_equals_the_plain_form_within_rounding() {
    use burn::tensor::DType;
    let device = Device::libtorch();
    device.seed(5);
    for (seq, cached, causal) in [(6, 6, true), (3, 7, false)] {
        let heads = |rows| normal([2, rows, 3, 8], 0.0, 1.5, &device).swap_dims(1, 2);
        let rounded = [
            heads(seq),
            heads(seq),
            heads(seq),
            heads(cached),
            heads(cached),
        ]
        .map(|t| t.cast(DType::BF16).cast(DType::F32));
        let [q, own_k, own_v, past_k, past_v] = rounded.clone().map(|t| t.cast(DType::BF16));
        let ours = fused::prefix_and_self_attention(q, own_k, own_v, past_k, past_v, causal);
        assert_eq!(ours.dtype(), DType::BF16);
        let [q, own_k, own_v, past_k, past_v] = rounded;
        let theirs = plain::prefix_and_self_attention(q, own_k, own_v, past_k, past_v, causal);
        let largest = theirs.clone().abs().max().into_scalar::<f32>();
        ours.cast(DType::F32)
            .into_data()
            .assert_approx_eq::<f32>(&theirs.into_data(), Tolerance::absolute(1e-2 * largest));
    }
}

/// The Linear as one libtorch operation (`fused::linear`: `addmm` in f32; in bf16 the product
/// of bf16 operands with the f32 bias added as it converts back, or a bf16 `addmm` with a bf16
/// output, here from a bf16 input as the attention's context) against Burn's product and bias
/// on libtorch: the output and the gradients of x, the weight and the bias. In f32 within 1e-5;
/// in bf16 against Burn's product of the same bf16 operands, within 1% of the largest value
/// (both round to bf16; a missing bias or a wrong transpose is off by far more).
#[cfg(feature = "tch")]
#[test]
#[allow(deprecated)] // burn-tch is deprecated upstream but is still Burn's libtorch backend
fn libtorch_linear_equals_burns_product_and_bias_in_f32_and_bf16() {
    use burn::tensor::DType;
    let device = Device::libtorch().autodiff();
    device.seed(9);
    let assert_close = |bf16: bool, ours: Tensor<2>, theirs: Tensor<2>, what: &str| {
        let largest = theirs.clone().abs().max().into_scalar::<f32>();
        assert!(largest > 1e-1, "{what}: a small tensor proves little");
        let tolerance = if bf16 { 1e-2 * largest } else { 1e-5 };
        ours.into_data()
            .assert_approx_eq::<f32>(&theirs.into_data(), Tolerance::absolute(tolerance));
    };
    for (bf16, out_bf16) in [(false, false), (true, false), (true, true)] {
        let x = normal([40, 24], 0.0, 1.0, &device).require_grad();
        let weight = normal([24, 17], 0.0, 0.5, &device).require_grad();
        let bias = normal([17], 1.0, 1.0, &device).require_grad();
        // One graph each: the first backward consumes the nodes it passes.
        let input = || {
            if out_bf16 {
                x.clone().cast(DType::BF16)
            } else {
                x.clone()
            }
        };
        assert!(fused::linear_takes(&input()));
        let ours = fused::linear(input(), weight.clone(), bias.clone(), bf16, out_bf16);
        assert_eq!(
            ours.dtype(),
            if out_bf16 { DType::BF16 } else { DType::F32 }
        );
        let theirs = if out_bf16 {
            let product = input().matmul(weight.clone().cast(DType::BF16));
            (product + bias.clone().cast(DType::BF16).unsqueeze::<2>()).cast(DType::F32)
        } else if bf16 {
            let product = input()
                .cast(DType::BF16)
                .matmul(weight.clone().cast(DType::BF16));
            product.cast(DType::F32) + bias.clone().unsqueeze::<2>()
        } else {
            input().matmul(weight.clone()) + bias.clone().unsqueeze::<2>()
        };
        let ours = ours.cast(DType::F32);
        assert_close(bf16, ours.clone(), theirs.clone(), "output");
        let weights = normal([40, 17], 0.0, 1.0, &device);
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_theirs = (theirs * weights).sum().backward();
        assert_close(
            bf16,
            x.grad(&g_ours).unwrap(),
            x.grad(&g_theirs).unwrap(),
            "x",
        );
        assert_close(
            bf16,
            weight.grad(&g_ours).unwrap(),
            weight.grad(&g_theirs).unwrap(),
            "weight",
        );
        let bias_grad = |g| bias.grad(g).unwrap().unsqueeze::<2>();
        assert_close(bf16, bias_grad(&g_ours), bias_grad(&g_theirs), "bias");
    }
}
