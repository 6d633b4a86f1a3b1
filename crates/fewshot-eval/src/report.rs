//! A run's report: `report.md` with the test result, training summary and
//! config, and SVG plots beside it that the Markdown links to.

use std::path::{Path, PathBuf};

use fewshot_backbone::write_atomic;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::plots;
use crate::protocol::Evaluation;

const REPORT_MD: &str = "report.md";
const TRAINING_SVG: &str = "training.svg";
const EPISODES_SVG: &str = "episodes.svg";

/// One logged training step: a line of a run's `metrics.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainingRecord {
    pub step: u64,
    /// Wall-clock seconds of training up to this step.
    pub seconds: f64,
    /// Meta-training loss and accuracy of this step's batch.
    #[serde(deserialize_with = "crate::json_float::nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "crate::json_float::nan_if_null")]
    pub accuracy: f64,
    /// Validation accuracy, on the steps where validation ran.
    pub val_accuracy: Option<f64>,
}

/// What a report is made of; absent parts (no training records, no
/// evaluation, no notes) are left out of it.
pub struct ReportInput<'a> {
    pub title: &'a str,
    pub config: &'a serde_json::Value,
    pub training: &'a [TrainingRecord],
    pub evaluation: Option<&'a Evaluation>,
    pub notes: &'a [String],
}

/// Writes `dir/report.md` and its plots (`training.svg`, `episodes.svg`),
/// each file atomically, and returns the path of `report.md`.
///
/// The plots are written first, so that a report never links to a plot
/// that is not there.
pub fn write_report(dir: &Path, input: &ReportInput) -> Result<PathBuf> {
    // Created up front so that an unwritable place is reported as the
    // directory, not as whichever file happened to come first.
    std::fs::create_dir_all(dir).map_err(|error| EvalError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut lines = vec![format!("# {}", input.title), String::new()];

    if let Some(evaluation) = input.evaluation.filter(|e| !e.episodes.is_empty()) {
        write_svg(&dir.join(EPISODES_SVG), plots::episodes_svg(evaluation))?;
        lines.extend([
            "## Test".to_string(),
            String::new(),
            accuracy_line(evaluation),
            String::new(),
            format!(
                "Per-episode standard deviation {:.2}%; evaluated in {}.",
                evaluation.accuracy.std * 100.0,
                duration(evaluation.seconds)
            ),
            String::new(),
            format!("![Test accuracy per episode]({EPISODES_SVG})"),
            String::new(),
        ]);
    }

    if let Some(last) = input.training.last() {
        write_svg(&dir.join(TRAINING_SVG), plots::training_svg(input.training))?;
        lines.extend(["## Training".to_string(), String::new()]);
        lines.extend(training_table(input.training, last));
        lines.extend([
            String::new(),
            format!("![Training curves]({TRAINING_SVG})"),
            String::new(),
        ]);
    }

    if !input.notes.is_empty() {
        lines.extend(["## Notes".to_string(), String::new()]);
        // Indenting continuation lines keeps a multi-line note in its bullet.
        lines.extend(
            input
                .notes
                .iter()
                .map(|n| format!("- {}", n.replace('\n', "\n  "))),
        );
        lines.push(String::new());
    }

    // `{:#}` pretty-prints a JSON value.
    let config = format!("{:#}", input.config);
    let fence = code_fence(&config);
    lines.extend([
        "## Config".to_string(),
        String::new(),
        format!("{fence}json"),
        config,
        fence,
        String::new(),
    ]);

    let path = dir.join(REPORT_MD);
    write_atomic(&path, lines.join("\n").as_bytes())?;
    Ok(path)
}

/// `accuracy: 98.73% ± 0.25% (95% CI, 1000 episodes, 5-way 1-shot 15-query,
/// split test, seed 1234)`: the result as the papers report it, with
/// everything needed to reproduce the episodes.
pub fn accuracy_line(evaluation: &Evaluation) -> String {
    let protocol = &evaluation.protocol;
    let spec = protocol.spec;
    let within = if spec.same_group { " within-group" } else { "" };
    let copies = match &protocol.support_copies {
        Some(c) if c.copies == 1 => ", 1 distorted copy of each support image".to_string(),
        Some(c) => format!(", {} distorted copies of each support image", c.copies),
        None => String::new(),
    };
    let split = evaluation
        .split_name
        .as_deref()
        .unwrap_or(protocol.split.as_str());
    format!(
        "accuracy: {:.2}% ± {:.2}% (95% CI, {} episodes, {}-way {}-shot {}-query{within}{copies}, split {}, seed {})",
        evaluation.accuracy.mean * 100.0,
        evaluation.accuracy.ci95 * 100.0,
        evaluation.accuracy.n,
        spec.ways,
        spec.shots,
        spec.queries,
        split,
        protocol.seed,
    )
}

/// Steps, time, last training values and final/best validation accuracy.
fn training_table(records: &[TrainingRecord], last: &TrainingRecord) -> Vec<String> {
    // A run resumed after a kill during a validation records that
    // validation without training means (NaN): show the latest there are.
    // (Accuracy, not loss, tells them apart: a diverged run's NaN loss shows.)
    let trained = records
        .iter()
        .rev()
        .find(|r| r.accuracy.is_finite())
        .unwrap_or(last);
    let mut rows = vec![
        "| | |".to_string(),
        "|---|---|".to_string(),
        format!("| steps | {} |", last.step),
        format!("| training time | {} |", duration(last.seconds)),
        format!(
            "| training loss, last record (step {}) | {:.4} |",
            trained.step, trained.loss
        ),
        format!(
            "| training accuracy, last record (step {}) | {:.2}% |",
            trained.step,
            trained.accuracy * 100.0
        ),
    ];
    let validated: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| r.val_accuracy.map(|v| (r.step, v)))
        .collect();
    if let Some(&(step, accuracy)) = validated.last() {
        rows.push(format!(
            "| final validation accuracy | {:.2}% (step {step}) |",
            accuracy * 100.0
        ));
    }
    // The first of equal maxima: the earliest step that reached it.
    let best = validated
        .iter()
        .filter(|(_, v)| !v.is_nan())
        .reduce(|best, r| if r.1 > best.1 { r } else { best });
    if let Some(&(step, accuracy)) = best {
        rows.push(format!(
            "| best validation accuracy | {:.2}% (step {step}) |",
            accuracy * 100.0
        ));
    }
    rows
}

fn write_svg(path: &Path, svg: std::result::Result<String, String>) -> Result<()> {
    let svg = svg.map_err(|message| EvalError::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(write_atomic(path, svg.as_bytes())?)
}

/// `42.0 s`, `3 min 07 s` or `2 h 05 min 09 s`.
pub fn duration(seconds: f64) -> String {
    if seconds.is_nan() || seconds < 60.0 {
        return format!("{:.1} s", seconds.max(0.0));
    }
    let whole = seconds.round() as u64;
    let (hours, minutes, seconds) = (whole / 3600, whole / 60 % 60, whole % 60);
    if hours > 0 {
        format!("{hours} h {minutes:02} min {seconds:02} s")
    } else {
        format!("{minutes} min {seconds:02} s")
    }
}

/// A Markdown code fence longer than any run of backticks in `text`, so a
/// config string holding "```" cannot end the block early.
fn code_fence(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    "`".repeat(longest.max(2) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(42.04), "42.0 s");
        assert_eq!(duration(187.0), "3 min 07 s");
        assert_eq!(duration(7509.4), "2 h 05 min 09 s");
        assert_eq!(duration(f64::NAN), "0.0 s");
    }

    #[test]
    fn code_fences_outgrow_backticks_in_the_text() {
        assert_eq!(code_fence("{\"a\": 1}"), "```");
        assert_eq!(code_fence("say ```` here"), "`````");
    }
}
