//! The element-wise maths of the fused kernels: the GELU (normal CDF and density) and the
//! softmax's exponentials, written branch-free so that the compiler vectorises each loop, and
//! compiled for AVX-512 and AVX2 + FMA besides the baseline (`multiversion` picks one at run
//! time): the C library's `expf` / `erff` run one value per call.

use std::mem::MaybeUninit;

use multiversion::multiversion;

/// `x · Φ(x)` into `out`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(v * normal_cdf_and_density(v).0);
    }
}

/// `grad · (Φ(x) + x · φ(x))` into `out`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn gelu_backward(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!((x.len(), grad.len()), (out.len(), out.len()));
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
        let (cdf, density) = normal_cdf_and_density(v);
        o.write(g * v.mul_add(density, cdf));
    }
}

/// `e^(x − shift)` into `out`; returns their sum.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    assert_eq!(x.len(), out.len());
    // Two loops: a running sum in the first would keep it one value at a time.
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - shift);
    }
    sum(out)
}

/// The softmax of each `width`-long row of `x` into `out`: row r over its first
/// `min(first_seen + r, width)` values (causal attention's visible keys), zeros after them.
/// One call for a whole block of rows: attention rows are short and of every length, and a
/// call per row with one-at-a-time tails cost several times the arithmetic
/// (docs/performance.md). In AVX-512 or else AVX2 intrinsics where the processor has them,
/// else in portable code.
pub fn softmax_rows(x: &[f32], width: usize, first_seen: usize, out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::avx512::available() {
            // SAFETY: the processor has AVX-512F.
            return unsafe { super::avx512::softmax_rows(x, width, first_seen, out) };
        }
        if super::avx2::available() {
            // SAFETY: the processor has AVX2 and FMA.
            return unsafe { super::avx2::softmax_rows(x, width, first_seen, out) };
        }
    }
    portable_softmax_rows(x, width, first_seen, out)
}

/// What every [`softmax_rows`] path requires: `x` and `out` of the same length, whole rows of
/// `width > 0` values.
pub(super) fn check_rows(x: &[f32], width: usize, out: &[MaybeUninit<f32>]) {
    assert!(width > 0, "softmax over rows of no values");
    assert_eq!(x.len(), out.len());
    assert_eq!(
        x.len() % width,
        0,
        "{} values are not rows of {width}",
        x.len()
    );
}

/// [`softmax_rows`] in portable code, in whole vectors of lanes, a few rows at a time through
/// each phase (maxima, exponentials, scaling) so that the rows' dependency chains overlap.
/// The compiler vectorises all but the masked row maxima, which it keeps scalar. The
/// reference the AVX-512 and AVX2 paths are tested against.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn portable_softmax_rows(x: &[f32], width: usize, first_seen: usize, out: &mut [MaybeUninit<f32>]) {
    const GROUP: usize = 8;
    check_rows(x, width, out);
    let groups = x.chunks(GROUP * width).zip(out.chunks_mut(GROUP * width));
    for (g, (x, out)) in groups.enumerate() {
        let seen = |i: usize| first_seen.saturating_add(g * GROUP + i).min(width);
        let mut maxima = [0.0f32; GROUP];
        for (i, x) in x.chunks_exact(width).enumerate() {
            maxima[i] = row_max(x, seen(i));
        }
        let mut inverses = [0.0f32; GROUP];
        for (i, (x, out)) in x
            .chunks_exact(width)
            .zip(out.chunks_exact_mut(width))
            .enumerate()
        {
            inverses[i] = 1.0 / row_exps(x, seen(i), maxima[i], out);
        }
        for (i, out) in out.chunks_exact_mut(width).enumerate() {
            scale_row(out, seen(i), inverses[i]);
        }
    }
}

/// How a row of [`softmax_rows`] splits: whole blocks of lanes up to the one holding the last
/// seen value (lanes past `seen` masked: their scores are read but not used), then the seen
/// values of a block the row's end cuts (`width` not a multiple of the lanes), one at a time.
#[inline(always)]
fn row_parts(width: usize, seen: usize) -> (usize, usize) {
    let whole = (seen.div_ceil(LANES) * LANES).min(width / LANES * LANES);
    (whole, seen.saturating_sub(whole))
}

/// The largest of a row's first `seen` values.
#[inline(always)]
fn row_max(x: &[f32], seen: usize) -> f32 {
    let (whole, cut) = row_parts(x.len(), seen);
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut masked = [f32::NEG_INFINITY; LANES];
    for (b, chunk) in x[..whole].chunks_exact(LANES).enumerate() {
        let chunk = as_lanes(chunk);
        for i in 0..LANES {
            // Lane i of block b holds a seen value when b·LANES + i < seen.
            masked[i] = if b * LANES + i < seen {
                chunk[i]
            } else {
                f32::NEG_INFINITY
            };
        }
        for i in 0..LANES {
            lanes[i] = larger(lanes[i], masked[i]);
        }
    }
    for (m, &v) in lanes.iter_mut().zip(&x[whole..whole + cut]) {
        *m = larger(*m, v);
    }
    fold(lanes, larger)
}

/// `e^(x − max)` of a row's first `seen` values into `out`, zeros after them; returns their
/// sum.
#[inline(always)]
fn row_exps(x: &[f32], seen: usize, max: f32, out: &mut [MaybeUninit<f32>]) -> f32 {
    let (whole, cut) = row_parts(x.len(), seen);
    let (out_whole, rest) = out.split_at_mut(whole);
    let (out_cut, out_hidden) = rest.split_at_mut(cut);
    let mut sums = [0.0f32; LANES];
    let mut exps = [0.0f32; LANES];
    let blocks = out_whole
        .chunks_exact_mut(LANES)
        .zip(x[..whole].chunks_exact(LANES));
    for (b, (o, chunk)) in blocks.enumerate() {
        let chunk = as_lanes(chunk);
        for i in 0..LANES {
            exps[i] = if b * LANES + i < seen {
                exp(chunk[i] - max)
            } else {
                0.0
            };
            sums[i] += exps[i];
        }
        for (o, &e) in o.iter_mut().zip(&exps) {
            o.write(e);
        }
    }
    let mut cut_sum = 0.0;
    for (o, &v) in out_cut.iter_mut().zip(&x[whole..whole + cut]) {
        let e = exp(v - max);
        o.write(e);
        cut_sum += e;
    }
    for o in out_hidden {
        o.write(0.0);
    }
    fold_sum(sums) + cut_sum
}

/// A row [`row_exps`] wrote, its exponentials times `inv`.
#[inline(always)]
fn scale_row(out: &mut [MaybeUninit<f32>], seen: usize, inv: f32) {
    let (whole, cut) = row_parts(out.len(), seen);
    let (out_whole, rest) = out.split_at_mut(whole);
    for o in out_whole.chunks_exact_mut(LANES) {
        for o in o {
            // SAFETY: `row_exps` wrote every element of the row.
            let e = unsafe { o.assume_init_read() };
            o.write(e * inv);
        }
    }
    for o in &mut rest[..cut] {
        // SAFETY: as above.
        let e = unsafe { o.assume_init_read() };
        o.write(e * inv);
    }
}

/// A block of `LANES` values as an array, so that its loops compile to whole vectors.
#[inline(always)]
fn as_lanes(chunk: &[f32]) -> &[f32; LANES] {
    chunk.try_into().expect("a whole block of lanes")
}

/// Row `x` normalised to mean 0 and (biased) variance 1 into `out`; returns `1 / std`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn normalise_row(x: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) -> f32 {
    assert_eq!(x.len(), out.len());
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let var = sum_of(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        o.write((v - mean) * inv);
    }
    inv
}

/// The gradient of [`normalise_row`] from its output `y` and `1 / std`:
/// `inv · (g − mean(g) − y · mean(g · y))`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn normalise_backward_row(y: &[f32], g: &[f32], inv: f32, out: &mut [MaybeUninit<f32>]) {
    assert_eq!((y.len(), g.len()), (out.len(), out.len()));
    let n = y.len() as f32;
    let mean_g = sum(g) / n;
    let mean_gy = dot(g, y) / n;
    for ((o, g), y) in out.iter_mut().zip(g).zip(y) {
        o.write(inv * (g - mean_g - y * mean_gy));
    }
}

/// `x̂ · (1 + c·w_s + b_s) + c·w_h + b_h` for one row into `out`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn modulate_row(xhat: &[f32], c: f32, w: &[f32], b: &[f32], out: &mut [MaybeUninit<f32>]) {
    let len = xhat.len();
    assert_eq!((w.len(), b.len(), out.len()), (2 * len, 2 * len, len));
    let (w_scale, w_shift) = w.split_at(len);
    let (b_scale, b_shift) = b.split_at(len);
    let params = w_scale.iter().zip(w_shift).zip(b_scale.iter().zip(b_shift));
    for ((o, v), ((ws, wh), (bs, bh))) in out.iter_mut().zip(xhat).zip(params) {
        o.write(v * (1.0 + c * ws + bs) + c * wh + bh);
    }
}

/// One row of the AdaptiveLayer's backward: writes `dx`, adds this row's terms to
/// `sums = [dw_s | dw_h | db_s | db_h]`, returns `dc`. `scratch` holds two rows.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
pub fn modulate_backward_row(
    xhat: &[f32],
    g: &[f32],
    c: f32,
    inv: f32,
    w: &[f32],
    b: &[f32],
    scratch: &mut [f32],
    sums: &mut [f32],
    dx: &mut [MaybeUninit<f32>],
) -> f32 {
    let len = xhat.len();
    assert_eq!(
        (g.len(), scratch.len(), w.len(), b.len()),
        (len, 2 * len, 2 * len, 2 * len)
    );
    // The gradient reaching x̂, and ∂y/∂c per element.
    let (g_hat, dy_dc) = scratch.split_at_mut(len);
    let (w_scale, w_shift) = w.split_at(len);
    let (dw, db) = sums.split_at_mut(2 * len);
    let (dw_scale, dw_shift) = dw.split_at_mut(len);
    let (db_scale, db_shift) = db.split_at_mut(len);
    for j in 0..len {
        let g_scale = g[j] * xhat[j];
        g_hat[j] = g[j] * (1.0 + c * w_scale[j] + b[j]);
        dy_dc[j] = xhat[j] * w_scale[j] + w_shift[j];
        dw_scale[j] += c * g_scale;
        dw_shift[j] += c * g[j];
        db_scale[j] += g_scale;
        db_shift[j] += g[j];
    }
    normalise_backward_row(xhat, g_hat, inv, dx);
    dot(g, dy_dc)
}

/// One row of LayerNorm's backward from its input `x`, mean and `1 / std`: writes `dx`, adds
/// this row's terms to `sums = [dγ | dβ]`. `scratch` holds two rows.
#[cfg(feature = "tch")]
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_row(
    x: &[f32],
    g: &[f32],
    mean: f32,
    inv: f32,
    gamma: &[f32],
    scratch: &mut [f32],
    sums: &mut [f32],
    dx: &mut [MaybeUninit<f32>],
) {
    let len = x.len();
    assert_eq!(
        (g.len(), gamma.len(), scratch.len(), sums.len()),
        (len, len, 2 * len, 2 * len)
    );
    // x̂, and the gradient reaching it.
    let (xhat, g_hat) = scratch.split_at_mut(len);
    let (dgamma, dbeta) = sums.split_at_mut(len);
    for j in 0..len {
        xhat[j] = (x[j] - mean) * inv;
        g_hat[j] = g[j] * gamma[j];
        dgamma[j] += g[j] * xhat[j];
        dbeta[j] += g[j];
    }
    normalise_backward_row(xhat, g_hat, inv, dx);
}

/// The gradient of a softmax row from its output `p`: `p · (g − Σ p · g)`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn softmax_backward_row(p: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!((p.len(), g.len()), (out.len(), out.len()));
    let dot = dot(p, g);
    for ((o, p), g) in out.iter_mut().zip(p).zip(g) {
        o.write(p * (g - dot));
    }
}

/// [`softmax_backward_row`] in place of the gradient, times `scale`:
/// `g ← scale · p · (g − Σ p · g)`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn softmax_backward_in_place(p: &[f32], g: &mut [f32], scale: f32) {
    assert_eq!(p.len(), g.len());
    let dot = dot(p, g);
    for (g, p) in g.iter_mut().zip(p) {
        *g = scale * p * (*g - dot);
    }
}

/// `ln Σ eˣ` of a row (its largest value subtracted first, so nothing overflows).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    m + sum_of(x, |v| exp(v - m)).ln()
}

/// The gradient of a cross-entropy row `lse − x[target]` times `g`:
/// `g · (softmax(x) − onehot(target))`, from the row's [`log_sum_exp`].
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn cross_entropy_backward_row(
    x: &[f32],
    target: usize,
    lse: f32,
    g: f32,
    out: &mut [MaybeUninit<f32>],
) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(g * exp(v - lse));
    }
    out[target].write(g * (exp(x[target] - lse) - 1.0));
}

/// `(Σ e^(x − m), Σ e^(x − m) · (x − m))` of a row: the softmax's normaliser and, divided
/// by it, the mean shifted logit the entropy needs.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn exp_moments(x: &[f32], m: f32) -> (f32, f32) {
    let mut sums = [0.0f32; LANES];
    let mut weighted = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((s, w), &v) in sums.iter_mut().zip(weighted.iter_mut()).zip(chunk) {
            let e = exp(v - m);
            *s += e;
            *w = e.mul_add(v - m, *w);
        }
    }
    let mut total = (sums.iter().sum::<f32>(), weighted.iter().sum::<f32>());
    for &v in tail {
        let e = exp(v - m);
        total = (total.0 + e, e.mul_add(v - m, total.1));
    }
    total
}

/// The first index at which the running sum of `weights` (not negative) reaches `target`,
/// the last index if it never does: the inverse of a cumulative distribution. Blocks whose
/// sum leaves the running sum below the target are skipped whole, summed in lanes.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn first_reaching(weights: &[f32], target: f32) -> usize {
    const BLOCK: usize = 4 * LANES;
    assert!(!weights.is_empty(), "a distribution over no values");
    let mut running = 0.0f32;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let total = sum(block);
        if running + total < target {
            running += total;
            continue;
        }
        for (i, &w) in block.iter().enumerate() {
            running += w;
            if running >= target {
                return b * BLOCK + i;
            }
        }
    }
    weights.len() - 1
}

/// The largest value of a row (NaNs ignored, as `f32::max` does). The lanes are folded
/// pairwise, in vector registers: attention rows are short (a causal query sees on average
/// half the sequence), so a one-at-a-time fold of the lanes cost as much as the row itself.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = larger(*m, v);
        }
    }
    for (m, &v) in lanes.iter_mut().zip(tail) {
        *m = larger(*m, v);
    }
    fold(lanes, larger)
}

/// Partial sums per lane: a sum the compiler may vectorise (a plain left-to-right sum of
/// floats it may not reorder). The order is fixed, so the result is too.
pub(super) const LANES: usize = 16;

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    sum_of(x, |v| v)
}

#[inline(always)]
fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += f(v);
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

/// `Σ xᵢ · yᵢ` in lanes, as [`sum_of`].
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut lanes = [0.0f32; LANES];
    let (xs, ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xs.zip(ys) {
        for ((s, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *s += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The larger of a running maximum `m` and `v`, a NaN `v` ignored: `if v > m` rather than
/// `f32::max`, whose NaN handling adds work to every step.
#[inline(always)]
fn larger(m: f32, v: f32) -> f32 {
    if v > m { v } else { m }
}

/// The lanes folded pairwise (halves combined, in vector registers): four steps for sixteen.
#[inline(always)]
fn fold(lanes: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut eight = [0.0f32; 8];
    for i in 0..8 {
        eight[i] = op(lanes[i], lanes[i + 8]);
    }
    let mut four = [0.0f32; 4];
    for i in 0..4 {
        four[i] = op(eight[i], eight[i + 4]);
    }
    op(op(four[0], four[2]), op(four[1], four[3]))
}

#[inline(always)]
pub(super) fn fold_sum(lanes: [f32; LANES]) -> f32 {
    fold(lanes, |a, b| a + b)
}

/// `eˣ` within 2 ulp for x in [−87, 88] (results outside are those of the ends: e^−87 is
/// 1.6e-38, far below anything a softmax or a Gaussian here adds to): `x = n·ln 2 + r`, a
/// degree-7 polynomial for `e^r` on |r| ≤ ln 2 / 2, and `2ⁿ` built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_LOWEST, EXP_HIGHEST);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let poly = EXP_POLY
        .iter()
        .rev()
        .fold(0.0, |acc: f32, &p| acc.mul_add(r, p));
    let e_r = poly.mul_add(r * r, r) + 1.0;
    // 2ⁿ without a float-to-int cast (whose saturation does not vectorise): 2²³ + 127 + n is
    // exact, and its low mantissa bits are the biased exponent 127 + n.
    let biased = (n + EXP_BIAS).to_bits() & 0x7f_ffff;
    e_r * f32::from_bits(biased << 23)
}

// [`exp`]'s constants, which the AVX-512 and AVX2 softmaxes share: its clamp, ln 2 in a high part exact
// in few bits and a low remainder (so that `x − n·ln 2` is exact), the coefficients 1/2! …
// 1/7! of `e^r`'s polynomial after `1 + r`, and 2²³ + 127, which puts `n` in the exponent bits.
pub(super) const EXP_LOWEST: f32 = -87.0;
pub(super) const EXP_HIGHEST: f32 = 88.0;
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
pub(super) const EXP_POLY: [f32; 6] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
];
pub(super) const EXP_BIAS: f32 = 127.0 + 8_388_608.0;

/// The standard normal CDF Φ(x) and density φ(x), sharing one exponential:
/// `Φ(x) = (1 + erf(x/√2)) / 2` with Abramowitz & Stegun 7.1.26 for erf (absolute error
/// below 1.5e-7, so 7.5e-8 for Φ; with f32 rounding Φ is within 3e-7, about two ulp of values
/// near 1), and `φ(x) = e^{−x²/2} / √(2π)`.
#[inline(always)]
pub fn normal_cdf_and_density(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let gauss = exp(-(z * z)); // e^{−x²/2}
    let t = 1.0 / P.mul_add(z.abs(), 1.0);
    let poly = A.iter().rev().fold(0.0, |acc: f32, &a| acc.mul_add(t, a)) * t;
    let erf = (1.0 - poly * gauss).copysign(z);
    let density = gauss * 0.398_942_3; // 1 / √(2π)
    (0.5 * (1.0 + erf), density)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_cdf_is_within_3e7_of_the_f64_erf_over_the_range_gelu_sees() {
        let mut worst = 0.0f64;
        for i in -4000..=4000 {
            let x = i as f32 * 0.0025; // −10..10
            let (cdf, density) = normal_cdf_and_density(x);
            let exact = 0.5 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            worst = worst.max((cdf as f64 - exact).abs());
            let exact_density =
                (-0.5 * (x as f64).powi(2)).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((density as f64 - exact_density).abs() < 1e-7, "φ({x})");
        }
        assert!(worst < 3e-7, "largest error of Φ: {worst}");
    }

    #[test]
    fn the_row_maximum_is_the_largest_value_at_every_length_and_position_ignoring_nans() {
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        for len in 1..70 {
            for at in 0..len {
                let mut row: Vec<f32> = (0..len).map(|i| -((i * 7 % 13) as f32) - 1.0).collect();
                row[at] = 3.5;
                assert_eq!(max(&row), 3.5, "length {len}, largest at {at}");
                row[(at + 1) % len] = f32::NAN;
                if len > 1 {
                    assert_eq!(max(&row), 3.5, "length {len}, a NaN beside the largest");
                }
            }
        }
    }

    #[test]
    fn softmax_rows_match_the_f64_softmax_of_each_rows_seen_values_and_zero_the_rest() {
        for width in [1, 7, 16, 33, 64, 65] {
            for first_seen in [1, 2, width / 2 + 1, width] {
                let rows = width + 3;
                let x: Vec<f32> = (0..rows * width)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.21)
                    .collect();
                let mut out = vec![MaybeUninit::uninit(); x.len()];
                softmax_rows(&x, width, first_seen, &mut out);
                for (r, (x, out)) in x.chunks(width).zip(out.chunks(width)).enumerate() {
                    let seen = (first_seen + r).min(width);
                    let max = x[..seen]
                        .iter()
                        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let total: f64 = x[..seen].iter().map(|&v| (v as f64 - max).exp()).sum();
                    for (j, o) in out.iter().enumerate() {
                        // SAFETY: `softmax_rows` writes every element.
                        let p = unsafe { o.assume_init() };
                        if j < seen {
                            let exact = (x[j] as f64 - max).exp() / total;
                            assert!(
                                (p as f64 - exact).abs() <= 1e-6 * exact.max(1e-3),
                                "width {width}, row {r}, key {j}: {p} against {exact}"
                            );
                        } else {
                            assert_eq!(p, 0.0, "width {width}, row {r}: hidden key {j}");
                        }
                    }
                }
            }
        }
    }

    /// A softmax in intrinsics, named, with whether this processor runs it.
    #[cfg(target_arch = "x86_64")]
    type Intrinsics = (
        &'static str,
        bool,
        unsafe fn(&[f32], usize, usize, &mut [MaybeUninit<f32>]),
    );

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_intrinsics_softmaxes_equal_the_portable_one_exactly_for_whole_blocks_and_within_rounding_otherwise()
     {
        let paths: [Intrinsics; 2] = [
            (
                "AVX-512",
                super::super::avx512::available(),
                super::super::avx512::softmax_rows,
            ),
            (
                "AVX2",
                super::super::avx2::available(),
                super::super::avx2::softmax_rows,
            ),
        ];
        for (name, available, softmax) in paths {
            if !available {
                eprintln!("no {name} on this processor: its softmax is not tested here");
                continue;
            }
            // Peaked scores (150 apart at most: exponentials down to the clamp at −87, with a
            // NaN and a −∞ score), and mild ones, whose sums take many lanes' values.
            for (scale, special) in [(1.5, true), (0.21, false)] {
                for width in [1, 7, 8, 9, 16, 33, 64, 65, 80] {
                    for first_seen in [0, 1, 2, width / 2 + 1, width] {
                        compare(name, softmax, width, first_seen, scale, special);
                    }
                }
            }
        }
    }

    /// One intrinsics softmax against the portable one; its writes must stay inside `out`.
    #[cfg(target_arch = "x86_64")]
    fn compare(
        name: &str,
        softmax: unsafe fn(&[f32], usize, usize, &mut [MaybeUninit<f32>]),
        width: usize,
        first_seen: usize,
        scale: f32,
        special: bool,
    ) {
        let rows = width + 3;
        let mut x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect();
        if special {
            x[width + 1] = f32::NAN;
            let last = x.len() - 1;
            x[(2 * width + 3).min(last)] = f32::NEG_INFINITY;
        }
        const SENTINEL: f32 = 12345.0;
        let mut fast = vec![MaybeUninit::new(SENTINEL); x.len() + 16];
        let mut portable = vec![MaybeUninit::uninit(); x.len()];
        // SAFETY: the processor has what this path needs.
        unsafe { softmax(&x, width, first_seen, &mut fast[..x.len()]) };
        portable_softmax_rows(&x, width, first_seen, &mut portable);
        for s in &fast[x.len()..] {
            // SAFETY: initialised above.
            assert_eq!(
                unsafe { s.assume_init() },
                SENTINEL,
                "{name}: a write past the end"
            );
        }
        for (j, (f, p)) in fast.iter().zip(&portable).enumerate() {
            // SAFETY: both write every element.
            let (f, p) = unsafe { (f.assume_init(), p.assume_init()) };
            let at = format!(
                "{name}: scale {scale}, width {width}, first seen {first_seen}, element {j}"
            );
            let seen = first_seen.saturating_add(j / width).min(width);
            if j % width >= seen {
                // Hidden: zero (the portable path scales a NaN row's block whole).
                assert_eq!(f.to_bits(), 0, "{at}: a hidden key's {f}");
            } else if p.is_nan() {
                assert!(f.is_nan(), "{at}: {f} in a row with a NaN score");
            } else if width.is_multiple_of(16) {
                assert_eq!(f.to_bits(), p.to_bits(), "{at}: {f} against {p}");
            } else {
                // Relative, with a floor for values near f32's smallest normals.
                let bound = 1e-6 * p.abs() + 1e-37;
                assert!((f - p).abs() <= bound, "{at}: {f} against {p}");
            }
        }
    }

    #[test]
    fn exp_is_within_2_ulp_over_the_range_and_clamps_outside_it() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let exact = (x as f64).exp();
            let relative = ((exp(x) as f64 - exact) / exact).abs();
            assert!(relative < 2.5e-7, "exp({x}) = {} against {exact}", exp(x));
        }
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn the_dispatched_loops_equal_the_scalar_maths_including_a_short_tail() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.3 - 5.0).collect();
        let grad: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let mut out = vec![MaybeUninit::uninit(); 37];
        gelu(&x, &mut out);
        let mut back = vec![MaybeUninit::uninit(); 37];
        gelu_backward(&x, &grad, &mut back);
        let mut exps = vec![0.0; 37];
        let sum = exp_shifted(&x, 1.0, &mut exps);
        for i in 0..37 {
            let (cdf, density) = normal_cdf_and_density(x[i]);
            // SAFETY: `gelu` and `gelu_backward` wrote all 37.
            let (y, g) = unsafe { (out[i].assume_init(), back[i].assume_init()) };
            assert!((y - x[i] * cdf).abs() <= 1e-6, "gelu({})", x[i]);
            assert!((g - grad[i] * (cdf + x[i] * density)).abs() <= 1e-6);
            assert!((exps[i] - exp(x[i] - 1.0)).abs() <= 1e-6 * exps[i]);
        }
        assert!((sum - exps.iter().sum::<f32>()).abs() <= 1e-4);
    }
}
