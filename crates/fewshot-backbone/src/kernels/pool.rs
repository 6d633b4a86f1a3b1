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
struct PoolGeometry {
    dims: (usize, usize, usize, usize),
}

impl PoolGeometry {
    fn of(x: &Tensor) -> Result<Self> {
        let dims = x.dims4()?;
        if dims.2 < 2 || dims.3 < 2 {
            bail!(
                "max_pool2x2: needs at least 2x2 pixels, got {}x{}",
                dims.2,
                dims.3
            );
        }
        Ok(Self { dims })
    }

    fn in_plane(&self) -> usize {
        self.dims.2 * self.dims.3
    }

    fn out_hw(&self) -> (usize, usize) {
        (self.dims.2 / 2, self.dims.3 / 2)
    }

    fn out_plane(&self) -> usize {
        let (h, w) = self.out_hw();
        h * w
    }

    fn planes_per_task(&self) -> usize {
        super::MIN_PARALLEL_ELEMENTS.div_ceil(self.in_plane().max(1))
    }

    fn input_shape(&self) -> Shape {
        self.dims.into()
    }

    fn output_shape(&self) -> Shape {
        let (n, c, _, _) = self.dims;
        let (h, w) = self.out_hw();
        (n, c, h, w).into()
    }

    /// Calls `visit(output index, winner index)` for each output pixel of one
    /// input plane, the winner being the index in the plane of its window's
    /// maximum (the first one on ties).
    fn for_each_winner<T: WithDType>(&self, plane: &[T], mut visit: impl FnMut(usize, usize)) {
        let width = self.dims.3;
        let (out_h, out_w) = self.out_hw();
        for oy in 0..out_h {
            let top = 2 * oy * width;
            let rows = (
                &plane[top..top + width],
                &plane[top + width..top + 2 * width],
            );
            for ox in 0..out_w {
                let x = 2 * ox;
                // Selects rather than branches: the winner is data-dependent.
                let (mut best, mut at) = (rows.0[x], x);
                for (value, index) in [
                    (rows.0[x + 1], x + 1),
                    (rows.1[x], width + x),
                    (rows.1[x + 1], width + x + 1),
                ] {
                    let better = value > best;
                    best = if better { value } else { best };
                    at = if better { index } else { at };
                }
                visit(oy * out_w + ox, top + at);
            }
        }
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
        let (width, (out_h, out_w)) = (g.dims.3, g.out_hw());
        let max = |a: T, b: T| if b > a { b } else { a };
        let mut out = vec![T::zero(); x.len() / g.in_plane() * g.out_plane()];
        out.par_chunks_mut(g.out_plane())
            .zip(x.par_chunks(g.in_plane()))
            .with_min_len(g.planes_per_task())
            .for_each(|(out, plane)| {
                for (oy, out) in out.chunks_exact_mut(out_w.max(1)).take(out_h).enumerate() {
                    let top = &plane[2 * oy * width..(2 * oy + 1) * width];
                    let bottom = &plane[(2 * oy + 1) * width..(2 * oy + 2) * width];
                    for (ox, o) in out.iter_mut().enumerate() {
                        let x = 2 * ox;
                        *o = max(max(top[x], top[x + 1]), max(bottom[x], bottom[x + 1]));
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

fn scatter_kernel<T: WithDType>(g: &PoolGeometry, x: &[T], grad_out: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(g.in_plane())
        .zip(x.par_chunks(g.in_plane()))
        .zip(grad_out.par_chunks(g.out_plane()))
        .with_min_len(g.planes_per_task())
        .for_each(|((dx, plane), grad)| {
            g.for_each_winner(plane, |o, i| dx[i] = grad[o]);
        });
    dx
}

fn gather_kernel<T: WithDType>(g: &PoolGeometry, x: &[T], values: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() / g.in_plane() * g.out_plane()];
    out.par_chunks_mut(g.out_plane())
        .zip(x.par_chunks(g.in_plane()))
        .zip(values.par_chunks(g.in_plane()))
        .with_min_len(g.planes_per_task())
        .for_each(|((out, plane), values)| {
            g.for_each_winner(plane, |o, i| out[o] = values[i]);
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
