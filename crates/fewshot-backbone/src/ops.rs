//! Every differentiable op the backbones and learners use, in one place.
//!
//! Learners call these functions instead of candle's tensor methods. On the
//! CPU, in f32 and f64, convolution, batch norm, ReLU and max-pooling run on
//! the kernels of [`crate::kernels`]; on other devices and dtypes they are
//! built from candle ops, the portable path ([`candle_path`]; [`path`] forces
//! it on the CPU, for tests). Either way every op here is correct to second
//! order (see the gradient tests in `tests/gradients.rs`, which CI runs on
//! both paths, and `tests/kernels.rs`); in particular the portable path
//! avoids candle's `max_pool2d` (its gradient is scaled by 1/(k*k)) and
//! `softmax_last_dim` (no backward).

use candle_core::{DType, Tensor, D};

use crate::error::{BackboneError, Result};
use crate::kernels;

pub mod candle_path;
pub mod path;

/// Whether `op` runs on the CPU kernels for `x` (else the portable path),
/// after [`path::with_f64_forbidden`]'s check.
fn on_kernels(op: &'static str, x: &Tensor) -> Result<bool> {
    path::check_dtype(op, x)?;
    Ok(kernels::supports(x))
}

/// 2-D convolution without bias (a bias before batch norm is cancelled by it).
/// `x`: (N, Cin, H, W), `weight`: (Cout, Cin, K, K).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    match on_kernels("conv2d", x)? {
        true => Ok(kernels::conv2d(x, weight, stride, padding)?),
        false => candle_path::conv2d(x, weight, stride, padding),
    }
}

/// Batch normalisation with the statistics of this batch (transductive, as MAML
/// uses it at meta-test time too): per channel over N, H and W, biased variance.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    match on_kernels("batch_norm", x)? {
        true => Ok(kernels::batch_norm(x, gamma, beta, eps)?),
        false => candle_path::batch_norm(x, gamma, beta, eps),
    }
}

/// `relu(batch_norm(x))`, fused into one pass on the CPU.
pub fn batch_norm_relu(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    match on_kernels("batch_norm_relu", x)? {
        true => Ok(kernels::batch_norm_relu(x, gamma, beta, eps)?),
        false => candle_path::relu(&candle_path::batch_norm(x, gamma, beta, eps)?),
    }
}

/// `max_pool2x2(relu(batch_norm(x)))`, a max-pooling block's ending, fused
/// into one op on the CPU (the full-size activation is never written).
pub fn batch_norm_relu_pool(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    check_poolable(x)?;
    match on_kernels("batch_norm_relu_pool", x)? {
        true => Ok(kernels::batch_norm_relu_pool(x, gamma, beta, eps)?),
        false => max_pool2x2(&batch_norm_relu(x, gamma, beta, eps)?),
    }
}

/// `batch_norm_relu_pool(conv2d(x, weight, stride, padding), gamma, beta,
/// eps)`: a max-pooling block whole, one op on the CPU (the convolution's
/// output never passes through candle's gradient accumulation; see
/// `kernels/conv_block.rs`). The values are those of the two ops apart.
pub fn conv_batch_norm_relu_pool(
    x: &Tensor,
    weight: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (stride, padding): (usize, usize),
    eps: f64,
) -> Result<Tensor> {
    match on_kernels("conv_batch_norm_relu_pool", x)? {
        true => Ok(kernels::conv_batch_norm_relu_pool(
            x,
            weight,
            (gamma, beta),
            (stride, padding),
            eps,
        )?),
        false => batch_norm_relu_pool(&conv2d(x, weight, stride, padding)?, gamma, beta, eps),
    }
}

/// `relu(batch_norm(x))` normalised with the statistics of the first
/// `reference_rows` images of `x` only, applied to all of them. With the
/// support set as the reference, each query is normalised by its task's
/// support set alone: predictions that do not depend on the other queries
/// (non-transductive), where batch statistics of the queries would.
pub fn batch_norm_relu_by_reference(
    x: &Tensor,
    reference_rows: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if reference_rows == 0 || reference_rows > x.dim(0)? {
        return Err(BackboneError::InvalidConfig {
            field: "batch norm reference rows",
            value: reference_rows.to_string(),
            reason: format!("must be between 1 and the batch size {}", x.dim(0)?),
        });
    }
    let (mean, var) = channel_moments(&x.narrow(0, 0, reference_rows)?)?;
    batch_norm_relu_with_statistics(x, &mean, &var, gamma, beta, eps)
}

/// Per-channel mean and biased variance of `x` (N, C, H, W) over N, H and
/// W: two (C) tensors, the statistics [`batch_norm`] normalises by.
pub fn channel_moments(x: &Tensor) -> Result<(Tensor, Tensor)> {
    match on_kernels("channel_moments", x)? {
        true => {
            let moments = kernels::channel_moments(x)?;
            Ok((moments.get(0)?, moments.get(1)?))
        }
        false => candle_path::channel_moments(x),
    }
}

/// `relu(batch_norm(x))` with given per-channel statistics (C) instead of
/// the batch's: batch norm at inference, with statistics estimated on
/// training data, as PyTorch's `eval()` mode uses its running averages.
pub fn batch_norm_relu_with_statistics(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let scale = gamma.div(&(var + eps)?.sqrt()?)?;
    let shift = beta.sub(&mean.mul(&scale)?)?;
    let normalised = match on_kernels("batch_norm_relu_with_statistics", x)? {
        true => kernels::channel_affine(x, &scale, &shift)?,
        false => candle_path::channel_affine(x, &scale, &shift)?,
    };
    relu(&normalised)
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    match on_kernels("relu", x)? {
        true => Ok(kernels::relu(x)?),
        false => candle_path::relu(x),
    }
}

/// 2x2 max-pooling with stride 2, floor mode (an odd last row or column is
/// dropped, as PyTorch's default).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    check_poolable(x)?;
    match on_kernels("max_pool2x2", x)? {
        true => Ok(kernels::max_pool2x2(x)?),
        false => candle_path::max_pool2x2(x),
    }
}

/// A 2x2 pooling needs at least 2x2 pixels.
fn check_poolable(x: &Tensor) -> Result<()> {
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        return Err(BackboneError::InvalidConfig {
            field: "max_pool2x2 input",
            value: format!("{h}x{w}"),
            reason: "needs at least 2x2 pixels".to_string(),
        });
    }
    Ok(())
}

/// 2x2 max-pooling with stride 2 in ceil mode (Chainer's default and Meta
/// Networks': 28 -> 14 -> 7 -> 4 -> 2 -> 1): an odd last row or column forms
/// a window of its own. The input is padded with -inf, which never wins a
/// window, so the gradient is [`max_pool2x2`]'s on the real pixels.
pub fn max_pool2x2_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut padded = x.clone();
    for (axis, size) in [(2, h), (3, w)] {
        if size % 2 == 1 {
            let mut shape = padded.dims().to_vec();
            shape[axis] = 1;
            // Made in f32: devices without f64 run this too.
            let edge = Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())?;
            padded = Tensor::cat(&[&padded, &edge], axis)?;
        }
    }
    max_pool2x2(&padded)
}

/// Convolution with a different weight for every image, stride 1:
/// `x`: (N, Cin, H, W), `weights`: (N, Cout, Cin, K, K) -> (N, Cout, H', W').
/// Differentiable to any order in both arguments.
pub fn conv2d_per_sample(x: &Tensor, weights: &Tensor, padding: usize) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let (wn, _, wcin, k, k2) = weights.dims5()?;
    if wn != n || wcin != cin || k != k2 || h + 2 * padding < k || w + 2 * padding < k {
        return Err(BackboneError::InvalidConfig {
            field: "conv2d_per_sample weights",
            value: format!("{:?}", weights.dims()),
            reason: format!(
                "expected ({n}, Cout, {cin}, K, K) with K at most the padded input {}x{}",
                h + 2 * padding,
                w + 2 * padding
            ),
        });
    }
    match on_kernels("conv2d_per_sample", x)? {
        true => Ok(kernels::conv2d_per_sample(x, weights, 1, padding)?),
        false => candle_path::conv2d_per_sample(x, weights, padding),
    }
}

/// A linear map with a different weight for every row, no bias:
/// `x`: (N, in), `weights`: (N, out, in) -> (N, out).
pub fn linear_per_sample(x: &Tensor, weights: &Tensor) -> Result<Tensor> {
    path::check_dtype("linear_per_sample", x)?;
    let (n, inputs) = x.dims2()?;
    let (wn, outputs, win) = weights.dims3()?;
    if wn != n || win != inputs {
        return Err(BackboneError::InvalidConfig {
            field: "linear_per_sample weights",
            value: format!("{:?}", weights.dims()),
            reason: format!("expected ({n}, out, {inputs})"),
        });
    }
    let out = weights.matmul(&x.unsqueeze(2)?)?;
    Ok(out.reshape((n, outputs))?)
}

/// Mean over the spatial axes: (N, C, H, W) -> (N, C).
pub fn spatial_mean(x: &Tensor) -> Result<Tensor> {
    path::check_dtype("spatial_mean", x)?;
    Ok(x.mean((2, 3))?)
}

/// (N, C, H, W) -> (N, C*H*W).
pub fn flatten(x: &Tensor) -> Result<Tensor> {
    path::check_dtype("flatten", x)?;
    Ok(x.flatten_from(1)?)
}

/// `x W^T + b` with `weight`: (out, in) and `bias`: (out).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    path::check_dtype("linear", x)?;
    let y = x.matmul(&weight.t()?)?;
    match bias {
        Some(b) => Ok(y.broadcast_add(b)?),
        None => Ok(y),
    }
}

/// Log-softmax over the last axis. The max is subtracted for stability and
/// detached: the result does not depend on it, so neither does its gradient.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    path::check_dtype("log_softmax", logits)?;
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let log_norm = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_norm)?)
}

/// Softmax over the last axis, differentiable (unlike candle's `softmax_last_dim`).
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(log_softmax(logits)?.exp()?)
}

/// One-hot rows for integer `labels` (N) -> (N, classes) of `dtype`.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?;
    let class_ids = Tensor::arange(0u32, classes as u32, labels.device())?;
    let hits = labels
        .unsqueeze(1)?
        .broadcast_eq(&class_ids.unsqueeze(0)?)?;
    let one_hot = hits.to_dtype(dtype)?;
    path::check_dtype("one_hot", &one_hot)?;
    Ok(one_hot)
}

/// Mean cross-entropy of `logits` (N, classes) against integer `labels` (N).
/// Uses a one-hot product rather than `gather`, whose backward goes through
/// scatter and is not needed here.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (rows, classes) = logits.dims2()?;
    if labels.dims() != [rows] {
        return Err(BackboneError::InvalidConfig {
            field: "labels",
            value: format!("{:?}", labels.dims()),
            reason: format!("expected one label per logit row ({rows})"),
        });
    }
    let targets = one_hot(labels, classes, logits.dtype())?;
    let picked = (log_softmax(logits)? * targets)?.sum(1)?;
    Ok(picked.mean(0)?.neg()?)
}

/// Fraction of rows whose largest logit is at the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let predicted = logits.argmax(D::Minus1)?;
    let correct = predicted
        .eq(&labels.to_dtype(DType::U32)?)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    Ok(path::to_host_f64(&correct)? / labels.elem_count() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_pool_takes_window_maxima_in_floor_mode() {
        let x = Tensor::arange(0f32, 30., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 6))
            .unwrap();
        let y = max_pool2x2(&x).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 3]);
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![7., 9., 11., 19., 21., 23.]);
    }

    #[test]
    fn max_pool_gradient_goes_to_the_maximum_unscaled() {
        // candle's own max_pool2d gives [0, 0, 0, 0.25] here.
        let x = candle_core::Var::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let grads = max_pool2x2(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![0., 0., 0., 1.]);
    }

    #[test]
    fn ceil_mode_pooling_keeps_odd_edges_as_windows() {
        let x = Tensor::arange(0f32, 15., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 5))
            .unwrap();
        let y = max_pool2x2_ceil(&x).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 3]);
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![6., 8., 9., 11., 13., 14.]);
        // 28 -> 14 -> 7 -> 4 -> 2 -> 1, as Meta Networks' Omniglot net.
        let mut side = Tensor::zeros((1, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let mut sides = Vec::new();
        for _ in 0..5 {
            side = max_pool2x2_ceil(&side).unwrap();
            sides.push(side.dim(2).unwrap());
        }
        assert_eq!(sides, vec![14, 7, 4, 2, 1]);
    }

    #[test]
    fn ceil_mode_pooling_gradient_reaches_edge_pixels() {
        let x = candle_core::Var::new(
            &[[[[1f32, 5., 2.], [3., 4., -7.], [9., 0., -8.]]]],
            &Device::Cpu,
        )
        .unwrap();
        let grads = max_pool2x2_ceil(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Windows {1,5,3,4}, {2,-7}, {9,0}, {-8}: winners 5, 2, 9 and -8.
        assert_eq!(g, vec![0., 1., 1., 0., 0., 0., 1., 0., 1.]);
    }

    #[test]
    fn per_sample_convolution_matches_one_convolution_per_image() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., (3, 2, 5, 4), &dev).unwrap();
        let w = Tensor::randn(0f64, 1., (3, 4, 2, 3, 3), &dev).unwrap();
        let y = conv2d_per_sample(&x, &w, 1).unwrap();
        assert_eq!(y.dims(), [3, 4, 5, 4]);
        for i in 0..3 {
            let one = conv2d(&x.narrow(0, i, 1).unwrap(), &w.get(i).unwrap(), 1, 1).unwrap();
            let diff = (one - y.narrow(0, i, 1).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 1e-12, "image {i}: {diff}");
        }
        let wrong = Tensor::zeros((2, 4, 2, 3, 3), DType::F64, &dev).unwrap();
        let err = conv2d_per_sample(&x, &wrong, 1).unwrap_err().to_string();
        assert!(err.contains("conv2d_per_sample"), "{err}");
    }

    #[test]
    fn per_sample_linear_matches_one_product_per_row() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f64, 2.], [3., 4.]], &dev).unwrap();
        let w = Tensor::new(
            &[
                [[1f64, 0.], [0., 1.], [1., 1.]],
                [[2., 0.], [0., 0.], [1., -1.]],
            ],
            &dev,
        )
        .unwrap();
        let y: Vec<Vec<f64>> = linear_per_sample(&x, &w).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![1., 2., 3.], vec![6., 0., -1.]]);
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[1f64, 2., 3.], [1., 1., 1.]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let first = -(3f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
        let second = 3f64.ln();
        assert!((loss - (first + second) / 2.).abs() < 1e-12, "{loss}");
    }

    #[test]
    fn cross_entropy_rejects_mismatched_labels() {
        let logits = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &labels).unwrap_err().to_string();
        assert!(err.contains("labels"), "{err}");
    }

    #[test]
    fn batch_norm_normalises_each_channel() {
        let x = Tensor::arange(0f64, 16., &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 2, 2))
            .unwrap();
        let gamma = Tensor::new(&[1f64, 2.], &Device::Cpu).unwrap();
        let beta = Tensor::new(&[0f64, 1.], &Device::Cpu).unwrap();
        let y = batch_norm(&x, &gamma, &beta, 0.).unwrap();
        let per_channel = y.transpose(0, 1).unwrap().flatten_from(1).unwrap();
        let mean: Vec<f64> = per_channel.mean(1).unwrap().to_vec1().unwrap();
        let std: Vec<f64> = per_channel
            .broadcast_sub(&per_channel.mean_keepdim(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (mean[0]).abs() < 1e-12 && (mean[1] - 1.).abs() < 1e-12,
            "{mean:?}"
        );
        assert!(
            (std[0] - 1.).abs() < 1e-12 && (std[1] - 2.).abs() < 1e-12,
            "{std:?}"
        );
    }

    #[test]
    fn accuracy_counts_argmax_hits() {
        let logits = Tensor::new(&[[0f32, 1.], [2., 1.], [0., 5.]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32, 1, 1], &Device::Cpu).unwrap();
        assert!((accuracy(&logits, &labels).unwrap() - 2. / 3.).abs() < 1e-12);
    }
}
