//! Per-channel reductions and maps over (N, C, H, W) tensors, and ReLU: the
//! pieces batch norm is made of, one memory pass each.
//!
//! They close under differentiation: the gradient of `channel_sum` is a
//! broadcast, those of `channel_dot` and `channel_affine` are built from
//! `channel_affine`, `channel_dot` and `channel_sum`, and the gradient of
//! `relu` is a masking op whose own gradient is the same masking.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{Body1, Body2, Body3};

/// Elements below which an elementwise op is not worth splitting across threads.
const MIN_PARALLEL_ELEMENTS: usize = 1 << 14;

/// (N, C, plane) of a 4-D tensor.
#[derive(Debug, Clone, Copy)]
struct Channels {
    batch: usize,
    channels: usize,
    plane: usize,
}

impl Channels {
    fn of(x: &Tensor) -> Result<Self> {
        let (batch, channels, h, w) = x.dims4()?;
        Ok(Self {
            batch,
            channels,
            plane: h * w,
        })
    }

    fn check_vector(&self, op: &str, v: &Tensor) -> Result<()> {
        if v.dims() != [self.channels] {
            bail!(
                "{op}: expected one value per channel ({}), got shape {:?}",
                self.channels,
                v.dims()
            );
        }
        Ok(())
    }

    /// `f(channel, plane of x)` summed over every image, per channel.
    fn reduce<T: WithDType>(&self, f: impl Fn(usize, usize) -> f64 + Sync) -> Vec<T> {
        (0..self.channels)
            .into_par_iter()
            .map(|c| {
                let total: f64 = (0..self.batch)
                    .map(|n| f(c, (n * self.channels + c) * self.plane))
                    .sum();
                T::from_f64(total)
            })
            .collect()
    }

    /// Planes per parallel task for elementwise work.
    fn planes_per_task(&self) -> usize {
        MIN_PARALLEL_ELEMENTS.div_ceil(self.plane.max(1))
    }
}

/// Sum of `x` (N, C, H, W) over N, H and W: (C).
pub fn channel_sum(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Sum(Channels::of(x)?))
}

/// Per-channel inner product of `x` and `y`, both (N, C, H, W): (C).
pub fn channel_dot(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.dims() != y.dims() {
        bail!(
            "channel_dot: shapes {:?} and {:?} differ",
            x.dims(),
            y.dims()
        );
    }
    x.contiguous()?
        .apply_op2(&y.contiguous()?, Dot(Channels::of(x)?))
}

/// `x * scale[c] + shift[c]` for `x` (N, C, H, W), `scale` and `shift` (C).
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let channels = Channels::of(x)?;
    channels.check_vector("channel_affine scale", scale)?;
    channels.check_vector("channel_affine shift", shift)?;
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &shift.contiguous()?, Affine(channels))
}

/// `max(x, 0)`, with gradient 0 at 0 (as PyTorch).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Relu)
}

/// `grad` where `out > 0`, else 0.
fn relu_mask(grad: &Tensor, out: &Tensor) -> Result<Tensor> {
    grad.contiguous()?.apply_op2(&out.contiguous()?, ReluMask)
}

struct Sum(Channels);
struct Dot(Channels);
struct Affine(Channels);
struct Relu;
struct ReluMask;

impl Body1 for Sum {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        self.0
            .reduce(|_, at| x[at..at + plane].iter().map(|v| v.to_f64()).sum())
    }
}

impl Body2 for Dot {
    fn run<T: WithDType>(&self, x: &[T], y: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        self.0.reduce(|_, at| {
            x[at..at + plane]
                .iter()
                .zip(&y[at..at + plane])
                .map(|(a, b)| (*a * *b).to_f64())
                .sum()
        })
    }
}

impl Body3 for Affine {
    fn run<T: WithDType>(&self, x: &[T], scale: &[T], shift: &[T]) -> Vec<T> {
        let Channels {
            channels, plane, ..
        } = self.0;
        let mut out = vec![T::zero(); x.len()];
        let per_task = self.0.planes_per_task() * plane;
        out.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .enumerate()
            .for_each(|(task, (out, x))| {
                let first_plane = task * per_task / plane.max(1);
                for (i, (out, x)) in out.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                    let c = (first_plane + i) % channels;
                    let (a, b) = (scale[c], shift[c]);
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = v * a + b;
                    }
                }
            });
        out
    }
}

impl Body1 for Relu {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(MIN_PARALLEL_ELEMENTS)
            .zip(x.par_chunks(MIN_PARALLEL_ELEMENTS))
            .for_each(|(out, x)| {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = if v > T::zero() { v } else { T::zero() };
                }
            });
        out
    }
}

impl Body2 for ReluMask {
    fn run<T: WithDType>(&self, grad: &[T], out: &[T]) -> Vec<T> {
        let mut masked = vec![T::zero(); grad.len()];
        masked
            .par_chunks_mut(MIN_PARALLEL_ELEMENTS)
            .zip(grad.par_chunks(MIN_PARALLEL_ELEMENTS))
            .zip(out.par_chunks(MIN_PARALLEL_ELEMENTS))
            .for_each(|((masked, grad), out)| {
                for ((m, &g), &o) in masked.iter_mut().zip(grad).zip(out) {
                    *m = if o > T::zero() { g } else { T::zero() };
                }
            });
        masked
    }
}

impl CustomOp1 for Sum {
    fn name(&self) -> &'static str {
        "fewshot-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((
            super::cpu1(self.name(), self, s, l)?,
            self.0.channels.into(),
        ))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let spread = grad
            .reshape((1, self.0.channels, 1, 1))?
            .broadcast_as(x.shape())?;
        Ok(Some(spread))
    }
}

impl CustomOp2 for Dot {
    fn name(&self) -> &'static str {
        "fewshot-channel-dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            super::cpu2(self.name(), self, (s1, l1), (s2, l2))?,
            self.0.channels.into(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let zero = grad.zeros_like()?;
        let dx = match x.track_op() {
            true => Some(channel_affine(y, grad, &zero)?),
            false => None,
        };
        let dy = match y.track_op() {
            true => Some(channel_affine(x, grad, &zero)?),
            false => None,
        };
        Ok((dx, dy))
    }
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "fewshot-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = super::cpu3(self.name(), self, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = match x.track_op() {
            true => Some(channel_affine(grad, scale, &scale.zeros_like()?)?),
            false => None,
        };
        let d_scale = match scale.track_op() {
            true => Some(channel_dot(grad, x)?),
            false => None,
        };
        let d_shift = match shift.track_op() {
            true => Some(channel_sum(grad)?),
            false => None,
        };
        Ok((dx, d_scale, d_shift))
    }
}

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "fewshot-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((super::cpu1(self.name(), self, s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(relu_mask(grad, out)?))
    }
}

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "fewshot-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            super::cpu2(self.name(), self, (s1, l1), (s2, l2))?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        grad: &Tensor,
        out: &Tensor,
        _res: &Tensor,
        upstream: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Linear in `grad`; the mask is piecewise constant in `out`.
        let d_grad = match grad.track_op() {
            true => Some(relu_mask(upstream, out)?),
            false => None,
        };
        Ok((d_grad, None))
    }
}

/// Batch norm with batch statistics from four one-pass kernels: the mean, the
/// centred input, its per-channel variance, and the affine map that
/// normalises, scales and shifts.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let (n, channels, h, w) = x.dims4()?;
    let count = (n * h * w) as f64;
    let mean = (channel_sum(x)? / count)?;
    let ones = Tensor::ones(channels, x.dtype(), x.device())?;
    let centred = channel_affine(x, &ones, &mean.neg()?)?;
    let var = (channel_dot(&centred, &centred)? / count)?;
    let scale = gamma.div(&(var + eps)?.sqrt()?)?;
    channel_affine(&centred, &scale, beta)
}
