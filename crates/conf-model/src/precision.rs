//! The float precision of the models' matrix products (`--precision`).
//!
//! Parameters, their gradients and the optimizer's state are f32 in every precision, as are
//! the LayerNorms and AdaptiveLayers, the losses and the confidence head. `bf16` gives the
//! Linears' and the tied LM head's products bf16 operands and returns their results as f32
//! (on libtorch bf16 where the consumer takes bf16: q, k, v, and the MLP's hidden layer):
//! these products are the bulk of the model's FLOPs (`12·d²` per token and layer against the
//! attention's `2·L·d`), and on a GPU their bf16 operands run on the tensor cores, which
//! accumulate in f32. On libtorch `bf16` gives the attention bf16 q, k and v too: PyTorch's
//! fused kernels keep the softmax statistics and the accumulations in f32, and an f32
//! attention, off the tensor cores, would take a GPU as long as all the bf16 Linears together
//! at the gpu preset. Elsewhere the attention stays f32 (Burn's decomposed softmax would run
//! in bf16). `tf32` keeps f32 tensors and lets the GPU's f32 matrix products use TF32 tensor
//! cores (a backend switch, docs/backends.md).

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::DType;
use serde::{Deserialize, Serialize};

use crate::fused;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    pub const ALL: [Self; 3] = [Self::F32, Self::Tf32, Self::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
        }
    }

    /// `lhs · rhs` over the last two dimensions (equal batch dimensions), f32 in and out; with
    /// `bf16`, on bf16 operands.
    pub fn matmul<const D: usize>(self, lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
        match self {
            Self::F32 | Self::Tf32 => fused::matmul(lhs, rhs),
            Self::Bf16 => lhs
                .cast(DType::BF16)
                .matmul(rhs.cast(DType::BF16))
                .cast(DType::F32),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown precision '{s}' (expected f32, tf32 or bf16)"))
    }
}
