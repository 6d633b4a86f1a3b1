//! Times the parts of one Meta Networks training step on the Omniglot model
//! (1-shot, 10 queries per class, built-in synthetic glyphs; 5 ways, or as
//! many as the first argument says): the meta
//! information, the fast-weight generation, the queries' classification and
//! the backward pass, as medians over steps. Used to find where a step's time
//! goes; the training speed itself is `fewshot train ... --stop-after N`.
//!
//! Run: cargo run --release -p metanet-original --example step_parts [WAYS]
//! with `MIMALLOC_PURGE_DELAY=-1 MIMALLOC_RESERVE_OS_MEMORY=4GiB`, close to
//! the allocator settings the `fewshot` binary makes itself but not the
//! same: here the kernel's page zeroing still takes ~24% of a 20-way step
//! (`perf record`), while the binary's page faults do not grow with its
//! steps (`perf stat -e page-faults fewshot train` of the 20-way config
//! with `validation_episodes` and `evaluation.episodes` set to 2,
//! `--stop-after 10`: 2,646; `--stop-after 30`: 2,647). The
//! parts' shares are what this is for; time `fewshot train` for speed.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, EpisodeTensors, ParamSet};
use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, Rng, SyntheticOptions};
use metanet_original::{MetaNetConfig, MetaNetwork};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STEPS: usize = 7;

fn main() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let ways: usize = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| anyhow::anyhow!("WAYS must be a number, got {arg:?}"))?,
        None => 5,
    };
    let data = synthetic::generate(&SyntheticOptions::default())?;
    let spec = EpisodeSpec {
        ways,
        shots: 1,
        queries: 10,
        same_group: false,
    };
    let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), spec, 0)?;
    let network = MetaNetwork::new(&MetaNetConfig {
        n_outputs_train: ways,
        n_outputs_test: ways,
        ..MetaNetConfig::default()
    })?;
    // Fresh weights, but random generator output layers: their zero
    // initialisation would leave the fast-weight paths idle.
    let mut rng = Rng::seed_from(1, 0);
    let mut params = ParamSet::new();
    for (name, tensor) in network.init(0, &device)?.iter() {
        let tensor = match name.contains("generator.") && name.contains(".out.") {
            true => {
                let values: Vec<f32> = (0..tensor.elem_count())
                    .map(|_| rng.normal() as f32 * 0.1)
                    .collect();
                Tensor::from_vec(values, tensor.dims(), &device)?
            }
            false => tensor.clone(),
        };
        params.insert(name, tensor)?;
    }
    let vars = params.to_vars()?;

    let parts = [
        "meta information",
        "generation",
        "classification",
        "backward",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); parts.len()];
    for step in 0..STEPS {
        let episode =
            EpisodeTensors::from_episode(&sampler.episode(step as u64), &device, DType::F32)?;
        let params = vars.as_params();
        let mut marks = vec![Instant::now()];
        let info = network.meta_info(&params, &episode)?;
        marks.push(Instant::now());
        let memory = network.generate(&params, &episode, &info)?;
        marks.push(Instant::now());
        let logits = network.classify(&params, &memory, &episode.query)?;
        marks.push(Instant::now());
        let labels = episode
            .query_labels
            .as_ref()
            .expect("sampled episodes have labels");
        ops::cross_entropy(&logits, labels)?.backward()?;
        marks.push(Instant::now());
        // The first step warms up allocator and caches.
        if step > 0 {
            for (i, pair) in marks.windows(2).enumerate() {
                times[i].push((pair[1] - pair[0]).as_secs_f64() * 1e3);
            }
        }
    }
    let mut total = 0.0;
    for (part, mut samples) in parts.iter().zip(times) {
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        total += median;
        println!("{part:>17}: {median:8.1} ms (median of {})", samples.len());
    }
    println!("{:>17}: {total:8.1} ms", "sum of medians");
    Ok(())
}
