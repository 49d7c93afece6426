//! `lookahead experiment`: both models for every seed, then the results file.

use std::collections::BTreeMap;

use anyhow::Context;
use conf_data::write_atomic;
use conf_train::ObjectiveKind;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use conf_train::pipeline::train_model;

use crate::Failure;
use crate::cli::{CommonArgs, ModelKind};
use crate::results::{ExperimentResults, GeneratedSample, SCHEMA_VERSION, Summary, TrainingResult};

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run(args: CommonArgs) -> Result<(), Failure> {
    let config = super::config(&args)?;
    let device = super::open_device(&args)?;
    let (corpus, split) = super::load_corpus_and_split(&config, &args.corpus)?;
    let tokenizer = corpus.tokenizer.build();
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
        for objective in [ObjectiveKind::Standard, config.objective] {
            let model = ModelKind::of(objective);
            tracing::info!(seed, model = model.name(), "training");
            let run_dir = experiment_dir.join(format!("{}-seed{seed}", model.name()));
            let training = config.training(seed, run_dir, args.no_tui, args.resume);
            let plan = config.plan(objective, corpus.vocab_size(), training);
            let outcome = train_model(&plan, &corpus, &split, &device)?;
            *training_time.entry(model.name().to_string()).or_default() +=
                outcome.report.train_seconds;
            let sample = GeneratedSample::decode(&outcome.prompt, &outcome.generated, &*tokenizer);
            print_sample(model.name(), seed, &sample);
            let target = match model {
                ModelKind::Standard => &mut standard,
                ModelKind::Confidence => &mut confidence,
            };
            target.insert(
                seed.to_string(),
                TrainingResult::new(&plan, &outcome, sample),
            );
        }
    }
    let summary = Summary::new(&standard, &confidence);
    let results = ExperimentResults {
        schema_version: SCHEMA_VERSION,
        timestamp: now.format(&Rfc3339).unwrap_or_default(),
        git_commit: git_commit(),
        backend: args.backend.name().to_string(),
        device: format!("{device:?}"),
        parameter_counts: config.model(corpus.vocab_size()).matched_standard(),
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
