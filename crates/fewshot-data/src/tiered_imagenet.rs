//! tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34
//! super-categories, split by category so that no category is shared
//! between splits: 351 classes (20 categories) to train, 97 (6) to
//! validate, 160 (8) to test. The class lists are in `splits/tiered-imagenet/`
//! (`class,category` a line, both WordNet ids, as the authors ship them).
//!
//! Read from ImageNet's own layout, one folder of images per class named by
//! its WordNet id: `<root>/<wnid>/*.JPEG` (ILSVRC-2012's `train/` folder
//! itself will do: the 392 classes not listed are ignored) or
//! `<root>/{train,val,test}/<wnid>/*`. Every image is resized to a square,
//! as the authors' 84x84 release was made. Each class's category is its
//! group, so episodes can be drawn within one category.
//!
//! Memory: the whole dataset is about 779,000 images, 16.5 GB at 84x84 in
//! colour; `images_per_class` keeps the first images of each class (in file
//! name order) to load less.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::cache::{self, CacheOptions, CacheStatus, SourceFile};
use crate::error::{DataError, Result};
use crate::locate::{missing_dataset, sorted_files};
use crate::preprocess::{Preprocess, Resampling};
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};

/// Options of [`load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TieredImageNetOptions {
    /// Width and height after resizing (84 in the papers).
    pub image_size: usize,
    /// Keep at most this many images of each class; `None` keeps all (the papers' setting).
    pub images_per_class: Option<usize>,
    pub cache: CacheOptions,
}

impl Default for TieredImageNetOptions {
    fn default() -> Self {
        Self {
            image_size: 84,
            images_per_class: None,
            cache: CacheOptions::default(),
        }
    }
}

/// File extensions read as images.
const IMAGE_EXTENSIONS: &[&str] = &["jpeg", "jpg", "png"];

/// One line of a split list: a class and its super-category.
struct ListedClass {
    wnid: &'static str,
    category: &'static str,
}

/// The classes of `split` as the split list names them, in its order.
fn listed_classes(split: SplitName) -> Vec<ListedClass> {
    let list = match split {
        SplitName::Train => include_str!("../splits/tiered-imagenet/train.csv"),
        SplitName::Val => include_str!("../splits/tiered-imagenet/val.csv"),
        SplitName::Test => include_str!("../splits/tiered-imagenet/test.csv"),
    };
    list.lines()
        .filter_map(|line| line.split_once(','))
        .map(|(wnid, category)| ListedClass { wnid, category })
        .collect()
}

/// The folder of class `wnid` of `split`: `root/<wnid>` or `root/<split>/<wnid>`.
fn class_folder(root: &Path, split: SplitName, wnid: &str) -> Result<PathBuf> {
    let candidates = [root.join(wnid), root.join(split.to_string()).join(wnid)];
    match candidates.iter().find(|p| p.is_dir()) {
        Some(dir) => Ok(dir.clone()),
        None => Err(missing_dataset("tiered-imagenet", &candidates[0])),
    }
}

/// Loads the three splits into one RGB store.
pub fn load(root: &Path, options: &TieredImageNetOptions) -> Result<(FewShotDataset, CacheStatus)> {
    let pre = Preprocess {
        size: options.image_size,
        channels: 3,
        invert: false,
        resampling: Resampling::Area,
    };
    pre.validate()?;
    if options.images_per_class == Some(0) {
        return Err(DataError::InvalidSpec {
            field: "images_per_class",
            value: "0".into(),
            reason: "a class needs at least one image".into(),
        });
    }
    if !root.is_dir() {
        return Err(missing_dataset("tiered-imagenet", root));
    }

    // Every class's files, split after split, into one list of sources.
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut read_split = |split: SplitName| -> Result<ClassSplit> {
        let mut classes = Vec::new();
        for listed in listed_classes(split) {
            let folder = class_folder(root, split, listed.wnid)?;
            let mut files = sorted_files(&folder, IMAGE_EXTENSIONS)?;
            if files.is_empty() {
                return Err(DataError::EmptyFolder {
                    path: folder,
                    expected: "JPEG or PNG images".into(),
                });
            }
            if let Some(limit) = options.images_per_class {
                files.truncate(limit);
            }
            let first = paths.len() as u32;
            let images = (first..first + files.len() as u32).collect();
            paths.extend(files);
            classes.push(FewShotClass {
                name: listed.wnid.to_string(),
                group: listed.category.to_string(),
                images,
                rotation: Rotation::R0,
            });
        }
        Ok(ClassSplit {
            name: split.to_string(),
            classes,
            random_rotation: false,
        })
    };
    let train = read_split(SplitName::Train)?;
    let val = read_split(SplitName::Val)?;
    let test = read_split(SplitName::Test)?;

    let sources: Vec<SourceFile> = paths
        .into_par_iter()
        .map(|path| SourceFile::stat(root, path))
        .collect::<Result<_>>()?;
    let (store, status) =
        cache::load_or_decode("tiered-imagenet", &options.cache, &pre, &sources, None)?;
    let dataset = FewShotDataset {
        name: "tiered-imagenet".into(),
        store: Arc::new(store),
        train,
        val,
        test,
    };
    Ok((dataset, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashSet;

    /// Writes `per_class` small JPEGs of a distinct colour for every listed
    /// class, under `root/<wnid>/` (or `root/<split>/<wnid>/` when `by_split`).
    fn write_fixture(root: &Path, per_class: usize, by_split: bool) {
        for split in [SplitName::Train, SplitName::Val, SplitName::Test] {
            for (class, listed) in listed_classes(split).iter().enumerate() {
                let dir = match by_split {
                    true => root.join(split.to_string()).join(listed.wnid),
                    false => root.join(listed.wnid),
                };
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..per_class {
                    let red = (class % 256) as u8;
                    let image =
                        image::RgbImage::from_pixel(12, 8, image::Rgb([red, 40 * i as u8, 200]));
                    image
                        .save(dir.join(format!("{}_{i}.JPEG", listed.wnid)))
                        .unwrap();
                }
            }
        }
    }

    fn uncached() -> TieredImageNetOptions {
        TieredImageNetOptions {
            image_size: 6,
            images_per_class: None,
            cache: CacheOptions::disabled(),
        }
    }

    #[test]
    fn split_lists_have_the_standard_sizes_and_share_no_category() {
        let mut seen_classes = HashSet::new();
        let mut categories_of_splits = Vec::new();
        for (split, classes, categories) in [
            (SplitName::Train, 351, 20),
            (SplitName::Val, 97, 6),
            (SplitName::Test, 160, 8),
        ] {
            let listed = listed_classes(split);
            assert_eq!(listed.len(), classes, "{split}");
            let categories_here: HashSet<_> = listed.iter().map(|c| c.category).collect();
            assert_eq!(categories_here.len(), categories, "{split}");
            assert!(listed.iter().all(|c| seen_classes.insert(c.wnid)));
            categories_of_splits.push(categories_here);
        }
        assert_eq!(seen_classes.len(), 608);
        for (i, a) in categories_of_splits.iter().enumerate() {
            for b in &categories_of_splits[i + 1..] {
                assert!(a.is_disjoint(b));
            }
        }
    }

    #[test]
    fn loads_both_layouts_with_categories_as_groups() {
        for by_split in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_fixture(dir.path(), 2, by_split);
            // A class of ImageNet that tieredImageNet does not use is ignored.
            std::fs::create_dir_all(dir.path().join("n99999999")).unwrap();
            let (data, status) = load(dir.path(), &uncached()).unwrap();
            assert_eq!(status, CacheStatus::Disabled);
            assert_eq!(data.store.len(), 608 * 2);
            assert_eq!(data.store.shape(), (3, 6, 6));
            assert_eq!(data.class_counts(), [351, 97, 160]);
            let first = &data.train.classes[0];
            assert_eq!(
                (first.name.as_str(), first.group.as_str()),
                ("n01530575", "n01524359")
            );
            assert_eq!(first.images, [0, 1]);
            // Test class 3 (its list's fourth line) has red 3, blue 200, resized.
            let class = &data.test.classes[3];
            let pixels = data.store.image(class.images[0] as usize);
            assert!(
                pixels[..36].iter().all(|&r| r.abs_diff(3) <= 2),
                "{pixels:?}"
            );
            assert!(pixels[72..].iter().all(|&b| b.abs_diff(200) <= 2));
        }
    }

    #[test]
    fn images_per_class_keeps_the_first_files_and_the_cache_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), 3, false);
        let cache_dir = tempfile::tempdir().unwrap();
        let options = TieredImageNetOptions {
            image_size: 4,
            images_per_class: Some(2),
            cache: CacheOptions::in_dir(cache_dir.path()),
        };
        let (first, status) = load(dir.path(), &options).unwrap();
        assert_eq!(status, CacheStatus::Miss);
        assert_eq!(first.store.len(), 608 * 2);
        // Green is 40 * i: the kept images are files _0 and _1.
        let green = |data: &FewShotDataset, image: u32| data.store.image(image as usize)[16];
        assert_eq!([green(&first, 0), green(&first, 1)], [0, 40]);
        let (second, status) = load(dir.path(), &options).unwrap();
        assert_eq!(status, CacheStatus::Hit);
        assert_eq!(first.store, second.store);
    }

    #[test]
    fn missing_class_folder_corrupt_image_and_bad_options_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), 1, false);
        std::fs::remove_dir_all(dir.path().join("n02099267")).unwrap();
        let err = load(dir.path(), &uncached()).unwrap_err();
        assert!(matches!(err, DataError::MissingDataset { .. }));
        assert!(err.to_string().contains("n02099267"), "{err}");

        std::fs::create_dir(dir.path().join("n02099267")).unwrap();
        let err = load(dir.path(), &uncached()).unwrap_err().to_string();
        assert!(
            err.contains("n02099267") && err.contains("no JPEG or PNG images"),
            "{err}"
        );

        let corrupt = dir.path().join("n02099267").join("broken.JPEG");
        std::fs::write(&corrupt, b"not a jpeg").unwrap();
        let err = load(dir.path(), &uncached()).unwrap_err().to_string();
        assert!(
            err.contains("broken.JPEG") && err.contains("cannot decode"),
            "{err}"
        );

        let options = TieredImageNetOptions {
            images_per_class: Some(0),
            ..uncached()
        };
        let err = load(dir.path(), &options).unwrap_err().to_string();
        assert!(err.contains("images_per_class"), "{err}");
        let err = load(&dir.path().join("absent"), &uncached()).unwrap_err();
        assert!(matches!(err, DataError::MissingDataset { .. }));
    }
}
