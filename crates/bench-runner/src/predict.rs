//! `fewshot predict`: classify a folder of query images given a support folder
//! with one sub-folder per class, using a trained checkpoint.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, Checkpoint, EpisodeTensors};
use fewshot_data::{load_class_folder, load_image_files, ImageStore};
use serde_json::json;

use crate::run_dir::experiment_of;
use crate::{datasets, learners};

pub fn run(
    checkpoint: &Path,
    support: &Path,
    query: &Path,
    device: &Device,
    as_json: bool,
) -> Result<()> {
    let ckpt = Checkpoint::load(checkpoint, device)?;
    let experiment = experiment_of(&ckpt, checkpoint)?;
    let learner = learners::from_checkpoint(&ckpt, device)?;
    let preprocess = datasets::preprocess(&experiment.data);

    let (support_store, classes) = load_class_folder(support, &preprocess)?;
    if classes.classes.len() < 2 {
        bail!(
            "{}: needs at least 2 class folders, found {}",
            support.display(),
            classes.classes.len()
        );
    }
    let (query_files, query_store) = load_image_files(query, &preprocess)?;
    let mut support_images = Vec::new();
    let mut support_labels = Vec::new();
    for (label, class) in classes.classes.iter().enumerate() {
        for &image in &class.images {
            support_images.push(image as usize);
            support_labels.push(label as u32);
        }
    }
    let episode = EpisodeTensors {
        ways: classes.classes.len(),
        support: images(&support_store, &support_images, device)?,
        support_labels: Tensor::from_vec(support_labels.clone(), support_labels.len(), device)?,
        query: images(
            &query_store,
            &(0..query_store.len()).collect::<Vec<_>>(),
            device,
        )?,
        query_labels: None,
    };
    let probabilities = ops::softmax(&learner.predict(&episode)?)?.to_vec2::<f32>()?;

    let mut predictions = Vec::new();
    for (file, probs) in query_files.iter().zip(&probabilities) {
        let (best, p) =
            probs.iter().enumerate().fold(
                (0, f32::MIN),
                |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
            );
        predictions.push(json!({
            "file": file,
            "class": classes.classes[best].name,
            "probability": p,
        }));
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "predictions": predictions }))?
        );
    } else {
        for p in &predictions {
            println!(
                "{}\t{}\t{:.3}",
                p["file"].as_str().unwrap_or_default(),
                p["class"].as_str().unwrap_or_default(),
                p["probability"].as_f64().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The given images of a store as a float tensor in [0, 1].
fn images(store: &ImageStore, indices: &[usize], device: &Device) -> Result<Tensor> {
    let (c, h, w) = store.shape();
    let mut pixels = Vec::with_capacity(indices.len() * store.image_len());
    for &i in indices {
        pixels.extend_from_slice(store.image(i));
    }
    let t = Tensor::from_vec(pixels, (indices.len(), c, h, w), device).context("query images")?;
    Ok((t.to_dtype(DType::F32)? / 255.0)?)
}
