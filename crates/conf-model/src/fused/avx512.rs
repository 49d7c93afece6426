//! The attention's row softmax in AVX-512 intrinsics, for the processors that have them.
//!
//! The portable `math::portable_softmax_rows` leaves its masked row maxima to the compiler,
//! which keeps them scalar, one branch per lane (no vectorisation seeds a loop whose only state
//! is its accumulators); here every phase is whole 16-lane vectors, a row's last block and the
//! keys it may not see handled by masks. The arithmetic is the portable one, operation for
//! operation: the same values for rows of whole blocks, and within rounding otherwise (the
//! portable path adds the values of a row's cut block apart). One exception: in a row with a
//! NaN score the portable path scales its last block whole, NaN into the hidden keys too; here
//! they stay 0.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::math::{EXP_BIAS, EXP_HIGHEST, EXP_LOWEST, EXP_POLY, LANES, LN2_HI, LN2_LO};

/// Whether this processor runs [`softmax_rows`] (checked once and cached by `std`).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// The lanes of block `b` of a row that hold one of its first `n` values.
#[inline]
fn lanes_below(n: usize, b: usize) -> __mmask16 {
    let k = n.saturating_sub(b * LANES).min(LANES);
    ((1u32 << k) - 1) as __mmask16
}

/// [`math::softmax_rows`](super::math::softmax_rows): the softmax of each `width`-long row of
/// `x` into `out`, row r over its first `min(first_seen + r, width)` values, zeros after them.
///
/// # Safety
/// The processor must support AVX-512F ([`available`]).
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_rows(
    x: &[f32],
    width: usize,
    first_seen: usize,
    out: &mut [MaybeUninit<f32>],
) {
    super::math::check_rows(x, width, out);
    // A row at a time: taking a few rows through each phase in turn, as the portable path
    // does, measured the same here.
    let blocks = width.div_ceil(LANES);
    let rows = x.chunks_exact(width).zip(out.chunks_exact_mut(width));
    for (r, (x, out)) in rows.enumerate() {
        let seen = first_seen.saturating_add(r).min(width);
        let seen_blocks = seen.div_ceil(LANES);
        let x = |b: usize| x.as_ptr().wrapping_add(b * LANES);
        let out = out.as_mut_ptr().cast::<f32>();
        let out = |b: usize| out.wrapping_add(b * LANES);
        // SAFETY (every access below): block b's lanes past `width` are masked off, so loads
        // and stores stay inside the row; masked-off lanes of a load are not read.
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut maxima = neg_inf;
        for b in 0..seen_blocks {
            let v = unsafe { _mm512_mask_loadu_ps(neg_inf, lanes_below(seen, b), x(b)) };
            // `max_ps(v, m)` is `v > m ? v : m`: a NaN score is passed over, as in the
            // portable path.
            maxima = _mm512_max_ps(v, maxima);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxima));
        let mut sums = _mm512_setzero_ps();
        for b in 0..seen_blocks {
            let lanes = lanes_below(seen, b);
            let v = unsafe { _mm512_maskz_loadu_ps(lanes, x(b)) };
            let e = _mm512_maskz_mov_ps(lanes, exp(_mm512_sub_ps(v, max)));
            sums = _mm512_add_ps(sums, e);
            unsafe { _mm512_mask_storeu_ps(out(b), lanes_below(width, b), e) };
        }
        for b in seen_blocks..blocks {
            let zeros = _mm512_setzero_ps();
            unsafe { _mm512_mask_storeu_ps(out(b), lanes_below(width, b), zeros) };
        }
        let inverse = _mm512_set1_ps(1.0 / fold_sum(sums));
        for b in 0..seen_blocks {
            let lanes = lanes_below(seen, b);
            let e = unsafe { _mm512_maskz_loadu_ps(lanes, out(b)) };
            unsafe { _mm512_mask_storeu_ps(out(b), lanes, _mm512_mul_ps(e, inverse)) };
        }
    }
}

/// The lanes' sum, halves added pairwise as the portable path adds them.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold_sum(v: __m512) -> f32 {
    let mut lanes = [0.0f32; LANES];
    // SAFETY: 16 floats into a 16-float array.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
    super::math::fold_sum(lanes)
}

/// [`math::exp`](super::math::exp) on 16 lanes, the same operations in the same order.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    let splat = _mm512_set1_ps;
    // `lo > x ? lo : x`, then `hi < t ? hi : t`: a NaN stays NaN, as in `f32::clamp`.
    let x = _mm512_min_ps(splat(EXP_HIGHEST), _mm512_max_ps(splat(EXP_LOWEST), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, splat(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fmadd_ps(n, splat(-LN2_LO), _mm512_fmadd_ps(n, splat(-LN2_HI), x));
    // The portable fold starts from 0: its first step, 0·r + c₅, is c₅ for any finite r.
    let (last, rest) = EXP_POLY.split_last().expect("coefficients");
    let mut poly = splat(*last);
    for &p in rest.iter().rev() {
        poly = _mm512_fmadd_ps(poly, r, splat(p));
    }
    let e_r = _mm512_add_ps(_mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), r), splat(1.0));
    let biased = _mm512_castps_si512(_mm512_add_ps(n, splat(EXP_BIAS)));
    _mm512_mul_ps(e_r, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased)))
}
