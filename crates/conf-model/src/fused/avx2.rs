//! The attention's row softmax in AVX2 + FMA intrinsics, for processors without AVX-512 (Zen 3,
//! older Intel cores): the twin of [`super::avx512`], each 16-lane block as two 8-lane halves,
//! masks applied in registers rather than by masked loads and stores.
//!
//! Same reason as there: the portable path's masked row maxima compile scalar. Same
//! arithmetic, operation for operation, so the same values: bit-identical to the portable path
//! for rows of whole blocks, within rounding otherwise, hidden keys 0 even in a row with a NaN
//! score.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::math::{EXP_BIAS, EXP_HIGHEST, EXP_LOWEST, EXP_POLY, LANES, LN2_HI, LN2_LO};

/// Lanes of one half of a block.
const HALF: usize = LANES / 2;

/// Whether this processor runs [`softmax_rows`] (checked once and cached by `std`).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The lanes of half `h` (of 8 lanes) that hold one of a row's first `n` values: all bits set
/// in a lane that does.
#[inline]
#[target_feature(enable = "avx2")]
fn lanes_below(n: usize, h: usize) -> __m256 {
    let k = n.saturating_sub(h * HALF).min(HALF) as i32;
    let below = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(k),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    _mm256_castsi256_ps(below)
}

/// Half `h` of `row`; lanes past the row's end hold other values of the row (callers mask
/// them). A half that ends past the row is read as the row's last eight values, rotated:
/// AMD leaves masked-off lanes of `maskload` free to fault, and a row may end at the end of
/// its allocation (a copy through the stack would stall on store forwarding).
#[inline]
#[target_feature(enable = "avx2")]
fn load_half(row: &[f32], h: usize) -> __m256 {
    let from = h * HALF;
    if let Some(half) = row.get(from..from + HALF) {
        // SAFETY: eight floats in the row.
        return unsafe { _mm256_loadu_ps(half.as_ptr()) };
    }
    let width = row.len();
    if width >= HALF {
        // Lane i takes the row's value from + i = (width − 8) + (i + 8 − k), k = width − from.
        let shift = (HALF - (width - from)) as i32;
        let lanes = _mm256_add_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(shift),
        );
        // SAFETY: the row's last eight floats.
        let last = unsafe { _mm256_loadu_ps(row[width - HALF..].as_ptr()) };
        return _mm256_permutevar8x32_ps(last, lanes);
    }
    // A row shorter than a half.
    let mut buf = [0.0f32; HALF];
    buf[..width - from].copy_from_slice(&row[from..]);
    // SAFETY: eight floats on the stack.
    unsafe { _mm256_loadu_ps(buf.as_ptr()) }
}

/// `v` into half `h` of `row`, its lanes past the row's end dropped.
#[inline]
#[target_feature(enable = "avx2")]
fn store_half(row: &mut [MaybeUninit<f32>], h: usize, v: __m256) {
    let from = h * HALF;
    match row.get_mut(from..from + HALF) {
        // SAFETY: eight floats in the row.
        Some(half) => unsafe { _mm256_storeu_ps(half.as_mut_ptr().cast(), v) },
        None => {
            let mut buf = [0.0f32; HALF];
            // SAFETY: eight floats on the stack.
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), v) };
            for (o, &b) in row[from..].iter_mut().zip(&buf) {
                o.write(b);
            }
        }
    }
}

/// [`math::softmax_rows`](super::math::softmax_rows): the softmax of each `width`-long row of
/// `x` into `out`, row r over its first `min(first_seen + r, width)` values, zeros after them.
///
/// # Safety
/// The processor must support AVX2 and FMA ([`available`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_rows(
    x: &[f32],
    width: usize,
    first_seen: usize,
    out: &mut [MaybeUninit<f32>],
) {
    super::math::check_rows(x, width, out);
    let halves = width.div_ceil(HALF);
    let rows = x.chunks_exact(width).zip(out.chunks_exact_mut(width));
    for (r, (x, out)) in rows.enumerate() {
        let seen = first_seen.saturating_add(r).min(width);
        let seen_halves = seen.div_ceil(HALF);
        // Whole halves are plain loads and stores, a row's cut last half is read rotated and
        // written lane by lane; lanes past `seen` are masked in registers.
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut maxima = neg_inf;
        for h in 0..seen_halves {
            let v = _mm256_blendv_ps(neg_inf, load_half(x, h), lanes_below(seen, h));
            // `max_ps(v, m)` is `v > m ? v : m`: a NaN score is passed over, as in the
            // portable path.
            maxima = _mm256_max_ps(v, maxima);
        }
        let max = _mm256_set1_ps(reduce_max(maxima));
        // The block's two halves summed apart, as the portable path's 16 lanes.
        let mut sums = [_mm256_setzero_ps(); 2];
        for h in 0..seen_halves {
            let e = _mm256_and_ps(
                exp(_mm256_sub_ps(load_half(x, h), max)),
                lanes_below(seen, h),
            );
            sums[h % 2] = _mm256_add_ps(sums[h % 2], e);
            store_half(out, h, e);
        }
        for h in seen_halves..halves {
            store_half(out, h, _mm256_setzero_ps());
        }
        let inverse = 1.0 / fold_sum(sums);
        let whole = seen_halves.min(width / HALF);
        for h in 0..whole {
            // SAFETY: eight floats of the row, written by the exponentials' loop above.
            let e = unsafe { _mm256_loadu_ps(out[h * HALF..].as_ptr().cast()) };
            // Masked again: a row whose sum is NaN keeps its hidden keys at 0.
            let scaled = _mm256_mul_ps(e, _mm256_set1_ps(inverse));
            store_half(out, h, _mm256_and_ps(scaled, lanes_below(seen, h)));
        }
        // The row's cut last half, one value at a time: reading back what the exponentials'
        // loop wrote through the stack would stall on store forwarding.
        for o in out.iter_mut().take(seen).skip(whole * HALF) {
            // SAFETY: written by the exponentials' loop above.
            o.write(unsafe { o.assume_init() } * inverse);
        }
    }
}

/// The largest lane.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce_max(v: __m256) -> f32 {
    let quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// The 16 lanes' sum (low half first), halves added pairwise as the portable path adds them.
#[inline]
#[target_feature(enable = "avx2")]
fn fold_sum(halves: [__m256; 2]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    // SAFETY: two 8-float stores into a 16-float array.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), halves[0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(HALF), halves[1]);
    }
    super::math::fold_sum(lanes)
}

/// [`math::exp`](super::math::exp) on 8 lanes, the same operations in the same order.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    let splat = _mm256_set1_ps;
    // `lo > x ? lo : x`, then `hi < t ? hi : t`: a NaN stays NaN, as in `f32::clamp`.
    let x = _mm256_min_ps(splat(EXP_HIGHEST), _mm256_max_ps(splat(EXP_LOWEST), x));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        splat(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fmadd_ps(n, splat(-LN2_LO), _mm256_fmadd_ps(n, splat(-LN2_HI), x));
    // The portable fold starts from 0: its first step, 0·r + c₅, is c₅ for any finite r.
    let (last, rest) = EXP_POLY.split_last().expect("coefficients");
    let mut poly = splat(*last);
    for &p in rest.iter().rev() {
        poly = _mm256_fmadd_ps(poly, r, splat(p));
    }
    let e_r = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), splat(1.0));
    let biased = _mm256_castps_si256(_mm256_add_ps(n, splat(EXP_BIAS)));
    _mm256_mul_ps(e_r, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased)))
}
