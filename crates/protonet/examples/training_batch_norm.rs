//! Does a published Prototypical Network score better on Omniglot when each
//! test episode is normalised by the statistics of a large batch of
//! training images instead of by the episode's own (what `ProtoNet` does by
//! default)? It needs no retraining: `test_batch_norm: running`, the
//! product's version, needs running averages kept in training.
//!
//! ```sh
//! FEWSHOT_DATA_DIR=../shared/datasets cargo run --release -p protonet --example training_batch_norm -- \
//!   MODEL.safetensors SPLIT WAYS QUERIES EPISODES
//! ```
//!
//! `SPLIT` is `vinyals` (random test episodes) or `lake` (within one
//! evaluation alphabet, for models trained on all background alphabets).
//! Both ways score the same seeded test episodes (seed 1234, 1 shot): the
//! episode's own statistics through `ProtoNet` itself (what `fewshot eval`
//! measures), and the paired difference is printed. The reference batch: three images of each
//! of 300 training classes (rotations as classes), 900 images.

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    parse_algorithm_section, BackboneError, Checkpoint, Conv4, EpisodeTensors, Learner, ParamSet,
    StepStats,
};
use fewshot_data::{
    dataset_root, EpisodeSampler, EpisodeSpec, Omniglot, OmniglotOptions, SplitName,
};
use fewshot_eval::{compare, evaluate, EvalProtocol, Evaluation};
use protonet::{distance_logits, prototypes, ProtoNet, ProtoNetConfig};

/// A trained embedding that only predicts, normalising each episode by the
/// given batch-norm statistics (a training batch's) instead of its own.
struct NormalisedByStatistics<'a> {
    embedding: &'a Conv4,
    params: &'a ParamSet,
    statistics: &'a ParamSet,
}

impl Learner for NormalisedByStatistics<'_> {
    fn algorithm(&self) -> &'static str {
        protonet::ALGORITHM
    }

    fn config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn meta_train(&mut self, _: &[EpisodeTensors]) -> fewshot_backbone::Result<StepStats> {
        Err(only_predicts())
    }

    fn predict(&self, episode: &EpisodeTensors) -> fewshot_backbone::Result<Tensor> {
        let support_rows = episode.support.dim(0)?;
        let images = Tensor::cat(&[&episode.support, &episode.query], 0)?;
        let embedded =
            self.embedding
                .forward_with_statistics(self.params, self.statistics, &images)?;
        let support = embedded.narrow(0, 0, support_rows)?;
        let query = embedded.narrow(0, support_rows, episode.query.dim(0)?)?;
        let prototypes = prototypes(&support, &episode.support_labels, episode.ways)?;
        distance_logits(&query, &prototypes)
    }

    fn state(&self) -> fewshot_backbone::Result<ParamSet> {
        Err(only_predicts())
    }

    fn load_state(&mut self, _: &ParamSet) -> fewshot_backbone::Result<()> {
        Err(only_predicts())
    }
}

fn only_predicts() -> BackboneError {
    BackboneError::InvalidConfig {
        field: "learner",
        value: "training_batch_norm example".into(),
        reason: "this wrapper only predicts".into(),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, split, ways, queries, episodes] = args.as_slice() else {
        bail!("usage: training_batch_norm MODEL vinyals|lake WAYS QUERIES EPISODES");
    };
    let number = |name: &str, text: &str| -> Result<usize> {
        text.parse()
            .with_context(|| format!("{name}: not a count: {text}"))
    };
    let device = Device::Cpu;
    let checkpoint = Checkpoint::load(Path::new(model), &device)?;
    let config: ProtoNetConfig = parse_algorithm_section(&checkpoint.config, protonet::ALGORITHM)?;
    let mut protonet = ProtoNet::from_json(&checkpoint.config, &device)?;
    protonet.load_state(&checkpoint.tensors)?;
    let embedding = Conv4::new(config.embedding.clone())?;
    let params = checkpoint.tensors.strip_prefix("embedding.").detach();

    let options = OmniglotOptions {
        image_size: config.embedding.image_size,
        ..Default::default()
    };
    let omniglot = Omniglot::load(&dataset_root("omniglot", None)?, &options)?;
    // Vinyals' training classes are rotations already; Lake's get them here,
    // as the Lake models were trained.
    let (data, train, same_group) = match split.as_str() {
        "vinyals" => {
            let data = omniglot.vinyals()?;
            let train = data.train.clone();
            (data, train, false)
        }
        "lake" => {
            let data = omniglot.lake_with_validation(0, 0)?;
            let train = data.train.with_rotation_classes()?;
            (data, train, true)
        }
        other => bail!("SPLIT: `{other}` is neither `vinyals` nor `lake`"),
    };
    let reference_spec = EpisodeSpec {
        ways: 300,
        shots: 2,
        queries: 1,
        same_group: false,
    };
    let sampler = EpisodeSampler::new(data.store.clone(), train, reference_spec, 99)?;
    let batch = EpisodeTensors::from_episode(&sampler.episodes(0, 1)[0], &device, DType::F32)?;
    let reference = Tensor::cat(&[&batch.support, &batch.query], 0)?;
    let (_, statistics) = embedding.forward_recording_statistics(&params, &reference)?;

    let protocol = EvalProtocol {
        episodes: number("EPISODES", episodes)?,
        seed: 1234,
        spec: EpisodeSpec {
            ways: number("WAYS", ways)?,
            shots: 1,
            queries: number("QUERIES", queries)?,
            same_group,
        },
        split: SplitName::Test,
        support_copies: None,
    };
    let score = |learner: &dyn Learner| -> Result<Evaluation> {
        let test = data.split(SplitName::Test);
        let mut quiet = |_| ControlFlow::Continue(());
        Ok(evaluate(
            learner,
            data.store.clone(),
            test,
            &protocol,
            &device,
            &mut quiet,
        )?)
    };
    let by_episode = score(&protonet)?;
    let by_training_batch = score(&NormalisedByStatistics {
        embedding: &embedding,
        params: &params,
        statistics: &statistics,
    })?;
    let line = |name: &str, e: &Evaluation| {
        println!(
            "{name}: {:.2}% ± {:.2}%",
            100.0 * e.accuracy.mean,
            100.0 * e.accuracy.ci95
        );
    };
    line("normalised by the episode", &by_episode);
    line("normalised by the training batch", &by_training_batch);
    let paired = compare(&by_training_batch, &by_episode)?;
    println!(
        "difference: {:+.2} ± {:.2} points (p = {:.3})",
        100.0 * paired.mean_difference,
        100.0 * paired.ci95,
        paired.p_value
    );
    Ok(())
}
