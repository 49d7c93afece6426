//! The named presets, each a whole experiment configuration (docs/experiments.md lists them).

use std::path::PathBuf;

use conf_model::{ConfHead, Precision};
use conf_train::{ConfInput, ObjectiveKind};

use crate::config::{ConfidenceExperimentConfig, ConfigError};

pub const PRESET_NAMES: &str = "quick, plan, gpu";

/// The configuration a preset names.
pub fn preset(name: &str) -> Result<ConfidenceExperimentConfig, ConfigError> {
    match name {
        "quick" => Ok(quick()),
        "plan" => Ok(plan()),
        "gpu" => Ok(gpu()),
        "seed" => Err(ConfigError::new(
            "preset",
            "the preset 'seed' is now called 'plan' (the original plan's run)".into(),
        )),
        other => Err(ConfigError::new(
            "preset",
            format!("unknown preset '{other}' (expected one of: {PRESET_NAMES})"),
        )),
    }
}

/// The default: small enough that 2 models × 3 seeds train in about 3.5 minutes on 2 CPU cores
/// (measured, flex).
fn quick() -> ConfidenceExperimentConfig {
    ConfidenceExperimentConfig {
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        seq_len: 64,
        dropout: 0.0,
        training_steps: 400,
        eval_interval: 50,
        batch_size: 16,
        eval_windows: 32,
        learning_rate: 3e-3,
        min_learning_rate: 3e-3 / 10.0,
        warmup_steps: 40,
        weight_decay: 0.1,
        grad_clip: 1.0,
        seeds: vec![42, 123, 456],
        dataset: "synthetic".into(),
        tokenizer: None,
        val_fraction: 0.1,
        confidence_alpha: 1.0,
        confidence_init_bias: 2.0,
        objective: ObjectiveKind::Dense,
        conf_input: ConfInput::SelfConditioned,
        conf_head: ConfHead::Final,
        precision: Precision::F32,
        results_dir: PathBuf::from("results/confidence_experiments"),
        save_interval: 100,
        gradient_checkpointing: false,
    }
}

/// The original plan's run: 1000 steps of batch 4 with the `seed` objective (the plan's
/// two-pass step exactly), on the benchmark shape of DESIGN §9.
fn plan() -> ConfidenceExperimentConfig {
    ConfidenceExperimentConfig {
        d_model: 128,
        n_layers: 4,
        n_heads: 4,
        seq_len: 128,
        training_steps: 1000,
        eval_interval: 100,
        batch_size: 4,
        eval_windows: 64,
        learning_rate: 1e-3,
        min_learning_rate: 1e-3 / 10.0,
        warmup_steps: 100,
        objective: ObjectiveKind::Seed,
        ..quick()
    }
}

/// GPT-2-small-like, for a real GPU.
fn gpu() -> ConfidenceExperimentConfig {
    ConfidenceExperimentConfig {
        d_model: 768,
        n_layers: 12,
        n_heads: 12,
        seq_len: 512,
        training_steps: 5000,
        eval_interval: 250,
        batch_size: 32,
        eval_windows: 128,
        learning_rate: 6e-4,
        min_learning_rate: 6e-4 / 10.0,
        warmup_steps: 200,
        ..quick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_keep_the_original_plans_numbers() {
        for name in ["quick", "plan", "gpu"] {
            preset(name).unwrap().validate().unwrap();
        }
        let plan = preset("plan").unwrap();
        assert_eq!((plan.training_steps, plan.batch_size), (1000, 4));
        assert_eq!(plan.seeds, vec![42, 123, 456]);
        assert_eq!(plan.objective, ObjectiveKind::Seed);
        let quick = preset("quick").unwrap();
        assert_eq!(quick.confidence_alpha, 1.0);
        assert_eq!(quick.confidence_init_bias, 2.0);
        assert_eq!(quick.grad_clip, 1.0);
        assert_eq!(quick.save_interval, 100);
        assert_eq!(
            quick.results_dir,
            PathBuf::from("results/confidence_experiments")
        );
        assert_eq!(preset("huge").unwrap_err().key, "preset");
        let renamed = preset("seed").unwrap_err();
        assert!(renamed.message.contains("'plan'"), "{renamed}");
    }
}
