//! The fused operations on contiguous f32 slices, forward and backward, parallel over rows (or
//! blocks of elements) on rayon's global pool, the one flex's own kernels use.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::math;

/// Elements per parallel task: enough work to outweigh a task's cost, small enough that the
/// step's tensors (0.25M–1M elements) split across every core.
pub(super) const TASK_ELEMENTS: usize = 16 * 1024;

/// Rows per parallel task for rows of `len` elements.
pub(super) fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1)
}

/// `n` floats for a kernel to write, without the zeroing pass `vec![0.0; n]` would make over
/// outputs of 1–4 MB (the memsets of the profile).
pub(super) fn uninit(n: usize) -> Box<[MaybeUninit<f32>]> {
    Box::new_uninit_slice(n)
}

/// The buffer once `write` has written every element.
///
/// # Safety
/// `write` must assign every element of the buffer (each kernel zips the output with inputs
/// whose lengths it asserts equal, and the softmax writes its hidden keys' zeros).
pub(super) unsafe fn written(
    mut buf: Box<[MaybeUninit<f32>]>,
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    write(&mut buf);
    // SAFETY: the caller's `write` assigned every element.
    unsafe { buf.assume_init() }.into_vec()
}

/// `x · Φ(x)`, Φ the standard normal CDF (within 3e-7, [`math::normal_cdf_and_density`]).
pub fn gelu(x: &[f32]) -> Vec<f32> {
    let fill = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(TASK_ELEMENTS)
            .zip(x.par_chunks(TASK_ELEMENTS))
            .for_each(|(out, x)| {
                math::gelu(x, out);
            })
    };
    // SAFETY: `fill` writes every element (its chunks zip the whole output with inputs of
    // the asserted lengths).
    unsafe { written(uninit(x.len()), fill) }
}

/// `grad · (Φ(x) + x · φ(x))`.
pub fn gelu_backward(x: &[f32], grad: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), grad.len());
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let inputs = x
            .par_chunks(TASK_ELEMENTS)
            .zip(grad.par_chunks(TASK_ELEMENTS));
        out.par_chunks_mut(TASK_ELEMENTS)
            .zip(inputs)
            .for_each(|(out, (x, grad))| {
                math::gelu_backward(x, grad, out);
            })
    };
    // SAFETY: `fill` writes every element (its chunks zip the whole output with inputs of
    // the asserted lengths).
    unsafe { written(uninit(x.len()), fill) }
}

/// Each row of `len` normalised to mean 0 and (biased) variance 1: returns the output and
/// each row's `1 / sqrt(var + eps)`, which the backward pass needs.
pub fn normalise(x: &[f32], len: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len() % len, 0, "{} values are not rows of {len}", x.len());
    let mut inv_std = vec![0.0; x.len() / len];
    let rows = rows_per_task(len);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(rows * len)
            .zip(inv_std.par_chunks_mut(rows))
            .zip(x.par_chunks(rows * len))
            .for_each(|((out, inv_std), x)| {
                for ((out, inv), x) in out.chunks_mut(len).zip(inv_std).zip(x.chunks(len)) {
                    *inv = math::normalise_row(x, eps, out);
                }
            })
    };
    // SAFETY: `fill` writes every element (its chunks zip the whole output with inputs of
    // the asserted lengths).
    let out = unsafe { written(uninit(x.len()), fill) };
    (out, inv_std)
}

/// Gradient of [`normalise`] from its output `y`, its rows' `inv_std` and the output's
/// gradient: `inv_std · (g − mean(g) − y · mean(g · y))` per row.
pub fn normalise_backward(y: &[f32], inv_std: &[f32], grad: &[f32], len: usize) -> Vec<f32> {
    assert_eq!((grad.len(), inv_std.len() * len), (y.len(), y.len()));
    let rows = rows_per_task(len);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let inputs = y.par_chunks(rows * len).zip(grad.par_chunks(rows * len));
        out.par_chunks_mut(rows * len)
            .zip(inv_std.par_chunks(rows))
            .zip(inputs)
            .for_each(|((out, inv_std), (y, grad))| {
                let rows = out.chunks_mut(len).zip(inv_std);
                for ((out, &inv), (y, g)) in rows.zip(y.chunks(len).zip(grad.chunks(len))) {
                    math::normalise_backward_row(y, g, inv, out);
                }
            })
    };
    // SAFETY: `fill` writes every element (its chunks zip the whole output with inputs of
    // the asserted lengths).
    unsafe { written(uninit(y.len()), fill) }
}

/// The AdaptiveLayer: each row of `len` normalised, then `x̂ · (1 + c·w_s + b_s) + c·w_h + b_h`
/// with one confidence `c` per row and `w = [w_s | w_h]`, `b = [b_s | b_h]` of `2·len`.
/// Returns the output and what the backward pass reads: `x̂` and each row's `1 / std`.
pub fn adaptive_norm(
    x: &[f32],
    c: &[f32],
    w: &[f32],
    b: &[f32],
    len: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(c.len() * len, x.len());
    let mut inv_std = vec![0.0; c.len()];
    let mut normalised = uninit(x.len());
    let rows = rows_per_task(len);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(rows * len)
            .zip(normalised.par_chunks_mut(rows * len))
            .zip(inv_std.par_chunks_mut(rows))
            .zip(x.par_chunks(rows * len).zip(c.par_chunks(rows)))
            .for_each(|(((out, normalised), inv_std), (x, c))| {
                adaptive_norm_rows(x, c, w, b, eps, out, normalised, inv_std);
            })
    };
    // SAFETY: `fill` writes every element of the output, and `adaptive_norm_rows` every
    // element of `normalised` (their chunks zip them whole with inputs of asserted lengths).
    let out = unsafe { written(uninit(x.len()), fill) };
    let normalised = unsafe { normalised.assume_init() }.into_vec();
    (out, normalised, inv_std)
}

/// [`adaptive_norm`] over the whole rows of `x` on this thread, into `out`, `normalised` (`x̂`)
/// and `inv_std`: each row normalised, then modulated while it is in cache.
#[allow(clippy::too_many_arguments)]
pub fn adaptive_norm_rows(
    x: &[f32],
    c: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
    normalised: &mut [MaybeUninit<f32>],
    inv_std: &mut [f32],
) {
    let len = w.len() / 2;
    assert_eq!(
        (
            c.len() * len,
            out.len(),
            normalised.len(),
            inv_std.len(),
            b.len()
        ),
        (x.len(), x.len(), x.len(), c.len(), w.len())
    );
    let rows = out.chunks_mut(len).zip(normalised.chunks_mut(len));
    for (((out, xhat), inv), (x, &c)) in rows.zip(inv_std).zip(x.chunks(len).zip(c)) {
        *inv = math::normalise_row(x, eps, xhat);
        // SAFETY: `normalise_row` has just written every element of the row.
        let xhat = unsafe { &*(xhat as *const [MaybeUninit<f32>] as *const [f32]) };
        math::modulate_row(xhat, c, w, b, out);
    }
}

/// Gradients of [`adaptive_norm`] for `x`, `c`, `w` and `b` from `x̂`, `1 / std`, the inputs
/// and the output's gradient. The parameter gradients are sums over rows: each task sums its
/// rows, and the tasks' sums are added in order, so the result does not depend on which
/// thread ran what.
pub struct AdaptiveNormGrads {
    pub x: Vec<f32>,
    pub c: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

pub fn adaptive_norm_backward(
    xhat: &[f32],
    inv_std: &[f32],
    c: &[f32],
    w: &[f32],
    b: &[f32],
    grad: &[f32],
    len: usize,
) -> AdaptiveNormGrads {
    assert_eq!(c.len() * len, xhat.len());
    let rows = rows_per_task(len);
    let mut dc = vec![0.0; c.len()];
    let mut partials: Vec<Vec<f32>> = Vec::new();
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        partials = dx
            .par_chunks_mut(rows * len)
            .zip(dc.par_chunks_mut(rows))
            .zip(xhat.par_chunks(rows * len).zip(grad.par_chunks(rows * len)))
            .zip(c.par_chunks(rows).zip(inv_std.par_chunks(rows)))
            .map(|(((dx, dc), (xhat, grad)), (c, inv_std))| {
                let mut sums = vec![0.0; 4 * len];
                adaptive_norm_backward_rows(xhat, inv_std, c, w, b, grad, dx, dc, &mut sums);
                sums
            })
            .collect();
    };
    // SAFETY: `fill` writes every element (its chunks zip the whole output with inputs of
    // the asserted lengths).
    let dx = unsafe { written(uninit(xhat.len()), fill) };
    let mut sums = vec![0.0; 4 * len];
    for partial in &partials {
        sums.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
    }
    let db = sums.split_off(2 * len);
    AdaptiveNormGrads {
        x: dx,
        c: dc,
        w: sums,
        b: db,
    }
}

/// [`adaptive_norm_backward`] over whole rows on this thread: writes `dx` and `dc`, and adds
/// the rows' parameter gradients to `sums = [dw_s | dw_h | db_s | db_h]`.
#[allow(clippy::too_many_arguments)]
pub fn adaptive_norm_backward_rows(
    xhat: &[f32],
    inv_std: &[f32],
    c: &[f32],
    w: &[f32],
    b: &[f32],
    grad: &[f32],
    dx: &mut [MaybeUninit<f32>],
    dc: &mut [f32],
    sums: &mut [f32],
) {
    let len = w.len() / 2;
    assert_eq!(
        (
            grad.len(),
            dx.len(),
            c.len() * len,
            inv_std.len(),
            dc.len(),
            sums.len()
        ),
        (
            xhat.len(),
            xhat.len(),
            xhat.len(),
            c.len(),
            c.len(),
            4 * len
        )
    );
    let mut scratch = vec![0.0; 2 * len];
    let rows = dx.chunks_mut(len).zip(dc);
    let inputs = xhat
        .chunks(len)
        .zip(grad.chunks(len))
        .zip(c.iter().zip(inv_std));
    for ((dx, dc), ((xhat, g), (&c, &inv))) in rows.zip(inputs) {
        *dc = math::modulate_backward_row(xhat, g, c, inv, w, b, &mut scratch, sums, dx);
    }
}

/// LayerNorm's backward over whole rows on this thread, from its input `x`, each row's mean
/// and `1 / std`, the gain `γ` and the output's gradient: writes `dx` and adds the rows'
/// `[dγ | dβ]` to `sums`. For the tch backends' CPU path (flex's LayerNorm is the fused
/// normalisation followed by Burn's affine operations).
#[cfg(feature = "tch")]
pub fn layer_norm_backward_rows(
    x: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    grad: &[f32],
    dx: &mut [MaybeUninit<f32>],
    sums: &mut [f32],
) {
    let len = gamma.len();
    assert_eq!(
        (
            grad.len(),
            dx.len(),
            mean.len() * len,
            inv_std.len(),
            sums.len()
        ),
        (x.len(), x.len(), x.len(), mean.len(), 2 * len)
    );
    let mut scratch = vec![0.0; 2 * len];
    let inputs = x.chunks(len).zip(grad.chunks(len));
    for ((dx, (x, g)), (&mean, &inv)) in
        dx.chunks_mut(len).zip(inputs).zip(mean.iter().zip(inv_std))
    {
        math::layer_norm_backward_row(x, g, mean, inv, gamma, &mut scratch, sums, dx);
    }
}

/// Softmax of each row of `keys` scores; rows are queries, `queries` per head. With `causal`,
/// query i sees keys `0..=i + keys − queries` and the rest get 0.
pub fn attention_softmax(x: &[f32], keys: usize, queries: usize, causal: bool) -> Vec<f32> {
    assert!(
        !causal || keys >= queries,
        "causal attention: {keys} keys for {queries} queries"
    );
    assert_eq!(
        x.len() % (keys * queries),
        0,
        "scores are not [.., {queries}, {keys}]"
    );
    // One head's block of rows per call: its first query sees `seen(0, ..)` keys.
    let head = queries * keys;
    let fill = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(head)
            .zip(x.par_chunks(head))
            .for_each(|(out, x)| {
                math::softmax_rows(x, keys, seen(0, queries, keys, causal), out);
            })
    };
    // SAFETY: `fill` writes every element: each row's seen keys from the exponentials and its
    // hidden keys' zeros.
    unsafe { written(uninit(x.len()), fill) }
}

/// The keys query `i` of `queries` sees among `keys`: with `causal`, the cached keys (the
/// first `keys − queries`) and its own and earlier ones; all of them otherwise.
pub fn seen(i: usize, queries: usize, keys: usize, causal: bool) -> usize {
    if causal { i + keys - queries + 1 } else { keys }
}

/// Gradient of a softmax row from its output `p` and the output's gradient:
/// `p · (g − Σ p · g)`; hidden keys (p = 0) get 0.
pub fn softmax_backward(p: &[f32], grad: &[f32], keys: usize) -> Vec<f32> {
    assert_eq!(p.len(), grad.len());
    let rows = rows_per_task(keys);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let inputs = p.par_chunks(rows * keys).zip(grad.par_chunks(rows * keys));
        out.par_chunks_mut(rows * keys)
            .zip(inputs)
            .for_each(|(out, (p, grad))| {
                let rows = out
                    .chunks_mut(keys)
                    .zip(p.chunks(keys).zip(grad.chunks(keys)));
                for (out, (p, g)) in rows {
                    math::softmax_backward_row(p, g, out);
                }
            })
    };
    // SAFETY: `fill` writes every element (its chunks zip the whole output with inputs of
    // the asserted lengths).
    unsafe { written(uninit(p.len()), fill) }
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
