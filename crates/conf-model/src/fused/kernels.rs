//! The fused operations on contiguous f32 slices, forward and backward, parallel over rows (or
//! blocks of elements) on rayon's global pool, the one flex's own kernels use.

use rayon::prelude::*;

/// Elements per parallel task: enough work to outweigh a task's cost, small enough that the
/// step's tensors (0.25M–1M elements) split across every core.
const TASK_ELEMENTS: usize = 16 * 1024;

/// Rows per parallel task for rows of `len` elements.
fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `x · Φ(x)`, Φ the standard normal CDF through erf.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(TASK_ELEMENTS)
        .zip(x.par_chunks(TASK_ELEMENTS))
        .for_each(|(out, x)| {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * normal_cdf(v);
            }
        });
    out
}

/// `grad · (Φ(x) + x · φ(x))`.
pub fn gelu_backward(x: &[f32], grad: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(TASK_ELEMENTS)
        .zip(
            x.par_chunks(TASK_ELEMENTS)
                .zip(grad.par_chunks(TASK_ELEMENTS)),
        )
        .for_each(|(out, (x, grad))| {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
                let density = FRAC_1_SQRT_2PI * (-0.5 * v * v).exp();
                *o = g * (normal_cdf(v) + v * density);
            }
        });
    out
}

fn normal_cdf(v: f32) -> f32 {
    0.5 * (1.0 + libm::erff(v * FRAC_1_SQRT_2))
}

/// Each row of `len` normalised to mean 0 and (biased) variance 1: returns the output and
/// each row's `1 / sqrt(var + eps)`, which the backward pass needs.
pub fn normalise(x: &[f32], len: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; x.len()];
    let mut inv_std = vec![0.0; x.len() / len];
    let rows = rows_per_task(len);
    out.par_chunks_mut(rows * len)
        .zip(inv_std.par_chunks_mut(rows))
        .zip(x.par_chunks(rows * len))
        .for_each(|((out, inv_std), x)| {
            for ((out, inv), x) in out.chunks_mut(len).zip(inv_std).zip(x.chunks(len)) {
                let mean = x.iter().sum::<f32>() / len as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / len as f32;
                *inv = 1.0 / (var + eps).sqrt();
                for (o, v) in out.iter_mut().zip(x) {
                    *o = (v - mean) * *inv;
                }
            }
        });
    (out, inv_std)
}

/// Gradient of [`normalise`] from its output `y`, its rows' `inv_std` and the output's
/// gradient: `inv_std · (g − mean(g) − y · mean(g · y))` per row.
pub fn normalise_backward(y: &[f32], inv_std: &[f32], grad: &[f32], len: usize) -> Vec<f32> {
    let mut out = vec![0.0; y.len()];
    let rows = rows_per_task(len);
    out.par_chunks_mut(rows * len)
        .zip(inv_std.par_chunks(rows))
        .zip(y.par_chunks(rows * len).zip(grad.par_chunks(rows * len)))
        .for_each(|((out, inv_std), (y, grad))| {
            let rows = out
                .chunks_mut(len)
                .zip(inv_std)
                .zip(y.chunks(len).zip(grad.chunks(len)));
            for ((out, inv), (y, g)) in rows {
                let mean_g = g.iter().sum::<f32>() / len as f32;
                let mean_gy = g.iter().zip(y).map(|(g, y)| g * y).sum::<f32>() / len as f32;
                for ((o, g), y) in out.iter_mut().zip(g).zip(y) {
                    *o = inv * (g - mean_g - y * mean_gy);
                }
            }
        });
    out
}

/// Softmax of each row of `keys` scores; rows are queries, `queries` per head. With `causal`,
/// query i sees keys `0..=i + keys − queries` and the rest get 0.
pub fn attention_softmax(x: &[f32], keys: usize, queries: usize, causal: bool) -> Vec<f32> {
    assert!(
        !causal || keys >= queries,
        "causal attention: {keys} keys for {queries} queries"
    );
    let mut out = vec![0.0; x.len()];
    let rows = rows_per_task(keys);
    out.par_chunks_mut(rows * keys)
        .zip(x.par_chunks(rows * keys))
        .enumerate()
        .for_each(|(task, (out, x))| {
            for (r, (out, x)) in out.chunks_mut(keys).zip(x.chunks(keys)).enumerate() {
                let query = (task * rows + r) % queries;
                let seen = if causal {
                    query + keys - queries + 1
                } else {
                    keys
                };
                let max = x[..seen].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0.0;
                for (o, v) in out[..seen].iter_mut().zip(x) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                out[..seen].iter_mut().for_each(|o| *o *= inv);
                // Hidden keys stay at the buffer's zero.
            }
        });
    out
}

/// Gradient of a softmax row from its output `p` and the output's gradient:
/// `p · (g − Σ p · g)`; hidden keys (p = 0) get 0.
pub fn softmax_backward(p: &[f32], grad: &[f32], keys: usize) -> Vec<f32> {
    let mut out = vec![0.0; p.len()];
    let rows = rows_per_task(keys);
    out.par_chunks_mut(rows * keys)
        .zip(p.par_chunks(rows * keys).zip(grad.par_chunks(rows * keys)))
        .for_each(|(out, (p, grad))| {
            for (out, (p, g)) in out
                .chunks_mut(keys)
                .zip(p.chunks(keys).zip(grad.chunks(keys)))
            {
                let dot = p.iter().zip(g).map(|(p, g)| p * g).sum::<f32>();
                for ((o, p), g) in out.iter_mut().zip(p).zip(g) {
                    *o = p * (g - dot);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_causal_softmax_hides_the_keys_after_each_query_and_its_rows_sum_to_one() {
        // Two queries over three keys (one cached): query 0 sees keys 0..=1, query 1 all three.
        let x = [1.0, 2.0, 3.0, 0.5, 0.5, 0.5];
        let p = attention_softmax(&x, 3, 2, true);
        let e = (1.0f32).exp();
        assert!((p[0] - 1.0 / (1.0 + e)).abs() < 1e-6);
        assert!((p[1] - e / (1.0 + e)).abs() < 1e-6);
        assert_eq!(p[2], 0.0);
        for v in &p[3..] {
            assert!((v - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn normalised_rows_have_mean_zero_and_unit_variance() {
        let x: Vec<f32> = (0..64)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
            .collect();
        let (y, inv_std) = normalise(&x, 16, 1e-5);
        assert_eq!(inv_std.len(), 4);
        for row in y.chunks(16) {
            let mean = row.iter().sum::<f32>() / 16.0;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 16.0;
            assert!(mean.abs() < 1e-5, "mean {mean}");
            assert!((var - 1.0).abs() < 1e-3, "variance {var}");
        }
    }
}
