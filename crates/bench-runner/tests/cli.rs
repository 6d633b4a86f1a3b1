//! The `fewshot` binary as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fewshot(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args(args)
        .env(
            "FEWSHOT_CACHE_DIR",
            std::env::temp_dir().join("fewshot-cli-test-cache"),
        )
        .output()
        .unwrap()
}

fn omniglot_root() -> Option<PathBuf> {
    let root = match std::env::var_os("FEWSHOT_DATA_DIR") {
        Some(dir) => PathBuf::from(dir).join("omniglot"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/omniglot"),
    };
    root.join("images_background").is_dir().then_some(root)
}

#[test]
fn inspect_reports_real_omniglot_counts() {
    let Some(root) = omniglot_root() else {
        println!("skipped: Omniglot not found (set FEWSHOT_DATA_DIR)");
        return;
    };
    let out = fewshot(&[
        "data",
        "inspect",
        "--dataset",
        "omniglot",
        "--root",
        root.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["characters"], 1623);
    assert_eq!(report["images"], 32460);
    assert_eq!(report["alphabets"], 50);
    let vinyals = &report["splits"]["vinyals"];
    assert_eq!(
        (
            vinyals["train"].as_u64(),
            vinyals["val"].as_u64(),
            vinyals["test"].as_u64()
        ),
        (Some(4112), Some(688), Some(1692))
    );
    assert_eq!(report["splits"]["maml"]["train"], 1100);
    assert_eq!(report["splits"]["lake"]["test"], 659);
}

#[test]
fn inspect_runs_on_the_built_in_dataset() {
    let out = fewshot(&["data", "inspect", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["dataset"], "synthetic");
    assert_eq!(report["splits"]["default"]["train"], 400);
    assert!(report["normalize"].is_null(), "{report}");
}

#[test]
fn inspect_checks_the_normalisation_against_the_images() {
    // The built-in glyphs are grey: ImageNet's three channel statistics do not fit.
    let out = fewshot(&["data", "inspect", "--normalize", "imagenet"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data.normalize") && stderr.contains("1 channel"),
        "{stderr}"
    );
    let out = fewshot(&["data", "inspect", "--normalize", "imagenett"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"imagenett\"") && stderr.contains("\"imagenet\""),
        "{stderr}"
    );
}

#[test]
fn a_misspelt_ops_path_stops_the_program_and_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args(["data", "inspect"])
        .env("FEWSHOT_OPS_PATH", "gpu")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FEWSHOT_OPS_PATH")
            && stderr.contains("`gpu`")
            && stderr.contains("portable"),
        "{stderr}"
    );
}

#[test]
fn a_missing_dataset_says_how_to_get_it() {
    let out = fewshot(&[
        "data",
        "inspect",
        "--dataset",
        "omniglot",
        "--root",
        "/nonexistent/omniglot",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/omniglot") && stderr.contains("images_background.zip"),
        "{stderr}"
    );
}

#[test]
fn a_misspelt_config_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, r#"{"training": {"stpes": 3}}"#).unwrap();
    let out = fewshot(&["config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.json") && stderr.contains("training.stpes"),
        "{stderr}"
    );
}

#[test]
fn config_fills_in_the_algorithms_defaults_and_checks_its_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lr.json");
    std::fs::write(
        &path,
        r#"{"algorithm": {"name": "metanet-original", "optimizer": {"lr": 1e-4}}}"#,
    )
    .unwrap();
    let out = fewshot(&["config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let algorithm = &printed["algorithm"];
    assert_eq!(algorithm["optimizer"]["lr"], 1e-4);
    assert_eq!(algorithm["optimizer"]["max_grad_norm"], 10.0);
    assert_eq!(algorithm["filters"], 64);

    std::fs::write(
        &path,
        r#"{"algorithm": {"name": "metanet-original", "filtres": 32}}"#,
    )
    .unwrap();
    let out = fewshot(&["config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lr.json") && stderr.contains("filtres"),
        "{stderr}"
    );
}

#[test]
fn the_data_benchmark_reports_its_figures() {
    let out = fewshot(&["bench", "--suite", "data", "--episodes", "500", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["episodes"], 500);
    assert!(report["episodes_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
#[cfg(unix)]
fn a_closed_stdout_ends_the_command_without_a_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args(["config", "--defaults"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the command writes, as `| head -0` would.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_device_on_the_cpu_checks_the_portable_path_and_passes() {
    let out = fewshot(&["check-device", "--device", "cpu", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["device"], "cpu");
    assert!(report["ops"].as_array().unwrap().len() > 40, "{report}");
    assert_eq!(report["learners"].as_array().unwrap().len(), 4);
}

#[test]
#[cfg(not(feature = "cuda"))]
fn a_gpu_check_without_the_cuda_feature_says_how_to_build_one() {
    for args in [
        &["check-device", "--device", "cuda"][..],
        &["bench", "--suite", "kernels", "--device", "cuda:1"][..],
    ] {
        let out = fewshot(args);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--features cuda"), "{stderr}");
    }
}

#[test]
#[cfg(not(feature = "download"))]
fn a_fetch_without_the_download_feature_says_how_to_build_one_or_get_the_data() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let out = fewshot(&["data", "fetch", "--dataset", "omniglot", "--root", root_arg]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--features download") && stderr.contains("images_background.zip"),
        "{stderr}"
    );
    // Nothing was written where the dataset would go.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn curves_report_when_each_run_reached_the_target_and_plot_them() {
    let dir = std::env::temp_dir().join(format!("fewshot-cli-curves-{}", std::process::id()));
    let record = |step: u64, seconds: f64, val: Option<f64>| {
        let val = val.map_or("null".to_string(), |v| v.to_string());
        format!(
            r#"{{"step":{step},"seconds":{seconds},"loss":0.5,"accuracy":0.9,"val_accuracy":{val}}}"#
        )
    };
    for (run, lines) in [
        (
            "slow",
            vec![
                record(500, 1800.0, Some(0.90)),
                record(1000, 3600.0, Some(0.95)),
            ],
        ),
        (
            "fast",
            vec![record(500, 900.0, Some(0.96)), record(600, 1000.0, None)],
        ),
    ] {
        std::fs::create_dir_all(dir.join(run)).unwrap();
        std::fs::write(dir.join(run).join("metrics.jsonl"), lines.join("\n")).unwrap();
    }
    let plot = dir.join("curves.svg");
    let (slow, fast) = (dir.join("slow"), dir.join("fast"));
    let out = fewshot(&[
        "curves",
        slow.to_str().unwrap(),
        fast.to_str().unwrap(),
        "--target",
        "95.8",
        "--out",
        plot.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("slow: 1000 steps, 1.00 h, 2 validations; best 95.00% at step 1000 (1.00 h); never at 95.8%"), "{stdout}");
    assert!(stdout.contains("fast: 600 steps, 0.28 h, 1 validation; best 96.00% at step 500 (0.25 h); first at 95.8%+: 96.00% at step 500 (0.25 h)"), "{stdout}");
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));

    let missing = fewshot(&["curves", dir.join("absent").to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent: no metrics.jsonl here"));
    std::fs::remove_dir_all(&dir).unwrap();
}
