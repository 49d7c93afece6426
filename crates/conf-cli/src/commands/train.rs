//! `lookahead train`: one model, one seed, through burn-train's Learner.

use anyhow::{Context, anyhow};
use conf_data::write_atomic;
use conf_train::ObjectiveKind;
use conf_train::training::{RunReport, RunSettings};
use serde::Serialize;
use std::collections::BTreeMap;

use super::run::{RunRequest, run_model};
use crate::Failure;
use crate::cli::{ModelKind, TrainArgs};
use crate::config::ConfidenceExperimentConfig;

fn bad(message: String) -> Failure {
    Failure::BadInput(anyhow!(message))
}

#[derive(Serialize)]
struct TrainRecord<'a> {
    model: &'static str,
    objective: ObjectiveKind,
    seed: u64,
    parameters: usize,
    config: &'a ConfidenceExperimentConfig,
    settings: &'a RunSettings,
    report: &'a RunReport,
    final_metrics: &'a BTreeMap<String, f64>,
}

pub fn run(args: TrainArgs) -> Result<(), Failure> {
    let config = ConfidenceExperimentConfig::from_args(&args.run)
        .map_err(|e| Failure::BadInput(e.into()))?;
    let objective = match (args.model, args.objective) {
        (ModelKind::Standard, None | Some(ObjectiveKind::Standard)) => ObjectiveKind::Standard,
        (ModelKind::Standard, Some(other)) => {
            return Err(bad(format!(
                "--objective {other:?}: the standard model trains only with 'standard'"
            )));
        }
        (ModelKind::Confidence, None) => config.objective,
        (ModelKind::Confidence, Some(ObjectiveKind::Standard)) => {
            return Err(bad(
                "--objective standard: the confidence model needs seed, dense or teacher".into(),
            ));
        }
        (ModelKind::Confidence, Some(kind)) => kind,
    };
    let seed = config.seeds[0];
    let device = super::open_device(&args.run)?;
    let (corpus, split) = super::load_run_data(&config, &args.run.corpus)?;
    let model_name = args.model.name();
    let run_dir = config
        .results_dir
        .join("train")
        .join(format!("{model_name}-{objective:?}-seed{seed}").to_lowercase());
    let run = run_model(RunRequest {
        config: &config,
        model: args.model,
        objective,
        seed,
        corpus: &corpus,
        split: &split,
        device,
        run_dir: run_dir.clone(),
        no_tui: args.run.no_tui,
        resume: args.run.resume,
    })?;
    let record = TrainRecord {
        model: model_name,
        objective,
        seed,
        parameters: run.parameters,
        config: &config,
        settings: &run.settings,
        report: &run.report,
        final_metrics: &run.final_metrics,
    };
    let path = run_dir.join("history.json");
    let json = serde_json::to_vec_pretty(&record).context("serialising the history")?;
    write_atomic(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "trained {model_name} ({objective:?}) for {} steps: {:.1} ms/step, {:.0} tokens/s; history in {}",
        run.settings.training_steps,
        run.report.ms_per_step,
        run.report.tokens_per_second,
        path.display()
    );
    Ok(())
}
