//! The one place that turns an algorithm name into a learner. Everything else
//! drives learners through `fewshot_backbone::Learner` alone.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use fewshot_backbone::{Checkpoint, Learner, SharedFields};
use serde_json::{Map, Value};

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

/// Where algorithm `name`'s section keeps what the rest of a config states.
fn shared_fields(name: &str) -> Option<SharedFields> {
    match name {
        eb_metanet::ALGORITHM => Some(eb_metanet::SHARED_FIELDS),
        maml::ALGORITHM => Some(maml::SHARED_FIELDS),
        metanet_original::ALGORITHM => Some(metanet_original::SHARED_FIELDS),
        protonet::ALGORITHM => Some(protonet::SHARED_FIELDS),
        _ => None,
    }
}

/// What an experiment config says outside its algorithm section that a
/// learner's section may state again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExperimentFacts {
    /// The images' channels; `None` where only the files can tell (a folder
    /// not yet read).
    pub channels: Option<usize>,
    pub image_size: usize,
    pub train_ways: usize,
    pub test_ways: usize,
}

/// Makes an algorithm section agree with the rest of its config, so that a
/// config states each setting once: the learner's image shape (`in_channels`,
/// `image_size`) and, for learners with a classifier head, its way counts,
/// where the section leaves them out, are taken from the data and episode
/// sections; where it gives them, they must be equal (else the first step
/// would fail). Running it twice changes nothing. A section without a known
/// algorithm is left to [`build`] to refuse.
pub fn take_shared_fields(
    algorithm: &mut Map<String, Value>,
    facts: ExperimentFacts,
) -> Result<()> {
    let Some(shared) = algorithm
        .get("name")
        .and_then(Value::as_str)
        .and_then(shared_fields)
    else {
        return Ok(());
    };
    let ways = [
        (
            shared.train_ways,
            facts.train_ways,
            "the training episodes' way count (`train_episodes.ways`)",
        ),
        (
            shared.test_ways,
            facts.test_ways,
            "the test episodes' way count (`test_episodes.ways`)",
        ),
    ];
    for (field, value, source) in ways {
        if let Some(field) = field {
            agree(algorithm, "algorithm", field, value, source)?;
        }
    }
    let mut input = algorithm;
    let mut path = String::from("algorithm");
    for key in shared.input.split('/').skip(1) {
        path = format!("{path}.{key}");
        match input
            .entry(key)
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(inner) => input = inner,
            // Not an object: the learner's parser names the field's type.
            _ => return Ok(()),
        }
    }
    if let Some(channels) = facts.channels {
        let source = "the images' channels (`data.dataset`, `data.channels`)";
        agree(input, &path, "in_channels", channels, source)?;
    }
    let source = "the images' side in pixels (`data.image_size`)";
    agree(input, &path, "image_size", facts.image_size, source)
}

/// Sets `fields[field]` to `value` if it is missing; refuses another count.
fn agree(
    fields: &mut Map<String, Value>,
    path: &str,
    field: &str,
    value: usize,
    source: &str,
) -> Result<()> {
    match fields.get(field) {
        None => {
            fields.insert(field.into(), value.into());
        }
        Some(given) if given.as_u64().is_some_and(|given| given != value as u64) => bail!(
            "field `{path}.{field}`: {given}, but {source} is {value}; \
             leave the field out to take that"
        ),
        // Equal, or not a count: the learner's parser names its type.
        Some(_) => {}
    }
    Ok(())
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

    fn facts(channels: Option<usize>, image_size: usize, ways: (usize, usize)) -> ExperimentFacts {
        ExperimentFacts {
            channels,
            image_size,
            train_ways: ways.0,
            test_ways: ways.1,
        }
    }

    fn filled(section: serde_json::Value, facts: ExperimentFacts) -> Result<serde_json::Value> {
        let mut section = section;
        take_shared_fields(section.as_object_mut().unwrap(), facts)?;
        Ok(section)
    }

    #[test]
    fn each_learner_reads_the_fields_where_the_runner_fills_them() {
        for name in ALGORITHMS {
            let section = filled(
                serde_json::json!({ "name": name }),
                facts(Some(3), 32, (7, 7)),
            );
            let learner = build(&section.unwrap(), &Device::Cpu).unwrap();
            let config = learner.config();
            let shared = shared_fields(name).unwrap();
            let input = config.pointer(shared.input).unwrap();
            assert_eq!(input["in_channels"], 3, "{name}: {config}");
            assert_eq!(input["image_size"], 32, "{name}: {config}");
            for field in [shared.train_ways, shared.test_ways].into_iter().flatten() {
                assert_eq!(config[field], 7, "{name}: {config}");
            }
        }
    }

    #[test]
    fn a_field_that_contradicts_the_config_is_refused_by_name() {
        let cases = [
            (
                serde_json::json!({"name": "maml", "network": {"image_size": 28}}),
                (20, 20),
                "`algorithm.network.image_size`: 28, but the images' side in pixels",
            ),
            (
                serde_json::json!({"name": "metanet-original", "in_channels": 3}),
                (20, 5),
                "`algorithm.in_channels`: 3, but the images' channels",
            ),
            (
                serde_json::json!({"name": "maml", "ways": 5}),
                (20, 20),
                "`algorithm.ways`: 5, but the training episodes' way count",
            ),
            // Filled from the training episodes, then checked against the test ones.
            (
                serde_json::json!({"name": "maml"}),
                (20, 5),
                "`algorithm.ways`: 20, but the test episodes' way count",
            ),
        ];
        for (section, ways, expected) in cases {
            let err = filled(section, facts(Some(1), 84, ways))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn agreeing_or_unknown_fields_are_left_as_they_are() {
        let folder = facts(None, 56, (20, 5));
        let section = serde_json::json!({
            "name": "protonet",
            "embedding": {"in_channels": 3, "image_size": 56, "filters": 128}
        });
        assert_eq!(filled(section.clone(), folder).unwrap(), section);
        let section = serde_json::json!({
            "name": "metanet-original", "in_channels": 1, "image_size": 56,
            "n_outputs_train": 20, "n_outputs_test": 5
        });
        assert_eq!(filled(section.clone(), folder).unwrap(), section);
        // A section no learner claims, or a network that is not an object,
        // is for `build` to refuse.
        let equal_ways = facts(None, 56, (20, 20));
        for odd in [
            serde_json::json!({"name": "mammal"}),
            serde_json::json!({"name": "maml", "ways": 20, "network": 5}),
        ] {
            assert_eq!(filled(odd.clone(), equal_ways).unwrap(), odd);
        }
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
