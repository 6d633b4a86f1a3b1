//! Test-time augmentation of the support set: each support image joins the
//! episode with distorted copies of itself, so a one-shot class is described
//! by several plausible drawings instead of one. A learner sees a K-shot
//! episode become a K x (1 + copies)-shot one; a Prototypical Network's
//! prototype becomes the mean embedding of the image and its copies.
//!
//! The copies come from their own random stream, so an episode keeps its
//! classes, support and query images: an evaluation with copies scores the
//! same queries as one without, and the two can be compared episode by
//! episode.

use serde::{Deserialize, Serialize};

use crate::augment::Augmentation;
use crate::error::{DataError, Result};
use crate::rng::Rng;

/// How many distorted copies each support image gets, and their distortions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupportCopies {
    /// Distorted copies added per support image (at least 1).
    pub copies: usize,
    /// Their distribution; default Koch et al.'s (see [`Augmentation`]).
    #[serde(default)]
    pub augment: Augmentation,
}

impl SupportCopies {
    /// `copies` copies under Koch et al.'s distortions.
    pub fn new(copies: usize) -> Self {
        Self {
            copies,
            augment: Augmentation::default(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.copies == 0 {
            return Err(DataError::InvalidSpec {
                field: "support_copies.copies",
                value: "0".into(),
                reason: "must be at least 1 (leave `support_copies` out for none)".into(),
            });
        }
        self.augment.validate()
    }

    /// The support set with copies: for each label in turn (labels are
    /// class-major), its images as they were, then `copies` distorted copies
    /// of each of them. `images` holds `labels.len()` CHW images of
    /// `channels` planes of `side` x `side` bytes. Returns the new images and
    /// labels, and for each new image the index of the image it came from.
    pub fn expand(
        &self,
        images: &[u8],
        labels: &[u32],
        channels: usize,
        side: usize,
        rng: &mut Rng,
    ) -> (Vec<u8>, Vec<u32>, Vec<usize>) {
        let len = channels * side * side;
        let total = labels.len() * (1 + self.copies);
        let mut out = Vec::with_capacity(total * len);
        let mut out_labels = Vec::with_capacity(total);
        let mut sources = Vec::with_capacity(total);
        let mut copy = vec![0u8; len];
        let image = |index: usize| &images[index * len..(index + 1) * len];
        let mut start = 0;
        while start < labels.len() {
            let label = labels[start];
            let end = start + labels[start..].iter().take_while(|&&l| l == label).count();
            for source in start..end {
                out.extend_from_slice(image(source));
                out_labels.push(label);
                sources.push(source);
            }
            for _ in 0..self.copies {
                for source in start..end {
                    let affine = self.augment.draw(rng);
                    affine.apply(image(source), channels, side, &mut copy);
                    out.extend_from_slice(&copy);
                    out_labels.push(label);
                    sources.push(source);
                }
            }
            start = end;
        }
        (out, out_labels, sources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three labels of two 4x4 images each, every image distinct.
    fn support() -> (Vec<u8>, Vec<u32>) {
        let images = (0..6 * 16).map(|i| (i * 3 % 251) as u8).collect();
        (images, vec![0, 0, 1, 1, 2, 2])
    }

    #[test]
    fn each_label_keeps_its_images_then_gets_their_copies() {
        let (images, labels) = support();
        let copies = SupportCopies::new(2);
        let (out, out_labels, sources) =
            copies.expand(&images, &labels, 1, 4, &mut Rng::seed_from(5, 0));
        assert_eq!(out.len(), 18 * 16);
        assert_eq!(
            out_labels,
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
        );
        assert_eq!(
            sources,
            [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 4, 5, 4, 5, 4, 5]
        );
        for (label, block) in out.chunks(6 * 16).enumerate() {
            // The originals, unchanged and first.
            let first = label * 2;
            assert_eq!(block[..32], images[first * 16..(first + 2) * 16]);
        }
    }

    #[test]
    fn copies_are_distorted_and_seeded() {
        let (images, labels) = support();
        let copies = SupportCopies {
            copies: 3,
            augment: Augmentation {
                probability: 1.0,
                ..Augmentation::default()
            },
        };
        let run = |seed| {
            copies
                .expand(&images, &labels, 1, 4, &mut Rng::seed_from(seed, 7))
                .0
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        // Every component applies, so no copy is its original.
        let (_, _, sources) = copies.expand(&images, &labels, 1, 4, &mut Rng::seed_from(1, 7));
        for (i, (image, &source)) in a.chunks(16).zip(&sources).enumerate() {
            let original = &images[source * 16..(source + 1) * 16];
            let is_original = i % 8 < 2;
            assert_eq!(image == original, is_original, "image {i}");
        }
    }

    #[test]
    fn zero_copies_or_bad_distortions_are_named() {
        let err = SupportCopies::new(0).validate().unwrap_err().to_string();
        assert!(err.contains("support_copies.copies"), "{err}");
        let bad = SupportCopies {
            copies: 1,
            augment: Augmentation {
                probability: -1.0,
                ..Augmentation::default()
            },
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("augment.probability"), "{err}");
        SupportCopies::new(4).validate().unwrap();
    }
}
