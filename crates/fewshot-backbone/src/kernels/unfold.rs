//! A convolution's input patches unfolded into a matrix (im2col), and a
//! matrix of patch gradients folded back onto the input (col2im), in one of
//! two layouts chosen by the convolution's sizes.
//!
//! Both present the unfolded input as a (patch, column) matrix: one column
//! per output pixel of a chunk of images, in (image, oy, ox) order.
//!
//! - [`Unfolding::Planar`] stores it row-major with patch rows in
//!   (channel, ky, kx) order, read one input plane at a time: at stride 1 a
//!   tap's row is whole output rows copied, otherwise a gather. For inputs
//!   with few channels, such as images, small batches and large images.
//! - [`Unfolding::ChannelsLast`] stores its transpose, one patch per output
//!   pixel in (ky, kx, channel) order, read from a channels-last copy of each
//!   padded image, where a patch is `kernel_h` runs of `kernel_w * channels`
//!   contiguous values. On conv-4's 64-channel layers those are 192-value
//!   copies instead of single-value gathers (the stride-2 gather was 13% of
//!   a second-order MAML task, `perf record` of `fewshot bench --suite
//!   kernels --case maml2-1step-28`). The weight's rows are permuted into the
//!   same (ky, kx, channel) order for the product, which changes the order in
//!   which a forward output sums its patch, and so its rounding; the fold
//!   adds each input pixel's taps in the planar order.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::WithDType;

use super::conv::ConvGeometry;
use super::filled_by;
use super::gemm::{matmul_uninit, new_product, MatRef};
use super::transpose::transpose;

/// When patches are unfolded channels-last (`examples/conv_layers.rs`, each
/// kernel's best of three medians against the planar layout; `fewshot bench
/// --suite kernels` for whole steps). It pays where the planar unfolding is
/// slow, single-value gathers at stride 2 and short rows at stride 1: 10-25%
/// on conv-4's 64-channel layers on 7x7, 13x13 and 14x14 inputs. Not with few
/// input channels: the runs (`kernel_w * channels` values) are short (3 on a
/// grey image). Not on few columns a weight, where permuting the weight is a
/// large part of the work: a 5-image MAML support set on 7x7 (80 columns)
/// took 1.6 times as long, on 14x14 (245 columns) as long. Not when an
/// image's channels-last copy outgrows half of the 1 MiB L2 cache of the
/// machine this was measured on: with the 64-channel 52x52 layer (746 KiB) the 105x105 training
/// step was 4% slower, with the 32-channel 42x42 one (248 KiB) the 84x84
/// step 5% faster.
const CHANNELS_LAST_MIN_CHANNELS: usize = 8;
const CHANNELS_LAST_MIN_COLUMNS_PER_WEIGHT: usize = 256;
const CHANNELS_LAST_MAX_IMAGE_BYTES: usize = 512 * 1024;

/// How one convolution unfolds its input; see the module's documentation.
pub(super) enum Unfolding {
    Planar(TapTable),
    ChannelsLast,
}

impl Unfolding {
    pub fn new<T>(g: &ConvGeometry) -> Self {
        let columns_per_weight = match g.per_sample {
            true => g.out_pixels(),
            false => g.batch * g.out_pixels(),
        };
        let image_bytes = ChannelsLastImage::<T>::len(g) * std::mem::size_of::<T>();
        let channels_last = g.in_channels >= CHANNELS_LAST_MIN_CHANNELS
            && columns_per_weight >= CHANNELS_LAST_MIN_COLUMNS_PER_WEIGHT
            && image_bytes <= CHANNELS_LAST_MAX_IMAGE_BYTES;
        match channels_last {
            true => Self::ChannelsLast,
            false => Self::Planar(TapTable::new(g)),
        }
    }

    /// Images `first..first + images` of `x` unfolded.
    pub fn unfold<T: WithDType>(
        &self,
        g: &ConvGeometry,
        x: &[T],
        first: usize,
        images: usize,
    ) -> Vec<T> {
        let len = g.patch_len() * images * g.out_pixels();
        // SAFETY: both unfoldings write every element of the matrix.
        unsafe {
            filled_by(len, |cols| match self {
                Self::Planar(taps) => unfold_planar(g, taps, x, first, images, cols),
                Self::ChannelsLast => unfold_channels_last(g, x, first, images, cols),
            })
        }
    }

    /// The (patch, column) matrix that `data`, unfolded by [`Self::unfold`]
    /// or made by [`Self::patch_gradients`], stores.
    pub fn patches<'a, T>(&self, g: &ConvGeometry, data: &'a [T], columns: usize) -> MatRef<'a, T> {
        match self {
            Self::Planar(_) => MatRef::row_major(data, g.patch_len(), columns),
            Self::ChannelsLast => MatRef::row_major(data, columns, g.patch_len()).t(),
        }
    }

    /// Writes `weight * patches` into `out`, (image, Cout, pixel), from
    /// `weight` in this unfolding's patch order, (Cout, patch), and the
    /// unfolded images `cols`.
    ///
    /// The gemm crate runs a product with its columns along the SIMD lanes
    /// and reads without repacking a left operand stored column by column
    /// and a right operand stored row by row (each seen through the product
    /// it actually computes, the transpose of a row-major destination's). So
    /// the planar matrix takes the output's (Cout, column) layout, and the
    /// channels-last one is multiplied as (column, Cout) and transposed
    /// after: its patches multiplied as the left operand would be repacked
    /// (forward 5% slower on the 64-channel layers, `examples/conv_layers.rs`).
    pub fn output<T: WithDType>(
        &self,
        g: &ConvGeometry,
        weight: MatRef<'_, T>,
        cols: &[T],
        out: &mut [MaybeUninit<T>],
        parallel: bool,
    ) {
        let pixels = g.out_pixels();
        let images = out.len() / (g.out_channels * pixels);
        let columns = images * pixels;
        let patches = self.patches(g, cols, columns);
        match self {
            // One image's (Cout, pixel) product is its output plane.
            Self::Planar(_) if images == 1 => matmul_uninit(out, weight, patches, parallel),
            Self::Planar(_) => {
                let product = new_product(weight, patches, parallel);
                // (Cout, image, pixel) -> (image, Cout, pixel).
                for image in 0..images {
                    for channel in 0..g.out_channels {
                        let from = channel * columns + image * pixels;
                        let to = (image * g.out_channels + channel) * pixels;
                        out[to..to + pixels].write_copy_of_slice(&product[from..from + pixels]);
                    }
                }
            }
            Self::ChannelsLast => {
                let product = new_product(patches.t(), weight.t(), parallel);
                // (image, pixel, Cout) -> (image, Cout, pixel).
                let image_len = g.out_channels * pixels;
                for (product, out) in product
                    .chunks_exact(image_len)
                    .zip(out.chunks_exact_mut(image_len))
                {
                    transpose(
                        (pixels, g.out_channels),
                        (product, |pixel| pixel * g.out_channels),
                        (out, |channel| channel * pixels),
                    );
                }
            }
        }
    }

    /// `weight` (rows of (channel, ky, kx) patches; one weight, or one per
    /// image) with each row in this unfolding's patch order.
    pub fn weight<'a, T: WithDType>(&self, g: &ConvGeometry, weight: &'a [T]) -> Cow<'a, [T]> {
        match self {
            Self::Planar(_) => Cow::Borrowed(weight),
            Self::ChannelsLast => Cow::Owned(permute_rows(weight, g.in_channels, g.taps())),
        }
    }

    /// The inverse of [`Self::weight`], for a weight gradient.
    pub fn weight_back<T: WithDType>(&self, g: &ConvGeometry, weight: Vec<T>) -> Vec<T> {
        match self {
            Self::Planar(_) => weight,
            Self::ChannelsLast => permute_rows(&weight, g.taps(), g.in_channels),
        }
    }

    /// The patch gradients `weight^T * grad` in this unfolding's layout, from
    /// `weight` in its patch order, (Cout, patch), and `grad`, (Cout, column).
    pub fn patch_gradients<T: WithDType>(
        &self,
        weight: MatRef<'_, T>,
        grad: MatRef<'_, T>,
        parallel: bool,
    ) -> Vec<T> {
        match self {
            Self::Planar(_) => new_product(weight.t(), grad, parallel),
            Self::ChannelsLast => new_product(grad.t(), weight, parallel),
        }
    }

    /// Writes onto each of the `images` images of `dx` the sum of its patch
    /// gradients in `cols` (from [`Self::patch_gradients`]).
    pub fn fold<T: WithDType>(
        &self,
        g: &ConvGeometry,
        cols: &[T],
        images: usize,
        dx: &mut [MaybeUninit<T>],
    ) {
        match self {
            Self::Planar(taps) => fold_planar(g, taps, cols, images, dx),
            Self::ChannelsLast => fold_channels_last(g, cols, images, dx),
        }
    }
}

/// Each row of `a * b` values of `data`, read as an (a, b) matrix, written as
/// its (b, a) transpose: with (a, b) = (channels, taps), a weight's patches
/// from (channel, ky, kx) order to (ky, kx, channel).
fn permute_rows<T: WithDType>(data: &[T], a: usize, b: usize) -> Vec<T> {
    let fill = |out: &mut [MaybeUninit<T>]| {
        for (row, out) in data.chunks_exact(a * b).zip(out.chunks_exact_mut(a * b)) {
            transpose((a, b), (row, |i| i * b), (out, |j| j * a));
        }
    };
    // SAFETY: `data` is whole rows of `a * b` values (a weight's patches),
    // and each row's transpose writes all of its output row.
    unsafe { filled_by(data.len(), fill) }
}

/// Where each kernel tap reads, for every output pixel, in an input plane
/// surrounded by `padding` zeros: the planar unfolding becomes a gather (or,
/// at stride 1, a copy of whole output rows) with no bounds tests in the
/// inner loop, which matters for the small planes of few-shot nets.
pub(super) struct TapTable {
    /// `offsets[tap * pixels + pixel]`, taps in (ky, kx) order.
    offsets: Vec<usize>,
}

impl TapTable {
    fn new(g: &ConvGeometry) -> Self {
        let padded_w = g.padded_w();
        let mut offsets = Vec::with_capacity(g.taps() * g.out_pixels());
        for ky in 0..g.kernel_h {
            for kx in 0..g.kernel_w {
                for oy in 0..g.out_h() {
                    for ox in 0..g.out_w() {
                        offsets.push((oy * g.stride + ky) * padded_w + ox * g.stride + kx);
                    }
                }
            }
        }
        Self { offsets }
    }

    /// Where row `y` of the input starts in its padded plane.
    fn row_start(g: &ConvGeometry, y: usize) -> usize {
        (y + g.padding) * g.padded_w() + g.padding
    }

    /// Copies `plane` into the interior of `padded` (whose border stays zero).
    fn pad<T: WithDType>(g: &ConvGeometry, plane: &[T], padded: &mut [T]) {
        for (y, row) in plane.chunks_exact(g.in_w).enumerate() {
            let start = Self::row_start(g, y);
            padded[start..start + g.in_w].copy_from_slice(row);
        }
    }

    /// Writes the interior of `padded` into `plane`.
    fn unpad<T: WithDType>(g: &ConvGeometry, padded: &[T], plane: &mut [MaybeUninit<T>]) {
        for (y, row) in plane.chunks_exact_mut(g.in_w).enumerate() {
            let start = Self::row_start(g, y);
            row.write_copy_of_slice(&padded[start..start + g.in_w]);
        }
    }
}

/// The planar unfolding into `cols`: row (channel, ky, kx), column (image,
/// oy, ox).
fn unfold_planar<T: WithDType>(
    g: &ConvGeometry,
    taps: &TapTable,
    x: &[T],
    first: usize,
    images: usize,
    cols: &mut [MaybeUninit<T>],
) {
    let (pixels, out_w) = (g.out_pixels(), g.out_w());
    let columns = images * pixels;
    let tap_count = g.taps();
    let mut padded = vec![T::zero(); g.padded_pixels()];
    for image in 0..images {
        for channel in 0..g.in_channels {
            let plane = ((first + image) * g.in_channels + channel) * g.in_pixels();
            TapTable::pad(g, &x[plane..plane + g.in_pixels()], &mut padded);
            for tap in 0..tap_count {
                let row = channel * tap_count + tap;
                let dst = &mut cols[row * columns + image * pixels..][..pixels];
                let offsets = &taps.offsets[tap * pixels..(tap + 1) * pixels];
                if g.stride == 1 {
                    for (dst, offsets) in
                        dst.chunks_exact_mut(out_w).zip(offsets.chunks_exact(out_w))
                    {
                        dst.write_copy_of_slice(&padded[offsets[0]..offsets[0] + out_w]);
                    }
                } else {
                    dst.iter_mut().zip(offsets).for_each(|(d, &o)| {
                        d.write(padded[o]);
                    });
                }
            }
        }
    }
}

/// The inverse scatter of [`unfold_planar`]: each input pixel gets the sum
/// of the column entries read from it, its taps added in (ky, kx) order.
fn fold_planar<T: WithDType>(
    g: &ConvGeometry,
    taps: &TapTable,
    cols: &[T],
    images: usize,
    dx: &mut [MaybeUninit<T>],
) {
    let pixels = g.out_pixels();
    let columns = images * pixels;
    let tap_count = g.taps();
    let mut padded = vec![T::zero(); g.padded_pixels()];
    for image in 0..images {
        for channel in 0..g.in_channels {
            padded.fill(T::zero());
            for tap in 0..tap_count {
                let row = channel * tap_count + tap;
                let src = &cols[row * columns + image * pixels..][..pixels];
                let offsets = &taps.offsets[tap * pixels..(tap + 1) * pixels];
                if g.stride == 1 {
                    let out_w = g.out_w();
                    for (src, offsets) in src.chunks_exact(out_w).zip(offsets.chunks_exact(out_w)) {
                        let dst = &mut padded[offsets[0]..offsets[0] + out_w];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                    }
                } else {
                    src.iter().zip(offsets).for_each(|(&v, &o)| padded[o] += v);
                }
            }
            let plane = (image * g.in_channels + channel) * g.in_pixels();
            TapTable::unpad(g, &padded, &mut dx[plane..plane + g.in_pixels()]);
        }
    }
}

/// An image's padded channels-last copy: (y, x, channel), `padding` zeros
/// around the input.
struct ChannelsLastImage<T> {
    values: Vec<T>,
}

impl<T> ChannelsLastImage<T> {
    fn len(g: &ConvGeometry) -> usize {
        g.padded_pixels() * g.in_channels
    }
}

impl<T: WithDType> ChannelsLastImage<T> {
    fn new(g: &ConvGeometry) -> Self {
        Self {
            values: vec![T::zero(); Self::len(g)],
        }
    }

    /// Where the run of `kernel_w * channels` values that tap row `ky` of
    /// output pixel (oy, ox) reads starts.
    fn run_start(g: &ConvGeometry, oy: usize, ox: usize, ky: usize) -> usize {
        ((oy * g.stride + ky) * g.padded_w() + ox * g.stride) * g.in_channels
    }

    /// Where the channels of input pixel `pixel` ((y, x) order) start: the
    /// planar padded offset of that pixel, times the channels.
    fn pixel_start(g: &ConvGeometry, pixel: usize) -> usize {
        (TapTable::row_start(g, pixel / g.in_w) + pixel % g.in_w) * g.in_channels
    }

    /// Copies `image` (channel, y, x) into the interior, transposed.
    fn fill(&mut self, g: &ConvGeometry, image: &[T]) {
        // SAFETY: `transpose` writes initialised values only, so `values`
        // stays initialised.
        let values = unsafe {
            std::slice::from_raw_parts_mut(
                self.values.as_mut_ptr().cast::<MaybeUninit<T>>(),
                self.values.len(),
            )
        };
        transpose(
            (g.in_channels, g.in_pixels()),
            (image, |channel| channel * g.in_pixels()),
            (values, |pixel| Self::pixel_start(g, pixel)),
        );
    }

    /// Writes the interior into `image` (channel, y, x), transposed.
    fn write_into(&self, g: &ConvGeometry, image: &mut [MaybeUninit<T>]) {
        transpose(
            (g.in_pixels(), g.in_channels),
            (&self.values, |pixel| Self::pixel_start(g, pixel)),
            (image, |channel| channel * g.in_pixels()),
        );
    }
}

/// The channels-last unfolding into `cols`: one row per output pixel (image,
/// oy, ox), holding its patch in (ky, kx, channel) order.
fn unfold_channels_last<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    first: usize,
    images: usize,
    cols: &mut [MaybeUninit<T>],
) {
    let image_len = g.in_channels * g.in_pixels();
    let run = g.kernel_w * g.in_channels;
    let mut padded = ChannelsLastImage::new(g);
    let image_cols = cols.chunks_exact_mut(g.out_pixels() * g.patch_len());
    for (image, cols) in image_cols.take(images).enumerate() {
        padded.fill(g, &x[(first + image) * image_len..][..image_len]);
        for (pixel, patch) in cols.chunks_exact_mut(g.patch_len()).enumerate() {
            let (oy, ox) = (pixel / g.out_w(), pixel % g.out_w());
            for (ky, dst) in patch.chunks_exact_mut(run).enumerate() {
                let start = ChannelsLastImage::<T>::run_start(g, oy, ox, ky);
                dst.write_copy_of_slice(&padded.values[start..start + run]);
            }
        }
    }
}

/// The inverse scatter of [`unfold_channels_last`]. The output pixels are
/// visited last to first: an input pixel then receives its taps in (ky, kx)
/// order (a later tap row or column reads it from an earlier output row or
/// column), so it sums them in the order [`fold_planar`] does.
fn fold_channels_last<T: WithDType>(
    g: &ConvGeometry,
    cols: &[T],
    images: usize,
    dx: &mut [MaybeUninit<T>],
) {
    let image_len = g.in_channels * g.in_pixels();
    let pixels = g.out_pixels();
    let run = g.kernel_w * g.in_channels;
    let mut padded = ChannelsLastImage::new(g);
    for image in 0..images {
        padded.values.fill(T::zero());
        for pixel in (0..pixels).rev() {
            let (oy, ox) = (pixel / g.out_w(), pixel % g.out_w());
            let patch = &cols[(image * pixels + pixel) * g.patch_len()..][..g.patch_len()];
            for (ky, src) in patch.chunks_exact(run).enumerate() {
                let start = ChannelsLastImage::<T>::run_start(g, oy, ox, ky);
                let dst = &mut padded.values[start..start + run];
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
            }
        }
        padded.write_into(g, &mut dx[image * image_len..][..image_len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Odd sizes, a padding, and strides with and without overlapping windows.
    fn geometries() -> Vec<ConvGeometry> {
        [(1, 1, 5, 7), (2, 1, 7, 7), (2, 0, 6, 9), (3, 2, 8, 7)]
            .into_iter()
            .map(|(stride, padding, h, w)| {
                ConvGeometry::new((2, 3, h, w), (4, 3, 3), stride, padding, false).unwrap()
            })
            .collect()
    }

    /// Distinct values of very different sizes, so that adding them in another
    /// order would round differently.
    fn values(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.731).sin() * 10f32.powi((i % 7) as i32 - 3))
            .collect()
    }

    fn planar(g: &ConvGeometry) -> Unfolding {
        Unfolding::Planar(TapTable::new(g))
    }

    #[test]
    fn both_unfoldings_make_the_same_patch_matrix() {
        for g in geometries() {
            let x = values(g.batch * g.in_channels * g.in_pixels());
            let columns = g.batch * g.out_pixels();
            let a = planar(&g).unfold(&g, &x, 0, g.batch);
            let b = Unfolding::ChannelsLast.unfold(&g, &x, 0, g.batch);
            // Row (channel, tap) of the planar matrix is column (tap,
            // channel) of the channels-last one, stored as its transpose.
            for channel in 0..g.in_channels {
                for tap in 0..g.taps() {
                    for column in 0..columns {
                        assert_eq!(
                            a[(channel * g.taps() + tap) * columns + column],
                            b[column * g.patch_len() + tap * g.in_channels + channel],
                            "{g:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn both_foldings_sum_each_pixel_in_the_same_order() {
        for g in geometries() {
            let (patch, columns) = (g.patch_len(), g.batch * g.out_pixels());
            let planar_cols = values(patch * columns);
            // The same patch gradients in the channels-last layout.
            let mut channels_last_cols = vec![0f32; patch * columns];
            for channel in 0..g.in_channels {
                for tap in 0..g.taps() {
                    for column in 0..columns {
                        channels_last_cols[column * patch + tap * g.in_channels + channel] =
                            planar_cols[(channel * g.taps() + tap) * columns + column];
                    }
                }
            }
            let len = g.batch * g.in_channels * g.in_pixels();
            let fold = |unfolding: Unfolding, cols: &[f32]| {
                let mut dx = vec![MaybeUninit::new(f32::NAN); len];
                unfolding.fold(&g, cols, g.batch, &mut dx);
                dx.into_iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<_>>()
            };
            let a = fold(planar(&g), &planar_cols);
            let b = fold(Unfolding::ChannelsLast, &channels_last_cols);
            assert!(
                a.iter().all(|v| v.is_finite()),
                "{g:?}: a pixel left unwritten"
            );
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{g:?}"
            );
        }
    }
}
