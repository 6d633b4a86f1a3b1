//! The user's own images: a folder per class, optionally grouped into
//! `train/`, `val/` and `test/`, or a flat folder of query images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::locate::{sorted_files, sorted_subdirs};
use crate::preprocess::{decode_files, Preprocess};
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};
use crate::store::ImageStore;

/// The formats our `image` build decodes.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];
const IMAGES: &str = "images (.png, .jpg or .jpeg)";

/// Loads `dir`, which holds one sub-folder of images per class. Classes are
/// sorted by folder name, images by file name.
pub fn load_class_folder(dir: &Path, pre: &Preprocess) -> Result<(ImageStore, ClassSplit)> {
    pre.validate()?;
    let mut paths = Vec::new();
    let split = list_split(dir, &folder_name(dir), &mut paths)?;
    Ok((decode_files(&paths, pre)?, split))
}

/// A dataset of class folders under `root/train`, `root/val` and `root/test`.
pub struct ImageFolderDataset;

impl ImageFolderDataset {
    /// Loads every split folder that exists; a missing one is an empty split.
    pub fn load(root: &Path, pre: &Preprocess) -> Result<FewShotDataset> {
        pre.validate()?;
        if !root.is_dir() {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "folder does not exist");
            return Err(DataError::io(root, source));
        }
        if SplitName::ALL
            .iter()
            .all(|s| !root.join(s.as_str()).is_dir())
        {
            return Err(DataError::EmptyFolder {
                path: root.to_path_buf(),
                expected:
                    "train/, val/ or test/ folders, each with one sub-folder of images per class"
                        .into(),
            });
        }
        let mut paths = Vec::new();
        let mut split = |name: SplitName| {
            let dir = root.join(name.as_str());
            if dir.is_dir() {
                list_split(&dir, name.as_str(), &mut paths)
            } else {
                Ok(ClassSplit::empty(name.as_str()))
            }
        };
        let (train, val, test) = (
            split(SplitName::Train)?,
            split(SplitName::Val)?,
            split(SplitName::Test)?,
        );
        Ok(FewShotDataset {
            name: folder_name(root),
            store: Arc::new(decode_files(&paths, pre)?),
            train,
            val,
            test,
        })
    }
}

/// The channels of a folder's images as the files are: 3 when any image
/// under `dir` (in its class folders, or in the class folders of its
/// `train/`, `val/` and `test/`) is in colour, else 1. Reads each file's
/// header only.
pub fn folder_channels(dir: &Path) -> Result<usize> {
    let mut files = Vec::new();
    let split_dirs: Vec<PathBuf> = SplitName::ALL
        .iter()
        .map(|s| dir.join(s.as_str()))
        .filter(|d| d.is_dir())
        .collect();
    let class_roots = match split_dirs.is_empty() {
        true => vec![dir.to_path_buf()],
        false => split_dirs,
    };
    // The walk the loaders take, with their errors for empty folders.
    for root in class_roots {
        list_split(&root, &folder_name(&root), &mut files)?;
    }
    for path in &files {
        if color_type(path)?.has_color() {
            return Ok(3);
        }
    }
    Ok(1)
}

/// A file's colour type, from its header.
fn color_type(path: &Path) -> Result<image::ColorType> {
    let image_error = |e: image::ImageError| DataError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let decoder = reader.into_decoder().map_err(image_error)?;
    Ok(image::ImageDecoder::color_type(&decoder))
}

/// Every image directly in `dir` (sorted by name), e.g. queries to classify.
pub fn load_image_files(dir: &Path, pre: &Preprocess) -> Result<(Vec<PathBuf>, ImageStore)> {
    pre.validate()?;
    let paths = sorted_files(dir, IMAGE_EXTENSIONS)?;
    if paths.is_empty() {
        return Err(DataError::EmptyFolder {
            path: dir.to_path_buf(),
            expected: IMAGES.into(),
        });
    }
    let store = decode_files(&paths, pre)?;
    Ok((paths, store))
}

/// The classes of a class folder; their image files are appended to
/// `paths`, whose positions become the image indices.
fn list_split(dir: &Path, name: &str, paths: &mut Vec<PathBuf>) -> Result<ClassSplit> {
    let class_dirs = sorted_subdirs(dir)?;
    if class_dirs.is_empty() {
        return Err(DataError::EmptyFolder {
            path: dir.to_path_buf(),
            expected: "class folders (one sub-folder of images per class)".into(),
        });
    }
    let mut classes = Vec::with_capacity(class_dirs.len());
    for (class_name, class_dir) in class_dirs {
        let files = sorted_files(&class_dir, IMAGE_EXTENSIONS)?;
        if files.is_empty() {
            return Err(DataError::EmptyFolder {
                path: class_dir,
                expected: IMAGES.into(),
            });
        }
        let start = paths.len();
        paths.extend(files);
        classes.push(FewShotClass {
            name: class_name,
            group: String::new(),
            images: (start as u32..paths.len() as u32).collect(),
            rotation: Rotation::R0,
        });
    }
    Ok(ClassSplit {
        name: name.to_string(),
        classes,
        random_rotation: false,
    })
}

fn folder_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
