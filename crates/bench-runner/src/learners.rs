//! The one place that turns an algorithm name into a learner. Everything else
//! drives learners through `fewshot_backbone::Learner` alone.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use fewshot_backbone::{Checkpoint, Learner};

/// The algorithms this build knows, by config name.
pub const ALGORITHMS: &[&str] = &[eb_metanet::ALGORITHM];

/// Builds a fresh learner from a config's `algorithm` section.
pub fn build(section: &serde_json::Value, device: &Device) -> Result<Box<dyn Learner>> {
    let name = section
        .get("name")
        .and_then(|n| n.as_str())
        .context("field `algorithm.name`: missing; the algorithm section must name its learner")?;
    let learner: Box<dyn Learner> = match name {
        eb_metanet::ALGORITHM => Box::new(
            eb_metanet::EbMetaNet::from_json(section, device).context("field `algorithm`")?,
        ),
        other => bail!(
            "field `algorithm.name`: unknown algorithm `{other}` (this build knows: {})",
            ALGORITHMS.join(", ")
        ),
    };
    Ok(learner)
}

/// Rebuilds the learner a checkpoint was written from, with its weights.
pub fn from_checkpoint(checkpoint: &Checkpoint, device: &Device) -> Result<Box<dyn Learner>> {
    let mut learner = build(&checkpoint.config, device)?;
    learner.load_state(&checkpoint.tensors)?;
    Ok(learner)
}
