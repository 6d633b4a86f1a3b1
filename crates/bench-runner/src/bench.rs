//! `fewshot bench`: measured figures for docs/RESULTS.md.

use std::time::Instant;

use anyhow::{bail, Result};
use fewshot_data::{CacheStatus, EpisodeSampler, EpisodeSpec};
use serde_json::json;

use crate::config::DataConfig;
use crate::datasets;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Suite {
    /// Cold load, warm (cached) load, and episode sampling rate.
    Data,
}

/// Episodes are drawn in chunks of this many, each chunk in parallel.
const CHUNK: usize = 1000;

pub fn run(suite: Suite, config: &DataConfig, episodes: usize, as_json: bool) -> Result<()> {
    match suite {
        Suite::Data => data_suite(config, episodes, as_json),
    }
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
