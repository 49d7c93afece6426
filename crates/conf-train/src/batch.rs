//! Training and evaluation batches: the windows plus the uniform draws that decide which token
//! the model samples at each position.
//!
//! Drawing the sampling noise on the host from `(seed, window index)` makes the lookahead a
//! pure function of the seed and the data position: reproducible, independent of anything else
//! that uses the device's generator, and exactly resumable.

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;
use burn::tensor::TensorData;
use conf_data::{Window, WindowBatcher};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Keeps the sampling noise independent of the window offsets drawn from the same seed.
const SAMPLING_STREAM_SALT: u64 = 0x5A4D_504C_494E_4721;

#[derive(Debug, Clone)]
pub struct LookaheadBatch {
    pub tokens: Tensor<2, Int>, // [B, L+2]
    pub uniforms: Tensor<2>,    // [B, L], U[0, 1)
}

#[derive(Debug, Clone, Copy)]
pub struct LookaheadBatcher {
    pub seed: u64,
}

impl LookaheadBatcher {
    /// The `L` uniforms of window `index`.
    pub fn uniforms(&self, index: usize, seq: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ SAMPLING_STREAM_SALT);
        rng.set_stream(index as u64);
        (0..seq).map(|_| rng.random::<f32>()).collect()
    }
}

impl Batcher<Window, LookaheadBatch> for LookaheadBatcher {
    fn batch(&self, items: Vec<Window>, device: &Device) -> LookaheadBatch {
        let rows = items.len();
        let seq = items.first().map_or(0, |w| w.tokens.len() - 2);
        let uniforms: Vec<f32> = items
            .iter()
            .flat_map(|w| self.uniforms(w.index, seq))
            .collect();
        LookaheadBatch {
            tokens: WindowBatcher.batch(items, device).tokens,
            uniforms: Tensor::from_data(TensorData::new(uniforms, [rows, seq]), device),
        }
    }
}
