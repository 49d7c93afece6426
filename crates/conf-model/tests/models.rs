//! Behaviour of both models, asserted with numbers.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData, Tolerance};

use conf_model::init::Perturb;
use conf_model::*;

fn tiny(vocab: usize) -> GptConfig {
    GptConfig::new(vocab, 16, 32, 2, 4, 128)
}

fn conf_config(head: ConfHead) -> ConfidenceGptConfig {
    ConfidenceGptConfig::new(tiny(11)).with_conf_head(head)
}

/// One row of ids: `[1, T]`.
fn row(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn random_ids(batch: usize, seq: usize, vocab: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<2>::random(
        [batch, seq],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    )
    .int()
}

/// Noise on every parameter, so zero-initialised parts (the AdaptiveLayers) matter too.
fn perturb() -> Perturb {
    Perturb { std: 0.1 }
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

#[test]
fn both_models_produce_logits_and_confidence_of_the_right_shape() {
    let device = Device::flex();
    let x = random_ids(3, 16, 11, &device);
    let standard = tiny(11).init_minigpt(&device);
    assert_eq!(
        standard.forward(x.clone(), &AttentionMask::Causal).dims(),
        [3, 16, 11]
    );
    for head in [ConfHead::Final, ConfHead::Probe] {
        let model = conf_config(head).init(&device);
        let out = model.forward(
            x.clone(),
            Tensor::zeros([3, 16], &device),
            &AttentionMask::Causal,
        );
        assert_eq!(out.logits.dims(), [3, 16, 11]);
        assert_eq!(out.confidence.dims(), [3, 16]);
        // A fresh head predicts roughly its initial bias of 2 nats.
        let mean = out.confidence.mean().into_scalar::<f64>();
        assert!((mean - 2.0).abs() < 0.2, "{mean}");
    }
}

#[test]
fn predicting_confidence_alone_equals_the_full_forwards_confidence() {
    let device = Device::flex();
    device.seed(5);
    let x = random_ids(3, 16, 11, &device);
    let c = Tensor::<2>::random([3, 16], Distribution::Uniform(0.0, 4.0), &device);
    for head in [ConfHead::Final, ConfHead::Probe] {
        let model = conf_config(head).init(&device).map(&mut perturb());
        let full = model
            .forward(x.clone(), c.clone(), &AttentionMask::Causal)
            .confidence;
        let alone = model.predict_confidence(x.clone(), Some(c.clone()));
        assert_eq!(alone.dims(), [3, 16]);
        let spread = full.clone().var(1).mean().into_scalar::<f32>();
        assert!(
            spread > 1e-4,
            "{head:?}: a constant prediction would prove nothing"
        );
        assert_eq!(
            alone.into_data().try_to_vec::<f32>().unwrap(),
            full.into_data().try_to_vec::<f32>().unwrap(),
            "{head:?}"
        );
    }
}

#[test]
fn changing_a_future_token_leaves_past_outputs_unchanged() {
    let device = Device::flex();
    device.seed(3);
    let standard = tiny(11).init_minigpt(&device).map(&mut perturb());
    let confidence = conf_config(ConfHead::Final)
        .init(&device)
        .map(&mut perturb());
    let base: Vec<i64> = (0..16).map(|i| (i * 7 % 11) as i64).collect();
    let conf_in = Tensor::<2>::random([1, 16], Distribution::Uniform(0.0, 4.0), &device);
    for j in [1usize, 8, 15] {
        let mut changed = base.clone();
        changed[j] = (changed[j] + 5) % 11;
        let a = standard.forward(row(&base, &device), &AttentionMask::Causal);
        let b = standard.forward(row(&changed, &device), &AttentionMask::Causal);
        let ca = confidence.forward(row(&base, &device), conf_in.clone(), &AttentionMask::Causal);
        let cb = confidence.forward(
            row(&changed, &device),
            conf_in.clone(),
            &AttentionMask::Causal,
        );
        for (x, y) in [(a, b), (ca.logits, cb.logits)] {
            let (x, y) = (values(x), values(y));
            let past = j * 11;
            assert_eq!(&x[..past], &y[..past], "position < {j} changed");
            let max_future_change = x[past..]
                .iter()
                .zip(&y[past..])
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(
                max_future_change > 1e-4,
                "token {j} changed nothing at or after itself"
            );
        }
        let (pa, pb) = (
            values(ca.confidence.unsqueeze()),
            values(cb.confidence.unsqueeze()),
        );
        assert_eq!(&pa[..j], &pb[..j]);
    }
    // The confidence input is causal too.
    let mut bumped: Vec<f32> = conf_in
        .clone()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    bumped[10] += 3.0;
    let bumped = Tensor::from_data(TensorData::new(bumped, [1, 16]), &device);
    let a = confidence.forward(row(&base, &device), conf_in, &AttentionMask::Causal);
    let b = confidence.forward(row(&base, &device), bumped, &AttentionMask::Causal);
    assert_eq!(
        &values(a.logits.clone())[..10 * 11],
        &values(b.logits.clone())[..10 * 11]
    );
    assert_ne!(&values(a.logits)[10 * 11..], &values(b.logits)[10 * 11..]);
}

#[test]
fn an_explicit_causal_mask_equals_the_built_in_causal_path() {
    let device = Device::flex();
    let model = conf_config(ConfHead::Final)
        .init(&device)
        .map(&mut perturb());
    let x = random_ids(2, 16, 11, &device);
    let c = Tensor::<2>::random([2, 16], Distribution::Uniform(0.0, 3.0), &device);
    let a = model.forward(x.clone(), c.clone(), &AttentionMask::Causal);
    let b = model.forward(x, c, &AttentionMask::explicit(causal_mask(16, &device)));
    a.logits
        .into_data()
        .assert_approx_eq::<f32>(&b.logits.into_data(), Tolerance::absolute(1e-5));
}

#[test]
fn a_fresh_confidence_model_computes_exactly_what_minigpt_does_with_the_same_weights() {
    let device = Device::flex();
    let conf = conf_config(ConfHead::Final).init(&device);
    // Copy every shared weight into a MiniGPT of the same width; its LayerNorms stay at their
    // fresh gain 1 and shift 0, which is what zero-initialised AdaptiveLayers compute.
    let mut standard = tiny(11).init_minigpt(&device);
    standard.tok_emb = conf.tok_emb.clone();
    standard.pos_emb = conf.pos_emb.clone();
    standard.ln_f = conf.ln_f.clone();
    for (s, c) in standard.blocks.iter_mut().zip(&conf.blocks) {
        s.attn = c.attn.clone();
        s.mlp = c.mlp.clone();
    }
    let x = random_ids(2, 16, 11, &device);
    let expected = standard
        .forward(x.clone(), &AttentionMask::Causal)
        .into_data();
    for scale in [1e-3, 1.0, 7.5] {
        let c = Tensor::<2>::random([2, 16], Distribution::Uniform(-scale, scale), &device);
        let logits = conf.forward(x.clone(), c, &AttentionMask::Causal).logits;
        logits
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
    }
}

fn confidence_loss_grads(head: ConfHead) -> (ConfidenceAwareGpt, burn::tensor::Gradients) {
    let device = Device::flex().autodiff();
    let model = conf_config(head).init(&device);
    let x = random_ids(2, 16, 11, &device);
    let c = Tensor::<2>::random([2, 16], Distribution::Uniform(0.0, 3.0), &device);
    let target = Tensor::<2>::random([2, 16], Distribution::Uniform(0.0, 3.0), &device);
    let out = model.forward(x, c, &AttentionMask::Causal);
    let loss = (out.confidence - target).powi_scalar(2).mean();
    let grads = loss.backward();
    (model, grads)
}

fn grad_norm<const D: usize>(
    param: &Param<Tensor<D>>,
    grads: &burn::tensor::Gradients,
) -> Option<f64> {
    param
        .grad(grads)
        .map(|g| g.powi_scalar(2).sum().sqrt().into_scalar::<f64>())
}

#[test]
fn the_final_heads_confidence_loss_trains_the_trunk() {
    let (model, grads) = confidence_loss_grads(ConfHead::Final);
    let trunk = [
        grad_norm(&model.tok_emb.weight, &grads),
        grad_norm(&model.blocks[0].attn.query.weight, &grads),
        grad_norm(&model.blocks[1].mlp.fc.weight, &grads),
        grad_norm(&model.blocks[0].adapt1.modulation.weight, &grads),
    ];
    for norm in trunk {
        assert!(norm.is_some_and(|n| n > 1e-8), "{norm:?}");
    }
    assert!(grad_norm(&model.confidence_predictor.weight, &grads).unwrap() > 1e-6);
}

#[test]
fn the_probes_confidence_loss_trains_the_head_only() {
    let (model, grads) = confidence_loss_grads(ConfHead::Probe);
    let trunk = [
        grad_norm(&model.tok_emb.weight, &grads),
        grad_norm(&model.pos_emb.weight, &grads),
        grad_norm(&model.blocks[0].attn.query.weight, &grads),
        grad_norm(&model.blocks[1].mlp.fc.weight, &grads),
        grad_norm(&model.blocks[1].adapt2.modulation.weight, &grads),
        grad_norm(&model.ln_f.gamma, &grads),
    ];
    for norm in trunk {
        assert!(norm.is_none_or(|n| n == 0.0), "trunk got gradient {norm:?}");
    }
    assert!(grad_norm(&model.confidence_predictor.weight, &grads).unwrap() > 1e-6);
    // The probe reads min(3, N) = 2 blocks of width 32.
    assert_eq!(model.confidence_predictor.weight.dims(), [64, 1]);
}

#[test]
fn parameter_counts_equal_the_closed_form() {
    let device = Device::flex();
    let (v, l, d, n, h) = (11usize, 16usize, 32usize, 2usize, 128usize);
    let shared = v * d + (l + 1) * d + n * (4 * (d * d + d) + (d * h + h + h * d + d)) + 2 * d;
    assert_eq!(
        tiny(v).init_minigpt(&device).num_params(),
        shared + n * 4 * d
    );
    assert_eq!(tiny(v).minigpt_params(), shared + n * 4 * d);
    let final_head = conf_config(ConfHead::Final);
    assert_eq!(
        final_head.init(&device).num_params(),
        shared + n * 8 * d + d + 1
    );
    assert_eq!(final_head.params(), shared + n * 8 * d + d + 1);
    let probe = conf_config(ConfHead::Probe);
    assert_eq!(
        probe.init(&device).num_params(),
        shared + n * 8 * d + 2 * d + 1
    );
    assert_eq!(probe.params(), probe.init(&device).num_params());
}

#[test]
fn the_matched_standard_model_is_within_half_a_percent_and_closest() {
    let device = Device::flex();
    // The quick and gpu presets' shapes: (context, d_model, layers, heads).
    for (shape, (l, d, n, h), head) in [
        ("quick", (64, 64, 2, 4), ConfHead::Final),
        ("quick", (64, 64, 2, 4), ConfHead::Probe),
        ("gpu", (512, 768, 12, 12), ConfHead::Final),
    ] {
        let gpt = GptConfig::new(65, l, d, n, h, 4 * d);
        let conf = ConfidenceGptConfig::new(gpt).with_conf_head(head);
        let matched = conf.matched_standard();
        assert!(
            matched.relative_gap < 0.005,
            "{shape}: {}",
            matched.relative_gap
        );
        let count = |h: usize| {
            let mut g = matched.standard.clone();
            g.mlp_hidden = h;
            g.minigpt_params().abs_diff(matched.confidence_params)
        };
        let h = matched.standard.mlp_hidden;
        assert!(count(h) <= count(h - 1) && count(h) <= count(h + 1));
        assert_eq!(matched.standard_params, matched.standard.minigpt_params());
    }
    let conf = conf_config(ConfHead::Final);
    let matched = conf.matched_standard();
    assert_eq!(
        matched.standard.init_minigpt(&device).num_params(),
        matched.standard_params
    );
    assert_eq!(conf.init(&device).num_params(), matched.confidence_params);
}

#[test]
fn bf16_products_keep_f32_parameters_gradients_and_outputs_near_f32s() {
    let device = Device::flex().autodiff();
    let x = random_ids(2, 16, 11, &device);
    let f32_model = conf_config(ConfHead::Final)
        .init(&device)
        .map(&mut perturb());
    let bf16_model = f32_model.clone().with_precision(Precision::Bf16);
    let run = |model: &ConfidenceAwareGpt| {
        let out = model.forward(
            x.clone(),
            Tensor::zeros([2, 16], &device),
            &AttentionMask::Causal,
        );
        let grads =
            (out.logits.clone().powi_scalar(2).mean() + out.confidence.clone().mean()).backward();
        let grad = model.blocks[0]
            .mlp
            .fc
            .weight
            .grad(&grads)
            .expect("a gradient");
        (out.logits, out.confidence, grad)
    };
    let (f32_logits, f32_conf, f32_grad) = run(&f32_model);
    let (bf16_logits, bf16_conf, bf16_grad) = run(&bf16_model);
    for t in [&bf16_logits, &bf16_grad.clone().unsqueeze::<3>()] {
        assert_eq!(t.dtype(), burn::tensor::DType::F32);
    }
    let gap = |a: Tensor<3>, b: Tensor<3>| (a - b).abs().max().into_scalar::<f32>();
    let logit_gap = gap(bf16_logits, f32_logits);
    // bf16 keeps 8 bits of mantissa: the products differ, by about 2⁻⁸ of their size.
    assert!(
        logit_gap > 1e-5 && logit_gap < 0.05,
        "logits differ by {logit_gap}"
    );
    let conf_gap = gap(bf16_conf.unsqueeze(), f32_conf.unsqueeze());
    assert!(conf_gap < 0.05, "confidence differs by {conf_gap}");
    let scale = f32_grad.clone().abs().max().into_scalar::<f32>();
    let grad_gap = gap(bf16_grad.unsqueeze(), f32_grad.unsqueeze());
    assert!(
        scale > 1e-4 && grad_gap < 0.05 * scale,
        "gradient differs by {grad_gap} of {scale}"
    );
}

#[test]
fn invalid_shapes_are_rejected_naming_the_field() {
    let mut config = tiny(11);
    assert_eq!(config.validate(), Ok(()));
    config.n_heads = 5;
    assert_eq!(
        config.validate().unwrap_err().to_string(),
        "d_model 32 is not divisible by n_heads 5"
    );
    config.n_layers = 0;
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("n_layers")
    );
}

#[test]
fn the_trained_attention_equals_burns_attention_in_values_and_gradients() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;

    let device = Device::flex().autodiff();
    let (b, h, s, dh) = (2, 3, 7, 8);
    let leaf = |seed: f64| {
        Tensor::<4>::random([b, h, s, dh], Distribution::Normal(seed, 1.0), &device).require_grad()
    };
    let (q, k, v) = (leaf(0.1), leaf(-0.2), leaf(0.3));
    // A fixed weighting, so that every output element has its own gradient.
    let weights = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
    let ours = softmax_attention(q.clone(), k.clone(), v.clone(), &AttentionMask::Causal);
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let burns = attention(q.clone(), k.clone(), v.clone(), None, None, options);
    ours.clone()
        .into_data()
        .assert_approx_eq::<f32>(&burns.clone().into_data(), Tolerance::absolute(1e-5));
    let grads_ours = (ours * weights.clone()).sum().backward();
    let grads_burn = (burns * weights).sum().backward();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let a = x.grad(&grads_ours).unwrap();
        let e = x.grad(&grads_burn).unwrap();
        assert!(
            a.clone().abs().sum().into_scalar::<f32>() > 1e-3,
            "{name}: a zero gradient proves nothing"
        );
        a.into_data()
            .assert_approx_eq::<f32>(&e.into_data(), Tolerance::absolute(1e-5));
    }
}

#[test]
fn a_linear_on_flattened_rows_equals_the_batched_linear_in_values_and_gradients() {
    let device = Device::flex().autodiff();
    let linear = burn::nn::LinearConfig::new(6, 5).init(&device);
    let x = Tensor::<3>::random([3, 4, 6], Distribution::Normal(0.0, 1.0), &device);
    let flat = conf_model::layers::rows(&linear, x.clone(), conf_model::Precision::F32);
    let batched = linear.forward(x);
    flat.clone()
        .into_data()
        .assert_approx_eq::<f32>(&batched.clone().into_data(), Tolerance::absolute(1e-6));
    let g_flat = flat.powi_scalar(2).sum().backward();
    let g_batched = batched.powi_scalar(2).sum().backward();
    let grad = |g| linear.weight.grad(g).unwrap().into_data();
    grad(&g_flat).assert_approx_eq::<f32>(&grad(&g_batched), Tolerance::absolute(1e-5));
}
