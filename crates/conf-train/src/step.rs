//! What a training or evaluation step hands to burn-train's metrics: the objective's tensors,
//! read back to the host once, lazily, on the metrics thread.

use std::sync::{Arc, OnceLock};

use burn::prelude::*;
use burn::train::ItemLazy;
use burn::train::metric::Adaptor;
use burn_std::ExecutionError;

use crate::objective::ObjectiveOutput;

/// Host copies of one step's losses and per-token statistics.
#[derive(Debug, Clone, Default)]
pub struct StepSummary {
    pub total: f64,
    pub lm_loss: f64,
    pub conf_loss: Option<f64>,
    /// Per pass-1 token, all L positions of every row.
    pub token_loss: Vec<f32>,
    pub max_prob: Vec<f32>,
    pub correct: Vec<f32>,
    /// Per confidence prediction (empty for the standard model).
    pub predicted: Vec<f32>,
    pub actual: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// The step output of both models.
#[derive(Debug, Clone)]
pub struct StepOutput {
    output: ObjectiveOutput,
    summary: Arc<OnceLock<Arc<StepSummary>>>,
}

impl StepOutput {
    pub fn new(output: ObjectiveOutput) -> Self {
        Self {
            output,
            summary: Arc::new(OnceLock::new()),
        }
    }

    /// The LM loss tensor, still on the device.
    pub fn lm_loss(&self) -> Tensor<1> {
        self.output.lm_loss.clone()
    }

    pub fn summary(&self) -> Arc<StepSummary> {
        self.summary
            .get_or_init(|| {
                let o = &self.output;
                let scalar = |t: &Tensor<1>| t.clone().into_scalar::<f64>();
                let values = |t: &Tensor<2>| {
                    t.clone()
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .unwrap_or_default()
                };
                let look = o.lookahead.as_ref();
                Arc::new(StepSummary {
                    total: scalar(&o.total),
                    lm_loss: scalar(&o.lm_loss),
                    conf_loss: o.conf_loss.as_ref().map(scalar),
                    token_loss: values(&o.tokens.loss),
                    max_prob: values(&o.tokens.max_prob),
                    correct: values(&o.tokens.correct),
                    predicted: look.map(|l| values(&l.predicted)).unwrap_or_default(),
                    actual: look.map(|l| values(&l.actual)).unwrap_or_default(),
                    entropy: look.map(|l| values(&l.entropy)).unwrap_or_default(),
                })
            })
            .clone()
    }
}

impl ItemLazy for StepOutput {
    fn sync(self) -> Result<Self, ExecutionError> {
        self.output.total.device().flush()?;
        Ok(Self {
            output: self.output.without_autodiff(),
            summary: self.summary,
        })
    }
}

impl Adaptor<Arc<StepSummary>> for StepOutput {
    fn adapt(&self) -> Arc<StepSummary> {
        self.summary()
    }
}
