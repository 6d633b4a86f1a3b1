//! `write_report` on synthetic training records and a synthetic evaluation.

use fewshot_data::{EpisodeSpec, SplitName};
use fewshot_eval::{
    accuracy_line, summarize, write_report, EpisodeResult, EvalProtocol, Evaluation, ReportInput,
    TrainingRecord,
};

/// A run that learns: loss falls, accuracy rises, validation every 100 steps.
fn training() -> Vec<TrainingRecord> {
    (1..=500u64)
        .map(|step| {
            let progress = step as f64 / 500.0;
            // A little deterministic wobble, like per-batch noise.
            let noise = ((step * 7919) % 13) as f64 / 100.0;
            TrainingRecord {
                step,
                seconds: step as f64 * 0.5,
                loss: 1.6 * (1.0 - progress) + 0.1 + noise,
                accuracy: (0.2 + 0.7 * progress + noise / 2.0).min(1.0),
                val_accuracy: (step % 100 == 0).then_some(0.2 + 0.7 * progress),
            }
        })
        .collect()
}

/// 1000 5-way 15-query episodes, accuracies k/75 with 0 to 4 queries wrong.
fn evaluation() -> Evaluation {
    const WRONG: [u64; 8] = [0, 0, 0, 1, 1, 1, 2, 4];
    let episodes: Vec<EpisodeResult> = (0..1000u64)
        .map(|index| EpisodeResult {
            index,
            accuracy: (75 - WRONG[(index * 5 % 8) as usize]) as f64 / 75.0,
            loss: 0.05,
        })
        .collect();
    let accuracies: Vec<f64> = episodes.iter().map(|e| e.accuracy).collect();
    Evaluation {
        protocol: EvalProtocol {
            episodes: 1000,
            seed: 1234,
            spec: EpisodeSpec {
                ways: 5,
                shots: 1,
                queries: 15,
                same_group: false,
            },
            split: SplitName::Test,
            support_copies: None,
        },
        accuracy: summarize(&accuracies).unwrap(),
        episodes,
        seconds: 12.5,
        classes: Some("1692 classes, 32460 images, hash 0123456789abcdef".into()),
        split_name: Some("test".into()),
    }
}

fn assert_svg(path: &std::path::Path) {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{path:?}"
    );
    assert!(svg.trim_end().ends_with("</svg>"), "{path:?}");
    assert!(
        svg.contains("<path") || svg.contains("<polyline") || svg.contains("<rect"),
        "{path:?}"
    );
    // Labels are SVG text, drawn by the viewer: no font was needed to write them.
    assert!(svg.contains("<text"), "{path:?}");
}

#[test]
fn a_full_report_has_the_result_the_tables_and_the_plots() {
    let dir = tempfile::tempdir().unwrap();
    let records = training();
    let evaluation = evaluation();
    let config = serde_json::json!({ "algorithm": "maml", "inner_lr": 0.4 });
    let notes = vec!["synthetic run\nfor the test".to_string()];
    let report = write_report(
        dir.path(),
        &ReportInput {
            title: "MAML on synthetic glyphs",
            config: &config,
            training: &records,
            evaluation: Some(&evaluation),
            notes: &notes,
        },
    )
    .unwrap();
    assert_eq!(report, dir.path().join("report.md"));
    let md = std::fs::read_to_string(&report).unwrap();

    let a = evaluation.accuracy;
    let expected = format!(
        "accuracy: {:.2}% ± {:.2}% (95% CI, 1000 episodes, 5-way 1-shot 15-query, split test, seed 1234)",
        a.mean * 100.0,
        a.ci95 * 100.0
    );
    assert!(md.contains(&expected), "{md}");
    assert!(md.starts_with("# MAML on synthetic glyphs\n"), "{md}");
    assert!(md.contains("| steps | 500 |"), "{md}");
    assert!(md.contains("| training time | 4 min 10 s |"), "{md}");
    assert!(
        md.contains("| final validation accuracy | 90.00% (step 500) |"),
        "{md}"
    );
    assert!(
        md.contains("| best validation accuracy | 90.00% (step 500) |"),
        "{md}"
    );
    assert!(md.contains("![Training curves](training.svg)"), "{md}");
    assert!(
        md.contains("![Test accuracy per episode](episodes.svg)"),
        "{md}"
    );
    assert!(md.contains("- synthetic run\n  for the test"), "{md}");
    assert!(md.contains("```json\n{\n  \"algorithm\": \"maml\""), "{md}");

    assert_svg(&dir.path().join("training.svg"));
    assert_svg(&dir.path().join("episodes.svg"));
}

#[test]
fn parts_without_data_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({});
    let report = write_report(
        dir.path(),
        &ReportInput {
            title: "untrained",
            config: &config,
            training: &[],
            evaluation: None,
            notes: &[],
        },
    )
    .unwrap();
    let md = std::fs::read_to_string(report).unwrap();
    assert!(!md.contains("accuracy:") && !md.contains(".svg"), "{md}");
    assert!(md.contains("## Config"), "{md}");
    assert!(!dir.path().join("training.svg").exists());
    assert!(!dir.path().join("episodes.svg").exists());
}

#[test]
fn diverged_training_still_plots() {
    // A NaN loss and a single record must neither panic nor fail the plot.
    let dir = tempfile::tempdir().unwrap();
    let records = [TrainingRecord {
        step: 1,
        seconds: 0.1,
        loss: f64::NAN,
        accuracy: 0.2,
        val_accuracy: Some(f64::NAN),
    }];
    write_report(
        dir.path(),
        &ReportInput {
            title: "diverged",
            config: &serde_json::json!({}),
            training: &records,
            evaluation: None,
            notes: &[],
        },
    )
    .unwrap();
    assert_svg(&dir.path().join("training.svg"));

    // Its metrics.jsonl line, with the NaN written as null, reads back.
    let line = serde_json::to_string(&records[0]).unwrap();
    let back: TrainingRecord = serde_json::from_str(&line).unwrap();
    assert!(back.loss.is_nan() && back.val_accuracy.is_none());
}

/// The record of a validation redone after a kill has no training means:
/// the table shows the last record that has them, and says which.
#[test]
fn a_validation_without_training_means_keeps_the_last_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = training();
    records.pop();
    let last_trained = records.last().unwrap().clone();
    records.push(TrainingRecord {
        step: 500,
        seconds: 250.0,
        loss: f64::NAN,
        accuracy: f64::NAN,
        val_accuracy: Some(0.95),
    });
    let config = serde_json::json!({});
    let report = write_report(
        dir.path(),
        &ReportInput {
            title: "resumed",
            config: &config,
            training: &records,
            evaluation: None,
            notes: &[],
        },
    )
    .unwrap();
    let md = std::fs::read_to_string(report).unwrap();
    let expected = format!(
        "| training loss, last record (step 499) | {:.4} |",
        last_trained.loss
    );
    assert!(md.contains(&expected), "{md}");
    assert!(!md.contains("NaN"), "{md}");
    assert!(
        md.contains("| final validation accuracy | 95.00% (step 500) |"),
        "{md}"
    );
}

#[test]
fn the_accuracy_line_names_the_classes_drawn_from() {
    let mut evaluation = evaluation();
    evaluation.split_name = Some("test unrotated".into());
    let line = accuracy_line(&evaluation);
    assert!(
        line.contains(", split test unrotated, seed 1234)"),
        "{line}"
    );
    // Saved before the name was recorded: the protocol's split.
    evaluation.split_name = None;
    let line = accuracy_line(&evaluation);
    assert!(line.contains(", split test, seed 1234)"), "{line}");
}

#[test]
fn the_accuracy_line_says_when_support_images_had_copies() {
    let mut evaluation = evaluation();
    assert!(!accuracy_line(&evaluation).contains("copies"));
    evaluation.protocol.support_copies = Some(fewshot_data::SupportCopies::new(16));
    let line = accuracy_line(&evaluation);
    assert!(
        line.contains("15-query, 16 distorted copies of each support image, split"),
        "{line}"
    );
    evaluation.protocol.support_copies = Some(fewshot_data::SupportCopies::new(1));
    let line = accuracy_line(&evaluation);
    assert!(
        line.contains(", 1 distorted copy of each support image,"),
        "{line}"
    );
}
