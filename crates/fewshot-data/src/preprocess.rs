//! Turning image files into the fixed-size CHW bytes an [`ImageStore`] holds.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{ImageBuffer, Pixel};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::store::ImageStore;

/// How images are brought to their stored size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resampling {
    /// A triangle (bilinear) filter, widened when downscaling so that each
    /// output pixel averages over its source area, like PIL's antialiased
    /// resize: thin strokes become grey instead of vanishing. Lanczos3 is a
    /// little sharper (28x28 Omniglot differs by 2.7 grey levels on
    /// average) but resized 2.3 times slower here (125 vs 54 us per image).
    #[default]
    Area,
    /// The source pixel nearest each output pixel's centre, as Pillow picks
    /// it (column `floor((x + 0.5) * in / out)`). Pillow resizes 1-bit images
    /// this way whatever filter is asked for, so the MAML and Prototypical
    /// Networks reference code trained and tested on Omniglot characters
    /// shrunk like this: binary 28x28 images with aliased strokes.
    Nearest,
}

/// How every image of a dataset is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Preprocess {
    /// Output width and height: images are resized to `size x size`,
    /// ignoring their aspect ratio (as torchvision's `Resize((s, s))` does).
    pub size: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Replace every value v by 255 - v, e.g. to make Omniglot's black
    /// strokes on white into 255-valued ink on a 0 background.
    pub invert: bool,
    pub resampling: Resampling,
}

impl Preprocess {
    /// Bytes of one decoded image.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Checks the options before any file is touched.
    pub fn validate(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            return Err(DataError::InvalidSpec {
                field: "channels",
                value: self.channels.to_string(),
                reason: "must be 1 (grey) or 3 (RGB)".into(),
            });
        }
        if self.size == 0 || u32::try_from(self.size).is_err() {
            return Err(DataError::InvalidSpec {
                field: "image_size",
                value: self.size.to_string(),
                reason: "must be at least 1 and fit in 32 bits".into(),
            });
        }
        Ok(())
    }
}

/// Decodes one PNG or JPEG file (the format is read from the bytes, not the
/// name) into `out`, which must be `pre.image_len()` bytes long.
pub fn decode_file(path: &Path, pre: &Preprocess, out: &mut [u8]) -> Result<()> {
    decode_region(path, None, pre, out)
}

/// A region of an image in pixels: left, top, width, height.
pub type CropBox = [f64; 4];

/// [`decode_file`], the image first cut to `crop` where given (a box that
/// reaches past an edge stops at it).
pub(crate) fn decode_region(
    path: &Path,
    crop: Option<CropBox>,
    pre: &Preprocess,
    out: &mut [u8],
) -> Result<()> {
    pre.validate()?;
    if out.len() != pre.image_len() {
        return Err(DataError::InvalidSpec {
            field: "out",
            value: format!("{} bytes", out.len()),
            reason: format!("must be {} bytes for {path:?}", pre.image_len()),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let image = image::load_from_memory(&bytes).map_err(|e| DataError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if image.width() == 0 || image.height() == 0 {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: "image has no pixels".into(),
        });
    }
    let image = match crop {
        Some([x, y, w, h]) => {
            let (width, height) = (f64::from(image.width()), f64::from(image.height()));
            let left = x.clamp(0.0, width - 1.0);
            let top = y.clamp(0.0, height - 1.0);
            let right = (x + w).clamp(left + 1.0, width);
            let bottom = (y + h).clamp(top + 1.0, height);
            image.crop_imm(
                left as u32,
                top as u32,
                (right - left) as u32,
                (bottom - top) as u32,
            )
        }
        None => image,
    };
    // validate() checked that the size fits in u32.
    let size = pre.size as u32;
    if pre.channels == 1 {
        out.copy_from_slice(resized(image.into_luma8(), size, pre.resampling).as_raw());
    } else {
        write_planes(&resized(image.into_rgb8(), size, pre.resampling), out);
    }
    if pre.invert {
        out.iter_mut().for_each(|v| *v = 255 - *v);
    }
    Ok(())
}

pub(crate) fn resized<P>(
    image: ImageBuffer<P, Vec<u8>>,
    size: u32,
    resampling: Resampling,
) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    if image.dimensions() == (size, size) {
        return image;
    }
    match resampling {
        Resampling::Area => image::imageops::resize(&image, size, size, FilterType::Triangle),
        Resampling::Nearest => {
            let (width, height) = image.dimensions();
            // floor((x + 0.5) * from / size), in integers.
            let source = |x: u32, from: u32| {
                let at = (2 * u64::from(x) + 1) * u64::from(from) / (2 * u64::from(size));
                (at as u32).min(from - 1)
            };
            ImageBuffer::from_fn(size, size, |x, y| {
                *image.get_pixel(source(x, width), source(y, height))
            })
        }
    }
}

/// Interleaved RGB pixels (as in a file) written to `out` as three planes
/// (as in the store).
pub(crate) fn write_planes(rgb: &image::RgbImage, out: &mut [u8]) {
    let plane = (rgb.width() * rgb.height()) as usize;
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    let planes = red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut());
    for (((r, g), b), px) in planes.zip(rgb.as_raw().chunks_exact(3)) {
        (*r, *g, *b) = (px[0], px[1], px[2]);
    }
}

/// Decodes `paths` in parallel into a new store, image `i` from `paths[i]`.
pub fn decode_files(paths: &[PathBuf], pre: &Preprocess) -> Result<ImageStore> {
    decode_regions(paths, &vec![None; paths.len()], pre)
}

/// [`decode_files`], image `i` first cut to `crops[i]` where given.
pub(crate) fn decode_regions(
    paths: &[PathBuf],
    crops: &[Option<CropBox>],
    pre: &Preprocess,
) -> Result<ImageStore> {
    pre.validate()?;
    let len = pre.image_len();
    let mut pixels = vec![0u8; paths.len() * len];
    pixels
        .par_chunks_mut(len)
        .zip(paths.par_iter().zip(crops))
        .try_for_each(|(out, (path, crop))| decode_region(path, *crop, pre, out))?;
    ImageStore::new(pre.channels, pre.size, pre.size, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(size: usize, invert: bool) -> Preprocess {
        Preprocess {
            size,
            channels: 1,
            invert,
            resampling: Resampling::Area,
        }
    }

    #[test]
    fn nearest_picks_the_pixels_pillow_picks() {
        // 105 -> 28, Omniglot's case: Pillow reads column floor((x + 0.5) * 3.75)
        // = 1, 5, 9, 13, 16, ... (checked against Pillow 13 on a real file).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let img = image::GrayImage::from_fn(105, 105, |x, y| image::Luma([(x + y) as u8]));
        img.save(&path).unwrap();
        let pre = Preprocess {
            resampling: Resampling::Nearest,
            ..grey(28, false)
        };
        let mut out = vec![0; 28 * 28];
        decode_file(&path, &pre, &mut out).unwrap();
        let picked = |x: usize| (2 * x + 1) * 105 / 56;
        assert_eq!(picked(4), 16);
        for (y, x) in [(0, 0), (0, 1), (3, 4), (27, 27), (13, 2)] {
            assert_eq!(
                usize::from(out[y * 28 + x]),
                picked(x) + picked(y),
                "({x}, {y})"
            );
        }
        // Binary images stay binary, where area averaging makes grey.
        let binary = image::GrayImage::from_fn(105, 105, |x, _| image::Luma([255 * (x % 2) as u8]));
        binary.save(&path).unwrap();
        decode_file(&path, &pre, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == 0 || v == 255));
        decode_file(&path, &grey(28, false), &mut out).unwrap();
        assert!(out.iter().any(|&v| v != 0 && v != 255));
    }

    #[test]
    fn grey_png_is_inverted_and_resized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        // White background, black left half.
        let img =
            image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x < 4 { 0 } else { 255 }]));
        img.save(&path).unwrap();

        let mut out = vec![0; 64];
        decode_file(&path, &grey(8, true), &mut out).unwrap();
        assert_eq!(out[0], 255);
        assert_eq!(out[7], 0);

        // Downscaled 4x, each output pixel averages over its source area,
        // so the edge blurs a little but the sides stay dark and light.
        let mut small = vec![0; 4];
        decode_file(&path, &grey(2, false), &mut small).unwrap();
        assert!(small[0] < 64 && small[2] < 64, "{small:?}");
        assert!(small[1] > 192 && small[3] > 192, "{small:?}");
    }

    #[test]
    fn rgb_jpeg_becomes_channel_planes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jpg");
        let img = image::RgbImage::from_pixel(16, 16, image::Rgb([200, 100, 20]));
        img.save(&path).unwrap();
        let pre = Preprocess {
            size: 4,
            channels: 3,
            invert: false,
            resampling: Resampling::Area,
        };
        let mut out = vec![0; 48];
        decode_file(&path, &pre, &mut out).unwrap();
        // JPEG is lossy: allow a little error.
        for (plane, want) in out.chunks(16).zip([200i32, 100, 20]) {
            assert!(
                plane.iter().all(|&v| (i32::from(v) - want).abs() <= 3),
                "{plane:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("broken.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let mut out = vec![0; 4];
        let err = decode_file(&bad, &grey(2, false), &mut out).unwrap_err();
        assert!(matches!(err, DataError::Image { .. }));
        assert!(err.to_string().contains("broken.png"), "{err}");

        let missing = dir.path().join("missing.png");
        let err = decode_file(&missing, &grey(2, false), &mut out).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
        assert!(err.to_string().contains("missing.png"), "{err}");

        let err = decode_file(&missing, &grey(2, false), &mut [0; 3]).unwrap_err();
        assert!(matches!(err, DataError::InvalidSpec { .. }));
        let pre = Preprocess {
            size: 2,
            channels: 2,
            invert: false,
            resampling: Resampling::Area,
        };
        assert!(pre.validate().is_err());
    }

    #[test]
    fn decode_files_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..5u8)
            .map(|i| {
                let path = dir.path().join(format!("{i}.png"));
                image::GrayImage::from_pixel(3, 3, image::Luma([i * 10]))
                    .save(&path)
                    .unwrap();
                path
            })
            .collect();
        let store = decode_files(&paths, &grey(3, false)).unwrap();
        assert_eq!(store.len(), 5);
        for i in 0..5 {
            assert_eq!(store.image(i)[4], i as u8 * 10);
        }
    }
}
