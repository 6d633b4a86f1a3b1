//! All images of a dataset in one contiguous buffer.
//!
//! One allocation instead of thousands keeps loading, caching (the buffer is
//! written to disk as is) and episode gathering simple and fast.

use crate::error::{DataError, Result};
use crate::normalization::Normalization;

/// `len()` images of `channels x height x width` bytes each, channel-major
/// (CHW), stored back to back: image `i` starts at `i * image_len()`.
///
/// Pixel convention: Omniglot-like data has 0 = background and 255 = ink
/// (inverted from the files); colour data is plain RGB.
///
/// Classes and episodes name images by `u32` index; `new` refuses more
/// images than that can address, so loaders may count images in `u32`.
#[derive(Clone, PartialEq)]
pub struct ImageStore {
    channels: usize,
    height: usize,
    width: usize,
    pixels: Vec<u8>,
    /// How the bytes become network inputs; `None`: `v / 255`.
    normalization: Option<Normalization>,
}

impl ImageStore {
    /// Wraps `pixels`, which must hold a whole number of images of the given shape.
    pub fn new(channels: usize, height: usize, width: usize, pixels: Vec<u8>) -> Result<Self> {
        for (field, value) in [("channels", channels), ("height", height), ("width", width)] {
            if value == 0 {
                return Err(DataError::InvalidSpec {
                    field,
                    value: value.to_string(),
                    reason: "an image dimension must be at least 1".into(),
                });
            }
        }
        let image_len = channels * height * width;
        if pixels.len() % image_len != 0 {
            return Err(DataError::InvalidSpec {
                field: "pixels",
                value: format!("{} bytes", pixels.len()),
                reason: format!(
                    "not a whole number of {channels}x{height}x{width} images ({image_len} bytes each)"
                ),
            });
        }
        // Classes and episodes refer to images by u32 index.
        if pixels.len() / image_len > u32::MAX as usize {
            return Err(DataError::InvalidSpec {
                field: "pixels",
                value: format!("{} images", pixels.len() / image_len),
                reason: "a store holds at most 2^32 - 1 images".into(),
            });
        }
        Ok(ImageStore {
            channels,
            height,
            width,
            pixels,
            normalization: None,
        })
    }

    /// The same images, to be read through `normalization` (checked
    /// against the channel count) by every episode drawn from them.
    pub fn with_normalization(mut self, normalization: Option<Normalization>) -> Result<Self> {
        if let Some(n) = &normalization {
            n.validate(self.channels)?;
        }
        self.normalization = normalization;
        Ok(self)
    }

    /// See [`ImageStore::with_normalization`].
    pub fn normalization(&self) -> Option<&Normalization> {
        self.normalization.as_ref()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.image_len()
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// Bytes per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// `(channels, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// The CHW pixels of image `i`. Panics if `i >= len()`, like slice indexing;
    /// the episode sampler checks every index once up front.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// All pixels, image after image.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }
}

/// Shape and count only: the pixels would flood any log.
impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("shape", &self.shape())
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_laid_out_back_to_back() {
        let store = ImageStore::new(1, 2, 2, (0..12).collect()).unwrap();
        assert_eq!(store.len(), 3);
        assert_eq!(store.shape(), (1, 2, 2));
        assert_eq!(store.image(1), &[4, 5, 6, 7]);
        assert!(!store.is_empty());
        assert_eq!(
            format!("{store:?}"),
            "ImageStore { shape: (1, 2, 2), len: 3 }"
        );
    }

    #[test]
    fn a_normalisation_is_checked_against_the_channels() {
        let grey = ImageStore::new(1, 1, 1, vec![7]).unwrap();
        assert_eq!(grey.normalization(), None);
        let err = grey
            .clone()
            .with_normalization(Some(Normalization::imagenet()))
            .unwrap_err();
        assert!(err.to_string().contains("1 channel"), "{err}");
        let rgb = ImageStore::new(3, 1, 1, vec![1, 2, 3]).unwrap();
        let rgb = rgb
            .with_normalization(Some(Normalization::imagenet()))
            .unwrap();
        assert_eq!(rgb.normalization(), Some(&Normalization::imagenet()));
    }

    #[test]
    fn wrong_length_or_zero_dimension_is_an_error() {
        let err = ImageStore::new(1, 2, 2, vec![0; 5]).unwrap_err();
        assert!(err.to_string().contains("5 bytes"), "{err}");
        assert!(ImageStore::new(0, 2, 2, vec![]).is_err());
        assert!(ImageStore::new(3, 4, 4, vec![]).unwrap().is_empty());
    }
}
