//! The one place that turns an algorithm name into a learner. Everything else
//! drives learners through `fewshot_backbone::Learner` alone.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use fewshot_backbone::{Checkpoint, Learner};

/// The algorithms this build knows, by config name.
pub const ALGORITHMS: &[&str] = &[
    eb_metanet::ALGORITHM,
    maml::ALGORITHM,
    metanet_original::ALGORITHM,
    protonet::ALGORITHM,
];

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
        maml::ALGORITHM => {
            Box::new(maml::Maml::from_json(section, device).context("field `algorithm`")?)
        }
        metanet_original::ALGORITHM => Box::new(
            metanet_original::MetaNetOriginal::from_json(section, device)
                .context("field `algorithm`")?,
        ),
        protonet::ALGORITHM => {
            Box::new(protonet::ProtoNet::from_json(section, device).context("field `algorithm`")?)
        }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::ExperimentConfig;

    #[test]
    fn every_published_config_parses_and_builds_its_learner() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let config = ExperimentConfig::from_file(&path).unwrap();
                let section = serde_json::Value::Object(config.algorithm.clone());
                build(&section, &Device::Cpu)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                checked += 1;
            }
        }
        assert!(checked >= 2, "no configs found in {}", dir.display());
    }

    #[test]
    fn unknown_algorithms_are_named_with_the_known_ones() {
        let err = build(&serde_json::json!({"name": "mammal"}), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("mammal") && err.contains("eb-metanet"),
            "{err}"
        );
    }
}
