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

use std::mem::MaybeUninit;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::filled_by;
use super::kept::HandOver;
use super::op::{gradient_if, Kernel1, Kernel2, Kernel3};

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
        Ok(Self::of_dims(x.dims4()?))
    }

    pub(super) fn of_dims((batch, channels, h, w): (usize, usize, usize, usize)) -> Self {
        Self {
            batch,
            channels,
            plane: h * w,
        }
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

    /// `f(channel, offset of one of its planes)` summed over every image, per
    /// channel: `N` sums at once (`f` returns one value for each).
    pub(super) fn reduce<const N: usize>(
        &self,
        f: impl Fn(usize, usize) -> [f64; N] + Sync,
    ) -> Vec<[f64; N]> {
        self.per_channel(|c| self.sum_over_images(c, |at| f(c, at)))
    }

    /// `f(offset)` of each plane of channel `c`, image by image, summed.
    fn sum_over_images<const N: usize>(&self, c: usize, f: impl Fn(usize) -> [f64; N]) -> [f64; N] {
        (0..self.batch).fold([0.0; N], |mut total, n| {
            let sums = f((n * self.channels + c) * self.plane);
            total.iter_mut().zip(sums).for_each(|(t, s)| *t += s);
            total
        })
    }

    /// `f(channel)` for every channel, in parallel: one task reads all the
    /// planes of its channels, so passes of `f` after the first over one
    /// channel find them in the core's cache.
    fn per_channel<R: Send>(&self, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
        let per_channel = (self.batch * self.plane).max(1);
        (0..self.channels)
            .into_par_iter()
            .with_min_len(MIN_PARALLEL_ELEMENTS.div_ceil(per_channel))
            .map(&f)
            .collect()
    }

    /// Planes per parallel task for elementwise work.
    fn planes_per_task(&self) -> usize {
        MIN_PARALLEL_ELEMENTS.div_ceil(self.plane.max(1))
    }
}

/// Sum of `x` (N, C, H, W) over N, H and W: (C).
pub fn channel_sum(x: &Tensor) -> Result<Tensor> {
    super::op::apply1(x, Sum(Channels::of(x)?))
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
    super::op::apply2(x, y, Dot(Channels::of(x)?))
}

/// `x * scale[c] + shift[c]` for `x` (N, C, H, W), `scale` and `shift` (C).
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let channels = Channels::of(x)?;
    channels.check_vector("channel_affine scale", scale)?;
    channels.check_vector("channel_affine shift", shift)?;
    super::op::apply3(x, scale, shift, Affine(channels))
}

/// Per-channel batch mean and biased variance of `x` (N, C, H, W): a (2, C)
/// tensor, means first.
pub fn channel_moments(x: &Tensor) -> Result<Tensor> {
    super::op::apply1(x, Moments(Channels::of(x)?))
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
    super::op::apply3(t, mask, &coefficients, MaskedAffine(Channels::of(t)?))
}

/// Per channel, `sum [mask > 0] g x` and `sum [mask > 0] g`, as a (2, C)
/// tensor: the scale and shift gradients of a ReLU-ed channel map, in one pass.
pub(super) fn masked_sums(g: &Tensor, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    super::op::apply3(g, x, mask, MaskedSums(Channels::of(g)?))
}

/// `max(x, 0)`, with gradient 0 at 0 (as PyTorch).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    super::op::apply1(x, Relu)
}

/// `grad` where `out > 0`, else 0.
fn relu_mask(grad: &Tensor, out: &Tensor) -> Result<Tensor> {
    super::op::apply2(grad, out, ReluMask)
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

/// Sum of `f` over the elements of `K` equally long slices, taken together,
/// in `LANES` partial sums of `T` (one plane is at most a few thousand
/// elements) added up in f64. Blocks of a fixed length keep the inner loop
/// free of bounds checks, so that it vectorises.
fn lane_sum<T: WithDType, const K: usize>(inputs: [&[T]; K], f: impl Fn([T; K]) -> T) -> f64 {
    let len = inputs.iter().map(|x| x.len()).min().unwrap_or(0);
    let whole = len / LANES * LANES;
    let mut lanes = [T::zero(); LANES];
    for base in (0..whole).step_by(LANES) {
        let blocks = inputs.map(|x| &x[base..base + LANES]);
        for (lane, acc) in lanes.iter_mut().enumerate() {
            *acc += f(blocks.map(|block| block[lane]));
        }
    }
    let tail: f64 = (whole..len).map(|i| f(inputs.map(|x| x[i])).to_f64()).sum();
    lanes.iter().map(|v| v.to_f64()).sum::<f64>() + tail
}

impl Channels {
    /// A tensor shaped as the input, each plane written by `f(channel, offset,
    /// plane)`, split across threads in tasks of whole planes. The output is
    /// not zeroed first (zeroing the outputs was 2.6% of a MAML 20-way
    /// training step, `perf record` of `fewshot bench --suite train`).
    ///
    /// # Safety
    /// `f` writes every element of the plane it is given.
    pub(super) unsafe fn planes<T: WithDType>(
        &self,
        f: impl Fn(usize, usize, &mut [MaybeUninit<T>]) + Sync,
    ) -> Vec<T> {
        let plane = self.plane.max(1);
        let per_task = self.planes_per_task() * plane;
        let fill = |out: &mut [MaybeUninit<T>]| {
            out.par_chunks_mut(per_task)
                .enumerate()
                .for_each(|(task, out)| {
                    for (i, out) in out.chunks_mut(plane).enumerate() {
                        let index = task * per_task / plane + i;
                        f(index % self.channels, index * plane, out);
                    }
                });
        };
        // SAFETY: the planes cover the output, and the caller's `f` writes each.
        unsafe { filled_by(self.batch * self.channels * self.plane, fill) }
    }

    /// `post(x * scale[c] + shift[c])` for every element.
    fn map<T: WithDType>(
        &self,
        x: &[T],
        scale: &[T],
        shift: &[T],
        post: impl Fn(T) -> T + Sync,
    ) -> Vec<T> {
        // SAFETY: each plane of the output is written whole from its input plane.
        unsafe {
            self.planes(|c, at, out| {
                let (a, b) = (scale[c], shift[c]);
                let x = &x[at..at + out.len()];
                for (o, &v) in out.iter_mut().zip(x) {
                    o.write(post(v * a + b));
                }
            })
        }
    }
}

impl Kernel1 for Sum {
    const NAME: &'static str = "fewshot-channel-sum";

    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        let sums = self.0.reduce(|_, at| {
            let x = &x[at..at + plane];
            [lane_sum([x], |[v]| v)]
        });
        sums.into_iter().map(|[sum]| T::from_f64(sum)).collect()
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.channels.into()
    }

    fn backward(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let spread = grad
            .reshape((1, self.0.channels, 1, 1))?
            .broadcast_as(x.shape())?;
        Ok(Some(spread))
    }
}

impl Kernel2 for Dot {
    const NAME: &'static str = "fewshot-channel-dot";

    fn run<T: WithDType>(&self, x: &[T], y: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        let sums = self.0.reduce(|_, at| {
            let (x, y) = (&x[at..at + plane], &y[at..at + plane]);
            [lane_sum([x, y], |[a, b]| a * b)]
        });
        sums.into_iter().map(|[sum]| T::from_f64(sum)).collect()
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.channels.into()
    }

    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let zero = grad.zeros_like()?;
        let dx = gradient_if(x, || channel_affine(y, grad, &zero))?;
        let dy = gradient_if(y, || channel_affine(x, grad, &zero))?;
        Ok((dx, dy))
    }
}

/// Per channel, the scale `s = gamma / sqrt(var + eps)` and shift `beta -
/// mean * s` that batch-normalise with `moments` (the output of
/// [`Moments`]: means, then variances) and apply `gamma` and `beta`; the
/// slice form of `normalising_affine`, for the fused forwards.
pub(super) fn normalising_coefficients<T: WithDType>(
    moments: &[T],
    (gamma, beta, eps): (&[T], &[T], f64),
) -> (Vec<T>, Vec<T>) {
    let c = gamma.len();
    (0..c)
        .map(|i| {
            let (mean, var) = (moments[i].to_f64(), moments[c + i].to_f64());
            let s = gamma[i].to_f64() / (var + eps).sqrt();
            (T::from_f64(s), T::from_f64(beta[i].to_f64() - mean * s))
        })
        .unzip()
}

impl Kernel1 for Moments {
    const NAME: &'static str = "fewshot-channel-moments";

    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let Channels { batch, plane, .. } = self.0;
        let count = (batch * plane).max(1) as f64;
        // Both passes over a channel in one task: the second reads the
        // channel's planes from the core's cache, not from memory.
        let sums = self.0.per_channel(|c| {
            let [sum] = self
                .0
                .sum_over_images(c, |at| [lane_sum([&x[at..at + plane]], |[v]| v)]);
            // Centred second moment: no cancellation when the mean is large.
            let mean = T::from_f64(sum / count);
            let [squares] = self.0.sum_over_images(c, |at| {
                [lane_sum([&x[at..at + plane]], |[v]| {
                    (v - mean) * (v - mean)
                })]
            });
            [sum, squares]
        });
        let means = sums.iter().map(|[s, _]| T::from_f64(s / count));
        let vars = sums.iter().map(|[_, s]| T::from_f64(s / count));
        means.chain(vars).collect()
    }

    fn shape(&self, _: &Shape) -> Shape {
        (2, self.0.channels).into()
    }

    fn backward(&self, x: &Tensor, moments: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        moments_backward(self.0, x, moments, grad).map(Some)
    }
}

/// The gradient of `channel_moments` at `x`, given its output `moments` and
/// their gradient: d mean/dx = 1/M and d var/dx = 2 (x - mean)/M, so it is
/// the channel affine map `x * 2 g_var/M + (g_mean - 2 g_var mean)/M`.
fn moments_backward(
    channels: Channels,
    x: &Tensor,
    moments: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let count = (channels.batch * channels.plane) as f64;
    let (g_mean, g_var, mean) = (grad.get(0)?, grad.get(1)?, moments.get(0)?);
    let scale = (g_var * (2.0 / count))?;
    let shift = ((g_mean / count)? - scale.mul(&mean)?)?;
    channel_affine(x, &scale, &shift)
}

/// `channel_moments(x)` from values computed already by the moments kernel
/// on this same `x` (a batch norm's forward keeps them for its backward):
/// the values are handed over, the gradient is `channel_moments`' own.
pub(super) fn kept_moments(x: &Tensor, values: CpuStorage) -> Result<Tensor> {
    let channels = Channels::of(x)?;
    let values = HandOver::new("fewshot-kept-channel-moments", values);
    x.apply_op1(KeptMoments { channels, values })
}

struct KeptMoments {
    channels: Channels,
    values: HandOver,
}

impl CustomOp1 for KeptMoments {
    fn name(&self) -> &'static str {
        "fewshot-kept-channel-moments"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.values.take()?, (2, self.channels.channels).into()))
    }

    fn bwd(&self, x: &Tensor, moments: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        moments_backward(self.channels, x, moments, grad).map(Some)
    }
}

impl Kernel3 for MaskedAffine {
    const NAME: &'static str = "fewshot-masked-affine";

    fn run<T: WithDType>(&self, t: &[T], mask: &[T], coefficients: &[T]) -> Vec<T> {
        let (scale, shift) = coefficients.split_at(self.0.channels);
        // SAFETY: each plane of the output is written whole.
        unsafe {
            self.0.planes(|c, at, out| {
                let (a, b) = (scale[c], shift[c]);
                let (t, mask) = (&t[at..at + out.len()], &mask[at..at + out.len()]);
                for ((o, &v), &m) in out.iter_mut().zip(t).zip(mask) {
                    o.write(if m > T::zero() { v * a + b } else { T::zero() });
                }
            })
        }
    }

    /// Linear in `t` and in the coefficients; the mask is piecewise constant.
    fn backward(
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
        let d_coefficients = gradient_if(coefficients, || masked_sums(grad, t, mask))?;
        Ok((dt, None, d_coefficients))
    }
}

impl Kernel3 for MaskedSums {
    const NAME: &'static str = "fewshot-masked-sums";

    fn run<T: WithDType>(&self, g: &[T], x: &[T], mask: &[T]) -> Vec<T> {
        let plane = self.0.plane;
        let keep = |m: T, v: T| if m > T::zero() { v } else { T::zero() };
        let pairs = self.0.reduce(|_, at| {
            let (g, x, mask) = (
                &g[at..at + plane],
                &x[at..at + plane],
                &mask[at..at + plane],
            );
            // The plane is in cache for the second sum.
            let dot = lane_sum([mask, g, x], |[m, g, x]| keep(m, g * x));
            let sum = lane_sum([mask, g], |[m, g]| keep(m, g));
            [dot, sum]
        });
        let dots = pairs.iter().map(|[dot, _]| T::from_f64(*dot));
        dots.chain(pairs.iter().map(|[_, sum]| T::from_f64(*sum)))
            .collect()
    }

    fn shape(&self, _: &Shape) -> Shape {
        (2, self.0.channels).into()
    }

    /// With u = (u_dot, u_sum): d/dg = m (x u_dot + u_sum), d/dx = m g u_dot.
    fn backward(
        &self,
        g: &Tensor,
        x: &Tensor,
        mask: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (u_dot, u_sum) = (grad.get(0)?, grad.get(1)?);
        let dg = gradient_if(g, || masked_affine(x, mask, &u_dot, &u_sum))?;
        let dx = gradient_if(x, || masked_affine(g, mask, &u_dot, &u_dot.zeros_like()?))?;
        Ok((dg, dx, None))
    }
}

impl Kernel3 for Affine {
    const NAME: &'static str = "fewshot-channel-affine";

    fn run<T: WithDType>(&self, x: &[T], scale: &[T], shift: &[T]) -> Vec<T> {
        self.0.map(x, scale, shift, |v| v)
    }

    fn backward(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = gradient_if(x, || channel_affine(grad, scale, &scale.zeros_like()?))?;
        let d_scale = gradient_if(scale, || channel_dot(grad, x))?;
        let d_shift = gradient_if(shift, || channel_sum(grad))?;
        Ok((dx, d_scale, d_shift))
    }
}

impl Kernel1 for Relu {
    const NAME: &'static str = "fewshot-relu";

    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let fill = |out: &mut [MaybeUninit<T>]| {
            out.par_chunks_mut(MIN_PARALLEL_ELEMENTS)
                .zip(x.par_chunks(MIN_PARALLEL_ELEMENTS))
                .for_each(|(out, x)| {
                    for (o, &v) in out.iter_mut().zip(x) {
                        o.write(if v > T::zero() { v } else { T::zero() });
                    }
                });
        };
        // SAFETY: the chunks of the output match those of `x` and are written whole.
        unsafe { filled_by(x.len(), fill) }
    }

    fn backward(&self, _x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(relu_mask(grad, out)?))
    }
}

impl Kernel2 for ReluMask {
    const NAME: &'static str = "fewshot-relu-mask";

    fn run<T: WithDType>(&self, grad: &[T], out: &[T]) -> Vec<T> {
        let fill = |masked: &mut [MaybeUninit<T>]| {
            masked
                .par_chunks_mut(MIN_PARALLEL_ELEMENTS)
                .zip(grad.par_chunks(MIN_PARALLEL_ELEMENTS))
                .zip(out.par_chunks(MIN_PARALLEL_ELEMENTS))
                .for_each(|((masked, grad), out)| {
                    for ((m, &g), &o) in masked.iter_mut().zip(grad).zip(out) {
                        m.write(if o > T::zero() { g } else { T::zero() });
                    }
                });
        };
        // SAFETY: the chunks of the output match those of `grad` and are written whole.
        unsafe { filled_by(grad.len(), fill) }
    }

    fn backward(
        &self,
        grad: &Tensor,
        out: &Tensor,
        _res: &Tensor,
        upstream: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Linear in `grad`; the mask is piecewise constant in `out`.
        let d_grad = gradient_if(grad, || relu_mask(upstream, out))?;
        Ok((d_grad, None))
    }
}
