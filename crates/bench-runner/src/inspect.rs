//! `fewshot data inspect`: what a dataset holds, per split convention.

use anyhow::Result;
use fewshot_data::{CacheStatus, ClassSplit, FewShotDataset, Omniglot, OmniglotSet};
use serde_json::{json, Value};

use crate::config::DataConfig;
use crate::datasets;

/// The seed of MAML's character split in the counts (the counts do not depend on it).
const MAML_SPLIT_SEED: u64 = 0;

pub fn run(config: &DataConfig, as_json: bool) -> Result<()> {
    let loaded = datasets::load(config, MAML_SPLIT_SEED)?;
    let report = report(&loaded);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn report(loaded: &datasets::Loaded) -> Value {
    let data = &loaded.dataset;
    let (c, h, w) = data.store.shape();
    let mut report = json!({
        "dataset": data.name,
        "images": data.store.len(),
        "image_shape": [c, h, w],
        "load_seconds": loaded.load_time.as_secs_f64(),
        "cache": loaded.cache.map(cache_name),
        "normalize": data.store.normalization(),
    });
    match &loaded.omniglot {
        Some(omniglot) => {
            report["alphabets"] = json!(omniglot.num_alphabets());
            report["characters"] = json!(omniglot.characters.len());
            report["sets"] = json!({
                "background": set_counts(omniglot, OmniglotSet::Background),
                "evaluation": set_counts(omniglot, OmniglotSet::Evaluation),
            });
            // Every convention is reported; Vinyals needs its split files.
            let vinyals = match omniglot.vinyals() {
                Ok(d) => split_counts(&d),
                Err(e) => json!({ "error": e.to_string() }),
            };
            report["splits"] = json!({
                "vinyals": vinyals,
                "maml": split_counts(&omniglot.maml(MAML_SPLIT_SEED)),
                "lake": split_counts(&omniglot.lake()),
            });
        }
        None => report["splits"] = json!({ "default": split_counts(data) }),
    }
    report
}

fn cache_name(status: CacheStatus) -> &'static str {
    match status {
        CacheStatus::Disabled => "disabled",
        CacheStatus::Hit => "hit",
        CacheStatus::Miss => "miss",
    }
}

fn set_counts(omniglot: &Omniglot, set: OmniglotSet) -> Value {
    let characters: Vec<_> = omniglot
        .characters
        .iter()
        .filter(|c| c.set == set)
        .collect();
    let mut alphabets: Vec<&str> = characters.iter().map(|c| c.alphabet.as_str()).collect();
    alphabets.sort_unstable();
    alphabets.dedup();
    json!({
        "alphabets": alphabets.len(),
        "characters": characters.len(),
        "images": characters.iter().map(|c| c.images.len()).sum::<usize>(),
    })
}

/// Classes per split, and their images and groups alongside.
fn split_counts(data: &FewShotDataset) -> Value {
    let classes = |s: &ClassSplit| s.classes.len();
    let details = |s: &ClassSplit| json!({ "images": s.num_images(), "groups": s.groups() });
    json!({
        "train": classes(&data.train),
        "val": classes(&data.val),
        "test": classes(&data.test),
        "details": {
            "train": details(&data.train),
            "val": details(&data.val),
            "test": details(&data.test),
        },
    })
}

fn print_text(report: &Value) {
    println!("dataset     {}", report["dataset"].as_str().unwrap_or("?"));
    println!(
        "images      {} of shape {}",
        report["images"], report["image_shape"]
    );
    match report["normalize"].as_object() {
        Some(n) => println!(
            "normalize   (v / 255 - mean) / std, mean {} std {}",
            n["mean"], n["std"]
        ),
        None => println!("normalize   none (v / 255)"),
    }
    if let Some(alphabets) = report.get("alphabets") {
        println!("alphabets   {alphabets}");
        println!("characters  {}", report["characters"]);
        for set in ["background", "evaluation"] {
            let s = &report["sets"][set];
            println!(
                "  {set:<10} {} alphabets, {} characters, {} images",
                s["alphabets"], s["characters"], s["images"]
            );
        }
    }
    println!("classes per split");
    if let Some(splits) = report["splits"].as_object() {
        for (name, counts) in splits {
            match counts.get("error") {
                Some(error) => {
                    println!("  {name:<10} unavailable: {}", error.as_str().unwrap_or(""))
                }
                None => println!(
                    "  {name:<10} train {:>5}   val {:>5}   test {:>5}",
                    counts["train"], counts["val"], counts["test"]
                ),
            }
        }
    }
    let cache = report["cache"]
        .as_str()
        .map(|c| format!(" (cache: {c})"))
        .unwrap_or_default();
    println!(
        "loaded in   {:.3} s{cache}",
        report["load_seconds"].as_f64().unwrap_or(0.0)
    );
}
