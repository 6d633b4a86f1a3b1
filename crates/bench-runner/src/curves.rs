//! `fewshot curves`: several runs' validation accuracy against training
//! time, in a table and one plot.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use fewshot_eval::curves::{summarize_curve, write_validation_svg, CurveSummary, Validation};

use crate::run_dir::RunDir;

/// `target_percent` is in percent (95.8), as the papers write it.
pub fn run(runs: &[PathBuf], target_percent: Option<f64>, out: &Path, as_json: bool) -> Result<()> {
    if let Some(target) = target_percent {
        if !(target > 0.0 && target <= 100.0) {
            bail!("--target {target}: give a percentage above 0 and at most 100, e.g. 95.8");
        }
    }
    let target = target_percent.map(|t| t / 100.0);
    let mut named = Vec::with_capacity(runs.len());
    for run in runs {
        let dir = RunDir::new(run.clone());
        if !dir.metrics().is_file() {
            bail!(
                "{}: no metrics.jsonl here; give run directories (as `fewshot train --out` writes them)",
                run.display()
            );
        }
        named.push((run_name(run), dir.read_metrics()?));
    }
    write_validation_svg(out, &named, target)?;
    let summaries: Vec<CurveSummary> = named
        .iter()
        .map(|(name, records)| summarize_curve(name, records, target))
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
        return Ok(());
    }
    for summary in &summaries {
        println!("{}", summary_line(summary, target_percent));
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The run's folder name, what a user told its runs apart by.
fn run_name(run: &Path) -> String {
    run.canonicalize()
        .ok()
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run.display().to_string())
}

fn summary_line(summary: &CurveSummary, target_percent: Option<f64>) -> String {
    let at = |v: &Validation| {
        format!(
            "{:.2}% at step {} ({:.2} h)",
            100.0 * v.accuracy,
            v.step,
            v.hours
        )
    };
    let plural = if summary.validations == 1 { "" } else { "s" };
    let mut line = format!(
        "{}: {} steps, {:.2} h, {} validation{plural}",
        summary.name, summary.steps, summary.hours, summary.validations
    );
    if let Some(best) = &summary.best {
        line.push_str(&format!("; best {}", at(best)));
    }
    if let Some(target) = target_percent {
        match &summary.first_at_target {
            Some(first) => line.push_str(&format!("; first at {target}%+: {}", at(first))),
            None => line.push_str(&format!("; never at {target}%")),
        }
    }
    line
}
