//! The backbone's hot ops built from candle's own ops: what runs on devices
//! and dtypes without kernels of [`crate::kernels`], and the reference those
//! kernels are tested against. Each is correct to second order.

use candle_core::Tensor;

use crate::error::Result;

pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    Ok(x.conv2d(weight, padding, stride, 1, 1)?)
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

pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}

/// A reshape and two max reductions, because candle's `max_pool2d` gradient
/// is scaled by 1/4. Needs at least 2x2 pixels.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let x = x.narrow(2, 0, oh * 2)?.narrow(3, 0, ow * 2)?;
    let windows = x.reshape((n, c, oh, 2, ow, 2))?;
    Ok(windows.max(5)?.max(3)?)
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
