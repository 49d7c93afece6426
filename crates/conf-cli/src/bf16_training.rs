//! Whether bf16 training reaches f32's eval loss on a device: MiniGPT trained on the synthetic
//! source with its products in f32 and in bf16, from the same initialisation and batches, and
//! evaluated on the same held-out windows. Seeds move this eval loss by a few hundredths, so
//! bf16's rounding must stay inside [`TOLERANCE`]; that f32 learns the source at all (near its
//! entropy floor) guards the comparison. `lookahead check-backend --precision bf16` runs it on
//! a machine's backend; `tests/backend_equivalence.rs` on the CPU backends.

use anyhow::Context;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use conf_data::{CorpusRequest, EvalWindows, Split, TrainWindows, WindowBatcher, load_corpus};
use conf_model::{AttentionMask, GptConfig, MiniGpt, Precision};

use crate::equivalence::Check;

/// The largest gap between bf16's and f32's eval loss (nats) that passes.
pub const TOLERANCE: f64 = 0.03;
/// How far above the source's entropy floor f32's eval loss may end (nats).
pub const FLOOR_GAP: f64 = 0.3;
const STEPS: usize = 300;
const BATCH: usize = 32;
const SEQ: usize = 32;
const SEED: u64 = 7;

/// MiniGPT's eval loss after training on `device` in `precision`, and the source's entropy
/// floor on the same windows.
fn synthetic_eval_loss(device: &Device, precision: Precision) -> anyhow::Result<(f64, f64)> {
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir()))?;
    let oracle = corpus
        .oracle
        .clone()
        .context("the synthetic source has an oracle")?;
    let split = Split::contiguous(&corpus, 0.1, SEQ)?;
    let train = TrainWindows::new(corpus.tokens.clone(), split.train, SEQ, SEED, STEPS * BATCH);
    let eval = EvalWindows::new(corpus.tokens.clone(), split.val, SEQ, Some(128));

    let train_device = device.clone().autodiff();
    train_device.seed(SEED);
    let vocab = corpus.vocab_size();
    let mut model = GptConfig::new(vocab, SEQ, 64, 2, 4, 256)
        .init_minigpt(&train_device)
        .with_precision(precision);
    let mut optim = AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let ce = CrossEntropyLossConfig::new().init(device);
    let lm_loss = |model: &MiniGpt, tokens: Tensor<2, Int>| {
        let [b, _] = tokens.dims();
        let inputs = tokens.clone().slice([0..b, 0..SEQ]);
        let targets = tokens.slice([0..b, 1..SEQ + 1]);
        let logits = model.forward(inputs, &AttentionMask::Causal);
        ce.forward(logits.reshape([b * SEQ, vocab]), targets.reshape([b * SEQ]))
    };
    let missing = |i| format!("window {i} of the synthetic source");
    for step in 0..STEPS {
        let items = (step * BATCH..(step + 1) * BATCH)
            .map(|i| train.get(i).with_context(|| missing(i)))
            .collect::<anyhow::Result<_>>()?;
        let tokens = WindowBatcher.batch(items, &train_device).tokens;
        let grads = GradientsParams::from_grads(lm_loss(&model, tokens).backward(), &model);
        let lr = 3e-3 * ((step + 1) as f64 / 30.0).min(1.0);
        model = optim.step(lr, model, grads);
    }

    let floor = oracle.entropy_floor(&eval);
    let items = (0..eval.len())
        .map(|i| eval.get(i).with_context(|| missing(i)))
        .collect::<anyhow::Result<_>>()?;
    let tokens = WindowBatcher.batch(items, device).tokens;
    Ok((lm_loss(&model.valid(), tokens).into_scalar::<f64>(), floor))
}

/// The two comparisons: f32 learns the source (the guard), bf16 ends within [`TOLERANCE`] of
/// f32's eval loss.
pub fn check(device: &Device) -> anyhow::Result<Vec<Check>> {
    let (f32_loss, floor) = synthetic_eval_loss(device, Precision::F32)?;
    let (bf16_loss, _) = synthetic_eval_loss(device, Precision::Bf16)?;
    let run = format!("{STEPS} steps on the synthetic source");
    // Above the floor by at most FLOOR_GAP; below it by more than rounding is impossible.
    let learned = if f32_loss >= floor - 0.05 {
        (f32_loss - floor) / FLOOR_GAP
    } else {
        f64::INFINITY
    };
    Ok(vec![
        Check {
            what: "f32 training learns the synthetic source".into(),
            worst: learned,
            detail: format!("eval loss {f32_loss:.4}, entropy floor {floor:.4}, {run}"),
        },
        Check {
            what: "bf16 training reaches f32's eval loss".into(),
            // A NaN loss fails: it passes no comparison.
            worst: (bf16_loss - f32_loss).abs() / TOLERANCE,
            detail: format!("bf16 {bf16_loss:.4}, f32 {f32_loss:.4}, {run}"),
        },
    ])
}
