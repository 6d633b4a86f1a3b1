//! Batch norm followed by ReLU as one op, with batch statistics.
//!
//! As one op its input gets a single gradient from the backward pass rather
//! than one per use (the statistics and the normalisation each use it), which
//! saves candle a zero-fill and an addition over the whole activation per
//! layer; the backward is two passes: two masked sums, and one pass for the
//! input gradient (the forward keeps the statistics for it).
//!
//! With `s = gamma / sqrt(var + eps)`, `shift = beta - mean * s`, the output is
//! `relu(x * s + shift)`. With `m = [output > 0]` and `M` values per channel,
//! the gradients are
//!
//! ```text
//! dbeta  = sum m g
//! dgamma = (sum m g x - mean * dbeta) / sqrt(var + eps)
//! dx     = m g s + x A + B,  A = -s dgamma / (M sqrt(var + eps)),  B = -s dbeta / M - A mean
//! ```
//!
//! The backward is written with differentiable ops (`channel_moments`,
//! `masked_sums`, C-vector arithmetic and [`InputGrad`], whose own backward is
//! built from channel ops), so second-order gradients are exact.

use candle_core::{Result, Tensor, WithDType};

use super::channel::{
    channel_affine, channel_dot, channel_sum, kept_moments, masked_sums, normalising_coefficients,
    Channels, Moments,
};
use super::kept::KeptTensor;
use super::op::{gradient_if, Kernel1, Kernel3};

/// `relu(batch_norm(x))` with the statistics of this batch.
pub fn batch_norm_relu(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let channels = Channels::of(x)?;
    channels.check_vector("batch_norm_relu gamma", gamma)?;
    channels.check_vector("batch_norm_relu beta", beta)?;
    let moments = KeptTensor::new("batch_norm_relu statistics");
    super::op::apply3(
        x,
        gamma,
        beta,
        BatchNormRelu {
            channels,
            eps,
            moments,
        },
    )
}

/// `[x * s + shift > 0] * g * s + x * A + B`, coefficients (4, C) = (s, shift, A, B).
fn input_grad(g: &Tensor, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
    super::op::apply3(g, x, coefficients, InputGrad(Channels::of(x)?))
}

/// The gradients of batch norm with batch statistics followed by ReLU (and
/// maybe more), given `moments`, the forward's `channel_moments(x)` as a
/// tensor of the graph, `sums`, the per-channel `[sum m g x, sum m g]` of the
/// gradient `g` reaching the pixels that passed, and `input_grad`, dx from
/// the coefficients `(s, shift, A, B)`, (4, C). Built from differentiable
/// ops, so second order is exact whenever `sums` and `input_grad` are.
#[allow(clippy::type_complexity)]
pub(super) fn backward_with_statistics(
    x: &Tensor,
    moments: &Tensor,
    (gamma, beta, eps): (&Tensor, &Tensor, f64),
    sums: impl FnOnce() -> Result<Tensor>,
    input_grad: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let channels = Channels::of(x)?;
    let count = (channels.batch * channels.plane) as f64;
    let (mean, var) = (moments.get(0)?, moments.get(1)?);
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let scale = gamma.mul(&inv_std)?;
    let shift = beta.sub(&mean.mul(&scale)?)?;
    let sums = sums()?;
    let d_beta = sums.get(1)?;
    let d_gamma = inv_std.mul(&(sums.get(0)? - mean.mul(&d_beta)?)?)?;
    let dx = match x.track_op() {
        true => {
            let a = (scale.mul(&inv_std)?.mul(&d_gamma)? / -count)?;
            let b = ((scale.mul(&d_beta)? / -count)? - a.mul(&mean)?)?;
            Some(input_grad(&Tensor::stack(&[scale, shift, a, b], 0)?)?)
        }
        false => None,
    };
    let d_gamma = gamma.track_op().then_some(d_gamma);
    let d_beta = beta.track_op().then_some(d_beta);
    Ok((dx, d_gamma, d_beta))
}

struct BatchNormRelu {
    channels: Channels,
    eps: f64,
    /// The forward's statistics, for the backward.
    moments: KeptTensor,
}

struct InputGrad(Channels);

impl Kernel3 for BatchNormRelu {
    const NAME: &'static str = "fewshot-batch-norm-relu";

    fn run<T: WithDType>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let moments = Moments(self.channels).run(x);
        let (scale, shift) = normalising_coefficients(&moments, (gamma, beta, self.eps));
        self.moments.keep(T::to_cpu_storage_owned(moments));
        // SAFETY: each plane of the output is written whole.
        unsafe {
            self.channels.planes(|ch, at, out| {
                let (a, b) = (scale[ch], shift[ch]);
                let x = &x[at..at + out.len()];
                for (o, &v) in out.iter_mut().zip(x) {
                    let z = v * a + b;
                    o.write(if z > T::zero() { z } else { T::zero() });
                }
            })
        }
    }

    fn backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let moments = self.moments.tensor(|values| kept_moments(x, values))?;
        backward_with_statistics(
            x,
            &moments,
            (gamma, beta, self.eps),
            || masked_sums(grad, x, out),
            |coefficients| input_grad(grad, x, coefficients),
        )
    }
}

impl Kernel3 for InputGrad {
    const NAME: &'static str = "fewshot-batch-norm-relu-input-grad";

    fn run<T: WithDType>(&self, g: &[T], x: &[T], coefficients: &[T]) -> Vec<T> {
        let c = self.0.channels;
        // SAFETY: each plane of the output is written whole.
        unsafe {
            self.0.planes(|ch, at, out| {
                let [s, shift, a, b] = [0, 1, 2, 3].map(|row| coefficients[row * c + ch]);
                let (g, x) = (&g[at..at + out.len()], &x[at..at + out.len()]);
                for ((o, &g), &x) in out.iter_mut().zip(g).zip(x) {
                    let passed = if x * s + shift > T::zero() {
                        g * s
                    } else {
                        T::zero()
                    };
                    o.write(passed + x * a + b);
                }
            })
        }
    }

    /// Linear in `g`, and in `x` but for the mask (piecewise constant):
    /// d/dg = [z > 0] u s, d/dx = u A, d/ds = sum [z > 0] g u, d/dshift = 0,
    /// d/dA = sum u x, d/dB = sum u, with z = x s + shift.
    fn backward(
        &self,
        g: &Tensor,
        x: &Tensor,
        coefficients: &Tensor,
        _out: &Tensor,
        upstream: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [scale, shift, a, _] = [0, 1, 2, 3].map(|row| coefficients.get(row));
        let (scale, shift, a) = (scale?, shift?, a?);
        let zero = scale.zeros_like()?;
        let dg = match g.track_op() {
            true => {
                let only_mask = Tensor::stack(&[&scale, &shift, &zero, &zero], 0)?;
                Some(input_grad(upstream, x, &only_mask)?)
            }
            false => None,
        };
        let dx = gradient_if(x, || channel_affine(upstream, &a, &zero))?;
        let d_coefficients = match coefficients.track_op() {
            true => {
                let pre_activation = channel_affine(x, &scale, &shift)?;
                let d_scale = masked_sums(g, upstream, &pre_activation)?.get(0)?;
                let d_a = channel_dot(upstream, x)?;
                let d_b = channel_sum(upstream)?;
                Some(Tensor::stack(&[d_scale, zero, d_a, d_b], 0)?)
            }
            false => None,
        };
        Ok((dg, dx, d_coefficients))
    }
}
