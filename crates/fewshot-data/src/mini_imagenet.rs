//! miniImageNet (Vinyals et al. 2016) in the Ravi & Larochelle layout:
//! `images/<filename>` plus `train.csv`, `val.csv`, `test.csv` with rows
//! `filename,label` (64 / 16 / 20 classes of 600 images).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cache::{self, CacheOptions, CacheStatus, SourceFile};
use crate::error::{DataError, Result};
use crate::locate::missing_dataset;
use crate::preprocess::{Preprocess, Resampling};
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};

/// Options of [`load`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MiniImageNetOptions {
    /// Width and height after resizing (84 in the papers).
    pub image_size: usize,
    pub cache: CacheOptions,
}

impl Default for MiniImageNetOptions {
    fn default() -> Self {
        MiniImageNetOptions {
            image_size: 84,
            cache: CacheOptions::default(),
        }
    }
}

/// Loads all three splits into one RGB store. Classes are the labels in
/// the order they first appear in each CSV file.
pub fn load(root: &Path, options: &MiniImageNetOptions) -> Result<FewShotDataset> {
    load_with_status(root, options).map(|(dataset, _)| dataset)
}

/// [`load`], also telling whether the images came from the cache.
pub fn load_with_status(
    root: &Path,
    options: &MiniImageNetOptions,
) -> Result<(FewShotDataset, CacheStatus)> {
    let pre = Preprocess {
        size: options.image_size,
        channels: 3,
        invert: false,
        resampling: Resampling::Area,
    };
    pre.validate()?;
    let images_dir = root.join("images");
    for required in [root, images_dir.as_path()] {
        if !required.is_dir() {
            return Err(missing_dataset("mini-imagenet", required));
        }
    }

    // Every row's image goes into one store, split after split.
    let mut rows: Vec<String> = Vec::new();
    let mut read_split = |split: SplitName| -> Result<ClassSplit> {
        let (classes, filenames) = read_csv(&find_csv(root, split)?, split, rows.len())?;
        rows.extend(filenames);
        Ok(classes)
    };
    let train = read_split(SplitName::Train)?;
    let val = read_split(SplitName::Val)?;
    let test = read_split(SplitName::Test)?;
    // A missing image fails here, naming the file, before any decoding.
    let sources: Vec<SourceFile> = rows
        .par_iter()
        .map(|name| SourceFile::stat(root, images_dir.join(name)))
        .collect::<Result<_>>()?;
    let (store, status) =
        cache::load_or_decode("mini-imagenet", &options.cache, &pre, &sources, None)?;

    let dataset = FewShotDataset {
        name: "mini-imagenet".into(),
        store: Arc::new(store),
        train,
        val,
        test,
    };
    Ok((dataset, status))
}

/// `root/<split>.csv`, or `root/splits/<split>.csv` as this project's shared folder has it.
fn find_csv(root: &Path, split: SplitName) -> Result<PathBuf> {
    let name = format!("{split}.csv");
    let candidates = [root.join(&name), root.join("splits").join(&name)];
    match candidates.iter().find(|p| p.is_file()) {
        Some(path) => Ok(path.clone()),
        None => Err(missing_dataset("mini-imagenet", &candidates[0])),
    }
}

/// The classes of one CSV file and its image file names in row order;
/// image indices start at `first_index`.
fn read_csv(
    file: &Path,
    split: SplitName,
    first_index: usize,
) -> Result<(ClassSplit, Vec<String>)> {
    let text = std::fs::read_to_string(file).map_err(|e| DataError::io(file, e))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let bad = |index: usize, message: String| DataError::SplitLine {
        file: file.to_path_buf(),
        line: index + 1,
        message,
    };
    match lines.next() {
        Some((_, header)) if header.trim_start_matches('\u{feff}').trim() == "filename,label" => {}
        Some((index, header)) => {
            return Err(bad(
                index,
                format!("expected the header filename,label, got {header:?}"),
            ))
        }
        None => {
            return Err(bad(
                0,
                "empty file, expected the header filename,label".into(),
            ))
        }
    }

    let mut classes: Vec<FewShotClass> = Vec::new();
    let mut class_of_label: HashMap<String, usize> = HashMap::new();
    let mut filenames = Vec::new();
    for (index, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [filename, label] = fields[..] else {
            return Err(bad(
                index,
                format!("expected 2 fields filename,label, got {line:?}"),
            ));
        };
        if label.is_empty() {
            return Err(bad(index, format!("empty label in {line:?}")));
        }
        // A plain file name: no folders, nothing that leaves images/.
        if filename.is_empty() || Path::new(filename).file_name() != Some(OsStr::new(filename)) {
            return Err(bad(index, format!("{filename:?} is not a plain file name")));
        }
        let class = *class_of_label.entry(label.to_string()).or_insert_with(|| {
            classes.push(FewShotClass {
                name: label.to_string(),
                group: String::new(),
                images: Vec::new(),
                rotation: Rotation::R0,
            });
            classes.len() - 1
        });
        classes[class]
            .images
            .push((first_index + filenames.len()) as u32);
        filenames.push(filename.to_string());
    }
    let split = ClassSplit {
        name: split.to_string(),
        classes,
        random_rotation: false,
    };
    Ok((split, filenames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Result<(ClassSplit, Vec<String>)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.csv");
        std::fs::write(&path, text).unwrap();
        read_csv(&path, SplitName::Train, 10)
    }

    #[test]
    fn classes_follow_first_appearance() {
        let (split, files) = csv("filename,label\nb1.jpg,n2\na1.jpg,n1\nb2.jpg,n2\n\n").unwrap();
        let names: Vec<&str> = split.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["n2", "n1"]);
        assert_eq!(split.classes[0].images, [10, 12]);
        assert_eq!(split.classes[1].images, [11]);
        assert_eq!(files, ["b1.jpg", "a1.jpg", "b2.jpg"]);
    }

    #[test]
    fn malformed_rows_name_file_and_line() {
        for (text, line) in [
            ("filename,label\na.jpg,n1\nb.jpg\n", 3),
            ("filename,label\na.jpg,n1,extra\n", 2),
            ("filename,label\n../a.jpg,n1\n", 2),
            ("filename,label\na.jpg,\n", 2),
            ("name,class\na.jpg,n1\n", 1),
        ] {
            let err = csv(text).unwrap_err();
            assert!(
                matches!(err, DataError::SplitLine { line: l, .. } if l == line),
                "{text:?}: {err}"
            );
            assert!(
                err.to_string().contains(&format!("train.csv:{line}:")),
                "{err}"
            );
        }
    }
}
