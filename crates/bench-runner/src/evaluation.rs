//! `fewshot eval` and the evaluation at the end of `fewshot train`: the fixed,
//! seeded test episodes of the experiment's protocol, the same for every
//! learner, so that runs can be compared episode by episode.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use fewshot_backbone::Checkpoint;
use fewshot_data::{SplitName, SupportCopies};
use fewshot_eval::{EvalProtocol, Evaluation, ReportInput};
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::run_dir::{experiment_of, Progress, RunDir};
use crate::{datasets, learners, progress};

/// What `results.json` holds, and what `fewshot eval --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub checkpoint: PathBuf,
    pub algorithm: String,
    pub training_steps: u64,
    pub training_seconds: f64,
    pub best_val_accuracy: Option<f64>,
    /// With `fewshot eval --ensemble`: every checkpoint whose logits were
    /// averaged, `checkpoint` first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ensemble: Vec<PathBuf>,
    /// Fields of the learner's section changed for this evaluation
    /// (`fewshot eval --set`), e.g. MAML's `inner_steps_test`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub algorithm_overrides: serde_json::Map<String, serde_json::Value>,
    /// The experiment's data section: how the images were read and
    /// prepared. Episodes are drawn by index, so two evaluations can score
    /// the same episodes with other pixels (`data.resampling`, the image
    /// size): `fewshot compare` names the fields that differ. `None` in
    /// results saved before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    pub evaluation: Evaluation,
}

/// Changes to the experiment's own evaluation protocol.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub episodes: Option<usize>,
    pub seed: Option<u64>,
    /// Test episodes of another shape than the experiment's, e.g. 5-shot
    /// episodes for a model trained on 1-shot ones.
    pub ways: Option<usize>,
    pub shots: Option<usize>,
    pub queries: Option<usize>,
    /// Episodes of another split's classes, e.g. the validation classes to
    /// see how far they predict the test figure.
    pub split: Option<SplitName>,
    /// Test on the characters as drawn, never rotated (the Meta Networks
    /// reference code's protocol); see
    /// [`fewshot_data::ClassSplit::without_rotations`].
    pub unrotated: bool,
    /// Distorted copies per support image (test-time augmentation), under
    /// the experiment's distortions of them or else Koch et al.'s; 0 for
    /// none.
    pub support_copies: Option<usize>,
    /// Fields of the learner's section to change for the test (not the
    /// weights), e.g. MAML's `inner_steps_test`, as its reference code tests
    /// Omniglot with more inner steps than it trains with.
    pub algorithm: serde_json::Map<String, serde_json::Value>,
    /// More checkpoints of the same run whose logits are averaged with the
    /// evaluated one's (`fewshot eval RUN --ensemble`).
    pub ensemble: Vec<PathBuf>,
}

/// The learner of `checkpoint` with `changes` made to its section; the
/// learner's crate checks the changed section, and the weights must still fit.
fn learner_with(
    checkpoint: &Checkpoint,
    changes: &serde_json::Map<String, serde_json::Value>,
    device: &Device,
) -> Result<Box<dyn fewshot_backbone::Learner>> {
    if changes.is_empty() {
        return learners::from_checkpoint(checkpoint, device);
    }
    let section = changed_section(&checkpoint.config, changes)?;
    let mut learner = learners::build(&section, device).context("--set")?;
    learner
        .load_state(&checkpoint.tensors)
        .context("--set: the checkpoint's weights do not fit the changed section")?;
    Ok(learner)
}

/// A learner's config section with the fields of `--set` changed.
fn changed_section(
    section: &serde_json::Value,
    changes: &serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Value> {
    let mut section = section.clone();
    let fields = section
        .as_object_mut()
        .context("the checkpoint's algorithm section is not an object")?;
    for (key, value) in changes {
        if key == "name" {
            anyhow::bail!("--set name: the algorithm of a checkpoint cannot change");
        }
        fields.insert(key.clone(), value.clone());
    }
    Ok(section)
}

/// `KEY=VALUE` of `fewshot eval --set`: VALUE as JSON (`10`, `0.4`,
/// `true`), else as a string (`first`).
pub fn parse_setting(setting: &str) -> Result<(String, serde_json::Value)> {
    let (key, value) = setting
        .split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .with_context(|| format!("--set {setting:?}: expected KEY=VALUE"))?;
    let value = serde_json::from_str(value)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

/// The experiment's support copies, with their count changed to `requested`
/// when given (0: none); for `eval` and `predict` alike.
pub fn support_copies(
    requested: Option<usize>,
    experiment: &ExperimentConfig,
) -> Option<SupportCopies> {
    let configured = experiment.evaluation.support_copies.clone();
    let chosen = match requested {
        None => configured,
        Some(0) => None,
        Some(copies) => Some(SupportCopies {
            copies,
            augment: configured.map(|c| c.augment).unwrap_or_default(),
        }),
    };
    // A model that never saw distorted images embeds them away from the
    // plain queries: on Vinyals' validation classes 16 copies cost the
    // ProtoNets model trained without augmentation 2.9 points.
    if chosen.is_some() && experiment.data.augment.is_none() {
        tracing::warn!(
            "support copies on a model trained without augmentation (no `data.augment` in its \
             config): they are likely to lower its accuracy; see docs/RESULTS.md"
        );
    }
    chosen
}

pub fn evaluate_checkpoint(
    path: &Path,
    device: &Device,
    overrides: Overrides,
) -> Result<(Results, ExperimentConfig)> {
    let checkpoint = Checkpoint::load(path, device)?;
    let experiment = experiment_of(&checkpoint, path)?;
    let progress = Progress::from_metadata(&checkpoint.extra, path)?;
    let mut learner = learner_with(&checkpoint, &overrides.algorithm, device)?;
    let mut ensemble = Vec::new();
    if !overrides.ensemble.is_empty() {
        let mut members = vec![learner];
        for member in &overrides.ensemble {
            let other = Checkpoint::load(member, device)?;
            if other.config != checkpoint.config {
                anyhow::bail!(
                    "--ensemble: {} holds another learner than {} (its algorithm sections differ)",
                    member.display(),
                    path.display()
                );
            }
            members.push(learner_with(&other, &overrides.algorithm, device)?);
        }
        learner = Box::new(fewshot_eval::Ensemble::new(members)?);
        ensemble = std::iter::once(path.to_path_buf())
            .chain(overrides.ensemble.iter().cloned())
            .collect();
    }
    let loaded = datasets::load(&experiment.data, experiment.seed)?;
    let mut spec = experiment.test_episodes.spec();
    spec.ways = overrides.ways.unwrap_or(spec.ways);
    spec.shots = overrides.shots.unwrap_or(spec.shots);
    spec.queries = overrides.queries.unwrap_or(spec.queries);
    let protocol = EvalProtocol {
        episodes: overrides.episodes.unwrap_or(experiment.evaluation.episodes),
        seed: overrides.seed.unwrap_or(experiment.evaluation.seed),
        spec,
        split: overrides.split.unwrap_or(experiment.evaluation.split),
        support_copies: support_copies(overrides.support_copies, &experiment),
    };
    let bar = progress::bar(protocol.episodes as u64, "eval");
    let mut hidden_bar_log = progress::TenthsLog::new("eval", protocol.episodes as u64);
    let data = &loaded.dataset;
    let classes = data.split(protocol.split);
    let classes = if overrides.unrotated {
        Cow::Owned(classes.without_rotations())
    } else {
        Cow::Borrowed(classes)
    };
    let evaluation = fewshot_eval::evaluate(
        &*learner,
        data.store.clone(),
        &classes,
        &protocol,
        device,
        &mut |done| {
            bar.set_position(done as u64);
            if bar.is_hidden() {
                if let Some(line) = hidden_bar_log.line(done as u64) {
                    tracing::info!("{line}");
                }
            }
            ControlFlow::Continue(())
        },
    )?;
    bar.finish_and_clear();
    let results = Results {
        checkpoint: path.to_path_buf(),
        algorithm: checkpoint.algorithm.clone(),
        training_steps: progress.step,
        training_seconds: progress.training_seconds,
        best_val_accuracy: progress.best_val_accuracy,
        ensemble,
        algorithm_overrides: overrides.algorithm,
        data: Some(serde_json::to_value(&experiment.data)?),
        evaluation,
    };
    Ok((results, experiment))
}

/// Evaluates a finished run's best checkpoint and writes `results.json` and the report.
pub fn evaluate_run(run: &RunDir, device: &Device) -> Result<()> {
    let (results, experiment) =
        evaluate_checkpoint(&run.checkpoint_to_evaluate(), device, Overrides::default())?;
    fewshot_backbone::write_atomic(
        &run.results(),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    let training = run.read_metrics()?;
    let notes = vec![format!(
        "Evaluated checkpoint `{}` after {} training steps ({:.0} s of training).",
        results.checkpoint.display(),
        results.training_steps,
        results.training_seconds
    )];
    let config = serde_json::to_value(&experiment)?;
    let report = fewshot_eval::write_report(
        &run.root,
        &ReportInput {
            title: &experiment.name,
            config: &config,
            training: &training,
            evaluation: Some(&results.evaluation),
            notes: &notes,
        },
    )?;
    println!("{}", summary_line(&results));
    println!("report: {}", report.display());
    Ok(())
}

pub fn summary_line(results: &Results) -> String {
    let changes: Vec<String> = results
        .algorithm_overrides
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let mut algorithm = match changes.is_empty() {
        true => results.algorithm.clone(),
        false => format!("{} ({})", results.algorithm, changes.join(", ")),
    };
    if !results.ensemble.is_empty() {
        algorithm.push_str(&format!(
            ", ensemble of {} checkpoints",
            results.ensemble.len()
        ));
    }
    format!(
        "{algorithm}: {}",
        fewshot_eval::accuracy_line(&results.evaluation)
    )
}

/// A run directory's checkpoint to evaluate, or the checkpoint file itself.
pub fn resolve_checkpoint(target: &Path) -> Result<PathBuf> {
    if target.is_dir() {
        let path = RunDir::new(target.to_path_buf()).checkpoint_to_evaluate();
        if !path.exists() {
            anyhow::bail!(
                "{} holds no checkpoint (looked for {})",
                target.display(),
                path.display()
            );
        }
        Ok(path)
    } else if target.exists() {
        Ok(target.to_path_buf())
    } else {
        anyhow::bail!(
            "{} does not exist: give a run directory or a .safetensors checkpoint",
            target.display()
        )
    }
}

/// `ensemble`: average the logits of the run's kept validated checkpoints
/// (`training.keep_best`) instead of testing its best one alone.
pub fn run_eval(
    target: &Path,
    device: &Device,
    mut overrides: Overrides,
    ensemble: bool,
    as_json: bool,
) -> Result<()> {
    let path = match ensemble {
        true => {
            let mut members = ensemble_members(target)?;
            let first = members.remove(0);
            overrides.ensemble = members;
            first
        }
        false => resolve_checkpoint(target)?,
    };
    let (results, _) = evaluate_checkpoint(&path, device, overrides)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("{}", summary_line(&results));
    }
    Ok(())
}

/// The kept validated checkpoints of a run directory, best first.
fn ensemble_members(target: &Path) -> Result<Vec<PathBuf>> {
    if !target.is_dir() {
        anyhow::bail!(
            "--ensemble: {} is not a run directory (it takes the run's kept validated checkpoints)",
            target.display()
        );
    }
    let run = RunDir::new(target.to_path_buf());
    let kept = run.validated_checkpoints()?;
    if kept.is_empty() {
        anyhow::bail!(
            "--ensemble: {} keeps no validated checkpoints (looked in {}); train with `training.keep_best` above 1",
            target.display(),
            run.validated_dir().display()
        );
    }
    for member in &kept {
        tracing::info!(
            step = member.step,
            "ensemble member {}: validation {:.2}%",
            member.path.display(),
            100.0 * member.accuracy
        );
    }
    Ok(kept.into_iter().map(|member| member.path).collect())
}

/// Reads evaluation results: a run directory's `results.json`, or a file
/// written by `fewshot eval --json`.
pub fn read_results(target: &Path) -> Result<Results> {
    let path = if target.is_dir() {
        RunDir::new(target.to_path_buf()).results()
    } else {
        target.to_path_buf()
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read results {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a results file", path.display()))
}

pub fn run_compare(a: &Path, b: &Path, as_json: bool) -> Result<()> {
    let (ra, rb) = (read_results(a)?, read_results(b)?);
    let comparison = fewshot_eval::compare(&ra.evaluation, &rb.evaluation)
        .with_context(|| format!("comparing {} with {}", a.display(), b.display()))?;
    let data_note = match (&ra.data, &rb.data) {
        (Some(da), Some(db)) => data_differences(da, db)
            .map(|fields| format!("note: same episodes, other data: {}", fields.join("; "))),
        _ => None,
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
        if let Some(note) = data_note {
            eprintln!("{note}");
        }
        return Ok(());
    }
    println!("A  {}", summary_line(&ra));
    println!("B  {}", summary_line(&rb));
    if let Some(note) = data_note {
        println!("{note}");
    }
    println!(
        "A - B = {:+.2}% ± {:.2}% (95% CI, paired over {} episodes), t = {:.3}, p = {:.4}",
        100.0 * comparison.mean_difference,
        100.0 * comparison.ci95,
        comparison.n,
        comparison.t_statistic,
        comparison.p_value
    );
    Ok(())
}

/// The fields where two data sections differ, as `field: A vs B` (a field
/// one of them lacks reads `-`); `None` where they agree.
fn data_differences(a: &serde_json::Value, b: &serde_json::Value) -> Option<Vec<String>> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let mut fields: Vec<&String> = a.keys().chain(b.keys()).collect();
    fields.sort();
    fields.dedup();
    let shown = |v: Option<&serde_json::Value>| v.map_or("-".to_string(), |v| v.to_string());
    let differences: Vec<String> = fields
        .into_iter()
        .filter(|field| a.get(*field) != b.get(*field))
        .map(|field| {
            format!(
                "data.{field}: {} vs {}",
                shown(a.get(field)),
                shown(b.get(field))
            )
        })
        .collect();
    (!differences.is_empty()).then_some(differences)
}

/// Copies a run's evaluated checkpoint without optimiser state, with the
/// run's test result line in its metadata. Fields its evaluation changed
/// (`fewshot eval --set`) are written into the model's config, so that
/// `fewshot eval MODEL` repeats the published result.
pub fn publish(run: &Path, model: &Path) -> Result<()> {
    let results = read_results(run)
        .context("publish needs a finished, evaluated run, or the JSON of `fewshot eval --json`")?;
    if !results.ensemble.is_empty() {
        anyhow::bail!(
            "{}: the result of an ensemble of {} checkpoints; a model file holds one: publish an evaluation of one checkpoint",
            run.display(),
            results.ensemble.len()
        );
    }
    let mut checkpoint =
        Checkpoint::load(&results.checkpoint, &Device::Cpu)?.without_optimizer_state()?;
    checkpoint.config = changed_section(&checkpoint.config, &results.algorithm_overrides)?;
    checkpoint
        .extra
        .insert("result".into(), summary_line(&results));
    checkpoint.save(model)?;
    println!(
        "published {} ({}, from {}) to {}",
        results.checkpoint.display(),
        summary_line(&results),
        run.display(),
        model.display()
    );
    Ok(())
}
