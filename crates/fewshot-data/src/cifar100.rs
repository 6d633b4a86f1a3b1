//! CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): the
//! 100 classes of CIFAR-100 (600 32x32 colour images each, its training and
//! test images together) split for few-shot learning. CIFAR-FS splits the
//! classes at random, 64 / 16 / 20; FC100 splits the 20 superclasses, 12 /
//! 4 / 4 (60 / 20 / 20 classes), so test classes share no superclass with
//! training ones. The split lists are in `splits/` beside this crate, from
//! torchmeta's assets (tristandeleu/pytorch-meta).
//!
//! The files are CIFAR-100's "binary version" as its archive unpacks:
//! `train.bin` and `test.bin` (records of a coarse label byte, a fine label
//! byte and 3,072 pixel bytes, the red plane, then green, then blue) with
//! `fine_label_names.txt` and `coarse_label_names.txt`.

use std::path::Path;
use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::locate::missing_dataset;
use crate::preprocess::{resized, write_planes, Resampling};
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};
use crate::store::ImageStore;

/// Which few-shot split of CIFAR-100's classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar100Split {
    /// Classes at random: 64 / 16 / 20.
    CifarFs,
    /// By superclass: 12 / 4 / 4 superclasses.
    Fc100,
}

impl Cifar100Split {
    pub fn name(self) -> &'static str {
        match self {
            Self::CifarFs => "cifar-fs",
            Self::Fc100 => "fc100",
        }
    }

    /// The split's list of class (CIFAR-FS) or superclass (FC100) names.
    fn list(self, split: SplitName) -> &'static str {
        match (self, split) {
            (Self::CifarFs, SplitName::Train) => include_str!("../splits/cifar-fs/train.txt"),
            (Self::CifarFs, SplitName::Val) => include_str!("../splits/cifar-fs/val.txt"),
            (Self::CifarFs, SplitName::Test) => include_str!("../splits/cifar-fs/test.txt"),
            (Self::Fc100, SplitName::Train) => include_str!("../splits/fc100/train.txt"),
            (Self::Fc100, SplitName::Val) => include_str!("../splits/fc100/val.txt"),
            (Self::Fc100, SplitName::Test) => include_str!("../splits/fc100/test.txt"),
        }
    }
}

/// CIFAR-100's image side.
pub const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const RECORD: usize = 2 + 3 * PLANE;
const FINE_CLASSES: usize = 100;
const COARSE_CLASSES: usize = 20;

/// Loads `root` (CIFAR-100's binary files) with `split`'s classes, every
/// image resized to `image_size` (32: as stored).
pub fn load(root: &Path, split: Cifar100Split, image_size: usize) -> Result<FewShotDataset> {
    if image_size == 0 {
        return Err(DataError::InvalidSpec {
            field: "image_size",
            value: image_size.to_string(),
            reason: "must be at least 1".into(),
        });
    }
    let dataset = "cifar100";
    if !root.is_dir() {
        return Err(missing_dataset(dataset, root));
    }
    let fine_names = label_names(&root.join("fine_label_names.txt"), FINE_CLASSES)?;
    let coarse_names = label_names(&root.join("coarse_label_names.txt"), COARSE_CLASSES)?;

    let mut pixels = Vec::new();
    let mut images_of: Vec<Vec<u32>> = vec![Vec::new(); FINE_CLASSES];
    let mut coarse_of: Vec<Option<usize>> = vec![None; FINE_CLASSES];
    let mut count = 0u32;
    for file in ["train.bin", "test.bin"] {
        let path = root.join(file);
        if !path.is_file() {
            return Err(missing_dataset(dataset, &path));
        }
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(DataError::InvalidSpec {
                field: "CIFAR-100 file",
                value: format!("{} ({} bytes)", path.display(), bytes.len()),
                reason: format!("must hold whole records of {RECORD} bytes"),
            });
        }
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            let (coarse, fine) = (record[0] as usize, record[1] as usize);
            if coarse >= COARSE_CLASSES || fine >= FINE_CLASSES {
                return Err(DataError::InvalidSpec {
                    field: "CIFAR-100 record",
                    value: format!("{} record {i}", path.display()),
                    reason: format!("labels {coarse} (coarse) and {fine} (fine) out of range"),
                });
            }
            if *coarse_of[fine].get_or_insert(coarse) != coarse {
                return Err(DataError::InvalidSpec {
                    field: "CIFAR-100 record",
                    value: format!("{} record {i}", path.display()),
                    reason: format!("class {} in two superclasses", fine_names[fine]),
                });
            }
            images_of[fine].push(count);
            count += 1;
            append_image(&record[2..], image_size, &mut pixels);
        }
    }
    let store = ImageStore::new(3, image_size, image_size, pixels)?;

    let class = |fine: usize| FewShotClass {
        name: fine_names[fine].clone(),
        group: coarse_of[fine].map_or_else(String::new, |c| coarse_names[c].clone()),
        images: images_of[fine].clone(),
        rotation: Rotation::R0,
    };
    let split_of = |name: SplitName| -> Result<ClassSplit> {
        let listed: Vec<&str> = split.list(name).lines().filter(|l| !l.is_empty()).collect();
        let known = match split {
            Cifar100Split::CifarFs => &fine_names,
            Cifar100Split::Fc100 => &coarse_names,
        };
        if let Some(unknown) = listed.iter().find(|l| !known.iter().any(|k| k == *l)) {
            return Err(DataError::InvalidSpec {
                field: "class",
                value: unknown.to_string(),
                reason: format!(
                    "listed in {}'s {} split but not among {}'s label names",
                    split.name(),
                    name.as_str(),
                    root.display()
                ),
            });
        }
        let classes = (0..FINE_CLASSES)
            .filter(|&fine| match split {
                Cifar100Split::CifarFs => listed.contains(&fine_names[fine].as_str()),
                Cifar100Split::Fc100 => {
                    coarse_of[fine].is_some_and(|c| listed.contains(&coarse_names[c].as_str()))
                }
            })
            .filter(|&fine| !images_of[fine].is_empty())
            .map(class)
            .collect();
        Ok(ClassSplit {
            name: name.as_str().to_string(),
            classes,
            random_rotation: false,
        })
    };
    let (train, val, test) = (
        split_of(SplitName::Train)?,
        split_of(SplitName::Val)?,
        split_of(SplitName::Test)?,
    );
    Ok(FewShotDataset {
        name: split.name().to_string(),
        store: Arc::new(store),
        train,
        val,
        test,
    })
}

/// One name a line, exactly `count` of them.
fn label_names(path: &Path, count: usize) -> Result<Vec<String>> {
    if !path.is_file() {
        return Err(missing_dataset("cifar100", path));
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != count {
        return Err(DataError::SplitLine {
            file: path.to_path_buf(),
            line: names.len(),
            message: format!("{} names, expected {count}", names.len()),
        });
    }
    Ok(names)
}

/// A record's planar 32x32 RGB pixels, resized to `size`, appended as CHW.
fn append_image(planes: &[u8], size: usize, out: &mut Vec<u8>) {
    if size == SIDE {
        out.extend_from_slice(planes);
        return;
    }
    let image = image::RgbImage::from_fn(SIDE as u32, SIDE as u32, |x, y| {
        let i = y as usize * SIDE + x as usize;
        image::Rgb([planes[i], planes[PLANE + i], planes[2 * PLANE + i]])
    });
    let start = out.len();
    out.resize(start + 3 * size * size, 0);
    write_planes(
        &resized(image, size as u32, Resampling::Area),
        &mut out[start..],
    );
}
