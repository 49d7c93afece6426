//! `lookahead train`: one model, one seed, through burn-train's Learner.

use anyhow::{Context, anyhow};
use conf_data::write_atomic;
use conf_train::ObjectiveKind;
use conf_train::metrics::MetricValues;
use conf_train::pipeline::train_model;
use conf_train::stop::RunStatus;
use conf_train::training::{TrainingReport, TrainingSettings};
use serde::Serialize;

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
    status: RunStatus,
    parameters: usize,
    config: &'a ConfidenceExperimentConfig,
    settings: &'a TrainingSettings,
    report: &'a TrainingReport,
    final_metrics: &'a MetricValues,
    /// The export the run started from (`--init-from`), if any.
    init_from: Option<&'a std::path::Path>,
}

pub fn run(args: TrainArgs) -> Result<(), Failure> {
    let config = super::config(&args.common, Some(&args.run), None)?;
    let objective = match (args.model, args.objective) {
        (ModelKind::Standard, None | Some(ObjectiveKind::Standard)) => ObjectiveKind::Standard,
        (ModelKind::Standard, Some(other)) => {
            return Err(bad(format!(
                "--objective {}: the standard model trains only with 'standard'",
                other.name()
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
    let (device, devices) = super::open_devices(&args.common.target, args.run.devices.as_deref())?;
    let (corpus, split) = super::load_corpus_and_split(&config, &args.common.corpus)?;
    let model_name = args.model.name();
    let run_dir = config
        .results_dir
        .join("train")
        .join(format!("{model_name}-{}-seed{seed}", objective.name()));
    let mut training = config.training(seed, run_dir.clone(), args.run.no_tui, args.run.resume);
    training.execution.devices = devices;
    let mut plan = config.plan(objective, corpus.vocab_size(), training);
    plan.init_from = args.init_from.clone();
    let stop = crate::signals::install().context("installing the signal handlers")?;
    let outcome =
        train_model(&plan, &corpus, &split, &device, &stop).map_err(super::train_failure)?;
    let record = TrainRecord {
        model: model_name,
        objective,
        seed,
        status: outcome.status,
        parameters: outcome.parameters,
        config: &config,
        settings: &plan.training,
        report: &outcome.report,
        final_metrics: &outcome.final_metrics,
        init_from: plan.init_from.as_deref(),
    };
    let path = run_dir.join("history.json");
    let json = serde_json::to_vec_pretty(&record).context("serialising the history")?;
    write_atomic(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    let report = &outcome.report;
    if outcome.status != RunStatus::Complete {
        return Err(super::stopped(
            &stop,
            format!(
                "trained {model_name} ({}) for {} of {} steps; checkpoint and history in {}",
                objective.name(),
                report.steps_trained,
                config.training_steps,
                run_dir.display()
            ),
        ));
    }
    crate::report::print_metrics(&outcome.final_metrics);
    println!(
        "trained {model_name} ({}) for {} steps: {:.1} ms/step, {:.0} tokens/s; history in {}",
        objective.name(),
        report.steps_trained,
        report.ms_per_step,
        report.tokens_per_second,
        path.display()
    );
    Ok(())
}
