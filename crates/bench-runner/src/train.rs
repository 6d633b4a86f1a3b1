//! `fewshot train CONFIG`: meta-training with periodic validation, atomic
//! checkpoints, exact resume, then the test evaluation and the report.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use fewshot_backbone::{Checkpoint, EpisodeTensors, Learner};
use fewshot_data::SplitName;
use fewshot_eval::{EvalError, EvalProtocol, TrainingRecord};

use crate::config::{DatasetKind, ExperimentConfig};
use crate::continuation::{self, NextStepProbe};
use crate::datasets;
use crate::evaluation;
use crate::interrupt::StopRequest;
use crate::learners;
use crate::progress;
use crate::run_dir::{Progress, RunDir, VAL_ACCURACY};
use crate::step_clock::StepClock;

/// Training records are the mean over this many steps.
const LOG_EVERY: u64 = 20;

/// Validation episodes come from their own seed stream, fixed for the run.
const VALIDATION_SEED_OFFSET: u64 = 0x5EED;

pub struct TrainOptions {
    pub config: PathBuf,
    pub out: Option<PathBuf>,
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps in total, to continue
    /// later with `--resume`.
    pub stop_after: Option<u64>,
    /// Resume even where this build would not continue the run bit for bit.
    pub resume_anyway: bool,
}

pub fn run(options: &TrainOptions) -> Result<()> {
    let mut config = ExperimentConfig::from_file(&options.config)?;
    // A folder's channel count, when not given, is found from its files
    // here and kept in the run's config and checkpoints, so that `eval` and
    // `predict` read images as the model was trained on them.
    if config.data.dataset == DatasetKind::Folder && config.data.channels.is_none() {
        config.data.channels = Some(datasets::preprocess(&config.data)?.channels);
        config
            .fill_learner_section()
            .with_context(|| format!("config {}", options.config.display()))?;
    }
    if config.algorithm.is_empty() {
        bail!(
            "config {}: no `algorithm` section: nothing to train (known: {})",
            options.config.display(),
            learners::ALGORITHMS.join(", ")
        );
    }
    let run = RunDir::new(
        options
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&config.name)),
    );
    prepare_run_dir(&run, &config, options.resume)?;

    let device = config.device_choice()?.open()?;
    let loaded = datasets::load(&config.data, config.seed)?;
    let data = &loaded.dataset;
    tracing::info!(
        dataset = %data.name,
        images = data.store.len(),
        seconds = loaded.load_time.as_secs_f64(),
        "data loaded"
    );
    let algorithm = serde_json::Value::Object(config.algorithm.clone());
    let mut learner = learners::build(&algorithm, &device)?;
    let sampler = datasets::training_sampler(&config, data)?;
    // The batch of the step after `step` steps.
    let batch_after = |step: u64| -> Result<Vec<EpisodeTensors>> {
        let first = step * config.training.meta_batch as u64;
        Ok(sampler
            .episodes(first, config.training.meta_batch)
            .iter()
            .map(|e| EpisodeTensors::from_episode(e, &device, DType::F32))
            .collect::<fewshot_backbone::Result<_>>()?)
    };
    // What the next step computes from `state` after `step` steps.
    let probe = |state: &fewshot_backbone::ParamSet, step: u64| {
        let mut fresh = learners::build(&algorithm, &device)?;
        NextStepProbe::compute(&mut *fresh, state, &batch_after(step)?)
    };

    let mut progress = Progress::default();
    let mut unfinished_validation = false;
    let mut resumed_probe = None;
    if let (false, Some(path)) = (options.resume, &config.training.init_from) {
        let context = || format!("field `training.init_from`: {}", path.display());
        let source = Checkpoint::load(path, &device).with_context(context)?;
        let report = fewshot_backbone::warm_start(&mut *learner, &source).with_context(context)?;
        tracing::info!(
            copied = report.copied.len(),
            "weights taken from {}; kept fresh: [{}]; not used: [{}]",
            path.display(),
            report.kept_fresh.join(", "),
            report.unused.join(", ")
        );
    }
    if options.resume {
        let path = run.last_checkpoint();
        let checkpoint = Checkpoint::load(&path, &device)?;
        learner.load_state(&checkpoint.tensors)?;
        progress = Progress::from_metadata(&checkpoint.extra, &path)?;
        resumed_probe = Some(check_continuation(
            &checkpoint,
            &path,
            probe(&checkpoint.tensors, progress.step)?,
            options.resume_anyway,
        )?);
        let kept = run.truncate_metrics(progress.step)?;
        // Every checkpoint comes with a record of its step, except the one
        // written just before a validation that did not finish.
        unfinished_validation = !kept.iter().any(|r| r.step == progress.step);
        tracing::info!(step = progress.step, "resumed from {}", path.display());
    }

    let validation = (!data.val.classes.is_empty()).then(|| EvalProtocol {
        episodes: config.training.validation_episodes,
        seed: config.seed.wrapping_add(VALIDATION_SEED_OFFSET),
        spec: config.test_episodes.spec(),
        split: SplitName::Val,
        support_copies: None,
    });
    // The last checkpoint, with the probe of the step after it.
    let save_last = |learner: &dyn Learner, progress: &Progress, next: NextStepProbe| {
        save(
            learner,
            progress,
            &config,
            &run.last_checkpoint(),
            Some(next),
        )
    };
    let stop_request = StopRequest::install()?;
    // Validates at `progress.step` and keeps the best checkpoint.
    let validate_now = |learner: &dyn Learner, progress: &mut Progress, protocol: &EvalProtocol| {
        let accuracy = validate(learner, data, protocol, &device, &stop_request)?;
        if let Some(accuracy) = accuracy {
            keep_if_best(learner, accuracy, progress, &config, &run)?;
        }
        anyhow::Ok(accuracy)
    };
    if let (true, Some(protocol)) = (unfinished_validation, &validation) {
        let Some(accuracy) = validate_now(&*learner, &mut progress, protocol)? else {
            print_how_to_continue(options, &run, &progress, config.training.steps, true);
            return Ok(());
        };
        let next = resumed_probe.context("a resumed run has its probe")?;
        save_last(&*learner, &progress, next)?;
        run.append_metrics(&TrainingRecord {
            step: progress.step,
            seconds: progress.training_seconds,
            // The training steps' means went with the stopped process.
            loss: f64::NAN,
            accuracy: f64::NAN,
            val_accuracy: Some(accuracy),
        })?;
        tracing::info!(
            step = progress.step,
            "validation the stopped run did not finish: {:.2}%",
            100.0 * accuracy
        );
    }

    let total = config.training.steps;
    let stop = options.stop_after.unwrap_or(total).min(total);
    let bar = progress::bar(total, "train");
    bar.set_position(progress.step);
    let mut window = Window::default();
    // Training time is the steps' time: validation, checkpoints and the
    // time the process spent stopped are left out.
    let mut clock = StepClock::install()?;
    // This process's own pace, for the time-to-go estimate after a resume.
    let (start_step, start_seconds) = (progress.step, progress.training_seconds);
    let mut validation_stopped = false;
    while progress.step < stop {
        let (stats, took) =
            clock.time(|| -> Result<_> { Ok(learner.meta_train(&batch_after(progress.step)?)?) });
        let stats = stats?;
        progress.training_seconds += took.as_secs_f64();
        progress.step += 1;
        window.add(stats.loss, stats.accuracy);
        bar.inc(1);

        let validate = progress.step % config.training.validate_every == 0 || progress.step == stop;
        if progress.step % LOG_EVERY == 0 || validate {
            let mut record = window.record(progress.step, progress.training_seconds);
            if validate {
                let next = probe(&learner.state()?, progress.step)?;
                if let Some(protocol) = &validation {
                    // The step's checkpoint first: a kill or a stop during
                    // the validation then loses only the validation, which
                    // the resumed run does first.
                    save_last(&*learner, &progress, next)?;
                    let Some(accuracy) = validate_now(&*learner, &mut progress, protocol)? else {
                        validation_stopped = true;
                        break;
                    };
                    record.val_accuracy = Some(accuracy);
                }
                save_last(&*learner, &progress, next)?;
                let seconds_per_step = (progress.training_seconds - start_seconds)
                    / (progress.step - start_step) as f64;
                // A line in the log for runs whose bar nobody sees (stderr
                // to a file), and a record above the bar for those who do.
                bar.suspend(|| {
                    tracing::info!(
                        "step {}/{total}: {}; {seconds_per_step:.3} s/step, {} to go",
                        progress.step,
                        record_message(&record, progress.best_val_accuracy),
                        fewshot_eval::duration(seconds_per_step * (total - progress.step) as f64)
                    )
                });
            }
            bar.set_message(record_message(&record, progress.best_val_accuracy));
            run.append_metrics(&record)?;
            window = Window::default();
        }
        if stop_request.is_requested() && progress.step < stop {
            if window.steps > 0 {
                run.append_metrics(&window.record(progress.step, progress.training_seconds))?;
            }
            let next = probe(&learner.state()?, progress.step)?;
            save_last(&*learner, &progress, next)?;
            tracing::info!(step = progress.step, "interrupted: checkpoint written");
            break;
        }
    }
    let interrupted = stop_request.is_requested();
    stop_request.end_process_on_signal();
    if progress.step < total || validation_stopped {
        // The bar stays where the run stopped (`finish` would fill it).
        bar.abandon();
        print_how_to_continue(options, &run, &progress, total, validation_stopped);
        return Ok(());
    }
    bar.finish();
    println!(
        "trained {total} steps in {:.0} s",
        progress.training_seconds
    );
    if interrupted {
        println!(
            "interrupted before the test evaluation; run it with: fewshot eval {}",
            run.root.display()
        );
        return Ok(());
    }
    evaluation::evaluate_run(&run, &device)
}

fn prepare_run_dir(run: &RunDir, config: &ExperimentConfig, resume: bool) -> Result<()> {
    let has_run = run.last_checkpoint().exists();
    if resume {
        if !has_run {
            bail!(
                "nothing to resume: {} does not exist",
                run.last_checkpoint().display()
            );
        }
        let mut saved = ExperimentConfig::from_file(&run.config())?;
        // `keep_best` changes which checkpoints are kept, not the training.
        let saved_keep_best = saved.training.keep_best;
        saved.training.keep_best = config.training.keep_best;
        if &saved != config {
            bail!(
                "the config differs from the one {} was started with ({}): resume with the same config",
                run.root.display(),
                run.config().display()
            );
        }
        if saved_keep_best != config.training.keep_best {
            tracing::info!(
                "training.keep_best changed from {saved_keep_best} to {}",
                config.training.keep_best
            );
            fewshot_backbone::write_atomic(
                &run.config(),
                serde_json::to_string_pretty(config)?.as_bytes(),
            )?;
        }
        return Ok(());
    }
    if has_run {
        bail!(
            "{} already holds a run: pass --resume to continue it, or --out DIR for a new one",
            run.root.display()
        );
    }
    std::fs::create_dir_all(&run.root)
        .with_context(|| format!("cannot create {}", run.root.display()))?;
    fewshot_backbone::write_atomic(
        &run.config(),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )?;
    // A fresh run starts a fresh log.
    let _ = std::fs::remove_file(run.metrics());
    Ok(())
}

/// Says where the run stopped (after its step, or during that step's
/// validation) and how to go on.
fn print_how_to_continue(
    options: &TrainOptions,
    run: &RunDir,
    progress: &Progress,
    total: u64,
    during_validation: bool,
) {
    let step = progress.step;
    let stopped = if during_validation {
        format!("during the validation of step {step}")
    } else {
        format!("after step {step} of {total}")
    };
    println!(
        "stopped {stopped}; continue with: fewshot train {} --out {} --resume",
        options.config.display(),
        run.root.display()
    );
}

/// The learner's mean validation accuracy; `None` if a stop was asked for
/// during the validation.
fn validate(
    learner: &dyn Learner,
    data: &fewshot_data::FewShotDataset,
    protocol: &EvalProtocol,
    device: &Device,
    stop_request: &StopRequest,
) -> Result<Option<f64>> {
    let evaluation = fewshot_eval::evaluate(
        learner,
        data.store.clone(),
        data.split(protocol.split),
        protocol,
        device,
        &mut |_| stop_request.control_flow(),
    );
    match evaluation {
        Ok(evaluation) => Ok(Some(evaluation.accuracy.mean)),
        Err(EvalError::Stopped { .. }) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Keeps the learner's checkpoint as the best if `accuracy` is the best
/// validation so far.
fn keep_if_best(
    learner: &dyn Learner,
    accuracy: f64,
    progress: &mut Progress,
    config: &ExperimentConfig,
    run: &RunDir,
) -> Result<()> {
    if progress
        .best_val_accuracy
        .is_none_or(|best| accuracy > best)
    {
        progress.best_val_accuracy = Some(accuracy);
        save(learner, progress, config, &run.best_checkpoint(), None)?;
    }
    if config.training.keep_best > 1 {
        keep_if_among_the_best(learner, accuracy, progress, config, run)?;
    }
    Ok(())
}

/// Keeps the learner's checkpoint in `checkpoints/validated/` if `accuracy`
/// is among the `training.keep_best` best validations kept there, and
/// removes the ones that drop out (of equal accuracies the earlier stays).
fn keep_if_among_the_best(
    learner: &dyn Learner,
    accuracy: f64,
    progress: &Progress,
    config: &ExperimentConfig,
    run: &RunDir,
) -> Result<()> {
    let keep = config.training.keep_best;
    let mut kept = run.validated_checkpoints()?;
    // A validation run again after a resume replaces its step's file.
    kept.retain(|c| c.step != progress.step);
    let rank = kept.iter().filter(|c| c.accuracy >= accuracy).count();
    let old_ones_kept = if rank < keep {
        // Kept for evaluation only, so a third of a training checkpoint's size.
        let mut checkpoint = learner.checkpoint()?.without_optimizer_state()?;
        checkpoint.extra = progress.to_metadata(config)?;
        checkpoint
            .extra
            .insert(VAL_ACCURACY.into(), accuracy.to_string());
        let path = run.validated_checkpoint(progress.step);
        std::fs::create_dir_all(run.validated_dir())
            .with_context(|| format!("cannot create {}", run.validated_dir().display()))?;
        checkpoint.save(&path)?;
        keep - 1
    } else {
        keep
    };
    for dropped in kept.iter().skip(old_ones_kept) {
        std::fs::remove_file(&dropped.path)
            .with_context(|| format!("cannot remove {}", dropped.path.display()))?;
    }
    Ok(())
}

/// Writes the learner's checkpoint; the last one carries the probe of the
/// step after it, which `--resume` checks.
fn save(
    learner: &dyn Learner,
    progress: &Progress,
    config: &ExperimentConfig,
    path: &std::path::Path,
    next_step: Option<NextStepProbe>,
) -> Result<()> {
    let mut checkpoint = learner.checkpoint()?;
    checkpoint.extra = progress.to_metadata(config)?;
    if let Some(probe) = next_step {
        checkpoint
            .extra
            .insert(continuation::METADATA_KEY.into(), probe.to_metadata());
    }
    checkpoint.save(path)?;
    Ok(())
}

/// Compares this build's next step from a resumed checkpoint with the one
/// recorded in it, and returns this build's.
fn check_continuation(
    checkpoint: &Checkpoint,
    path: &std::path::Path,
    here: NextStepProbe,
    resume_anyway: bool,
) -> Result<NextStepProbe> {
    let Some(text) = checkpoint.extra.get(continuation::METADATA_KEY) else {
        tracing::warn!(
            "{} holds no record of its next step (written by an older fewshot): \
             cannot check that this build continues the run bit for bit",
            path.display()
        );
        return Ok(here);
    };
    let recorded =
        NextStepProbe::from_metadata(text).with_context(|| path.display().to_string())?;
    match here.check_against(recorded, path) {
        Err(drift) if resume_anyway => {
            tracing::warn!("{drift:#}; going on (--resume-anyway)");
            Ok(here)
        }
        result => result.map(|()| here),
    }
}

fn record_message(record: &TrainingRecord, best: Option<f64>) -> String {
    let mut message = format!(
        "loss {:.3} acc {:.1}%",
        record.loss,
        100.0 * record.accuracy
    );
    if let Some(val) = record.val_accuracy {
        message.push_str(&format!(" val {:.2}%", 100.0 * val));
    }
    if let Some(best) = best {
        message.push_str(&format!(" best val {:.2}%", 100.0 * best));
    }
    message
}

/// Running means of the steps since the last record.
#[derive(Default)]
struct Window {
    loss: f64,
    accuracy: f64,
    steps: u64,
}

impl Window {
    fn add(&mut self, loss: f64, accuracy: f64) {
        self.loss += loss;
        self.accuracy += accuracy;
        self.steps += 1;
    }

    fn record(&self, step: u64, seconds: f64) -> TrainingRecord {
        let n = self.steps.max(1) as f64;
        TrainingRecord {
            step,
            seconds,
            loss: self.loss / n,
            accuracy: self.accuracy / n,
            val_accuracy: None,
        }
    }
}
