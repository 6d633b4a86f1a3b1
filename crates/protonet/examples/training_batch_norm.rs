//! Does a published Prototypical Network score better on Omniglot when each
//! test episode is normalised by the statistics of a large batch of
//! training images instead of by the episode's own (what `ProtoNet` does by
//! default)? It needs no retraining: the batch's statistics stand in for
//! the running averages of `test_batch_norm: running`, which a model
//! collects while it trains.
//!
//! ```sh
//! FEWSHOT_DATA_DIR=../shared/datasets cargo run --release -p protonet --example training_batch_norm -- \
//!   MODEL.safetensors SPLIT WAYS QUERIES EPISODES
//! ```
//!
//! `SPLIT` is `vinyals` (random test episodes) or `lake` (within one
//! evaluation alphabet, for models trained on all background alphabets).
//! Both ways score the same seeded test episodes (seed 1234, 1 shot) through
//! `ProtoNet` itself (what `fewshot eval` measures), and the paired
//! difference is printed. The reference batch: three images of each of 300
//! training classes (rotations as classes), 900 images.

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{parse_algorithm_section, Checkpoint, Conv4, EpisodeTensors, Learner};
use fewshot_data::{
    dataset_root, EpisodeSampler, EpisodeSpec, Omniglot, OmniglotOptions, SplitName,
};
use fewshot_eval::{compare, evaluate, EvalProtocol, Evaluation};
use protonet::{ProtoNet, ProtoNetConfig, TestBatchNorm};

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
    // The same weights with that batch's statistics as running averages.
    let normalised_by_batch = ProtoNetConfig {
        test_batch_norm: TestBatchNorm::Running,
        ..config
    };
    let mut by_batch = ProtoNet::new(normalised_by_batch, &device)?;
    let mut state = checkpoint.tensors.clone();
    state.extend(&statistics.with_prefix("embedding."))?;
    by_batch.load_state(&state)?;

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
    let by_training_batch = score(&by_batch)?;
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
