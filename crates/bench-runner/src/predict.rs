//! `fewshot predict`: classify a folder of query images given a support folder
//! with one sub-folder per class, using a trained checkpoint.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{images_to_tensor, ops, Checkpoint, EpisodeTensors};
use fewshot_data::{load_class_folder, load_image_files, Rng};
use serde_json::json;

use crate::run_dir::experiment_of;
use crate::{datasets, evaluation, learners};

/// The support set is the user's, with distorted copies of each image when
/// the experiment's evaluation adds them, as its test episodes did
/// (`support_copies` changes their count, as `eval --support-copies` does).
pub fn run(
    checkpoint: &Path,
    support: &Path,
    query: &Path,
    support_copies: Option<usize>,
    device: &Device,
    as_json: bool,
) -> Result<()> {
    let ckpt = Checkpoint::load(checkpoint, device)?;
    let experiment = experiment_of(&ckpt, checkpoint)?;
    let learner = learners::from_checkpoint(&ckpt, device)?;
    let preprocess = datasets::preprocess(&experiment.data)?;

    let (support_store, classes) = load_class_folder(support, &preprocess)?;
    if classes.classes.len() < 2 {
        bail!(
            "{}: needs at least 2 class folders, found {}",
            support.display(),
            classes.classes.len()
        );
    }
    let (query_files, query_store) = load_image_files(query, &preprocess)?;
    let mut support_pixels = Vec::new();
    let mut support_labels = Vec::new();
    for (label, class) in classes.classes.iter().enumerate() {
        for &image in &class.images {
            support_pixels.extend_from_slice(support_store.image(image as usize));
            support_labels.push(label as u32);
        }
    }
    // Square: the folder loader resizes every image to the model's side.
    let shape @ (channels, side, _) = support_store.shape();
    if let Some(copies) = evaluation::support_copies(support_copies, &experiment) {
        // Seeded, so the same folders always get the same answer.
        let mut rng = Rng::seed_from(experiment.evaluation.seed, 0);
        let (pixels, labels, _) =
            copies.expand(&support_pixels, &support_labels, channels, side, &mut rng);
        (support_pixels, support_labels) = (pixels, labels);
    }
    // Read as the model's training images were (`data.normalize`).
    let normalization = datasets::normalization(&experiment.data)?;
    let images = |pixels: &[u8], count: usize, shape| {
        images_to_tensor(
            pixels,
            count,
            shape,
            normalization.as_ref(),
            device,
            DType::F32,
        )
    };
    let episode = EpisodeTensors {
        ways: classes.classes.len(),
        support: images(&support_pixels, support_labels.len(), shape)?,
        support_labels: Tensor::from_vec(support_labels.clone(), support_labels.len(), device)?,
        query: images(query_store.pixels(), query_store.len(), query_store.shape())?,
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
