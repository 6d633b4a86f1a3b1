//! Fused CPU kernels for the two fast-weight generators.
//!
//! Both generators run a tiny network on every weight coordinate (148,032 of
//! them for Omniglot's convolutions, times the support size for the example
//! level). As chains of candle ops, each gate or layer is a whole-tensor
//! temporary of tens to hundreds of MB, allocated, zero-filled by the OS and
//! walked once per op, forward and backward. These kernels instead take
//! coordinates in blocks small enough to stay in cache, run the whole network
//! on a block (the products through the backbone's `gemm` front), and
//! recompute a block's forward pass in the backward pass rather than keeping
//! it. Weights come packed in one vector (each tensor flattened, in the
//! generator's `param_shapes` order), so one kernel input carries them all
//! and candle's `cat` splits their gradient back.
//!
//! The inputs (preprocessed gradients) are constants and get no gradient; the
//! backward kernels are not differentiable again (Meta Networks needs first
//! derivatives only).

mod lstm;
mod mlp;

use candle_core::{bail, DType, Result, Shape, Tensor, WithDType};
use fewshot_backbone::kernels::{apply2, apply3, gradient_if, Kernel2, Kernel3};
use rayon::prelude::*;

pub use lstm::task_generator;
pub use mlp::example_generator;

/// Coordinates per block: a block's trace (every step's gates and states)
/// stays within the L2 cache.
const BLOCK: usize = 128;

/// `tanh` of every element. In f32 through [`exp_f32`], a branch-free
/// formula the compiler vectorises (libm's scalar `tanhf` took a fifth of a
/// training step); in f64 (the tests' precision) through libm.
fn tanh_in_place<T: WithDType>(values: &mut [T]) {
    map_in_place(
        values,
        |x| 1.0 - 2.0 / (1.0 + exp_f32(2.0 * x)),
        |x| x.tanh(),
    );
}

/// The logistic function of every element, as [`tanh_in_place`].
fn sigmoid_in_place<T: WithDType>(values: &mut [T]) {
    map_in_place(
        values,
        |x| 1.0 / (1.0 + exp_f32(-x)),
        |x| 1.0 / (1.0 + (-x).exp()),
    );
}

/// `single` of every element of an f32 slice, `double` of any other.
#[inline(always)]
fn map_in_place<T: WithDType>(
    values: &mut [T],
    single: impl Fn(f32) -> f32,
    double: impl Fn(f64) -> f64,
) {
    if T::DTYPE == DType::F32 {
        // For T = f32 the conversions below are the identity and compile away.
        for v in values.iter_mut() {
            *v = T::from_f64(single(v.to_f64() as f32) as f64);
        }
    } else {
        for v in values.iter_mut() {
            *v = T::from_f64(double(v.to_f64()));
        }
    }
}

/// e^x in f32 to about one unit in the last place, without branches or
/// integer conversions (which the compiler does not vectorise): x = n ln 2 + r
/// with |r| <= ln 2 / 2, e^r by its Taylor polynomial of degree 7 (remainder
/// below 1e-8), 2^n written into the exponent bits. Inputs are clamped to
/// [-87, 88], where 2^n stays a normal number; tanh and the logistic function
/// are flat to f32 precision beyond that.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // Adding 2^23 rounds to an integer kept in the low mantissa bits: there
    // sits n + 127, the biased exponent of 2^n.
    const SHIFT: f32 = 8_388_608.0 + 127.0;
    // ln 2 split in two, the first part short enough that n * LN2_HIGH is
    // exact, so r keeps its precision.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    p * f32::from_bits(shifted.to_bits() << 23)
}

/// Sum of a row, kept in 16 partial sums: one running total is a chain of
/// dependent adds the compiler may not reorder (float addition is not
/// associative), while 16 independent ones fill a vector register. The
/// generators' bias gradients sum rows this way: as one chain they took ~5%
/// of a 5-way training step.
fn sum<T: WithDType>(row: &[T]) -> T {
    const LANES: usize = 16;
    let mut partial = [T::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (total, &v) in partial.iter_mut().zip(chunk) {
            *total += v;
        }
    }
    partial
        .iter()
        .chain(rest)
        .fold(T::zero(), |total, &v| total + v)
}

/// The first `len` elements of `slice`, then the rest.
fn take<'a, T>(slice: &mut &'a [T], len: usize) -> &'a [T] {
    let (head, tail) = slice.split_at(len);
    *slice = tail;
    head
}

fn take_mut<'a, T>(slice: &mut &'a mut [T], len: usize) -> &'a mut [T] {
    let (head, tail) = std::mem::take(slice).split_at_mut(len);
    *slice = tail;
    head
}

/// A small network run on every coordinate (or row) on its own, a block of
/// them at a time: what the two generators' kernels have in common. Its
/// weights come packed in one vector.
trait BlockNetwork: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const BACKWARD_NAME: &'static str;
    /// A thread's working memory for one block.
    type Scratch<T: WithDType>: Send;

    /// Coordinates: one output each.
    fn items(&self) -> usize;
    fn packed_len(&self) -> usize;
    fn scratch<T: WithDType>(&self) -> Self::Scratch<T>;
    /// The outputs of coordinates `first..first + out.len()`.
    fn forward_block<T: WithDType>(
        &self,
        inputs: &[T],
        packed: &[T],
        first: usize,
        out: &mut [T],
        scratch: &mut Self::Scratch<T>,
    );
    /// Adds to `gradient` the packed weights' gradient from coordinates
    /// `first..first + out_grad.len()`, recomputing their forward pass.
    fn backward_block<T: WithDType>(
        &self,
        inputs: &[T],
        packed: &[T],
        first: usize,
        out_grad: &[T],
        gradient: &mut [T],
        scratch: &mut Self::Scratch<T>,
    );
}

/// A [`BlockNetwork`]'s output (one value per coordinate) from its inputs
/// and packed weights, as a candle op whose gradient reaches the weights.
fn apply_network<N: BlockNetwork>(network: N, inputs: &Tensor, packed: &Tensor) -> Result<Tensor> {
    if packed.dims() != [network.packed_len()] {
        bail!(
            "{}: expected the packed weights as a vector of {}, got shape {:?}",
            N::NAME,
            network.packed_len(),
            packed.dims()
        );
    }
    apply2(inputs, packed, Forward(network))
}

struct Forward<N>(N);

/// The packed weights' gradient from the output's.
struct Backward<N>(N);

impl<N: BlockNetwork> Kernel2 for Forward<N> {
    const NAME: &'static str = N::NAME;

    fn run<T: WithDType>(&self, inputs: &[T], packed: &[T]) -> Vec<T> {
        let network = self.0;
        let mut out = vec![T::zero(); network.items()];
        out.par_chunks_mut(BLOCK).enumerate().for_each_init(
            || network.scratch(),
            |scratch, (index, out)| {
                network.forward_block(inputs, packed, index * BLOCK, out, scratch)
            },
        );
        out
    }

    fn shape(&self, _inputs: &Shape) -> Shape {
        Shape::from(self.0.items())
    }

    fn backward(
        &self,
        inputs: &Tensor,
        packed: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed_grad = gradient_if(packed, || apply3(inputs, packed, grad, Backward(self.0)))?;
        Ok((None, packed_grad))
    }
}

impl<N: BlockNetwork> Kernel3 for Backward<N> {
    const NAME: &'static str = N::BACKWARD_NAME;

    fn run<T: WithDType>(&self, inputs: &[T], packed: &[T], out_grad: &[T]) -> Vec<T> {
        let network = self.0;
        let (items, packed_len) = (network.items(), network.packed_len());
        (0..items.div_ceil(BLOCK))
            .into_par_iter()
            .fold(
                || (vec![T::zero(); packed_len], network.scratch()),
                |(mut gradient, mut scratch), index| {
                    let first = index * BLOCK;
                    let out_grad = &out_grad[first..(first + BLOCK).min(items)];
                    network.backward_block(
                        inputs,
                        packed,
                        first,
                        out_grad,
                        &mut gradient,
                        &mut scratch,
                    );
                    (gradient, scratch)
                },
            )
            .map(|(gradient, _)| gradient)
            .reduce(
                || vec![T::zero(); packed_len],
                |mut total, part| {
                    total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
                    total
                },
            )
    }

    fn shape(&self, _inputs: &Shape) -> Shape {
        Shape::from(self.0.packed_len())
    }

    fn backward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Err(candle_core::Error::Msg(format!(
            "{}: the fused generator kernels have first derivatives only",
            Self::NAME
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_f32_functions_match_libm() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.025).collect();
        for &x in &xs {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if x > -87.0 && x < 88.0 {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
        }
        let mut tanh = xs.clone();
        tanh_in_place(&mut tanh);
        let mut logistic = xs.clone();
        sigmoid_in_place(&mut logistic);
        for ((&x, t), s) in xs.iter().zip(tanh).zip(logistic) {
            let x = x as f64;
            assert!((t as f64 - x.tanh()).abs() < 3e-7, "tanh({x}) = {t}");
            let want = 1.0 / (1.0 + (-x).exp());
            assert!((s as f64 - want).abs() < 3e-7, "sigmoid({x}) = {s}");
        }
    }

    #[test]
    fn sum_adds_every_element_for_any_length() {
        // Lengths around the partial sums' width: none, part, whole, more.
        for len in [0usize, 1, 15, 16, 17, 33, 128] {
            let row: Vec<f64> = (1..=len).map(|i| i as f64).collect();
            assert_eq!(sum(&row), (len * (len + 1) / 2) as f64, "length {len}");
        }
    }
}
