//! Kernels over rows of logits, one row per token across the vocabulary: the cross-entropy and
//! its backward, the statistics the metrics read, and sampling by the inverse CDF, parallel
//! over rows. With GPT-2's 50,257 tokens these rows are the step's largest tensors, where
//! Burn's chains of element-wise operations over `[B, T, V]` cost more than the products.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::kernels::{rows_per_task, uninit, written};
use super::math;

/// Each row's cross-entropy against its target, `ln Σ eˣ − x[target]`, and its log-sum-exp
/// (what the backward reads).
pub fn cross_entropy(x: &[f32], targets: &[usize], len: usize) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), targets.len() * len, "one target per row of {len}");
    x.par_chunks(len)
        .zip(targets)
        .with_min_len(rows_per_task(len))
        .map(|(x, &target)| {
            let lse = math::log_sum_exp(x);
            (lse - x[target], lse)
        })
        .unzip()
}

/// The gradient of [`cross_entropy`]'s rows from theirs: `g · (softmax(x) − onehot(target))`.
pub fn cross_entropy_backward(
    x: &[f32],
    targets: &[usize],
    lse: &[f32],
    grad: &[f32],
    len: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), targets.len() * len, "one target per row of {len}");
    assert_eq!((lse.len(), grad.len()), (targets.len(), targets.len()));
    let rows = rows_per_task(len);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let per_row = targets.par_chunks(rows).zip(lse.par_chunks(rows));
        out.par_chunks_mut(rows * len)
            .zip(x.par_chunks(rows * len))
            .zip(per_row.zip(grad.par_chunks(rows)))
            .for_each(|((out, x), ((targets, lse), grad))| {
                let rows = out.chunks_mut(len).zip(x.chunks(len));
                for ((out, x), ((&t, &lse), &g)) in rows.zip(targets.iter().zip(lse).zip(grad)) {
                    math::cross_entropy_backward_row(x, t, lse, g, out);
                }
            })
    };
    // SAFETY: `fill` writes every row of the output (its chunks zip the whole output with
    // inputs of the asserted lengths).
    unsafe { written(uninit(x.len()), fill) }
}

/// Per row: the cross-entropy, the largest probability, whether the most probable token (the
/// first of equals) is the target (1 or 0), and the entropy of the softmax, in nats.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    pub loss: Vec<f32>,
    pub max_prob: Vec<f32>,
    pub correct: Vec<f32>,
    pub entropy: Vec<f32>,
}

pub fn statistics(x: &[f32], targets: &[usize], len: usize) -> Statistics {
    assert_eq!(x.len(), targets.len() * len, "one target per row of {len}");
    let rows: Vec<[f32; 4]> = x
        .par_chunks(len)
        .zip(targets)
        .with_min_len(rows_per_task(len))
        .map(|(x, &target)| {
            let m = math::max(x);
            let argmax = x.iter().position(|&v| v == m).unwrap_or(0);
            // With s = Σ e^(x − m) and w = Σ e^(x − m)(x − m): ln Σ eˣ = m + ln s, the largest
            // probability 1 / s, the entropy −Σ p ln p = ln s − w / s.
            let (s, w) = math::exp_moments(x, m);
            let ln_s = s.ln();
            let correct = if argmax == target { 1.0 } else { 0.0 };
            [m + ln_s - x[target], 1.0 / s, correct, ln_s - w / s]
        })
        .collect();
    let column = |k: usize| rows.iter().map(|r| r[k]).collect();
    Statistics {
        loss: column(0),
        max_prob: column(1),
        correct: column(2),
        entropy: column(3),
    }
}

/// One draw per row from `softmax(x)` at the row's uniform `u` in [0, 1): the first token
/// whose cumulative probability reaches `u` (the last token if rounding leaves them all
/// below).
pub fn sample(x: &[f32], uniforms: &[f32], len: usize) -> Vec<i64> {
    assert_eq!(
        x.len(),
        uniforms.len() * len,
        "one uniform per row of {len}"
    );
    x.par_chunks(len)
        .zip(uniforms)
        .with_min_len(rows_per_task(len))
        .map_init(Vec::new, |exps, (x, &u)| {
            exps.resize(len, 0.0);
            let total = math::exp_shifted(x, math::max(x), exps);
            math::first_reaching(exps, u * total) as i64
        })
        .collect()
}
