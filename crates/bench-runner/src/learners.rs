//! The one place that turns an algorithm name into a learner. Everything else
//! drives learners through `fewshot_backbone::Learner` alone.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use fewshot_backbone::{Checkpoint, Learner};
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

/// The JSON pointer, inside algorithm `name`'s section, of the object that
/// holds the shape of the images it reads (`in_channels`, `image_size`).
fn input_section(name: &str) -> Option<&'static str> {
    match name {
        eb_metanet::ALGORITHM => Some(eb_metanet::INPUT_SECTION),
        maml::ALGORITHM => Some(maml::INPUT_SECTION),
        metanet_original::ALGORITHM => Some(metanet_original::INPUT_SECTION),
        protonet::ALGORITHM => Some(protonet::INPUT_SECTION),
        _ => None,
    }
}

/// The shape of the images a dataset gives, as the data section says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataInput {
    /// `None` where only the files can tell (a folder not yet read).
    pub channels: Option<usize>,
    pub image_size: usize,
}

/// Makes an algorithm section read the images its data gives, so that a
/// config states their shape once, in its data section: the learner's
/// `in_channels` and `image_size`, where the section leaves them out, are the
/// data's; where it gives them, they must be the data's (else the first step
/// would fail on the images' shape). Running it twice changes nothing. A
/// section without a known algorithm is left to [`build`] to refuse.
pub fn take_input_from_data(algorithm: &mut Map<String, Value>, data: DataInput) -> Result<()> {
    let Some(pointer) = algorithm
        .get("name")
        .and_then(Value::as_str)
        .and_then(input_section)
    else {
        return Ok(());
    };
    let mut fields = algorithm;
    let mut path = String::from("algorithm");
    for key in pointer.split('/').skip(1) {
        path = format!("{path}.{key}");
        match fields
            .entry(key)
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(inner) => fields = inner,
            // Not an object: the learner's parser names the field's type.
            _ => return Ok(()),
        }
    }
    let wanted = [
        (
            "in_channels",
            data.channels,
            "channels (`data.dataset`, `data.channels`)",
        ),
        (
            "image_size",
            Some(data.image_size),
            "pixels a side (`data.image_size`)",
        ),
    ];
    for (field, value, unit) in wanted {
        let Some(value) = value else { continue };
        match fields.get(field) {
            None => {
                fields.insert(field.into(), value.into());
            }
            Some(given) if given.as_u64().is_some_and(|given| given != value as u64) => bail!(
                "field `{path}.{field}`: {given}, but the data's images have {value} {unit}; \
                 leave the field out to take the data's"
            ),
            // Equal, or not a count: the learner's parser names its type.
            Some(_) => {}
        }
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

    #[test]
    fn each_learner_reads_its_input_where_the_data_fills_it() {
        let data = DataInput {
            channels: Some(3),
            image_size: 32,
        };
        for name in ALGORITHMS {
            let mut section = serde_json::json!({ "name": name });
            take_input_from_data(section.as_object_mut().unwrap(), data).unwrap();
            let learner = build(&section, &Device::Cpu).unwrap();
            let config = learner.config();
            let input = config.pointer(input_section(name).unwrap()).unwrap();
            assert_eq!(input["in_channels"], 3, "{name}: {config}");
            assert_eq!(input["image_size"], 32, "{name}: {config}");
        }
    }

    #[test]
    fn a_learner_input_that_contradicts_the_data_is_refused_by_name() {
        let data = DataInput {
            channels: Some(1),
            image_size: 84,
        };
        let mut section = serde_json::json!({"name": "maml", "network": {"image_size": 28}});
        let err = take_input_from_data(section.as_object_mut().unwrap(), data)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("algorithm.network.image_size")
                && err.contains("28")
                && err.contains("84"),
            "{err}"
        );
        let mut section = serde_json::json!({"name": "metanet-original", "in_channels": 3});
        let err = take_input_from_data(section.as_object_mut().unwrap(), data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`algorithm.in_channels`: 3"), "{err}");
    }

    #[test]
    fn agreeing_or_unknown_inputs_are_left_as_they_are() {
        let folder = DataInput {
            channels: None,
            image_size: 56,
        };
        let mut section = serde_json::json!({
            "name": "protonet",
            "embedding": {"in_channels": 3, "image_size": 56, "filters": 128}
        });
        let given = section.clone();
        take_input_from_data(section.as_object_mut().unwrap(), folder).unwrap();
        assert_eq!(section, given);
        // A section no learner claims, or a network that is not an object,
        // is for `build` to refuse.
        for odd in [
            serde_json::json!({"name": "mammal"}),
            serde_json::json!({"name": "maml", "network": 5}),
        ] {
            let mut section = odd.clone();
            take_input_from_data(section.as_object_mut().unwrap(), folder).unwrap();
            assert_eq!(section, odd);
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
