//! The GPT initialisation: N(0, 0.02) weights, zero biases; and noise on top of it.

use burn::module::{ModuleMapper, Param};
use burn::nn::{Embedding, Initializer, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;

pub const INIT_STD: f64 = 0.02;

fn normal() -> Initializer {
    Initializer::Normal {
        mean: 0.0,
        std: INIT_STD,
    }
}

/// `Linear(d_in → d_out)` with N(0, 0.02) weights and a zero bias (burn's own initializer
/// would draw the bias from the weight distribution).
pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    Linear {
        weight: normal().init([d_in, d_out], device),
        bias: bias.then(|| Initializer::Zeros.init([d_out], device)),
    }
}

/// A linear layer that starts as the zero map, weights and bias alike.
pub fn zero_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    Linear {
        weight: Initializer::Zeros.init([d_in, d_out], device),
        bias: Some(Initializer::Zeros.init([d_out], device)),
    }
}

pub fn embedding(n: usize, d: usize, device: &Device) -> Embedding {
    Embedding {
        weight: normal().init([n, d], device),
    }
}

/// Adds N(0, std²) noise to every parameter, so that the parts initialised to zero (the
/// AdaptiveLayers' modulation, the biases) take part when two computations are compared.
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
