//! `lookahead experiment`: both models for every seed, then the results file.

use std::collections::BTreeMap;

use anyhow::Context;
use conf_data::write_atomic;
use conf_train::ObjectiveKind;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::run::{RunRequest, model_configs, run_model};
use crate::Failure;
use crate::cli::{ModelKind, RunArgs};
use crate::config::ConfidenceExperimentConfig;
use crate::results::{ExperimentResults, SCHEMA_VERSION, Summary, TrainingResult};

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    let config =
        ConfidenceExperimentConfig::from_args(&args).map_err(|e| Failure::BadInput(e.into()))?;
    let device = super::open_device(&args)?;
    let (corpus, split) = super::load_run_data(&config, &args.corpus)?;
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
    let experiment_dir = config.results_dir.join(format!("{stamp}_runs"));

    let mut standard = BTreeMap::new();
    let mut confidence = BTreeMap::new();
    let mut training_time: BTreeMap<String, f64> = BTreeMap::new();
    for &seed in &config.seeds {
        for (model, objective) in [
            (ModelKind::Standard, ObjectiveKind::Standard),
            (ModelKind::Confidence, config.objective),
        ] {
            tracing::info!(seed, model = model.name(), "training");
            let run = run_model(RunRequest {
                config: &config,
                model,
                objective,
                seed,
                corpus: &corpus,
                split: &split,
                device: device.clone(),
                run_dir: experiment_dir.join(format!("{}-seed{seed}", model.name())),
                no_tui: args.no_tui,
                resume: args.resume,
            })?;
            *training_time.entry(model.name().to_string()).or_default() += run.report.train_seconds;
            print_sample(model.name(), seed, &run.sample);
            let is_confidence = model == ModelKind::Confidence;
            let result = TrainingResult::from_run(
                &run,
                &config,
                crate::results::extra_forward_passes(objective, &config),
                is_confidence,
            );
            let target = if is_confidence {
                &mut confidence
            } else {
                &mut standard
            };
            target.insert(seed.to_string(), result);
        }
    }
    let summary = Summary::new(&standard, &confidence);
    let results = ExperimentResults {
        schema_version: SCHEMA_VERSION,
        timestamp: now.format(&Rfc3339).unwrap_or_default(),
        git_commit: git_commit(),
        backend: args.backend.name().to_string(),
        device: format!("{device:?}"),
        parameter_counts: model_configs(&config, corpus.vocab_size()).1,
        config,
        standard_model_results: standard,
        confidence_model_results: confidence,
        training_time,
        summary,
    };
    let path = results
        .config
        .results_dir
        .join(format!("{stamp}_results.json"));
    let json = serde_json::to_vec_pretty(&results).context("serialising the results")?;
    write_atomic(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    println!("results: {}", path.display());
    super::report::run(vec![path])
}

/// The sampled text; for the confidence model each token is followed by its predicted loss.
fn print_sample(model: &str, seed: u64, sample: &super::run::GeneratedSample) {
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
