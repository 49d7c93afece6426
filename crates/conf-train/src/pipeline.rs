//! One model end to end: built from its seed, trained through the Learner, evaluated on the
//! evaluation windows and sampled from. The binary decides what to run and reports it; this is
//! how a model is run.

use std::path::PathBuf;

use burn::module::{Module, ModuleDisplay};
use burn::prelude::*;
use conf_data::{Corpus, Split};
use conf_model::{ConfidenceGptConfig, Precision};

use crate::checkpoint::CheckpointError;
use crate::cost::flops_per_token;
use crate::generate::{Generate, GenerateOptions, Generated, Sampling};
use crate::metrics::{MetricValues, Samples};
use crate::objective::{ConfidenceSettings, ObjectiveKind};
use crate::stop::{RunStatus, StopRequest};
use crate::trainee::{ModelTrainee, ObjectiveTrainee};
use crate::training::{TrainError, TrainingReport, TrainingSettings, evaluate, fit};
use crate::weights::{AnyModel, Architecture, Export, ModelCard, WeightsError};

/// Everything that decides one model's run.
#[derive(Debug, Clone)]
pub struct ModelPlan {
    /// `standard` trains the parameter-matched MiniGPT, the others ConfidenceAwareGPT.
    pub objective: ObjectiveKind,
    /// The confidence model; the standard model is its parameter-matched MiniGPT.
    pub model: ConfidenceGptConfig,
    /// The matrix products' precision (the weights are f32 in any).
    pub precision: Precision,
    pub confidence: ConfidenceSettings,
    pub training: TrainingSettings,
    pub sample: SampleSettings,
    /// Start from these exported weights instead of the seed's initialisation.
    pub init_from: Option<PathBuf>,
}

/// The text sampled from the final model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSettings {
    /// The prompt: this many tokens from the start of the validation split (at most L).
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

/// A trained model's measurements.
#[derive(Debug, Clone)]
pub struct ModelOutcome {
    /// Whether every configured step trained; a stopped run is measured as it stands.
    pub status: RunStatus,
    pub parameters: usize,
    /// Training FLOPs per token (see [`crate::cost`]).
    pub flops_per_token: f64,
    pub report: TrainingReport,
    /// Every metric of the final model on the evaluation windows.
    pub final_metrics: MetricValues,
    /// The evaluation samples behind them (predicted/actual pairs for the confidence model).
    pub samples: Samples,
    /// The prompt's ids and the ids sampled after it (the caller decodes them).
    pub prompt: Vec<u32>,
    pub generated: Generated,
}

/// Builds the plan's model from its seed on `device` (made a training device, see
/// [`crate::training::Execution`]), or loads it from the
/// plan's `init_from` export, writes its [`ModelCard`] into the run directory, trains,
/// evaluates and samples it; `stop` ends the training early (see [`crate::stop`]).
pub fn train_model(
    plan: &ModelPlan,
    corpus: &Corpus,
    split: &Split,
    device: &Device,
    stop: &StopRequest,
) -> Result<ModelOutcome, TrainError> {
    plan.training.validate()?;
    let card = ModelCard {
        architecture: Architecture::of(plan.objective, &plan.model),
        objective: plan.objective,
        conf_input: plan.confidence.conf_input,
        tokenizer: corpus.tokenizer.clone(),
    };
    let device = plan.training.execution.training_device(device);
    // Initialisation is seeded: both models of a seed start from that seed's generator.
    device.seed(plan.training.seed);
    let mut model = AnyModel::init(&card.architecture, &device).with_precision(plan.precision);
    if let Some(path) = &plan.init_from {
        start_from(&mut model, &card, path)?;
    }
    let dir = &plan.training.artifact_dir;
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Output {
        path: dir.clone(),
        message: e.to_string(),
    })?;
    keep_or_save_card(&card, dir)?;
    let grad_clip = plan.training.optimizer.grad_clip;
    match ObjectiveTrainee::with_model(plan.objective, model, plan.confidence, grad_clip) {
        ObjectiveTrainee::Standard(trainee) => run(trainee, plan, corpus, split, stop),
        ObjectiveTrainee::Confidence(trainee) => run(trainee, plan, corpus, split, stop),
    }
}

/// Writes the run's card, unless the directory holds checkpoints of another model: then the
/// run is refused (its card would describe weights it did not write).
fn keep_or_save_card(card: &ModelCard, dir: &std::path::Path) -> Result<(), TrainError> {
    let checkpoints = dir.join(crate::checkpoint::CHECKPOINTS);
    if let Ok(earlier) = ModelCard::load(dir)
        && earlier != *card
        && crate::checkpoint::has_checkpoints(&checkpoints)
    {
        let what = earlier
            .architecture
            .difference(&card.architecture)
            .unwrap_or_else(|| "its objective, confidence input or tokenizer differs".into());
        return Err(CheckpointError::Mismatch(format!(
            "{} holds the checkpoints of another model ({what}); remove the directory or choose another --results-dir",
            dir.display()
        ))
        .into());
    }
    Ok(card.save(dir)?)
}

/// `--init-from`: the export must be of this model, with this tokenizer.
fn start_from(
    model: &mut AnyModel,
    card: &ModelCard,
    path: &std::path::Path,
) -> Result<(), WeightsError> {
    let export = Export::read(path)?;
    let (saved, _) = export.card()?;
    let mismatch = |message: String| WeightsError::Mismatch {
        path: path.to_path_buf(),
        message: format!("--init-from: {message}"),
    };
    if let Some(difference) = card.architecture.difference(&saved.architecture) {
        return Err(mismatch(format!(
            "the export is of another model: {difference}"
        )));
    }
    if saved.tokenizer != card.tokenizer {
        return Err(mismatch(format!(
            "the export's tokenizer ({}, {} tokens) is not this corpus's ({}, {} tokens)",
            saved.tokenizer.kind(),
            saved.tokenizer.vocab_size(),
            card.tokenizer.kind(),
            card.tokenizer.vocab_size()
        )));
    }
    export.apply_to(model)?;
    tracing::info!("starting from the weights in {}", path.display());
    Ok(())
}

fn run<M>(
    trainee: ModelTrainee<M>,
    plan: &ModelPlan,
    corpus: &Corpus,
    split: &Split,
    stop: &StopRequest,
) -> Result<ModelOutcome, TrainError>
where
    M: Module + ModuleDisplay + Generate + Sync + 'static,
{
    let settings = &plan.training;
    let parameters = Module::num_params(&trainee.model);
    let extra_passes = trainee.objective.extra_forward_passes(settings.seq_len);
    let trained = fit(trainee, corpus, split, settings, stop)?;
    let (final_metrics, samples) = evaluate(&trained.model, corpus, split, settings);
    let start = split.val.start;
    let prompt = corpus
        .tokens
        .slice(start..start + plan.sample.prompt_tokens.min(settings.seq_len));
    let generated = trained.model.model.generate(
        &prompt,
        &GenerateOptions {
            new_tokens: plan.sample.new_tokens,
            context: settings.seq_len,
            sampling: Sampling::PLAIN,
            seed: settings.seed,
            conf_input: plan.confidence.conf_input,
        },
    );
    Ok(ModelOutcome {
        status: trained.status,
        parameters,
        flops_per_token: flops_per_token(parameters, &plan.model.gpt, extra_passes),
        report: trained.report,
        final_metrics,
        samples,
        prompt,
        generated,
    })
}
