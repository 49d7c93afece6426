//! The PyTorch reference of the benchmark (`bench/reference.py`) computes what the Rust models
//! compute: it loads their `lookahead export` files (perturbed weights) and, on the same batch
//! (windows and sampling noise), gives the same logits (within 1e-4) and the same losses for
//! all four objectives (within 1e-4 relative).
//!
//! It needs Python with PyTorch: `LOOKAHEAD_PYTHON`, else the venv of `cargo xtask setup
//! --backend tch-cpu` (`$LOOKAHEAD_VENV`, else `.venv`). Without one the test says so and
//! passes, unless `LOOKAHEAD_REQUIRE_TORCH` is set (CI sets it).

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::prelude::*;
use conf_data::TokenizerSpec;
use conf_model::init::Perturb;
use conf_model::{AttentionMask, ConfidenceGptConfig, GptConfig};
use conf_train::weights::{AnyModel, Architecture, ModelCard, TrainedModel, export_safetensors};
use conf_train::{
    ConfInput, ConfidenceSettings, DenseObjective, LookaheadBatcher, Objective, ObjectiveKind,
    ObjectiveOutput, SeedObjective, StandardObjective, TeacherObjective,
};
use serde_json::{Value, json};

const VOCAB: usize = 29;
const SEQ: usize = 16;
const BATCH: usize = 3;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python that imports torch, if there is one.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("LOOKAHEAD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv"));
    let candidates = [
        std::env::var_os("LOOKAHEAD_PYTHON").map(PathBuf::from),
        Some(venv.join("bin/python")),
    ];
    candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Writes `model` as `lookahead export` does.
fn export(model: AnyModel, architecture: Architecture, path: &Path) {
    let vocabulary = ('!'..).take(VOCAB).collect();
    let trained = TrainedModel {
        card: ModelCard {
            architecture,
            objective: ObjectiveKind::Dense,
            conf_input: ConfInput::SelfConditioned,
            tokenizer: TokenizerSpec::Char { vocabulary },
        },
        model,
        step: None,
        source: path.to_path_buf(),
        run_dir: None,
    };
    export_safetensors(&trained, path).unwrap();
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

fn losses(out: ObjectiveOutput) -> Value {
    let scalar = |t: Tensor<1>| t.into_scalar::<f32>();
    let mut map = json!({ "total": scalar(out.total), "lm_loss": scalar(out.lm_loss) });
    if let Some(conf) = out.conf_loss {
        map["conf_loss"] = json!(scalar(conf));
    }
    map
}

#[test]
fn the_pytorch_reference_computes_the_rust_models_losses() {
    let Some(python) = python() else {
        assert!(
            std::env::var_os("LOOKAHEAD_REQUIRE_TORCH").is_none(),
            "LOOKAHEAD_REQUIRE_TORCH is set but no Python with torch was found"
        );
        eprintln!("skipped: no Python with PyTorch (cargo xtask setup --backend tch-cpu)");
        return;
    };
    let device = Device::flex();
    device.seed(5);
    let gpt = GptConfig::new(VOCAB, SEQ, 32, 2, 4, 128);
    let config = ConfidenceGptConfig::new(gpt.clone());
    // Perturbed, so that the zero-initialised modulation takes part.
    let model = config.init(&device).map(&mut Perturb { std: 0.05 });
    let matched = config.matched_standard().standard;
    let standard = matched
        .init_minigpt(&device)
        .map(&mut Perturb { std: 0.05 });

    let flex = Device::flex();
    let ids = Tensor::<2>::random(
        [BATCH, SEQ + 2],
        burn::tensor::Distribution::Uniform(0.0, VOCAB as f64),
        &flex,
    )
    .int()
    .into_data()
    .try_into_vec_as::<i64>()
    .unwrap();
    let windows: Vec<conf_data::Window> = ids
        .chunks(SEQ + 2)
        .enumerate()
        .map(|(index, w)| conf_data::Window {
            index,
            tokens: w.iter().map(|&t| t as u32).collect(),
        })
        .collect();
    let batch = LookaheadBatcher { seed: 9 }.batch(windows, &device);
    let settings = ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    };
    let expected = json!({
        "standard": losses(StandardObjective.compute(&standard, batch.clone())),
        "seed": losses(SeedObjective(settings).compute(&model, batch.clone())),
        "dense": losses(DenseObjective(settings).compute(&model, batch.clone())),
        "teacher": losses(TeacherObjective(settings).compute(&model, batch.clone())),
    });
    let rows = |t: Tensor<2>| {
        let v = t.into_data().try_into_vec_as::<f32>().unwrap();
        v.chunks(SEQ).map(<[f32]>::to_vec).collect::<Vec<_>>()
    };
    let x = batch.tokens.clone().slice([0..BATCH, 0..SEQ]);
    let logits = json!({
        "standard": values(standard.forward(x.clone(), &AttentionMask::Causal)),
        "confidence": values(model.forward(x, Tensor::zeros([BATCH, SEQ], &device), &AttentionMask::Causal).logits),
    });
    let dir = tempfile::tempdir().unwrap();
    let standard_export = dir.path().join("standard.safetensors");
    let confidence_export = dir.path().join("confidence.safetensors");
    export(
        AnyModel::Standard(standard),
        Architecture::Standard(matched),
        &standard_export,
    );
    export(
        AnyModel::Confidence(model),
        Architecture::Confidence(config),
        &confidence_export,
    );
    let token_rows: Vec<Vec<i64>> = ids.chunks(SEQ + 2).map(<[i64]>::to_vec).collect();
    let dump = json!({
        "standard_export": standard_export,
        "export": confidence_export,
        "alpha": 1.0,
        "tokens": token_rows,
        "uniforms": rows(batch.uniforms),
        "logits": logits,
        "expected": expected,
    });
    let path = dir.path().join("dump.json");
    std::fs::write(&path, serde_json::to_vec(&dump).unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(workspace().join("bench/reference.py"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(out.status.success(), "{report}");
    assert_eq!(report.matches(" ok").count(), 13, "{report}");
}
