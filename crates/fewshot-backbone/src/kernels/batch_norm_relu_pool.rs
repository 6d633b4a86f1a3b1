//! Batch norm, ReLU and 2x2 max-pooling (stride 2, floor mode) as one op:
//! the block ending of conv-4 with max-pooling.
//!
//! Apart, the three write the full-size normalised activation and read it
//! back to pool it, and their backward scatters the pooled gradient into a
//! zero-filled full-size tensor that batch norm's backward then reads three
//! times. Fused, the forward writes only the pooled output, and the backward
//! reads the pooled gradient where the unfused one reads the full one.
//!
//! With `z = x * s + shift` (batch norm's per-channel affine map, see
//! `batch_norm.rs`), the output of a window is `relu(max z)`. Its gradient
//! goes to the window's *winner* (the pixel of largest `z`, the first on
//! ties) when that winner passed the ReLU (`z > 0`), as in the unfused ops,
//! so batch norm's gradients keep their form with the pooled gradient `g`
//! standing at the winners:
//!
//! ```text
//! dbeta  = sum_windows m g,  dgamma = (sum_windows m g x_winner - mean * dbeta) / sqrt(var + eps)
//! dx     = [winner, m] g s + x A + B   (A, B as in batch_norm.rs)
//! ```
//!
//! The backward uses two kernels of its own, `pooled_sums` and
//! `pooled_input_grad`; their gradients are built from `winner_gather` and
//! `winner_scatter` (each the other's adjoint) and channel ops, so second
//! and higher derivatives are exact. The winners and masks are piecewise
//! constant in `x` and the coefficients: no gradient flows through them.

use std::mem::MaybeUninit;

use candle_core::{Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::batch_norm::backward_with_statistics;
use super::channel::{channel_affine, channel_dot, channel_sum, Channels, Moments};
use super::filled_by;
use super::op::{gradient_if, Kernel1, Kernel3};
use super::pool::{select, winner, PoolGeometry};

/// `max_pool2x2(relu(batch_norm(x)))` with the statistics of this batch.
pub fn batch_norm_relu_pool(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let shape = BlockShape::of(x)?;
    shape.check_affine("batch_norm_relu_pool", gamma, beta)?;
    super::op::apply3(x, gamma, beta, BatchNormReluPool { shape, eps })
}

/// Per channel, `sum m g x_winner` and `sum m g` over the windows, (2, C).
/// The coefficients only pick winners and masks: they get no gradient, and
/// are detached so that candle does not wait for one.
fn pooled_sums(g: &Tensor, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
    let coefficients = coefficients.detach();
    super::op::apply3(g, x, &coefficients, PooledSums(BlockShape::of(x)?))
}

/// `[winner, m] g s + x A + B`, full size; coefficients (4, C) = (s, shift, A, B).
fn pooled_input_grad(g: &Tensor, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
    super::op::apply3(g, x, coefficients, PooledInputGrad(BlockShape::of(x)?))
}

/// `m * values[winner]` for each window: pooled size. `x` and the
/// coefficients only pick winners and masks (detached, as in `pooled_sums`).
fn winner_gather(values: &Tensor, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
    let (x, coefficients) = (x.detach(), coefficients.detach());
    super::op::apply3(values, &x, &coefficients, WinnerGather(BlockShape::of(&x)?))
}

/// `m * pooled` put on each window's winner, zero elsewhere: full size.
fn winner_scatter(pooled: &Tensor, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
    let (x, coefficients) = (x.detach(), coefficients.detach());
    super::op::apply3(
        pooled,
        &x,
        &coefficients,
        WinnerScatter(BlockShape::of(&x)?),
    )
}

/// The sizes of a block's activation `x`: its channels and its pooling.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockShape {
    channels: Channels,
    pool: PoolGeometry,
}

impl BlockShape {
    fn of(x: &Tensor) -> Result<Self> {
        Self::of_dims(x.dims4()?)
    }

    pub(super) fn of_dims(dims: (usize, usize, usize, usize)) -> Result<Self> {
        Ok(Self {
            channels: Channels::of_dims(dims),
            pool: PoolGeometry::of_dims(dims)?,
        })
    }

    pub(super) fn output_shape(&self) -> Shape {
        self.pool.output_shape()
    }

    /// Checks that `gamma` and `beta` hold one value per channel; errors
    /// name `op` and the vector.
    pub(super) fn check_affine(&self, op: &str, gamma: &Tensor, beta: &Tensor) -> Result<()> {
        self.channels.check_vector(&format!("{op} gamma"), gamma)?;
        self.channels.check_vector(&format!("{op} beta"), beta)
    }

    fn planes_per_task(&self) -> usize {
        self.pool.planes_per_task()
    }

    /// `f(channel, input plane, output plane)` for every plane, in parallel;
    /// `out` holds planes of `out_plane` elements.
    fn for_each_plane<T: WithDType, O: Send>(
        &self,
        x: &[T],
        out: &mut [O],
        out_plane: usize,
        f: impl Fn(usize, &[T], &mut [O]) + Sync,
    ) {
        let channels = self.channels.channels;
        out.par_chunks_mut(out_plane)
            .zip(x.par_chunks(self.pool.in_plane()))
            .enumerate()
            .with_min_len(self.planes_per_task())
            .for_each(|(index, (out, plane))| f(index % channels, plane, out));
    }

    /// `f(channel, plane of x, plane of other, plane of out)` for every plane,
    /// in parallel: `other` and `out` hold planes of the given sizes.
    fn for_each_plane_with<T: WithDType, O: Send>(
        &self,
        x: &[T],
        (other, other_plane): (&[T], usize),
        (out, out_plane): (&mut [O], usize),
        f: impl Fn(usize, &[T], &[T], &mut [O]) + Sync,
    ) {
        let channels = self.channels.channels;
        out.par_chunks_mut(out_plane)
            .zip(x.par_chunks(self.pool.in_plane()))
            .zip(other.par_chunks(other_plane))
            .enumerate()
            .with_min_len(self.planes_per_task())
            .for_each(|(index, ((out, plane), other))| f(index % channels, plane, other, out));
    }

    /// The four pixels (top pair first) of each window of rows `2 * oy` and
    /// `2 * oy + 1` of one plane, left to right.
    #[inline(always)]
    fn window_pixels<'a, T: Copy>(
        &self,
        plane: &'a [T],
        oy: usize,
    ) -> impl Iterator<Item = [T; 4]> + 'a {
        let (top, bottom) = self.pool.row_pair(plane, oy);
        let pairs = top.as_chunks::<2>().0.iter().zip(bottom.as_chunks::<2>().0);
        pairs.map(|([t0, t1], [b0, b1])| [*t0, *t1, *b0, *b1])
    }

    /// The windows of rows `2 * oy` and `2 * oy + 1` of one plane, left to
    /// right, by `z = x * scale + shift`: each window's four pixels, which of
    /// them is its winner, and whether that winner passed the ReLU. Selects
    /// over the four pixels rather than the winner's offset (1-3% faster;
    /// the compiler still does not vectorise these loops).
    #[inline(always)]
    fn windows<'a, T: WithDType>(
        &self,
        plane: &'a [T],
        oy: usize,
        (scale, shift): (T, T),
    ) -> impl Iterator<Item = ([T; 4], [bool; 4], bool)> + 'a {
        self.window_pixels(plane, oy).map(move |x| {
            let z = x.map(|v| v * scale + shift);
            let flags = winner(&z[..2], &z[2..]);
            (x, flags, select(z, flags) > T::zero())
        })
    }

    /// Rows `2 * oy` and `2 * oy + 1` of a full-size plane, cut to the
    /// windows' pixel pairs (an odd last column is left out).
    #[inline(always)]
    fn window_rows<'a, O>(
        &self,
        plane: &'a mut [O],
        oy: usize,
    ) -> impl Iterator<Item = (&'a mut [O; 2], &'a mut [O; 2])> {
        let (top, bottom) = self.pool.row_pair_mut(plane, oy);
        let top = top.as_chunks_mut::<2>().0.iter_mut();
        top.zip(bottom.as_chunks_mut::<2>().0)
    }
}

/// Row `row` of a (rows, C) coefficient matrix, at channel `c`.
fn coefficient<T: WithDType>(coefficients: &[T], channels: usize, row: usize, c: usize) -> T {
    coefficients[row * channels + c]
}

/// The `(s, shift)` of channel `c` that pick its winners and masks.
fn mask_coefficients<T: WithDType>(coefficients: &[T], channels: usize, c: usize) -> (T, T) {
    (
        coefficient(coefficients, channels, 0, c),
        coefficient(coefficients, channels, 1, c),
    )
}

struct BatchNormReluPool {
    shape: BlockShape,
    eps: f64,
}

struct PooledSums(BlockShape);
struct PooledInputGrad(BlockShape);
struct WinnerGather(BlockShape);
struct WinnerScatter(BlockShape);

impl Kernel3 for BatchNormReluPool {
    const NAME: &'static str = "fewshot-batch-norm-relu-pool";

    fn run<T: WithDType>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        forward(&self.shape, x, gamma, beta, self.eps)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.shape.output_shape()
    }

    fn backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(x, gamma, beta, self.eps, grad)
    }
}

/// The pooled output of activation `x` (of sizes `shape`): the forward of
/// [`batch_norm_relu_pool`] on slices, shared with the fused convolution block.
pub(super) fn forward<T: WithDType>(
    shape: &BlockShape,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
) -> Vec<T> {
    let c = shape.channels.channels;
    let moments = Moments(shape.channels).run(x);
    let (scale, shift): (Vec<T>, Vec<T>) = (0..c)
        .map(|i| {
            let (mean, var) = (moments[i].to_f64(), moments[c + i].to_f64());
            let s = gamma[i].to_f64() / (var + eps).sqrt();
            (T::from_f64(s), T::from_f64(beta[i].to_f64() - mean * s))
        })
        .unzip();
    let out_plane = shape.pool.out_plane();
    let out_w = shape.pool.out_hw().1;
    let fill = |out: &mut [MaybeUninit<T>]| {
        shape.for_each_plane(x, out, out_plane, |ch, plane, out| {
            let (a, b) = (scale[ch], shift[ch]);
            let max = |p: T, q: T| if q > p { q } else { p };
            for (oy, out) in out.chunks_exact_mut(out_w).enumerate() {
                let (top, bottom) = shape.pool.row_pair(plane, oy);
                let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                for ((top, bottom), out) in windows.zip(out) {
                    // ReLU is monotone: the max of the ReLUs is the ReLU of the max.
                    let z = max(
                        max(top[0] * a + b, top[1] * a + b),
                        max(bottom[0] * a + b, bottom[1] * a + b),
                    );
                    out.write(max(z, T::zero()));
                }
            }
        })
    };
    // SAFETY: every output row has `out_w` windows, each written.
    unsafe { filled_by(x.len() / shape.pool.in_plane() * out_plane, fill) }
}

/// The gradients of activation `x`, `gamma` and `beta` given the pooled
/// output's gradient `grad`: the backward of [`batch_norm_relu_pool`],
/// shared with the fused convolution block.
#[allow(clippy::type_complexity)]
pub(super) fn backward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    backward_with_statistics(
        x,
        (gamma, beta, eps),
        |scale, shift| pooled_sums(grad, x, &Tensor::stack(&[scale, shift], 0)?),
        |coefficients| pooled_input_grad(grad, x, coefficients),
    )
}

impl Kernel3 for PooledSums {
    const NAME: &'static str = "fewshot-pooled-sums";

    fn run<T: WithDType>(&self, g: &[T], x: &[T], coefficients: &[T]) -> Vec<T> {
        let shape = &self.0;
        let c = shape.channels.channels;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let out_w = shape.pool.out_hw().1;
        let sums = shape.channels.reduce(|ch, at| {
            let plane = &x[at..at + in_plane];
            let first = at / in_plane * out_plane;
            let g = &g[first..first + out_plane];
            let (mut dot, mut sum) = (0.0, 0.0);
            let coefficients = mask_coefficients(coefficients, c, ch);
            for (oy, g) in g.chunks_exact(out_w).enumerate() {
                for ((x, winner, passed), &g) in shape.windows(plane, oy, coefficients).zip(g) {
                    if passed {
                        let g = g.to_f64();
                        dot += g * select(x, winner).to_f64();
                        sum += g;
                    }
                }
            }
            [dot, sum]
        });
        let dots = sums.iter().map(|[dot, _]| T::from_f64(*dot));
        dots.chain(sums.iter().map(|[_, sum]| T::from_f64(*sum)))
            .collect()
    }

    fn shape(&self, _: &Shape) -> Shape {
        (2, self.0.channels.channels).into()
    }

    /// With u = (u_dot, u_sum): d/dg = m (x_winner u_dot + u_sum), d/dx = u_dot m g on the winners.
    fn backward(
        &self,
        g: &Tensor,
        x: &Tensor,
        coefficients: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (u_dot, u_sum) = (grad.get(0)?, grad.get(1)?);
        let dg = gradient_if(g, || {
            winner_gather(&channel_affine(x, &u_dot, &u_sum)?, x, coefficients)
        })?;
        let dx = gradient_if(x, || {
            let scaled = channel_affine(g, &u_dot, &u_dot.zeros_like()?)?;
            winner_scatter(&scaled, x, coefficients)
        })?;
        Ok((dg, dx, None))
    }
}

impl Kernel3 for PooledInputGrad {
    const NAME: &'static str = "fewshot-pooled-input-grad";

    fn run<T: WithDType>(&self, g: &[T], x: &[T], coefficients: &[T]) -> Vec<T> {
        let shape = &self.0;
        let c = shape.channels.channels;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let out_w = shape.pool.out_hw().1;
        // SAFETY: every plane is written whole by its affine pass (window pixels rewritten).
        unsafe {
            filled_by(x.len(), |dx| {
                shape.for_each_plane_with(x, (g, out_plane), (dx, in_plane), |ch, plane, g, dx| {
                    let [s, shift, a, b] =
                        [0, 1, 2, 3].map(|row| coefficient(coefficients, c, row, ch));
                    // Pixels outside every window (an odd last row or column) first.
                    for (d, &v) in dx.iter_mut().zip(plane) {
                        d.write(v * a + b);
                    }
                    for (oy, g) in g.chunks_exact(out_w).enumerate() {
                        let windows = shape.windows(plane, oy, (s, shift));
                        let rows = shape.window_rows(dx, oy);
                        for (((x, winner, passed), ([t0, t1], [b0, b1])), &g) in
                            windows.zip(rows).zip(g)
                        {
                            let d = [t0, t1, b0, b1];
                            for ((d, x), wins) in d.into_iter().zip(x).zip(winner) {
                                let affine = x * a + b;
                                d.write(if wins && passed {
                                    affine + g * s
                                } else {
                                    affine
                                });
                            }
                        }
                    }
                })
            })
        }
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.pool.input_shape()
    }

    /// Linear in `g`, and in `x` but for the winners and mask:
    /// d/dg = m s u_winner, d/dx = u A, d/ds = sum [winner, m] g u,
    /// d/dshift = 0, d/dA = sum u x, d/dB = sum u.
    fn backward(
        &self,
        g: &Tensor,
        x: &Tensor,
        coefficients: &Tensor,
        _out: &Tensor,
        upstream: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (scale, a) = (coefficients.get(0)?, coefficients.get(2)?);
        let zero = scale.zeros_like()?;
        let dg = gradient_if(g, || {
            winner_gather(&channel_affine(upstream, &scale, &zero)?, x, coefficients)
        })?;
        let dx = gradient_if(x, || channel_affine(upstream, &a, &zero))?;
        let d_coefficients = gradient_if(coefficients, || {
            let d_scale = channel_dot(&winner_scatter(g, x, coefficients)?, upstream)?;
            let d_a = channel_dot(upstream, x)?;
            let d_b = channel_sum(upstream)?;
            Tensor::stack(&[d_scale, zero.clone(), d_a, d_b], 0)
        })?;
        Ok((dg, dx, d_coefficients))
    }
}

impl Kernel3 for WinnerGather {
    const NAME: &'static str = "fewshot-winner-gather";

    fn run<T: WithDType>(&self, values: &[T], x: &[T], coefficients: &[T]) -> Vec<T> {
        let shape = &self.0;
        let c = shape.channels.channels;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let out_w = shape.pool.out_hw().1;
        let fill = |out: &mut [MaybeUninit<T>]| {
            shape.for_each_plane_with(
                x,
                (values, in_plane),
                (out, out_plane),
                |ch, plane, values, out| {
                    let coefficients = mask_coefficients(coefficients, c, ch);
                    for (oy, out) in out.chunks_exact_mut(out_w).enumerate() {
                        let windows = shape.windows(plane, oy, coefficients);
                        let values = shape.window_pixels(values, oy);
                        for ((out, (_, winner, passed)), values) in
                            out.iter_mut().zip(windows).zip(values)
                        {
                            let value = select(values, winner);
                            out.write(if passed { value } else { T::zero() });
                        }
                    }
                },
            )
        };
        // SAFETY: every window of every plane has a winner, written.
        unsafe { filled_by(x.len() / in_plane * out_plane, fill) }
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.pool.output_shape()
    }

    fn backward(
        &self,
        values: &Tensor,
        x: &Tensor,
        coefficients: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_values = gradient_if(values, || winner_scatter(grad, x, coefficients))?;
        Ok((d_values, None, None))
    }
}

impl Kernel3 for WinnerScatter {
    const NAME: &'static str = "fewshot-winner-scatter";

    fn run<T: WithDType>(&self, pooled: &[T], x: &[T], coefficients: &[T]) -> Vec<T> {
        let shape = &self.0;
        let c = shape.channels.channels;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let out_w = shape.pool.out_hw().1;
        let fill = |out: &mut [MaybeUninit<T>]| {
            shape.for_each_plane_with(
                x,
                (pooled, out_plane),
                (out, in_plane),
                |ch, plane, pooled, out| {
                    for i in shape.pool.uncovered() {
                        out[i].write(T::zero());
                    }
                    let coefficients = mask_coefficients(coefficients, c, ch);
                    for (oy, pooled) in pooled.chunks_exact(out_w).enumerate() {
                        let windows = shape.windows(plane, oy, coefficients);
                        let rows = shape.window_rows(out, oy);
                        for (((_, winner, passed), ([t0, t1], [b0, b1])), &value) in
                            windows.zip(rows).zip(pooled)
                        {
                            let out = [t0, t1, b0, b1];
                            for (out, wins) in out.into_iter().zip(winner) {
                                out.write(if wins && passed { value } else { T::zero() });
                            }
                        }
                    }
                },
            )
        };
        // SAFETY: every pixel is in a window or uncovered, and each is written.
        unsafe { filled_by(x.len(), fill) }
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.pool.input_shape()
    }

    fn backward(
        &self,
        pooled: &Tensor,
        x: &Tensor,
        coefficients: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_pooled = gradient_if(pooled, || winner_gather(grad, x, coefficients))?;
        Ok((d_pooled, None, None))
    }
}
