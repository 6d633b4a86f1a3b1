//! Turns a config's data section into a loaded dataset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fewshot_data::{
    cifar100, cub, dataset_root, folder_channels, mini_imagenet, synthetic, CacheOptions,
    CacheStatus, Cifar100Split, CubOptions, EpisodeSampler, FewShotDataset, ImageFolderDataset,
    Normalization, Omniglot, OmniglotOptions, Preprocess, TieredImageNetOptions,
};

use crate::config::{DataConfig, DatasetKind, ExperimentConfig, OmniglotSplit};

/// A dataset with its class splits, and how long loading took.
pub struct Loaded {
    pub dataset: FewShotDataset,
    /// Omniglot's characters, for the per-convention counts of `data inspect`.
    pub omniglot: Option<Omniglot>,
    /// What the load did with the decoded-image cache; `None` where there is none.
    pub cache: Option<CacheStatus>,
    pub load_time: Duration,
}

pub fn cache_options(config: &DataConfig) -> CacheOptions {
    match (&config.cache, &config.cache_dir) {
        (false, _) => CacheOptions::disabled(),
        (true, Some(dir)) => CacheOptions::in_dir(dir),
        (true, None) => CacheOptions::default(),
    }
}

/// Loads the dataset of `config`; `seed` picks MAML's character split.
pub fn load(config: &DataConfig, seed: u64) -> Result<Loaded> {
    let start = Instant::now();
    let image_size = config.image_size();
    let cache = cache_options(config);
    let (mut dataset, omniglot, cache) = match config.dataset {
        DatasetKind::Omniglot => {
            let root = dataset_root("omniglot", config.root.as_deref())?;
            let options = OmniglotOptions {
                image_size,
                resampling: config.resampling,
                cache,
            };
            let omniglot = Omniglot::load(&root, &options)?;
            let dataset = match config.split {
                OmniglotSplit::Vinyals => omniglot.vinyals()?,
                OmniglotSplit::Maml => omniglot.maml(seed),
                OmniglotSplit::Lake => {
                    omniglot.lake_with_validation(config.validation_alphabets, seed)?
                }
            };
            let status = omniglot.cache;
            (dataset, Some(omniglot), Some(status))
        }
        DatasetKind::MiniImagenet => {
            let root = dataset_root("mini-imagenet", config.root.as_deref())?;
            let options = mini_imagenet::MiniImageNetOptions { image_size, cache };
            let (dataset, status) = mini_imagenet::load_with_status(&root, &options)?;
            (dataset, None, Some(status))
        }
        DatasetKind::TieredImagenet => {
            let root = dataset_root("tiered-imagenet", config.root.as_deref())?;
            let options = TieredImageNetOptions {
                image_size,
                images_per_class: config.images_per_class,
                cache,
            };
            let (dataset, status) = fewshot_data::tiered_imagenet::load(&root, &options)?;
            (dataset, None, Some(status))
        }
        DatasetKind::CifarFs | DatasetKind::Fc100 => {
            let root = dataset_root("cifar100", config.root.as_deref())?;
            let split = match config.dataset {
                DatasetKind::CifarFs => Cifar100Split::CifarFs,
                _ => Cifar100Split::Fc100,
            };
            (cifar100::load(&root, split, image_size)?, None, None)
        }
        DatasetKind::Cub => {
            let root = dataset_root("cub", config.root.as_deref())?;
            let options = CubOptions {
                image_size,
                crop: config.crop.unwrap_or(true),
                cache,
            };
            let (dataset, status) = cub::load(&root, &options)?;
            (dataset, None, Some(status))
        }
        DatasetKind::Folder => (
            ImageFolderDataset::load(folder_root(config)?, &preprocess(config)?)?,
            None,
            None,
        ),
        DatasetKind::Synthetic => {
            let options = synthetic::SyntheticOptions {
                image_size,
                seed,
                ..Default::default()
            };
            (synthetic::generate(&options)?, None, None)
        }
    };
    if let Some(normalization) = normalization(config)? {
        let store = Arc::unwrap_or_clone(dataset.store).with_normalization(Some(normalization));
        dataset.store = Arc::new(store.context("field `data.normalize`")?);
    }
    let mut dataset = if config.train_with_val {
        dataset.with_val_in_train()?
    } else {
        dataset
    };
    if config.rotation_classes {
        dataset.train = dataset.train.with_rotation_classes()?;
    }
    Ok(Loaded {
        dataset,
        omniglot,
        cache,
        load_time: start.elapsed(),
    })
}

/// The config's `data.normalize`, resolved.
pub fn normalization(config: &DataConfig) -> Result<Option<Normalization>> {
    config.normalize.as_ref().map(|n| n.resolve()).transpose()
}

/// The sampler of training episodes: the train split, the training spec and
/// seed, and the config's augmentation (training episodes only).
pub fn training_sampler(
    config: &ExperimentConfig,
    data: &FewShotDataset,
) -> Result<EpisodeSampler> {
    let sampler = EpisodeSampler::new(
        data.store.clone(),
        data.train.clone(),
        config.train_episodes.spec(),
        config.seed,
    )
    .context("training episodes")?;
    match &config.data.augment {
        Some(augment) => sampler
            .with_augmentation(augment.clone())
            .context("field `data.augment`"),
        None => Ok(sampler),
    }
}

/// The `folder` dataset's folder, which has no default.
fn folder_root(config: &DataConfig) -> Result<&std::path::Path> {
    config
        .root
        .as_deref()
        .context("field `data.root`: the folder dataset needs its folder")
}

/// How the images of `config`'s dataset are decoded (also what `predict`
/// applies to a user's own images, so they match what the model was trained
/// on): Omniglot grey and inverted (its files are black ink on white; the
/// models see ink as 1), the photograph datasets in colour, synthetic glyphs
/// grey, a folder as its config says (channels by default as the files are,
/// no inversion).
pub fn preprocess(config: &DataConfig) -> Result<Preprocess> {
    let channels = match config.declared_channels() {
        Some(channels) => channels,
        None => folder_channels(folder_root(config)?)?,
    };
    Ok(Preprocess {
        size: config.image_size(),
        channels,
        invert: config.dataset == DatasetKind::Omniglot || config.invert,
        resampling: config.resampling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_with_val_trains_on_every_class_but_the_test_ones() {
        let config = DataConfig::default();
        let plain = load(&config, 3).unwrap().dataset;
        let merged = load(
            &DataConfig {
                train_with_val: true,
                ..config
            },
            3,
        )
        .unwrap()
        .dataset;
        assert!(!plain.val.classes.is_empty());
        assert_eq!(
            merged.train.classes.len(),
            plain.train.classes.len() + plain.val.classes.len()
        );
        assert!(merged.val.classes.is_empty());
        assert_eq!(merged.test, plain.test);
    }

    #[test]
    fn a_folder_is_read_in_its_files_colours_and_inverted_on_request() {
        let dir = tempfile::tempdir().unwrap();
        for (split, class, colour) in [("train", "a", [255, 255, 255]), ("test", "b", [250, 0, 0])]
        {
            let path = dir.path().join(split).join(class).join("0.png");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::RgbImage::from_pixel(4, 4, image::Rgb(colour))
                .save(&path)
                .unwrap();
        }
        let mut config = DataConfig {
            dataset: DatasetKind::Folder,
            root: Some(dir.path().to_path_buf()),
            image_size: Some(4),
            ..DataConfig::default()
        };
        // PNGs saved as RGB count as colour even where they look grey: the
        // file says so. One red image would be enough.
        assert_eq!(preprocess(&config).unwrap().channels, 3);
        let store = load(&config, 0).unwrap().dataset.store;
        assert_eq!(store.shape(), (3, 4, 4));
        assert_eq!(store.image(1)[0], 250);

        config.channels = Some(1);
        config.invert = true;
        let store = load(&config, 0).unwrap().dataset.store;
        assert_eq!(store.shape(), (1, 4, 4));
        assert_eq!(store.image(0)[0], 0, "white inverted is 0");
    }

    #[test]
    fn normalisation_reaches_every_episode_and_must_fit_the_channels() {
        use crate::config::NormalizeSetting;

        let values = Normalization {
            mean: vec![0.5],
            std: vec![0.25],
        };
        let config = DataConfig {
            normalize: Some(NormalizeSetting::Values(values.clone())),
            ..DataConfig::default()
        };
        let data = load(&config, 0).unwrap().dataset;
        assert_eq!(data.store.normalization(), Some(&values));
        let sampler = fewshot_data::EpisodeSampler::new(
            data.store.clone(),
            data.test.clone(),
            fewshot_data::EpisodeSpec {
                ways: 2,
                shots: 1,
                queries: 1,
                same_group: false,
            },
            0,
        )
        .unwrap();
        let episode = sampler.episode(0);
        let tensors = fewshot_backbone::EpisodeTensors::from_episode(
            &episode,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let first: Vec<f32> = tensors.support.flatten_all().unwrap().to_vec1().unwrap();
        for (byte, value) in episode.support.iter().zip(&first) {
            assert!((value - (*byte as f32 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        }

        // ImageNet's three channels do not fit grey glyphs.
        let config = DataConfig {
            normalize: Some(NormalizeSetting::Named("imagenet".into())),
            ..DataConfig::default()
        };
        let err = format!("{:#}", load(&config, 0).err().unwrap());
        assert!(
            err.contains("data.normalize") && err.contains("1 channel"),
            "{err}"
        );
    }
}
