//! Matrix products of strided f32 matrix stacks through the `gemm` crate (the one flex uses),
//! written into a fresh buffer without the zeroing and re-aligning copy flex's own matmul makes
//! of every output (docs/performance.md).

use std::borrow::Cow;
use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

/// Products at least this large (m·n·k) are split across threads inside gemm; smaller ones
/// run one per thread across the batch. The size flex's matmul uses for the same choice.
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// One matrix in a flat buffer: element (i, j) is
/// `data[offset + i · row_stride + j · col_stride]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub offset: isize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<'a> Matrix<'a> {
    /// A row-major `rows × cols` matrix filling `data`.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols);
        Self {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `first..first + rows`, as a view.
    pub fn rows_at(self, first: usize, rows: usize) -> Self {
        assert!(first + rows <= self.rows, "rows outside the matrix");
        Self {
            offset: self.offset + first as isize * self.row_stride,
            rows,
            ..self
        }
    }

    /// Columns `first..first + cols`, as a view.
    pub fn cols_at(self, first: usize, cols: usize) -> Self {
        self.t().rows_at(first, cols).t()
    }

    /// Element (i, j).
    pub fn at(&self, i: usize, j: usize) -> f32 {
        assert!(
            i < self.rows && j < self.cols,
            "({i}, {j}) outside the matrix"
        );
        let index = self.offset + i as isize * self.row_stride + j as isize * self.col_stride;
        self.data[usize::try_from(index).expect("an element before the buffer")]
    }

    /// Row i: borrowed where its elements are adjacent (`col_stride` 1, as every head's rows
    /// of queries, keys and values are), gathered otherwise.
    pub fn row(&self, i: usize) -> Cow<'a, [f32]> {
        if self.col_stride != 1 || self.cols == 0 {
            return (0..self.cols).map(|j| self.at(i, j)).collect();
        }
        assert!(i < self.rows, "row {i} outside the matrix of {}", self.rows);
        let start = self.offset + i as isize * self.row_stride;
        let start = usize::try_from(start).expect("a row before the buffer");
        Cow::Borrowed(&self.data[start..start + self.cols])
    }

    /// Pointer to element (0, 0); panics unless every element lies in `data`, which is what
    /// makes gemm's reads through it sound.
    fn start(&self) -> *const f32 {
        if self.rows > 0 && self.cols > 0 {
            let overflow = "matrix extent overflows";
            let extent = |n: usize, stride: isize| {
                isize::try_from(n - 1)
                    .ok()
                    .and_then(|n| n.checked_mul(stride))
                    .expect(overflow)
            };
            let (last_row, last_col) = (
                extent(self.rows, self.row_stride),
                extent(self.cols, self.col_stride),
            );
            let corner = last_row.checked_add(last_col).expect(overflow);
            let reach = [0, last_row, last_col, corner];
            let (low, high) = (reach.iter().min().unwrap(), reach.iter().max().unwrap());
            let (low, high) = (
                self.offset.checked_add(*low).expect(overflow),
                self.offset.checked_add(*high).expect(overflow),
            );
            assert!(
                low >= 0 && high < self.data.len() as isize,
                "a matrix at offset {} reaches outside its {} elements",
                self.offset,
                self.data.len()
            );
        }
        self.data.as_ptr().wrapping_offset(self.offset)
    }
}

/// A stack of matrices of one shape and strides at `offsets` in one buffer.
pub struct Matrices<'a> {
    pub data: &'a [f32],
    pub offsets: Vec<isize>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl<'a> Matrices<'a> {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn get(&self, b: usize) -> Matrix<'a> {
        Matrix {
            data: self.data,
            offset: self.offsets[b],
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// `dst = scale · lhs · rhs`, `dst` row-major from its first element with rows `dst_stride`
/// apart; only the product's elements are written, and `dst` is never read.
pub fn product_into(
    dst: &mut [MaybeUninit<f32>],
    dst_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    parallelism: Parallelism,
) {
    check_destination(dst.len(), dst_stride, lhs.rows, rhs.cols);
    // SAFETY: `dst` holds the m × n block (checked) and is borrowed mutably.
    unsafe { product_raw(dst.as_mut_ptr(), dst_stride, lhs, rhs, scale, parallelism) }
}

/// Panics unless `len` elements hold an `m × n` block with rows `stride` apart.
fn check_destination(len: usize, stride: usize, m: usize, n: usize) {
    let needed = m
        .checked_sub(1)
        .map(|last| last.checked_mul(stride).and_then(|e| e.checked_add(n)));
    assert!(
        n <= stride && needed.is_none_or(|needed| needed.is_some_and(|needed| len >= needed)),
        "matrix product: {m} × {n} does not fit its destination"
    );
}

/// [`product_into`] through a pointer.
///
/// # Safety
/// `dst` must be valid for writes of the `lhs.rows × rhs.cols` block with rows `dst_stride`
/// apart, and nothing else may access that block during the call.
unsafe fn product_raw(
    dst: *mut MaybeUninit<f32>,
    dst_stride: usize,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    parallelism: Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matrix product: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) lies in the block the caller guarantees.
                unsafe { dst.add(i * dst_stride + j).write(MaybeUninit::new(0.0)) };
            }
        }
        return;
    }
    let (lhs_start, rhs_start) = (lhs.start(), rhs.start());
    // SAFETY: both operands lie in their buffers (`start` checks), the caller guarantees the
    // destination block, and gemm writes it without reading it (read_dst false).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.cast::<f32>(),
            1,
            dst_stride as isize,
            false,
            lhs_start,
            lhs.col_stride,
            lhs.row_stride,
            rhs_start,
            rhs.col_stride,
            rhs.row_stride,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A large product into the row-major `m × n` `dst`, split across `parts` threads in blocks of
/// rows (or of columns, when it has fewer rows than columns), each one single-threaded gemm.
/// Inside a training step this keeps both cores busy where gemm's own split of the same
/// product left one idle for part of it (docs/performance.md).
fn split_product(dst: &mut [MaybeUninit<f32>], lhs: Matrix, rhs: Matrix, parts: usize) {
    let (m, n) = (lhs.rows, rhs.cols);
    check_destination(dst.len(), n, m, n);
    if m >= n {
        let block = m.div_ceil(parts);
        dst.par_chunks_mut(block * n)
            .enumerate()
            .for_each(|(i, dst)| {
                let rows = lhs.rows_at(i * block, dst.len() / n);
                product_into(dst, n, rows, rhs, 1.0, Parallelism::None)
            });
    } else {
        let block = n.div_ceil(parts);
        let dst = SharedDestination(dst.as_mut_ptr());
        (0..n.div_ceil(block)).into_par_iter().for_each(|i| {
            let cols = rhs.cols_at(i * block, block.min(n - i * block));
            // SAFETY: `dst` holds the m × n block (checked above); the column blocks are
            // disjoint, so each task writes elements no other task touches.
            unsafe { product_raw(dst.at(i * block), n, lhs, cols, 1.0, Parallelism::None) }
        });
    }
}

/// The destination of a product split by columns, shared by its tasks.
struct SharedDestination(*mut MaybeUninit<f32>);

// SAFETY: the tasks sharing it write disjoint elements (see `split_product`).
unsafe impl Send for SharedDestination {}
unsafe impl Sync for SharedDestination {}

impl SharedDestination {
    fn at(&self, offset: usize) -> *mut MaybeUninit<f32> {
        self.0.wrapping_add(offset)
    }
}

/// `lhs[b] · rhs[b]` for every b, as a contiguous `[batch, m, n]` buffer.
pub fn matmul(lhs: &Matrices, rhs: &Matrices) -> Vec<f32> {
    let (batch, m, k, n) = (lhs.len(), lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.len(), batch, "matmul: batch sizes differ");
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    let size = batch
        .checked_mul(m * n)
        .expect("matmul: output size overflows");
    let mut out: Box<[MaybeUninit<f32>]> = Box::new_uninit_slice(size);
    if m * n > 0 {
        let threads = rayon::current_num_threads();
        if threads > 1 && m * n * k >= PARALLEL_PRODUCT {
            for (b, dst) in out.chunks_mut(m * n).enumerate() {
                split_product(dst, lhs.get(b), rhs.get(b), threads);
            }
        } else if threads == 1 || batch == 1 {
            for (b, dst) in out.chunks_mut(m * n).enumerate() {
                product_into(dst, n, lhs.get(b), rhs.get(b), 1.0, Parallelism::None);
            }
        } else {
            out.par_chunks_mut(m * n).enumerate().for_each(|(b, dst)| {
                product_into(dst, n, lhs.get(b), rhs.get(b), 1.0, Parallelism::None)
            });
        }
    }
    // SAFETY: every m × n block was written by `product_into` (none when m·n is 0).
    unsafe { out.assume_init() }.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row-major `rows × cols` matrix at `offset` in `data`, as a stack.
    fn single(data: &[f32], offset: isize, rows: usize, cols: usize) -> Matrices<'_> {
        Matrices {
            data,
            offsets: vec![offset],
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

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
    }

    #[test]
    fn large_products_split_across_threads_by_rows_or_columns_multiply_as_the_naive_loop_does() {
        let data: Vec<f32> = (0..200_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        // Three threads: uneven blocks. More rows than columns splits rows, else columns
        // (the right operand read transposed).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let by_rows = (single(&data, 0, 301, 200), single(&data, 70_000, 200, 130));
        let mut by_cols = (single(&data, 5, 80, 200), single(&data, 100_000, 200, 490));
        by_cols.1.row_stride = 1;
        by_cols.1.col_stride = 200;
        for (lhs, rhs) in [by_rows, by_cols] {
            assert!(lhs.rows * lhs.cols * rhs.cols >= PARALLEL_PRODUCT);
            let (fast, slow) = (pool.install(|| matmul(&lhs, &rhs)), reference(&lhs, &rhs));
            assert_eq!(fast.len(), lhs.rows * rhs.cols);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_row_is_its_elements_whether_adjacent_or_strided() {
        let data: Vec<f32> = (0..200).map(|i| i as f32).collect();
        // 5 × 7 at offset 7 with rows 9 apart, and its transpose (columns 9 apart).
        let dense = Matrix {
            data: &data,
            offset: 7,
            rows: 5,
            cols: 7,
            row_stride: 9,
            col_stride: 1,
        };
        let transposed = dense.t();
        for (m, borrowed) in [(dense, true), (transposed, false)] {
            for i in 0..m.rows {
                let row = m.row(i);
                assert_eq!(matches!(row, Cow::Borrowed(_)), borrowed);
                let expected: Vec<f32> = (0..m.cols).map(|j| m.at(i, j)).collect();
                assert_eq!(row.as_ref(), expected.as_slice(), "row {i}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "reaches outside")]
    fn a_matrix_past_the_end_of_its_buffer_is_refused() {
        let data = [1.0f32; 10];
        // Rows 4..12 of a 10-element buffer.
        matmul(&single(&data, 4, 2, 4), &single(&data, 0, 4, 1));
    }
}
