//! Helpers shared by the tests of every crate (feature `test-util`).

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::Distribution;

/// Adds N(0, std²) noise to every parameter, so that zero-initialised parts (the
/// AdaptiveLayers' modulation) take part in a comparison.
pub struct Perturb {
    pub std: f64,
}

impl ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let std = self.std;
        param.map(|t| {
            let tracked = t.is_require_grad();
            let noise = Tensor::random(t.shape(), Distribution::Normal(0.0, std), &t.device());
            // A perturbed parameter is still a leaf, with a gradient of its own when trained.
            (t + noise).detach().set_require_grad(tracked)
        })
    }
}
