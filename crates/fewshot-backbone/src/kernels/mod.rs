//! CPU kernels for the backbone's hot ops, as candle custom ops.
//!
//! candle's CPU convolution computes input gradients with a scalar
//! `conv_transpose2d`, and its strided per-channel reductions and chains of
//! elementwise ops make batch norm the bulk of a backward pass. These kernels
//! replace them on the CPU: convolution through im2col and the `gemm` crate
//! (the one candle itself uses for matrix products), per-channel reductions
//! and affine maps in one pass each, and max-pooling and ReLU whose gradients
//! touch only the winning elements.
//!
//! Every op here is differentiable to any order: its backward is written in
//! terms of ops of this same module (the convolution's input gradient is itself
//! a custom op whose backward is a convolution, and so on), so second-order
//! MAML differentiates through them exactly. [`crate::ops`] routes CPU tensors
//! of f32 and f64 here and everything else to candle's own ops (the portable
//! path, which [`crate::ops::path`] can also force on the CPU).
//!
//! The glue ([`Kernel1`]..[`Kernel3`], [`apply1`]..[`apply3`]) and the
//! matrix product ([`matmul`]) are public so that a learner crate can add
//! kernels of its own the same way.

mod batch_norm;
mod batch_norm_relu_pool;
mod channel;
mod conv;
mod conv_block;
mod gemm;
mod kept;
mod op;
mod pool;
mod transpose;
mod unfold;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Tensor};

pub use self::gemm::{matmul, MatRef};
pub use batch_norm::batch_norm_relu;
pub use batch_norm_relu_pool::batch_norm_relu_pool;
pub use channel::{batch_norm, channel_affine, channel_dot, channel_moments, channel_sum, relu};
pub use conv::{conv2d, conv2d_input_grad, conv2d_per_sample, conv2d_weight_grad, ConvGeometry};
pub use conv_block::conv_batch_norm_relu_pool;
pub use op::{apply1, apply2, apply3, gradient_if, Kernel1, Kernel2, Kernel3};
pub use pool::max_pool2x2;

/// Whether `tensor` takes the kernels of this module: a CPU tensor of f32 or
/// f64, unless the portable path is forced ([`crate::ops::path`]).
pub fn supports(tensor: &Tensor) -> bool {
    tensor.device().is_cpu()
        && matches!(tensor.dtype(), DType::F32 | DType::F64)
        && crate::ops::path::current() == crate::ops::path::OpsPath::Kernels
}

/// Floating-point operations the convolution kernels have run since the
/// program started (two per multiply-add): the numerator of the achieved
/// GFLOP/s that `fewshot bench --suite kernels` reports.
pub fn convolution_flops() -> u64 {
    CONV_FLOPS.load(Ordering::Relaxed)
}

static CONV_FLOPS: AtomicU64 = AtomicU64::new(0);

fn count_flops(flops: usize) {
    CONV_FLOPS.fetch_add(flops as u64, Ordering::Relaxed);
}

/// Elements below which an elementwise op or reduction is not worth splitting
/// across threads: waking a thread costs more than the work (MAML's support
/// sets are this small).
const MIN_PARALLEL_ELEMENTS: usize = 1 << 16;

/// Threads the kernels may use: the size of rayon's pool.
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A vector of `len` elements written by `fill` alone, without a first pass
/// that zeroes them: for the convolutions' im2col matrices and products,
/// which are overwritten whole (zeroing them was ~3% of a conv-4 training
/// step, `perf record` of `fewshot bench --suite kernels`).
///
/// # Safety
/// `fill` must initialise every element of the slice it is given.
unsafe fn filled_by<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut vec = Vec::with_capacity(len);
    fill(&mut vec.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `fill` initialised the first `len` elements.
    unsafe { vec.set_len(len) };
    vec
}
