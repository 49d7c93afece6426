//! What a training or evaluation step hands to burn-train's metrics: the objective's tensors,
//! read back to the host once, lazily, on the metrics thread, as the step's [`Samples`].

use std::sync::{Arc, OnceLock};

use burn::prelude::*;
use burn::train::ItemLazy;
use burn::train::metric::Adaptor;
use burn_std::ExecutionError;

use crate::metrics::Samples;
use crate::objective::ObjectiveOutput;

/// The step output of both models.
#[derive(Debug, Clone)]
pub struct StepOutput {
    output: ObjectiveOutput,
    samples: Arc<OnceLock<Arc<Samples>>>,
}

impl StepOutput {
    pub fn new(output: ObjectiveOutput) -> Self {
        Self {
            output,
            samples: Arc::new(OnceLock::new()),
        }
    }

    /// The LM loss tensor, still on the device.
    pub fn lm_loss(&self) -> Tensor<1> {
        self.output.lm_loss.clone()
    }

    /// Host copies of the step's per-token statistics and its loss.
    pub fn samples(&self) -> Arc<Samples> {
        self.samples
            .get_or_init(|| Arc::new(Samples::of_step(&self.output)))
            .clone()
    }
}

impl ItemLazy for StepOutput {
    fn sync(self) -> Result<Self, ExecutionError> {
        self.output.total.device().flush()?;
        Ok(Self {
            output: self.output.without_autodiff(),
            samples: self.samples,
        })
    }
}

impl Adaptor<Arc<Samples>> for StepOutput {
    fn adapt(&self) -> Arc<Samples> {
        self.samples()
    }
}
