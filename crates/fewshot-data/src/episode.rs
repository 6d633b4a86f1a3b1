//! N-way K-shot episodes, drawn reproducibly from a split.
//!
//! Episode `i` of a sampler depends only on the sampler's seed and `i`: it
//! draws from its own random stream. So episodes can be produced in any
//! order, on any number of threads, on any machine, and come out the same.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::Augmentation;
use crate::error::{DataError, Result};
use crate::rng::Rng;
use crate::split::{rotate_planes, ClassSplit, Rotation};
use crate::store::ImageStore;
use crate::support_copies::SupportCopies;

/// Offsets the seed of the stream that draws support copies, so that it is
/// not the stream that picks the episode's classes and images.
const SUPPORT_COPIES_STREAM: u64 = 0x5u64 << 60 | 0xC0_9E5;

/// The shape of an episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EpisodeSpec {
    /// Classes per episode (N).
    pub ways: usize,
    /// Support images per class (K).
    pub shots: usize,
    /// Query images per class.
    pub queries: usize,
    /// Draw all classes of an episode from one group (alphabet): Lake's
    /// within-alphabet protocol, harder than drawing across alphabets.
    #[serde(default)]
    pub same_group: bool,
}

/// A class of an episode: which class of the split, and how it is rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpisodeClass {
    /// Index into the split's `classes`.
    pub class_index: usize,
    pub rotation: Rotation,
}

/// One episode. Label `l` is the class `classes[l]`; support and query
/// images are class-major (all images of label 0, then label 1, ...), each
/// `image_shape` bytes in CHW order, already rotated.
///
/// A class never shows the same image twice. Classes that share drawings
/// (the four rotations of a character in Vinyals' split) may both appear,
/// each with its own rotation, as in the reference code.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    pub spec: EpisodeSpec,
    /// (channels, height, width)
    pub image_shape: (usize, usize, usize),
    pub classes: Vec<EpisodeClass>,
    /// `ways * shots` images.
    pub support: Vec<u8>,
    pub support_labels: Vec<u32>,
    /// Store index of each support image.
    pub support_images: Vec<u32>,
    /// `ways * queries` images.
    pub query: Vec<u8>,
    pub query_labels: Vec<u32>,
    pub query_images: Vec<u32>,
    /// The store's [`Normalization`](crate::Normalization): how the bytes
    /// become network inputs.
    pub normalization: Option<crate::Normalization>,
}

/// Draws episodes of one spec from one split.
#[derive(Clone, Debug)]
pub struct EpisodeSampler {
    store: Arc<ImageStore>,
    split: ClassSplit,
    spec: EpisodeSpec,
    seed: u64,
    /// For `same_group`: the classes of every group that has at least
    /// `ways` of them, groups in name order.
    groups: Vec<Vec<usize>>,
    /// Distorts every image of every episode (training only).
    augmentation: Option<Augmentation>,
    /// Adds distorted copies of the support images (test-time augmentation).
    support_copies: Option<SupportCopies>,
}

impl EpisodeSampler {
    /// Checks everything that could make sampling fail, once, so that
    /// [`episode`](Self::episode) cannot fail.
    pub fn new(
        store: Arc<ImageStore>,
        split: ClassSplit,
        spec: EpisodeSpec,
        seed: u64,
    ) -> Result<Self> {
        for (field, value) in [("ways", spec.ways), ("shots", spec.shots)] {
            if value == 0 {
                return Err(DataError::InvalidSpec {
                    field,
                    value: value.to_string(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        if split.classes.len() < spec.ways {
            return Err(DataError::TooFewClasses {
                split: split.name.clone(),
                have: split.classes.len(),
                need: spec.ways,
            });
        }
        let need = spec.shots + spec.queries;
        for class in &split.classes {
            if class.images.len() < need {
                return Err(DataError::TooFewImages {
                    class: class.name.clone(),
                    have: class.images.len(),
                    need,
                });
            }
            if let Some(&bad) = class.images.iter().find(|&&i| i as usize >= store.len()) {
                return Err(DataError::InvalidSpec {
                    field: "images",
                    value: format!("image {bad} of class {}", class.name),
                    reason: format!("the image store holds only {} images", store.len()),
                });
            }
        }
        let (_, height, width) = store.shape();
        let rotates =
            split.random_rotation || split.classes.iter().any(|c| c.rotation != Rotation::R0);
        if rotates && height != width {
            return Err(DataError::InvalidSpec {
                field: "rotation",
                value: format!("{height}x{width} images"),
                reason: format!(
                    "split {} rotates images, which needs square images",
                    split.name
                ),
            });
        }
        let groups = if spec.same_group {
            same_group_candidates(&split, spec.ways)?
        } else {
            Vec::new()
        };
        Ok(EpisodeSampler {
            store,
            split,
            spec,
            seed,
            groups,
            augmentation: None,
            support_copies: None,
        })
    }

    /// The same episodes, with every image distorted by a random affine map
    /// drawn from the episode's own stream after its classes and images are
    /// picked: episode `i` keeps its classes and images, and stays a pure
    /// function of the seed and `i`. For training episodes only.
    pub fn with_augmentation(mut self, augmentation: Augmentation) -> Result<Self> {
        augmentation.validate()?;
        self.require_square_images("augment")?;
        self.augmentation = Some(augmentation);
        Ok(self)
    }

    /// The same episodes, each support image followed by distorted copies
    /// of itself (see [`SupportCopies`]): episode `i` keeps its classes,
    /// support and query images, and its spec's `shots` grows to
    /// `shots * (1 + copies)`. The copies come from a stream of their own,
    /// a pure function of the seed and `i`.
    pub fn with_support_copies(mut self, support_copies: SupportCopies) -> Result<Self> {
        support_copies.validate()?;
        self.require_square_images("support_copies")?;
        self.support_copies = Some(support_copies);
        Ok(self)
    }

    /// Affine distortions (see [`crate::Affine::apply`]) work on square images.
    fn require_square_images(&self, field: &'static str) -> Result<()> {
        let (_, height, width) = self.store.shape();
        if height != width {
            return Err(DataError::InvalidSpec {
                field,
                value: format!("{height}x{width} images"),
                reason: "affine distortions need square images".into(),
            });
        }
        Ok(())
    }

    pub fn spec(&self) -> EpisodeSpec {
        self.spec
    }

    pub fn split(&self) -> &ClassSplit {
        &self.split
    }

    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Episode number `index`: a pure function of the seed and `index`.
    pub fn episode(&self, index: u64) -> Episode {
        let EpisodeSpec {
            ways,
            shots,
            queries,
            ..
        } = self.spec;
        let mut rng = Rng::seed_from(self.seed, index);

        let class_indices = if self.spec.same_group {
            let group = &self.groups[rng.below(self.groups.len())];
            let picks = rng.sample_distinct(group.len(), ways);
            picks.into_iter().map(|i| group[i]).collect()
        } else {
            rng.sample_distinct(self.split.classes.len(), ways)
        };
        let classes: Vec<EpisodeClass> = class_indices
            .into_iter()
            .map(|class_index| {
                let own = self.split.classes[class_index].rotation;
                let rotation = if self.split.random_rotation {
                    own.compose(Rotation::ALL[rng.below(4)])
                } else {
                    own
                };
                EpisodeClass {
                    class_index,
                    rotation,
                }
            })
            .collect();

        let mut support_images = Vec::with_capacity(ways * shots);
        let mut query_images = Vec::with_capacity(ways * queries);
        for class in &classes {
            let images = &self.split.classes[class.class_index].images;
            // Distinct picks, so no image appears twice in an episode.
            let picks = rng.sample_distinct(images.len(), shots + queries);
            let (support, query) = picks.split_at(shots);
            support_images.extend(support.iter().map(|&p| images[p]));
            query_images.extend(query.iter().map(|&p| images[p]));
        }
        let labels = |per_class: usize| -> Vec<u32> {
            (0..ways as u32)
                .flat_map(|l| std::iter::repeat_n(l, per_class))
                .collect()
        };
        let support_labels = labels(shots);
        let query_labels = labels(queries);
        let mut support = self.gather(&support_images, &support_labels, &classes);
        let mut query = self.gather(&query_images, &query_labels, &classes);
        if let Some(augmentation) = &self.augmentation {
            let (channels, side, _) = self.store.shape();
            let mut original = vec![0u8; self.store.image_len()];
            for image in support
                .chunks_exact_mut(original.len())
                .chain(query.chunks_exact_mut(original.len()))
            {
                original.copy_from_slice(image);
                augmentation
                    .draw(&mut rng)
                    .apply(&original, channels, side, image);
            }
        }
        let mut episode = Episode {
            spec: self.spec,
            image_shape: self.store.shape(),
            classes,
            support,
            support_labels,
            support_images,
            query,
            query_labels,
            query_images,
            normalization: self.store.normalization().cloned(),
        };
        if let Some(support_copies) = &self.support_copies {
            let mut copies_rng =
                Rng::seed_from(self.seed.wrapping_add(SUPPORT_COPIES_STREAM), index);
            let (channels, side, _) = self.store.shape();
            let (support, labels, sources) = support_copies.expand(
                &episode.support,
                &episode.support_labels,
                channels,
                side,
                &mut copies_rng,
            );
            episode.support_images = sources.iter().map(|&s| episode.support_images[s]).collect();
            episode.support = support;
            episode.support_labels = labels;
            episode.spec.shots *= 1 + support_copies.copies;
        }
        episode
    }

    /// Episodes `start .. start + count`, built in parallel; equal to
    /// calling [`episode`](Self::episode) for each index in turn.
    pub fn episodes(&self, start: u64, count: usize) -> Vec<Episode> {
        (0..count)
            .into_par_iter()
            .map(|i| self.episode(start.wrapping_add(i as u64)))
            .collect()
    }

    /// Copies the given store images, each rotated as its class is, into one buffer.
    fn gather(&self, images: &[u32], labels: &[u32], classes: &[EpisodeClass]) -> Vec<u8> {
        let (_, size, _) = self.store.shape();
        let len = self.store.image_len();
        let mut out = vec![0u8; images.len() * len];
        for ((dst, &image), &label) in out.chunks_exact_mut(len).zip(images).zip(labels) {
            let rotation = classes[label as usize].rotation;
            rotate_planes(self.store.image(image as usize), size, rotation, dst);
        }
        out
    }
}

/// Classes of each group with at least `ways` classes, or an error naming
/// the largest group when there is none.
fn same_group_candidates(split: &ClassSplit, ways: usize) -> Result<Vec<Vec<usize>>> {
    let mut by_group: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, class) in split.classes.iter().enumerate() {
        by_group.entry(class.group.as_str()).or_default().push(i);
    }
    let largest = by_group.iter().max_by_key(|(_, classes)| classes.len());
    let (largest_name, largest_len) = largest.map_or(("", 0), |(name, c)| (*name, c.len()));
    let groups: Vec<Vec<usize>> = by_group
        .into_values()
        .filter(|classes| classes.len() >= ways)
        .collect();
    if groups.is_empty() {
        return Err(DataError::TooFewClasses {
            split: format!(
                "{} (largest group {largest_name:?}, same_group episodes)",
                split.name
            ),
            have: largest_len,
            need: ways,
        });
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::FewShotClass;

    /// `classes` classes in groups of `per_group`, `images` 2x2 images each;
    /// every pixel of image i is i (mod 256), so images can be recognised.
    fn fixture(classes: usize, images: usize, per_group: usize) -> (Arc<ImageStore>, ClassSplit) {
        let n = classes * images;
        let pixels = (0..n).flat_map(|i| [i as u8; 4]).collect();
        let store = Arc::new(ImageStore::new(1, 2, 2, pixels).unwrap());
        let classes = (0..classes)
            .map(|c| FewShotClass {
                name: format!("class{c}"),
                group: format!("group{}", c / per_group),
                images: ((c * images) as u32..((c + 1) * images) as u32).collect(),
                rotation: Rotation::R0,
            })
            .collect();
        let split = ClassSplit {
            name: "train".into(),
            classes,
            random_rotation: false,
        };
        (store, split)
    }

    fn spec(ways: usize, shots: usize, queries: usize) -> EpisodeSpec {
        EpisodeSpec {
            ways,
            shots,
            queries,
            same_group: false,
        }
    }

    #[test]
    fn episodes_are_labelled_class_major_and_never_repeat_an_image() {
        let (store, split) = fixture(20, 10, 5);
        let sampler = EpisodeSampler::new(store.clone(), split.clone(), spec(5, 2, 3), 9).unwrap();
        for index in 0..50 {
            let e = sampler.episode(index);
            assert_eq!(e.support_labels, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
            assert_eq!(e.query_labels.len(), 15);
            assert!(e
                .query_labels
                .chunks(3)
                .enumerate()
                .all(|(l, c)| c.iter().all(|&x| x == l as u32)));
            let mut all: Vec<u32> = e
                .support_images
                .iter()
                .chain(&e.query_images)
                .copied()
                .collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), 25);
            // Each image is where its label says, with its own pixels.
            for (k, (&image, &label)) in e.support_images.iter().zip(&e.support_labels).enumerate()
            {
                let class = &split.classes[e.classes[label as usize].class_index];
                assert!(class.images.contains(&image));
                assert_eq!(&e.support[k * 4..k * 4 + 4], store.image(image as usize));
            }
            for (k, &image) in e.query_images.iter().enumerate() {
                assert_eq!(&e.query[k * 4..k * 4 + 4], store.image(image as usize));
            }
        }
    }

    #[test]
    fn same_seed_same_episodes_in_any_thread_count() {
        let (store, split) = fixture(30, 8, 5);
        let sampler = EpisodeSampler::new(store.clone(), split.clone(), spec(5, 1, 4), 1).unwrap();
        let sequential: Vec<Episode> = (100..140).map(|i| sampler.episode(i)).collect();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert_eq!(pool.install(|| sampler.episodes(100, 40)), sequential);
        }
        let again = EpisodeSampler::new(store.clone(), split.clone(), spec(5, 1, 4), 1).unwrap();
        assert_eq!(again.episode(7), sampler.episode(7));
        let other = EpisodeSampler::new(store, split, spec(5, 1, 4), 2).unwrap();
        assert_ne!(other.episode(7), sampler.episode(7));
        assert_ne!(sampler.episode(8), sampler.episode(7));
    }

    #[test]
    fn augmented_episodes_keep_their_draws_and_are_seeded() {
        // 8x8 images with a gradient, so a distortion changes pixels.
        let images = 20 * 6;
        let pixels = (0..images)
            .flat_map(|i| (0..64).map(move |p| ((i * 3 + p * 4) % 256) as u8))
            .collect();
        let store = Arc::new(ImageStore::new(1, 8, 8, pixels).unwrap());
        let (_, split) = fixture(20, 6, 5);
        let plain = EpisodeSampler::new(store, split, spec(5, 1, 2), 4).unwrap();
        let augmented = plain
            .clone()
            .with_augmentation(Augmentation {
                probability: 1.0,
                ..Augmentation::default()
            })
            .unwrap();
        let mut changed = 0;
        for index in 0..10 {
            let (p, a) = (plain.episode(index), augmented.episode(index));
            assert_eq!(p.classes, a.classes);
            assert_eq!(p.support_images, a.support_images);
            assert_eq!(p.query_images, a.query_images);
            changed += usize::from(p.support != a.support);
            assert_eq!(a, augmented.episode(index));
        }
        assert_eq!(changed, 10);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let sequential: Vec<Episode> = (0..8).map(|i| augmented.episode(i)).collect();
        assert_eq!(pool.install(|| augmented.episodes(0, 8)), sequential);

        let wide = Arc::new(ImageStore::new(1, 1, 2, vec![0; 4]).unwrap());
        let (_, one) = fixture(1, 2, 1);
        let err = EpisodeSampler::new(wide, one, spec(1, 1, 0), 0)
            .unwrap()
            .with_augmentation(Augmentation::default())
            .unwrap_err();
        assert!(err.to_string().contains("square"), "{err}");
    }

    #[test]
    fn support_copies_keep_the_episode_and_add_distorted_shots() {
        let images = 20 * 6;
        let pixels = (0..images)
            .flat_map(|i| (0..64).map(move |p| ((i * 5 + p * 3) % 256) as u8))
            .collect();
        let store = Arc::new(ImageStore::new(1, 8, 8, pixels).unwrap());
        let (_, split) = fixture(20, 6, 5);
        let plain = EpisodeSampler::new(store, split, spec(5, 2, 3), 9).unwrap();
        let copied = plain
            .clone()
            .with_support_copies(SupportCopies::new(3))
            .unwrap();
        for index in 0..6 {
            let (p, c) = (plain.episode(index), copied.episode(index));
            assert_eq!(c.spec.shots, 8);
            assert_eq!((p.classes.clone(), &p.query), (c.classes.clone(), &c.query));
            assert_eq!(c.support_labels.len(), 5 * 8);
            assert_eq!(c.support.len(), 5 * 8 * 64);
            for label in 0..5 {
                let block = &c.support[label * 8 * 64..(label + 1) * 8 * 64];
                // The class's two drawings first, as in the plain episode.
                assert_eq!(block[..128], p.support[label * 128..(label + 1) * 128]);
                let ids = &c.support_images[label * 8..(label + 1) * 8];
                assert!(ids
                    .chunks(2)
                    .all(|pair| pair == &p.support_images[label * 2..label * 2 + 2]));
            }
            assert_eq!(c, copied.episode(index), "seeded");
        }
        let err = plain
            .with_support_copies(SupportCopies::new(0))
            .unwrap_err();
        assert!(err.to_string().contains("support_copies.copies"), "{err}");
    }

    #[test]
    fn invalid_specs_are_rejected_with_names() {
        let (store, mut split) = fixture(4, 5, 4);
        let err = EpisodeSampler::new(store.clone(), split.clone(), spec(5, 1, 1), 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewClasses {
                    have: 4,
                    need: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("train"));

        split.classes[2].images.truncate(3);
        let err = EpisodeSampler::new(store.clone(), split.clone(), spec(2, 2, 2), 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewImages {
                    have: 3,
                    need: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("class2"), "{err}");

        for bad in [spec(0, 1, 1), spec(2, 0, 1)] {
            let err = EpisodeSampler::new(store.clone(), split.clone(), bad, 0).unwrap_err();
            assert!(matches!(err, DataError::InvalidSpec { .. }), "{err}");
        }
        split.classes[0].images.push(999);
        let err = EpisodeSampler::new(store, split, spec(2, 1, 0), 0).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }

    #[test]
    fn zero_queries_and_one_way_are_allowed() {
        let (store, split) = fixture(3, 5, 3);
        let e = EpisodeSampler::new(store, split, spec(1, 5, 0), 0)
            .unwrap()
            .episode(0);
        assert!(e.query.is_empty() && e.query_labels.is_empty());
        assert_eq!(e.support.len(), 20);
    }

    #[test]
    fn same_group_episodes_stay_in_one_group() {
        // Groups of 3, 3, 3, 6 classes: 5-way episodes must all come from the group of 6.
        let (store, mut split) = fixture(15, 4, 3);
        for class in &mut split.classes[9..] {
            class.group = "big".into();
        }
        let same = EpisodeSpec {
            same_group: true,
            ..spec(5, 1, 1)
        };
        let sampler = EpisodeSampler::new(store.clone(), split.clone(), same, 3).unwrap();
        for e in sampler.episodes(0, 30) {
            assert!(e
                .classes
                .iter()
                .all(|c| split.classes[c.class_index].group == "big"));
        }
        let three = EpisodeSpec { ways: 3, ..same };
        let sampler = EpisodeSampler::new(store.clone(), split.clone(), three, 3).unwrap();
        let mut seen = std::collections::HashSet::new();
        for e in sampler.episodes(0, 100) {
            let group = &split.classes[e.classes[0].class_index].group;
            assert!(e
                .classes
                .iter()
                .all(|c| &split.classes[c.class_index].group == group));
            seen.insert(group.clone());
        }
        assert_eq!(seen.len(), 4);
        let seven = EpisodeSpec { ways: 7, ..same };
        let err = EpisodeSampler::new(store, split, seven, 3).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewClasses {
                    have: 6,
                    need: 7,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn rotations_are_applied_and_need_square_images() {
        // One 2x2 image per class with distinct pixels: rotation shows.
        let store = Arc::new(ImageStore::new(1, 2, 2, vec![1, 2, 3, 4, 5, 6, 7, 8]).unwrap());
        let class = |i: u32, rotation| FewShotClass {
            name: format!("c{i}"),
            group: String::new(),
            images: vec![i],
            rotation,
        };
        let split = ClassSplit {
            name: "test".into(),
            classes: vec![class(0, Rotation::R90), class(1, Rotation::R0)],
            random_rotation: false,
        };
        let sampler = EpisodeSampler::new(store.clone(), split.clone(), spec(2, 1, 0), 0).unwrap();
        let e = sampler.episode(0);
        for (label, class) in e.classes.iter().enumerate() {
            let want: &[u8] = if class.class_index == 0 {
                &[2, 4, 1, 3]
            } else {
                &[5, 6, 7, 8]
            };
            assert_eq!(&e.support[label * 4..label * 4 + 4], want);
        }

        // Random rotation draws all four rotations over many episodes, on top of the class's own.
        let random = ClassSplit {
            random_rotation: true,
            ..split
        };
        let sampler = EpisodeSampler::new(store, random.clone(), spec(1, 1, 0), 0).unwrap();
        let seen: std::collections::HashSet<u32> = sampler
            .episodes(0, 64)
            .iter()
            .map(|e| e.classes[0].rotation.degrees())
            .collect();
        assert_eq!(seen.len(), 4);

        let wide = Arc::new(ImageStore::new(1, 1, 2, vec![0; 4]).unwrap());
        let err = EpisodeSampler::new(wide, random, spec(1, 1, 0), 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::InvalidSpec {
                    field: "rotation",
                    ..
                }
            ),
            "{err}"
        );
    }
}
