//! Few-shot learning data: datasets, class splits and seeded N-way K-shot
//! episode sampling.
//!
//! A loader ([`Omniglot`], [`mini_imagenet`], [`tiered_imagenet`], [`cifar100`], [`cub`],
//! [`folder`], [`synthetic`])
//! decodes every image once into an [`ImageStore`] and describes the classes
//! of each split as lists of image indices ([`ClassSplit`]). An
//! [`EpisodeSampler`] then draws [`Episode`]s from a split; episode `i` of a
//! seed is the same on every machine and thread count.
//!
//! ```no_run
//! use fewshot_data::{dataset_root, EpisodeSampler, EpisodeSpec, Omniglot, OmniglotOptions};
//! # fn main() -> fewshot_data::Result<()> {
//! let root = dataset_root("omniglot", None)?;
//! let omniglot = Omniglot::load(&root, &OmniglotOptions::default())?;
//! let data = omniglot.vinyals()?;
//! let spec = EpisodeSpec { ways: 5, shots: 1, queries: 15, same_group: false };
//! let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), spec, 42)?;
//! let episode = sampler.episode(0);
//! assert_eq!(episode.support_labels, [0, 1, 2, 3, 4]);
//! # Ok(())
//! # }
//! ```

pub mod augment;
pub mod cache;
pub mod cifar100;
pub mod cub;
pub mod episode;
pub mod error;
pub mod fetch;
pub mod folder;
pub mod locate;
pub mod mini_imagenet;
pub mod normalization;
pub mod omniglot;
pub mod preprocess;
pub mod rng;
pub mod split;
pub mod store;
pub mod support_copies;
pub mod synthetic;
pub mod tiered_imagenet;

pub use augment::{Affine, Augmentation};
pub use cache::{CacheOptions, CacheStatus};
pub use cifar100::Cifar100Split;
pub use cub::CubOptions;
pub use episode::{Episode, EpisodeClass, EpisodeSampler, EpisodeSpec};
pub use error::{DataError, Result};
pub use folder::{folder_channels, load_class_folder, load_image_files, ImageFolderDataset};
pub use locate::{dataset_root, how_to_get};
pub use mini_imagenet::MiniImageNetOptions;
pub use normalization::Normalization;
pub use omniglot::{Character, Omniglot, OmniglotOptions, OmniglotSet};
pub use preprocess::{Preprocess, Resampling};
pub use rng::Rng;
pub use split::{rotate_into, ClassSplit, FewShotClass, FewShotDataset, Rotation, SplitName};
pub use store::ImageStore;
pub use support_copies::SupportCopies;
pub use synthetic::SyntheticOptions;
pub use tiered_imagenet::TieredImageNetOptions;
