//! Attention per batch element and head, forward and backward, in one parallel pass each:
//! `softmax(scale · q·kᵀ, causal) · v` with the scores, the softmax and both products of a head
//! in cache, instead of `[B, H, S, K]` tensors written and read by separate operations.
//!
//! Heads are read in place from their strided views (`[B, S, H, dh]` memory seen as
//! `[B, H, S, dh]`), and the output and the gradients are written in that same layout, so that
//! merging or splitting heads around the attention copies nothing.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use super::kernels::{seen, uninit};
use super::math;
use super::products::{Matrices, Matrix, product_into};

/// The inputs of one attention: stacks of `B · H` matrices (batch-major), `q: [S, dh]`,
/// `k`, `v: [K, dh]`.
pub struct Heads<'a> {
    pub q: Matrices<'a>,
    pub k: Matrices<'a>,
    pub v: Matrices<'a>,
    pub heads: usize,
    pub scale: f32,
    pub causal: bool,
}

impl Heads<'_> {
    /// (batch, heads, queries, keys, head dimension), checked consistent.
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let (q, k, v) = (&self.q, &self.k, &self.v);
        let (heads, queries, keys, dh) = (self.heads, q.rows, k.rows, q.cols);
        assert!(
            heads > 0 && q.len().is_multiple_of(heads),
            "attention: heads do not divide the stack"
        );
        assert_eq!(
            (k.len(), v.len()),
            (q.len(), q.len()),
            "attention: stacks differ"
        );
        assert_eq!(
            (k.cols, v.rows, v.cols),
            (dh, keys, dh),
            "attention: shapes differ"
        );
        assert!(
            keys > 0 && queries > 0 && dh > 0,
            "attention without queries, keys or width"
        );
        assert!(
            !self.causal || keys >= queries,
            "causal attention: {keys} keys for {queries} queries"
        );
        (q.len() / heads, heads, queries, keys, dh)
    }
}

/// The element count of a buffer of these dimensions; panics on overflow rather than size a
/// buffer smaller than what the kernels write.
fn size(dims: &[usize]) -> usize {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .expect("attention: buffer size overflows")
}

/// `[rows, H, dh]` memory of one batch element as head `h`'s `rows × dh` block.
fn head_block(chunk: &mut [MaybeUninit<f32>], h: usize, dh: usize) -> &mut [MaybeUninit<f32>] {
    &mut chunk[h * dh..]
}

/// A fully written stretch of an output buffer, read back.
///
/// # Safety
/// Every element of `x` must have been written.
unsafe fn assume_written(x: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller wrote every element.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) }
}

/// Forward: the output in `[B, S, H, dh]` memory and, with `keep_probs`, the softmax
/// probabilities `[B, H, S, K]` the backward reads (empty without).
pub fn forward(heads: &Heads, keep_probs: bool) -> (Vec<f32>, Vec<f32>) {
    let (batch, n_heads, queries, keys, dh) = heads.dims();
    let per_head = queries * keys;
    let mut out = uninit(size(&[batch, queries, n_heads, dh]));
    let mut probs = uninit(if keep_probs {
        size(&[batch, n_heads, queries, keys])
    } else {
        0
    });
    // Head h of batch element b: its probabilities into `p`, its output block into `out`.
    let head = |(b, h): (usize, usize),
                scores: &mut Vec<f32>,
                out: &mut [MaybeUninit<f32>],
                p: &mut [MaybeUninit<f32>]| {
        let i = b * n_heads + h;
        let (q, k) = (heads.q.get(i), heads.k.get(i));
        // SAFETY: gemm writes only floats into the scores.
        let scores_out = unsafe { as_uninit(scores) };
        product_into(scores_out, keys, q, k.t(), heads.scale, Parallelism::None);
        math::softmax_rows(scores, keys, seen(0, queries, keys, heads.causal), p);
        // SAFETY: `softmax_rows` wrote every element of every row of `p`.
        let p = Matrix::dense(unsafe { assume_written(p) }, queries, keys);
        let dst = head_block(out, h, dh);
        product_into(dst, n_heads * dh, p, heads.v.get(i), 1.0, Parallelism::None);
    };
    let scratch = || vec![0.0f32; per_head];
    let out_chunks = out.par_chunks_mut(queries * n_heads * dh).enumerate();
    if keep_probs {
        out_chunks
            .zip(probs.par_chunks_mut(n_heads * per_head))
            .for_each_init(scratch, |scratch, ((b, out), probs)| {
                for (h, p) in probs.chunks_mut(per_head).enumerate() {
                    head((b, h), scratch, out, p);
                }
            });
    } else {
        out_chunks.for_each_init(
            || (scratch(), uninit(per_head)),
            |(scratch, p), (b, out)| {
                for h in 0..n_heads {
                    head((b, h), scratch, out, p);
                }
            },
        );
    }
    // SAFETY: every batch element's heads wrote their probabilities when kept (every row)
    // and their `queries × dh` output blocks, which tile the `[S, H, dh]` chunk.
    unsafe { (out.assume_init().into_vec(), probs.assume_init().into_vec()) }
}

/// The attention of the passes that extend cached keys, which build no graph: query i attends
/// to the cached keys (`heads.k`, `heads.v`; with `heads.causal`, keys `0..=i` of as many as
/// queries: dense's pass 2; without, all of them: seed's) and to its own key and value
/// (`own_k`, `own_v`: stacks of `[S, dh]` like `heads.q`), its own score first in each softmax
/// row as in the plain path. One pass per head instead of the plain path's concatenated
/// `[B, H, S, 1 + K]` scores, their slices and a separate product; the output in
/// `[B, S, H, dh]` memory.
pub fn prefix_and_self(heads: &Heads, own_k: &Matrices, own_v: &Matrices) -> Vec<f32> {
    let (batch, n_heads, queries, keys, dh) = heads.dims();
    assert!(
        !heads.causal || keys == queries,
        "prefix and self: {keys} cached keys for {queries} causal queries"
    );
    for own in [own_k, own_v] {
        assert_eq!(
            (own.len(), own.rows, own.cols),
            (heads.q.len(), queries, dh),
            "prefix and self: own keys or values differ from the queries"
        );
    }
    // Row i of the scores: its own key's, then the cached keys' (causal: `0..=i`, then
    // hidden ones).
    let width = keys + 1;
    let first_seen = if heads.causal { 2 } else { width };
    let mut out = uninit(size(&[batch, queries, n_heads, dh]));
    let scratch = || {
        let scores = vec![0.0f32; size(&[queries, width])];
        let probs = uninit(scores.len());
        (scores, probs, vec![0.0f32; queries * dh])
    };
    out.par_chunks_mut(queries * n_heads * dh)
        .enumerate()
        .for_each_init(scratch, |(scores, probs, prefix), (b, out)| {
            for h in 0..n_heads {
                let i = b * n_heads + h;
                let (q, own_k, own_v) = (heads.q.get(i), own_k.get(i), own_v.get(i));
                // SAFETY: gemm writes only floats into the scores.
                let prefix_scores = unsafe { &mut as_uninit(scores)[1..] };
                let k = heads.k.get(i);
                product_into(
                    prefix_scores,
                    width,
                    q,
                    k.t(),
                    heads.scale,
                    Parallelism::None,
                );
                for (row, x) in scores.chunks_mut(width).enumerate() {
                    let (q, k) = (q.row(row), own_k.row(row));
                    let dot: f32 = q.iter().zip(k.iter()).map(|(q, k)| q * k).sum();
                    x[0] = heads.scale * dot;
                }
                math::softmax_rows(scores, width, first_seen, probs);
                // SAFETY: `softmax_rows` wrote every element of every row of `probs`.
                let p = unsafe { assume_written(probs) };
                let cached = Matrix {
                    offset: 1,
                    cols: keys,
                    ..Matrix::dense(p, queries, width)
                };
                // SAFETY: gemm writes only floats into the product.
                let prefix_out = unsafe { as_uninit(prefix) };
                product_into(
                    prefix_out,
                    dh,
                    cached,
                    heads.v.get(i),
                    1.0,
                    Parallelism::None,
                );
                let dst = head_block(out, h, dh);
                for (row, context) in prefix.chunks(dh).enumerate() {
                    let own_p = p[row * width];
                    let dst = &mut dst[row * n_heads * dh..][..dh];
                    for ((o, c), v) in dst.iter_mut().zip(context).zip(own_v.row(row).iter()) {
                        o.write(own_p * v + c);
                    }
                }
            }
        });
    // SAFETY: every batch element's heads wrote their `queries × dh` output blocks, which
    // tile the `[S, H, dh]` chunk.
    unsafe { out.assume_init().into_vec() }
}

/// `&mut [f32]` as a buffer to write, for `product_into`.
///
/// # Safety
/// Only initialised values may be written through the result.
unsafe fn as_uninit(x: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller writes only floats through it.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) }
}

/// The gradients of q (`[B, S, H, dh]` memory), k and v (`[B, K, H, dh]`) from the output's
/// gradient (a `B · H` stack of `[S, dh]`) and the forward's probabilities.
pub fn backward(heads: &Heads, probs: &[f32], grad: &Matrices) -> [Vec<f32>; 3] {
    let (batch, n_heads, queries, keys, dh) = heads.dims();
    assert_eq!(probs.len(), batch * n_heads * queries * keys);
    assert_eq!(
        (grad.len(), grad.rows, grad.cols),
        (batch * n_heads, queries, dh)
    );
    let mut dq = uninit(size(&[batch, queries, n_heads, dh]));
    let mut dk = uninit(size(&[batch, keys, n_heads, dh]));
    let mut dv = uninit(size(&[batch, keys, n_heads, dh]));
    if !dq.is_empty() {
        dq.par_chunks_mut(queries * n_heads * dh)
            .zip(dk.par_chunks_mut(keys * n_heads * dh))
            .zip(dv.par_chunks_mut(keys * n_heads * dh))
            .enumerate()
            .for_each_init(
                || vec![0.0f32; queries * keys],
                |d_scores, (b, ((dq, dk), dv))| {
                    for h in 0..n_heads {
                        let i = b * n_heads + h;
                        let p = &probs[i * queries * keys..(i + 1) * queries * keys];
                        let (q, k, v, g) =
                            (heads.q.get(i), heads.k.get(i), heads.v.get(i), grad.get(i));
                        // d(probs) = g · vᵀ, then through the softmax (and the scale) in place.
                        // SAFETY: gemm writes only floats into the scores' gradient.
                        let d_out = unsafe { as_uninit(d_scores) };
                        product_into(d_out, keys, g, v.t(), 1.0, Parallelism::None);
                        for (d, p) in d_scores.chunks_mut(keys).zip(p.chunks(keys)) {
                            math::softmax_backward_in_place(p, d, heads.scale);
                        }
                        let (p, ds) = (
                            Matrix::dense(p, queries, keys),
                            Matrix::dense(d_scores, queries, keys),
                        );
                        let stride = n_heads * dh;
                        product_into(
                            head_block(dv, h, dh),
                            stride,
                            p.t(),
                            g,
                            1.0,
                            Parallelism::None,
                        );
                        product_into(head_block(dq, h, dh), stride, ds, k, 1.0, Parallelism::None);
                        product_into(
                            head_block(dk, h, dh),
                            stride,
                            ds.t(),
                            q,
                            1.0,
                            Parallelism::None,
                        );
                    }
                },
            );
    }
    // SAFETY: every batch element's heads wrote their `rows × dh` blocks of dq, dk and dv,
    // which tile each `[rows, H, dh]` chunk (keys > 0, so dk and dv are empty only with dq).
    unsafe {
        [
            dq.assume_init().into_vec(),
            dk.assume_init().into_vec(),
            dv.assume_init().into_vec(),
        ]
    }
}
