//! 2x2 max-pooling with stride 2 in floor mode, with a gradient that goes to
//! each window's maximum unscaled (candle's own is scaled by 1/4).
//!
//! Three ops close under differentiation: `pool(x)`; its backward
//! `scatter(x, dy)`, which puts each output gradient on its window's winner;
//! and `gather(x, u)`, which reads `u` at the winners and is the backward of
//! `scatter` with respect to `dy`. The winner positions are piecewise constant
//! in `x`, so neither `scatter` nor `gather` has a gradient with respect to it.

use candle_core::{bail, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::op::{Kernel1, Kernel2};

/// Sizes of a pooling: `planes` = N * C images of `h` x `w`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PoolGeometry {
    pub(super) dims: (usize, usize, usize, usize),
}

impl PoolGeometry {
    pub(super) fn of(x: &Tensor) -> Result<Self> {
        Self::of_dims(x.dims4()?)
    }

    pub(super) fn of_dims(dims: (usize, usize, usize, usize)) -> Result<Self> {
        if dims.2 < 2 || dims.3 < 2 {
            bail!(
                "max_pool2x2: needs at least 2x2 pixels, got {}x{}",
                dims.2,
                dims.3
            );
        }
        Ok(Self { dims })
    }

    pub(super) fn in_plane(&self) -> usize {
        self.dims.2 * self.dims.3
    }

    pub(super) fn out_hw(&self) -> (usize, usize) {
        (self.dims.2 / 2, self.dims.3 / 2)
    }

    pub(super) fn out_plane(&self) -> usize {
        let (h, w) = self.out_hw();
        h * w
    }

    pub(super) fn planes_per_task(&self) -> usize {
        super::MIN_PARALLEL_ELEMENTS.div_ceil(self.in_plane().max(1))
    }

    pub(super) fn input_shape(&self) -> Shape {
        self.dims.into()
    }

    pub(super) fn output_shape(&self) -> Shape {
        let (n, c, _, _) = self.dims;
        let (h, w) = self.out_hw();
        (n, c, h, w).into()
    }

    /// Rows `2 * oy` and `2 * oy + 1` of one plane.
    pub(super) fn row_pair<'a, T>(&self, plane: &'a [T], oy: usize) -> (&'a [T], &'a [T]) {
        let width = self.dims.3;
        plane[2 * oy * width..(2 * oy + 2) * width].split_at(width)
    }

    /// Rows `2 * oy` and `2 * oy + 1` of one plane, to write.
    pub(super) fn row_pair_mut<'a, T>(
        &self,
        plane: &'a mut [T],
        oy: usize,
    ) -> (&'a mut [T], &'a mut [T]) {
        let width = self.dims.3;
        plane[2 * oy * width..(2 * oy + 2) * width].split_at_mut(width)
    }
}

/// Which of a window's four pixels is its maximum, reading the top pair then
/// the bottom pair, the first one on ties: one flag per pixel, exactly one set.
///
/// Flags and selects rather than an index and branches: the winner is
/// data-dependent, so branches mispredict (train-conv4-28 of `fewshot bench
/// --suite kernels` took 62 ms with them, 56 without), while flags become
/// masks over many windows at once.
#[inline(always)]
pub(super) fn winner<T: WithDType>(top: &[T], bottom: &[T]) -> [bool; 4] {
    let (a, b, c, d) = (top[0], top[1], bottom[0], bottom[1]);
    let b_wins = b > a;
    let best = if b_wins { b } else { a };
    let c_wins = c > best;
    let best = if c_wins { c } else { best };
    let d_wins = d > best;
    let c_wins = c_wins & !d_wins;
    let b_wins = b_wins & !c_wins & !d_wins;
    [!(b_wins | c_wins | d_wins), b_wins, c_wins, d_wins]
}

/// The value of the one flagged pixel of a window (flags as from
/// [`winner`]): selects, not an index, so no branch on the winner.
#[inline(always)]
pub(super) fn select<T: Copy>(values: [T; 4], flags: [bool; 4]) -> T {
    let best = if flags[1] { values[1] } else { values[0] };
    let best = if flags[2] { values[2] } else { best };
    if flags[3] {
        values[3]
    } else {
        best
    }
}

/// 2x2 max-pooling with stride 2 of `x` (N, C, H, W); an odd last row or column is dropped.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let geometry = PoolGeometry::of(x)?;
    super::op::apply1(x, Pool(geometry))
}

fn scatter(x: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
    let geometry = PoolGeometry::of(x)?;
    super::op::apply2(x, grad_out, Scatter(geometry))
}

fn gather(x: &Tensor, values: &Tensor) -> Result<Tensor> {
    let geometry = PoolGeometry::of(x)?;
    super::op::apply2(x, values, Gather(geometry))
}

struct Pool(PoolGeometry);
struct Scatter(PoolGeometry);
struct Gather(PoolGeometry);

impl Kernel1 for Pool {
    const NAME: &'static str = "fewshot-max-pool2x2";

    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let g = &self.0;
        let out_w = g.out_hw().1;
        let max = |a: T, b: T| if b > a { b } else { a };
        let mut out = vec![T::zero(); x.len() / g.in_plane() * g.out_plane()];
        out.par_chunks_mut(g.out_plane())
            .zip(x.par_chunks(g.in_plane()))
            .with_min_len(g.planes_per_task())
            .for_each(|(out, plane)| {
                for (oy, out) in out.chunks_exact_mut(out_w).enumerate() {
                    let (top, bottom) = g.row_pair(plane, oy);
                    let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                    for ((top, bottom), out) in windows.zip(out) {
                        *out = max(max(top[0], top[1]), max(bottom[0], bottom[1]));
                    }
                }
            });
        out
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.output_shape()
    }

    fn backward(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(scatter(x, grad)?))
    }
}

/// Each output gradient written onto its window's winner; every other pixel
/// of the window gets zero, and so does an odd last row or column.
fn scatter_kernel<T: WithDType>(g: &PoolGeometry, x: &[T], grad_out: &[T]) -> Vec<T> {
    let (out_h, out_w) = g.out_hw();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(g.in_plane())
        .zip(x.par_chunks(g.in_plane()))
        .zip(grad_out.par_chunks(g.out_plane()))
        .with_min_len(g.planes_per_task())
        .for_each(|((dx, plane), grad)| {
            for oy in 0..out_h {
                let (top, bottom) = g.row_pair(plane, oy);
                let (dx_top, dx_bottom) = g.row_pair_mut(dx, oy);
                let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                let dx_windows = dx_top
                    .chunks_exact_mut(2)
                    .zip(dx_bottom.chunks_exact_mut(2));
                let grad = &grad[oy * out_w..(oy + 1) * out_w];
                for (((top, bottom), (dx_top, dx_bottom)), &grad) in
                    windows.zip(dx_windows).zip(grad)
                {
                    let [a, b, c, d] = winner(top, bottom).map(|won| match won {
                        true => grad,
                        false => T::zero(),
                    });
                    dx_top[0] = a;
                    dx_top[1] = b;
                    dx_bottom[0] = c;
                    dx_bottom[1] = d;
                }
            }
        });
    dx
}

/// `values` read at each window's winner.
fn gather_kernel<T: WithDType>(g: &PoolGeometry, x: &[T], values: &[T]) -> Vec<T> {
    let out_w = g.out_hw().1;
    let mut out = vec![T::zero(); x.len() / g.in_plane() * g.out_plane()];
    out.par_chunks_mut(g.out_plane())
        .zip(x.par_chunks(g.in_plane()))
        .zip(values.par_chunks(g.in_plane()))
        .with_min_len(g.planes_per_task())
        .for_each(|((out, plane), values)| {
            for (oy, out) in out.chunks_exact_mut(out_w).enumerate() {
                let (top, bottom) = g.row_pair(plane, oy);
                let (values_top, values_bottom) = g.row_pair(values, oy);
                let windows = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                let value_windows = values_top
                    .chunks_exact(2)
                    .zip(values_bottom.chunks_exact(2));
                for (((top, bottom), (values_top, values_bottom)), out) in
                    windows.zip(value_windows).zip(out)
                {
                    let values = [
                        values_top[0],
                        values_top[1],
                        values_bottom[0],
                        values_bottom[1],
                    ];
                    *out = select(values, winner(top, bottom));
                }
            }
        });
    out
}

impl Kernel2 for Scatter {
    const NAME: &'static str = "fewshot-max-pool2x2-scatter";

    fn run<T: WithDType>(&self, x: &[T], grad_out: &[T]) -> Vec<T> {
        scatter_kernel(&self.0, x, grad_out)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.input_shape()
    }

    fn backward(
        &self,
        x: &Tensor,
        _grad_out: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(gather(x, grad)?)))
    }
}

impl Kernel2 for Gather {
    const NAME: &'static str = "fewshot-max-pool2x2-gather";

    fn run<T: WithDType>(&self, x: &[T], values: &[T]) -> Vec<T> {
        gather_kernel(&self.0, x, values)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.output_shape()
    }

    fn backward(
        &self,
        x: &Tensor,
        _values: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(scatter(x, grad)?)))
    }
}
