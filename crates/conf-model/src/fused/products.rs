//! Matrix products of strided f32 matrix stacks through the `gemm` crate (the one flex uses),
//! written into a fresh buffer without the zeroing and re-aligning copy flex's own matmul makes
//! of every output (docs/performance.md).

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

/// Products at least this large (m·n·k) are split across threads inside gemm; smaller ones
/// run one per thread across the batch. The size flex's matmul uses for the same choice.
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// A stack of `batch` matrices in a flat buffer: element (b, i, j) of the stack is
/// `data[offsets[b] + i · row_stride + j · col_stride]`.
pub struct Matrices<'a> {
    pub data: &'a [f32],
    pub offsets: Vec<isize>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl Matrices<'_> {
    /// Panics unless every element of every matrix lies in `data`: what makes the pointer
    /// arithmetic of [`matmul`] sound.
    fn check_bounds(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last_row = (self.rows - 1) as isize * self.row_stride;
        let last_col = (self.cols - 1) as isize * self.col_stride;
        let reach = [0, last_row, last_col, last_row + last_col];
        let (low, high) = (reach.iter().min().unwrap(), reach.iter().max().unwrap());
        for &offset in &self.offsets {
            assert!(
                offset + low >= 0 && offset + high < self.data.len() as isize,
                "a matrix at offset {offset} reaches outside its {} elements",
                self.data.len()
            );
        }
    }

    /// Pointer to the first element of matrix `b`.
    fn start(&self, b: usize) -> *const f32 {
        // SAFETY: `check_bounds` holds, so the offset is inside `data`.
        unsafe { self.data.as_ptr().offset(self.offsets[b]) }
    }
}

/// `lhs[b] · rhs[b]` for every b, as a contiguous `[batch, m, n]` buffer.
pub fn matmul(lhs: &Matrices, rhs: &Matrices) -> Vec<f32> {
    let (batch, m, k, n) = (lhs.offsets.len(), lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.offsets.len(), batch, "matmul: batch sizes differ");
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    if k == 0 {
        return vec![0.0; batch * m * n];
    }
    lhs.check_bounds();
    rhs.check_bounds();
    let mut out: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(batch * m * n);
    // One product into `dst` (m × n, row-major); gemm does not read `dst` (read_dst false).
    let product = |dst: &mut [MaybeUninit<f32>], b: usize, parallelism: Parallelism| {
        // SAFETY: the operands' bounds are checked above, `dst` holds m·n elements and is
        // written whole by gemm (read_dst is false, so its initial contents are never read).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().cast::<f32>(),
                1,
                n as isize,
                false,
                lhs.start(b),
                lhs.col_stride,
                lhs.row_stride,
                rhs.start(b),
                rhs.col_stride,
                rhs.row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    if m * n > 0 {
        let threads = rayon::current_num_threads();
        if threads == 1 || batch == 1 || m * n * k >= PARALLEL_PRODUCT {
            let parallelism = if threads > 1 && m * n * k >= PARALLEL_PRODUCT {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            for (b, dst) in out.chunks_mut(m * n).enumerate() {
                product(dst, b, parallelism);
            }
        } else {
            out.par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(b, dst)| product(dst, b, Parallelism::None));
        }
    }
    // SAFETY: every m × n block was written by gemm above (none when m·n is 0).
    unsafe { out.assume_init() }.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive triple loop over the same strided stacks.
    fn reference(lhs: &Matrices, rhs: &Matrices) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..lhs.offsets.len() {
            for i in 0..lhs.rows {
                for j in 0..rhs.cols {
                    let mut sum = 0.0f64;
                    for p in 0..lhs.cols {
                        let a = lhs.data[(lhs.offsets[b]
                            + i as isize * lhs.row_stride
                            + p as isize * lhs.col_stride)
                            as usize];
                        let c = rhs.data[(rhs.offsets[b]
                            + p as isize * rhs.row_stride
                            + j as isize * rhs.col_stride)
                            as usize];
                        sum += a as f64 * c as f64;
                    }
                    out.push(sum as f32);
                }
            }
        }
        out
    }

    #[test]
    fn strided_and_transposed_stacks_multiply_as_the_naive_loop_does() {
        let data: Vec<f32> = (0..80_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        // Three 5 × 7 matrices read row-major, times three 7 × 4 read as transposes (column
        // stride larger than row stride), at uneven offsets.
        let lhs = Matrices {
            data: &data,
            offsets: vec![3, 100, 250],
            rows: 5,
            cols: 7,
            row_stride: 9,
            col_stride: 1,
        };
        let rhs = Matrices {
            data: &data,
            offsets: vec![1000, 1500, 1200],
            rows: 7,
            cols: 4,
            row_stride: 1,
            col_stride: 11,
        };
        let (fast, slow) = (matmul(&lhs, &rhs), reference(&lhs, &rhs));
        assert_eq!(fast.len(), 3 * 5 * 4);
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // A product large enough for gemm's own threads: the same values.
        let big = |offset, rows, cols| Matrices {
            data: &data,
            offsets: vec![offset],
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        };
        let (lhs, rhs) = (big(0, 200, 200), big(40_000, 200, 200));
        const { assert!(200 * 200 * 200 >= PARALLEL_PRODUCT) };
        let (fast, slow) = (matmul(&lhs, &rhs), reference(&lhs, &rhs));
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    #[should_panic(expected = "reaches outside")]
    fn a_matrix_past_the_end_of_its_buffer_is_refused() {
        let data = [1.0f32; 10];
        let matrix = |offset, rows, cols| Matrices {
            data: &data,
            offsets: vec![offset],
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        };
        // Rows 4..12 of a 10-element buffer.
        matmul(&matrix(4, 2, 4), &matrix(0, 4, 1));
    }
}
