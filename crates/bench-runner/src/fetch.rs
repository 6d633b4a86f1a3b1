//! `fewshot data fetch`: a dataset downloaded from the Hugging Face hub into
//! the folder the loaders read (the download itself needs the cargo feature
//! `download`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fewshot_data::fetch::{fetch, FetchEvent, FetchOptions, Manifest};

/// The folders `fetch` can fill, as `FEWSHOT_DATA_DIR` holds them.
pub const DATASET_FOLDERS: [&str; 5] = [
    "omniglot",
    "mini-imagenet",
    "tiered-imagenet",
    "cifar100",
    "cub",
];

/// Where the dataset folder goes: `--root`, else `$FEWSHOT_DATA_DIR`.
fn data_dir(root: Option<&Path>) -> Result<PathBuf> {
    match (root, std::env::var_os(fewshot_data::locate::DATA_DIR_ENV)) {
        (Some(root), _) => Ok(root.to_path_buf()),
        (None, Some(dir)) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => bail!(
            "where to put the dataset? Pass --root DIR or set {} (the folder that holds one \
             sub-folder per dataset)",
            fewshot_data::locate::DATA_DIR_ENV
        ),
    }
}

/// Fetches `dataset` (a folder name of [`DATASET_FOLDERS`]) with its
/// built-in manifest or `manifest`; a build without the `download` feature
/// fails as an unreachable hub does, saying how to rebuild.
pub fn run(
    dataset: &str,
    root: Option<&Path>,
    manifest_file: Option<&Path>,
    endpoint: Option<String>,
) -> Result<()> {
    let manifest = match manifest_file {
        Some(path) => Manifest::from_file(path)?,
        None => match Manifest::builtin(dataset) {
            Some(manifest) => manifest?,
            None => bail!(
                "no hub manifest comes with fewshot for {dataset} yet: pass --manifest FILE \
                 (its format is in datasets/README.md), or get the data by hand:\n{}",
                fewshot_data::how_to_get(dataset)
            ),
        },
    };
    if manifest.dataset != dataset {
        let origin =
            manifest_file.map_or("the built-in manifest".into(), |p| p.display().to_string());
        bail!(
            "{origin}: field `dataset` is {:?}, but --dataset asks for {dataset:?}",
            manifest.dataset
        );
    }
    let root = data_dir(root)?;
    std::fs::create_dir_all(&root).with_context(|| format!("{}", root.display()))?;
    let total: u64 = manifest.files.iter().map(|f| f.size).sum();
    tracing::info!(
        "fetching {dataset} ({} files, {:.1} MB) from {} at {}",
        manifest.files.len(),
        total as f64 / 1e6,
        manifest.repo,
        manifest.revision
    );
    let options = FetchOptions {
        endpoint,
        ..FetchOptions::default()
    };
    let bar = crate::progress::bar(total, "fetch");
    // Bytes of the files before the current one, for one bar over all files.
    let mut finished_bytes = 0;
    let folder = fetch(&manifest, &root, &options, &mut |event| match event {
        FetchEvent::Downloading { file, done, .. } => {
            bar.set_message(file.to_string());
            bar.set_position(finished_bytes + done);
        }
        FetchEvent::Verified { file, size } => {
            finished_bytes += size;
            bar.set_position(finished_bytes);
            tracing::info!("{file}: checksum verified");
        }
        FetchEvent::Unpacking { file } => bar.set_message(format!("unpacking {file}")),
    });
    bar.finish_and_clear();
    // A hub that cannot be reached (a repository not there, a build without
    // the `download` feature) leaves the manual way, which always works.
    let folder = match folder {
        Err(error @ fewshot_data::DataError::Download { .. }) => bail!(
            "{error}\nOr get {dataset} by hand:\n{}",
            fewshot_data::how_to_get(dataset)
        ),
        other => other?,
    };
    println!(
        "{dataset} is in {}; check it with: fewshot data inspect --dataset {}",
        folder.display(),
        match dataset {
            "cifar100" => "cifar-fs",
            other => other,
        }
    );
    Ok(())
}
