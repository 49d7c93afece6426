//! `lookahead train`: one model, one seed, through burn-train's Learner.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use conf_data::{Split, write_atomic};
use conf_model::{ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig};
use conf_train::metrics::MetricKind;
use conf_train::optim::OptimizerSettings;
use conf_train::trainee::{ConfidenceTrainee, GRAD_CLIP, StandardTrainee};
use conf_train::training::{RunReport, RunSettings, fit};
use conf_train::{
    ConfidenceSettings, DenseObjective, Objective, ObjectiveKind, SeedObjective, TeacherObjective,
};
use serde::Serialize;

use crate::Failure;
use crate::backend;
use crate::cli::{CorpusArgs, ModelKind, TrainArgs};
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
    let device = backend::device(args.run.backend).map_err(bad)?;
    let corpus = super::load(&CorpusArgs {
        dataset: Some(config.dataset.clone()),
        tokenizer: config.tokenizer,
        ..args.run.corpus.clone()
    })?;
    let split = Split::contiguous(&corpus, config.val_fraction, config.seq_len)
        .map_err(|e| Failure::BadInput(e.into()))?;
    let model_name = match args.model {
        ModelKind::Standard => "standard",
        ModelKind::Confidence => "confidence",
    };
    let run_dir = config
        .results_dir
        .join("train")
        .join(format!("{model_name}-{objective:?}-seed{seed}").to_lowercase());
    let settings = RunSettings {
        training_steps: config.training_steps,
        eval_interval: config.eval_interval,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        eval_windows: Some(config.eval_windows),
        seed,
        optimizer: OptimizerSettings {
            learning_rate: config.learning_rate,
            min_learning_rate: config.min_learning_rate,
            warmup_steps: config.warmup_steps,
            weight_decay: config.weight_decay,
            grad_clip: GRAD_CLIP,
        },
        artifact_dir: run_dir.clone(),
        no_tui: args.run.no_tui,
        save_interval: config.save_interval,
        resume: args.run.resume,
    };
    let gpt = GptConfig::new(
        corpus.vocab_size(),
        config.seq_len,
        config.d_model,
        config.n_layers,
        config.n_heads,
        4 * config.d_model,
    )
    .with_dropout(config.dropout);
    let confidence = ConfidenceGptConfig::new(gpt)
        .with_conf_head(config.conf_head)
        .with_confidence_init_bias(config.confidence_init_bias);
    let conf = ConfidenceSettings {
        alpha: config.confidence_alpha,
        conf_input: config.conf_input,
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
        model: model_name,
        objective,
        seed,
        parameters,
        config: &config,
        settings: &settings,
        report: &report,
    };
    let path = run_dir.join("history.json");
    let json = serde_json::to_vec_pretty(&record).context("serialising the history")?;
    write_atomic(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "trained {model_name} ({objective:?}) for {} steps: {:.1} ms/step, {:.0} tokens/s; history in {}",
        settings.training_steps,
        report.ms_per_step,
        report.tokens_per_second,
        path.display()
    );
    Ok(())
}
