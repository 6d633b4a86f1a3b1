//! Experiment configs: one JSON file per experiment.
//!
//! Every section rejects unknown (misspelt) fields with the field's path, and
//! every missing field takes the default documented here and in
//! `docs/CONFIG.md`; `fewshot config --defaults` prints them all.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fewshot_backbone::DeviceChoice;
use fewshot_data::{
    Augmentation, EpisodeSpec, Normalization, Resampling, SplitName, SupportCopies,
};
use serde::{Deserialize, Serialize};

use crate::learners;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    /// Names the run directory. Default `"experiment"`.
    pub name: String,
    /// Seeds weights, class splits and training episodes. Default 0.
    pub seed: u64,
    /// `auto | cpu | cuda[:N] | metal`. Default `auto`.
    pub device: String,
    pub data: DataConfig,
    /// Episodes for meta-training. Default 5-way 1-shot 15-query.
    pub train_episodes: EpisodeConfig,
    /// Episodes for validation and test; ways and shots may differ from training.
    /// Default 5-way 1-shot 15-query.
    pub test_episodes: EpisodeConfig,
    pub training: TrainingConfig,
    pub evaluation: EvaluationConfig,
    /// The learner's own section: `{"name": "...", ...hyperparameters}`, checked
    /// by the learner's crate. Default `{}` (no learner: data-only commands).
    pub algorithm: serde_json::Map<String, serde_json::Value>,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            seed: 0,
            device: "auto".into(),
            data: DataConfig::default(),
            train_episodes: EpisodeConfig::default(),
            test_episodes: EpisodeConfig::default(),
            training: TrainingConfig::default(),
            evaluation: EvaluationConfig::default(),
            algorithm: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Omniglot,
    MiniImagenet,
    /// 608 ImageNet classes split 351 / 97 / 160 by super-category (Ren et al.).
    TieredImagenet,
    /// CIFAR-100's classes split 64 / 16 / 20 (Bertinetto et al.).
    CifarFs,
    /// CIFAR-100's superclasses split 12 / 4 / 4 (Oreshkin et al.).
    Fc100,
    /// CUB-200-2011's bird species split 100 / 50 / 50, each image cut to
    /// its bounding box (unless `crop` is false).
    Cub,
    /// `root` holds `train/`, `val/`, `test/`, each with one folder per class.
    Folder,
    /// Built-in procedurally drawn glyphs: needs no files.
    Synthetic,
}

impl DatasetKind {
    pub fn default_image_size(self) -> usize {
        match self {
            Self::MiniImagenet | Self::TieredImagenet | Self::Cub => 84,
            Self::CifarFs | Self::Fc100 => 32,
            Self::Omniglot | Self::Folder | Self::Synthetic => 28,
        }
    }
}

/// Omniglot's class split conventions (see `../shared/SPEC.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OmniglotSplit {
    /// Vinyals et al.: split files, every rotation of a character a class.
    Vinyals,
    /// Finn et al.: seeded 1100/100/423 characters, random rotations per task.
    Maml,
    /// Lake et al.: background set to train, evaluation set to test.
    Lake,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Default `synthetic`.
    pub dataset: DatasetKind,
    /// The dataset folder. Default: `$FEWSHOT_DATA_DIR/<dataset>`.
    pub root: Option<PathBuf>,
    /// Omniglot only. Default `vinyals`.
    pub split: OmniglotSplit,
    /// Side of the square images. Default 28 (84 for miniImageNet,
    /// tieredImageNet and CUB, 32 for CIFAR-FS and FC100).
    pub image_size: Option<usize>,
    /// `tiered-imagenet` only: keep the first this many images of each
    /// class (the whole dataset is 16.5 GB at 84x84). Default: all.
    pub images_per_class: Option<usize>,
    /// `cub` only: cut each photograph to its bird's bounding box before
    /// resizing, as the few-shot papers do. Default true.
    pub crop: Option<bool>,
    /// `folder` only: 1 (grey) or 3 (RGB). Default: as the files are, 3 when
    /// any image is in colour, else 1 (`train` writes the count it found
    /// into the run's config, so `eval` and `predict` read images as the
    /// model was trained on them).
    pub channels: Option<usize>,
    /// `folder` only: replace every pixel value v by 255 - v, for dark
    /// strokes on a light background (Omniglot's models expect ink as high
    /// values). Default false.
    pub invert: bool,
    /// `omniglot` and `folder` only: how images are resized. `"area"`
    /// (default): each pixel averages its source area (grey strokes).
    /// `"nearest"`: the nearest source pixel, as Pillow resizes 1-bit images
    /// whatever filter is asked for; what the MAML and Prototypical
    /// Networks reference code saw (binary 28x28 Omniglot characters).
    pub resampling: Resampling,
    /// Train on the validation classes too, leaving none to validate on:
    /// Prototypical Networks' final protocol, and for Vinyals' Omniglot
    /// split the 1,200 training characters of the Meta Networks paper. The
    /// run then tests its last checkpoint. Default false.
    pub train_with_val: bool,
    /// Omniglot's Lake split only: this many background alphabets, drawn
    /// with the experiment seed, held out as validation classes (the
    /// protocol itself has none). Default 0.
    pub validation_alphabets: usize,
    /// Each training class also in its three other rotations, as classes of
    /// their own (Vinyals' way to quadruple Omniglot's classes), for splits
    /// whose classes are unrotated (Lake's). Default false.
    pub rotation_classes: bool,
    /// Random affine distortions of every training image (never of
    /// validation or test images); `{}` takes Koch et al.'s distribution,
    /// see docs/CONFIG.md. Default none.
    pub augment: Option<Augmentation>,
    /// How pixel bytes become network inputs: `"imagenet"` (torchvision's
    /// ImageNet mean and std) or `{"mean": [...], "std": [...]}`, one value
    /// per channel, in the units of `v / 255`. Default none: `v / 255`, in
    /// [0, 1], as MAML's and Prototypical Networks' reference code reads images.
    pub normalize: Option<NormalizeSetting>,
    /// Keep decoded images in a cache for fast reloads. Default true.
    pub cache: bool,
    /// Default: `$FEWSHOT_CACHE_DIR`, else the user's cache folder.
    pub cache_dir: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Synthetic,
            root: None,
            split: OmniglotSplit::Vinyals,
            image_size: None,
            images_per_class: None,
            crop: None,
            channels: None,
            invert: false,
            resampling: Resampling::Area,
            train_with_val: false,
            validation_alphabets: 0,
            rotation_classes: false,
            augment: None,
            normalize: None,
            cache: true,
            cache_dir: None,
        }
    }
}

impl DataConfig {
    pub fn image_size(&self) -> usize {
        self.image_size
            .unwrap_or_else(|| self.dataset.default_image_size())
    }

    /// The images' channels as far as the config tells them: a folder's,
    /// when not given, only its files can tell (`datasets::preprocess`).
    pub fn declared_channels(&self) -> Option<usize> {
        match (self.dataset, self.channels) {
            (_, Some(channels)) => Some(channels),
            (
                DatasetKind::MiniImagenet
                | DatasetKind::TieredImagenet
                | DatasetKind::CifarFs
                | DatasetKind::Fc100
                | DatasetKind::Cub,
                None,
            ) => Some(3),
            (DatasetKind::Omniglot | DatasetKind::Synthetic, None) => Some(1),
            (DatasetKind::Folder, None) => None,
        }
    }
}

/// `data.normalize`: a named set of statistics or the values themselves.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum NormalizeSetting {
    /// `"imagenet"`.
    Named(String),
    Values(Normalization),
}

/// A name, else the values, whose own error (a missing `std`) is kept.
impl<'de> Deserialize<'de> for NormalizeSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(name) => Ok(Self::Named(name)),
            values => serde_json::from_value(values)
                .map(Self::Values)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl NormalizeSetting {
    pub fn resolve(&self) -> Result<Normalization> {
        match self {
            Self::Named(name) if name == "imagenet" => Ok(Normalization::imagenet()),
            Self::Named(name) => bail!(
                "field `data.normalize`: {name:?} is not a known set of statistics; use \
                 \"imagenet\" or {{\"mean\": [...], \"std\": [...]}}"
            ),
            Self::Values(values) => Ok(values.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpisodeConfig {
    pub ways: usize,
    pub shots: usize,
    pub queries: usize,
    /// Draw all classes of an episode from one alphabet (Lake's protocol).
    pub same_group: bool,
}

impl Default for EpisodeConfig {
    fn default() -> Self {
        Self {
            ways: 5,
            shots: 1,
            queries: 15,
            same_group: false,
        }
    }
}

impl EpisodeConfig {
    pub fn spec(&self) -> EpisodeSpec {
        EpisodeSpec {
            ways: self.ways,
            shots: self.shots,
            queries: self.queries,
            same_group: self.same_group,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Meta-training steps. Default 10,000.
    pub steps: u64,
    /// Episodes per step. Default 4.
    pub meta_batch: usize,
    /// Validate every this many steps. Default 500.
    pub validate_every: u64,
    /// Validation episodes each time. Default 200.
    pub validation_episodes: usize,
    /// A checkpoint of the same algorithm to start from instead of fresh
    /// weights: the weights whose names and shapes match are copied (all but
    /// the output heads when the way count differs), the optimiser starts
    /// fresh. Relative to the current folder. Default none.
    pub init_from: Option<PathBuf>,
    /// How many of the best validated checkpoints to keep. Default 1:
    /// `checkpoints/best.safetensors` alone. More also keeps that many in
    /// `checkpoints/validated/`, for `fewshot eval RUN --ensemble` (MAML++'s
    /// reference tests its 5 best). It changes what is kept, not the
    /// training, so a stopped run may resume with another value.
    #[serde(skip_serializing_if = "keeps_only_the_best")]
    pub keep_best: usize,
}

fn keeps_only_the_best(keep_best: &usize) -> bool {
    *keep_best == 1
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            steps: 10_000,
            meta_batch: 4,
            validate_every: 500,
            validation_episodes: 200,
            init_from: None,
            keep_best: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationConfig {
    /// Test episodes. Default 1,000 (ProtoNets' protocol; MAML's is 600).
    pub episodes: usize,
    /// Seeds the test episodes, the same for every learner. Default 1234.
    pub seed: u64,
    /// Default `test`.
    pub split: SplitName,
    /// Test-time augmentation: distorted copies of every support image join
    /// each test episode and each `predict` (validation stays plain).
    /// Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub support_copies: Option<SupportCopies>,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            episodes: 1000,
            seed: 1234,
            split: SplitName::Test,
            support_copies: None,
        }
    }
}

impl ExperimentConfig {
    /// Reads and checks a config; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let mut config: Self =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    anyhow::anyhow!("{inner}")
                } else {
                    anyhow::anyhow!("field `{path}`: {inner}")
                }
            })?;
        config.validate()?;
        config.fill_learner_section()?;
        Ok(config)
    }

    /// Fills the learner's image shape and way counts from the data and
    /// episode sections, or checks them against those
    /// (`learners::take_shared_fields`).
    pub fn fill_learner_section(&mut self) -> Result<()> {
        let facts = learners::ExperimentFacts {
            channels: self.data.declared_channels(),
            image_size: self.data.image_size(),
            train_ways: self.train_episodes.ways,
            test_ways: self.test_episodes.ways,
        };
        learners::take_shared_fields(&mut self.algorithm, facts)
    }

    pub fn validate(&self) -> Result<()> {
        self.device_choice()?;
        for (section, episodes) in [
            ("train_episodes", &self.train_episodes),
            ("test_episodes", &self.test_episodes),
        ] {
            if episodes.ways < 2 {
                bail!(
                    "field `{section}.ways`: {} is too few; an episode needs at least 2 classes",
                    episodes.ways
                );
            }
            if episodes.shots < 1 {
                bail!("field `{section}.shots`: must be at least 1");
            }
            if episodes.queries < 1 {
                bail!("field `{section}.queries`: must be at least 1");
            }
        }
        if self.data.image_size() == 0 {
            bail!("field `data.image_size`: must be at least 1");
        }
        let folder = self.data.dataset == DatasetKind::Folder;
        match self.data.channels {
            Some(channels) if !folder => bail!(
                "field `data.channels`: {channels} set, but only the `folder` dataset takes it \
                 ({:?} is read as its papers read it)",
                self.data.dataset
            ),
            Some(channels) if channels != 1 && channels != 3 => {
                bail!("field `data.channels`: {channels}; must be 1 (grey) or 3 (RGB)")
            }
            _ => {}
        }
        if self.data.invert && !folder {
            bail!(
                "field `data.invert`: set, but only the `folder` dataset takes it ({:?} is \
                 read as its papers read it)",
                self.data.dataset
            );
        }
        let resizes_as_asked = folder || self.data.dataset == DatasetKind::Omniglot;
        if self.data.resampling != Resampling::Area && !resizes_as_asked {
            bail!(
                "field `data.resampling`: {:?}, but only `omniglot` and `folder` take it \
                 ({:?} is resized as its papers resize it)",
                self.data.resampling,
                self.data.dataset
            );
        }
        if self.data.crop.is_some() && self.data.dataset != DatasetKind::Cub {
            bail!(
                "field `data.crop`: set, but only `cub` takes it (dataset {:?})",
                self.data.dataset
            );
        }
        match self.data.images_per_class {
            Some(_) if self.data.dataset != DatasetKind::TieredImagenet => bail!(
                "field `data.images_per_class`: set, but only `tiered-imagenet` takes it \
                 (dataset {:?})",
                self.data.dataset
            ),
            Some(0) => bail!("field `data.images_per_class`: must be at least 1"),
            _ => {}
        }
        let lake =
            self.data.dataset == DatasetKind::Omniglot && self.data.split == OmniglotSplit::Lake;
        if self.data.validation_alphabets > 0 && !lake {
            bail!(
                "field `data.validation_alphabets`: {} set, but only Omniglot's Lake split holds out alphabets (dataset {:?}, split {:?})",
                self.data.validation_alphabets,
                self.data.dataset,
                self.data.split
            );
        }
        if let Some(normalize) = &self.data.normalize {
            normalize.resolve()?;
        }
        if let Some(augment) = &self.data.augment {
            augment.validate().context("field `data.augment`")?;
        }
        if self.training.meta_batch == 0 {
            bail!("field `training.meta_batch`: must be at least 1");
        }
        if self.training.keep_best == 0 {
            bail!("field `training.keep_best`: must be at least 1 (the best checkpoint)");
        }
        if self.training.validate_every == 0 {
            bail!("field `training.validate_every`: must be at least 1");
        }
        if self.evaluation.episodes == 0 {
            bail!("field `evaluation.episodes`: must be at least 1");
        }
        if let Some(copies) = &self.evaluation.support_copies {
            copies.validate().context("field `evaluation`")?;
        }
        if !self.algorithm.is_empty() && !self.algorithm.contains_key("name") {
            bail!("field `algorithm.name`: missing; the algorithm section must name its learner");
        }
        Ok(())
    }

    pub fn device_choice(&self) -> Result<DeviceChoice> {
        self.device
            .parse()
            .with_context(|| "field `device`".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learner_section_takes_what_the_data_and_episodes_say() {
        let config = ExperimentConfig::from_json(
            r#"{"data": {"dataset": "mini-imagenet"}, "algorithm": {"name": "protonet"}}"#,
        )
        .unwrap();
        let embedding = &config.algorithm["embedding"];
        assert_eq!(
            (&embedding["in_channels"], &embedding["image_size"]),
            (&3.into(), &84.into())
        );
        let err = ExperimentConfig::from_json(
            r#"{"data": {"image_size": 105}, "algorithm": {"name": "maml", "network": {"image_size": 28}}}"#,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("algorithm.network.image_size"),
            "{err:#}"
        );
        let config = ExperimentConfig::from_json(
            r#"{"train_episodes": {"ways": 20}, "test_episodes": {"ways": 20}, "algorithm": {"name": "maml"}}"#,
        )
        .unwrap();
        assert_eq!(config.algorithm["ways"], 20);
    }

    #[test]
    fn empty_config_takes_documented_defaults() {
        let config = ExperimentConfig::from_json("{}").unwrap();
        assert_eq!(config, ExperimentConfig::default());
        assert_eq!(config.data.dataset, DatasetKind::Synthetic);
        assert_eq!(config.data.image_size(), 28);
        assert_eq!(config.train_episodes.ways, 5);
        assert_eq!(config.evaluation.episodes, 1000);
        // An empty augment section is Koch et al.'s distribution.
        let config = ExperimentConfig::from_json(r#"{"data": {"augment": {}}}"#).unwrap();
        assert_eq!(config.data.augment, Some(Augmentation::default()));
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let config = ExperimentConfig::from_json(
            r#"{"data": {"dataset": "mini-imagenet"}, "training": {"steps": 7}}"#,
        )
        .unwrap();
        assert_eq!(config.data.image_size(), 84);
        assert_eq!(config.training.steps, 7);
        assert_eq!(config.training.meta_batch, 4);
    }

    #[test]
    fn misspelt_fields_are_named_with_their_path() {
        let err = ExperimentConfig::from_json(r#"{"training": {"stpes": 7}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("training.stpes") && err.contains("steps"),
            "{err}"
        );
        let err = ExperimentConfig::from_json(r#"{"seeed": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("seeed"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (json, needles) in [
            (
                r#"{"data": {"dataset": "imagenet"}}"#,
                &["data.dataset", "imagenet"][..],
            ),
            (r#"{"device": "gpu"}"#, &["gpu"]),
            (r#"{"training": {"keep_best": 0}}"#, &["training.keep_best"]),
            (r#"{"test_episodes": {"ways": 1}}"#, &["test_episodes.ways"]),
            (
                r#"{"data": {"normalize": "cifar"}}"#,
                &["data.normalize", "cifar"],
            ),
            (
                r#"{"data": {"normalize": {"mean": [0.5]}}}"#,
                &["data.normalize", "std"],
            ),
            (
                r#"{"data": {"images_per_class": 600}}"#,
                &["data.images_per_class", "tiered-imagenet"],
            ),
            (r#"{"data": {"crop": false}}"#, &["data.crop", "cub"]),
            (
                r#"{"data": {"dataset": "tiered-imagenet", "images_per_class": 0}}"#,
                &["at least 1"],
            ),
            (
                r#"{"data": {"validation_alphabets": 3}}"#,
                &["data.validation_alphabets"],
            ),
            (
                r#"{"data": {"dataset": "folder", "channels": 2}}"#,
                &["data.channels"],
            ),
            (
                r#"{"data": {"dataset": "omniglot", "channels": 3}}"#,
                &["data.channels"],
            ),
            (
                r#"{"data": {"dataset": "synthetic", "invert": true}}"#,
                &["data.invert"],
            ),
            (
                r#"{"data": {"dataset": "mini-imagenet", "resampling": "nearest"}}"#,
                &["data.resampling"],
            ),
            (r#"{"data": {"resampling": "bicubic"}}"#, &["bicubic"]),
            (
                r#"{"data": {"augment": {"probability": 2}}}"#,
                &["augment.probability"],
            ),
            (
                r#"{"data": {"augment": {"rotaton": 2}}}"#,
                &["data.augment.rotaton"],
            ),
            (
                r#"{"evaluation": {"support_copies": {"copies": 0}}}"#,
                &["support_copies.copies"],
            ),
            (
                r#"{"evaluation": {"support_copies": {}}}"#,
                &["evaluation.support_copies"],
            ),
            (r#"{"algorithm": {"lr": 1}}"#, &["algorithm.name"]),
        ] {
            let err = format!("{:#}", ExperimentConfig::from_json(json).unwrap_err());
            assert!(needles.iter().all(|n| err.contains(n)), "{json}: {err}");
        }
        ExperimentConfig::from_json(
            r#"{"data": {"dataset": "folder", "channels": 3, "invert": true}}"#,
        )
        .unwrap();
        let imagenet = ExperimentConfig::from_json(r#"{"data": {"normalize": "imagenet"}}"#);
        assert_eq!(
            imagenet.unwrap().data.normalize.unwrap().resolve().unwrap(),
            Normalization::imagenet()
        );
        let cub = ExperimentConfig::from_json(r#"{"data": {"dataset": "cub", "crop": false}}"#);
        assert_eq!(cub.unwrap().data.crop, Some(false));
    }
}
