//! `ConfidenceExperimentConfig`: a preset (`crate::presets`), then a TOML file (`--config`),
//! then flags (`crate::cli::CommonArgs::config`), each layer overriding the one before. Unknown keys and out-of-range values are
//! errors naming the key. The one place the flat configuration becomes the settings of
//! conf-train's types.

use std::path::{Path, PathBuf};

use conf_data::TokenizerKind;
use conf_model::{ConfHead, ConfidenceGptConfig, GptConfig, ModelConfigError, Precision};
use conf_train::optim::OptimizerSettings;
use conf_train::pipeline::{ModelPlan, SampleSettings};
use conf_train::training::{Execution, TrainError, TrainingSettings};
use conf_train::{ConfInput, ConfidenceSettings, ObjectiveKind};
use serde::{Deserialize, Serialize};

/// Every setting of an experiment; TOML keys and flags share these names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfidenceExperimentConfig {
    // Model shape (the confidence model's MLP width is 4 · d_model).
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub seq_len: usize,
    pub dropout: f64,
    // Schedule.
    pub training_steps: usize,
    pub eval_interval: usize,
    pub batch_size: usize,
    pub eval_windows: usize,
    pub learning_rate: f64,
    pub min_learning_rate: f64,
    /// Clamped to `training_steps − 1` when longer than the run.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Maximum global L2 norm of the gradient (PyTorch's `clip_grad_norm_`).
    pub grad_clip: f64,
    pub seeds: Vec<u64>,
    // Data.
    pub dataset: String,
    pub tokenizer: Option<TokenizerKind>,
    pub val_fraction: f64,
    // The confidence model (its lookahead is always two tokens: the loss at t+2 after
    // sampling t+1).
    pub confidence_alpha: f64,
    pub confidence_init_bias: f64,
    pub objective: ObjectiveKind,
    /// The matrix products' precision (`conf_model::Precision`): f32, tf32 or bf16.
    #[serde(default)]
    pub precision: Precision,
    pub conf_input: ConfInput,
    pub conf_head: ConfHead,
    // Output.
    pub results_dir: PathBuf,
    pub save_interval: usize,
    // Execution (changes memory and time, not results).
    /// Recompute memory-bound activations in the backward pass (docs/scaling.md).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

/// The text sampled from each final model: a prompt of this many validation tokens, then this
/// many new ones.
const SAMPLE: SampleSettings = SampleSettings {
    prompt_tokens: 8,
    new_tokens: 64,
};

impl ConfidenceExperimentConfig {
    /// This configuration less the keys that change how it runs but not what it computes
    /// (`gradient_checkpointing`): what a resume or a merged report must match.
    pub fn without_execution(&self) -> Self {
        Self {
            gradient_checkpointing: false,
            ..self.clone()
        }
    }

    /// The preset with the keys of the TOML text `text` (from `path`) laid over it.
    pub fn with_toml(self, text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file_error = |key: &str, message: String| {
            ConfigError::new(key, format!("{}: {message}", path.display()))
        };
        let overrides: toml::Table =
            // The parser's full text: the message with the line and column.
            toml::from_str(text).map_err(|e| file_error("config", e.to_string()))?;
        let mut table = toml::Table::try_from(&self).expect("the config serialises to a table");
        let known: Vec<String> = table.keys().cloned().collect();
        for (key, value) in overrides {
            // `tokenizer` is optional and absent from the table when unset.
            if !known.contains(&key) && key != "tokenizer" {
                return Err(file_error(&key, format!("unknown key '{key}'")));
            }
            table.insert(key.clone(), value);
            // Deserialising after each key pins a type error on the key that caused it.
            table
                .clone()
                .try_into::<Self>()
                .map_err(|e| file_error(&key, format!("{key}: {}", e.message())))?;
        }
        Ok(table.try_into::<Self>().expect("checked key by key"))
    }

    /// Checks every range; the error names the key and the value. The model's shape and the
    /// run's counts are checked by their own types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model(1).gpt.validate().map_err(|e| match e {
            ModelConfigError::Zero { field } => {
                let key = if field == "context_length" {
                    "seq_len"
                } else {
                    field
                };
                ConfigError::new(key, "must be at least 1, got 0".into())
            }
            ModelConfigError::HeadsDoNotDivide { .. } => ConfigError::new("n_heads", e.to_string()),
        })?;
        self.training(0, PathBuf::new(), true, false)
            .validate()
            .map_err(|e| match e {
                TrainError::NotPositive { name } => {
                    ConfigError::new(name, "must be at least 1, got 0".into())
                }
                other => ConfigError::new("config", other.to_string()),
            })?;
        let check = |ok: bool, key: &str, message: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::new(key, message))
            }
        };
        check(
            self.eval_windows >= 1,
            "eval_windows",
            "must be at least 1, got 0".into(),
        )?;
        check(
            (0.0..1.0).contains(&self.dropout),
            "dropout",
            format!("must lie in [0, 1), got {}", self.dropout),
        )?;
        check(
            self.learning_rate > 0.0 && self.learning_rate <= 1.0,
            "learning_rate",
            format!("must lie in (0, 1], got {}", self.learning_rate),
        )?;
        check(
            (0.0..=self.learning_rate).contains(&self.min_learning_rate),
            "min_learning_rate",
            format!(
                "must lie in [0, learning_rate = {}], got {}",
                self.learning_rate, self.min_learning_rate
            ),
        )?;
        check(
            self.grad_clip > 0.0 && self.grad_clip.is_finite(),
            "grad_clip",
            format!("must be a finite number > 0, got {}", self.grad_clip),
        )?;
        check(
            self.weight_decay >= 0.0,
            "weight_decay",
            format!("must be at least 0, got {}", self.weight_decay),
        )?;
        check(
            !self.seeds.is_empty(),
            "seeds",
            "give at least one seed".into(),
        )?;
        if let Some(twice) = (1..self.seeds.len()).find_map(|i| {
            let seed = self.seeds[i];
            self.seeds[..i].contains(&seed).then_some(seed)
        }) {
            return Err(ConfigError::new(
                "seeds",
                format!("seed {twice} is given twice; each seed trains once"),
            ));
        }
        check(
            self.val_fraction > 0.0 && self.val_fraction < 1.0,
            "val_fraction",
            format!("must lie in (0, 1), got {}", self.val_fraction),
        )?;
        check(
            self.confidence_alpha >= 0.0 && self.confidence_alpha.is_finite(),
            "confidence_alpha",
            format!("must be a finite number ≥ 0, got {}", self.confidence_alpha),
        )?;
        check(
            self.confidence_init_bias.is_finite(),
            "confidence_init_bias",
            format!("must be finite, got {}", self.confidence_init_bias),
        )?;
        check(
            self.objective != ObjectiveKind::Standard,
            "objective",
            "the confidence model trains with seed, dense or teacher; standard is the baseline's"
                .into(),
        )
    }

    /// The confidence model (MLP width 4 · d_model) for a vocabulary; the standard model is its
    /// parameter-matched MiniGPT.
    pub fn model(&self, vocab_size: usize) -> ConfidenceGptConfig {
        let gpt = GptConfig::new(
            vocab_size,
            self.seq_len,
            self.d_model,
            self.n_layers,
            self.n_heads,
            4 * self.d_model,
        )
        .with_dropout(self.dropout);
        ConfidenceGptConfig::new(gpt)
            .with_conf_head(self.conf_head)
            .with_confidence_init_bias(self.confidence_init_bias)
    }

    pub fn optimizer(&self) -> OptimizerSettings {
        OptimizerSettings {
            learning_rate: self.learning_rate,
            min_learning_rate: self.min_learning_rate,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
        }
    }

    pub fn confidence(&self) -> ConfidenceSettings {
        ConfidenceSettings {
            alpha: self.confidence_alpha,
            conf_input: self.conf_input,
        }
    }

    /// The schedule of one model's run with `seed`, writing into `artifact_dir`.
    pub fn training(
        &self,
        seed: u64,
        artifact_dir: PathBuf,
        no_tui: bool,
        resume: bool,
    ) -> TrainingSettings {
        TrainingSettings {
            training_steps: self.training_steps,
            eval_interval: self.eval_interval,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            eval_windows: Some(self.eval_windows),
            seed,
            optimizer: self.optimizer(),
            artifact_dir,
            no_tui,
            save_interval: self.save_interval,
            resume,
            execution: Execution {
                gradient_checkpointing: self.gradient_checkpointing,
                devices: Vec::new(),
            },
        }
    }

    /// One model's run: `objective` (`standard` for the baseline) with `seed`.
    pub fn plan(
        &self,
        objective: ObjectiveKind,
        vocab_size: usize,
        training: TrainingSettings,
    ) -> ModelPlan {
        ModelPlan {
            objective,
            model: self.model(vocab_size),
            precision: self.precision,
            confidence: self.confidence(),
            training,
            sample: SAMPLE,
            init_from: None,
        }
    }
}

/// A rejected configuration: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: &str, message: String) -> Self {
        Self {
            key: key.to_string(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> ConfidenceExperimentConfig {
        crate::presets::preset("quick").unwrap()
    }

    fn with(text: &str) -> Result<ConfidenceExperimentConfig, ConfigError> {
        quick().with_toml(text, Path::new("exp.toml"))
    }

    #[test]
    fn a_toml_file_overrides_only_the_keys_it_names() {
        let config = with(
            "training_steps = 7\nseeds = [1, 2]\nobjective = \"teacher\"\nconf_input = \"zeros\"\ntokenizer = \"byte\"\nconf_head = \"probe\"\n",
        )
        .unwrap();
        assert_eq!(config.training_steps, 7);
        assert_eq!(config.seeds, vec![1, 2]);
        assert_eq!(config.objective, ObjectiveKind::Teacher);
        assert_eq!(config.conf_input, ConfInput::Zeros);
        assert_eq!(config.tokenizer, Some(TokenizerKind::Byte));
        assert_eq!(config.conf_head, ConfHead::Probe);
        assert_eq!(config.d_model, quick().d_model);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key_and_the_file() {
        let err = with("traning_steps = 7").unwrap_err();
        assert_eq!(err.key, "traning_steps");
        assert!(err.to_string().contains("exp.toml"), "{err}");
        let err = with("training_steps = \"many\"").unwrap_err().to_string();
        assert!(
            err.contains("exp.toml") && err.contains("training_steps"),
            "{err}"
        );
        let err = with("objective = \"lookahead\"").unwrap_err().to_string();
        assert!(err.contains("lookahead"), "{err}");
        assert!(with("not toml at all [").is_err());
    }

    #[test]
    fn every_out_of_range_value_is_rejected_naming_its_key() {
        type Breaker = fn(&mut ConfidenceExperimentConfig);
        let cases: [(&str, Breaker); 19] = [
            ("d_model", |c| c.d_model = 0),
            ("n_heads", |c| c.n_heads = 5),
            ("seq_len", |c| c.seq_len = 0),
            ("dropout", |c| c.dropout = 1.0),
            ("training_steps", |c| c.training_steps = 0),
            ("eval_interval", |c| c.eval_interval = 0),
            ("batch_size", |c| c.batch_size = 0),
            ("learning_rate", |c| c.learning_rate = 0.0),
            ("min_learning_rate", |c| c.min_learning_rate = 1.0),
            ("eval_windows", |c| c.eval_windows = 0),
            ("weight_decay", |c| c.weight_decay = -0.1),
            ("seeds", |c| c.seeds.clear()),
            ("seeds", |c| c.seeds = vec![1, 2, 1]),
            ("val_fraction", |c| c.val_fraction = 1.0),
            ("confidence_alpha", |c| c.confidence_alpha = -1.0),
            ("save_interval", |c| c.save_interval = 0),
            ("grad_clip", |c| c.grad_clip = 0.0),
            ("confidence_init_bias", |c| {
                c.confidence_init_bias = f64::NAN
            }),
            ("objective", |c| c.objective = ObjectiveKind::Standard),
        ];
        for (key, break_it) in cases {
            let mut config = quick();
            break_it(&mut config);
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
    }
}
