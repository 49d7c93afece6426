//! The GPT initialisation: N(0, 0.02) weights, zero biases.

use burn::nn::{Embedding, Initializer, Linear};
use burn::prelude::*;

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
