//! One module per subcommand: parse what it needs, call the library crates, report.

pub mod bench;
pub mod check_backend;
pub mod data;
pub mod experiment;
pub mod export;
pub mod model;
pub mod report;
pub mod results;
pub mod sample;
pub mod train;

use anyhow::Context;
use conf_data::{Corpus, CorpusRequest, DataError, Split, load_corpus};

use conf_train::ObjectiveKind;
use conf_train::stop::{StopReason, StopRequest};
use conf_train::training::TrainError;

use crate::Failure;
use crate::cli::{CommonArgs, CorpusArgs, DeviceArgs, RunFlags};
use crate::config::ConfidenceExperimentConfig;

/// Loads the corpus the flags name; bad input exits with code 2, a failed download with 1.
pub fn load(args: &CorpusArgs) -> Result<Corpus, Failure> {
    let request = CorpusRequest {
        dataset: args.dataset.clone().unwrap_or_else(|| "synthetic".into()),
        tokenizer: args.tokenizer,
        data_dir: args.data_dir.clone(),
        cache_dir: args
            .cache_dir
            .clone()
            .unwrap_or_else(conf_data::default_cache_dir),
        synthetic: Default::default(),
    };
    load_corpus(&request).map_err(|e| match e {
        DataError::Download { .. } => Failure::Run(e.into()),
        _ => Failure::BadInput(e.into()),
    })
}

/// The corpus and split of a run: `--dataset` and `--tokenizer` as the configuration resolved
/// them, the other corpus flags as given.
pub fn load_corpus_and_split(
    config: &ConfidenceExperimentConfig,
    corpus: &CorpusArgs,
) -> Result<(Corpus, Split), Failure> {
    let corpus = load(&CorpusArgs {
        dataset: Some(config.dataset.clone()),
        tokenizer: config.tokenizer,
        ..corpus.clone()
    })?;
    let split = Split::contiguous(&corpus, config.val_fraction, config.seq_len)
        .map_err(|e| Failure::BadInput(e.into()))?;
    warn_if_the_vocabulary_dominates(config, corpus.vocab_size());
    Ok((corpus, split))
}

/// A large vocabulary on a small model (GPT-2's 50,257 tokens at the quick preset) makes the
/// embedding and the tied output layer most of the model and of every step's cost: say so
/// before a run that is then many times slower than the same preset with characters.
fn warn_if_the_vocabulary_dominates(config: &ConfidenceExperimentConfig, vocab_size: usize) {
    let model = config.model(vocab_size);
    let share = (vocab_size * config.d_model) as f64 / model.params() as f64;
    if share > 0.5 {
        tracing::warn!(
            "the {vocab_size}-token vocabulary is {:.0}% of the model's {} parameters at d_model {}: \
             the output layer dominates each step (slow, and little left for the transformer); \
             a larger preset or --tokenizer char|byte suits this size",
            100.0 * share,
            model.params(),
            config.d_model
        );
    }
}

/// The configuration the flags resolve to; a bad one is a usage error (exit 2).
pub fn config(
    args: &CommonArgs,
    run: Option<&RunFlags>,
    objective: Option<ObjectiveKind>,
) -> Result<ConfidenceExperimentConfig, Failure> {
    args.config(run, objective)
        .map_err(|e| Failure::BadInput(e.into()))
}

/// A training error as an exit code: the user's input (settings, output place, a checkpoint
/// that does not fit) is 2, a failed run 1.
pub fn train_failure(e: TrainError) -> Failure {
    if e.is_usage() {
        Failure::BadInput(e.into())
    } else {
        Failure::Run(e.into())
    }
}

/// A run stopped early: exit 128 + the signal (130 for the dashboard's stop too), with what
/// was kept and the command that continues it.
pub fn stopped(stop: &StopRequest, what: String) -> Failure {
    let code = stop.requested().map_or(130, StopReason::exit_code);
    let mut command: Vec<String> = std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect();
    if !command.iter().any(|a| a == "--resume") {
        command.push("--resume".into());
    }
    Failure::Stopped {
        code,
        message: format!("{what}\ncontinue with: {}", command.join(" ")),
    }
}

/// The device of `--backend` / `--device`; a backend missing from this build is a usage error
/// (exit 2), a missing GPU or library a failed run (exit 1).
pub fn open_device(args: &DeviceArgs) -> Result<burn::prelude::Device, Failure> {
    let device = crate::backend::device(args.backend, args.device).map_err(|e| {
        if e.is_usage() {
            Failure::BadInput(e.into())
        } else {
            Failure::Run(e.into())
        }
    })?;
    tracing::info!("backend {}: {device:?}", args.backend);
    Ok(device)
}

/// The main device and, for `--devices`, every data-parallel device (the main one first). On
/// a CPU backend, which has one device, each index is a worker on that CPU.
pub fn open_devices(
    args: &DeviceArgs,
    devices: Option<&[usize]>,
) -> Result<(burn::prelude::Device, Vec<burn::prelude::Device>), Failure> {
    let Some(indices) = devices else {
        return Ok((open_device(args)?, Vec::new()));
    };
    let bad = |message: String| Err(Failure::BadInput(anyhow::anyhow!(message)));
    if args.device.is_some() {
        return bad(
            "--device and --devices: give one (--devices N,M,... names every device)".into(),
        );
    }
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != indices.len() {
        return bad(format!("--devices {indices:?}: an index appears twice"));
    }
    let takes_index = args.backend.takes_index();
    if !takes_index && indices.len() > 1 {
        tracing::warn!(
            "--devices on {}: one CPU device, so the {} workers share its cores (on flex still \
             faster than one: docs/scaling.md)",
            args.backend,
            indices.len()
        );
    }
    let devices = indices
        .iter()
        .map(|&i| {
            open_device(&DeviceArgs {
                backend: args.backend,
                device: takes_index.then_some(i),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((devices[0].clone(), devices))
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).context("serialising the output")?;
    println!("{text}");
    Ok(())
}
