//! Building and training one model from the experiment config: shared by `train` and
//! `experiment`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use burn::prelude::*;
use burn::train::InferenceStep;
use conf_data::{Corpus, Split};
use conf_model::{ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig, ParameterMatch};
use conf_train::LookaheadBatch;
use conf_train::generate::{Generated, generate_confidence, generate_standard};
use conf_train::metrics::{MetricKind, Samples};
use conf_train::optim::OptimizerSettings;
use conf_train::step::StepOutput;
use conf_train::trainee::{ConfidenceTrainee, GRAD_CLIP, StandardTrainee};
use conf_train::training::{RunReport, RunSettings, TrainedModel, evaluate, fit};
use conf_train::{
    ConfidenceSettings, DenseObjective, Objective, ObjectiveKind, SeedObjective, TeacherObjective,
};

use crate::Failure;
use crate::cli::ModelKind;
use crate::config::ConfidenceExperimentConfig;

/// One trained model and what was measured on it.
pub struct ModelRun {
    pub parameters: usize,
    pub settings: RunSettings,
    pub report: RunReport,
    /// Every metric of the final model on the evaluation windows.
    pub final_metrics: BTreeMap<String, f64>,
    /// The evaluation samples behind them (predicted/actual pairs for the confidence model).
    pub samples: Samples,
    /// Text sampled from the final model.
    pub sample: GeneratedSample,
}

/// A short text sampled from a trained model after a prompt from the validation split.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratedSample {
    pub prompt: String,
    /// The generated tokens, each decoded on its own.
    pub tokens: Vec<String>,
    /// The confidence model's predicted loss (nats, two tokens ahead) at each token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_loss: Option<Vec<f32>>,
}

const PROMPT_TOKENS: usize = 8;
const SAMPLE_TOKENS: usize = 64;

fn sample_of(generated: Generated, prompt: &[u32], corpus: &Corpus) -> GeneratedSample {
    let tokenizer = corpus.tokenizer.build();
    GeneratedSample {
        prompt: tokenizer.decode(prompt),
        tokens: generated
            .tokens
            .iter()
            .map(|&t| tokenizer.decode(&[t]))
            .collect(),
        predicted_loss: generated.predicted_loss,
    }
}

/// The confidence model's config and the parameter-matched standard one.
pub fn model_configs(
    config: &ConfidenceExperimentConfig,
    vocab_size: usize,
) -> (ConfidenceGptConfig, ParameterMatch) {
    let gpt = GptConfig::new(
        vocab_size,
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
    let matched = confidence.matched_standard();
    (confidence, matched)
}

pub struct RunRequest<'a> {
    pub config: &'a ConfidenceExperimentConfig,
    pub model: ModelKind,
    pub objective: ObjectiveKind,
    pub seed: u64,
    pub corpus: &'a Corpus,
    pub split: &'a Split,
    pub device: Device,
    pub run_dir: PathBuf,
    pub no_tui: bool,
    pub resume: bool,
}

pub fn run_model(r: RunRequest) -> Result<ModelRun, Failure> {
    let c = r.config;
    let settings = RunSettings {
        training_steps: c.training_steps,
        eval_interval: c.eval_interval,
        batch_size: c.batch_size,
        seq_len: c.seq_len,
        eval_windows: Some(c.eval_windows),
        seed: r.seed,
        optimizer: OptimizerSettings {
            learning_rate: c.learning_rate,
            min_learning_rate: c.min_learning_rate,
            warmup_steps: c.warmup_steps,
            weight_decay: c.weight_decay,
            grad_clip: GRAD_CLIP,
        },
        artifact_dir: r.run_dir.clone(),
        no_tui: r.no_tui,
        save_interval: c.save_interval,
        resume: r.resume,
    };
    let (confidence, matched) = model_configs(c, r.corpus.vocab_size());
    let prompt = r
        .corpus
        .tokens
        .slice(r.split.val.start..r.split.val.start + PROMPT_TOKENS.min(c.seq_len));
    let device = r.device.clone().autodiff();
    // Initialisation is seeded: both models of a seed start from that seed's generator.
    device.seed(r.seed);
    match r.model {
        ModelKind::Standard => {
            let model = matched.standard.init_minigpt(&device);
            let parameters = model.num_params();
            finish(
                fit(
                    StandardTrainee::new(model),
                    &MetricKind::STANDARD,
                    r.corpus,
                    r.split,
                    &settings,
                )?,
                &MetricKind::STANDARD,
                parameters,
                |t| generate_standard(&t.model, &prompt, SAMPLE_TOKENS, c.seq_len, r.seed),
                &r,
                &prompt,
                settings.clone(),
            )
        }
        ModelKind::Confidence => {
            let model = confidence.init(&device);
            let parameters = model.num_params();
            let conf = ConfidenceSettings {
                alpha: c.confidence_alpha,
                conf_input: c.conf_input,
            };
            let objective: Arc<dyn Objective<ConfidenceAwareGpt>> = match r.objective {
                ObjectiveKind::Seed => Arc::new(SeedObjective(conf)),
                ObjectiveKind::Teacher => Arc::new(TeacherObjective(conf)),
                _ => Arc::new(DenseObjective(conf)),
            };
            let kinds: Vec<MetricKind> = MetricKind::STANDARD
                .into_iter()
                .chain(MetricKind::CONFIDENCE)
                .collect();
            finish(
                fit(
                    ConfidenceTrainee::new(model, objective),
                    &kinds,
                    r.corpus,
                    r.split,
                    &settings,
                )?,
                &kinds,
                parameters,
                |t| generate_confidence(&t.model, &prompt, SAMPLE_TOKENS, c.seq_len, r.seed),
                &r,
                &prompt,
                settings.clone(),
            )
        }
    }
}

/// Evaluates and samples a trained model.
fn finish<M>(
    trained: TrainedModel<M>,
    kinds: &[MetricKind],
    parameters: usize,
    generate: impl FnOnce(&M) -> Generated,
    r: &RunRequest,
    prompt: &[u32],
    settings: RunSettings,
) -> Result<ModelRun, Failure>
where
    M: InferenceStep<Input = LookaheadBatch, Output = StepOutput> + Module,
{
    let (final_metrics, samples) = evaluate(&trained.model, kinds, r.corpus, r.split, &settings);
    let sample = sample_of(generate(&trained.model), prompt, r.corpus);
    Ok(ModelRun {
        parameters,
        settings,
        report: trained.report,
        final_metrics,
        samples,
        sample,
    })
}
