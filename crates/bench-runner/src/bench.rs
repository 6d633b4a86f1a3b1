//! `fewshot bench`: measured figures for docs/RESULTS.md.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::DType;
use fewshot_backbone::{DeviceChoice, EpisodeTensors};
use fewshot_data::{CacheStatus, EpisodeSampler, EpisodeSpec};
use serde_json::json;

use crate::config::{DataConfig, ExperimentConfig};
use crate::{datasets, kernel_bench, learners};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    /// Cold load, warm (cached) load, and episode sampling rate.
    Data,
    /// Meta-training speed of a config's learner on its own episodes.
    Train,
    /// The backbone's CPU kernels on the training, MAML and evaluation cases
    /// of the speed issue (`--case` picks some).
    Kernels,
}

/// Episodes are drawn in chunks of this many, each chunk in parallel.
const CHUNK: usize = 1000;

/// What `fewshot bench` was asked to run.
pub struct BenchArgs<'a> {
    pub suite: Suite,
    pub data: &'a DataConfig,
    pub experiment: Option<&'a Path>,
    pub episodes: usize,
    pub cases: &'a [String],
    pub repeats: usize,
    /// Overrides the suite's device (the kernels suite's CPU, the config's).
    pub device: Option<DeviceChoice>,
    pub as_json: bool,
}

pub fn run(args: BenchArgs<'_>) -> Result<()> {
    match (args.suite, args.experiment) {
        (Suite::Data, _) => data_suite(args.data, args.episodes, args.as_json),
        (Suite::Train, Some(path)) => train_suite(path, args.device, args.episodes, args.as_json),
        (Suite::Train, None) => bail!("--suite train needs --config CONFIG.json"),
        (Suite::Kernels, _) => kernel_bench::run(
            args.cases,
            args.repeats,
            args.device.unwrap_or(DeviceChoice::Cpu),
            args.as_json,
        ),
    }
}

/// Steps run before timing, so that allocations and caches settle.
const WARMUP_STEPS: u64 = 3;

/// Median time per meta-training step of the config's learner, over steps
/// that together hold at least `episodes` episodes.
fn train_suite(
    path: &Path,
    device: Option<DeviceChoice>,
    episodes: usize,
    as_json: bool,
) -> Result<()> {
    let config = ExperimentConfig::from_file(path)?;
    let device = match device {
        Some(choice) => choice,
        None => config.device_choice()?,
    }
    .open()?;
    let loaded = datasets::load(&config.data, config.seed)?;
    let data = &loaded.dataset;
    let section = serde_json::Value::Object(config.algorithm.clone());
    let mut learner = learners::build(&section, &device)?;
    let meta_batch = config.training.meta_batch;
    let sampler = datasets::training_sampler(&config, data)?;
    let steps = episodes.div_ceil(meta_batch).max(1) as u64;
    let mut times = Vec::new();
    for step in 0..WARMUP_STEPS + steps {
        let start = Instant::now();
        let batch: Vec<EpisodeTensors> = sampler
            .episodes(step * meta_batch as u64, meta_batch)
            .iter()
            .map(|e| EpisodeTensors::from_episode(e, &device, DType::F32))
            .collect::<fewshot_backbone::Result<_>>()?;
        learner.meta_train(&batch)?;
        // A GPU runs ahead of the host: time the work, not its queueing.
        device.synchronize()?;
        if step >= WARMUP_STEPS {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let spec = config.train_episodes;
    let report = json!({
        "suite": "train",
        "config": path,
        "algorithm": learner.algorithm(),
        "device": fewshot_backbone::device::device_name(&device),
        "episode": format!("{}-way {}-shot {}-query", spec.ways, spec.shots, spec.queries),
        "meta_batch": meta_batch,
        "steps": times.len(),
        "median_step_ms": median * 1e3,
        "episodes_per_second": meta_batch as f64 / median,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} steps of {meta_batch} x {}, median {:.1} ms/step, {:.2} episodes/s",
            learner.algorithm(),
            times.len(),
            report["episode"].as_str().unwrap_or_default(),
            median * 1e3,
            meta_batch as f64 / median
        );
    }
    Ok(())
}

fn data_suite(config: &DataConfig, episodes: usize, as_json: bool) -> Result<()> {
    let cold = datasets::load(
        &DataConfig {
            cache: false,
            ..config.clone()
        },
        0,
    )?;
    let warm = if config.cache && cold.cache.is_some() {
        // The first cached load may have to write the cache; time the second.
        datasets::load(config, 0)?;
        let warm = datasets::load(config, 0)?;
        if warm.cache != Some(CacheStatus::Hit) {
            bail!(
                "the second cached load did not hit the cache ({:?})",
                warm.cache
            );
        }
        Some(warm.load_time.as_secs_f64())
    } else {
        None
    };

    let data = &cold.dataset;
    let spec = EpisodeSpec {
        ways: 5,
        shots: 1,
        queries: 15,
        same_group: false,
    };
    let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), spec, 0)?;
    let start = Instant::now();
    let mut drawn = 0;
    while drawn < episodes {
        let count = CHUNK.min(episodes - drawn);
        let batch = sampler.episodes(drawn as u64, count);
        drawn += batch.len();
    }
    let sampling = start.elapsed().as_secs_f64();

    let (c, h, w) = data.store.shape();
    let report = json!({
        "suite": "data",
        "dataset": data.name,
        "images": data.store.len(),
        "image_shape": [c, h, w],
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cold_load_seconds": cold.load_time.as_secs_f64(),
        "warm_load_seconds": warm,
        "episode": "5-way 1-shot 15-query, train split",
        "episodes": drawn,
        "episodes_per_second": drawn as f64 / sampling,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "dataset            {} ({} images, {c}x{h}x{w})",
            data.name,
            data.store.len()
        );
        println!(
            "cold load          {:.3} s (no cache)",
            cold.load_time.as_secs_f64()
        );
        match warm {
            Some(s) => println!("warm load          {s:.3} s (cache hit)"),
            None => println!("warm load          n/a (no cache for this dataset or --no-cache)"),
        }
        println!(
            "episodes/s         {:.0} (5w1s15q, {drawn} episodes)",
            drawn as f64 / sampling
        );
    }
    Ok(())
}
