//! Validation accuracy against training time, to compare how fast runs
//! learn: when each first reached a target accuracy, its best, and one plot
//! of all of them (`fewshot curves`).

use std::path::Path;

use fewshot_backbone::write_atomic;
use serde::Serialize;

use crate::error::{EvalError, Result};
use crate::plots;
use crate::report::TrainingRecord;

/// One validation of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Validation {
    pub step: u64,
    /// Wall-clock hours of training up to this step.
    pub hours: f64,
    /// Validation accuracy, as a fraction.
    pub accuracy: f64,
}

/// What one run's validations show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurveSummary {
    pub name: String,
    /// The last step logged and the hours up to it.
    pub steps: u64,
    pub hours: f64,
    pub validations: usize,
    pub best: Option<Validation>,
    /// The first validation at or above the target, if one was given and
    /// reached.
    pub first_at_target: Option<Validation>,
}

/// A run's validations with a finite accuracy, in the order logged.
pub fn validations(records: &[TrainingRecord]) -> Vec<Validation> {
    records
        .iter()
        .filter_map(|r| {
            let accuracy = r.val_accuracy.filter(|a| a.is_finite())?;
            Some(Validation {
                step: r.step,
                hours: r.seconds / 3600.0,
                accuracy,
            })
        })
        .collect()
}

/// The summary of one run; `target` is a fraction (0.958 for 95.8%).
pub fn summarize_curve(
    name: &str,
    records: &[TrainingRecord],
    target: Option<f64>,
) -> CurveSummary {
    let points = validations(records);
    let best = points
        .iter()
        .copied()
        // The earliest of equal bests, as training keeps its best checkpoint.
        .reduce(|best, v| if v.accuracy > best.accuracy { v } else { best });
    let first_at_target =
        target.and_then(|target| points.iter().copied().find(|v| v.accuracy >= target));
    let last = records.last();
    CurveSummary {
        name: name.to_string(),
        steps: last.map_or(0, |r| r.step),
        hours: last.map_or(0.0, |r| r.seconds / 3600.0),
        validations: points.len(),
        best,
        first_at_target,
    }
}

/// Writes (atomically) an SVG of every run's validation accuracy against
/// hours of training, with the target as a dashed line. Runs are
/// `(name, records)`; at least one must have a validation.
pub fn write_validation_svg(
    path: &Path,
    runs: &[(String, Vec<TrainingRecord>)],
    target: Option<f64>,
) -> Result<()> {
    let curves: Vec<(&str, Vec<Validation>)> = runs
        .iter()
        .map(|(name, records)| (name.as_str(), validations(records)))
        .collect();
    if curves.iter().all(|(_, points)| points.is_empty()) {
        return Err(EvalError::Empty {
            what: "no validation accuracy in any of the runs' metrics".into(),
        });
    }
    let svg = plots::validation_svg(&curves, target).map_err(|message| EvalError::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(write_atomic(path, svg.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, seconds: f64, val: Option<f64>) -> TrainingRecord {
        TrainingRecord {
            step,
            seconds,
            loss: 1.0,
            accuracy: 0.5,
            val_accuracy: val,
        }
    }

    #[test]
    fn summary_finds_the_first_validation_at_the_target_and_the_earliest_best() {
        let records = [
            record(100, 360.0, Some(0.90)),
            record(150, 540.0, None),
            record(200, 720.0, Some(0.96)),
            record(300, 1080.0, Some(0.97)),
            record(400, 1440.0, Some(0.97)),
            record(450, 1800.0, None),
        ];
        let summary = summarize_curve("run", &records, Some(0.958));
        assert_eq!(
            (summary.steps, summary.hours, summary.validations),
            (450, 0.5, 4)
        );
        assert_eq!(
            summary.first_at_target.map(|v| (v.step, v.hours)),
            Some((200, 0.2))
        );
        assert_eq!(summary.best.map(|v| v.step), Some(300));
        assert_eq!(
            summarize_curve("run", &records, Some(0.98)).first_at_target,
            None
        );
        assert_eq!(summarize_curve("run", &records, None).first_at_target, None);
    }

    #[test]
    fn a_plot_needs_a_validation_and_names_its_runs() {
        let dir = std::env::temp_dir().join(format!("fewshot-curves-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.svg");
        let unvalidated = vec![("a".to_string(), vec![record(1, 1.0, None)])];
        assert!(matches!(
            write_validation_svg(&path, &unvalidated, None),
            Err(EvalError::Empty { .. })
        ));
        let runs = vec![
            ("maml".to_string(), vec![record(100, 3600.0, Some(0.9))]),
            (
                "maml++".to_string(),
                vec![
                    record(100, 1800.0, Some(0.93)),
                    record(200, 3600.0, Some(0.95)),
                ],
            ),
        ];
        write_validation_svg(&path, &runs, Some(0.958)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("maml++") && svg.contains("95.8%"), "{svg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
