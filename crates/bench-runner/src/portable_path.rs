//! Every learner on the portable path, the one a GPU takes, run here on the
//! CPU (`fewshot_backbone::ops::path`): a training step and an evaluation
//! run with f64 forbidden, as on a device without f64 (Metal). That its
//! training steps agree with the kernels path's is `device_check`'s test.

use std::ops::ControlFlow;

use candle_core::{DType, Device};
use fewshot_backbone::ops::path::{with_f64_forbidden, with_path, OpsPath};
use fewshot_backbone::EpisodeTensors;
use fewshot_data::{EpisodeSampler, SplitName};
use fewshot_eval::EvalProtocol;

use crate::device_check::{batches, tiny_data, tiny_learner_configs, SPEC};
use crate::learners::{self, ALGORITHMS};

#[test]
fn the_configs_here_cover_every_learner() {
    let names: Vec<String> = tiny_learner_configs()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ALGORITHMS);
}

#[test]
fn every_learner_trains_and_evaluates_without_f64_on_the_portable_path() {
    let data = tiny_data().unwrap();
    let protocol = EvalProtocol {
        episodes: 4,
        seed: 9,
        spec: SPEC,
        split: SplitName::Test,
        support_copies: None,
    };
    for config in tiny_learner_configs() {
        let name = config["name"].as_str().unwrap();
        with_path(OpsPath::Portable, || {
            with_f64_forbidden(|| {
                let mut learner = learners::build(&config, &Device::Cpu).unwrap();
                let batch = &batches(&data, 1, &Device::Cpu).unwrap()[0];
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
    let data = tiny_data().unwrap();
    let config = &tiny_learner_configs()[3];
    let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), SPEC, 5).unwrap();
    let episode =
        EpisodeTensors::from_episode(&sampler.episodes(0, 1)[0], &Device::Cpu, DType::F64).unwrap();
    let learner = learners::build(config, &Device::Cpu).unwrap();
    let refused = with_f64_forbidden(|| learner.predict(&episode).map(|_| ()));
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("f64 is forbidden"), "{message}");
}
