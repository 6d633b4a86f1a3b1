//! The evaluation protocol: a fixed, seeded list of test episodes that
//! every learner is scored on, so that results can be compared episode by
//! episode (see [`compare`]).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, EpisodeTensors, Learner};
use fewshot_data::{ClassSplit, EpisodeSampler, EpisodeSpec, ImageStore, SplitName, SupportCopies};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::stats::{paired_comparison, summarize, PairedComparison, Summary};

/// Episodes are sampled this many at a time, in parallel: sampling then
/// costs little next to prediction, and only one chunk of images is held
/// in memory however many episodes are evaluated.
const EPISODE_CHUNK: usize = 32;

/// Which episodes an evaluation runs: episode `i` is episode `i` of a
/// sampler with this seed and spec on this split, for every learner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalProtocol {
    /// How many episodes (ProtoNets used 1,000, MAML 600).
    pub episodes: usize,
    pub seed: u64,
    pub spec: EpisodeSpec,
    pub split: SplitName,
    /// Test-time augmentation: distorted copies of every support image
    /// join the episode ([`SupportCopies`]). The episodes keep their images,
    /// so an evaluation with copies pairs with one without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_copies: Option<SupportCopies>,
}

/// A learner's score on one episode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EpisodeResult {
    /// The episode's index in the sampler: identifies the episode.
    pub index: u64,
    /// Fraction of the episode's queries classified correctly.
    pub accuracy: f64,
    /// Mean cross-entropy of the queries; NaN if the learner diverged.
    #[serde(deserialize_with = "crate::json_float::nan_if_null")]
    pub loss: f64,
}

/// A learner's scores under a protocol.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Evaluation {
    pub protocol: EvalProtocol,
    /// One per episode, in index order.
    pub episodes: Vec<EpisodeResult>,
    /// Over `episodes`.
    pub accuracy: Summary,
    /// Wall-clock time of the evaluation, sampling included.
    pub seconds: f64,
    /// [`ClassSplit::fingerprint`] of the classes the episodes were drawn
    /// from: the protocol names the split (`test`) but not whose. `None` in
    /// evaluations saved before it was recorded.
    #[serde(default)]
    pub classes: Option<String>,
    /// [`ClassSplit::name`] of those classes, e.g. `test unrotated`: tells a
    /// reader what `classes` hashes. `None` in evaluations saved before it
    /// was recorded.
    #[serde(default)]
    pub split_name: Option<String>,
}

impl Evaluation {
    /// Per-episode accuracies, in episode order.
    pub fn accuracies(&self) -> Vec<f64> {
        self.episodes.iter().map(|e| e.accuracy).collect()
    }
}

/// Scores `learner` on the protocol's episodes of `split`, calling
/// `on_progress` with the number of episodes done after each chunk of them.
/// If `on_progress` breaks, the evaluation stops there with
/// [`EvalError::Stopped`] (a Ctrl-C during a long validation need not wait
/// for its end).
///
/// `split` is the protocol's split of the caller's dataset, usually
/// `dataset.split(protocol.split)`; its name is not checked, so a folder of
/// classes loaded on its own can be evaluated as the test split.
pub fn evaluate(
    learner: &dyn Learner,
    store: Arc<ImageStore>,
    split: &ClassSplit,
    protocol: &EvalProtocol,
    device: &Device,
    on_progress: &mut dyn FnMut(usize) -> ControlFlow<()>,
) -> Result<Evaluation> {
    check_protocol(protocol)?;
    let started = Instant::now();
    let classes = split.fingerprint();
    let mut sampler = EpisodeSampler::new(store, split.clone(), protocol.spec, protocol.seed)?;
    if let Some(support_copies) = &protocol.support_copies {
        sampler = sampler.with_support_copies(support_copies.clone())?;
    }
    let mut results = Vec::with_capacity(protocol.episodes);
    while results.len() < protocol.episodes {
        let start = results.len() as u64;
        let count = EPISODE_CHUNK.min(protocol.episodes - results.len());
        // Episodes of a chunk are scored in parallel: candle's CPU ops use
        // little more than one core on these small batches.
        let settings = ops::path::ThreadSettings::capture();
        let scored: Vec<Result<EpisodeResult>> = sampler
            .episodes(start, count)
            .par_iter()
            .enumerate()
            .map(|(offset, episode)| {
                settings.run(|| {
                    let index = start + offset as u64;
                    let tensors = EpisodeTensors::from_episode(episode, device, DType::F32)?;
                    score(learner, &tensors, index)
                })
            })
            .collect();
        for result in scored {
            results.push(result?);
        }
        if on_progress(results.len()).is_break() && results.len() < protocol.episodes {
            return Err(EvalError::Stopped {
                done: results.len(),
                episodes: protocol.episodes,
            });
        }
    }
    let accuracies: Vec<f64> = results.iter().map(|r| r.accuracy).collect();
    let accuracy = summarize(&accuracies)?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        learner = learner.algorithm(),
        episodes = protocol.episodes,
        split = %split.name,
        seconds,
        "accuracy {:.2}% ± {:.2}%",
        accuracy.mean * 100.0,
        accuracy.ci95 * 100.0
    );
    Ok(Evaluation {
        protocol: protocol.clone(),
        episodes: results,
        accuracy,
        seconds,
        classes: Some(classes),
        split_name: Some(split.name.clone()),
    })
}

/// Refuses protocols that cannot give a meaningful accuracy.
fn check_protocol(protocol: &EvalProtocol) -> Result<()> {
    if protocol.episodes == 0 {
        return Err(EvalError::Empty {
            what: "the protocol has 0 episodes".into(),
        });
    }
    if protocol.spec.queries == 0 {
        return Err(EvalError::Empty {
            what: "the protocol's spec has 0 queries per class: nothing to score".into(),
        });
    }
    Ok(())
}

/// Accuracy and loss of the learner's predictions on one episode.
fn score(learner: &dyn Learner, episode: &EpisodeTensors, index: u64) -> Result<EpisodeResult> {
    let labels = episode.labels_for("evaluation")?;
    let logits = learner.predict(episode)?;
    let expected = [labels.elem_count(), episode.ways];
    // `accuracy` would silently take the argmax over too many or too few
    // classes; a wrong shape is a bug in the learner, so name it.
    if logits.dims() != expected {
        return Err(EvalError::Mismatch {
            what: format!(
                "learner `{}` returned logits of shape {:?} for episode {index}, expected {expected:?} (queries x ways)",
                learner.algorithm(),
                logits.dims()
            ),
        });
    }
    Ok(EpisodeResult {
        index,
        accuracy: ops::accuracy(&logits, labels)?,
        loss: scalar(&ops::cross_entropy(&logits, labels)?)?,
    })
}

/// The value of a one-element tensor of any float dtype.
fn scalar(tensor: &Tensor) -> fewshot_backbone::Result<f64> {
    ops::path::to_host_f64(tensor)
}

/// Ok when `a` and `b` scored the same episodes, so that their results can
/// be paired; otherwise a `Mismatch` naming the first difference. Support
/// copies may differ: they add to an episode's support set but keep its
/// images, so comparing shows what they buy.
pub fn check_same_episodes(a: &Evaluation, b: &Evaluation) -> Result<()> {
    let (pa, pb) = (&a.protocol, &b.protocol);
    let differences = [
        (
            "split",
            pa.split != pb.split,
            format!("{} vs {}", pa.split, pb.split),
        ),
        (
            "seed",
            pa.seed != pb.seed,
            format!("{} vs {}", pa.seed, pb.seed),
        ),
        (
            "spec",
            pa.spec != pb.spec,
            format!("{:?} vs {:?}", pa.spec, pb.spec),
        ),
        (
            "episodes",
            pa.episodes != pb.episodes,
            format!("{} vs {}", pa.episodes, pb.episodes),
        ),
    ];
    if let Some((field, _, values)) = differences.into_iter().find(|(_, differs, _)| *differs) {
        return Err(EvalError::Mismatch {
            what: format!("the evaluations use different protocols: {field} {values}"),
        });
    }
    // Same seed and spec on other classes (e.g. MAML's split of Omniglot
    // against Vinyals') gives other episodes under the same indices.
    let (Some(ca), Some(cb)) = (&a.classes, &b.classes) else {
        let which = if a.classes.is_none() {
            "the first"
        } else {
            "the second"
        };
        return Err(EvalError::Mismatch {
            what: format!(
                "{which} evaluation does not record which classes its episodes came from (saved by an older version); evaluate it again"
            ),
        });
    };
    if ca != cb {
        let named = |e: &Evaluation, classes: &str| match &e.split_name {
            Some(name) => format!("{name} ({classes})"),
            None => classes.to_string(),
        };
        return Err(EvalError::Mismatch {
            what: format!(
                "the evaluations drew their episodes from different classes (another split, dataset or data folder): {} vs {}",
                named(a, ca),
                named(b, cb)
            ),
        });
    }
    let indices = |e: &Evaluation| e.episodes.iter().map(|r| r.index).collect::<Vec<_>>();
    let (ia, ib) = (indices(a), indices(b));
    if ia != ib {
        let what = match ia.iter().zip(&ib).position(|(x, y)| x != y) {
            Some(i) => format!("result {i} is of episode {} vs episode {}", ia[i], ib[i]),
            None => format!("{} vs {} episode results", ia.len(), ib.len()),
        };
        return Err(EvalError::Mismatch {
            what: format!("the evaluations scored different episodes: {what}"),
        });
    }
    Ok(())
}

/// Paired t-test of `a`'s per-episode accuracies against `b`'s; both must
/// have scored the same episodes.
pub fn compare(a: &Evaluation, b: &Evaluation) -> Result<PairedComparison> {
    check_same_episodes(a, b)?;
    paired_comparison(&a.accuracies(), &b.accuracies())
}
