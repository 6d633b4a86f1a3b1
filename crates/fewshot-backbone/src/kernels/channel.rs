//! Per-channel reductions and maps over (N, C, H, W) tensors, and ReLU: the
//! pieces batch norm is made of, one memory pass each.
//!
//! Batch norm alone is `channel_moments` (the batch mean and variance of each
//! channel), a little arithmetic on those C-vectors and one `channel_affine`
//! pass (batch norm with ReLU has its own fused op, in `batch_norm.rs`). The
//! ops close under differentiation: the gradient of `channel_moments` is a
//! `channel_affine` of its input, that of `channel_sum` a broadcast, those of
//! `channel_dot` and `channel_affine` are built from `channel_affine`,
//! `channel_dot` and `channel_sum`, and ReLU's gradients go through masking
//! ops whose own gradients are maskings again.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::{Body1, Body2, Body3};

use super::MIN_PARALLEL_ELEMENTS;

/// (N, C, plane) of a 4-D tensor.
#[derive(Debug, Clone, Copy)]
pub(super) struct Channels {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) plane: usize,
}

impl Channels {
    pub(super) fn of(x: &Tensor) -> Result<Self> {
        let (batch, channels, h, w) = x.dims4()?;
        Ok(Self {
            batch,
            channels,
            plane: h * w,
        })
    }

    pub(super) fn check_vector(&self, op: &str, v: &Tensor) -> Result<()> {
        if v.dims() != [self.channels] {
            bail!(
                "{op}: expected one value per channel ({}), got shape {:?}",
                self.channels,
                v.dims()
            );
        }
        Ok(())
    }

    /// `f(channel, offset of one of its planes)` summed over every image, per channel.
    fn reduce(&self, f: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f64> {
        let per_channel = (self.batch * self.plane).max(1);
        (0..self.channels)
            .into_par_iter()
            .with_min_len(MIN_PARALLEL_ELEMENTS.div_ceil(per_channel))
            .map(|c| {
                (0..self.batch)
                    .map(|n| f(c, (n * self.channels + c) * self.plane))
                    .sum()
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

/// Per-channel batch mean and biased variance of `x` (N, C, H, W): a (2, C)
/// tensor, means first.
pub fn channel_moments(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Moments(Channels::of(x)?))
}

/// The scale and shift that batch-normalise `x` with its own statistics and
/// then apply `gamma` and `beta`.
fn normalising_affine(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let moments = channel_moments(x)?;
    let (mean, var) = (moments.get(0)?, moments.get(1)?);
    let scale = gamma.div(&(var + eps)?.sqrt()?)?;
    let shift = beta.sub(&mean.mul(&scale)?)?;
    Ok((scale, shift))
}

/// Batch norm with the statistics of this batch: two passes over `x`
/// for the statistics and one to normalise.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let (scale, shift) = normalising_affine(x, gamma, beta, eps)?;
    channel_affine(x, &scale, &shift)
}

/// `[mask > 0] * (t * scale[c] + shift[c])`: the gradient of ReLU-ed channel
/// maps, in one pass.
fn masked_affine(t: &Tensor, mask: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let coefficients = Tensor::stack(&[scale, shift], 0)?;
    t.contiguous()?.apply_op3(
        &mask.contiguous()?,
        &coefficients.contiguous()?,
        MaskedAffine(Channels::of(t)?),
    )
}

/// Per channel, `sum [mask > 0] g x` and `sum [mask > 0] g`, as a (2, C)
/// tensor: the scale and shift gradients of a ReLU-ed channel map, in one pass.
pub(super) fn masked_sums(g: &Tensor, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op3(
        &x.contiguous()?,
        &mask.contiguous()?,
        MaskedSums(Channels::of(g)?),
    )
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
pub(super) struct Moments(pub(super) Channels);
struct Affine(Channels);
struct MaskedAffine(Channels);
struct MaskedSums(Channels);
struct Relu;
struct ReluMask;

/// Independent partial sums, so that a reduction vectorises.
const LANES: usize = 16;

/// Sum of `f(i)` over `0..len`, in `LANES` partial sums of `T` (one plane is
/// at most a few thousand elements) added up in f64.
fn lane_sum<T: WithDType>(len: usize, f: impl Fn(usize) -> T) -> f64 {
    let mut lanes = [T::zero(); LANES];
    let whole = len / LANES * LANES;
    for base in (0..whole).step_by(LANES) {
        for (lane, acc) in lanes.iter_mut().enumerate() {
            *acc += f(base + lane);
        }
    }
    let tail: f64 = (whole..len).map(|i| f(i).to_f64()).sum();
    lanes.iter().map(|v| v.to_f64()).sum::<f64>() + tail
}

impl Body1 for Sum {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        let sums = self.0.reduce(|_, at| {
            let x = &x[at..at + plane];
            lane_sum(plane, |i| x[i])
        });
        sums.into_iter().map(T::from_f64).collect()
    }
}

impl Body2 for Dot {
    fn run<T: WithDType>(&self, x: &[T], y: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        let sums = self.0.reduce(|_, at| {
            let (x, y) = (&x[at..at + plane], &y[at..at + plane]);
            lane_sum(plane, |i| x[i] * y[i])
        });
        sums.into_iter().map(T::from_f64).collect()
    }
}

impl Body1 for Moments {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let Channels { batch, plane, .. } = self.0;
        let count = (batch * plane).max(1) as f64;
        let sums = self.0.reduce(|_, at| {
            let x = &x[at..at + plane];
            lane_sum(plane, |i| x[i])
        });
        // Centred second moment: no cancellation when the mean is large.
        let squares = self.0.reduce(|c, at| {
            let mean = T::from_f64(sums[c] / count);
            let x = &x[at..at + plane];
            lane_sum(plane, |i| (x[i] - mean) * (x[i] - mean))
        });
        let means = sums.iter().map(|s| T::from_f64(s / count));
        let vars = squares.iter().map(|s| T::from_f64(s / count));
        means.chain(vars).collect()
    }
}

impl Body3 for Affine {
    fn run<T: WithDType>(&self, x: &[T], scale: &[T], shift: &[T]) -> Vec<T> {
        self.0.map(x, scale, shift, |v| v)
    }
}

impl Body3 for MaskedAffine {
    fn run<T: WithDType>(&self, t: &[T], mask: &[T], coefficients: &[T]) -> Vec<T> {
        let (scale, shift) = coefficients.split_at(self.0.channels);
        let mut out = vec![T::zero(); t.len()];
        self.0.for_each_plane(&mut out, |c, at, out| {
            let (a, b) = (scale[c], shift[c]);
            let (t, mask) = (&t[at..at + out.len()], &mask[at..at + out.len()]);
            for ((o, &v), &m) in out.iter_mut().zip(t).zip(mask) {
                *o = if m > T::zero() { v * a + b } else { T::zero() };
            }
        });
        out
    }
}

impl Body3 for MaskedSums {
    fn run<T: WithDType>(&self, g: &[T], x: &[T], mask: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        let keep = |m: T, v: T| if m > T::zero() { v } else { T::zero() };
        let (dots, sums): (Vec<f64>, Vec<f64>) = self
            .0
            .reduce_pairs(|_, at| {
                let (g, x, mask) = (
                    &g[at..at + plane],
                    &x[at..at + plane],
                    &mask[at..at + plane],
                );
                // The plane is in cache for the second sum.
                let dot = lane_sum(plane, |i| keep(mask[i], g[i] * x[i]));
                let sum = lane_sum(plane, |i| keep(mask[i], g[i]));
                (dot, sum)
            })
            .into_iter()
            .unzip();
        dots.into_iter().chain(sums).map(T::from_f64).collect()
    }
}

impl Channels {
    /// `f(channel, offset, plane of out)` for every plane of `out` (shaped as
    /// the input), split across threads in tasks of whole planes.
    pub(super) fn for_each_plane<T: WithDType>(
        &self,
        out: &mut [T],
        f: impl Fn(usize, usize, &mut [T]) + Sync,
    ) {
        let plane = self.plane.max(1);
        let per_task = self.planes_per_task() * plane;
        out.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(task, out)| {
                for (i, out) in out.chunks_mut(plane).enumerate() {
                    let index = task * per_task / plane + i;
                    f(index % self.channels, index * plane, out);
                }
            });
    }

    /// Like `reduce`, with two sums per plane.
    fn reduce_pairs(&self, f: impl Fn(usize, usize) -> (f64, f64) + Sync) -> Vec<(f64, f64)> {
        let per_channel = (self.batch * self.plane).max(1);
        (0..self.channels)
            .into_par_iter()
            .with_min_len(MIN_PARALLEL_ELEMENTS.div_ceil(per_channel))
            .map(|c| {
                (0..self.batch)
                    .map(|n| f(c, (n * self.channels + c) * self.plane))
                    .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
            })
            .collect()
    }

    /// `post(x * scale[c] + shift[c])` for every element.
    fn map<T: WithDType>(
        &self,
        x: &[T],
        scale: &[T],
        shift: &[T],
        post: impl Fn(T) -> T + Sync,
    ) -> Vec<T> {
        let Channels {
            channels, plane, ..
        } = *self;
        let mut out = vec![T::zero(); x.len()];
        let per_task = self.planes_per_task() * plane;
        out.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .enumerate()
            .for_each(|(task, (out, x))| {
                let first_plane = task * per_task / plane.max(1);
                for (i, (out, x)) in out.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                    let c = (first_plane + i) % channels;
                    let (a, b) = (scale[c], shift[c]);
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = post(v * a + b);
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

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "fewshot-channel-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((
            super::cpu1(self.name(), self, s, l)?,
            (2, self.0.channels).into(),
        ))
    }

    /// d mean/dx = 1/M and d var/dx = 2 (x - mean)/M, so the gradient is the
    /// channel affine map `x * 2 g_var/M + (g_mean - 2 g_var mean)/M`.
    fn bwd(&self, x: &Tensor, moments: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let count = (self.0.batch * self.0.plane) as f64;
        let (g_mean, g_var, mean) = (grad.get(0)?, grad.get(1)?, moments.get(0)?);
        let scale = (g_var * (2.0 / count))?;
        let shift = ((g_mean / count)? - scale.mul(&mean)?)?;
        Ok(Some(channel_affine(x, &scale, &shift)?))
    }
}

impl CustomOp3 for MaskedAffine {
    fn name(&self) -> &'static str {
        "fewshot-masked-affine"
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

    /// Linear in `t` and in the coefficients; the mask is piecewise constant.
    fn bwd(
        &self,
        t: &Tensor,
        mask: &Tensor,
        coefficients: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dt = match t.track_op() {
            true => {
                let scale = coefficients.get(0)?;
                Some(masked_affine(grad, mask, &scale, &scale.zeros_like()?)?)
            }
            false => None,
        };
        let d_coefficients = match coefficients.track_op() {
            true => Some(masked_sums(grad, t, mask)?),
            false => None,
        };
        Ok((dt, None, d_coefficients))
    }
}

impl CustomOp3 for MaskedSums {
    fn name(&self) -> &'static str {
        "fewshot-masked-sums"
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
        Ok((out, (2, self.0.channels).into()))
    }

    /// With u = (u_dot, u_sum): d/dg = m (x u_dot + u_sum), d/dx = m g u_dot.
    fn bwd(
        &self,
        g: &Tensor,
        x: &Tensor,
        mask: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (u_dot, u_sum) = (grad.get(0)?, grad.get(1)?);
        let dg = match g.track_op() {
            true => Some(masked_affine(x, mask, &u_dot, &u_sum)?),
            false => None,
        };
        let dx = match x.track_op() {
            true => Some(masked_affine(g, mask, &u_dot, &u_dot.zeros_like()?)?),
            false => None,
        };
        Ok((dg, dx, None))
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
