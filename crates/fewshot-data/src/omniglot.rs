//! Omniglot (Lake et al. 2015): 1,623 handwritten characters from 50
//! alphabets, 20 drawings each, and the three ways papers split them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cache::{self, CacheOptions, CacheStatus, SourceFile};
use crate::error::{DataError, Result};
use crate::locate::{missing_dataset, sorted_files, sorted_subdirs};
use crate::preprocess::{Preprocess, Resampling};
use crate::rng::Rng;
use crate::split::{ClassSplit, FewShotClass, FewShotDataset, Rotation};
use crate::store::ImageStore;

/// Rng stream of the MAML split's shuffle, kept apart from episode streams.
const MAML_SPLIT_STREAM: u64 = 0x4D41_4D4C; // "MAML"
const LAKE_VALIDATION_STREAM: u64 = 0x4C41_4B45; // "LAKE"

/// Options of [`Omniglot::load`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OmniglotOptions {
    /// Width and height after resizing: 28 in most papers, 105 is the native size.
    pub image_size: usize,
    /// Default: area averaging (grey strokes); `Nearest` gives the binary
    /// images the reference code of MAML and Prototypical Networks saw.
    pub resampling: Resampling,
    pub cache: CacheOptions,
}

impl Default for OmniglotOptions {
    fn default() -> Self {
        OmniglotOptions {
            image_size: 28,
            resampling: Resampling::Area,
            cache: CacheOptions::default(),
        }
    }
}

/// The two halves Omniglot is published in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OmniglotSet {
    /// `images_background/`: 30 alphabets, 964 characters.
    Background,
    /// `images_evaluation/`: 20 alphabets, 659 characters.
    Evaluation,
}

impl OmniglotSet {
    pub fn folder(self) -> &'static str {
        match self {
            OmniglotSet::Background => "images_background",
            OmniglotSet::Evaluation => "images_evaluation",
        }
    }
}

/// One character: all drawings of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Character {
    pub alphabet: String,
    /// The folder name, e.g. `character01`.
    pub name: String,
    pub set: OmniglotSet,
    /// Indices into [`Omniglot::store`].
    pub images: Vec<u32>,
}

impl Character {
    /// `Alphabet/characterNN`, as the split files name it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.alphabet, self.name)
    }
}

/// All of Omniglot, decoded: 1 channel, strokes 255 on a 0 background.
#[derive(Clone, Debug)]
pub struct Omniglot {
    pub root: PathBuf,
    pub store: Arc<ImageStore>,
    /// Background set first, then evaluation; alphabets and characters sorted by name.
    pub characters: Vec<Character>,
    /// Whether this load read the cache.
    pub cache: CacheStatus,
}

/// A character folder found on disk, before its files are listed.
struct CharacterDir {
    set: OmniglotSet,
    alphabet: String,
    name: String,
    dir: PathBuf,
}

impl Omniglot {
    /// Reads `root/images_background` and `root/images_evaluation`, from the
    /// cache when the files have not changed since it was written.
    pub fn load(root: &Path, options: &OmniglotOptions) -> Result<Omniglot> {
        let pre = Preprocess {
            size: options.image_size,
            channels: 1,
            invert: true,
            resampling: options.resampling,
        };
        pre.validate()?;
        if !root.is_dir() {
            return Err(missing_dataset("omniglot", root));
        }
        let dirs = character_dirs(root)?;

        // Listing and stat-ing 32k files one by one is slow on network and
        // overlay file systems; one task per character folder hides latency.
        let files: Vec<Vec<SourceFile>> = dirs
            .par_iter()
            .map(|c| {
                let pngs = sorted_files(&c.dir, &["png"])?;
                if pngs.is_empty() {
                    return Err(DataError::EmptyFolder {
                        path: c.dir.clone(),
                        expected: "PNG images".into(),
                    });
                }
                pngs.into_iter()
                    .map(|p| SourceFile::stat(root, p))
                    .collect()
            })
            .collect::<Result<_>>()?;

        let mut characters = Vec::with_capacity(dirs.len());
        let mut start = 0;
        for (dir, files) in dirs.into_iter().zip(&files) {
            let end = start + files.len();
            characters.push(Character {
                alphabet: dir.alphabet,
                name: dir.name,
                set: dir.set,
                images: (start as u32..end as u32).collect(),
            });
            start = end;
        }
        let sources: Vec<SourceFile> = files.into_iter().flatten().collect();
        let (store, cache) =
            cache::load_or_decode("omniglot", &options.cache, &pre, &sources, None)?;
        tracing::info!(
            characters = characters.len(),
            images = store.len(),
            ?cache,
            "loaded Omniglot from {}",
            root.display()
        );
        Ok(Omniglot {
            root: root.to_path_buf(),
            store: Arc::new(store),
            characters,
            cache,
        })
    }

    /// Number of distinct alphabets (50 in the full dataset).
    pub fn num_alphabets(&self) -> usize {
        let mut names: Vec<&str> = self
            .characters
            .iter()
            .map(|c| c.alphabet.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    /// The split of Vinyals et al. used by Matching and Prototypical
    /// Networks: each line `Alphabet/characterNN/rotDDD` of
    /// `root/splits/vinyals/{train,val,test}.txt` is a class of its own.
    pub fn vinyals(&self) -> Result<FewShotDataset> {
        let dir = self.root.join("splits").join("vinyals");
        if !dir.is_dir() {
            return Err(missing_dataset("omniglot", &dir));
        }
        let by_id: HashMap<String, &Character> =
            self.characters.iter().map(|c| (c.id(), c)).collect();
        let read = |name: &str| read_vinyals_file(&dir.join(format!("{name}.txt")), name, &by_id);
        Ok(FewShotDataset {
            name: "omniglot-vinyals".into(),
            store: Arc::clone(&self.store),
            train: read("train")?,
            val: read("val")?,
            test: read("test")?,
        })
    }

    /// The split of Finn et al.'s MAML code: all characters shuffled with
    /// `seed`, then 1,100 train, 100 val and 423 test (the same proportions
    /// when the dataset has other than 1,623 characters). Rotations are not
    /// classes here but augmentation: every split draws one per class per episode.
    pub fn maml(&self, seed: u64) -> FewShotDataset {
        let n = self.characters.len();
        let mut order: Vec<usize> = (0..n).collect();
        Rng::seed_from(seed, MAML_SPLIT_STREAM).shuffle(&mut order);
        let test = (n * 423 + 1623 / 2) / 1623;
        let val = (n * 100 + 1623 / 2) / 1623;
        let train = n - test - val;
        let split = |name: &str, picked: &[usize]| ClassSplit {
            name: name.into(),
            classes: picked
                .iter()
                .map(|&i| self.class(&self.characters[i]))
                .collect(),
            random_rotation: true,
        };
        FewShotDataset {
            name: "omniglot-maml".into(),
            store: Arc::clone(&self.store),
            train: split("train", &order[..train]),
            val: split("val", &order[train..train + val]),
            test: split("test", &order[train + val..]),
        }
    }

    /// Lake et al.'s split: background set for training, evaluation set for
    /// testing. The protocol has no validation classes, so `val` is empty.
    pub fn lake(&self) -> FewShotDataset {
        let split = |name: &str, set: OmniglotSet| ClassSplit {
            name: name.into(),
            classes: self
                .characters
                .iter()
                .filter(|c| c.set == set)
                .map(|c| self.class(c))
                .collect(),
            random_rotation: false,
        };
        FewShotDataset {
            name: "omniglot-lake".into(),
            store: Arc::clone(&self.store),
            train: split("train", OmniglotSet::Background),
            val: ClassSplit::empty("val"),
            test: split("test", OmniglotSet::Evaluation),
        }
    }

    /// Lake's split with `alphabets` background alphabets, drawn with
    /// `seed`, held out for validation: the model is chosen on characters of
    /// the background set it did not train on, and the evaluation set stays
    /// unseen until the test. With 0 alphabets this is [`Omniglot::lake`].
    pub fn lake_with_validation(&self, alphabets: usize, seed: u64) -> Result<FewShotDataset> {
        let mut background: Vec<&str> = self
            .characters
            .iter()
            .filter(|c| c.set == OmniglotSet::Background)
            .map(|c| c.alphabet.as_str())
            .collect();
        background.dedup();
        if alphabets >= background.len() {
            return Err(DataError::InvalidSpec {
                field: "validation_alphabets",
                value: alphabets.to_string(),
                reason: format!(
                    "the background set has {} alphabets, and training needs at least one",
                    background.len()
                ),
            });
        }
        Rng::seed_from(seed, LAKE_VALIDATION_STREAM).shuffle(&mut background);
        let held_out = &background[..alphabets];
        if alphabets > 0 {
            tracing::info!(
                alphabets = held_out.join(", "),
                "Lake split: background alphabets held out for validation"
            );
        }
        let mut dataset = self.lake();
        let (val, train): (Vec<FewShotClass>, Vec<FewShotClass>) =
            std::mem::take(&mut dataset.train.classes)
                .into_iter()
                .partition(|c| held_out.contains(&c.group.as_str()));
        dataset.train.classes = train;
        dataset.val = ClassSplit {
            name: "val".into(),
            classes: val,
            random_rotation: false,
        };
        Ok(dataset)
    }

    fn class(&self, character: &Character) -> FewShotClass {
        FewShotClass {
            name: character.id(),
            group: character.alphabet.clone(),
            images: character.images.clone(),
            rotation: Rotation::R0,
        }
    }
}

/// Every `<set>/<Alphabet>/<characterNN>` folder, in a fixed order.
fn character_dirs(root: &Path) -> Result<Vec<CharacterDir>> {
    let mut dirs = Vec::new();
    for set in [OmniglotSet::Background, OmniglotSet::Evaluation] {
        let set_dir = root.join(set.folder());
        if !set_dir.is_dir() {
            return Err(missing_dataset("omniglot", &set_dir));
        }
        let before = dirs.len();
        for (alphabet, alphabet_dir) in sorted_subdirs(&set_dir)? {
            for (name, dir) in sorted_subdirs(&alphabet_dir)? {
                dirs.push(CharacterDir {
                    set,
                    alphabet: alphabet.clone(),
                    name,
                    dir,
                });
            }
        }
        if dirs.len() == before {
            return Err(DataError::EmptyFolder {
                path: set_dir,
                expected: "character folders (<Alphabet>/<characterNN>/)".into(),
            });
        }
    }
    Ok(dirs)
}

/// One Vinyals split file: a class per line `Alphabet/characterNN/rotDDD`.
fn read_vinyals_file(
    file: &Path,
    split: &str,
    by_id: &HashMap<String, &Character>,
) -> Result<ClassSplit> {
    let text = std::fs::read_to_string(file).map_err(|e| DataError::io(file, e))?;
    let mut classes = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |message: String| DataError::SplitLine {
            file: file.to_path_buf(),
            line: index + 1,
            message,
        };
        let (id, rot) = line.rsplit_once('/').ok_or_else(|| {
            bad(format!(
                "expected Alphabet/characterNN/rotDDD, got {line:?}"
            ))
        })?;
        let rotation = rot
            .strip_prefix("rot")
            .and_then(|d| d.parse().ok())
            .and_then(Rotation::from_degrees)
            .ok_or_else(|| {
                bad(format!(
                    "expected rot000, rot090, rot180 or rot270, got {rot:?}"
                ))
            })?;
        let character = by_id.get(id).ok_or_else(|| {
            bad(format!(
                "unknown character {id:?}: not in images_background or images_evaluation"
            ))
        })?;
        classes.push(FewShotClass {
            name: line.to_string(),
            group: character.alphabet.clone(),
            images: character.images.clone(),
            rotation,
        });
    }
    Ok(ClassSplit {
        name: split.into(),
        classes,
        random_rotation: false,
    })
}
