//! Eight f32 lanes at a time (`wide`): the exponentials of the softmax and the normal CDF of
//! the GELU, which the scalar `expf` / `erff` of the C library ran one value at a time.

use std::mem::MaybeUninit;

use wide::f32x8;

const LANES: usize = 8;

/// Writes `f(x)` into `out`, eight lanes at a time; a short tail is padded with zeros.
pub fn map(x: &[f32], out: &mut [MaybeUninit<f32>], f: impl Fn(f32x8) -> f32x8) {
    assert_eq!(x.len(), out.len());
    let (x_body, x_tail) = x.split_at(x.len() / LANES * LANES);
    let (out_body, out_tail) = out.split_at_mut(x_body.len());
    for (o, v) in out_body
        .chunks_exact_mut(LANES)
        .zip(x_body.chunks_exact(LANES))
    {
        store(o, f(f32x8::from(<[f32; LANES]>::try_from(v).unwrap())));
    }
    if !x_tail.is_empty() {
        store(out_tail, f(padded(x_tail)));
    }
}

/// Writes `f(x, y)` into `out`, eight lanes at a time; a short tail is padded with zeros.
pub fn map2(x: &[f32], y: &[f32], out: &mut [MaybeUninit<f32>], f: impl Fn(f32x8, f32x8) -> f32x8) {
    assert_eq!((x.len(), y.len()), (out.len(), out.len()));
    let body = x.len() / LANES * LANES;
    let (out_body, out_tail) = out.split_at_mut(body);
    let pairs = x[..body]
        .chunks_exact(LANES)
        .zip(y[..body].chunks_exact(LANES));
    for (o, (a, b)) in out_body.chunks_exact_mut(LANES).zip(pairs) {
        let a = f32x8::from(<[f32; LANES]>::try_from(a).unwrap());
        let b = f32x8::from(<[f32; LANES]>::try_from(b).unwrap());
        store(o, f(a, b));
    }
    if body < x.len() {
        store(out_tail, f(padded(&x[body..]), padded(&y[body..])));
    }
}

fn padded(values: &[f32]) -> f32x8 {
    let mut lanes = [0.0; LANES];
    lanes[..values.len()].copy_from_slice(values);
    f32x8::from(lanes)
}

fn store(out: &mut [MaybeUninit<f32>], v: f32x8) {
    for (o, v) in out.iter_mut().zip(v.to_array()) {
        o.write(v);
    }
}

/// `eˣ` (`wide`'s, within 2 ulp of the correctly rounded value).
pub fn exp(x: f32x8) -> f32x8 {
    x.exp()
}

/// The standard normal CDF Φ(x) and density φ(x), sharing one exponential:
/// `Φ(x) = (1 + erf(x/√2)) / 2` with Abramowitz & Stegun 7.1.26 for erf (absolute error
/// below 1.5e-7, so 7.5e-8 for Φ; with f32 rounding Φ is within 3e-7, about two ulp of values
/// near 1), and `φ(x) = e^{−x²/2} / √(2π)`.
pub fn normal_cdf_and_density(x: f32x8) -> (f32x8, f32x8) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = x * f32x8::splat(std::f32::consts::FRAC_1_SQRT_2);
    let gauss = exp(-(z * z)); // e^{−x²/2}
    // A true division: `recip` is the 12-bit hardware estimate.
    let t = f32x8::ONE / (f32x8::ONE + f32x8::splat(P) * z.abs());
    let poly = A
        .iter()
        .rev()
        .fold(f32x8::ZERO, |acc, &a| acc.mul_add(t, f32x8::splat(a)))
        * t;
    let erf_abs = f32x8::ONE - poly * gauss;
    let erf = z.is_sign_negative().select(-erf_abs, erf_abs);
    let cdf = f32x8::splat(0.5) * (f32x8::ONE + erf);
    let density = gauss * f32x8::splat(0.398_942_3); // 1 / √(2π)
    (cdf, density)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_cdf_is_within_3e7_of_the_f64_erf_over_the_range_gelu_sees() {
        let mut worst = 0.0f32;
        for i in -4000..=4000 {
            let x = i as f32 * 0.0025; // −10..10
            let (cdf, density) = normal_cdf_and_density(f32x8::splat(x));
            let exact = 0.5 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            worst = worst.max((cdf.to_array()[0] as f64 - exact).abs() as f32);
            let exact_density =
                (-0.5 * (x as f64).powi(2)).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!(
                (density.to_array()[0] as f64 - exact_density).abs() < 1e-7,
                "φ({x})"
            );
        }
        assert!(worst < 3e-7, "largest error of Φ: {worst}");
    }

    #[test]
    fn a_tail_shorter_than_eight_lanes_is_mapped_too() {
        let x: Vec<f32> = (0..11).map(|i| i as f32 * 0.5 - 2.0).collect();
        let mut out = vec![MaybeUninit::uninit(); 11];
        map(&x, &mut out, exp);
        for (v, o) in x.iter().zip(&out) {
            let o = unsafe { o.assume_init() };
            assert!((o - v.exp()).abs() <= 2e-7 * v.exp(), "exp({v}) = {o}");
        }
    }
}
