//! Classes, splits of classes, and the rotations that turn one character
//! into several classes (Vinyals) or augment a class per episode (MAML).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::Fnv1a;
use crate::error::{DataError, Result};
use crate::store::ImageStore;

/// A rotation by a multiple of 90 degrees, counter-clockwise as in
/// torchvision's and PIL's `rotate`, which the Vinyals split files assume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Rotation {
    #[default]
    R0,
    R90,
    R180,
    R270,
}

impl Rotation {
    pub const ALL: [Rotation; 4] = [Rotation::R0, Rotation::R90, Rotation::R180, Rotation::R270];

    pub fn degrees(self) -> u32 {
        match self {
            Rotation::R0 => 0,
            Rotation::R90 => 90,
            Rotation::R180 => 180,
            Rotation::R270 => 270,
        }
    }

    /// `None` unless `degrees` is 0, 90, 180 or 270.
    pub fn from_degrees(degrees: u32) -> Option<Rotation> {
        Rotation::ALL.into_iter().find(|r| r.degrees() == degrees)
    }

    /// This rotation followed by `other`.
    pub fn compose(self, other: Rotation) -> Rotation {
        Rotation::ALL[(self as usize + other as usize) % 4]
    }
}

/// Writes `src`, `channels` square planes of `size x size` bytes, rotated
/// counter-clockwise by `rot`, into `dst` of the same length.
pub fn rotate_into(
    src: &[u8],
    channels: usize,
    size: usize,
    rot: Rotation,
    dst: &mut [u8],
) -> Result<()> {
    let expected = channels * size * size;
    if src.len() != expected || dst.len() != expected {
        return Err(DataError::InvalidSpec {
            field: "rotate_into",
            value: format!("src {} bytes, dst {} bytes", src.len(), dst.len()),
            reason: format!("both must be {channels}x{size}x{size} = {expected} bytes"),
        });
    }
    rotate_planes(src, size, rot, dst);
    Ok(())
}

/// [`rotate_into`] without the length check, for callers that checked
/// once up front; planes beyond the shorter of `src` and `dst` are skipped.
pub(crate) fn rotate_planes(src: &[u8], size: usize, rot: Rotation, dst: &mut [u8]) {
    let plane = size * size;
    if plane == 0 {
        return;
    }
    // Output row y of R90 is source column size-1-y read top-down; of R270,
    // source column y read bottom-up. Walking whole rows with `chunks_exact`
    // keeps this a simple gather: episodes rotate thousands of images per second.
    for (src, dst) in src.chunks_exact(plane).zip(dst.chunks_exact_mut(plane)) {
        match rot {
            Rotation::R0 => dst.copy_from_slice(src),
            Rotation::R180 => dst
                .iter_mut()
                .zip(src.iter().rev())
                .for_each(|(d, s)| *d = *s),
            Rotation::R90 => {
                for (y, out) in dst.chunks_exact_mut(size).enumerate() {
                    let column = src.chunks_exact(size).map(|row| row[size - 1 - y]);
                    out.iter_mut().zip(column).for_each(|(d, s)| *d = s);
                }
            }
            Rotation::R270 => {
                for (y, out) in dst.chunks_exact_mut(size).enumerate() {
                    let column = src.chunks_exact(size).rev().map(|row| row[y]);
                    out.iter_mut().zip(column).for_each(|(d, s)| *d = s);
                }
            }
        }
    }
}

/// One class of a few-shot split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FewShotClass {
    /// Unique within its dataset, e.g. `Latin/character01/rot090`.
    pub name: String,
    /// What the class belongs to (the alphabet for Omniglot); "" if nothing.
    pub group: String,
    /// Indices into the dataset's [`ImageStore`].
    pub images: Vec<u32>,
    /// Applied to every image of the class (Vinyals' rotated classes).
    pub rotation: Rotation,
}

/// The classes of one split (train, val or test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSplit {
    pub name: String,
    pub classes: Vec<FewShotClass>,
    /// MAML's augmentation: draw a random rotation per class per episode, on
    /// top of each class's own `rotation`.
    pub random_rotation: bool,
}

impl ClassSplit {
    /// A split without classes, for datasets that have no such split.
    pub fn empty(name: &str) -> ClassSplit {
        ClassSplit {
            name: name.to_string(),
            classes: Vec::new(),
            random_rotation: false,
        }
    }

    /// Identifies the episodes a sampler can draw from this split, so that
    /// evaluations on other classes (another split convention, dataset or
    /// data folder) are not paired by mistake: the counts of classes and
    /// images, and a hash of everything the draws depend on (each class's
    /// name, group, rotation and image indices, and `random_rotation`).
    pub fn fingerprint(&self) -> String {
        let mut hash = Fnv1a::new();
        hash.bytes(&[u8::from(self.random_rotation)]);
        for class in &self.classes {
            hash.str(&class.name);
            hash.str(&class.group);
            hash.bytes(&class.rotation.degrees().to_le_bytes());
            hash.bytes(&(class.images.len() as u64).to_le_bytes());
            for image in &class.images {
                hash.bytes(&image.to_le_bytes());
            }
        }
        format!(
            "{} classes, {} images, hash {:016x}",
            self.classes.len(),
            self.num_images(),
            hash.0
        )
    }

    /// The split as the Meta Networks reference code tests: characters as
    /// drawn, never rotated. Keeps the unrotated classes (of Vinyals' four
    /// rotations per character, the `rot000` one) and draws no random
    /// rotation (MAML's augmentation). The name gains " unrotated".
    pub fn without_rotations(&self) -> ClassSplit {
        ClassSplit {
            name: format!("{} unrotated", self.name),
            classes: self
                .classes
                .iter()
                .filter(|c| c.rotation == Rotation::R0)
                .cloned()
                .collect(),
            random_rotation: false,
        }
    }

    /// Each class in its four rotations, each a class of its own (named
    /// `<class>/rot000` ... `/rot270`), as Vinyals et al. quadruple
    /// Omniglot's classes. For a split whose classes are unrotated and that
    /// draws no random rotation (Lake's background set); others are refused,
    /// since they already use rotations.
    pub fn with_rotation_classes(&self) -> Result<ClassSplit> {
        if self.random_rotation || self.classes.iter().any(|c| c.rotation != Rotation::R0) {
            return Err(DataError::InvalidSpec {
                field: "rotation_classes",
                value: self.name.clone(),
                reason: "this split already rotates its classes (Vinyals' rotated classes or \
                         MAML's random rotations); rotation classes are for unrotated splits"
                    .into(),
            });
        }
        let classes = self
            .classes
            .iter()
            .flat_map(|class| {
                Rotation::ALL.into_iter().map(move |rotation| FewShotClass {
                    name: format!("{}/rot{:03}", class.name, rotation.degrees()),
                    rotation,
                    ..class.clone()
                })
            })
            .collect();
        Ok(ClassSplit {
            name: format!("{} with rotations", self.name),
            classes,
            random_rotation: false,
        })
    }

    /// Images over all classes (an image shared by rotated classes counts once per class).
    pub fn num_images(&self) -> usize {
        self.classes.iter().map(|c| c.images.len()).sum()
    }

    /// Number of distinct groups; classes without a group all share the group "".
    pub fn groups(&self) -> usize {
        let mut groups: Vec<&str> = self.classes.iter().map(|c| c.group.as_str()).collect();
        groups.sort_unstable();
        groups.dedup();
        groups.len()
    }
}

/// Which split of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    Train,
    Val,
    Test,
}

impl SplitName {
    pub const ALL: [SplitName; 3] = [SplitName::Train, SplitName::Val, SplitName::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Val => "val",
            SplitName::Test => "test",
        }
    }
}

impl fmt::Display for SplitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SplitName {
    type Err = DataError;

    fn from_str(s: &str) -> Result<SplitName> {
        SplitName::ALL
            .into_iter()
            .find(|name| name.as_str() == s)
            .ok_or_else(|| DataError::InvalidSpec {
                field: "split",
                value: s.to_string(),
                reason: "expected train, val or test".into(),
            })
    }
}

/// A dataset ready for episode sampling: one image store shared by three splits.
#[derive(Clone, Debug)]
pub struct FewShotDataset {
    pub name: String,
    pub store: Arc<ImageStore>,
    pub train: ClassSplit,
    pub val: ClassSplit,
    pub test: ClassSplit,
}

impl FewShotDataset {
    /// Classes of the train, val and test splits.
    pub fn class_counts(&self) -> [usize; 3] {
        [&self.train, &self.val, &self.test].map(|s| s.classes.len())
    }

    pub fn split(&self, name: SplitName) -> &ClassSplit {
        match name {
            SplitName::Train => &self.train,
            SplitName::Val => &self.val,
            SplitName::Test => &self.test,
        }
    }

    /// The validation classes moved into the training split (named
    /// `train+val`), for a final training on every non-test class; `val`
    /// is left empty. The two splits must agree on `random_rotation`.
    pub fn with_val_in_train(mut self) -> Result<FewShotDataset> {
        if self.train.random_rotation != self.val.random_rotation && !self.val.classes.is_empty() {
            return Err(DataError::InvalidSpec {
                field: "train_with_val",
                value: self.name.clone(),
                reason:
                    "its train and val splits augment differently (random rotations in one only)"
                        .into(),
            });
        }
        let val = std::mem::replace(&mut self.val, ClassSplit::empty("val"));
        self.train.name = "train+val".into();
        self.train.classes.extend(val.classes);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A 3x3 image whose every pixel is distinct, so any wrong mapping shows.
    //   1 2 3
    //   4 5 6
    //   7 8 9
    const IMAGE: [u8; 9] = [1, 2, 3, 4, 5, 6, 7, 8, 9];

    fn rotated(rot: Rotation) -> Vec<u8> {
        let mut out = vec![0; 9];
        rotate_into(&IMAGE, 1, 3, rot, &mut out).unwrap();
        out
    }

    #[test]
    fn rotations_are_counter_clockwise() {
        assert_eq!(rotated(Rotation::R0), IMAGE);
        // Counter-clockwise by 90: the right column becomes the top row.
        assert_eq!(rotated(Rotation::R90), [3, 6, 9, 2, 5, 8, 1, 4, 7]);
        assert_eq!(rotated(Rotation::R180), [9, 8, 7, 6, 5, 4, 3, 2, 1]);
        // By 270 (= 90 clockwise): the left column, bottom up, becomes the top row.
        assert_eq!(rotated(Rotation::R270), [7, 4, 1, 8, 5, 2, 9, 6, 3]);
    }

    #[test]
    fn rotation_applies_to_every_channel_and_composes() {
        let mut src = IMAGE.to_vec();
        src.extend(IMAGE.iter().map(|v| v + 10));
        let mut out = vec![0; 18];
        rotate_into(&src, 2, 3, Rotation::R90, &mut out).unwrap();
        assert_eq!(&out[..9], rotated(Rotation::R90));
        assert_eq!(out[9], 13);

        let mut once = vec![0; 9];
        rotate_into(&rotated(Rotation::R90), 1, 3, Rotation::R180, &mut once).unwrap();
        assert_eq!(once, rotated(Rotation::R90.compose(Rotation::R180)));
        assert_eq!(Rotation::R270.compose(Rotation::R180), Rotation::R90);
    }

    #[test]
    fn rotate_into_rejects_wrong_lengths() {
        let mut out = vec![0; 8];
        assert!(rotate_into(&IMAGE, 1, 3, Rotation::R90, &mut out).is_err());
    }

    #[test]
    fn degrees_round_trip() {
        for r in Rotation::ALL {
            assert_eq!(Rotation::from_degrees(r.degrees()), Some(r));
        }
        assert_eq!(Rotation::from_degrees(45), None);
    }

    #[test]
    fn split_names_parse_print_and_serialize_in_lowercase() {
        for name in SplitName::ALL {
            assert_eq!(name.to_string().parse::<SplitName>().unwrap(), name);
        }
        assert!("Train".parse::<SplitName>().is_err());
        assert_eq!(serde_json::to_string(&SplitName::Val).unwrap(), "\"val\"");
        let back: SplitName = serde_json::from_str("\"test\"").unwrap();
        assert_eq!(back, SplitName::Test);
    }

    #[test]
    fn groups_counts_distinct_groups() {
        let class = |group: &str| FewShotClass {
            name: String::new(),
            group: group.into(),
            images: vec![0, 1],
            rotation: Rotation::R0,
        };
        let split = ClassSplit {
            name: "train".into(),
            classes: vec![class("a"), class("b"), class("a")],
            random_rotation: false,
        };
        assert_eq!(split.groups(), 2);
        assert_eq!(split.num_images(), 6);
    }

    #[test]
    fn validation_classes_can_join_the_training_split() {
        let class = |name: &str| FewShotClass {
            name: name.into(),
            group: String::new(),
            images: vec![0],
            rotation: Rotation::R0,
        };
        let split = |name: &str, classes: &[&str]| ClassSplit {
            name: name.into(),
            classes: classes.iter().map(|c| class(c)).collect(),
            random_rotation: false,
        };
        let dataset = FewShotDataset {
            name: "d".into(),
            store: Arc::new(ImageStore::new(1, 1, 1, vec![0]).unwrap()),
            train: split("train", &["a", "b"]),
            val: split("val", &["c"]),
            test: split("test", &["d"]),
        };
        let merged = dataset.clone().with_val_in_train().unwrap();
        let names: Vec<&str> = merged
            .train
            .classes
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(merged.train.name, "train+val");
        assert!(merged.val.classes.is_empty());
        assert_eq!(merged.test, dataset.test);

        let mut mixed = dataset;
        mixed.val.random_rotation = true;
        let err = mixed.with_val_in_train().unwrap_err();
        assert!(err.to_string().contains("train_with_val"), "{err}");
    }

    #[test]
    fn without_rotations_keeps_the_unrotated_classes_and_draws_no_rotation() {
        let class = |name: &str, rotation| FewShotClass {
            name: name.into(),
            group: "g".into(),
            images: vec![0],
            rotation,
        };
        let split = ClassSplit {
            name: "test".into(),
            classes: vec![
                class("a/rot000", Rotation::R0),
                class("a/rot090", Rotation::R90),
                class("b/rot000", Rotation::R0),
                class("b/rot270", Rotation::R270),
            ],
            random_rotation: true,
        };
        let plain = split.without_rotations();
        assert_eq!(plain.name, "test unrotated");
        let names: Vec<&str> = plain.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a/rot000", "b/rot000"]);
        assert!(!plain.random_rotation);
        // Other episodes, so evaluations of the two are never paired.
        assert_ne!(plain.fingerprint(), split.fingerprint());
    }

    #[test]
    fn fingerprints_differ_exactly_when_the_draws_could() {
        let class = |name: &str, images: Vec<u32>| FewShotClass {
            name: name.into(),
            group: "g".into(),
            images,
            rotation: Rotation::R0,
        };
        let split = ClassSplit {
            name: "test".into(),
            classes: vec![class("a", vec![0, 1]), class("b", vec![2, 3])],
            random_rotation: false,
        };
        let fingerprint = split.fingerprint();
        assert!(
            fingerprint.starts_with("2 classes, 4 images, hash "),
            "{fingerprint}"
        );
        // The split's own name does not change its episodes.
        let renamed = ClassSplit {
            name: "val".into(),
            ..split.clone()
        };
        assert_eq!(renamed.fingerprint(), fingerprint);

        let mut others = Vec::new();
        let mut other_images = split.clone();
        other_images.classes[1].images = vec![2, 4];
        others.push(other_images);
        let mut other_order = split.clone();
        other_order.classes.swap(0, 1);
        others.push(other_order);
        let mut rotated = split.clone();
        rotated.classes[0].rotation = Rotation::R90;
        others.push(rotated);
        let mut regrouped = split.clone();
        regrouped.classes[0].group = "h".into();
        others.push(regrouped);
        others.push(ClassSplit {
            random_rotation: true,
            ..split.clone()
        });
        for other in others {
            assert_ne!(other.fingerprint(), fingerprint, "{other:?}");
        }
    }

    #[test]
    fn rotation_classes_quadruple_an_unrotated_split_only() {
        let class = |name: &str, images: Vec<u32>| FewShotClass {
            name: name.into(),
            group: "g".into(),
            images,
            rotation: Rotation::R0,
        };
        let split = ClassSplit {
            name: "train".into(),
            classes: vec![class("a", vec![0, 1]), class("b", vec![2])],
            random_rotation: false,
        };
        let rotated = split.with_rotation_classes().unwrap();
        assert_eq!(rotated.classes.len(), 8);
        let names: Vec<&str> = rotated.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[..4], ["a/rot000", "a/rot090", "a/rot180", "a/rot270"]);
        assert_eq!(rotated.classes[5].images, [2]);
        assert_eq!(rotated.classes[6].rotation, Rotation::R180);
        assert!(rotated.classes.iter().all(|c| c.group == "g"));
        // Already rotated: refused, by field name.
        let err = rotated.with_rotation_classes().unwrap_err().to_string();
        assert!(err.contains("rotation_classes"), "{err}");
        let random = ClassSplit {
            random_rotation: true,
            ..split
        };
        assert!(random.with_rotation_classes().is_err());
    }
}
