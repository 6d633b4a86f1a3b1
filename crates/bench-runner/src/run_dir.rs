//! The run directory a training run writes, and the checkpoint metadata that
//! lets a run resume exactly where it stopped.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fewshot_backbone::{write_atomic, Checkpoint};
use fewshot_eval::TrainingRecord;

use crate::config::ExperimentConfig;

/// Paths inside a run directory.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn last_checkpoint(&self) -> PathBuf {
        self.root.join("checkpoints").join("last.safetensors")
    }
    pub fn best_checkpoint(&self) -> PathBuf {
        self.root.join("checkpoints").join("best.safetensors")
    }
    /// Where `training.keep_best` above 1 keeps the best validated checkpoints.
    pub fn validated_dir(&self) -> PathBuf {
        self.root.join("checkpoints").join("validated")
    }
    pub fn validated_checkpoint(&self, step: u64) -> PathBuf {
        self.validated_dir()
            .join(format!("step-{step:08}.safetensors"))
    }

    /// The kept validated checkpoints, best first; of equal ones the
    /// earlier step first.
    pub fn validated_checkpoints(&self) -> Result<Vec<ValidatedCheckpoint>> {
        let dir = self.validated_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        let mut kept = Vec::new();
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot read {}", dir.display()))?
                .path();
            if path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let metadata = Checkpoint::read_metadata(&path)?;
            let step = Progress::from_metadata(&metadata, &path)?.step;
            let accuracy = metadata
                .get(VAL_ACCURACY)
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| {
                    format!(
                        "{}: no `{VAL_ACCURACY}` metadata: not a validated checkpoint",
                        path.display()
                    )
                })?;
            kept.push(ValidatedCheckpoint {
                path,
                step,
                accuracy,
            });
        }
        kept.sort_by(|a, b| b.accuracy.total_cmp(&a.accuracy).then(a.step.cmp(&b.step)));
        Ok(kept)
    }

    pub fn results(&self) -> PathBuf {
        self.root.join("results.json")
    }

    /// The checkpoint to evaluate: the best by validation, else the last.
    pub fn checkpoint_to_evaluate(&self) -> PathBuf {
        let best = self.best_checkpoint();
        if best.exists() {
            best
        } else {
            self.last_checkpoint()
        }
    }

    pub fn read_metrics(&self) -> Result<Vec<TrainingRecord>> {
        Ok(self
            .read_metric_lines()?
            .into_iter()
            .map(|(_, record)| record)
            .collect())
    }

    /// Every record of metrics.jsonl with the line it was read from.
    fn read_metric_lines(&self) -> Result<Vec<(String, TrainingRecord)>> {
        let path = self.metrics();
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let record = serde_json::from_str(line).with_context(|| {
                    format!("{}:{}: not a metrics record", path.display(), i + 1)
                })?;
                Ok((line.to_string(), record))
            })
            .collect()
    }

    /// Keeps only the records up to `step`, what a resumed run has not
    /// lost, and returns them. The kept lines are written back as they were
    /// read: serde_json parses a float only to within an ulp, so writing
    /// the parsed records again could change logged figures.
    pub fn truncate_metrics(&self, step: u64) -> Result<Vec<TrainingRecord>> {
        let kept: Vec<(String, TrainingRecord)> = self
            .read_metric_lines()?
            .into_iter()
            .filter(|(_, record)| record.step <= step)
            .collect();
        let mut text = String::new();
        for (line, _) in &kept {
            text.push_str(line);
            text.push('\n');
        }
        write_atomic(&self.metrics(), text.as_bytes())?;
        Ok(kept.into_iter().map(|(_, record)| record).collect())
    }

    pub fn append_metrics(&self, record: &TrainingRecord) -> Result<()> {
        let path = self.metrics();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(record)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A checkpoint kept for its validation accuracy (`training.keep_best`).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedCheckpoint {
    pub path: PathBuf,
    pub step: u64,
    pub accuracy: f64,
}

/// The validation accuracy of a kept validated checkpoint, in its metadata.
pub const VAL_ACCURACY: &str = "val_accuracy";

/// Where a run stands; stored in every checkpoint's metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Meta-training steps done.
    pub step: u64,
    pub best_val_accuracy: Option<f64>,
    pub training_seconds: f64,
}

const EXPERIMENT: &str = "experiment";
const STEP: &str = "step";
const BEST_VAL: &str = "best_val_accuracy";
const SECONDS: &str = "training_seconds";

impl Progress {
    pub fn to_metadata(&self, experiment: &ExperimentConfig) -> Result<BTreeMap<String, String>> {
        let mut extra = BTreeMap::new();
        extra.insert(EXPERIMENT.into(), serde_json::to_string(experiment)?);
        extra.insert(STEP.into(), self.step.to_string());
        if let Some(best) = self.best_val_accuracy {
            extra.insert(BEST_VAL.into(), best.to_string());
        }
        extra.insert(SECONDS.into(), self.training_seconds.to_string());
        Ok(extra)
    }

    pub fn from_metadata(metadata: &BTreeMap<String, String>, path: &Path) -> Result<Self> {
        let field = |key: &str| -> Result<Option<f64>> {
            metadata
                .get(key)
                .map(|v| v.parse::<f64>())
                .transpose()
                .with_context(|| format!("{}: metadata `{key}` is not a number", path.display()))
        };
        Ok(Self {
            step: field(STEP)?.unwrap_or(0.0) as u64,
            best_val_accuracy: field(BEST_VAL)?,
            training_seconds: field(SECONDS)?.unwrap_or(0.0),
        })
    }
}

/// The experiment a checkpoint was trained in (dataset, episodes, protocol).
pub fn experiment_of(checkpoint: &Checkpoint, path: &Path) -> Result<ExperimentConfig> {
    let text = checkpoint.extra.get(EXPERIMENT).with_context(|| {
        format!(
            "{}: no `{EXPERIMENT}` metadata: not written by `fewshot train`",
            path.display()
        )
    })?;
    ExperimentConfig::from_json(text)
        .with_context(|| format!("{}: metadata `{EXPERIMENT}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncating_the_metrics_keeps_the_kept_lines_byte_for_byte() {
        let root = std::env::temp_dir().join(format!("fewshot-run-dir-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let run = RunDir::new(root.clone());
        // 0.9818749999999999 is what serde_json wrote for a logged accuracy;
        // read without its float_roundtrip feature it comes back one ulp
        // off and would be written again as 0.981875.
        let kept = concat!(
            "{\"step\":20,\"seconds\":1.5,\"loss\":0.25,\"accuracy\":0.9818749999999999,\"val_accuracy\":null}\n",
            "{\"step\":40,\"seconds\":3.0,\"loss\":0.125,\"accuracy\":0.985625,\"val_accuracy\":0.9749999999999995}\n",
        );
        let lost =
            "{\"step\":60,\"seconds\":4.5,\"loss\":0.1,\"accuracy\":0.99,\"val_accuracy\":null}\n";
        std::fs::write(run.metrics(), format!("{kept}{lost}")).unwrap();

        let records = run.truncate_metrics(40).unwrap();

        assert_eq!(records.iter().map(|r| r.step).collect::<Vec<_>>(), [20, 40]);
        assert_eq!(std::fs::read_to_string(run.metrics()).unwrap(), kept);
        std::fs::remove_dir_all(root).unwrap();
    }
}
