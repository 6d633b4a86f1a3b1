//! Checkpoints: a parameter set in a safetensors file, with the algorithm name
//! and its config embedded as metadata so the file alone rebuilds the learner.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use safetensors::SafeTensors;

use crate::error::{BackboneError, Result};
use crate::learner::OPTIMIZER_PREFIX;
use crate::params::ParamSet;

/// Version of the metadata layout below.
pub const CHECKPOINT_FORMAT: &str = "fewshot-checkpoint/1";

const KEY_FORMAT: &str = "format";
const KEY_ALGORITHM: &str = "algorithm";
const KEY_CONFIG: &str = "config";

#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The config name of the algorithm, e.g. `"maml"`.
    pub algorithm: String,
    /// The learner's full config, enough to rebuild it.
    pub config: serde_json::Value,
    pub tensors: ParamSet,
    /// Any other string metadata (training step, metrics, ...).
    pub extra: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Writes the checkpoint atomically: a killed process leaves either the old
    /// file or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut metadata: HashMap<String, String> = self.extra.clone().into_iter().collect();
        metadata.insert(KEY_FORMAT.into(), CHECKPOINT_FORMAT.into());
        metadata.insert(KEY_ALGORITHM.into(), self.algorithm.clone());
        metadata.insert(KEY_CONFIG.into(), self.config.to_string());
        let tensors: Vec<(&str, candle_core::Tensor)> = self
            .tensors
            .iter()
            .map(|(name, t)| Ok((name, t.contiguous()?)))
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| {
            BackboneError::Checkpoint {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        write_atomic(path, &bytes)
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|error| BackboneError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad_file(path, format!("not a safetensors file ({e})")))?;
        let mut extra = checked_metadata(path, header.metadata().clone().unwrap_or_default())?;
        let algorithm = extra
            .remove(KEY_ALGORITHM)
            .ok_or_else(|| bad_file(path, format!("metadata `{KEY_ALGORITHM}` is missing")))?;
        let config_text = extra
            .remove(KEY_CONFIG)
            .ok_or_else(|| bad_file(path, format!("metadata `{KEY_CONFIG}` is missing")))?;
        let config = serde_json::from_str(&config_text)
            .map_err(|e| bad_file(path, format!("metadata `{KEY_CONFIG}` is not JSON: {e}")))?;
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let mut names: Vec<&String> = loaded.keys().collect();
        names.sort();
        let mut tensors = ParamSet::new();
        for name in names {
            let tensor = &loaded[name];
            // f64 entries (the optimiser's step count) stay on the host:
            // some devices (Metal) have no f64.
            let tensor = match tensor.dtype() {
                DType::F64 => tensor.clone(),
                _ => tensor.to_device(device)?,
            };
            tensors.insert(name.clone(), tensor)?;
        }
        Ok(Self {
            algorithm,
            config,
            tensors,
            extra,
        })
    }

    /// The metadata [`Checkpoint::extra`] of the file at `path` (training
    /// step, metrics, ...), from its header alone: for listing checkpoints
    /// without loading their tensors.
    pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
        let io = |error| BackboneError::Io {
            path: path.to_path_buf(),
            error,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| bad_file(path, format!("not a safetensors file ({e})")))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len.saturating_sub(8) {
            return Err(bad_file(
                path,
                format!("not a safetensors file (a header of {header_len} bytes in a file of {file_len})"),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header: SafetensorsHeader = serde_json::from_slice(&header)
            .map_err(|e| bad_file(path, format!("not a safetensors file (header: {e})")))?;
        let mut extra = checked_metadata(path, header.metadata.unwrap_or_default())?;
        extra.remove(KEY_ALGORITHM);
        extra.remove(KEY_CONFIG);
        Ok(extra)
    }

    /// The same checkpoint without its optimiser's state (the Adam moments,
    /// two thirds of a training checkpoint): what evaluating it needs.
    pub fn without_optimizer_state(mut self) -> Result<Self> {
        let mut weights = ParamSet::new();
        for (name, tensor) in self.tensors.iter() {
            if !name.starts_with(OPTIMIZER_PREFIX) {
                weights.insert(name, tensor.clone())?;
            }
        }
        self.tensors = weights;
        Ok(self)
    }
}

/// The part of a safetensors header this module reads: its string metadata
/// (the tensors' entries are ignored).
#[derive(serde::Deserialize)]
struct SafetensorsHeader {
    #[serde(rename = "__metadata__")]
    metadata: Option<HashMap<String, String>>,
}

fn bad_file(path: &Path, message: String) -> BackboneError {
    BackboneError::Checkpoint {
        path: path.to_path_buf(),
        message,
    }
}

/// A file's metadata once its format is checked to be this project's, the
/// format entry removed.
fn checked_metadata(
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut extra: BTreeMap<String, String> = metadata.into_iter().collect();
    match extra.remove(KEY_FORMAT) {
        Some(f) if f == CHECKPOINT_FORMAT => Ok(extra),
        other => Err(bad_file(
            path,
            format!(
                "metadata `{KEY_FORMAT}` is {other:?}, expected {CHECKPOINT_FORMAT:?}: \
                 not a checkpoint written by this project"
            ),
        )),
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it
/// over `path`, so readers see the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| BackboneError::Io { path, error }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = temp_path(path);
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn round_trips_tensors_config_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/model.safetensors");
        let mut tensors = ParamSet::new();
        tensors
            .insert(
                "conv0.weight",
                Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap(),
            )
            .unwrap();
        tensors
            .insert("head.bias", Tensor::new(&[0.5f64], &Device::Cpu).unwrap())
            .unwrap();
        let ckpt = Checkpoint {
            algorithm: "maml".into(),
            config: serde_json::json!({"ways": 5, "inner_lr": 0.4}),
            tensors,
            extra: BTreeMap::from([("step".to_string(), "42".to_string())]),
        };
        ckpt.save(&path).unwrap();
        let back = Checkpoint::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.algorithm, "maml");
        assert_eq!(back.config, ckpt.config);
        assert_eq!(back.extra.get("step").map(String::as_str), Some("42"));
        let w: Vec<f32> = back.tensors.get("conv0.weight").unwrap().to_vec1().unwrap();
        assert_eq!(w, vec![1., 2., 3.]);
        assert_eq!(
            back.tensors.get("head.bias").unwrap().dtype(),
            candle_core::DType::F64
        );
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn metadata_is_read_from_the_header_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut tensors = ParamSet::new();
        let weight = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        tensors.insert("conv0.weight", weight.clone()).unwrap();
        tensors
            .insert(format!("{OPTIMIZER_PREFIX}m.conv0.weight"), weight)
            .unwrap();
        let ckpt = Checkpoint {
            algorithm: "protonet".into(),
            config: serde_json::json!({"ways": 20}),
            tensors,
            extra: BTreeMap::from([
                ("step".to_string(), "7".to_string()),
                ("val_accuracy".to_string(), "0.97".to_string()),
            ]),
        };
        ckpt.save(&path).unwrap();
        assert_eq!(Checkpoint::read_metadata(&path).unwrap(), ckpt.extra);
        // The header is all it reads: the tensors' bytes may be cut off.
        let bytes = std::fs::read(&path).unwrap();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..header_end]).unwrap();
        assert_eq!(Checkpoint::read_metadata(&cut).unwrap(), ckpt.extra);
        assert!(Checkpoint::load(&cut, &Device::Cpu).is_err());

        let weights = ckpt.without_optimizer_state().unwrap();
        let names: Vec<&str> = weights.tensors.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["conv0.weight"]);
    }

    #[test]
    fn foreign_and_garbage_files_are_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not at all").unwrap();
        let err = Checkpoint::load(&garbage, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("garbage.safetensors"), "{err}");

        let foreign = dir.path().join("foreign.safetensors");
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("x", t)]), &foreign).unwrap();
        let err = Checkpoint::load(&foreign, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("foreign.safetensors") && err.contains("format"),
            "{err}"
        );

        let missing = dir.path().join("missing.safetensors");
        let err = Checkpoint::load(&missing, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.safetensors"), "{err}");

        for path in [&garbage, &foreign, &missing] {
            let err = Checkpoint::read_metadata(path).unwrap_err().to_string();
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(err.contains(name), "{err}");
        }
        let huge_header = dir.path().join("huge.safetensors");
        std::fs::write(&huge_header, u64::MAX.to_le_bytes()).unwrap();
        let err = Checkpoint::read_metadata(&huge_header)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("huge.safetensors") && err.contains("header"),
            "{err}"
        );
    }
}
