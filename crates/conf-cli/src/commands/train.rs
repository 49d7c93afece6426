//! `lookahead train`: one model, one seed, through burn-train's Learner.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use conf_data::{Split, write_atomic};
use conf_model::presets::{PRESET_NAMES, model_shape};
use conf_model::{ConfidenceAwareGpt, ConfidenceGptConfig};
use conf_train::metrics::MetricKind;
use conf_train::presets::schedule;
use conf_train::trainee::{ConfidenceTrainee, StandardTrainee};
use conf_train::training::{RunReport, RunSettings, fit};
use conf_train::{
    ConfidenceSettings, DenseObjective, Objective, ObjectiveKind, SeedObjective, TeacherObjective,
};
use serde::Serialize;

use crate::Failure;
use crate::backend;
use crate::cli::{ModelKind, TrainArgs};

fn bad(message: String) -> Failure {
    Failure::BadInput(anyhow!(message))
}

#[derive(Serialize)]
struct TrainRecord<'a> {
    model: &'static str,
    objective: ObjectiveKind,
    seed: u64,
    parameters: usize,
    settings: &'a RunSettings,
    report: &'a RunReport,
}

pub fn run(args: TrainArgs) -> Result<(), Failure> {
    let r = &args.run;
    let shape = model_shape(&r.preset).ok_or_else(|| {
        bad(format!(
            "--preset: unknown preset '{}' (expected one of: {PRESET_NAMES})",
            r.preset
        ))
    })?;
    let plan = schedule(&r.preset).expect("every model preset has a schedule");
    let objective = match (args.model, args.objective) {
        (ModelKind::Standard, None | Some(ObjectiveKind::Standard)) => ObjectiveKind::Standard,
        (ModelKind::Standard, Some(other)) => {
            return Err(bad(format!(
                "--objective {other:?}: the standard model trains only with 'standard'"
            )));
        }
        (ModelKind::Confidence, None) => ObjectiveKind::Dense,
        (ModelKind::Confidence, Some(ObjectiveKind::Standard)) => {
            return Err(bad(
                "--objective standard: the confidence model needs seed, dense or teacher".into(),
            ));
        }
        (ModelKind::Confidence, Some(kind)) => kind,
    };
    let seed = *r
        .seeds
        .first()
        .ok_or_else(|| bad("--seeds: give at least one seed".into()))?;
    let device = backend::device(r.backend).map_err(bad)?;
    let corpus = super::load(&r.corpus)?;
    let seq_len = r.seq_len.unwrap_or(shape.context_length);
    let split =
        Split::contiguous(&corpus, 0.1, seq_len).map_err(|e| Failure::BadInput(e.into()))?;
    let run_dir = r.results_dir.join("train").join(
        format!(
            "{}-{objective:?}-seed{seed}",
            match args.model {
                ModelKind::Standard => "standard",
                ModelKind::Confidence => "confidence",
            }
        )
        .to_lowercase(),
    );
    let settings = RunSettings {
        training_steps: r.training_steps.unwrap_or(plan.training_steps),
        eval_interval: r.eval_interval.unwrap_or(plan.eval_interval),
        batch_size: r.batch_size.unwrap_or(plan.batch_size),
        seq_len,
        eval_windows: Some(plan.eval_windows),
        seed,
        optimizer: plan.optimizer,
        artifact_dir: run_dir.clone(),
        no_tui: r.no_tui,
        save_interval: r.save_interval,
        resume: r.resume,
    };
    let mut gpt = shape.gpt(corpus.vocab_size());
    gpt.context_length = seq_len;
    let confidence = ConfidenceGptConfig::new(gpt)
        .with_conf_head(r.conf_head)
        .with_confidence_init_bias(r.confidence_init_bias);
    confidence
        .gpt
        .validate()
        .map_err(|e| Failure::BadInput(e.into()))?;
    let conf = ConfidenceSettings {
        alpha: r.confidence_alpha,
        conf_input: r.conf_input,
    };

    let device = device.autodiff();
    device.seed(seed);
    let (parameters, report) = match args.model {
        ModelKind::Standard => {
            let model = confidence.matched_standard().standard.init_minigpt(&device);
            let params = burn::module::Module::num_params(&model);
            let trained = fit(
                StandardTrainee::new(model),
                &MetricKind::STANDARD,
                &corpus,
                &split,
                &settings,
            )?;
            (params, trained.report)
        }
        ModelKind::Confidence => {
            let model = confidence.init(&device);
            let params = burn::module::Module::num_params(&model);
            let objective: Arc<dyn Objective<ConfidenceAwareGpt>> = match objective {
                ObjectiveKind::Seed => Arc::new(SeedObjective(conf)),
                ObjectiveKind::Teacher => Arc::new(TeacherObjective(conf)),
                _ => Arc::new(DenseObjective(conf)),
            };
            let metrics: Vec<MetricKind> = MetricKind::STANDARD
                .into_iter()
                .chain(MetricKind::CONFIDENCE)
                .collect();
            let trained = fit(
                ConfidenceTrainee::new(model, objective),
                &metrics,
                &corpus,
                &split,
                &settings,
            )?;
            (params, trained.report)
        }
    };
    let record = TrainRecord {
        model: match args.model {
            ModelKind::Standard => "standard",
            ModelKind::Confidence => "confidence",
        },
        objective,
        seed,
        parameters,
        settings: &settings,
        report: &report,
    };
    let path = run_dir.join("history.json");
    let json = serde_json::to_vec_pretty(&record).context("serialising the history")?;
    write_atomic(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "trained {} ({objective:?}) for {} steps: {:.1} ms/step, {:.0} tokens/s; history in {}",
        record.model,
        settings.training_steps,
        report.ms_per_step,
        report.tokens_per_second,
        path.display()
    );
    Ok(())
}
