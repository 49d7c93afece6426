//! The command-line contract (DESIGN §10): command and flag names here are relied on by
//! scripts and docs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use conf_data::TokenizerKind;
use conf_model::ConfHead;
use conf_train::{ConfInput, ObjectiveKind};

use crate::backend::BackendChoice;
use crate::config::{ConfidenceExperimentConfig, ConfigError};

#[derive(Debug, Parser)]
#[command(
    name = "lookahead",
    version,
    about = "Train a standard GPT and a confidence-aware GPT side by side and measure whether predicting its own future loss helps a model learn.",
    after_help = "Exit codes: 0 ok, 1 run failed, 2 bad usage or input."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prepare a corpus and describe it: tokens, vocabulary, split sizes, windows and, for the
    /// synthetic corpus, its entropy floor.
    Data(DataArgs),
    /// Build both architectures of a preset and print them with their parameter counts.
    Model(ModelArgs),
    /// Train one model with one seed through burn-train's Learner and save its history.
    Train(TrainArgs),
    /// Both models for every seed, then `{results_dir}/{timestamp}_results.json`.
    Experiment(CommonArgs),
    /// Plots and an HTML/Markdown report next to the first results file; several files from
    /// separate seed runs of one configuration merge into one report.
    Report { files: Vec<PathBuf> },
    /// Work with results files.
    #[command(subcommand)]
    Results(ResultsCommand),
    /// Time each objective's training step (ms/step, tokens/s, TFLOP/s, memory) on a backend.
    Bench(BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum ResultsCommand {
    /// Validate a results file and print its summary.
    Load { file: PathBuf },
}

/// Where the corpus comes from and how it is tokenized.
#[derive(Debug, Clone, Args)]
pub struct CorpusArgs {
    /// `synthetic` (built in, default), `tinyshakespeare`, `tinystories`, or a path: a .txt file, a
    /// directory of .txt files, a .jsonl file with a "text" field, or a token .bin with its
    /// .json meta.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Tokenizer: char, byte or gpt2 (default: char, or the one recorded for a .bin).
    #[arg(long, value_parser = parse_tokenizer)]
    pub tokenizer: Option<TokenizerKind>,
    /// A directory holding local copies of the named corpora (tinyshakespeare.txt, ...).
    #[arg(long, env = "LOOKAHEAD_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Where downloads and token caches are kept.
    #[arg(long, env = "LOOKAHEAD_CACHE")]
    pub cache_dir: Option<PathBuf>,
}

fn parse_tokenizer(s: &str) -> Result<TokenizerKind, String> {
    s.parse().map_err(|e: conf_data::DataError| e.to_string())
}

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Context length L; windows hold L + 2 tokens.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Fraction of the corpus, taken from its end, used for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model preset: quick, plan or gpu.
    #[arg(long, default_value = "quick")]
    pub preset: String,
    /// Confidence head: final (reads the final state; trains the trunk) or probe (reads the
    /// last blocks, detached).
    #[arg(long, default_value = "final")]
    pub conf_head: ConfHead,
    /// Confidence head bias at initialisation (nats).
    #[arg(long, default_value_t = 2.0)]
    pub confidence_init_bias: f64,
    /// Vocabulary size; defaults to that of --dataset.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags common to the training commands. Each overrides the same key of `--config`, which
/// overrides the preset (docs/experiments.md lists every key).
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML file with any of the experiment's keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Preset: quick, plan or gpu.
    #[arg(long, default_value = "quick")]
    pub preset: String,
    /// Backend (docs/backends.md); a build holds those of its Cargo features.
    #[arg(long, value_enum, default_value_t = BackendChoice::default_compiled())]
    pub backend: BackendChoice,
    /// GPU index for wgpu (the N-th discrete GPU), tch-cuda and cuda; default: the first.
    #[arg(long)]
    pub device: Option<usize>,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    #[arg(long)]
    pub training_steps: Option<usize>,
    /// Comma-separated seeds; `train` uses the first.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub eval_interval: Option<usize>,
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
    /// Plain log lines instead of the dashboard.
    #[arg(long)]
    pub no_tui: bool,
    /// Optimizer steps between checkpoints (one is also written at the end).
    #[arg(long)]
    pub save_interval: Option<usize>,
    /// Continue from the run's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub confidence_alpha: Option<f64>,
    #[arg(long)]
    pub conf_head: Option<ConfHead>,
    /// Confidence history: self (previous predictions) or zeros.
    #[arg(long)]
    pub conf_input: Option<ConfInput>,
    #[arg(long)]
    pub confidence_init_bias: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelKind {
    Standard,
    Confidence,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Confidence => "confidence",
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[arg(long, value_enum)]
    pub model: ModelKind,
    /// standard (for --model standard), or seed, dense (default) or teacher.
    #[arg(long)]
    pub objective: Option<ObjectiveKind>,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl ModelKind {
    /// The model an objective trains.
    pub fn of(objective: ObjectiveKind) -> Self {
        match objective {
            ObjectiveKind::Standard => Self::Standard,
            ObjectiveKind::Seed | ObjectiveKind::Dense | ObjectiveKind::Teacher => Self::Confidence,
        }
    }
}

impl CommonArgs {
    /// The preset, then `--config`, then these flags; validated.
    pub fn config(&self) -> Result<ConfidenceExperimentConfig, ConfigError> {
        let mut config = crate::presets::preset(&self.preset)?;
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("config", format!("{}: cannot read: {e}", path.display()))
            })?;
            config = config.with_toml(&text, path)?;
        }
        let c = &mut config;
        let corpus = &self.corpus;
        set(&mut c.dataset, corpus.dataset.clone());
        if corpus.tokenizer.is_some() {
            c.tokenizer = corpus.tokenizer;
        }
        set(&mut c.training_steps, self.training_steps);
        set(&mut c.seeds, self.seeds.clone());
        set(&mut c.batch_size, self.batch_size);
        set(&mut c.seq_len, self.seq_len);
        set(&mut c.eval_interval, self.eval_interval);
        set(&mut c.results_dir, self.results_dir.clone());
        set(&mut c.save_interval, self.save_interval);
        set(&mut c.confidence_alpha, self.confidence_alpha);
        set(&mut c.conf_head, self.conf_head);
        set(&mut c.conf_input, self.conf_input);
        set(&mut c.confidence_init_bias, self.confidence_init_bias);
        config.validate()?;
        Ok(config)
    }
}

fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *field = value;
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Objectives to time; `standard` trains MiniGPT, the others ConfidenceAwareGPT.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "standard,seed,dense,teacher"
    )]
    pub objectives: Vec<ObjectiveKind>,
    /// Steps run before timing (compilation, autotuning, allocator growth).
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    /// Steps timed.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}
