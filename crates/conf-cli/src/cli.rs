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
    /// Both models for every seed, then `{results_dir}/{id}_results.json` and its report.
    Experiment(ExperimentArgs),
    /// Plots and an HTML/Markdown report next to the first results file; several files from
    /// separate seed runs of one configuration merge into one report.
    Report { files: Vec<PathBuf> },
    /// Work with results files.
    #[command(subcommand)]
    Results(ResultsCommand),
    /// Time each objective's training step (ms/step, tokens/s, TFLOP/s, memory) on a backend.
    Bench(BenchArgs),
    /// Check that a backend computes what flex computes: the same weights and batch give the
    /// same outputs, losses and gradients, and one optimizer step the same parameters.
    CheckBackend(CheckBackendArgs),
    /// Write a trained model's weights with PyTorch's names and layouts.
    Export(ExportArgs),
    /// Generate text from a trained model, token by token (with the confidence model's
    /// predicted future loss for each).
    Sample(SampleArgs),
}

#[derive(Debug, Args)]
pub struct CheckBackendArgs {
    #[command(flatten)]
    pub target: DeviceArgs,
    /// Every comparison as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also train MiniGPT on the synthetic source in f32 and in bf16 on the backend, and check
    /// that bf16 reaches f32's eval loss (seconds on a GPU).
    #[arg(long)]
    pub bf16_training: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run directory (its latest checkpoint), its checkpoints/ directory or one checkpoint
    /// set (checkpoints/step-…).
    pub source: PathBuf,
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: ExportFormat,
    /// Where to write [default: model.safetensors in the run directory].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// SafeTensors, loadable by PyTorch (`safetensors.torch.load_file`) and Burn.
    Safetensors,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A run directory, a checkpoint, or a .safetensors export.
    pub source: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 200, value_parser = parse_count)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 takes the most likely token every time.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// One JSON object per token on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: DeviceArgs,
}

/// Where the computation runs.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Backend (docs/backends.md); a build holds those of its Cargo features.
    #[arg(long, value_enum, default_value_t = BackendChoice::default_compiled())]
    pub backend: BackendChoice,
    /// GPU index for wgpu (the N-th discrete GPU), tch-cuda and cuda; default: the first.
    #[arg(long)]
    pub device: Option<usize>,
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
    #[arg(long, default_value_t = 128, value_parser = parse_count, allow_hyphen_values = true)]
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
/// overrides the preset; unset, the preset's value holds (docs/experiments.md lists every key
/// and each preset's values).
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML file with any of the experiment's keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Preset, a whole configuration: quick (minutes on a CPU), plan (the original plan's run)
    /// or gpu.
    #[arg(long, default_value = "quick")]
    pub preset: String,
    #[command(flatten)]
    pub target: DeviceArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Optimizer steps per model [preset: quick 400, plan 1000, gpu 5000].
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    pub training_steps: Option<usize>,
    /// Comma-separated seeds, each trained for both models; `train` uses the first
    /// [preset: 42,123,456].
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// Windows per optimizer step [preset: quick 16, plan 4, gpu 32].
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    pub batch_size: Option<usize>,
    /// Context length L; windows hold L + 2 tokens [preset: quick 64, plan 128, gpu 512].
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    pub seq_len: Option<usize>,
    /// Optimizer steps between evaluations [preset: quick 50, plan 100, gpu 250].
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    pub eval_interval: Option<usize>,
    /// Where runs, results files and reports go [default: results/confidence_experiments].
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
    /// Weight of the confidence loss: total = lm + alpha · conf [default: 1.0].
    #[arg(long, allow_hyphen_values = true)]
    pub confidence_alpha: Option<f64>,
    /// Confidence head: final (on the final state; trains the trunk too) or probe (on the last
    /// blocks, detached) [default: final].
    #[arg(long)]
    pub conf_head: Option<ConfHead>,
    /// Confidence history: self (previous predictions) or zeros [default: self].
    #[arg(long)]
    pub conf_input: Option<ConfInput>,
    /// The confidence head's initial bias: its first predictions, in nats [default: 2.0].
    #[arg(long, allow_hyphen_values = true)]
    pub confidence_init_bias: Option<f64>,
    /// Recompute memory-bound activations in the backward pass instead of keeping them: less
    /// memory, more time; the same results.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// The matrix products' precision: f32, tf32 (GPU f32 products on TF32 tensor cores;
    /// tch-cuda) or bf16 (the Linears' and the LM head's products on bf16 operands; parameters,
    /// optimizer state, attention, normalisation and losses stay f32) [default: f32].
    #[arg(long)]
    pub precision: Option<conf_model::Precision>,
    /// The device's dense peak in TFLOP/s for the run's precision, for the model FLOP
    /// utilisation (MFU) [default: the datasheet figure of a known NVIDIA GPU on the GPU
    /// backends, else none].
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
}

/// Flags of the commands that train through the Learner (`train`, `experiment`).
#[derive(Debug, Clone, Args)]
pub struct RunFlags {
    /// Plain lines (one per evaluation, progress between) instead of the dashboard; the
    /// default when stdout is not a terminal.
    #[arg(long)]
    pub no_tui: bool,
    /// Optimizer steps between checkpoints; one is also written at the end and where a run
    /// is stopped [default: 100].
    #[arg(long, value_parser = parse_count, allow_hyphen_values = true)]
    pub save_interval: Option<usize>,
    /// Continue: `train` from the run's latest checkpoint, `experiment` the latest incomplete
    /// experiment with the same configuration (give the flags it was started with).
    #[arg(long)]
    pub resume: bool,
    /// Data parallel: split every step's batch evenly across these GPU indices (one worker
    /// each, gradients summed on the first); on a CPU backend the workers share the one CPU
    /// (docs/scaling.md).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub devices: Option<Vec<usize>>,
}

/// A count flag: a whole number of at least 1, with the flag's name in the error.
fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got '{s}'")),
    }
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

    /// The model an objective trains.
    pub fn of(objective: ObjectiveKind) -> Self {
        match objective {
            ObjectiveKind::Standard => Self::Standard,
            ObjectiveKind::Seed | ObjectiveKind::Dense | ObjectiveKind::Teacher => Self::Confidence,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// standard (MiniGPT) or confidence (ConfidenceAwareGPT).
    #[arg(long, value_enum)]
    pub model: ModelKind,
    /// standard (for --model standard), or seed, dense or teacher [default: the
    /// configuration's objective, dense for quick and gpu, seed for plan].
    #[arg(long)]
    pub objective: Option<ObjectiveKind>,
    /// Start from the weights of an export (`lookahead export`) instead of the seed's
    /// initialisation; the export must be of the same model and tokenizer.
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub run: RunFlags,
}

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// The confidence model's objective: seed, dense or teacher [default: the configuration's,
    /// dense for quick and gpu, seed for plan]; the standard model always trains with standard.
    #[arg(long)]
    pub objective: Option<ObjectiveKind>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub run: RunFlags,
}

impl CommonArgs {
    /// `--peak-tflops`, else the peak for `precision` of the GPU the backend runs on when it
    /// is known.
    pub fn peak_tflops(&self, precision: conf_model::Precision) -> Option<f64> {
        use crate::backend::BackendChoice;
        let gpu = matches!(
            self.target.backend,
            BackendChoice::TchCuda | BackendChoice::Cuda | BackendChoice::Wgpu
        );
        self.peak_tflops.or_else(|| {
            let name = gpu.then(|| crate::peak::gpu_name(self.target.device.unwrap_or(0)))??;
            crate::peak::dense_peak_tflops(&name, precision)
        })
    }

    /// The preset, then `--config`, then these flags (with the run's flags and objective where
    /// the command has them); validated.
    pub fn config(
        &self,
        run: Option<&RunFlags>,
        objective: Option<ObjectiveKind>,
    ) -> Result<ConfidenceExperimentConfig, ConfigError> {
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
        set(&mut c.confidence_alpha, self.confidence_alpha);
        set(&mut c.conf_head, self.conf_head);
        set(&mut c.conf_input, self.conf_input);
        set(&mut c.confidence_init_bias, self.confidence_init_bias);
        set(&mut c.save_interval, run.and_then(|r| r.save_interval));
        set(&mut c.objective, objective);
        set(&mut c.precision, self.precision);
        if self.gradient_checkpointing {
            c.gradient_checkpointing = true;
        }
        config.validate()?;
        let tf32_switch = std::env::var(crate::backend::TF32_SWITCH).ok();
        crate::backend::check_precision(
            self.target.backend,
            config.precision,
            tf32_switch.as_deref(),
        )
        .map_err(|message| ConfigError::new("precision", message))?;
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
    /// Steps timed per objective.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Timed steps an objective runs before the next objective takes its turn; the objectives
    /// take turns until each has run --steps, so that a busy spell of the host slows them alike.
    #[arg(long, default_value_t = 5)]
    pub turn_steps: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// After the timed steps, run --profile-steps more of each objective under libtorch's
    /// profiler (tch backends) and write each one's Chrome trace (OBJECTIVE.trace.json) to this
    /// folder; a summary goes to the table and the JSON. On cuda, CubeCL times its kernels
    /// instead: CUBECL_DEBUG_OPTION=profile CUBECL_DEBUG_LOG=FILE.
    #[arg(long, value_name = "DIR")]
    pub profile: Option<PathBuf>,
    /// Steps each objective runs under the profiler.
    #[arg(long, default_value_t = 2)]
    pub profile_steps: usize,
    /// Data parallel as in training: each step's batch split across these devices (on a CPU
    /// backend, workers sharing the CPU).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub devices: Option<Vec<usize>>,
    #[command(flatten)]
    pub common: CommonArgs,
}
