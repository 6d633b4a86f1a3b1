//! `fewshot train`, `eval`, `compare` and `predict` end to end on the built-in
//! synthetic data, with a learner small enough to train in seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use fewshot_backbone::Checkpoint;

fn fewshot(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fewshot {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `fewshot` expecting it to fail, and returns what it said.
fn fewshot_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "fewshot {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tiny_config(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.json");
    let config = serde_json::json!({
        "name": "tiny",
        "data": { "dataset": "synthetic" },
        "train_episodes": { "ways": 5, "shots": 1, "queries": 3 },
        "test_episodes": { "ways": 5, "shots": 1, "queries": 5 },
        "training": { "steps": 6, "meta_batch": 2, "validate_every": 3, "validation_episodes": 10 },
        "evaluation": { "episodes": 40, "seed": 7 },
        "algorithm": {
            "name": "eb-metanet",
            "embedding": { "filters": 8, "downsample": "stride2" },
            "hidden_dim": 16
        }
    });
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let checkpoint = Checkpoint::load(path, &Device::Cpu).unwrap();
    checkpoint
        .tensors
        .iter()
        .map(|(name, t)| {
            let values = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (name.to_string(), values)
        })
        .collect()
}

fn str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A MAML experiment on the synthetic glyphs small enough to train in
/// seconds: `steps` steps, and `algorithm`'s fields added to its section.
fn maml_config(dir: &Path, name: &str, steps: u64, algorithm: serde_json::Value) -> PathBuf {
    let mut json = serde_json::json!({
        "name": name,
        "data": { "dataset": "synthetic" },
        "train_episodes": { "ways": 5, "shots": 1, "queries": 2 },
        "test_episodes": { "ways": 5, "shots": 1, "queries": 2 },
        "training": { "steps": steps, "meta_batch": 2, "validate_every": 2, "validation_episodes": 5 },
        "evaluation": { "episodes": 10, "seed": 7 },
        "algorithm": {
            "name": "maml",
            "network": { "filters": 8, "downsample": "max-pool" },
            "inner_lr": 0.1
        }
    });
    let section = json["algorithm"].as_object_mut().unwrap();
    section.extend(algorithm.as_object().unwrap().clone());
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    path
}

/// Trains `config` into `run` and stops after `steps` steps.
fn train_until(config: &Path, run: &Path, steps: u64) {
    let steps = steps.to_string();
    fewshot(&[
        "train",
        str(config),
        "--out",
        str(run),
        "--stop-after",
        &steps,
    ]);
}

/// A run stopped, moved to another folder (as a carried-over run is, through
/// `models/in-progress/`) and resumed there ends bit for bit where an
/// uninterrupted run ends.
#[test]
fn a_resumed_run_ends_exactly_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let straight = dir.path().join("straight");
    let stopped = dir.path().join("stopped");
    let resumed = dir.path().join("moved/resumed");
    fewshot(&["train", str(&config), "--out", str(&straight)]);
    train_until(&config, &stopped, 3);
    assert!(!stopped.join("results.json").exists());
    std::fs::create_dir_all(resumed.parent().unwrap()).unwrap();
    std::fs::rename(&stopped, &resumed).unwrap();
    // A stopped run can still be published through its evaluation's JSON.
    let partial_json = dir.path().join("partial.json");
    std::fs::write(
        &partial_json,
        fewshot(&["eval", str(&resumed), "--json"]).stdout,
    )
    .unwrap();
    let partial_model = dir.path().join("models/partial.safetensors");
    fewshot(&["publish", str(&partial_json), str(&partial_model)]);
    let republished = fewshot(&["eval", str(&partial_model), "--json"]);
    let republished: serde_json::Value = serde_json::from_slice(&republished.stdout).unwrap();
    let partial: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&partial_json).unwrap()).unwrap();
    assert_eq!(republished["training_steps"], 3);
    assert_eq!(
        partial["evaluation"]["accuracy"],
        republished["evaluation"]["accuracy"]
    );
    fewshot(&["train", str(&config), "--out", str(&resumed), "--resume"]);

    let last = |run: &Path| tensors(&run.join("checkpoints/last.safetensors"));
    assert_eq!(last(&straight), last(&resumed));
    let metrics = |run: &Path| {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(metrics(&straight), metrics(&resumed));
    for file in [
        "config.json",
        "results.json",
        "report.md",
        "training.svg",
        "episodes.svg",
        "checkpoints/best.safetensors",
    ] {
        assert!(straight.join(file).exists(), "missing {file}");
    }

    // A second run into the same directory is refused; resuming a finished run is not.
    let refused = fewshot_fails(&["train", str(&config), "--out", str(&straight)]);
    assert!(refused.contains("--resume"), "{refused}");

    // eval reproduces the run's own figure on the same episodes, and compare
    // of two identical learners finds no difference.
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("results.json")).unwrap())
            .unwrap();
    let eval = fewshot(&["eval", str(&straight), "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(
        results["evaluation"]["accuracy"],
        again["evaluation"]["accuracy"]
    );
    let five_shot = fewshot(&[
        "eval",
        str(&straight),
        "--shots",
        "3",
        "--ways",
        "4",
        "--json",
    ]);
    let five_shot: serde_json::Value = serde_json::from_slice(&five_shot.stdout).unwrap();
    assert_eq!(five_shot["evaluation"]["protocol"]["spec"]["shots"], 3);
    assert_eq!(five_shot["evaluation"]["protocol"]["spec"]["ways"], 4);
    // A published model is smaller (no optimiser state) and evaluates the same.
    let model = dir.path().join("models/tiny.safetensors");
    fewshot(&["publish", str(&straight), str(&model)]);
    let published = fewshot(&["eval", str(&model), "--json"]);
    let published: serde_json::Value = serde_json::from_slice(&published.stdout).unwrap();
    assert_eq!(
        results["evaluation"]["accuracy"],
        published["evaluation"]["accuracy"]
    );
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&model) < size(&straight.join("checkpoints/best.safetensors")) / 2);
    let compare = fewshot(&["compare", str(&straight), str(&resumed), "--json"]);
    let comparison: serde_json::Value = serde_json::from_slice(&compare.stdout).unwrap();
    assert_eq!(comparison["mean_difference"], 0.0);
    assert_eq!(comparison["n"], 40);
}

/// MAML++ with every option on, from a config: its schedules run on the
/// optimiser's step count, so a stopped run resumes bit for bit (here across
/// an epoch boundary, where the multi-step loss and the learning rate change).
#[test]
fn a_maml_plus_plus_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = maml_config(
        dir.path(),
        "maml-plus-plus",
        4,
        serde_json::json!({
            "inner_steps_train": 2,
            "inner_steps_test": 2,
            "multi_step_loss": { "epochs": 2 },
            "learn_inner_lr": true,
            "per_step_batch_norm": true,
            "cosine_annealing": { "epochs": 2, "min_lr": 1e-4 },
            "first_order_epochs": 1,
            "iterations_per_epoch": 1
        }),
    );
    let [straight, resumed] = ["straight", "resumed"].map(|name| dir.path().join(name));
    fewshot(&["train", str(&config), "--out", str(&straight)]);
    train_until(&config, &resumed, 2);
    fewshot(&["train", str(&config), "--out", str(&resumed), "--resume"]);
    let last = |run: &Path| tensors(&run.join("checkpoints/last.safetensors"));
    let weights = last(&straight);
    assert!(weights
        .iter()
        .any(|(name, _)| name == "inner_lr.block0.conv.weight"));
    assert!(weights
        .iter()
        .any(|(name, _)| name == "block0.bn.weight.step1"));
    assert_eq!(weights, last(&resumed));
}

/// A run is resumed only by a build that continues it bit for bit: a
/// checkpoint whose next step this build computes differently (as one written
/// by other code would be) is refused with the reason, and `--resume-anyway`
/// goes on.
#[test]
fn resume_refuses_a_run_this_build_would_not_continue_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let run = dir.path().join("run");
    train_until(&config, &run, 3);
    let path = run.join("checkpoints/last.safetensors");
    let mut checkpoint = Checkpoint::load(&path, &Device::Cpu).unwrap();
    let probe = checkpoint.extra["next_step_probe"].clone();
    // Another build's record: the next step's loss one bit away.
    let (loss, state) = probe.split_once(':').unwrap();
    let other_loss = u64::from_str_radix(loss, 16).unwrap() ^ 1;
    checkpoint.extra.insert(
        "next_step_probe".into(),
        format!("{other_loss:016x}:{state}"),
    );
    checkpoint.save(&path).unwrap();

    let refused = fewshot_fails(&["train", str(&config), "--out", str(&run), "--resume"]);
    assert!(
        refused.contains("does not continue the run bit for bit")
            && refused.contains("--resume-anyway"),
        "{refused}"
    );
    assert!(!run.join("results.json").exists());
    fewshot(&[
        "train",
        str(&config),
        "--out",
        str(&run),
        "--resume",
        "--resume-anyway",
    ]);
    assert!(run.join("results.json").exists());
}

/// A run may start from another run's checkpoint: what fits is copied, the
/// rest stays fresh, and a checkpoint that cannot be read is named.
/// Prototypical Networks on augmented episodes: augmentation changes what is
/// learnt, and a stopped augmented run resumes bit for bit (the distortions
/// are drawn from each episode's own stream, not from a running generator).
#[test]
fn an_augmented_protonet_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, augment: serde_json::Value| {
        let path = dir.path().join(format!("{name}.json"));
        let config = serde_json::json!({
            "name": name,
            "data": { "dataset": "synthetic", "augment": augment },
            "train_episodes": { "ways": 8, "shots": 1, "queries": 2 },
            "test_episodes": { "ways": 5, "shots": 1, "queries": 3 },
            "training": { "steps": 4, "meta_batch": 2, "validate_every": 2, "validation_episodes": 5 },
            "evaluation": { "episodes": 10, "seed": 7 },
            "algorithm": { "name": "protonet", "embedding": { "filters": 8 } }
        });
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        path
    };
    let augmented = write("augmented", serde_json::json!({ "probability": 1.0 }));
    let plain = write("plain", serde_json::Value::Null);
    let [straight, resumed, unaugmented] =
        ["straight", "resumed", "unaugmented"].map(|name| dir.path().join(name));
    fewshot(&["train", str(&augmented), "--out", str(&straight)]);
    fewshot(&["train", str(&plain), "--out", str(&unaugmented)]);
    train_until(&augmented, &resumed, 2);
    fewshot(&["train", str(&augmented), "--out", str(&resumed), "--resume"]);
    let last = |run: &Path| tensors(&run.join("checkpoints/last.safetensors"));
    let differing = |a: &Path, b: &Path| -> Vec<String> {
        let (a, b) = (last(a), last(b));
        assert_eq!(a.len(), b.len());
        a.into_iter()
            .zip(b)
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.0)
            .collect()
    };
    assert_eq!(differing(&straight, &resumed), Vec::<String>::new());
    assert!(!differing(&straight, &unaugmented).is_empty());
}

#[test]
fn init_from_starts_a_run_from_the_weights_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let source = dir.path().join("source");
    train_until(&config, &source, 3);
    let source_checkpoint = source.join("checkpoints/last.safetensors");

    // Three ways and a narrower meta learner: the embedding fits, U, V and e
    // do not. A learning rate too small to move a weight shows what was copied.
    let mut warm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    warm["train_episodes"]["ways"] = 3.into();
    warm["test_episodes"]["ways"] = 3.into();
    warm["algorithm"]["hidden_dim"] = 8.into();
    warm["algorithm"]["optimizer"] = serde_json::json!({ "lr": 1e-30 });
    warm["training"]["init_from"] = str(&source_checkpoint).into();
    let warm_config = dir.path().join("warm.json");
    std::fs::write(&warm_config, warm.to_string()).unwrap();
    let run = dir.path().join("warm");
    let out = Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args([
            "train",
            str(&warm_config),
            "--out",
            str(&run),
            "--stop-after",
            "3",
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("kept fresh") && log.contains("in the checkpoint)"),
        "{log}"
    );

    let before: std::collections::HashMap<_, _> = tensors(&source_checkpoint).into_iter().collect();
    let (mut copied, mut fresh) = (0, 0);
    for (name, after) in tensors(&run.join("checkpoints/last.safetensors")) {
        if name.starts_with(fewshot_backbone::OPTIMIZER_PREFIX) {
            continue;
        }
        match before.get(&name).filter(|b| b.len() == after.len()) {
            Some(before) => {
                let moved = before
                    .iter()
                    .zip(&after)
                    .map(|(b, a)| (b - a).abs())
                    .fold(0f32, f32::max);
                assert!(moved < 1e-6, "{name} was not copied (moved {moved})");
                copied += 1;
            }
            None => fresh += 1,
        }
    }
    assert!(copied > 0 && fresh > 0, "copied {copied}, fresh {fresh}");

    warm["training"]["init_from"] = str(&dir.path().join("missing.safetensors")).into();
    std::fs::write(&warm_config, warm.to_string()).unwrap();
    let err = fewshot_fails(&[
        "train",
        str(&warm_config),
        "--out",
        str(&dir.path().join("w2")),
    ]);
    assert!(
        err.contains("training.init_from") && err.contains("missing.safetensors"),
        "{err}"
    );
}

/// A run killed during a validation has the step's checkpoint but no record
/// of the step; resumed, it runs that validation first and then goes on as
/// an uninterrupted run.
#[test]
fn a_run_killed_during_a_validation_validates_first_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let straight = dir.path().join("straight");
    let killed = dir.path().join("killed");
    fewshot(&["train", str(&config), "--out", str(&straight)]);
    train_until(&config, &killed, 3);
    // What a kill during step 3's validation leaves behind: no record of the
    // step (the checkpoint written before that validation would know no best
    // validation yet; this one knows step 3's, so resuming keeps its best).
    let records = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let before_kill: Vec<String> = records(&killed)
        .iter()
        .filter(|r| r["step"] != 3)
        .map(|r| format!("{r}\n"))
        .collect();
    std::fs::write(killed.join("metrics.jsonl"), before_kill.concat()).unwrap();

    fewshot(&["train", str(&config), "--out", str(&killed), "--resume"]);
    let (straight_records, killed_records) = (records(&straight), records(&killed));
    let validations = |records: &[serde_json::Value]| -> Vec<(u64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r["val_accuracy"].as_f64()?)))
            .collect()
    };
    assert_eq!(validations(&killed_records), validations(&straight_records));
    assert_eq!(validations(&killed_records).len(), 2);
    // The training means of the killed steps are unknown, and say so.
    assert!(killed_records[0]["loss"].is_null());
    let best = |run: &Path| tensors(&run.join("checkpoints/best.safetensors"));
    assert_eq!(best(&killed), best(&straight));
}

/// Starts `fewshot train` in the background on the tiny config with its
/// `training` section edited; returns the process, the config and the run.
#[cfg(unix)]
fn spawn_training(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (std::process::Child, PathBuf, PathBuf) {
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_config(dir)).unwrap()).unwrap();
    edit(&mut config["training"]);
    let config_path = dir.join("edited.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let run = dir.join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_fewshot"))
        .args(["train", str(&config_path), "--out", str(&run)])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    (child, config_path, run)
}

/// Ctrl-C stops a run after its current step with a checkpoint of that step
/// (here the only one: validation comes at the end), and the resumed run
/// goes on exactly as an uninterrupted one.
#[cfg(unix)]
#[test]
fn an_interrupted_run_keeps_its_last_step_and_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let (child, config_path, run) = spawn_training(dir.path(), |training| {
        training["steps"] = 1_000_000.into();
        training["validate_every"] = 1_000_000.into();
    });
    let metrics = run.join("metrics.jsonl");
    let records = || {
        std::fs::read_to_string(&metrics)
            .map(|m| m.lines().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let started = std::time::Instant::now();
    while records().len() < 2 {
        assert!(
            started.elapsed().as_secs() < 300,
            "no training records after 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));

    let checkpoint = run.join("checkpoints/last.safetensors");
    let step: u64 = Checkpoint::load(&checkpoint, &Device::Cpu).unwrap().extra["step"]
        .parse()
        .unwrap();
    let last_record: serde_json::Value = serde_json::from_str(records().last().unwrap()).unwrap();
    assert_eq!(last_record["step"], step);
    assert!(step >= 40, "{step}");

    let until = (step + 2).to_string();
    fewshot(&[
        "train",
        str(&config_path),
        "--out",
        str(&run),
        "--resume",
        "--stop-after",
        &until,
    ]);
    let straight = dir.path().join("straight");
    fewshot(&[
        "train",
        str(&config_path),
        "--out",
        str(&straight),
        "--stop-after",
        &until,
    ]);
    assert_eq!(
        tensors(&checkpoint),
        tensors(&straight.join("checkpoints/last.safetensors"))
    );
}

/// Ctrl-C during a validation stops it without waiting for its end: the
/// step's checkpoint is there, and the validation is left to the resumed
/// run (see the test above).
#[cfg(unix)]
#[test]
fn an_interrupt_stops_a_running_validation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _, run) = spawn_training(dir.path(), |training| {
        training["validate_every"] = 2.into();
        // Far longer than the test may wait: it ends only if the stop works.
        training["validation_episodes"] = 10_000_000.into();
    });
    // Step 2's checkpoint is written just before its validation.
    let checkpoint = run.join("checkpoints/last.safetensors");
    let started = std::time::Instant::now();
    let waited_too_long = || started.elapsed().as_secs() > 300;
    while !checkpoint.exists() {
        assert!(!waited_too_long(), "no checkpoint after 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    while child.try_wait().unwrap().is_none() {
        if waited_too_long() {
            child.kill().unwrap();
            panic!("the validation did not stop");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("stopped during the validation of step 2") && stdout.contains("--resume"),
        "{stdout}"
    );
    let step = &Checkpoint::load(&checkpoint, &Device::Cpu).unwrap().extra["step"];
    assert_eq!(step, "2");
    // No record of step 2: the resumed run knows its validation is to do.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    assert!(!metrics.contains("\"step\":2,"), "{metrics}");
    assert!(!run.join("checkpoints/best.safetensors").exists());
}

#[test]
fn compare_names_data_that_differ() {
    // Episodes are drawn by index: two evaluations can pair over the same
    // episodes with other pixels. The comparison runs, and says so.
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let run = dir.path().join("run");
    fewshot(&["train", str(&config), "--out", str(&run)]);
    let same = fewshot(&["compare", str(&run), str(&run)]);
    let same = String::from_utf8(same.stdout).unwrap();
    assert!(!same.contains("other data"), "{same}");

    let mut results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["data"]["resampling"], "area");
    results["data"]["resampling"] = "nearest".into();
    let nearest = dir.path().join("nearest.json");
    std::fs::write(&nearest, serde_json::to_vec(&results).unwrap()).unwrap();
    let compared = fewshot(&["compare", str(&run), str(&nearest)]);
    let compared = String::from_utf8(compared.stdout).unwrap();
    assert!(
        compared.contains(r#"other data: data.resampling: "area" vs "nearest""#),
        "{compared}"
    );
}

#[test]
fn compare_refuses_evaluations_of_different_episodes() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let run = dir.path().join("run");
    fewshot(&["train", str(&config), "--out", str(&run)]);
    let other = fewshot(&["eval", str(&run), "--seed", "8", "--json"]);
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, &other.stdout).unwrap();
    let refused = fewshot_fails(&["compare", str(&run), str(&other_path)]);
    assert!(refused.contains("seed"), "{refused}");

    // Episodes of the validation classes (`eval --split val`) are other
    // episodes too.
    let on_val = fewshot(&["eval", str(&run), "--split", "val", "--json"]);
    let on_val_json: serde_json::Value = serde_json::from_slice(&on_val.stdout).unwrap();
    assert_eq!(on_val_json["evaluation"]["protocol"]["split"], "val");
    let on_val_path = dir.path().join("on-val.json");
    std::fs::write(&on_val_path, &on_val.stdout).unwrap();
    let refused = fewshot_fails(&["compare", str(&run), str(&on_val_path)]);
    assert!(refused.contains("split"), "{refused}");
    let unknown = fewshot_fails(&["eval", str(&run), "--split", "dev"]);
    assert!(unknown.contains("dev"), "{unknown}");

    // The synthetic classes are never rotated, so `--unrotated` draws the
    // same episodes and scores them the same.
    let unrotated = fewshot(&["eval", str(&run), "--unrotated", "--json"]);
    let unrotated: serde_json::Value = serde_json::from_slice(&unrotated.stdout).unwrap();
    let plain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        unrotated["evaluation"]["classes"],
        plain["evaluation"]["classes"]
    );
    assert_eq!(
        unrotated["evaluation"]["episodes"],
        plain["evaluation"]["episodes"]
    );
    // ...but says which classes it drew from.
    assert_eq!(unrotated["evaluation"]["split_name"], "test unrotated");
    assert_eq!(plain["evaluation"]["split_name"], "test");

    // Support copies keep the episodes' images: they pair with the plain
    // evaluation, which `--support-copies 0` reproduces.
    let copied = fewshot(&["eval", str(&run), "--support-copies", "2", "--json"]);
    let copied_json: serde_json::Value = serde_json::from_slice(&copied.stdout).unwrap();
    assert_eq!(
        copied_json["evaluation"]["protocol"]["support_copies"]["copies"],
        2
    );
    let copied_path = dir.path().join("copied.json");
    std::fs::write(&copied_path, &copied.stdout).unwrap();
    let compared = fewshot(&["compare", str(&copied_path), str(&run)]);
    let compared = String::from_utf8(compared.stdout).unwrap();
    assert!(
        compared.contains("2 distorted copies of each support image"),
        "{compared}"
    );
    let none = fewshot(&["eval", str(&run), "--support-copies", "0", "--json"]);
    let none: serde_json::Value = serde_json::from_slice(&none.stdout).unwrap();
    assert_eq!(
        none["evaluation"]["episodes"],
        plain["evaluation"]["episodes"]
    );
    assert!(none["evaluation"]["protocol"]
        .get("support_copies")
        .is_none());
}

#[test]
fn predict_labels_query_files_from_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let run = dir.path().join("run");
    fewshot(&["train", str(&config), "--out", str(&run)]);

    // Support: 3 classes of glyph images; queries: one more image of each.
    let data = fewshot_data::synthetic::generate(&Default::default()).unwrap();
    let (support, query) = (dir.path().join("support"), dir.path().join("query"));
    std::fs::create_dir_all(&query).unwrap();
    for class in &data.test.classes[..3] {
        let class_dir = support.join(&class.name);
        std::fs::create_dir_all(&class_dir).unwrap();
        for (i, &image) in class.images[..2].iter().enumerate() {
            save_png(
                data.store.image(image as usize),
                &class_dir.join(format!("{i}.png")),
            );
        }
        save_png(
            data.store.image(class.images[2] as usize),
            &query.join(format!("{}.png", class.name)),
        );
    }
    let checkpoint = run.join("checkpoints/best.safetensors");
    let predict = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "predict",
            "--checkpoint",
            str(&checkpoint),
            "--support",
            str(&support),
            "--query",
            str(&query),
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_slice(&fewshot(&args).stdout).unwrap()
    };
    let report = predict(&[]);
    // Distorted copies of the support images change the probabilities,
    // the same way every time.
    let copied = predict(&["--support-copies", "3"]);
    assert_ne!(copied, report);
    assert_eq!(copied, predict(&["--support-copies", "3"]));
    let predictions = report["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 3);
    let class_names: Vec<&str> = data.test.classes[..3]
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for p in predictions {
        assert!(class_names.contains(&p["class"].as_str().unwrap()));
        let probability = p["probability"].as_f64().unwrap();
        assert!((1.0 / 3.0..=1.0).contains(&probability), "{probability}");
    }
}

fn save_png(pixels: &[u8], path: &Path) {
    let side = (pixels.len() as f64).sqrt() as u32;
    image::GrayImage::from_raw(side, side, pixels.to_vec())
        .unwrap()
        .save(path)
        .unwrap();
}

#[test]
fn predict_names_a_corrupt_support_image() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let run = dir.path().join("run");
    train_until(&config, &run, 3);
    let (support, query) = (dir.path().join("support"), dir.path().join("query"));
    for class in ["a", "b"] {
        std::fs::create_dir_all(support.join(class)).unwrap();
        save_png(&[0u8; 28 * 28], &support.join(class).join("0.png"));
    }
    std::fs::write(support.join("b").join("broken.png"), b"\x89PNG not really").unwrap();
    std::fs::create_dir_all(&query).unwrap();
    save_png(&[0u8; 28 * 28], &query.join("q.png"));
    let stderr = fewshot_fails(&[
        "predict",
        "--checkpoint",
        str(&run.join("checkpoints/last.safetensors")),
        "--support",
        str(&support),
        "--query",
        str(&query),
    ]);
    assert!(stderr.contains("broken.png"), "{stderr}");
}

/// The Ravi & Larochelle layout under `root`: `splits/{train,val,test}.csv`
/// and `images/`, with `classes` classes of 6 small RGB JPEGs per split.
fn write_mini_imagenet(root: &Path, classes: [usize; 3]) {
    std::fs::create_dir_all(root.join("splits")).unwrap();
    std::fs::create_dir_all(root.join("images")).unwrap();
    let mut class = 0u32;
    for (split, count) in ["train", "val", "test"].into_iter().zip(classes) {
        let mut csv = String::from("filename,label\n");
        for _ in 0..count {
            let label = format!("n{:08}", 1000 + class);
            for i in 0..6u32 {
                let name = format!("{label}{i:08}.jpg");
                let image = image::RgbImage::from_fn(20, 20, |x, y| {
                    image::Rgb([(class * 37 % 256) as u8, (x * 12 + i) as u8, (y * 12) as u8])
                });
                image.save(root.join("images").join(&name)).unwrap();
                csv.push_str(&format!("{name},{label}\n"));
            }
            class += 1;
        }
        std::fs::write(root.join("splits").join(format!("{split}.csv")), csv).unwrap();
    }
}

#[test]
fn metanet_original_mini_imagenet_model_trains_from_a_config() {
    // The miniImageNet shape of Meta Networks (batch norm in u, b an MLP on
    // u's embeddings), small, on generated images in that dataset's layout.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mini-imagenet");
    write_mini_imagenet(&root, [6, 3, 3]);
    let config = dir.path().join("mini.json");
    let json = serde_json::json!({
        "name": "mini",
        "data": { "dataset": "mini-imagenet", "root": root, "image_size": 84 },
        "train_episodes": { "ways": 5, "shots": 1, "queries": 2 },
        "test_episodes": { "ways": 3, "shots": 1, "queries": 2 },
        "training": { "steps": 2, "meta_batch": 1, "validate_every": 2, "validation_episodes": 2 },
        "evaluation": { "episodes": 3, "seed": 1 },
        "algorithm": {
            "name": "metanet-original",
            "in_channels": 3,
            "image_size": 84,
            "filters": 4,
            "key_batch_norm_blocks": 3,
            "base": "mlp",
            "base_hidden_layers": 2,
            "n_outputs_train": 5,
            "n_outputs_test": 3,
            "generator_hidden": 4
        }
    });
    std::fs::write(&config, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let run = dir.path().join("run");
    fewshot(&["train", str(&config), "--out", str(&run)]);
    let names: Vec<String> = tensors(&run.join("checkpoints/last.safetensors"))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for expected in [
        "key.bn2.weight",
        "key.conv4.weight",
        "base.fc2.weight",
        "base.out3.weight",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.starts_with("base.conv")),
        "{names:?}"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let accuracy = results["evaluation"]["accuracy"]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{accuracy}");
    assert_eq!(
        results["evaluation"]["episodes"].as_array().unwrap().len(),
        3
    );
}

/// A folder of colour images trains a network that reads its 3 channels
/// without being told; a 1-channel network is refused by name; the run keeps
/// the channel count it found in the files.
#[test]
fn a_colour_folder_trains_a_colour_network_and_the_run_keeps_its_channels() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (split, offset) in [("train", 0u8), ("val", 60), ("test", 120)] {
        for class in 0..5u8 {
            for image in 0..2u8 {
                let path = data.join(split).join(format!("c{class}/{image}.png"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                let colour = [offset + class * 10, image * 100, 255 - class * 40];
                image::RgbImage::from_fn(16, 16, |x, y| {
                    let ink = (x + y + u32::from(class)) % 4 == 0;
                    image::Rgb(if ink { colour } else { [0, 0, 0] })
                })
                .save(&path)
                .unwrap();
            }
        }
    }
    let config = |in_channels: Option<usize>| {
        let path = dir.path().join(format!("colour-{in_channels:?}.json"));
        let mut embedding = serde_json::json!({ "filters": 4 });
        if let Some(channels) = in_channels {
            embedding["in_channels"] = channels.into();
        }
        let config = serde_json::json!({
            "name": "colour",
            "data": { "dataset": "folder", "root": data, "image_size": 16 },
            "train_episodes": { "ways": 5, "shots": 1, "queries": 1 },
            "test_episodes": { "ways": 5, "shots": 1, "queries": 1 },
            "training": { "steps": 2, "meta_batch": 1, "validate_every": 2, "validation_episodes": 2 },
            "evaluation": { "episodes": 2 },
            "algorithm": { "name": "protonet", "embedding": embedding }
        });
        std::fs::write(&path, config.to_string()).unwrap();
        path
    };
    let stderr = fewshot_fails(&[
        "train",
        str(&config(Some(1))),
        "--out",
        str(&dir.path().join("grey-net")),
    ]);
    assert!(
        stderr.contains("`algorithm.embedding.in_channels`: 1")
            && stderr.contains("data.channels")
            && stderr.contains("is 3"),
        "{stderr}"
    );
    // Left out, the network's input is the folder's, found from its files.
    let run = dir.path().join("colour-net");
    fewshot(&["train", str(&config(None)), "--out", str(&run)]);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["data"]["channels"], 3);
    assert_eq!(saved["algorithm"]["embedding"]["in_channels"], 3);
    assert_eq!(saved["algorithm"]["embedding"]["image_size"], 16);
}

/// `eval --set` tests a checkpoint with a field of its learner's section
/// changed (MAML's reference code tests Omniglot with more inner steps than
/// it trains with), records the change, and pairs with the plain test.
#[test]
fn eval_set_changes_the_learners_section_for_the_test_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = maml_config(
        dir.path(),
        "maml",
        2,
        serde_json::json!({ "inner_steps_train": 1, "inner_steps_test": 1 }),
    );
    let run = dir.path().join("run");
    fewshot(&["train", str(&config), "--out", str(&run)]);

    let more_steps = dir.path().join("more-steps.json");
    let out = fewshot(&["eval", str(&run), "--set", "inner_steps_test=4", "--json"]);
    std::fs::write(&more_steps, &out.stdout).unwrap();
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results["algorithm_overrides"]["inner_steps_test"], 4);
    let plain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    assert!(plain.get("algorithm_overrides").is_none());
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["evaluation"]["episodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["loss"].as_f64().unwrap())
            .collect()
    };
    assert_ne!(
        losses(&results),
        losses(&plain),
        "four inner steps adapt further"
    );
    let compared = fewshot(&["compare", str(&more_steps), str(&run)]);
    let text = String::from_utf8_lossy(&compared.stdout);
    assert!(text.contains("inner_steps_test=4"), "{text}");

    // Published from that evaluation, the model keeps the change: its own
    // test repeats the published result.
    let model = dir.path().join("more-steps.safetensors");
    fewshot(&["publish", str(&more_steps), str(&model)]);
    let republished = fewshot(&["eval", str(&model), "--json"]);
    let republished: serde_json::Value = serde_json::from_slice(&republished.stdout).unwrap();
    assert_eq!(losses(&republished), losses(&results));

    for (setting, needle) in [
        ("inner_step=4", "inner_step"),
        ("name=protonet", "cannot change"),
        ("inner_steps_test", "KEY=VALUE"),
    ] {
        let err = fewshot_fails(&["eval", str(&run), "--set", setting]);
        assert!(err.contains(needle), "{setting}: {err}");
    }
}

/// `training.keep_best` keeps the k best validated checkpoints (of equal
/// accuracies the earlier), `eval --ensemble` averages them, and a stopped
/// run may resume with another k.
#[test]
fn the_best_validated_checkpoints_are_kept_and_tested_together() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let with_keep_best = |keep: usize, name: &str| {
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        json["training"]["validate_every"] = 1.into();
        json["training"]["keep_best"] = keep.into();
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        path
    };
    let run = dir.path().join("run");
    let alone = fewshot_fails(&["eval", str(&run), "--ensemble"]);
    assert!(alone.contains("not a run directory"), "{alone}");
    train_until(&with_keep_best(2, "keep2.json"), &run, 3);
    // Another k is not another training: the resume goes on.
    let keep3 = with_keep_best(3, "keep3.json");
    fewshot(&["train", str(&keep3), "--out", str(&run), "--resume"]);

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut validated: Vec<(f64, u64)> = metrics
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|r| !r["val_accuracy"].is_null())
        .map(|r| {
            (
                r["val_accuracy"].as_f64().unwrap(),
                r["step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(validated.len(), 6);
    validated.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut expected: Vec<String> = validated[..3]
        .iter()
        .map(|(_, step)| format!("step-{step:08}.safetensors"))
        .collect();
    let mut kept: Vec<String> = std::fs::read_dir(run.join("checkpoints/validated"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    expected.sort();
    kept.sort();
    assert_eq!(kept, expected);
    // Kept for evaluation: weights without optimiser state.
    let names = tensors(&run.join("checkpoints/validated").join(&kept[0]));
    assert!(!names.is_empty());
    assert!(names
        .iter()
        .all(|(name, _)| !name.starts_with(fewshot_backbone::OPTIMIZER_PREFIX)));

    let ensemble = fewshot(&["eval", str(&run), "--ensemble", "--json"]).stdout;
    let ensemble: serde_json::Value = serde_json::from_slice(&ensemble).unwrap();
    let members = ensemble["ensemble"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(ensemble["checkpoint"], members[0]);
    let best_step = validated[0].1;
    assert!(members[0]
        .as_str()
        .unwrap()
        .ends_with(&format!("step-{best_step:08}.safetensors")));
    let line = String::from_utf8(fewshot(&["eval", str(&run), "--ensemble"]).stdout).unwrap();
    assert!(line.contains("ensemble of 3 checkpoints"), "{line}");

    // Paired with the best checkpoint alone on the same episodes; a model
    // file holds one checkpoint, so the ensemble's result is not published.
    let ensemble_json = dir.path().join("ensemble.json");
    std::fs::write(&ensemble_json, serde_json::to_string(&ensemble).unwrap()).unwrap();
    let single_json = dir.path().join("single.json");
    std::fs::write(
        &single_json,
        fewshot(&["eval", members[0].as_str().unwrap(), "--json"]).stdout,
    )
    .unwrap();
    fewshot(&["compare", str(&ensemble_json), str(&single_json)]);
    let model = dir.path().join("ensemble.safetensors");
    let refused = fewshot_fails(&["publish", str(&ensemble_json), str(&model)]);
    assert!(refused.contains("ensemble of 3 checkpoints"), "{refused}");

    // A run that keeps only its best checkpoint has nothing to ensemble.
    let plain = dir.path().join("plain");
    train_until(&config, &plain, 3);
    let none = fewshot_fails(&["eval", str(&plain), "--ensemble"]);
    assert!(none.contains("keep_best"), "{none}");
}
