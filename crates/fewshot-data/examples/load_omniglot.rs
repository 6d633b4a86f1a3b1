//! Times loading Omniglot without and with the cache, and sampling episodes.
//!
//! cargo run --release -p fewshot-data --example load_omniglot -- [OMNIGLOT_DIR]
//!
//! Without an argument the folder is found through $FEWSHOT_DATA_DIR. The
//! cache goes to a temporary folder, so the first cached load is a miss.

use std::path::PathBuf;
use std::time::Instant;

use fewshot_data::{
    dataset_root, CacheOptions, EpisodeSampler, EpisodeSpec, Omniglot, OmniglotOptions,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let explicit = std::env::args_os().nth(1).map(PathBuf::from);
    let root = dataset_root("omniglot", explicit.as_deref())?;
    let cache_dir = tempfile::tempdir()?;
    println!(
        "Omniglot at {}, {} rayon threads",
        root.display(),
        rayon::current_num_threads()
    );

    let runs = [
        ("no cache", CacheOptions::disabled()),
        ("cache, first", CacheOptions::in_dir(cache_dir.path())),
        ("cache, second", CacheOptions::in_dir(cache_dir.path())),
    ];
    let mut omniglot = None;
    for (label, cache) in runs {
        let start = Instant::now();
        let loaded = Omniglot::load(
            &root,
            &OmniglotOptions {
                image_size: 28,
                cache,
                ..Default::default()
            },
        )?;
        println!(
            "load ({label}): {:.3} s, {} images, cache {:?}",
            start.elapsed().as_secs_f64(),
            loaded.store.len(),
            loaded.cache
        );
        omniglot = Some(loaded);
    }
    let Some(omniglot) = omniglot else {
        return Ok(());
    };

    let start = Instant::now();
    let vinyals = omniglot.vinyals()?;
    println!("Vinyals split: {:.3} s", start.elapsed().as_secs_f64());

    let spec = EpisodeSpec {
        ways: 5,
        shots: 1,
        queries: 15,
        same_group: false,
    };
    let sampler = EpisodeSampler::new(vinyals.store.clone(), vinyals.train.clone(), spec, 0)?;
    let total = 20_000;
    let batch = 1_000;

    let start = Instant::now();
    for first in (0..total).step_by(batch) {
        let episodes = sampler.episodes(first as u64, batch);
        std::hint::black_box(episodes);
    }
    let parallel = start.elapsed().as_secs_f64();
    println!(
        "{total} episodes 5w1s15q, parallel: {parallel:.3} s = {:.0} episodes/s",
        total as f64 / parallel
    );

    let start = Instant::now();
    for index in 0..total as u64 {
        std::hint::black_box(sampler.episode(index));
    }
    let one = start.elapsed().as_secs_f64();
    println!(
        "{total} episodes 5w1s15q, one thread: {one:.3} s = {:.0} episodes/s",
        total as f64 / one
    );
    Ok(())
}
