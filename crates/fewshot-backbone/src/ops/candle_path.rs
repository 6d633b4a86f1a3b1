//! The backbone's hot ops built from candle's own ops: what runs on devices
//! and dtypes without kernels of [`crate::kernels`], and the reference those
//! kernels are tested against. Each is correct to second order.

use candle_core::Tensor;

use crate::error::Result;

/// candle's convolution, except where the last window leaves rows or
/// columns over: there candle's input gradient (a transposed convolution)
/// comes out the wrong size, so the input is padded by hand and cut to
/// exactly the windows' extent first (the cut rows get a zero gradient).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let k = weight.dim(2)?;
    let leftover = |size: usize| (size + 2 * padding).saturating_sub(k) % stride;
    if leftover(h) == 0 && leftover(w) == 0 {
        return Ok(x.conv2d(weight, padding, stride, 1, 1)?);
    }
    let padded = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
    let fitted = padded.narrow(2, 0, h + 2 * padding - leftover(h))?.narrow(
        3,
        0,
        w + 2 * padding - leftover(w),
    )?;
    Ok(fitted.conv2d(weight, 0, stride, 1, 1)?)
}

pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let channels = x.dim(1)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    let normalised = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let gamma = gamma.reshape((1, channels, 1, 1))?;
    let beta = beta.reshape((1, channels, 1, 1))?;
    Ok(normalised.broadcast_mul(&gamma)?.broadcast_add(&beta)?)
}

/// Per-channel mean and biased variance over N, H and W: two (C) tensors.
pub fn channel_moments(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim((0, 2, 3))?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean((0, 2, 3))?;
    Ok((mean.flatten_all()?, var))
}

/// `x * scale[c] + shift[c]`.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let channels = x.dim(1)?;
    let scale = scale.reshape((1, channels, 1, 1))?;
    let shift = shift.reshape((1, channels, 1, 1))?;
    Ok(x.broadcast_mul(&scale)?.broadcast_add(&shift)?)
}

/// A select on `x > 0`, not candle's `relu`: that one passes the gradient
/// at exactly 0, where the CPU kernel (and PyTorch) pass none. The two
/// differ where it matters: Meta Networks' fast weights start at exactly 0.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gt(0.0)?.where_cond(x, &x.zeros_like()?)?)
}

/// Each window's first maximum (top-left, top-right, bottom-left,
/// bottom-right: the CPU kernel's order and PyTorch's) picked by a constant
/// one-hot mask, so the gradient goes to that pixel alone. Not candle's
/// `max_pool2d` (its gradient is scaled by 1/4) nor its `max` reduction,
/// whose gradient goes to every tied pixel: ties are everywhere in the
/// flat background of a drawing. Needs at least 2x2 pixels.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let x = x.narrow(2, 0, oh * 2)?.narrow(3, 0, ow * 2)?;
    let windows = x
        .reshape((n, c, oh, 2, ow, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, oh, ow, 4))?;
    let values = windows.detach();
    let is_max = values.broadcast_eq(&values.max_keepdim(4)?)?;
    let maxima_so_far = is_max.to_dtype(x.dtype())?.cumsum(4)?;
    let first = is_max.mul(&maxima_so_far.eq(1.0)?)?;
    // A select, not a product with the mask: the -inf padding of
    // `max_pool2x2_ceil` times 0 would be NaN.
    Ok(first.where_cond(&windows, &windows.zeros_like()?)?.sum(4)?)
}

/// [`crate::ops::conv2d_per_sample`] (arguments checked there): each image
/// unfolded into its K*K shifted copies, then one batched product.
pub fn conv2d_per_sample(x: &Tensor, weights: &Tensor, padding: usize) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let (_, cout, _, k, _) = weights.dims5()?;
    let padded = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
    let (oh, ow) = (h + 2 * padding - k + 1, w + 2 * padding - k + 1);
    let mut shifted = Vec::with_capacity(k * k);
    for dy in 0..k {
        for dx in 0..k {
            shifted.push(padded.narrow(2, dy, oh)?.narrow(3, dx, ow)?);
        }
    }
    // (N, Cin, K*K, OH, OW): the row order of a (Cout, Cin, K, K) weight.
    let columns = Tensor::stack(&shifted, 2)?.reshape((n, cin * k * k, oh * ow))?;
    let out = weights.reshape((n, cout, cin * k * k))?.matmul(&columns)?;
    Ok(out.reshape((n, cout, oh, ow))?)
}
