//! A max-pooling block of conv-4 as one op: convolution, batch norm with the
//! batch's statistics, ReLU and 2x2 max-pooling.
//!
//! Why one op: candle's backward adds every gradient that reaches an op
//! input to a fresh tensor of zeros (a zero fill and a full-size add per op
//! input; docs/RESULTS.md, "candle's gradient accumulation"). Between
//! `conv2d` and `batch_norm_relu_pool` that input is the convolution's
//! output, the largest activation of a block (four times the pooled output
//! the next block reads). Inside one op its gradient goes straight from
//! batch norm's backward into the convolution's.
//!
//! The arithmetic is that of the two ops apart, bit for bit: the forward
//! runs the convolution kernel then the fused batch norm + ReLU + pooling
//! kernel, and the backward their backwards. The forward keeps the
//! convolution's output, which the backward needs as a tensor of the graph
//! (second-order MAML differentiates through batch norm's backward, which
//! reads it): the first backward wraps the kept values in a
//! [`KeptConvolution`] op, whose gradients are the convolution's, once per
//! block; later backward passes through the same block reuse that tensor.
//!
//! Correct to any order, but not always faster: a second backward through
//! the graph of a first (second-order MAML) reaches the convolution's
//! output along two paths, the pooled output and batch norm's backward,
//! and then runs the convolution's backward once per path where the ops
//! apart run it once on the sum. `Conv4::with_fused_blocks` picks.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

use super::batch_norm_relu_pool::{self, BlockShape, KeptPooling};
use super::conv::{self, ConvGeometry};
use super::kept::{HandOver, KeptTensor};
use super::op::{apply3, Kernel3};

/// `max_pool2x2(relu(batch_norm(conv2d(x, weight))))` with the statistics of
/// this batch, as one op. `x`: (N, Cin, H, W), `weight`: (Cout, Cin, K, K),
/// `gamma` and `beta`: (Cout).
pub fn conv_batch_norm_relu_pool(
    x: &Tensor,
    weight: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (stride, padding): (usize, usize),
    eps: f64,
) -> Result<Tensor> {
    let geometry = ConvGeometry::of(x, weight, stride, padding)?;
    let block = BlockShape::of_dims(geometry.output_shape().dims4()?)?;
    block.check_affine("conv_batch_norm_relu_pool", gamma, beta)?;
    // candle's custom ops take at most three inputs: gamma and beta travel as
    // the rows of one (2, Cout) tensor.
    let affine = Tensor::stack(&[gamma, beta], 0)?;
    let op = ConvBlock {
        geometry,
        block,
        eps,
        activation: KeptTensor::new("conv_batch_norm_relu_pool convolution output"),
        pooling: KeptPooling::new([x, weight, &affine].iter().any(|t| t.track_op())),
    };
    apply3(x, weight, &affine, op)
}

/// The op. What its forward keeps lives as long as the op: with no graph
/// (no input needs a gradient) candle drops the op, and the kept values
/// with it, as soon as the forward returns.
struct ConvBlock {
    geometry: ConvGeometry,
    block: BlockShape,
    eps: f64,
    /// The convolution's output.
    activation: KeptTensor,
    /// The batch statistics and the pooling's winners.
    pooling: KeptPooling,
}

impl Kernel3 for ConvBlock {
    const NAME: &'static str = "fewshot-conv-batch-norm-relu-pool";

    fn run<T: WithDType>(&self, x: &[T], weight: &[T], affine: &[T]) -> Vec<T> {
        let activation = conv::forward(&self.geometry, x, weight);
        let (gamma, beta) = affine.split_at(affine.len() / 2);
        let pooled = batch_norm_relu_pool::forward(
            &self.block,
            &activation,
            (gamma, beta, self.eps),
            self.pooling.with_winners,
        );
        self.activation.keep(T::to_cpu_storage_owned(activation));
        self.pooling.keep(&self.block, pooled)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.block.output_shape()
    }

    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        affine: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let activation = self.activation.tensor(|values| {
            let values = HandOver::new("fewshot-kept-conv2d", values);
            let geometry = self.geometry;
            x.apply_op2(weight, KeptConvolution { geometry, values })
        })?;
        let (gamma, beta) = (affine.get(0)?, affine.get(1)?);
        let (d_activation, d_gamma, d_beta) =
            self.pooling
                .backward(&activation, (&gamma, &beta, self.eps), grad)?;
        let (dx, d_weight) = match d_activation {
            Some(d_activation) => conv::backward(self.geometry, x, weight, &d_activation)?,
            None => (None, None),
        };
        let d_affine = match (d_gamma, d_beta) {
            (None, None) => None,
            (d_gamma, d_beta) => {
                let zeros = || gamma.zeros_like();
                let d_gamma = d_gamma.map_or_else(zeros, Ok)?;
                let d_beta = d_beta.map_or_else(zeros, Ok)?;
                Some(Tensor::stack(&[d_gamma, d_beta], 0)?)
            }
        };
        Ok((dx, d_weight, d_affine))
    }
}

/// A convolution's output computed already (by [`ConvBlock`]'s forward):
/// its forward hands the values over, its backward is the convolution's.
struct KeptConvolution {
    geometry: ConvGeometry,
    values: HandOver,
}

impl CustomOp2 for KeptConvolution {
    fn name(&self) -> &'static str {
        "fewshot-kept-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.values.take()?, self.geometry.output_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv::backward(self.geometry, x, weight, grad)
    }
}
