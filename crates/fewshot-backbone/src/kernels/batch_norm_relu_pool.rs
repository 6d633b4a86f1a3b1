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
//! The forward keeps the batch statistics and each window's winner (a byte
//! per window: which pixel, and whether it passed the ReLU) for the
//! backward, which then neither computes the statistics again nor compares
//! each window's pixels again: the gradient goes where the forward's
//! maximum came from. The backward uses two kernels of its own, the pooled
//! sums and the pooled input gradient; their gradients are built from a
//! winner gather and a winner scatter (each the other's adjoint) and channel
//! ops, so second and higher derivatives are exact. The winners and masks
//! are piecewise constant in `x` and the coefficients: no gradient flows
//! through them.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{Error, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::batch_norm::backward_with_statistics;
use super::channel::{
    channel_affine, channel_dot, channel_sum, kept_moments, normalising_coefficients, Channels,
    Moments,
};
use super::filled_by;
use super::kept::{lock, KeptTensor};
use super::op::{gradient_if, Kernel1, Kernel2, Kernel3};
use super::pool::{select, winner, PoolGeometry};

/// `max_pool2x2(relu(batch_norm(x)))` with the statistics of this batch.
pub fn batch_norm_relu_pool(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let shape = BlockShape::of(x)?;
    shape.check_affine("batch_norm_relu_pool", gamma, beta)?;
    let kept = KeptPooling::new([x, gamma, beta].iter().any(|t| t.track_op()));
    super::op::apply3(x, gamma, beta, BatchNormReluPool { shape, eps, kept })
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

    fn planes(&self) -> usize {
        self.channels.batch * self.channels.channels
    }

    /// `f(plane index, output plane)` for every plane, in parallel; `out`
    /// holds planes of `out_plane` elements.
    fn for_each_plane<O: Send>(
        &self,
        out: &mut [O],
        out_plane: usize,
        f: impl Fn(usize, &mut [O]) + Sync,
    ) {
        out.par_chunks_mut(out_plane)
            .enumerate()
            .with_min_len(self.pool.planes_per_task())
            .for_each(|(index, out)| f(index, out));
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
}

/// What the forward computed and the backward needs: the normalised
/// activation's pooled output, the batch statistics and, if asked for, each
/// window's winner.
pub(super) struct Pooled<T> {
    output: Vec<T>,
    moments: Vec<T>,
    codes: Option<Vec<u8>>,
}

/// A window's code bit set when its winner passed the ReLU; bits 0 and 1
/// hold the winner's place in the window (row * 2 + column).
const PASSED: u8 = 4;

/// The pooled output of activation `x` (of sizes `shape`), with what the
/// backward needs (the winners only `with_winners`: a forward without a
/// graph skips them, ~10% of an evaluation): the forward of
/// [`batch_norm_relu_pool`] on slices, shared with the fused convolution block.
pub(super) fn forward<T: WithDType>(
    shape: &BlockShape,
    x: &[T],
    (gamma, beta, eps): (&[T], &[T], f64),
    with_winners: bool,
) -> Pooled<T> {
    let c = shape.channels.channels;
    let moments = Moments(shape.channels).run(x);
    let (scale, shift) = normalising_coefficients(&moments, (gamma, beta, eps));
    let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
    let out_w = shape.pool.out_hw().1;
    let planes = || {
        x.par_chunks(in_plane)
            .enumerate()
            .with_min_len(shape.pool.planes_per_task())
            .map(|(index, plane)| (plane, scale[index % c], shift[index % c]))
    };
    // The window's maximum (the first on ties, as a max-pool's), then ReLU:
    // monotone, so the max of the ReLUs is the ReLU of the max.
    let relu = |best: T| if T::zero() > best { T::zero() } else { best };
    let len = shape.planes() * out_plane;
    if !with_winners {
        let max = |p: T, q: T| if q > p { q } else { p };
        let fill = |out: &mut [MaybeUninit<T>]| {
            let planes = planes().zip(out.par_chunks_mut(out_plane));
            planes.for_each(|((plane, a, b), out)| {
                for (oy, out) in out.chunks_exact_mut(out_w).enumerate() {
                    for (pixels, out) in shape.window_pixels(plane, oy).zip(out) {
                        let [z0, z1, z2, z3] = pixels.map(|v| v * a + b);
                        out.write(relu(max(max(z0, z1), max(z2, z3))));
                    }
                }
            })
        };
        // SAFETY: every output row has `out_w` windows, each written.
        let output = unsafe { filled_by(len, fill) };
        return Pooled {
            output,
            moments,
            codes: None,
        };
    }
    let mut codes = vec![0u8; len];
    let fill = |out: &mut [MaybeUninit<T>]| {
        let planes = planes().zip(
            out.par_chunks_mut(out_plane)
                .zip(codes.par_chunks_mut(out_plane)),
        );
        planes.for_each(|((plane, a, b), (out, codes))| {
            let rows = out
                .chunks_exact_mut(out_w)
                .zip(codes.chunks_exact_mut(out_w));
            for (oy, (out, codes)) in rows.enumerate() {
                let windows = shape.window_pixels(plane, oy).zip(out).zip(codes);
                for ((pixels, out), code) in windows {
                    let z = pixels.map(|v| v * a + b);
                    let flags = winner(&z[..2], &z[2..]);
                    let best = select(z, flags);
                    out.write(relu(best));
                    let place =
                        u8::from(flags[1]) + 2 * u8::from(flags[2]) + 3 * u8::from(flags[3]);
                    *code = place | if best > T::zero() { PASSED } else { 0 };
                }
            }
        })
    };
    // SAFETY: every output row has `out_w` windows, each written.
    let output = unsafe { filled_by(len, fill) };
    Pooled {
        output,
        moments,
        codes: Some(codes),
    }
}

/// What the forward of a pooling block keeps for its backward: the batch
/// statistics (a tensor of the graph from the first backward on) and each
/// window's winner, so that the backward computes neither again.
pub(super) struct KeptPooling {
    /// Whether a backward may come (some input is part of a graph): only
    /// then does the forward pick the winners.
    pub(super) with_winners: bool,
    moments: KeptTensor,
    winners: Mutex<Option<Winners>>,
}

impl KeptPooling {
    pub(super) fn new(with_winners: bool) -> Self {
        Self {
            with_winners,
            moments: KeptTensor::new("batch_norm_relu_pool statistics"),
            winners: Mutex::new(None),
        }
    }

    /// Keeps what [`forward`] computed for the backward; returns the pooled output.
    pub(super) fn keep<T: WithDType>(&self, shape: &BlockShape, pooled: Pooled<T>) -> Vec<T> {
        self.moments.keep(T::to_cpu_storage_owned(pooled.moments));
        *lock(&self.winners) = pooled.codes.map(|codes| Winners {
            shape: *shape,
            codes: codes.into(),
        });
        pooled.output
    }

    /// The gradients of activation `x`, `gamma` and `beta` given the pooled
    /// output's gradient `grad`: the backward of [`batch_norm_relu_pool`],
    /// shared with the fused convolution block.
    #[allow(clippy::type_complexity)]
    pub(super) fn backward(
        &self,
        x: &Tensor,
        (gamma, beta, eps): (&Tensor, &Tensor, f64),
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let moments = self.moments.tensor(|values| kept_moments(x, values))?;
        let winners = lock(&self.winners).clone().ok_or_else(|| {
            Error::Msg("batch_norm_relu_pool: the forward kept no winners for the backward".into())
        })?;
        backward_with_statistics(
            x,
            &moments,
            (gamma, beta, eps),
            || winners.sums(grad, x),
            |coefficients| winners.input_grad(grad, x, coefficients),
        )
    }
}

/// Each window's winner, from the forward, as one code per window (see
/// [`PASSED`]): the backward's kernels read it instead of comparing the
/// window's four pixels again. The winners are piecewise constant in the
/// activation and the coefficients: no gradient flows through them.
#[derive(Clone)]
struct Winners {
    shape: BlockShape,
    codes: Arc<[u8]>,
}

impl Winners {
    /// Per channel, `sum m g x_winner` and `sum m g` over the windows, (2, C).
    fn sums(&self, g: &Tensor, x: &Tensor) -> Result<Tensor> {
        super::op::apply2(g, x, PooledSums(self.clone()))
    }

    /// `[winner, m] g s + x A + B`, full size; coefficients (4, C) = (s, shift, A, B).
    fn input_grad(&self, g: &Tensor, x: &Tensor, coefficients: &Tensor) -> Result<Tensor> {
        super::op::apply3(g, x, coefficients, PooledInputGrad(self.clone()))
    }

    /// `m * values[winner]` for each window: pooled size.
    fn gather(&self, values: &Tensor) -> Result<Tensor> {
        super::op::apply1(values, WinnerGather(self.clone()))
    }

    /// `m * pooled` put on each window's winner, zero elsewhere: full size.
    fn scatter(&self, pooled: &Tensor) -> Result<Tensor> {
        super::op::apply1(pooled, WinnerScatter(self.clone()))
    }

    /// `f(window, pixel, passed)` for each window of plane `index`: its
    /// index in the pooled plane, its winner's in the full one, and whether
    /// the winner passed the ReLU.
    #[inline(always)]
    fn for_each_window(&self, index: usize, mut f: impl FnMut(usize, usize, bool)) {
        let out_w = self.shape.pool.out_hw().1;
        let (out_plane, width) = (self.shape.pool.out_plane(), self.shape.pool.dims.3);
        let codes = &self.codes[index * out_plane..(index + 1) * out_plane];
        for (oy, row) in codes.chunks_exact(out_w).enumerate() {
            for (ox, &code) in row.iter().enumerate() {
                let place = usize::from(code & 3);
                let pixel = (2 * oy + place / 2) * width + 2 * ox + place % 2;
                f(oy * out_w + ox, pixel, code & PASSED != 0);
            }
        }
    }
}

struct BatchNormReluPool {
    shape: BlockShape,
    eps: f64,
    kept: KeptPooling,
}

struct PooledSums(Winners);
struct PooledInputGrad(Winners);
struct WinnerGather(Winners);
struct WinnerScatter(Winners);

impl Kernel3 for BatchNormReluPool {
    const NAME: &'static str = "fewshot-batch-norm-relu-pool";

    fn run<T: WithDType>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let pooled = forward(
            &self.shape,
            x,
            (gamma, beta, self.eps),
            self.kept.with_winners,
        );
        self.kept.keep(&self.shape, pooled)
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
        self.kept.backward(x, (gamma, beta, self.eps), grad)
    }
}

impl Kernel2 for PooledSums {
    const NAME: &'static str = "fewshot-pooled-sums";

    fn run<T: WithDType>(&self, g: &[T], x: &[T]) -> Vec<T> {
        let shape = &self.0.shape;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let sums = shape.channels.reduce(|_, at| {
            let index = at / in_plane;
            let plane = &x[at..at + in_plane];
            let g = &g[index * out_plane..(index + 1) * out_plane];
            let (mut dot, mut sum) = (0.0, 0.0);
            self.0.for_each_window(index, |window, pixel, passed| {
                if passed {
                    let g = g[window].to_f64();
                    dot += g * plane[pixel].to_f64();
                    sum += g;
                }
            });
            [dot, sum]
        });
        let dots = sums.iter().map(|[dot, _]| T::from_f64(*dot));
        dots.chain(sums.iter().map(|[_, sum]| T::from_f64(*sum)))
            .collect()
    }

    fn shape(&self, _: &Shape) -> Shape {
        (2, self.0.shape.channels.channels).into()
    }

    /// With u = (u_dot, u_sum): d/dg = m (x_winner u_dot + u_sum), d/dx = u_dot m g on the winners.
    fn backward(
        &self,
        g: &Tensor,
        x: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (u_dot, u_sum) = (grad.get(0)?, grad.get(1)?);
        let dg = gradient_if(g, || self.0.gather(&channel_affine(x, &u_dot, &u_sum)?))?;
        let dx = gradient_if(x, || {
            self.0
                .scatter(&channel_affine(g, &u_dot, &u_dot.zeros_like()?)?)
        })?;
        Ok((dg, dx))
    }
}

impl Kernel3 for PooledInputGrad {
    const NAME: &'static str = "fewshot-pooled-input-grad";

    fn run<T: WithDType>(&self, g: &[T], x: &[T], coefficients: &[T]) -> Vec<T> {
        let shape = &self.0.shape;
        let c = shape.channels.channels;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let fill = |dx: &mut [MaybeUninit<T>]| {
            shape.for_each_plane(dx, in_plane, |index, dx| {
                let [s, _, a, b] = [0, 1, 2, 3].map(|row| coefficients[row * c + index % c]);
                let plane = &x[index * in_plane..(index + 1) * in_plane];
                let g = &g[index * out_plane..(index + 1) * out_plane];
                for (d, &v) in dx.iter_mut().zip(plane) {
                    d.write(v * a + b);
                }
                self.0.for_each_window(index, |window, pixel, passed| {
                    if passed {
                        dx[pixel].write(plane[pixel] * a + b + g[window] * s);
                    }
                });
            })
        };
        // SAFETY: every plane is written whole by its affine pass.
        unsafe { filled_by(x.len(), fill) }
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.shape.pool.input_shape()
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
            self.0.gather(&channel_affine(upstream, &scale, &zero)?)
        })?;
        let dx = gradient_if(x, || channel_affine(upstream, &a, &zero))?;
        let d_coefficients = gradient_if(coefficients, || {
            let d_scale = channel_dot(&self.0.scatter(g)?, upstream)?;
            let d_a = channel_dot(upstream, x)?;
            let d_b = channel_sum(upstream)?;
            Tensor::stack(&[d_scale, zero.clone(), d_a, d_b], 0)
        })?;
        Ok((dg, dx, d_coefficients))
    }
}

impl Kernel1 for WinnerGather {
    const NAME: &'static str = "fewshot-winner-gather";

    fn run<T: WithDType>(&self, values: &[T]) -> Vec<T> {
        let shape = &self.0.shape;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let fill = |out: &mut [MaybeUninit<T>]| {
            shape.for_each_plane(out, out_plane, |index, out| {
                let values = &values[index * in_plane..(index + 1) * in_plane];
                self.0.for_each_window(index, |window, pixel, passed| {
                    out[window].write(if passed { values[pixel] } else { T::zero() });
                });
            })
        };
        // SAFETY: every window of every plane is written.
        unsafe { filled_by(shape.planes() * out_plane, fill) }
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.shape.output_shape()
    }

    fn backward(&self, values: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        gradient_if(values, || self.0.scatter(grad))
    }
}

impl Kernel1 for WinnerScatter {
    const NAME: &'static str = "fewshot-winner-scatter";

    fn run<T: WithDType>(&self, pooled: &[T]) -> Vec<T> {
        let shape = &self.0.shape;
        let (in_plane, out_plane) = (shape.pool.in_plane(), shape.pool.out_plane());
        let fill = |out: &mut [MaybeUninit<T>]| {
            shape.for_each_plane(out, in_plane, |index, out| {
                for o in out.iter_mut() {
                    o.write(T::zero());
                }
                let pooled = &pooled[index * out_plane..(index + 1) * out_plane];
                self.0.for_each_window(index, |window, pixel, passed| {
                    if passed {
                        out[pixel].write(pooled[window]);
                    }
                });
            })
        };
        // SAFETY: every plane is zeroed whole before the winners are written.
        unsafe { filled_by(shape.planes() * in_plane, fill) }
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.shape.pool.input_shape()
    }

    fn backward(&self, pooled: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        gradient_if(pooled, || self.0.gather(grad))
    }
}
