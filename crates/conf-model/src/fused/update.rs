//! AdamW's update of one parameter in one parallel pass over its values, moments and gradient,
//! where Burn's AdamW runs about a dozen element-wise operations, each writing a fresh tensor,
//! on one core. The arithmetic is Burn's, operation for operation, in f32.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::AdamWScalars;
use super::kernels::TASK_ELEMENTS;

/// The updated parameter and first and second moments.
pub fn adamw(
    param: &[f32],
    grad: &[f32],
    moment_1: &[f32],
    moment_2: &[f32],
    s: AdamWScalars,
) -> [Vec<f32>; 3] {
    let n = param.len();
    assert_eq!(
        [grad.len(), moment_1.len(), moment_2.len()],
        [n; 3],
        "AdamW: parameter, gradient and moments differ in length"
    );
    let mut out: [Box<[MaybeUninit<f32>]>; 3] = std::array::from_fn(|_| Box::new_uninit_slice(n));
    let [p_out, m_out, v_out] = &mut out;
    p_out
        .par_chunks_mut(TASK_ELEMENTS)
        .zip(m_out.par_chunks_mut(TASK_ELEMENTS))
        .zip(v_out.par_chunks_mut(TASK_ELEMENTS))
        .enumerate()
        .for_each(|(task, ((p_out, m_out), v_out))| {
            let at = task * TASK_ELEMENTS..task * TASK_ELEMENTS + p_out.len();
            let inputs = (
                &param[at.clone()],
                &grad[at.clone()],
                &moment_1[at.clone()],
                &moment_2[at],
            );
            update(inputs, (p_out, m_out, v_out), s);
        });
    // SAFETY: the chunks cover every element of the three buffers and `update` writes each.
    out.map(|buf| unsafe { buf.assume_init() }.into_vec())
}

type Inputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32]);
type Outputs<'a> = (
    &'a mut [MaybeUninit<f32>],
    &'a mut [MaybeUninit<f32>],
    &'a mut [MaybeUninit<f32>],
);

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn update((param, grad, m, v): Inputs, (p_out, m_out, v_out): Outputs, s: AdamWScalars) {
    let (factor_1, factor_2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
    let (correction_1, correction_2) = s.corrections();
    for i in 0..p_out.len() {
        let g = grad[i];
        let m = m[i] * s.beta_1 + g * factor_1;
        let v = v[i] * s.beta_2 + g * g * factor_2;
        let delta = (m / correction_1) / ((v / correction_2).sqrt() + s.epsilon);
        p_out[i].write(param[i] * s.keep - delta * s.learning_rate);
        m_out[i].write(m);
        v_out[i].write(v);
    }
}
