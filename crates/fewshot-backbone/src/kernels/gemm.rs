//! A bounds-checked front to the `gemm` crate's matrix product.

use std::mem::MaybeUninit;
use std::sync::Once;

use candle_core::WithDType;
use gemm::Parallelism;

/// A read-only matrix view: element (r, c) is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// `rows` x `cols` stored row after row, `data.len() >= rows * cols`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The same elements seen as the transpose.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element the view can address lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// Products smaller than this many multiply-adds run on one thread: waking
/// the others costs more than they save.
const MIN_PARALLEL_MULTIPLY_ADDS: usize = 1 << 22;

/// The gemm crate's largest threshold for copying the left operand of its
/// (column-major) product into packed panels: it packs whenever the product
/// has more than `threshold x 6` columns, which for our products means the
/// filter dimension of every 64-filter layer. Our operands are laid out so
/// that the microkernel reads them as they are (conv.rs), and the copies cost
/// ~5% of a MAML task step and of a ProtoNets episode (A/B in
/// docs/RESULTS.md, "Operands left unpacked"); the products' sums run in the
/// same order either way, so results are the same bit for bit.
const LHS_PACKING_THRESHOLD: usize = 256;

/// Sets the threshold once per process. It is the gemm crate's global, so
/// candle's own products (a learner's linear head) follow it too.
fn leave_operands_unpacked() {
    static SET: Once = Once::new();
    SET.call_once(|| {
        gemm::set_lhs_packing_threshold_single_thread(LHS_PACKING_THRESHOLD);
        gemm::set_lhs_packing_threshold_multi_thread(LHS_PACKING_THRESHOLD);
    });
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` with `accumulate`; `dst` is
/// row-major `lhs.rows` x `rhs.cols`. `parallel` lets a large product use all
/// of rayon's threads (for a single product rather than many small ones
/// already running in parallel).
pub fn matmul<T: WithDType>(
    dst: &mut [T],
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    accumulate: bool,
    parallel: bool,
) {
    // These are invariants of the kernels, not user input: a failure is a bug,
    // and the unsafe call below relies on them.
    assert!(
        dst.len() >= lhs.rows * rhs.cols,
        "matmul: destination too small"
    );
    // SAFETY: `dst` holds the whole product and is borrowed mutably.
    unsafe { product(dst.as_mut_ptr(), lhs, rhs, accumulate, parallel) }
}

/// `dst = lhs * rhs` into a buffer nobody has written yet: the product
/// initialises every element of `dst`, which must be exactly its size.
pub fn matmul_uninit<T: WithDType>(
    dst: &mut [MaybeUninit<T>],
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    parallel: bool,
) {
    assert_eq!(
        dst.len(),
        lhs.rows * rhs.cols,
        "matmul: destination is not the product's size"
    );
    // SAFETY: as for `matmul`; without `accumulate` the product never reads
    // `dst` and writes each of its elements (zero when the inner dimension is).
    unsafe { product(dst.as_mut_ptr().cast(), lhs, rhs, false, parallel) }
}

/// The product `lhs * rhs` in a new row-major vector.
pub(super) fn new_product<T: WithDType>(
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    parallel: bool,
) -> Vec<T> {
    // SAFETY: `matmul_uninit` writes every element of its destination.
    unsafe {
        super::filled_by(lhs.rows * rhs.cols, |dst| {
            matmul_uninit(dst, lhs, rhs, parallel)
        })
    }
}

/// # Safety
/// `dst` must be valid for writes (and reads, with `accumulate`) of
/// `lhs.rows * rhs.cols` elements and alias neither input.
unsafe fn product<T: WithDType>(
    dst: *mut T,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    leave_operands_unpacked();
    let parallelism = match parallel && m * n * k >= MIN_PARALLEL_MULTIPLY_ADDS {
        true => Parallelism::Rayon(super::threads()),
        false => Parallelism::None,
    };
    // SAFETY: the views are in bounds (asserted above) and the caller vouches
    // for `dst`. Without `accumulate` (`read_dst` false) the gemm crate
    // writes every element of `dst` without reading it, zero when `k` is 0.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_with_transposed_views_and_accumulation() {
        // a: 2x3, b: 3x2 (stored as its 2x3 transpose).
        let a = [1f64, 2., 3., 4., 5., 6.];
        let b_t = [1f64, 0., -1., 2., 1., 0.];
        let mut dst = [10f64; 4];
        matmul(
            &mut dst,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b_t, 2, 3).t(),
            false,
            false,
        );
        assert_eq!(dst, [-2., 4., -2., 13.]);
        matmul(
            &mut dst,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b_t, 2, 3).t(),
            true,
            true,
        );
        assert_eq!(dst, [-4., 8., -4., 26.]);
    }

    #[test]
    fn a_product_leaves_the_left_operand_unpacked() {
        let a = [1f32, 2., 3., 4.];
        let mut dst = [0f32; 4];
        let square = MatRef::row_major(&a, 2, 2);
        matmul(&mut dst, square, square, false, false);
        assert_eq!(dst, [7., 10., 15., 22.]);
        assert_eq!(
            gemm::get_lhs_packing_threshold_single_thread(),
            LHS_PACKING_THRESHOLD
        );
        assert_eq!(
            gemm::get_lhs_packing_threshold_multi_thread(),
            LHS_PACKING_THRESHOLD
        );
    }

    #[test]
    fn uninitialised_destinations_get_every_element() {
        let a = [1f64, 2., 3., 4., 5., 6.];
        let b_t = [1f64, 0., -1., 2., 1., 0.];
        let mut dst = [MaybeUninit::new(f64::NAN); 4];
        matmul_uninit(
            &mut dst,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b_t, 2, 3).t(),
            false,
        );
        assert_eq!(dst.map(|v| unsafe { v.assume_init() }), [-2., 4., -2., 13.]);
        // An empty inner dimension makes a product of zeros, not stale values.
        let mut dst = [MaybeUninit::new(f64::NAN); 4];
        matmul_uninit(
            &mut dst,
            MatRef::row_major(&a[..0], 2, 0),
            MatRef::row_major(&b_t[..0], 0, 2),
            false,
        );
        assert_eq!(dst.map(|v| unsafe { v.assume_init() }), [0.; 4]);
    }
}
