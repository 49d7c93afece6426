//! `lookahead experiment`: both models for every seed, then the results file. The file is
//! written when the experiment starts and after every model, marked `incomplete` until the
//! last; a stopped experiment continues with `--resume`.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use conf_data::write_atomic;
use conf_train::ObjectiveKind;
use conf_train::checkpoint::has_checkpoints;
use conf_train::pipeline::train_model;
use conf_train::stop::RunStatus;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Failure;
use crate::cli::{ExperimentArgs, ModelKind};
use crate::config::ConfidenceExperimentConfig;
use crate::results::{
    ExperimentResults, ExperimentStatus, GeneratedSample, SCHEMA_VERSION, Summary, TrainingResult,
};

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run(args: ExperimentArgs) -> Result<(), Failure> {
    let config = super::config(&args.common, Some(&args.run), args.objective)?;
    let (device, devices) = super::open_devices(&args.common.target, args.run.devices.as_deref())?;
    let (corpus, split) = super::load_corpus_and_split(&config, &args.common.corpus)?;
    let tokenizer = corpus.tokenizer.build();
    let mut results = if args.run.resume {
        interrupted_experiment(&config)?
    } else {
        let (id, now) = reserve_experiment(&config.results_dir)?;
        ExperimentResults {
            schema_version: SCHEMA_VERSION,
            id,
            status: ExperimentStatus::Incomplete,
            timestamp: now.format(&Rfc3339).unwrap_or_default(),
            git_commit: git_commit(),
            backend: args.common.target.backend.name().to_string(),
            device: if devices.len() > 1 {
                format!("{devices:?}")
            } else {
                format!("{device:?}")
            },
            peak_tflops: args.common.peak_tflops(config.precision),
            parameter_counts: config.model(corpus.vocab_size()).matched_standard(),
            config: config.clone(),
            standard_model_results: Default::default(),
            confidence_model_results: Default::default(),
            training_time: Default::default(),
            summary: Summary::new(&Default::default(), &Default::default()),
        }
    };
    let path = results_path(&config.results_dir, &results.id);
    let runs_dir = config.results_dir.join(format!("{}_runs", results.id));
    save(&mut results, &path)?;
    let stop = crate::signals::install().context("installing the signal handlers")?;

    for &seed in &config.seeds {
        for objective in [ObjectiveKind::Standard, config.objective] {
            let model = ModelKind::of(objective);
            let done = runs_of(&mut results, model)
                .get(&seed.to_string())
                .is_some_and(|r| r.status == RunStatus::Complete);
            if done {
                continue;
            }
            tracing::info!(seed, model = model.name(), "training");
            let run_dir = runs_dir.join(format!("{}-seed{seed}", model.name()));
            let resume = has_checkpoints(&run_dir.join(conf_train::checkpoint::CHECKPOINTS));
            let mut training = config.training(seed, run_dir, args.run.no_tui, resume);
            training.execution.devices = devices.clone();
            let plan = config.plan(objective, corpus.vocab_size(), training);
            let outcome = train_model(&plan, &corpus, &split, &device, &stop)
                .map_err(super::train_failure)?;
            let sample = GeneratedSample::decode(&outcome.prompt, &outcome.generated, &*tokenizer);
            if outcome.status == RunStatus::Complete {
                print_sample(model.name(), seed, &sample);
            }
            let result = TrainingResult::new(&plan, &outcome, sample, results.peak_tflops);
            runs_of(&mut results, model).insert(seed.to_string(), result);
            save(&mut results, &path)?;
            if outcome.status != RunStatus::Complete {
                return Err(super::stopped(
                    &stop,
                    format!(
                        "the {} model of seed {seed} stopped after {} of {} steps; results so far (incomplete): {}",
                        model.name(),
                        outcome.report.steps_trained,
                        config.training_steps,
                        path.display()
                    ),
                ));
            }
        }
    }
    results.status = ExperimentStatus::Complete;
    save(&mut results, &path)?;
    println!("results: {}", path.display());
    super::report::run(vec![path])
}

fn runs_of(
    results: &mut ExperimentResults,
    model: ModelKind,
) -> &mut std::collections::BTreeMap<String, TrainingResult> {
    match model {
        ModelKind::Standard => &mut results.standard_model_results,
        ModelKind::Confidence => &mut results.confidence_model_results,
    }
}

fn results_path(results_dir: &Path, id: &str) -> PathBuf {
    results_dir.join(format!("{id}_results.json"))
}

/// Recomputes what is derived from the runs and writes the file atomically.
fn save(results: &mut ExperimentResults, path: &Path) -> Result<(), Failure> {
    results.summary = Summary::new(
        &results.standard_model_results,
        &results.confidence_model_results,
    );
    results.training_time = results.training_time_by_model();
    let json = serde_json::to_vec_pretty(results).context("serialising the results")?;
    write_atomic(path, &json).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A new experiment's id, reserved in `results_dir`: its UTC start to the second and a random
/// suffix, made unique by creating `{id}_runs` exclusively (a process that drew the same id
/// gets `AlreadyExists` and draws again), so experiments started together never share files.
fn reserve_experiment(results_dir: &Path) -> Result<(String, OffsetDateTime), Failure> {
    let unusable = |e: std::io::Error| {
        Failure::BadInput(anyhow!(
            "--results-dir {}: cannot create the experiment's files there: {e}",
            results_dir.display()
        ))
    };
    std::fs::create_dir_all(results_dir).map_err(unusable)?;
    let now = OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    for _ in 0..16 {
        let id = format!("{stamp}-{:08x}", rand::random::<u32>());
        match std::fs::create_dir(results_dir.join(format!("{id}_runs"))) {
            Ok(()) => return Ok((id, now)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(unusable(e)),
        }
    }
    Err(Failure::Run(anyhow!(
        "{}: no free experiment id after 16 draws",
        results_dir.display()
    )))
}

/// The latest incomplete experiment in the results directory with exactly this configuration.
fn interrupted_experiment(
    config: &ConfidenceExperimentConfig,
) -> Result<ExperimentResults, Failure> {
    let dir = &config.results_dir;
    let candidates = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with("_results.json"))
                .filter_map(|p| crate::results::load(&p).ok())
                .filter(|r| {
                    r.status == ExperimentStatus::Incomplete
                        && r.config.without_execution() == config.without_execution()
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .max_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.id.cmp(&b.id)))
        .ok_or_else(|| {
            Failure::BadInput(anyhow!(
                "--resume: no incomplete experiment with this configuration in {} (resume with the flags it was started with; without --resume a new one starts)",
                dir.display()
            ))
        })
}

/// The sampled text; for the confidence model each token is followed by its predicted loss.
fn print_sample(model: &str, seed: u64, sample: &GeneratedSample) {
    let text: String = match &sample.predicted_loss {
        Some(losses) => sample
            .tokens
            .iter()
            .zip(losses)
            .map(|(t, l)| format!("{t}[{l:.1}]"))
            .collect(),
        None => sample.tokens.concat(),
    };
    println!("sample {model} seed {seed}: {:?} → {text:?}", sample.prompt);
}
