//! Contiguous train/validation split, seeded training windows and fixed evaluation windows,
//! as Burn datasets, and the batcher that stacks them.
//!
//! Every window holds `L + 2` tokens: the confidence model reads `tokens_t = w[0..L]`,
//! `t+1 = w[1..L+1]` and `t+2 = w[2..L+2]`; the standard model reads the first `L + 1`. Both
//! models therefore see exactly the same tokens at every step.

use std::ops::Range;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::prelude::*;
use burn::tensor::TensorData;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::tokens::TokenStore;
use crate::{Corpus, DataError};

/// Token ranges of the two splits: validation is the last `val_fraction` of the corpus, never
/// windows drawn at random (overlapping windows would leak into both sides).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Range<usize>,
    pub val: Range<usize>,
}

impl Split {
    /// Splits `corpus` and checks that each side holds at least one window of `seq_len + 2`.
    pub fn contiguous(
        corpus: &Corpus,
        val_fraction: f64,
        seq_len: usize,
    ) -> Result<Self, DataError> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(DataError::ValFraction {
                value: val_fraction,
            });
        }
        let n = corpus.len();
        let val_len = (n as f64 * val_fraction).round() as usize;
        let split = Self {
            train: 0..n - val_len,
            val: n - val_len..n,
        };
        let needed = seq_len + 2;
        for (name, range) in [("train", &split.train), ("validation", &split.val)] {
            if range.len() < needed {
                return Err(DataError::SplitTooShort {
                    source_name: corpus.source.clone(),
                    split: name,
                    found: range.len(),
                    needed,
                    seq_len,
                });
            }
        }
        Ok(split)
    }
}

/// `L + 2` consecutive token ids and the window's index in its dataset (which seeds any
/// randomness tied to the window, such as sampling noise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub index: usize,
    pub tokens: Vec<u32>,
}

/// Training windows at seeded random offsets. Window `i` depends only on `(seed, i)`, so the
/// data order is the same for both models under one seed and a resumed run continues it.
#[derive(Debug, Clone)]
pub struct TrainWindows {
    tokens: Arc<TokenStore>,
    range: Range<usize>,
    window_len: usize,
    seed: u64,
    len: usize,
}

impl TrainWindows {
    /// `len` windows of `seq_len + 2` tokens from `range` (usually `steps × batch_size`).
    pub fn new(
        tokens: Arc<TokenStore>,
        range: Range<usize>,
        seq_len: usize,
        seed: u64,
        len: usize,
    ) -> Self {
        assert!(
            range.len() >= seq_len + 2,
            "Split::contiguous checks the length"
        );
        Self {
            tokens,
            range,
            window_len: seq_len + 2,
            seed,
            len,
        }
    }

    pub fn offset(&self, index: usize) -> usize {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index as u64);
        self.range.start + rng.random_range(0..=self.range.len() - self.window_len)
    }
}

impl Dataset<Window> for TrainWindows {
    fn get(&self, index: usize) -> Result<Window, DatasetError> {
        let start = self.offset(index);
        Ok(Window {
            index,
            tokens: self.tokens.slice(start..start + self.window_len),
        })
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// Non-overlapping evaluation windows tiling the validation split from its start.
#[derive(Debug, Clone)]
pub struct EvalWindows {
    tokens: Arc<TokenStore>,
    starts: Vec<usize>,
    window_len: usize,
}

impl EvalWindows {
    /// At most `max_windows` windows (all that fit when `None`).
    pub fn new(
        tokens: Arc<TokenStore>,
        range: Range<usize>,
        seq_len: usize,
        max_windows: Option<usize>,
    ) -> Self {
        let window_len = seq_len + 2;
        let fit = range.len() / window_len;
        let count = max_windows.map_or(fit, |m| m.min(fit));
        let starts = (0..count).map(|k| range.start + k * window_len).collect();
        Self {
            tokens,
            starts,
            window_len,
        }
    }

    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// The context length L the windows were cut for.
    pub fn seq_len(&self) -> usize {
        self.window_len - 2
    }
}

impl Dataset<Window> for EvalWindows {
    fn get(&self, index: usize) -> Result<Window, DatasetError> {
        let start = self.starts[index];
        Ok(Window {
            index,
            tokens: self.tokens.slice(start..start + self.window_len),
        })
    }

    fn len(&self) -> usize {
        self.starts.len()
    }
}

/// A batch of windows.
#[derive(Debug, Clone)]
pub struct WindowBatch {
    pub tokens: Tensor<2, Int>, // [B, L+2]
}

/// Stacks windows into one `[B, L+2]` id tensor.
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowBatcher;

impl Batcher<Window, WindowBatch> for WindowBatcher {
    fn batch(&self, items: Vec<Window>, device: &Device) -> WindowBatch {
        let rows = items.len();
        let cols = items.first().map_or(0, |w| w.tokens.len());
        let ids: Vec<i64> = items
            .iter()
            .flat_map(|w| w.tokens.iter().map(|&t| t as i64))
            .collect();
        WindowBatch {
            tokens: Tensor::from_data(TensorData::new(ids, [rows, cols]), device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::TokenizerSpec;

    fn counting_corpus(n: usize) -> Corpus {
        Corpus {
            source: "counting".into(),
            tokens: Arc::new(TokenStore::Owned((0..n as u32).collect())),
            tokenizer: TokenizerSpec::Byte,
            oracle: None,
        }
    }

    #[test]
    fn split_is_contiguous_with_validation_last() {
        let corpus = counting_corpus(1000);
        let split = Split::contiguous(&corpus, 0.1, 16).unwrap();
        assert_eq!(split.train, 0..900);
        assert_eq!(split.val, 900..1000);
    }

    #[test]
    fn a_split_shorter_than_one_window_names_the_split_and_the_numbers() {
        let corpus = counting_corpus(100);
        let err = Split::contiguous(&corpus, 0.1, 16).unwrap_err().to_string();
        assert!(
            err.contains("counting")
                && err.contains("validation")
                && err.contains("10 tokens")
                && err.contains("18"),
            "{err}"
        );
        let err = Split::contiguous(&corpus, 1.5, 16).unwrap_err().to_string();
        assert!(err.contains("val_fraction") && err.contains("1.5"), "{err}");
    }

    #[test]
    fn training_windows_are_seeded_in_range_and_consecutive() {
        let corpus = counting_corpus(10_000);
        let split = Split::contiguous(&corpus, 0.1, 32).unwrap();
        let a = TrainWindows::new(corpus.tokens.clone(), split.train.clone(), 32, 42, 500);
        let b = TrainWindows::new(corpus.tokens.clone(), split.train.clone(), 32, 42, 500);
        let c = TrainWindows::new(corpus.tokens.clone(), split.train.clone(), 32, 43, 500);
        let offsets = |w: &TrainWindows| (0..500).map(|i| w.offset(i)).collect::<Vec<_>>();
        assert_eq!(offsets(&a), offsets(&b));
        assert_ne!(offsets(&a), offsets(&c));
        for i in 0..500 {
            let w = a.get(i).unwrap().tokens;
            assert_eq!(w.len(), 34);
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
            assert!((*w.last().unwrap() as usize) < split.train.end);
        }
        // Offsets cover the split rather than clustering.
        let distinct: std::collections::BTreeSet<_> = offsets(&a).into_iter().collect();
        assert!(distinct.len() > 450);
        let max = offsets(&a).into_iter().max().unwrap();
        assert!(max > 8000, "{max}");
    }

    #[test]
    fn eval_windows_tile_the_validation_split_without_overlap() {
        let corpus = counting_corpus(10_000);
        let split = Split::contiguous(&corpus, 0.1, 30).unwrap();
        let eval = EvalWindows::new(corpus.tokens.clone(), split.val.clone(), 30, None);
        assert_eq!(eval.len(), 1000 / 32);
        assert_eq!(eval.starts()[0], 9000);
        assert!(eval.starts().windows(2).all(|s| s[1] - s[0] == 32));
        assert_eq!(
            EvalWindows::new(corpus.tokens, split.val, 30, Some(5)).len(),
            5
        );
    }

    #[test]
    fn the_batcher_stacks_windows_row_by_row() {
        let windows = vec![
            Window {
                index: 0,
                tokens: vec![1, 2, 3, 4],
            },
            Window {
                index: 1,
                tokens: vec![5, 6, 7, 8],
            },
        ];
        let batch = WindowBatcher.batch(windows, &Device::flex());
        assert_eq!(batch.tokens.dims(), [2, 4]);
        let ids: Vec<i64> = batch.tokens.into_data().try_into_vec_as::<i64>().unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
