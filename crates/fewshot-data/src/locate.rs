//! Where datasets live: finding a dataset's folder, telling the user how to
//! get the data when it is missing, and listing folders in a stable order.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Environment variable naming the folder that holds `omniglot/`, `mini-imagenet/`, ...
pub const DATA_DIR_ENV: &str = "FEWSHOT_DATA_DIR";

/// The folder of `dataset` ("omniglot", "mini-imagenet", "tiered-imagenet",
/// "cifar100" or "cub"): `explicit` if given, else `$FEWSHOT_DATA_DIR/<dataset>`. A folder that does not exist
/// gives [`DataError::MissingDataset`] with instructions.
pub fn dataset_root(dataset: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if !matches!(
        dataset,
        "omniglot" | "mini-imagenet" | "tiered-imagenet" | "cifar100" | "cub"
    ) {
        return Err(DataError::InvalidSpec {
            field: "dataset",
            value: dataset.to_string(),
            reason: "expected omniglot, mini-imagenet, tiered-imagenet, cifar100 or cub".into(),
        });
    }
    let root = match (explicit, std::env::var_os(DATA_DIR_ENV)) {
        (Some(path), _) => path.to_path_buf(),
        (None, Some(dir)) if !dir.is_empty() => PathBuf::from(dir).join(dataset),
        (None, _) => {
            let placeholder = PathBuf::from(format!("${DATA_DIR_ENV}/{dataset}"));
            let mut error = missing_dataset(dataset, &placeholder);
            if let DataError::MissingDataset { help, .. } = &mut error {
                *help = format!("{DATA_DIR_ENV} is not set and no path was given.\n{help}");
            }
            return Err(error);
        }
    };
    if root.is_dir() {
        Ok(root)
    } else {
        Err(missing_dataset(dataset, &root))
    }
}

/// A [`DataError::MissingDataset`] for `path` (the dataset folder or a part
/// of it that should exist) with step-by-step instructions.
pub(crate) fn missing_dataset(dataset: &str, path: &Path) -> DataError {
    DataError::MissingDataset {
        dataset: dataset.to_string(),
        path: path.to_path_buf(),
        help: how_to_get(dataset),
    }
}

/// Step-by-step instructions to get `dataset` by hand (one of the folder
/// names [`dataset_root`] takes).
pub fn how_to_get(dataset: &str) -> String {
    match dataset {
        "omniglot" => omniglot_help(),
        "cifar100" => cifar100_help(),
        "cub" => cub_help(),
        "tiered-imagenet" => tiered_imagenet_help(),
        _ => mini_imagenet_help(),
    }
}

fn omniglot_help() -> String {
    format!(
        "To get Omniglot (MIT licence):\n\
         1. Download images_background.zip and images_evaluation.zip from \
         https://github.com/brendenlake/omniglot (folder python/).\n\
         2. Unzip both into one folder named omniglot/, giving \
         omniglot/images_background/<Alphabet>/<characterNN>/*.png and \
         omniglot/images_evaluation/<Alphabet>/<characterNN>/*.png.\n\
         3. For the Vinyals split, copy train.txt, val.txt, test.txt and trainval.txt from \
         https://github.com/jakesnell/prototypical-networks (data/omniglot/splits/vinyals/) \
         into omniglot/splits/vinyals/.\n\
         4. Set {DATA_DIR_ENV} to the folder that holds omniglot/, or pass the omniglot \
         folder explicitly."
    )
}

fn mini_imagenet_help() -> String {
    format!(
        "miniImageNet is read in the Ravi & Larochelle layout:\n\
         mini-imagenet/images/<filename> (84x84 JPEGs; other sizes are resized) and \
         mini-imagenet/train.csv, val.csv, test.csv (or mini-imagenet/splits/*.csv) with a \
         header `filename,label` and one row per image.\n\
         The split files are in https://github.com/twitter/meta-learning-lstm \
         (data/miniImagenet/); the images come from ImageNet (ILSVRC-2012), which you must \
         obtain under its terms of access.\n\
         Then set {DATA_DIR_ENV} to the folder that holds mini-imagenet/, or pass the \
         mini-imagenet folder explicitly."
    )
}

fn tiered_imagenet_help() -> String {
    format!(
        "tieredImageNet is read from ImageNet's own layout, one folder per class named by its \
         WordNet id:\n\
         tiered-imagenet/<wnid>/*.JPEG (or tiered-imagenet/<train|val|test>/<wnid>/*).\n\
         1. Obtain ILSVRC-2012 under ImageNet's terms of access (https://image-net.org).\n\
         2. Make tiered-imagenet/ the training images' folder (ILSVRC2012_img_train, one folder \
         per class, a link will do): the 608 classes of the split lists that come with this \
         project are read, any other is ignored.\n\
         3. Set {DATA_DIR_ENV} to the folder that holds tiered-imagenet/, or pass the \
         tiered-imagenet folder explicitly."
    )
}

fn cifar100_help() -> String {
    format!(
        "CIFAR-FS and FC100 are read from CIFAR-100's binary version:\n\
         1. Download cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html.\n\
         2. Unpack it and rename its folder cifar-100-binary/ to cifar100/, giving \
         cifar100/train.bin, test.bin, fine_label_names.txt and coarse_label_names.txt.\n\
         3. Set {DATA_DIR_ENV} to the folder that holds cifar100/, or pass the cifar100 \
         folder explicitly. The class splits come with this project."
    )
}

fn cub_help() -> String {
    format!(
        "To get CUB-200-2011:\n\
         1. Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ \
         (Caltech's data page).\n\
         2. Unpack it and rename its folder CUB_200_2011/ to cub/, giving cub/images/<NNN.Species>/*.jpg, \
         cub/images.txt and cub/bounding_boxes.txt.\n\
         3. Set {DATA_DIR_ENV} to the folder that holds cub/, or pass the cub folder explicitly. \
         The species splits come with this project."
    )
}

/// Entries of `dir` in byte order of their names, skipping hidden ones
/// (`.DS_Store`, `.ipynb_checkpoints`, ...), as (name, path, is_dir).
fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symbolic links, unlike DirEntry::file_type.
        let is_dir = path.is_dir();
        entries.push((name, path, is_dir));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Sub-folders of `dir`, sorted by name, as (name, path).
pub(crate) fn sorted_subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|(_, _, is_dir)| *is_dir)
        .map(|(name, path, _)| (name, path))
        .collect())
}

/// Files of `dir` whose extension is one of `extensions` (lowercase;
/// matched case-insensitively), sorted by name.
pub(crate) fn sorted_files(dir: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|(_, path, is_dir)| {
            let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
            !is_dir && ext.is_some_and(|ext| extensions.contains(&ext.as_str()))
        })
        .map(|(_, path, _)| path)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_wins_and_missing_path_explains_how_to_get_the_data() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            dataset_root("omniglot", Some(dir.path())).unwrap(),
            dir.path()
        );

        let missing = dir.path().join("nope");
        let err = dataset_root("omniglot", Some(&missing)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DataError::MissingDataset { .. }));
        for needle in [
            "nope",
            "images_background.zip",
            "images_evaluation.zip",
            "github.com/brendenlake/omniglot",
            "splits/vinyals",
            "github.com/jakesnell/prototypical-networks",
            DATA_DIR_ENV,
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        let text = dataset_root("mini-imagenet", Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("images/") && text.contains("train.csv"),
            "{text}"
        );
        assert!(dataset_root("cifar", None).is_err());
    }

    #[test]
    fn listings_are_sorted_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b", "a", ".hidden"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        for name in ["z.PNG", "y.jpg", "notes.txt", ".x.png"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let dirs: Vec<String> = sorted_subdirs(dir.path())
            .unwrap()
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(dirs, ["a", "b"]);
        let files = sorted_files(dir.path(), &["png", "jpg"]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["y.jpg", "z.PNG"]);
    }
}
