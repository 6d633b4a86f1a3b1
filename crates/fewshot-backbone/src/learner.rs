//! The one trait every few-shot learner implements, and the episode tensors it
//! consumes. Evaluation, the runner, checkpoints and `predict` use nothing else,
//! so they never need to know which algorithm they drive.

use candle_core::{DType, Device, Tensor};
use fewshot_data::{Episode, Normalization};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::error::{BackboneError, Result};
use crate::ops;
use crate::params::{ParamSet, VarSet};

/// An episode on a device: images as the network reads them (see
/// [`images_to_tensor`]), labels 0..ways-1.
#[derive(Debug, Clone)]
pub struct EpisodeTensors {
    pub ways: usize,
    /// (ways * shots, C, H, W), class-major.
    pub support: Tensor,
    /// (ways * shots) u32.
    pub support_labels: Tensor,
    /// (queries, C, H, W).
    pub query: Tensor,
    /// (queries) u32; `None` when the queries are unlabelled (`predict`).
    pub query_labels: Option<Tensor>,
}

impl EpisodeTensors {
    pub fn from_episode(episode: &Episode, device: &Device, dtype: DType) -> Result<Self> {
        let norm = episode.normalization.as_ref();
        let images = |pixels: &[u8], count: usize| -> Result<Tensor> {
            images_to_tensor(pixels, count, episode.image_shape, norm, device, dtype)
        };
        let labels = |labels: &[u32]| Tensor::from_slice(labels, labels.len(), device);
        Ok(Self {
            ways: episode.spec.ways,
            support: images(&episode.support, episode.support_labels.len())?,
            support_labels: labels(&episode.support_labels)?,
            query: images(&episode.query, episode.query_labels.len())?,
            query_labels: Some(labels(&episode.query_labels)?),
        })
    }

    /// The query labels, or an error naming `purpose` when there are none.
    pub fn labels_for(&self, purpose: &str) -> Result<&Tensor> {
        self.query_labels
            .as_ref()
            .ok_or_else(|| BackboneError::InvalidConfig {
                field: "query_labels",
                value: "none".into(),
                reason: format!("{purpose} needs labelled queries"),
            })
    }
}

/// `count` images of `(c, h, w)` bytes as a (count, c, h, w) tensor: byte
/// `v` becomes `v / 255`, then `(v / 255 - mean[c]) / std[c]` where a
/// normalisation is given.
pub fn images_to_tensor(
    pixels: &[u8],
    count: usize,
    (c, h, w): (usize, usize, usize),
    normalization: Option<&Normalization>,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let scaled = (Tensor::from_slice(pixels, (count, c, h, w), device)?.to_dtype(dtype)? / 255.0)?;
    let Some(norm) = normalization else {
        return Ok(scaled);
    };
    norm.validate(c)?;
    let per_channel = |values: &[f32]| -> Result<Tensor> {
        Ok(Tensor::from_slice(values, (1, c, 1, 1), device)?.to_dtype(dtype)?)
    };
    Ok(scaled
        .broadcast_sub(&per_channel(&norm.mean)?)?
        .broadcast_div(&per_channel(&norm.std)?)?)
}

/// Loss and accuracy of one meta-training step, averaged over its episodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub accuracy: f64,
}

/// A few-shot learner.
pub trait Learner: Send + Sync {
    /// The algorithm's config name, e.g. `"maml"`.
    fn algorithm(&self) -> &'static str;

    /// The learner's full config; with [`Learner::state`] it rebuilds the learner.
    fn config(&self) -> serde_json::Value;

    /// One meta-training step on a meta-batch of episodes (updates the weights).
    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats>;

    /// Logits (queries x ways) for the episode's queries after adapting to its
    /// support set. Leaves the learner unchanged.
    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor>;

    /// Everything needed to resume: weights, and optimiser state under names
    /// starting with [`OPTIMIZER_PREFIX`].
    fn state(&self) -> Result<ParamSet>;

    /// Restores [`Learner::state`]; without optimiser entries the optimiser starts fresh.
    fn load_state(&mut self, state: &ParamSet) -> Result<()>;

    fn checkpoint(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            algorithm: self.algorithm().to_string(),
            config: self.config(),
            tensors: self.state()?,
            extra: Default::default(),
        })
    }
}

/// Names in [`Learner::state`] that start with this are optimiser state, which
/// a published model may leave out.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// Where an algorithm's config section keeps settings that the rest of an
/// experiment config states too (the images' shape, the episodes' way
/// count), so that a runner can fill them in from there, and a config says
/// each once, or refuse a contradiction by name. Each learner crate exports
/// its own as `SHARED_FIELDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFields {
    /// The object holding `in_channels` and `image_size`, as a JSON pointer
    /// into the section (`""`: the section itself).
    pub input: &'static str,
    /// The field that must equal the training episodes' way count (a
    /// classifier head as wide), if any.
    pub train_ways: Option<&'static str>,
    /// The field that must equal the test episodes' way count, if any.
    pub test_ways: Option<&'static str>,
}

/// Parses a config's `algorithm` section into an algorithm's hyperparameters;
/// the `name` field picks the algorithm and is not one of them.
///
/// Fields the section leaves out keep the algorithm's defaults, also inside
/// nested objects: `"optimizer": {"lr": 1e-4}` changes only the rate and keeps
/// the algorithm's gradient clip, where plain serde defaults would take the
/// nested type's own `Default` (Adam's, without clipping).
pub fn parse_algorithm_section<T: DeserializeOwned + Serialize + Default>(
    section: &serde_json::Value,
    algorithm: &'static str,
) -> Result<T> {
    let invalid = |reason: String| BackboneError::InvalidConfig {
        field: "algorithm",
        value: algorithm.into(),
        reason,
    };
    let mut section = section.clone();
    if let Some(map) = section.as_object_mut() {
        map.remove("name");
    }
    let mut merged = serde_json::to_value(T::default()).map_err(|e| invalid(e.to_string()))?;
    merge_onto(&mut merged, section);
    serde_json::from_value(merged).map_err(|e| invalid(e.to_string()))
}

/// Writes `overrides` onto `base`: objects field by field, anything else whole.
fn merge_onto(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(slot) => merge_onto(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overrides) => *base = overrides,
    }
}

/// Hyperparameters as an `algorithm` section, with its `name`: what
/// [`Learner::config`] returns and [`parse_algorithm_section`] reads back.
pub fn algorithm_section(
    hyperparameters: &impl Serialize,
    algorithm: &'static str,
) -> serde_json::Value {
    let mut section = serde_json::to_value(hyperparameters).unwrap_or_default();
    if let Some(map) = section.as_object_mut() {
        map.insert("name".into(), algorithm.into());
    }
    section
}

/// What one episode contributes to a meta-training step.
pub struct EpisodeGradient {
    /// Gradient of the episode's loss, detached.
    pub gradient: ParamSet,
    pub loss: f64,
    pub accuracy: f64,
}

impl EpisodeGradient {
    /// The contribution of an episode whose meta-loss is the mean
    /// cross-entropy of its query `logits`: the gradient at `weights`, the
    /// loss and the query accuracy (metric learners: eb-metanet, protonet).
    pub fn of_query_cross_entropy(
        weights: &VarSet,
        logits: &Tensor,
        episode: &EpisodeTensors,
    ) -> Result<Self> {
        let labels = episode.labels_for("meta-training")?;
        let loss = ops::cross_entropy(logits, labels)?;
        Ok(Self {
            gradient: weights.gradients(&loss.backward()?)?.detach(),
            loss: loss.to_scalar::<f32>()? as f64,
            accuracy: ops::accuracy(logits, labels)?,
        })
    }
}

/// Runs `episode_gradient` on every episode of a meta-batch in parallel (one
/// per core: candle's CPU ops use about one core on batches this small) and
/// averages: the meta-batch loss is the mean, so its gradient is the mean.
pub fn mean_over_episodes(
    batch: &[EpisodeTensors],
    episode_gradient: impl Fn(&EpisodeTensors) -> Result<EpisodeGradient> + Sync,
) -> Result<(ParamSet, StepStats)> {
    let (gradient, stats, _) =
        mean_over_episodes_with(batch, |episode| Ok((episode_gradient(episode)?, ())))?;
    Ok((gradient, stats))
}

/// As [`mean_over_episodes`], for a learner that also takes something else
/// from each episode's forward pass (batch-norm statistics, say): those come
/// back in the batch's order, whatever order the episodes ran in.
pub fn mean_over_episodes_with<T: Send>(
    batch: &[EpisodeTensors],
    episode_gradient: impl Fn(&EpisodeTensors) -> Result<(EpisodeGradient, T)> + Sync,
) -> Result<(ParamSet, StepStats, Vec<T>)> {
    let settings = crate::ops::path::ThreadSettings::capture();
    let results: Vec<Result<(EpisodeGradient, T)>> = batch
        .par_iter()
        .map(|episode| settings.run(|| episode_gradient(episode)))
        .collect();
    let scale = 1.0 / batch.len().max(1) as f64;
    let mut stats = StepStats {
        loss: 0.0,
        accuracy: 0.0,
    };
    let mut sum: Option<ParamSet> = None;
    let mut side_outputs = Vec::with_capacity(batch.len());
    for result in results {
        let (episode, side_output) = result?;
        stats.loss += episode.loss * scale;
        stats.accuracy += episode.accuracy * scale;
        sum = Some(match sum {
            None => episode.gradient.scale(scale)?,
            Some(sum) => sum.add_scaled(&episode.gradient, scale)?,
        });
        side_outputs.push(side_output);
    }
    let gradient = sum.ok_or_else(|| BackboneError::InvalidConfig {
        field: "meta_batch",
        value: "0".into(),
        reason: "a training step needs at least one episode".into(),
    })?;
    Ok((gradient, stats, side_outputs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        rate: f64,
        clip: Option<f64>,
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                rate: 1.0,
                clip: None,
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        width: usize,
        inner: Inner,
    }

    impl Default for Outer {
        /// Differs from `Inner::default`, as an algorithm's optimiser does.
        fn default() -> Self {
            Self {
                width: 4,
                inner: Inner {
                    rate: 2.0,
                    clip: Some(10.0),
                },
            }
        }
    }

    #[test]
    fn left_out_fields_keep_the_algorithms_defaults_even_when_nested() {
        let section = serde_json::json!({"name": "outer", "inner": {"rate": 0.5}});
        let parsed: Outer = parse_algorithm_section(&section, "outer").unwrap();
        assert_eq!(
            parsed,
            Outer {
                width: 4,
                inner: Inner {
                    rate: 0.5,
                    clip: Some(10.0)
                }
            }
        );
        let section = serde_json::json!({"width": 8, "inner": {"clip": null}});
        let parsed: Outer = parse_algorithm_section(&section, "outer").unwrap();
        assert_eq!(
            parsed,
            Outer {
                width: 8,
                inner: Inner {
                    rate: 2.0,
                    clip: None
                }
            }
        );
    }

    #[test]
    fn unknown_or_mistyped_fields_are_named() {
        for (section, named) in [
            (serde_json::json!({"inner": {"rte": 0.5}}), "rte"),
            (serde_json::json!({"width": "wide"}), "wide"),
        ] {
            let err = parse_algorithm_section::<Outer>(&section, "outer")
                .unwrap_err()
                .to_string();
            assert!(err.contains(named) && err.contains("outer"), "{err}");
        }
    }
}
