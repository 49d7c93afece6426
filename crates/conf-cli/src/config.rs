//! `ConfidenceExperimentConfig`: a preset, then a TOML file (`--config`), then flags, each
//! layer overriding the one before. Unknown keys and out-of-range values are errors naming the
//! key.

use std::path::{Path, PathBuf};

use conf_data::TokenizerKind;
use conf_model::ConfHead;
use conf_train::{ConfInput, ObjectiveKind};
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
    pub seeds: Vec<u64>,
    // Data.
    pub dataset: String,
    pub tokenizer: Option<TokenizerKind>,
    pub val_fraction: f64,
    // The confidence model.
    pub confidence_alpha: f64,
    pub lookahead_steps: usize,
    pub confidence_init_bias: f64,
    pub objective: ObjectiveKind,
    pub conf_input: ConfInput,
    pub conf_head: ConfHead,
    // Output.
    pub results_dir: PathBuf,
    pub save_interval: usize,
}

pub const PRESETS: &str = "quick, seed, gpu";

impl ConfidenceExperimentConfig {
    /// A named preset (see docs/experiments.md).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let shape = conf_model::presets::model_shape(name);
        let schedule = conf_train::presets::schedule(name);
        let (Some(shape), Some(schedule)) = (shape, schedule) else {
            return Err(ConfigError::new(
                "preset",
                format!("unknown preset '{name}' (expected one of: {PRESETS})"),
            ));
        };
        let objective = if name == "seed" {
            ObjectiveKind::Seed
        } else {
            ObjectiveKind::Dense
        };
        Ok(Self {
            d_model: shape.d_model,
            n_layers: shape.n_layers,
            n_heads: shape.n_heads,
            seq_len: shape.context_length,
            dropout: 0.0,
            training_steps: schedule.training_steps,
            eval_interval: schedule.eval_interval,
            batch_size: schedule.batch_size,
            eval_windows: schedule.eval_windows,
            learning_rate: schedule.optimizer.learning_rate,
            min_learning_rate: schedule.optimizer.min_learning_rate,
            warmup_steps: schedule.optimizer.warmup_steps,
            weight_decay: schedule.optimizer.weight_decay,
            seeds: vec![42, 123, 456],
            dataset: "synthetic".into(),
            tokenizer: None,
            val_fraction: 0.1,
            confidence_alpha: 1.0,
            lookahead_steps: 2,
            confidence_init_bias: 2.0,
            objective,
            conf_input: ConfInput::SelfConditioned,
            conf_head: ConfHead::Seed,
            results_dir: PathBuf::from("results/confidence_experiments"),
            save_interval: 100,
        })
    }

    /// The preset with the keys of the TOML text `text` (from `path`) laid over it.
    pub fn with_toml(self, text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file_error = |key: &str, message: String| {
            ConfigError::new(key, format!("{}: {message}", path.display()))
        };
        let overrides: toml::Table =
            toml::from_str(text).map_err(|e| file_error("config", e.message().to_string()))?;
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

    /// Checks every range; the error names the key and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("seq_len", self.seq_len),
            ("training_steps", self.training_steps),
            ("eval_interval", self.eval_interval),
            ("batch_size", self.batch_size),
            ("eval_windows", self.eval_windows),
            ("save_interval", self.save_interval),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1, got 0".into()));
            }
        }
        let check = |ok: bool, key: &str, message: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::new(key, message))
            }
        };
        check(
            self.d_model.is_multiple_of(self.n_heads),
            "n_heads",
            format!("{} does not divide d_model {}", self.n_heads, self.d_model),
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
            self.weight_decay >= 0.0,
            "weight_decay",
            format!("must be at least 0, got {}", self.weight_decay),
        )?;
        check(
            !self.seeds.is_empty(),
            "seeds",
            "give at least one seed".into(),
        )?;
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
            self.lookahead_steps == 2,
            "lookahead_steps",
            format!(
                "only 2 is supported (the loss at t+2 after sampling t+1), got {}",
                self.lookahead_steps
            ),
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
}

impl ConfidenceExperimentConfig {
    /// Preset, then `--config`, then flags; validated.
    pub fn from_args(args: &crate::cli::RunArgs) -> Result<Self, ConfigError> {
        let mut config = Self::preset(&args.preset)?;
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("config", format!("{}: cannot read: {e}", path.display()))
            })?;
            config = config.with_toml(&text, path)?;
        }
        let c = &mut config;
        let corpus = &args.corpus;
        set(&mut c.dataset, corpus.dataset.clone());
        if corpus.tokenizer.is_some() {
            c.tokenizer = corpus.tokenizer;
        }
        set(&mut c.training_steps, args.training_steps);
        set(&mut c.seeds, args.seeds.clone());
        set(&mut c.batch_size, args.batch_size);
        set(&mut c.seq_len, args.seq_len);
        set(&mut c.eval_interval, args.eval_interval);
        set(&mut c.results_dir, args.results_dir.clone());
        set(&mut c.save_interval, args.save_interval);
        set(&mut c.confidence_alpha, args.confidence_alpha);
        set(&mut c.conf_head, args.conf_head);
        set(&mut c.conf_input, args.conf_input);
        set(&mut c.confidence_init_bias, args.confidence_init_bias);
        config.validate()?;
        Ok(config)
    }
}

fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *field = value;
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
    fn new(key: &str, message: String) -> Self {
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
        ConfidenceExperimentConfig::preset("quick").unwrap()
    }

    fn with(text: &str) -> Result<ConfidenceExperimentConfig, ConfigError> {
        quick().with_toml(text, Path::new("exp.toml"))
    }

    #[test]
    fn presets_are_valid_and_keep_the_seed_plans_numbers() {
        for name in ["quick", "seed", "gpu"] {
            ConfidenceExperimentConfig::preset(name)
                .unwrap()
                .validate()
                .unwrap();
        }
        let seed = ConfidenceExperimentConfig::preset("seed").unwrap();
        assert_eq!((seed.training_steps, seed.batch_size), (1000, 4));
        assert_eq!(seed.seeds, vec![42, 123, 456]);
        assert_eq!(seed.objective, ObjectiveKind::Seed);
        assert_eq!(quick().confidence_alpha, 1.0);
        assert_eq!(quick().lookahead_steps, 2);
        assert_eq!(quick().confidence_init_bias, 2.0);
        assert_eq!(quick().save_interval, 100);
        assert_eq!(
            quick().results_dir,
            PathBuf::from("results/confidence_experiments")
        );
        let err = ConfidenceExperimentConfig::preset("huge").unwrap_err();
        assert_eq!(err.key, "preset");
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
        let cases: [(&str, Breaker); 16] = [
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
            ("val_fraction", |c| c.val_fraction = 1.0),
            ("confidence_alpha", |c| c.confidence_alpha = -1.0),
            ("lookahead_steps", |c| c.lookahead_steps = 3),
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
