//! Procedurally drawn glyphs: an Omniglot-like dataset that needs no files,
//! so every command and test can run anywhere.
//!
//! Each class is a few quadratic Bézier strokes; each image of the class is
//! a new "drawing" of it: control points jittered, a small random affine
//! transform, a different pen width, rendered anti-aliased as white ink
//! (255) on black (0), like inverted Omniglot. The jitter is tuned so that a
//! pixel-space nearest neighbour classifies 5-way 1-shot episodes well above
//! chance but far from perfectly: there is something to learn.

use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::Rng;
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};
use crate::store::ImageStore;

/// Size and seed of the generated dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyntheticOptions {
    pub classes_train: usize,
    pub classes_val: usize,
    pub classes_test: usize,
    pub images_per_class: usize,
    pub image_size: usize,
    pub seed: u64,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        SyntheticOptions {
            classes_train: 400,
            classes_val: 100,
            classes_test: 200,
            images_per_class: 20,
            image_size: 28,
            seed: 0,
        }
    }
}

// How much drawings of one class differ, in units of the image width
// (angles in radians). Tuned with the nearest-neighbour test below.
const POINT_JITTER: f64 = 0.035;
const SCALE_JITTER: f64 = 0.08;
const ANGLE_JITTER: f64 = 0.15;
const SHIFT_JITTER: f64 = 0.05;
/// Pen half-width in pixels at 28x28, and its spread between drawings.
const HALF_WIDTH: f64 = 1.0;
const HALF_WIDTH_JITTER: f64 = 0.3;
/// Line segments per stroke when rendering.
const SEGMENTS: usize = 12;

/// Generates the dataset; the same options give the same pixels on any
/// machine and any number of threads.
pub fn generate(options: &SyntheticOptions) -> Result<FewShotDataset> {
    validate(options)?;
    let counts = [
        options.classes_train,
        options.classes_val,
        options.classes_test,
    ];
    // (split, class within split) of every class, in store order.
    let classes: Vec<(SplitName, usize)> = SplitName::ALL
        .into_iter()
        .zip(counts)
        .flat_map(|(split, n)| (0..n).map(move |class| (split, class)))
        .collect();

    let size = options.image_size;
    let per_class = options.images_per_class;
    let mut pixels = vec![0u8; classes.len() * per_class * size * size];
    // Each image draws from its own random stream, so the work can be split
    // among threads in any way.
    pixels
        .par_chunks_mut(size * size)
        .enumerate()
        .for_each(|(i, out)| {
            let (split, class) = classes[i / per_class];
            draw_image(options.seed, split, class, i % per_class, size, out);
        });
    let store = ImageStore::new(1, size, size, pixels)?;

    let mut first_image = 0u32;
    let mut split = |name: SplitName, n: usize| {
        let classes = (0..n)
            .map(|class| {
                let start = first_image;
                first_image += per_class as u32;
                FewShotClass {
                    name: format!("glyph-{name}-{class:04}"),
                    group: String::new(),
                    images: (start..first_image).collect(),
                    rotation: Rotation::R0,
                }
            })
            .collect();
        ClassSplit {
            name: name.to_string(),
            classes,
            random_rotation: false,
        }
    };
    Ok(FewShotDataset {
        name: "synthetic".into(),
        train: split(SplitName::Train, counts[0]),
        val: split(SplitName::Val, counts[1]),
        test: split(SplitName::Test, counts[2]),
        store: Arc::new(store),
    })
}

fn validate(options: &SyntheticOptions) -> Result<()> {
    let invalid = |field, value: usize, reason: &str| DataError::InvalidSpec {
        field,
        value: value.to_string(),
        reason: reason.into(),
    };
    if !(8..=1024).contains(&options.image_size) {
        return Err(invalid(
            "image_size",
            options.image_size,
            "must be 8 to 1024",
        ));
    }
    // Streams pack the image number into 24 bits and the class into 32.
    if !(1..1 << 24).contains(&options.images_per_class) {
        return Err(invalid(
            "images_per_class",
            options.images_per_class,
            "must be 1 to 2^24 - 1",
        ));
    }
    let classes = options.classes_train + options.classes_val + options.classes_test;
    if classes == 0 {
        return Err(invalid(
            "classes_train + classes_val + classes_test",
            0,
            "must be at least 1",
        ));
    }
    // Image indices are u32.
    if classes
        .checked_mul(options.images_per_class)
        .is_none_or(|n| n > u32::MAX as usize)
    {
        return Err(invalid(
            "classes x images_per_class",
            classes,
            "must fit in 32 bits",
        ));
    }
    Ok(())
}

/// The random stream of one class (`image` = None) or one of its images.
/// Classes are numbered within their split, so adding training classes
/// does not change the test classes.
fn stream(split: SplitName, class: usize, image: Option<usize>) -> u64 {
    let slot = image.map_or(0, |i| i as u64 + 1);
    ((split as u64) << 56) ^ ((class as u64) << 24) ^ slot
}

#[derive(Clone, Copy, Debug)]
struct Point {
    x: f64,
    y: f64,
}

/// A quadratic Bézier curve: from `p[0]` towards `p[1]`, ending at `p[2]`.
type Stroke = [Point; 3];

/// The strokes that define a class, in unit coordinates (y down).
fn class_strokes(rng: &mut Rng) -> Vec<Stroke> {
    let count = 2 + rng.below(3);
    let mut strokes: Vec<Stroke> = Vec::with_capacity(count);
    for _ in 0..count {
        // Handwriting mostly continues from where the pen already was.
        let start = match strokes.last() {
            Some(previous) if rng.uniform() < 0.6 => previous[rng.below(2) * 2],
            _ => Point {
                x: 0.2 + 0.6 * rng.uniform(),
                y: 0.2 + 0.6 * rng.uniform(),
            },
        };
        let angle = std::f64::consts::TAU * rng.uniform();
        let length = 0.3 + 0.35 * rng.uniform();
        let end = Point {
            x: (start.x + length * angle.cos()).clamp(0.12, 0.88),
            y: (start.y + length * angle.sin()).clamp(0.12, 0.88),
        };
        // Bend sideways from the chord by a random amount.
        let bend = 0.35 * rng.normal();
        let control = Point {
            x: ((start.x + end.x) / 2.0 - bend * (end.y - start.y)).clamp(0.05, 0.95),
            y: ((start.y + end.y) / 2.0 + bend * (end.x - start.x)).clamp(0.05, 0.95),
        };
        strokes.push([start, control, end]);
    }
    strokes
}

/// Draws image `image` of class `class` into `out` (`size * size` bytes).
fn draw_image(
    seed: u64,
    split: SplitName,
    class: usize,
    image: usize,
    size: usize,
    out: &mut [u8],
) {
    let strokes = class_strokes(&mut Rng::seed_from(seed, stream(split, class, None)));
    let mut rng = Rng::seed_from(seed, stream(split, class, Some(image)));

    let scale = 1.0 + SCALE_JITTER * rng.normal();
    let (sin, cos) = (ANGLE_JITTER * rng.normal()).sin_cos();
    let shift = (SHIFT_JITTER * rng.normal(), SHIFT_JITTER * rng.normal());
    let pixels = size as f64;
    // Jitter a point, then rotate and scale about the centre, shift, and
    // convert to pixel coordinates.
    let mut place = |p: Point| {
        let x = p.x + POINT_JITTER * rng.normal() - 0.5;
        let y = p.y + POINT_JITTER * rng.normal() - 0.5;
        Point {
            x: (scale * (cos * x - sin * y) + 0.5 + shift.0) * pixels,
            y: (scale * (sin * x + cos * y) + 0.5 + shift.1) * pixels,
        }
    };
    let placed: Vec<Stroke> = strokes
        .iter()
        .map(|s| [place(s[0]), place(s[1]), place(s[2])])
        .collect();
    let half_width = (HALF_WIDTH + HALF_WIDTH_JITTER * (2.0 * rng.uniform() - 1.0)) * pixels / 28.0;

    out.fill(0);
    for stroke in &placed {
        let mut previous = stroke[0];
        for step in 1..=SEGMENTS {
            let t = step as f64 / SEGMENTS as f64;
            let next = bezier(stroke, t);
            draw_segment(previous, next, half_width, size, out);
            previous = next;
        }
    }
}

fn bezier(s: &Stroke, t: f64) -> Point {
    let u = 1.0 - t;
    Point {
        x: u * u * s[0].x + 2.0 * u * t * s[1].x + t * t * s[2].x,
        y: u * u * s[0].y + 2.0 * u * t * s[1].y + t * t * s[2].y,
    }
}

/// Paints a thick line segment: a pixel's ink is the share of it within
/// `half_width` of the segment (approximated from the distance to its centre).
fn draw_segment(a: Point, b: Point, half_width: f64, size: usize, out: &mut [u8]) {
    let reach = half_width + 1.0;
    let range = |lo: f64, hi: f64| {
        let first = (lo - reach).floor().max(0.0) as usize;
        let last = ((hi + reach).ceil().max(0.0) as usize).min(size);
        first..last
    };
    let (dx, dy) = (b.x - a.x, b.y - a.y);
    let length2 = (dx * dx + dy * dy).max(1e-12);
    for y in range(a.y.min(b.y), a.y.max(b.y)) {
        let row = &mut out[y * size..(y + 1) * size];
        for x in range(a.x.min(b.x), a.x.max(b.x)) {
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let t = (((px - a.x) * dx + (py - a.y) * dy) / length2).clamp(0.0, 1.0);
            let (ex, ey) = (px - a.x - t * dx, py - a.y - t * dy);
            let coverage = (half_width + 0.5 - (ex * ex + ey * ey).sqrt()).clamp(0.0, 1.0);
            let ink = (coverage * 255.0).round() as u8;
            row[x] = row[x].max(ink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::episode::{EpisodeSampler, EpisodeSpec};

    fn small(seed: u64) -> SyntheticOptions {
        SyntheticOptions {
            classes_train: 3,
            classes_val: 2,
            classes_test: 60,
            images_per_class: 20,
            image_size: 28,
            seed,
        }
    }

    #[test]
    fn layout_and_determinism() {
        let a = generate(&small(1)).unwrap();
        assert_eq!(a.store.len(), 65 * 20);
        assert_eq!(a.store.shape(), (1, 28, 28));
        assert_eq!(a.class_counts(), [3, 2, 60]);
        assert_eq!(a.val.classes[1].images, (80..100).collect::<Vec<u32>>());
        // Ink is drawn and the background stays black.
        let image = a.store.image(0);
        let ink = image.iter().filter(|&&v| v > 128).count();
        assert!((20..400).contains(&ink), "{ink} ink pixels");
        assert_eq!(image[0], 0);

        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| generate(&small(1))).unwrap();
        assert_eq!(a.store, b.store);
        assert_ne!(a.store, generate(&small(2)).unwrap().store);

        // Test classes do not depend on how many training classes there are.
        let more_train = generate(&SyntheticOptions {
            classes_train: 5,
            ..small(1)
        })
        .unwrap();
        let first_test =
            |d: &FewShotDataset| d.store.image(d.test.classes[0].images[0] as usize).to_vec();
        assert_eq!(first_test(&a), first_test(&more_train));
    }

    #[test]
    fn invalid_options_are_rejected() {
        for bad in [
            SyntheticOptions {
                image_size: 4,
                ..small(0)
            },
            SyntheticOptions {
                images_per_class: 0,
                ..small(0)
            },
            SyntheticOptions {
                classes_train: 0,
                classes_val: 0,
                classes_test: 0,
                ..small(0)
            },
        ] {
            assert!(matches!(generate(&bad), Err(DataError::InvalidSpec { .. })));
        }
    }

    /// Pixel-space 1-nearest-neighbour accuracy on 5-way 1-shot test episodes.
    fn nearest_neighbour_accuracy(dataset: &FewShotDataset, episodes: usize) -> f64 {
        let spec = EpisodeSpec {
            ways: 5,
            shots: 1,
            queries: 5,
            same_group: false,
        };
        let sampler =
            EpisodeSampler::new(dataset.store.clone(), dataset.test.clone(), spec, 7).unwrap();
        let len = dataset.store.image_len();
        let (mut right, mut total) = (0, 0);
        for e in sampler.episodes(0, episodes) {
            for (query, &label) in e.query.chunks(len).zip(&e.query_labels) {
                let distance = |support: &[u8]| -> u64 {
                    query
                        .iter()
                        .zip(support)
                        .map(|(&a, &b)| (i64::from(a) - i64::from(b)).pow(2) as u64)
                        .sum()
                };
                let nearest = e
                    .support
                    .chunks(len)
                    .zip(&e.support_labels)
                    .min_by_key(|(s, _)| distance(s))
                    .map(|(_, &l)| l);
                right += usize::from(nearest == Some(label));
                total += 1;
            }
        }
        right as f64 / total as f64
    }

    #[test]
    fn glyphs_are_learnable_but_not_trivial() {
        let accuracy = nearest_neighbour_accuracy(&generate(&small(3)).unwrap(), 300);
        // Chance is 20%; the tuned jitter gives about 60-64% over seeds.
        assert!(
            accuracy > 0.5 && accuracy < 0.99,
            "1-NN accuracy {accuracy}"
        );
    }
}
