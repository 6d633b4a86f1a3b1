//! CUB-200-2011 (Wah et al. 2011): 11,788 photographs of 200 bird species,
//! split 100 / 50 / 50 species for few-shot learning (the lists in
//! `splits/cub/`, as torchmeta ships them). Each image is cut to its bird's
//! bounding box (the few-shot papers' "84x84 crops"), unless told not to,
//! then resized.
//!
//! The files as the archive `CUB_200_2011.tgz` unpacks, its folder renamed
//! `cub/`: `images/<NNN.Species>/<file>.jpg`, `images.txt` (`id path` a
//! line) and `bounding_boxes.txt` (`id x y width height`, in pixels).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::cache::{self, CacheOptions, CacheStatus, Fnv1a, SourceFile};
use crate::error::{DataError, Result};
use crate::locate::missing_dataset;
use crate::preprocess::{CropBox, Preprocess, Resampling};
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};

/// Options of [`load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CubOptions {
    /// Width and height after resizing (84 in the papers).
    pub image_size: usize,
    /// Cut each image to its bounding box first.
    pub crop: bool,
    pub cache: CacheOptions,
}

impl Default for CubOptions {
    fn default() -> Self {
        Self {
            image_size: 84,
            crop: true,
            cache: CacheOptions::default(),
        }
    }
}

/// Loads the 200 species into the three splits.
pub fn load(root: &Path, options: &CubOptions) -> Result<(FewShotDataset, CacheStatus)> {
    let pre = Preprocess {
        size: options.image_size,
        channels: 3,
        invert: false,
        resampling: Resampling::Area,
    };
    pre.validate()?;
    let images_list = root.join("images.txt");
    let boxes_list = root.join("bounding_boxes.txt");
    for required in [root.to_path_buf(), root.join("images"), images_list.clone()] {
        if !required.exists() {
            return Err(missing_dataset("cub", &required));
        }
    }
    let mut images = read_lines(&images_list, |id, rest| Ok((id, PathBuf::from(rest))))?;
    images.sort_by_key(|(id, _)| *id);
    let boxes: HashMap<u64, CropBox> = match options.crop {
        true => {
            if !boxes_list.is_file() {
                return Err(missing_dataset("cub", &boxes_list));
            }
            read_lines(&boxes_list, |id, rest| {
                let values: Vec<f64> = rest
                    .split_whitespace()
                    .map(|v| {
                        v.parse::<f64>()
                            .map_err(|_| format!("{v:?} is not a number"))
                    })
                    .collect::<std::result::Result<_, String>>()?;
                match values[..] {
                    [x, y, w, h] if w > 0.0 && h > 0.0 => Ok((id, [x, y, w, h])),
                    _ => Err(format!("expected x y width height, got {rest:?}")),
                }
            })?
            .into_iter()
            .collect()
        }
        false => HashMap::new(),
    };

    // Species from the image paths, in the order of the split lists.
    let mut species_images: HashMap<String, Vec<u32>> = HashMap::new();
    for (index, (_, path)) in images.iter().enumerate() {
        let species = path
            .parent()
            .and_then(|p| p.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| DataError::SplitLine {
                file: images_list.clone(),
                line: index + 1,
                message: format!("{path:?} is not in a species folder"),
            })?;
        species_images
            .entry(species.to_string())
            .or_default()
            .push(index as u32);
    }
    let split = |name: SplitName| -> Result<ClassSplit> {
        let list = match name {
            SplitName::Train => include_str!("../splits/cub/train.txt"),
            SplitName::Val => include_str!("../splits/cub/val.txt"),
            SplitName::Test => include_str!("../splits/cub/test.txt"),
        };
        let classes = list
            .lines()
            .filter(|l| !l.is_empty())
            .map(|species| match species_images.get(species) {
                Some(indices) => Ok(FewShotClass {
                    name: species.to_string(),
                    group: String::new(),
                    images: indices.clone(),
                    rotation: Rotation::R0,
                }),
                None => Err(DataError::InvalidSpec {
                    field: "species",
                    value: species.to_string(),
                    reason: format!(
                        "in the {name} split but no image of it in {}",
                        images_list.display()
                    ),
                }),
            })
            .collect::<Result<_>>()?;
        Ok(ClassSplit {
            name: name.to_string(),
            classes,
            random_rotation: false,
        })
    };
    let (train, val, test) = (
        split(SplitName::Train)?,
        split(SplitName::Val)?,
        split(SplitName::Test)?,
    );

    let images_dir = root.join("images");
    let sources: Vec<SourceFile> = images
        .par_iter()
        .map(|(_, path)| SourceFile::stat(root, images_dir.join(path)))
        .collect::<Result<_>>()?;
    let crop_boxes: Vec<Option<CropBox>> = images
        .iter()
        .map(|(id, _)| match options.crop {
            true => boxes
                .get(id)
                .copied()
                .map(Some)
                .ok_or_else(|| DataError::InvalidSpec {
                    field: "bounding box",
                    value: format!("image {id}"),
                    reason: format!("missing from {}", boxes_list.display()),
                }),
            false => Ok(None),
        })
        .collect::<Result<_>>()?;
    // The boxes decide the pixels as much as the files do: they are part of
    // the cache's identity, so an edited box list is never served stale.
    let mut identity = Fnv1a::new();
    for b in crop_boxes.iter().flatten() {
        b.iter().for_each(|v| identity.bytes(&v.to_le_bytes()));
    }
    let kind = match options.crop {
        true => format!("cub-crop-{:016x}", identity.0),
        false => "cub".to_string(),
    };
    let (store, status) =
        cache::load_or_decode(&kind, &options.cache, &pre, &sources, Some(&crop_boxes))?;
    let dataset = FewShotDataset {
        name: "cub".into(),
        store: Arc::new(store),
        train,
        val,
        test,
    };
    Ok((dataset, status))
}

/// Every non-empty line of `path` as `id rest`, through `parse`, whose
/// error message is given the file and line.
fn read_lines<T>(
    path: &Path,
    parse: impl Fn(u64, &str) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(index, line)| {
            let bad = |message: String| DataError::SplitLine {
                file: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let (id, rest) = line
                .trim()
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad(format!("expected `id value`, got {line:?}")))?;
            let id = id
                .parse()
                .map_err(|_| bad(format!("{id:?} is not an image id")))?;
            parse(id, rest.trim()).map_err(bad)
        })
        .collect()
}
