//! The task-level generator d as one kernel: per coordinate, an LSTM over T
//! steps of 2 input features, then a linear map of its last hidden state.
//! Gates in the order input, forget, cell, output, as
//! [`crate::TaskGenerator`].

use candle_core::{bail, Result, Tensor, WithDType};
use fewshot_backbone::kernels::{matmul, MatRef};

use super::{sigmoid_in_place, sum, take, take_mut, tanh_in_place, BlockNetwork, BLOCK};

/// The generator's output (P) from `steps` (T, P, 2) and its weights packed
/// as `[lstm.w_ih (4h x 2), lstm.w_hh (4h x h), lstm.bias (4h), out.weight
/// (h), out.bias (1)]`.
pub fn task_generator(steps: &Tensor, packed: &Tensor, hidden: usize) -> Result<Tensor> {
    let (steps_count, coordinates, features) = steps.dims3()?;
    if features != 2 || steps_count == 0 {
        bail!(
            "task_generator: expected steps of shape (T >= 1, P, 2), got {:?}",
            steps.dims()
        );
    }
    let lstm = Lstm {
        steps: steps_count,
        coordinates,
        hidden,
    };
    super::apply_network(lstm, steps, packed)
}

/// The task-level generator's sizes: T steps, P coordinates, h hidden units.
#[derive(Debug, Clone, Copy)]
struct Lstm {
    steps: usize,
    coordinates: usize,
    hidden: usize,
}

impl Lstm {
    fn gates(&self) -> usize {
        4 * self.hidden
    }

    fn packed_len(&self) -> usize {
        let (h, g) = (self.hidden, self.gates());
        g * 2 + g * h + g + h + 1
    }
}

/// Views of the packed weights (or of their gradient).
struct Weights<S> {
    w_ih: S,
    w_hh: S,
    bias: S,
    out_weight: S,
    out_bias: S,
}

fn unpack<T>(mut packed: &[T], lstm: Lstm) -> Weights<&[T]> {
    let (h, g) = (lstm.hidden, lstm.gates());
    Weights {
        w_ih: take(&mut packed, g * 2),
        w_hh: take(&mut packed, g * h),
        bias: take(&mut packed, g),
        out_weight: take(&mut packed, h),
        out_bias: take(&mut packed, 1),
    }
}

fn unpack_mut<T>(mut packed: &mut [T], lstm: Lstm) -> Weights<&mut [T]> {
    let (h, g) = (lstm.hidden, lstm.gates());
    Weights {
        w_ih: take_mut(&mut packed, g * 2),
        w_hh: take_mut(&mut packed, g * h),
        bias: take_mut(&mut packed, g),
        out_weight: take_mut(&mut packed, h),
        out_bias: take_mut(&mut packed, 1),
    }
}

/// Everything a block's forward pass computes, row-major with one column per
/// coordinate of the block (`n` columns): inputs (T x 2 x n), hidden and cell
/// states (T + 1 of them, the first zero, each h x n), tanh of each cell
/// state after the first (T x h x n), and gate activations (T x 4h x n).
struct Trace<T> {
    n: usize,
    inputs: Vec<T>,
    hidden: Vec<T>,
    cell: Vec<T>,
    tanh_cell: Vec<T>,
    gates: Vec<T>,
}

impl<T: WithDType> Trace<T> {
    fn new(lstm: Lstm) -> Self {
        let (t, h) = (lstm.steps, lstm.hidden);
        Self {
            n: 0,
            inputs: vec![T::zero(); t * 2 * BLOCK],
            hidden: vec![T::zero(); (t + 1) * h * BLOCK],
            cell: vec![T::zero(); (t + 1) * h * BLOCK],
            tanh_cell: vec![T::zero(); t * h * BLOCK],
            gates: vec![T::zero(); t * lstm.gates() * BLOCK],
        }
    }

    /// Runs the LSTM on coordinates `first..first + n`.
    fn run(&mut self, lstm: Lstm, weights: &Weights<&[T]>, steps: &[T], first: usize, n: usize) {
        self.n = n;
        let (h, g) = (lstm.hidden, lstm.gates());
        for t in 0..lstm.steps {
            let inputs = &mut self.inputs[t * 2 * n..(t + 1) * 2 * n];
            for j in 0..n {
                let at = (t * lstm.coordinates + first + j) * 2;
                inputs[j] = steps[at];
                inputs[n + j] = steps[at + 1];
            }
        }
        self.hidden[..h * n].fill(T::zero());
        self.cell[..h * n].fill(T::zero());
        for t in 0..lstm.steps {
            let (x0, x1) = self.inputs[t * 2 * n..(t + 1) * 2 * n].split_at(n);
            let gates = &mut self.gates[t * g * n..(t + 1) * g * n];
            let previous = &self.hidden[t * h * n..(t + 1) * h * n];
            matmul(
                gates,
                MatRef::row_major(weights.w_hh, g, h),
                MatRef::row_major(previous, h, n),
                false,
                false,
            );
            for (row, pre) in gates.chunks_exact_mut(n).enumerate() {
                let (a0, a1, b) = (
                    weights.w_ih[2 * row],
                    weights.w_ih[2 * row + 1],
                    weights.bias[row],
                );
                for j in 0..n {
                    pre[j] += b + a0 * x0[j] + a1 * x1[j];
                }
                match (2 * h..3 * h).contains(&row) {
                    true => tanh_in_place(pre),
                    false => sigmoid_in_place(pre),
                }
            }
            let (cells, new_cells) = self.cell.split_at_mut((t + 1) * h * n);
            let c_old = &cells[t * h * n..];
            let c_new = &mut new_cells[..h * n];
            let tanh_c = &mut self.tanh_cell[t * h * n..(t + 1) * h * n];
            let h_new = &mut self.hidden[(t + 1) * h * n..(t + 2) * h * n];
            let (input, rest) = gates.split_at(h * n);
            let (forget, rest) = rest.split_at(h * n);
            let (cell, output) = rest.split_at(h * n);
            for e in 0..h * n {
                c_new[e] = forget[e] * c_old[e] + input[e] * cell[e];
            }
            tanh_c.copy_from_slice(c_new);
            tanh_in_place(tanh_c);
            for e in 0..h * n {
                h_new[e] = output[e] * tanh_c[e];
            }
        }
    }

    /// The last hidden state (h x n).
    fn last_hidden(&self, lstm: Lstm) -> &[T] {
        let (h, n) = (lstm.hidden, self.n);
        &self.hidden[lstm.steps * h * n..(lstm.steps + 1) * h * n]
    }
}

impl BlockNetwork for Lstm {
    const NAME: &'static str = "task-generator";
    const BACKWARD_NAME: &'static str = "task-generator-backward";
    type Scratch<T: WithDType> = Scratch<T>;

    fn items(&self) -> usize {
        self.coordinates
    }

    fn packed_len(&self) -> usize {
        Lstm::packed_len(self)
    }

    fn scratch<T: WithDType>(&self) -> Scratch<T> {
        Scratch {
            trace: Trace::new(*self),
            gate_grad: vec![T::zero(); self.gates() * BLOCK],
            hidden_grad: vec![T::zero(); self.hidden * BLOCK],
            cell_grad: vec![T::zero(); self.hidden * BLOCK],
        }
    }

    fn forward_block<T: WithDType>(
        &self,
        steps: &[T],
        packed: &[T],
        first: usize,
        out: &mut [T],
        scratch: &mut Scratch<T>,
    ) {
        let weights = unpack(packed, *self);
        let n = out.len();
        scratch.trace.run(*self, &weights, steps, first, n);
        matmul(
            out,
            MatRef::row_major(weights.out_weight, 1, self.hidden),
            MatRef::row_major(scratch.trace.last_hidden(*self), self.hidden, n),
            false,
            false,
        );
        out.iter_mut().for_each(|v| *v += weights.out_bias[0]);
    }

    fn backward_block<T: WithDType>(
        &self,
        steps: &[T],
        packed: &[T],
        first: usize,
        out_grad: &[T],
        gradient: &mut [T],
        scratch: &mut Scratch<T>,
    ) {
        let weights = unpack(packed, *self);
        scratch
            .trace
            .run(*self, &weights, steps, first, out_grad.len());
        backward_block(*self, &weights, out_grad, gradient, scratch);
    }
}

/// A thread's working memory: the block's trace, and for the backward pass
/// d loss / d pre-activation of each gate (4h x n) and d loss / d hidden and
/// cell state (h x n each).
struct Scratch<T> {
    trace: Trace<T>,
    gate_grad: Vec<T>,
    hidden_grad: Vec<T>,
    cell_grad: Vec<T>,
}

/// Adds one block's share of the weights' gradient to `gradient`.
fn backward_block<T: WithDType>(
    lstm: Lstm,
    weights: &Weights<&[T]>,
    out_grad: &[T],
    gradient: &mut [T],
    scratch: &mut Scratch<T>,
) {
    let (h, g, n) = (lstm.hidden, lstm.gates(), out_grad.len());
    let trace = &scratch.trace;
    let grads = unpack_mut(gradient, lstm);
    // The output layer.
    matmul(
        grads.out_weight,
        MatRef::row_major(out_grad, 1, n),
        MatRef::row_major(trace.last_hidden(lstm), h, n).t(),
        true,
        false,
    );
    grads.out_bias[0] += sum(out_grad);
    let hidden_grad = &mut scratch.hidden_grad[..h * n];
    let cell_grad = &mut scratch.cell_grad[..h * n];
    let gate_grad = &mut scratch.gate_grad[..g * n];
    for (k, row) in hidden_grad.chunks_exact_mut(n).enumerate() {
        for j in 0..n {
            row[j] = weights.out_weight[k] * out_grad[j];
        }
    }
    cell_grad.fill(T::zero());
    let one = T::one();
    for t in (0..lstm.steps).rev() {
        let gates = &trace.gates[t * g * n..(t + 1) * g * n];
        let c_old = &trace.cell[t * h * n..(t + 1) * h * n];
        let tanh_c = &trace.tanh_cell[t * h * n..(t + 1) * h * n];
        let (input, rest) = gates.split_at(h * n);
        let (forget, rest) = rest.split_at(h * n);
        let (cell, output) = rest.split_at(h * n);
        let (d_input, rest) = gate_grad.split_at_mut(h * n);
        let (d_forget, rest) = rest.split_at_mut(h * n);
        let (d_cell, d_output) = rest.split_at_mut(h * n);
        for e in 0..h * n {
            let (i, f, c, o, tc) = (input[e], forget[e], cell[e], output[e], tanh_c[e]);
            let dh = hidden_grad[e];
            let dc = cell_grad[e] + dh * o * (one - tc * tc);
            d_input[e] = dc * c * i * (one - i);
            d_forget[e] = dc * c_old[e] * f * (one - f);
            d_cell[e] = dc * i * (one - c * c);
            d_output[e] = dh * tc * o * (one - o);
            cell_grad[e] = dc * f;
        }
        let inputs = &trace.inputs[t * 2 * n..(t + 1) * 2 * n];
        let previous = &trace.hidden[t * h * n..(t + 1) * h * n];
        for (b, row) in grads.bias.iter_mut().zip(gate_grad.chunks_exact(n)) {
            *b += sum(row);
        }
        let gate_rows = MatRef::row_major(&*gate_grad, g, n);
        matmul(
            grads.w_ih,
            gate_rows,
            MatRef::row_major(inputs, 2, n).t(),
            true,
            false,
        );
        matmul(
            grads.w_hh,
            gate_rows,
            MatRef::row_major(previous, h, n).t(),
            true,
            false,
        );
        matmul(
            hidden_grad,
            MatRef::row_major(weights.w_hh, g, h).t(),
            gate_rows,
            false,
            false,
        );
    }
}
