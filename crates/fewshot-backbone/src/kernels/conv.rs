//! 2-D convolution (no bias, no dilation, one group) by im2col and a matrix
//! product, with its input and weight gradients as custom ops of their own;
//! also with a different weight for every image (Meta Networks' fast
//! weights), where each image is its own product.
//!
//! The three ops are bilinear and close under differentiation: with
//! `y = conv(x, w)`, `dx = input_grad(dy, w)` and `dw = weight_grad(x, dy)`,
//! the gradients of `input_grad` are `conv` and `weight_grad`, and those of
//! `weight_grad` are `input_grad` and `conv`. So any order of derivative runs
//! on these kernels.
//!
//! Images are processed in chunks: a chunk's im2col matrix (patch length x
//! the chunk's output pixels, in one of the two layouts of `unfold.rs`)
//! stays in cache while one product consumes it.
//! Chunks run in parallel when there are enough of them; otherwise the single
//! product uses every thread.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::{bail, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::filled_by;
use super::gemm::{matmul, MatRef};
use super::op::{apply2, gradient_if, Kernel2};
use super::unfold::Unfolding;

/// Columns (output pixels) per chunk the kernels aim for: on this kind of
/// machine the 64-channel layers of conv-4 ran 10-30% slower with chunks of
/// 256 columns and with chunks of 4096 (`examples/conv_layers.rs`). An image
/// with more output pixels than this is a chunk on its own, so that its
/// product is written straight into the output (no reordering copy).
const TARGET_CHUNK_COLUMNS: usize = 1024;

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
    /// Whether every image has a weight of its own (N, Cout, Cin, KH, KW).
    pub per_sample: bool,
}

impl ConvGeometry {
    /// The geometry of an (N, Cin, H, W) input and (Cout, KH, KW) kernels,
    /// checked: the kernel fits the padded input and the stride is positive.
    pub(super) fn new(
        (batch, in_channels, in_h, in_w): (usize, usize, usize, usize),
        (out_channels, kernel_h, kernel_w): (usize, usize, usize),
        stride: usize,
        padding: usize,
        per_sample: bool,
    ) -> Result<Self> {
        if stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        if in_h + 2 * padding < kernel_h || in_w + 2 * padding < kernel_w {
            bail!(
                "conv2d: a {}x{} kernel does not fit a {}x{} input with padding {}",
                kernel_h,
                kernel_w,
                in_h,
                in_w,
                padding
            );
        }
        Ok(Self {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            stride,
            padding,
            per_sample,
        })
    }

    /// The geometry of `x` (N, Cin, H, W) convolved with one `weight`
    /// (Cout, Cin, KH, KW), checked.
    pub(super) fn of(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (batch, in_channels, in_h, in_w) = x.dims4()?;
        let (out_channels, weight_in, kernel_h, kernel_w) = weight.dims4()?;
        if weight_in != in_channels {
            bail!("conv2d: input has {in_channels} channels, weight expects {weight_in}");
        }
        Self::new(
            (batch, in_channels, in_h, in_w),
            (out_channels, kernel_h, kernel_w),
            stride,
            padding,
            false,
        )
    }

    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.padding - self.kernel_h) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding - self.kernel_w) / self.stride + 1
    }

    pub(super) fn out_pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Width and pixels of the input surrounded by `padding` zeros.
    pub(super) fn padded_w(&self) -> usize {
        self.in_w + 2 * self.padding
    }

    pub(super) fn padded_pixels(&self) -> usize {
        (self.in_h + 2 * self.padding) * self.padded_w()
    }

    pub(super) fn in_pixels(&self) -> usize {
        self.in_h * self.in_w
    }

    /// Length of one input patch: a column of the unfolded input.
    pub(super) fn patch_len(&self) -> usize {
        self.in_channels * self.taps()
    }

    /// Taps of the kernel: `kernel_h * kernel_w`.
    pub(super) fn taps(&self) -> usize {
        self.kernel_h * self.kernel_w
    }

    /// Multiply-adds of the forward pass, times two. Each gradient costs the same.
    pub fn flops(&self) -> usize {
        2 * self.batch * self.out_channels * self.patch_len() * self.out_pixels()
    }

    /// Elements of the weight one image is convolved with.
    fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }

    /// The weight image `image` is convolved with.
    fn weight_of<'a, T>(&self, weight: &'a [T], image: usize) -> &'a [T] {
        match self.per_sample {
            true => &weight[image * self.weight_len()..(image + 1) * self.weight_len()],
            false => weight,
        }
    }

    fn images_per_chunk(&self) -> usize {
        if self.per_sample {
            return 1;
        }
        let wanted = TARGET_CHUNK_COLUMNS / self.out_pixels();
        let spread = self.batch.div_ceil(super::threads());
        wanted.min(spread).max(1)
    }

    /// Whether chunks run in parallel (else each product is parallel).
    fn parallel_chunks(&self) -> bool {
        self.batch.div_ceil(self.images_per_chunk()) >= super::threads()
    }

    fn input_shape(&self) -> Shape {
        (self.batch, self.in_channels, self.in_h, self.in_w).into()
    }

    pub(super) fn output_shape(&self) -> Shape {
        (self.batch, self.out_channels, self.out_h(), self.out_w()).into()
    }

    fn weight_shape(&self) -> Shape {
        let one = [
            self.out_channels,
            self.in_channels,
            self.kernel_h,
            self.kernel_w,
        ];
        match self.per_sample {
            true => [&[self.batch][..], &one].concat().into(),
            false => one.to_vec().into(),
        }
    }
}

/// `x` (N, Cin, H, W) convolved with `weight` (Cout, Cin, KH, KW).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    apply2(
        x,
        weight,
        Forward(ConvGeometry::of(x, weight, stride, padding)?),
    )
}

/// `x` (N, Cin, H, W), each image convolved with its own weight from
/// `weights` (N, Cout, Cin, KH, KW).
pub fn conv2d_per_sample(
    x: &Tensor,
    weights: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (batch, in_channels, in_h, in_w) = x.dims4()?;
    let (weight_batch, out_channels, weight_in, kernel_h, kernel_w) = weights.dims5()?;
    if weight_batch != batch || weight_in != in_channels {
        bail!(
            "conv2d_per_sample: input {:?} needs weights ({batch}, Cout, {in_channels}, KH, KW), got {:?}",
            x.dims(),
            weights.dims()
        );
    }
    let geometry = ConvGeometry::new(
        (batch, in_channels, in_h, in_w),
        (out_channels, kernel_h, kernel_w),
        stride,
        padding,
        true,
    )?;
    apply2(x, weights, Forward(geometry))
}

/// The gradient of a convolution's input given the gradient `grad_out` of its
/// output: a transposed convolution onto an `in_h` x `in_w` image.
pub fn conv2d_input_grad(
    grad_out: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    (in_h, in_w): (usize, usize),
) -> Result<Tensor> {
    let (batch, out_channels, out_h, out_w) = grad_out.dims4()?;
    let (weight_out, in_channels, kernel_h, kernel_w) = weight.dims4()?;
    let geometry = ConvGeometry::new(
        (batch, in_channels, in_h, in_w),
        (out_channels, kernel_h, kernel_w),
        stride,
        padding,
        false,
    )?;
    if weight_out != out_channels || (geometry.out_h(), geometry.out_w()) != (out_h, out_w) {
        bail!(
            "conv2d_input_grad: gradient {:?} does not match weight {:?} on a {in_h}x{in_w} input",
            grad_out.dims(),
            weight.dims()
        );
    }
    apply2(grad_out, weight, InputGrad(geometry))
}

/// The gradient of a convolution's `kernel_h` x `kernel_w` weight given its
/// input `x` and the gradient `grad_out` of its output.
pub fn conv2d_weight_grad(
    x: &Tensor,
    grad_out: &Tensor,
    stride: usize,
    padding: usize,
    (kernel_h, kernel_w): (usize, usize),
) -> Result<Tensor> {
    let (batch, in_channels, in_h, in_w) = x.dims4()?;
    let (grad_batch, out_channels, out_h, out_w) = grad_out.dims4()?;
    let geometry = ConvGeometry::new(
        (batch, in_channels, in_h, in_w),
        (out_channels, kernel_h, kernel_w),
        stride,
        padding,
        false,
    )?;
    if grad_batch != batch || (geometry.out_h(), geometry.out_w()) != (out_h, out_w) {
        bail!(
            "conv2d_weight_grad: gradient {:?} does not match input {:?}",
            grad_out.dims(),
            x.dims()
        );
    }
    apply2(x, grad_out, WeightGrad(geometry))
}

/// `conv(x, weight)`.
struct Forward(ConvGeometry);

/// `input_grad(grad_out, weight)`.
struct InputGrad(ConvGeometry);

/// `weight_grad(x, grad_out)`.
struct WeightGrad(ConvGeometry);

impl Kernel2 for Forward {
    const NAME: &'static str = "fewshot-conv2d";

    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        forward(&self.0, a, b)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.output_shape()
    }

    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward(self.0, x, weight, grad)
    }
}

/// The gradients of `x` and `weight` convolved with geometry `g`, given the
/// output's gradient `grad` (each only where the input needs one).
pub(super) fn backward(
    g: ConvGeometry,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = gradient_if(x, || apply2(grad, weight, InputGrad(g)))?;
    let dw = gradient_if(weight, || apply2(x, grad, WeightGrad(g)))?;
    Ok((dx, dw))
}

impl Kernel2 for InputGrad {
    const NAME: &'static str = "fewshot-conv2d-input-grad";

    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        input_grad(&self.0, a, b)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.input_shape()
    }

    fn backward(
        &self,
        grad_out: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let d_grad_out = gradient_if(grad_out, || apply2(grad, weight, Forward(g)))?;
        let d_weight = gradient_if(weight, || apply2(grad, grad_out, WeightGrad(g)))?;
        Ok((d_grad_out, d_weight))
    }
}

impl Kernel2 for WeightGrad {
    const NAME: &'static str = "fewshot-conv2d-weight-grad";

    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        weight_grad(&self.0, a, b)
    }

    fn shape(&self, _: &Shape) -> Shape {
        self.0.weight_shape()
    }

    fn backward(
        &self,
        x: &Tensor,
        grad_out: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let dx = gradient_if(x, || apply2(grad_out, grad, InputGrad(g)))?;
        let d_grad_out = gradient_if(grad_out, || apply2(x, grad, Forward(g)))?;
        Ok((dx, d_grad_out))
    }
}

pub(super) fn forward<T: WithDType>(g: &ConvGeometry, x: &[T], weight: &[T]) -> Vec<T> {
    super::count_flops(g.flops());
    let unfolding = Unfolding::new::<T>(g);
    let weight = unfolding.weight(g, weight);
    let (pixels, patch) = (g.out_pixels(), g.patch_len());
    let per_chunk = g.images_per_chunk();
    let parallel = g.parallel_chunks();
    // Each chunk of the output is one chunk of images' product, written whole.
    let run = |(chunk, out): (usize, &mut [MaybeUninit<T>])| {
        let first = chunk * per_chunk;
        let weight = MatRef::row_major(g.weight_of(&weight, first), g.out_channels, patch);
        let images = out.len() / (g.out_channels * pixels);
        let cols = unfolding.unfold(g, x, first, images);
        unfolding.output(g, weight, &cols, out, !parallel);
    };
    let chunk_len = per_chunk * g.out_channels * pixels;
    // SAFETY: the chunks cover the output and `run` writes each whole.
    unsafe {
        filled_by(g.batch * g.out_channels * pixels, |out| match parallel {
            true => out.par_chunks_mut(chunk_len).enumerate().for_each(run),
            false => out.chunks_mut(chunk_len).enumerate().for_each(run),
        })
    }
}

fn input_grad<T: WithDType>(g: &ConvGeometry, grad_out: &[T], weight: &[T]) -> Vec<T> {
    super::count_flops(g.flops());
    let unfolding = Unfolding::new::<T>(g);
    let weight = unfolding.weight(g, weight);
    let (pixels, patch) = (g.out_pixels(), g.patch_len());
    let image_len = g.in_channels * g.in_pixels();
    let per_chunk = g.images_per_chunk();
    let parallel = g.parallel_chunks();
    let run = |(chunk, dx): (usize, &mut [MaybeUninit<T>])| {
        let first = chunk * per_chunk;
        let weight = MatRef::row_major(g.weight_of(&weight, first), g.out_channels, patch);
        let images = dx.len() / image_len;
        let columns = images * pixels;
        let grad = gather_columns(g, grad_out, first, images);
        let grad = MatRef::row_major(&grad, g.out_channels, columns);
        let cols = unfolding.patch_gradients(weight, grad, !parallel);
        unfolding.fold(g, &cols, images, dx);
    };
    let chunk_len = per_chunk * image_len;
    // SAFETY: the chunks cover `dx` and `fold` writes every image of its chunk.
    unsafe {
        filled_by(g.batch * image_len, |dx| match parallel {
            true => dx.par_chunks_mut(chunk_len).enumerate().for_each(run),
            false => dx.chunks_mut(chunk_len).enumerate().for_each(run),
        })
    }
}

fn weight_grad<T: WithDType>(g: &ConvGeometry, x: &[T], grad_out: &[T]) -> Vec<T> {
    super::count_flops(g.flops());
    let unfolding = Unfolding::new::<T>(g);
    let pixels = g.out_pixels();
    let per_chunk = g.images_per_chunk();
    let parallel = g.parallel_chunks();
    let weight_len = g.weight_len();
    if g.per_sample {
        // Each image's own weight gradient: one product per image, no sum.
        let mut dw = vec![T::zero(); g.batch * weight_len];
        let run = |(image, dw): (usize, &mut [T])| {
            let cols = unfolding.unfold(g, x, image, 1);
            let grad = gather_columns(g, grad_out, image, 1);
            matmul(
                dw,
                MatRef::row_major(&grad, g.out_channels, pixels),
                unfolding.patches(g, &cols, pixels).t(),
                false,
                !parallel,
            );
        };
        match parallel {
            true => dw.par_chunks_mut(weight_len).enumerate().for_each(run),
            false => dw.chunks_mut(weight_len).enumerate().for_each(run),
        }
        return unfolding.weight_back(g, dw);
    }
    let accumulate = |mut dw: Vec<T>, chunk: usize| {
        let first = chunk * per_chunk;
        let images = per_chunk.min(g.batch - first);
        let columns = images * pixels;
        let cols = unfolding.unfold(g, x, first, images);
        let grad = gather_columns(g, grad_out, first, images);
        matmul(
            &mut dw,
            MatRef::row_major(&grad, g.out_channels, columns),
            unfolding.patches(g, &cols, columns).t(),
            true,
            !parallel,
        );
        dw
    };
    let chunks = g.batch.div_ceil(per_chunk);
    let zeros = || vec![T::zero(); weight_len];
    let dw = if !parallel {
        (0..chunks).fold(zeros(), accumulate)
    } else {
        // One contiguous run of chunks per thread, and the runs' sums added
        // in order. Rayon's own fold would group the chunks as its threads
        // happened to split the work, so the gradient's rounding, and a
        // resumed run, would change from one run to the next.
        let runs = super::threads().min(chunks);
        let partials: Vec<Vec<T>> = (0..runs)
            .into_par_iter()
            .map(|run| (run * chunks / runs..(run + 1) * chunks / runs).fold(zeros(), accumulate))
            .collect();
        partials
            .into_iter()
            .reduce(|mut total, part| {
                total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
                total
            })
            .unwrap_or_else(zeros)
    };
    unfolding.weight_back(g, dw)
}

/// The output gradient of images `first..first + images` as a
/// (Cout, image * pixel) matrix (for one image, the slice itself).
fn gather_columns<'a, T: WithDType>(
    g: &ConvGeometry,
    grad_out: &'a [T],
    first: usize,
    images: usize,
) -> Cow<'a, [T]> {
    let pixels = g.out_pixels();
    let columns = images * pixels;
    if images == 1 {
        let start = first * g.out_channels * pixels;
        return Cow::Borrowed(&grad_out[start..start + g.out_channels * pixels]);
    }
    // SAFETY: the (channel, image) blocks cover the matrix.
    let grad = unsafe {
        filled_by(g.out_channels * columns, |grad| {
            for image in 0..images {
                for channel in 0..g.out_channels {
                    let from = ((first + image) * g.out_channels + channel) * pixels;
                    let to = channel * columns + image * pixels;
                    grad[to..to + pixels].write_copy_of_slice(&grad_out[from..from + pixels]);
                }
            }
        })
    };
    Cow::Owned(grad)
}
