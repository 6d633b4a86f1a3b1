//! The example-level generator m as one kernel: per coordinate, the MLP
//! 2 -> h -> h -> 1 with ReLUs of [`crate::ExampleGenerator`].

use candle_core::{bail, Result, Tensor, WithDType};
use fewshot_backbone::kernels::{matmul, MatRef};

use super::{sum, take, take_mut, BlockNetwork, BLOCK};

/// The generator's output (R) from `inputs` (R, 2) and its weights packed as
/// `[l1.weight (h x 2), l1.bias (h), l2.weight (h x h), l2.bias (h),
/// out.weight (h), out.bias (1)]`.
pub fn example_generator(inputs: &Tensor, packed: &Tensor, hidden: usize) -> Result<Tensor> {
    let (rows, features) = inputs.dims2()?;
    if features != 2 {
        bail!(
            "example_generator: expected inputs of shape (R, 2), got {:?}",
            inputs.dims()
        );
    }
    let mlp = Mlp { rows, hidden };
    super::apply_network(mlp, inputs, packed)
}

/// The example-level generator's sizes: R rows (coordinates), h hidden units.
#[derive(Debug, Clone, Copy)]
struct Mlp {
    rows: usize,
    hidden: usize,
}

impl Mlp {
    fn packed_len(&self) -> usize {
        let h = self.hidden;
        2 * h + h + h * h + h + h + 1
    }
}

/// Views of the packed weights (or of their gradient).
struct Weights<S> {
    w1: S,
    b1: S,
    w2: S,
    b2: S,
    out_weight: S,
    out_bias: S,
}

fn unpack<T>(mut packed: &[T], h: usize) -> Weights<&[T]> {
    Weights {
        w1: take(&mut packed, 2 * h),
        b1: take(&mut packed, h),
        w2: take(&mut packed, h * h),
        b2: take(&mut packed, h),
        out_weight: take(&mut packed, h),
        out_bias: take(&mut packed, 1),
    }
}

fn unpack_mut<T>(mut packed: &mut [T], h: usize) -> Weights<&mut [T]> {
    Weights {
        w1: take_mut(&mut packed, 2 * h),
        b1: take_mut(&mut packed, h),
        w2: take_mut(&mut packed, h * h),
        b2: take_mut(&mut packed, h),
        out_weight: take_mut(&mut packed, h),
        out_bias: take_mut(&mut packed, 1),
    }
}

/// A block's forward pass, row-major with one column per row of the input
/// (`n` columns): the inputs (2 x n) and both hidden layers after ReLU
/// (h x n each).
struct Trace<T> {
    n: usize,
    inputs: Vec<T>,
    first: Vec<T>,
    second: Vec<T>,
}

impl<T: WithDType> Trace<T> {
    fn new(hidden: usize) -> Self {
        Self {
            n: 0,
            inputs: vec![T::zero(); 2 * BLOCK],
            first: vec![T::zero(); hidden * BLOCK],
            second: vec![T::zero(); hidden * BLOCK],
        }
    }

    /// Runs the MLP's hidden layers on input rows `first..first + n`.
    fn run(&mut self, h: usize, weights: &Weights<&[T]>, inputs: &[T], first: usize, n: usize) {
        self.n = n;
        let (x0, x1) = self.inputs[..2 * n].split_at_mut(n);
        for j in 0..n {
            x0[j] = inputs[2 * (first + j)];
            x1[j] = inputs[2 * (first + j) + 1];
        }
        let zero = T::zero();
        let layer1 = &mut self.first[..h * n];
        for (k, row) in layer1.chunks_exact_mut(n).enumerate() {
            let (a0, a1, b) = (weights.w1[2 * k], weights.w1[2 * k + 1], weights.b1[k]);
            for j in 0..n {
                let v = b + a0 * x0[j] + a1 * x1[j];
                row[j] = if v > zero { v } else { zero };
            }
        }
        let layer2 = &mut self.second[..h * n];
        matmul(
            layer2,
            MatRef::row_major(weights.w2, h, h),
            MatRef::row_major(layer1, h, n),
            false,
            false,
        );
        for (row, &b) in layer2.chunks_exact_mut(n).zip(weights.b2) {
            row.iter_mut().for_each(|v| {
                let pre = *v + b;
                *v = if pre > zero { pre } else { zero };
            });
        }
    }

    fn inputs(&self) -> &[T] {
        &self.inputs[..2 * self.n]
    }

    fn first(&self, h: usize) -> &[T] {
        &self.first[..h * self.n]
    }

    fn second(&self, h: usize) -> &[T] {
        &self.second[..h * self.n]
    }
}

impl BlockNetwork for Mlp {
    const NAME: &'static str = "example-generator";
    const BACKWARD_NAME: &'static str = "example-generator-backward";
    type Scratch<T: WithDType> = Scratch<T>;

    fn items(&self) -> usize {
        self.rows
    }

    fn packed_len(&self) -> usize {
        Mlp::packed_len(self)
    }

    fn scratch<T: WithDType>(&self) -> Scratch<T> {
        Scratch {
            trace: Trace::new(self.hidden),
            first_grad: vec![T::zero(); self.hidden * BLOCK],
            second_grad: vec![T::zero(); self.hidden * BLOCK],
        }
    }

    fn forward_block<T: WithDType>(
        &self,
        inputs: &[T],
        packed: &[T],
        first: usize,
        out: &mut [T],
        scratch: &mut Scratch<T>,
    ) {
        let h = self.hidden;
        let weights = unpack(packed, h);
        let n = out.len();
        scratch.trace.run(h, &weights, inputs, first, n);
        matmul(
            out,
            MatRef::row_major(weights.out_weight, 1, h),
            MatRef::row_major(scratch.trace.second(h), h, n),
            false,
            false,
        );
        out.iter_mut().for_each(|v| *v += weights.out_bias[0]);
    }

    fn backward_block<T: WithDType>(
        &self,
        inputs: &[T],
        packed: &[T],
        first: usize,
        out_grad: &[T],
        gradient: &mut [T],
        scratch: &mut Scratch<T>,
    ) {
        let h = self.hidden;
        let weights = unpack(packed, h);
        scratch
            .trace
            .run(h, &weights, inputs, first, out_grad.len());
        backward_block(h, &weights, out_grad, gradient, scratch);
    }
}

/// A thread's working memory: the block's trace and, for the backward pass,
/// the gradients of both layers' pre-activations (h x n each).
struct Scratch<T> {
    trace: Trace<T>,
    first_grad: Vec<T>,
    second_grad: Vec<T>,
}

/// Adds one block's share of the weights' gradient to `gradient`.
fn backward_block<T: WithDType>(
    h: usize,
    weights: &Weights<&[T]>,
    out_grad: &[T],
    gradient: &mut [T],
    scratch: &mut Scratch<T>,
) {
    let n = out_grad.len();
    let trace = &scratch.trace;
    let grads = unpack_mut(gradient, h);
    let (first, second) = (trace.first(h), trace.second(h));
    matmul(
        grads.out_weight,
        MatRef::row_major(out_grad, 1, n),
        MatRef::row_major(second, h, n).t(),
        true,
        false,
    );
    grads.out_bias[0] += sum(out_grad);
    let zero = T::zero();
    // Through the second ReLU: a unit passes gradient where it was positive.
    let second_grad = &mut scratch.second_grad[..h * n];
    for (k, row) in second_grad.chunks_exact_mut(n).enumerate() {
        let w = weights.out_weight[k];
        let active = &second[k * n..(k + 1) * n];
        for j in 0..n {
            row[j] = if active[j] > zero {
                w * out_grad[j]
            } else {
                zero
            };
        }
    }
    for (b, row) in grads.b2.iter_mut().zip(second_grad.chunks_exact(n)) {
        *b += sum(row);
    }
    let second_rows = MatRef::row_major(&*second_grad, h, n);
    matmul(
        grads.w2,
        second_rows,
        MatRef::row_major(first, h, n).t(),
        true,
        false,
    );
    let first_grad = &mut scratch.first_grad[..h * n];
    matmul(
        first_grad,
        MatRef::row_major(weights.w2, h, h).t(),
        second_rows,
        false,
        false,
    );
    first_grad
        .iter_mut()
        .zip(first)
        .for_each(|(g, &a)| *g = if a > zero { *g } else { zero });
    for (b, row) in grads.b1.iter_mut().zip(first_grad.chunks_exact(n)) {
        *b += sum(row);
    }
    matmul(
        grads.w1,
        MatRef::row_major(&*first_grad, h, n),
        MatRef::row_major(trace.inputs(), 2, n).t(),
        true,
        false,
    );
}
