//! Random affine distortions of training images (Koch, Zemel & Salakhutdinov
//! 2015: rotation, shear, scale and translation), drawn from an episode's own
//! random stream so that an augmented run is as reproducible as a plain one.
//!
//! Only training episodes are augmented ([`crate::EpisodeSampler::with_augmentation`]);
//! validation and test episodes never are.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::Rng;

/// The distribution of distortions. `Default` is Koch et al.'s: each of the
/// four components applied with probability 0.5; rotation within ±10°, shear
/// within ±0.3 on each axis, scale 0.8 to 1.2 on each axis, translation
/// within ±2 pixels of a 105-pixel image on each axis (±2/105 of the side,
/// so the same distortion at any image size).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augmentation {
    /// Chance that each component (rotation, shear, scale, translation) is
    /// applied to an image, independently. Default 0.5.
    pub probability: f64,
    /// Default 10.
    pub max_rotation_degrees: f64,
    /// Largest shear factor on each axis. Default 0.3.
    pub max_shear: f64,
    /// Scale range on each axis. Default 0.8 to 1.2.
    pub min_scale: f64,
    pub max_scale: f64,
    /// Largest shift on each axis, as a fraction of the image side.
    /// Default 2/105 (Koch et al.'s ±2 pixels on 105x105 images).
    pub max_translation: f64,
}

impl Default for Augmentation {
    fn default() -> Self {
        Self {
            probability: 0.5,
            max_rotation_degrees: 10.0,
            max_shear: 0.3,
            min_scale: 0.8,
            max_scale: 1.2,
            max_translation: 2.0 / 105.0,
        }
    }
}

impl Augmentation {
    pub fn validate(&self) -> Result<()> {
        let checks = [
            (
                "augment.probability",
                self.probability,
                (0.0..=1.0).contains(&self.probability),
                "must be in [0, 1]",
            ),
            (
                "augment.max_rotation_degrees",
                self.max_rotation_degrees,
                (0.0..=180.0).contains(&self.max_rotation_degrees),
                "must be in [0, 180]",
            ),
            (
                "augment.max_shear",
                self.max_shear,
                (0.0..1.0).contains(&self.max_shear),
                "must be in [0, 1) (a shear of 1 on both axes flattens the image)",
            ),
            (
                "augment.min_scale",
                self.min_scale,
                self.min_scale > 0.0 && self.min_scale <= self.max_scale,
                "must be positive and at most max_scale",
            ),
            (
                "augment.max_translation",
                self.max_translation,
                (0.0..=0.5).contains(&self.max_translation),
                "must be in [0, 0.5] (a fraction of the image side)",
            ),
        ];
        for (field, value, ok, reason) in checks {
            if !ok || value.is_nan() {
                return Err(DataError::InvalidSpec {
                    field,
                    value: value.to_string(),
                    reason: reason.into(),
                });
            }
        }
        if !self.max_scale.is_finite() {
            return Err(DataError::InvalidSpec {
                field: "augment.max_scale",
                value: self.max_scale.to_string(),
                reason: "must be a finite number".into(),
            });
        }
        Ok(())
    }

    /// One image's distortion.
    pub fn draw(&self, rng: &mut Rng) -> Affine {
        // Every draw is made whether or not its component applies, so the
        // stream advances by the same amount for every image.
        let mut component = |low: f64, high: f64, count: usize| -> Option<[f64; 2]> {
            let applies = rng.uniform() < self.probability;
            let mut values = [0.0; 2];
            for value in values.iter_mut().take(count) {
                *value = low + (high - low) * rng.uniform();
            }
            applies.then_some(values)
        };
        let rotation = component(-self.max_rotation_degrees, self.max_rotation_degrees, 1);
        let shear = component(-self.max_shear, self.max_shear, 2);
        let scale = component(self.min_scale, self.max_scale, 2);
        let shift = component(-self.max_translation, self.max_translation, 2);
        Affine {
            rotation_degrees: rotation.map_or(0.0, |r| r[0]),
            shear: shear.unwrap_or([0.0; 2]),
            scale: scale.unwrap_or([1.0; 2]),
            translation: shift.unwrap_or([0.0; 2]),
        }
    }
}

/// An affine map about the image centre: scale, then shear, then rotate
/// (counter-clockwise), then translate. `Affine::default()` is the identity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub rotation_degrees: f64,
    /// (x, y) shear factors: x' = x + shear[0] y, y' = shear[1] x + y.
    pub shear: [f64; 2],
    /// (x, y) scale factors.
    pub scale: [f64; 2],
    /// (x, y) shift as a fraction of the side (positive: right, down).
    pub translation: [f64; 2],
}

impl Default for Affine {
    fn default() -> Self {
        Self {
            rotation_degrees: 0.0,
            shear: [0.0; 2],
            scale: [1.0; 2],
            translation: [0.0; 2],
        }
    }
}

impl Affine {
    /// The 2x2 matrix of the map (rows), in image coordinates (y down).
    fn matrix(&self) -> [[f64; 2]; 2] {
        // Counter-clockwise on screen is clockwise in y-down coordinates.
        let (sin, cos) = (-self.rotation_degrees.to_radians()).sin_cos();
        let rotation = [[cos, -sin], [sin, cos]];
        let shear = [[1.0, self.shear[0]], [self.shear[1], 1.0]];
        let scale = [[self.scale[0], 0.0], [0.0, self.scale[1]]];
        mul(&rotation, &mul(&shear, &scale))
    }

    /// Writes the distorted `src` (CHW, `channels` planes of `side` x `side`)
    /// to `dst`. Each output pixel takes the bilinear interpolation of the
    /// source at the inverse-mapped position; positions outside the image
    /// take the nearest edge pixel (Omniglot's edges are background).
    pub fn apply(&self, src: &[u8], channels: usize, side: usize, dst: &mut [u8]) {
        let [[a, b], [c, d]] = self.matrix();
        let det = a * d - b * c;
        let inverse = [[d / det, -b / det], [-c / det, a / det]];
        let centre = (side as f64 - 1.0) / 2.0;
        let shift = [
            self.translation[0] * side as f64,
            self.translation[1] * side as f64,
        ];
        let last = side as f64 - 1.0;
        let plane = side * side;
        for y in 0..side {
            for x in 0..side {
                let u = x as f64 - centre - shift[0];
                let v = y as f64 - centre - shift[1];
                let sx = (inverse[0][0] * u + inverse[0][1] * v + centre).clamp(0.0, last);
                let sy = (inverse[1][0] * u + inverse[1][1] * v + centre).clamp(0.0, last);
                let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(side - 1), (y0 + 1).min(side - 1));
                let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
                for ch in 0..channels {
                    let p = &src[ch * plane..(ch + 1) * plane];
                    let at = |yy: usize, xx: usize| f64::from(p[yy * side + xx]);
                    let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                    let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                    let value = top * (1.0 - fy) + bottom * fy;
                    dst[ch * plane + y * side + x] = value.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

fn mul(p: &[[f64; 2]; 2], q: &[[f64; 2]; 2]) -> [[f64; 2]; 2] {
    let mut out = [[0.0; 2]; 2];
    for (i, row) in out.iter_mut().enumerate() {
        for (j, value) in row.iter_mut().enumerate() {
            *value = p[i][0] * q[0][j] + p[i][1] * q[1][j];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::{rotate_into, Rotation};

    /// A 6x6 image whose every pixel is distinct.
    fn image() -> Vec<u8> {
        (0..36).map(|i| i * 7).collect()
    }

    fn applied(affine: &Affine, src: &[u8]) -> Vec<u8> {
        let mut out = vec![0; src.len()];
        affine.apply(src, 1, 6, &mut out);
        out
    }

    #[test]
    fn the_identity_leaves_the_image_unchanged() {
        assert_eq!(applied(&Affine::default(), &image()), image());
    }

    #[test]
    fn a_quarter_turn_is_the_exact_rotation() {
        let quarter = Affine {
            rotation_degrees: 90.0,
            ..Affine::default()
        };
        let mut want = vec![0; 36];
        rotate_into(&image(), 1, 6, Rotation::R90, &mut want).unwrap();
        assert_eq!(applied(&quarter, &image()), want);
    }

    #[test]
    fn a_shift_moves_pixels_and_repeats_the_edge() {
        // One pixel right on a 6-pixel side.
        let shift = Affine {
            translation: [1.0 / 6.0, 0.0],
            ..Affine::default()
        };
        let out = applied(&shift, &image());
        let src = image();
        for y in 0..6 {
            assert_eq!(out[y * 6], src[y * 6], "edge column repeated");
            for x in 1..6 {
                assert_eq!(out[y * 6 + x], src[y * 6 + x - 1]);
            }
        }
    }

    #[test]
    fn scaling_up_about_the_centre_keeps_the_centre() {
        // A 2x zoom of a centred 2x2 block on a 6x6 image makes it 4x4.
        let mut src = vec![0u8; 36];
        for (y, x) in [(2, 2), (2, 3), (3, 2), (3, 3)] {
            src[y * 6 + x] = 200;
        }
        let zoom = Affine {
            scale: [2.0, 2.0],
            ..Affine::default()
        };
        let out = applied(&zoom, &src);
        // Output column x reads source column 2.5 + (x - 2.5) / 2: 1.25,
        // 1.75, 2.25, 2.75, 3.25, 3.75, interpolated between 0 and 200.
        assert_eq!(out[2 * 6..3 * 6], [50, 150, 200, 200, 150, 50]);
        assert_eq!(out[0], 13); // 200 * 0.25 * 0.25, rounded
    }

    #[test]
    fn draws_are_seeded_and_respect_the_ranges() {
        let aug = Augmentation::default();
        let draws = |seed| -> Vec<Affine> {
            let mut rng = Rng::seed_from(seed, 0);
            (0..200).map(|_| aug.draw(&mut rng)).collect()
        };
        let a = draws(1);
        assert_eq!(a, draws(1));
        assert_ne!(a, draws(2));
        let identity = a.iter().filter(|t| **t == Affine::default()).count();
        // Each of four components is off with chance 1/2: about 1/16 are the identity.
        assert!((2..40).contains(&identity), "{identity} identities");
        for t in &a {
            assert!(t.rotation_degrees.abs() <= 10.0);
            assert!(t.shear.iter().all(|s| s.abs() <= 0.3));
            assert!(t.scale.iter().all(|s| (0.8..=1.2).contains(s)));
            assert!(t.translation.iter().all(|s| s.abs() <= 2.0 / 105.0));
        }
        let never = Augmentation {
            probability: 0.0,
            ..aug
        };
        let mut rng = Rng::seed_from(0, 0);
        assert!((0..50).all(|_| never.draw(&mut rng) == Affine::default()));
    }

    #[test]
    fn bad_ranges_are_named() {
        for (aug, field) in [
            (
                Augmentation {
                    probability: 1.5,
                    ..Default::default()
                },
                "augment.probability",
            ),
            (
                Augmentation {
                    max_shear: 1.0,
                    ..Default::default()
                },
                "augment.max_shear",
            ),
            (
                Augmentation {
                    min_scale: 1.5,
                    ..Default::default()
                },
                "augment.min_scale",
            ),
            (
                Augmentation {
                    max_translation: f64::NAN,
                    ..Default::default()
                },
                "augment.max_translation",
            ),
        ] {
            let err = aug.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        Augmentation::default().validate().unwrap();
    }
}
