//! Every learner on the portable path, the one a GPU takes, run here on the
//! CPU (`fewshot_backbone::ops::path`): its training steps agree with the
//! kernels path's, and a training step and an evaluation run with f64
//! forbidden, as on a device without f64 (Metal).

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use fewshot_backbone::ops::path::{with_f64_forbidden, with_path, OpsPath};
use fewshot_backbone::EpisodeTensors;
use fewshot_data::{
    synthetic, EpisodeSampler, EpisodeSpec, FewShotDataset, SplitName, SyntheticOptions,
};
use fewshot_eval::EvalProtocol;

use crate::learners::{self, ALGORITHMS};

/// A small configuration of each learner: narrow networks, so that the
/// portable path's candle convolutions stay quick in a test. Adam's `eps`
/// of 1 makes its steps proportional to the gradient: with the default
/// 1e-8, a gradient component at rounding-noise level (one that is zero in
/// exact arithmetic) becomes a full ±lr step whose sign differs between two
/// correct paths, and the runs part after one step.
fn tiny_configs() -> Vec<serde_json::Value> {
    let optimizer = serde_json::json!({ "lr": 0.1, "eps": 1.0 });
    let mut configs = vec![
        serde_json::json!({
            "name": "eb-metanet",
            "embedding": { "filters": 8 },
            "hidden_dim": 16
        }),
        serde_json::json!({
            "name": "maml",
            "ways": 5,
            "inner_lr": 0.4,
            "inner_steps_train": 2,
            "inner_steps_test": 2,
            "order": "second",
            "network": { "filters": 8 }
        }),
        serde_json::json!({
            "name": "metanet-original",
            "filters": 8,
            "n_outputs_train": 5,
            "n_outputs_test": 5
        }),
        serde_json::json!({
            "name": "protonet",
            "embedding": { "filters": 8 }
        }),
    ];
    for config in &mut configs {
        config["optimizer"] = optimizer.clone();
    }
    configs
}

const SPEC: EpisodeSpec = EpisodeSpec {
    ways: 5,
    shots: 1,
    queries: 2,
    same_group: false,
};

fn data() -> FewShotDataset {
    synthetic::generate(&SyntheticOptions {
        classes_train: 10,
        classes_val: 5,
        classes_test: 10,
        images_per_class: 4,
        image_size: 28,
        seed: 3,
    })
    .unwrap()
}

fn batches(data: &FewShotDataset, count: usize) -> Vec<Vec<EpisodeTensors>> {
    let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), SPEC, 5).unwrap();
    sampler
        .episodes(0, 2 * count)
        .chunks(2)
        .map(|pair| {
            pair.iter()
                .map(|e| EpisodeTensors::from_episode(e, &Device::Cpu, DType::F32).unwrap())
                .collect()
        })
        .collect()
}

/// The losses of three training steps, and the query logits after them.
fn train_on(
    path: OpsPath,
    config: &serde_json::Value,
    data: &FewShotDataset,
) -> (Vec<f64>, Vec<f32>) {
    with_path(path, || {
        let mut learner = learners::build(config, &Device::Cpu).unwrap();
        let batches = batches(data, 4);
        let losses = batches[..3]
            .iter()
            .map(|batch| learner.meta_train(batch).unwrap().loss)
            .collect();
        let logits = learner.predict(&batches[3][0]).unwrap();
        (losses, logits.flatten_all().unwrap().to_vec1().unwrap())
    })
}

fn relative_difference(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1.0)
}

#[test]
fn the_configs_here_cover_every_learner() {
    let names: Vec<String> = tiny_configs()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ALGORITHMS);
}

#[test]
fn every_learner_trains_alike_on_both_paths() {
    let data = data();
    for config in tiny_configs() {
        let name = config["name"].as_str().unwrap();
        let (kernel_losses, kernel_logits) = train_on(OpsPath::Kernels, &config, &data);
        let (portable_losses, portable_logits) = train_on(OpsPath::Portable, &config, &data);
        // The first step starts from the same weights, so its loss agrees to
        // f32 rounding; later ones come after updates summed in another
        // order, and the rounding grows. (Before the portable path's max-pool
        // and ReLU gave their gradients to the CPU kernels' pixels, the runs
        // parted by 5 to 50% after one step.)
        assert!(
            relative_difference(kernel_losses[0], portable_losses[0]) < 1e-4,
            "{name}: first losses {kernel_losses:?} against {portable_losses:?}"
        );
        for (k, p) in kernel_losses.iter().zip(&portable_losses) {
            assert!(
                relative_difference(*k, *p) < 1e-2,
                "{name}: losses {kernel_losses:?} against {portable_losses:?}"
            );
        }
        let scale = kernel_logits.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (k, p) in kernel_logits.iter().zip(&portable_logits) {
            assert!(
                (k - p).abs() / scale < 2e-2,
                "{name}: logits {kernel_logits:?} against {portable_logits:?}"
            );
        }
    }
}

#[test]
fn every_learner_trains_and_evaluates_without_f64_on_the_portable_path() {
    let data = data();
    let protocol = EvalProtocol {
        episodes: 4,
        seed: 9,
        spec: SPEC,
        split: SplitName::Test,
        support_copies: None,
    };
    for config in tiny_configs() {
        let name = config["name"].as_str().unwrap();
        with_path(OpsPath::Portable, || {
            with_f64_forbidden(|| {
                let mut learner = learners::build(&config, &Device::Cpu).unwrap();
                let batch = &batches(&data, 1)[0];
                learner
                    .meta_train(batch)
                    .unwrap_or_else(|e| panic!("{name}: training step: {e}"));
                let evaluation = fewshot_eval::evaluate(
                    &*learner,
                    data.store.clone(),
                    &data.test,
                    &protocol,
                    &Device::Cpu,
                    &mut |_| ControlFlow::Continue(()),
                )
                .unwrap_or_else(|e| panic!("{name}: evaluation: {e}"));
                assert_eq!(evaluation.accuracy.n, 4, "{name}");
            })
        });
    }
}

#[test]
fn the_guard_catches_an_f64_learner() {
    // The test above means something only if f64 would be caught: a learner
    // fed f64 episodes is refused by the guard's own error.
    let data = data();
    let config = &tiny_configs()[3];
    let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), SPEC, 5).unwrap();
    let episode =
        EpisodeTensors::from_episode(&sampler.episodes(0, 1)[0], &Device::Cpu, DType::F64).unwrap();
    let learner = learners::build(config, &Device::Cpu).unwrap();
    let refused = with_f64_forbidden(|| learner.predict(&episode).map(|_| ()));
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("f64 is forbidden"), "{message}");
}
