//! `evaluate` end to end: a nearest-class-mean classifier in pixel space is
//! scored on synthetic glyphs, then compared with itself and with a run on
//! other episodes.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use fewshot_backbone::{BackboneError, EpisodeTensors, Learner, ParamSet, StepStats};
use fewshot_data::{
    synthetic, EpisodeSpec, FewShotDataset, SplitName, SupportCopies, SyntheticOptions,
};
use fewshot_eval::{check_same_episodes, compare, evaluate, EvalError, EvalProtocol, Evaluation};

/// Classifies each query as the class whose mean support image is nearest.
/// It has nothing to learn: only `predict` is meant to be called.
struct NearestMean {
    /// Returns logits with this many extra columns, to test the shape check.
    extra_columns: usize,
}

impl Learner for NearestMean {
    fn algorithm(&self) -> &'static str {
        "nearest-mean"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn meta_train(&mut self, _batch: &[EpisodeTensors]) -> fewshot_backbone::Result<StepStats> {
        Err(BackboneError::InvalidConfig {
            field: "meta_train",
            value: "nearest-mean".into(),
            reason: "this test learner has nothing to train".into(),
        })
    }

    fn predict(&self, episode: &EpisodeTensors) -> fewshot_backbone::Result<Tensor> {
        let support = episode.support.flatten_from(1)?;
        let query = episode.query.flatten_from(1)?;
        let pixels = support.dim(1)?;
        let means = support.reshape((episode.ways, (), pixels))?.mean(1)?;
        let distances = query
            .unsqueeze(1)?
            .broadcast_sub(&means.unsqueeze(0)?)?
            .sqr()?
            .sum(2)?;
        let logits = distances.neg()?;
        if self.extra_columns == 0 {
            return Ok(logits);
        }
        let pad = Tensor::zeros(
            (logits.dim(0)?, self.extra_columns),
            logits.dtype(),
            logits.device(),
        )?;
        Ok(Tensor::cat(&[&logits, &pad], 1)?)
    }

    fn state(&self) -> fewshot_backbone::Result<ParamSet> {
        Ok(ParamSet::default())
    }

    fn load_state(&mut self, _state: &ParamSet) -> fewshot_backbone::Result<()> {
        Ok(())
    }
}

const LEARNER: NearestMean = NearestMean { extra_columns: 0 };

fn dataset() -> FewShotDataset {
    synthetic::generate(&SyntheticOptions {
        classes_train: 20,
        classes_val: 10,
        classes_test: 20,
        ..Default::default()
    })
    .unwrap()
}

fn protocol(episodes: usize, seed: u64) -> EvalProtocol {
    EvalProtocol {
        episodes,
        seed,
        spec: EpisodeSpec {
            ways: 5,
            shots: 1,
            queries: 5,
            same_group: false,
        },
        split: SplitName::Test,
        support_copies: None,
    }
}

fn run(data: &FewShotDataset, protocol: &EvalProtocol) -> Evaluation {
    run_watched(data, protocol, &mut |_| ControlFlow::Continue(())).unwrap()
}

/// `evaluate`s [`LEARNER`] on the test classes, with this progress callback.
fn run_watched(
    data: &FewShotDataset,
    protocol: &EvalProtocol,
    on_progress: &mut dyn FnMut(usize) -> ControlFlow<()>,
) -> fewshot_eval::Result<Evaluation> {
    evaluate(
        &LEARNER,
        data.store.clone(),
        &data.test,
        protocol,
        &Device::Cpu,
        on_progress,
    )
}

#[test]
fn same_seed_gives_the_same_episodes_and_results() {
    let data = dataset();
    // 70 episodes: more than two sampling chunks, the last one partial.
    let protocol = protocol(70, 1234);
    let mut progress = Vec::new();
    let first = run_watched(&data, &protocol, &mut |done| {
        progress.push(done);
        ControlFlow::Continue(())
    })
    .unwrap();
    // Progress comes after every chunk of 32 episodes, ending at the total.
    assert_eq!(progress, vec![32, 64, 70]);
    let indices: Vec<u64> = first.episodes.iter().map(|e| e.index).collect();
    assert_eq!(indices, (0..70).collect::<Vec<u64>>());
    assert_eq!(first.accuracy.n, 70);
    assert!(first.seconds > 0.0);

    let second = run(&data, &protocol);
    assert_eq!(first.episodes, second.episodes);
    assert_eq!(first.accuracy, second.accuracy);

    // Chance is 20%; the generator is tuned so that pixel-space neighbours
    // do well but not perfectly.
    assert!(first.accuracy.mean > 0.5, "{:?}", first.accuracy);
    assert!(first
        .episodes
        .iter()
        .all(|e| e.loss.is_finite() && e.loss > 0.0));

    // An evaluation survives a JSON round trip (it is saved with the run).
    let json = serde_json::to_string(&first).unwrap();
    let back: Evaluation = serde_json::from_str(&json).unwrap();
    assert_eq!(back.episodes, first.episodes);
    assert_eq!(back.protocol, first.protocol);
    assert_eq!(back.classes, first.classes);
    assert_eq!(first.classes, Some(data.test.fingerprint()));
    assert_eq!(back.split_name, first.split_name);
    assert_eq!(first.split_name.as_deref(), Some("test"));
}

#[test]
fn a_progress_callback_can_stop_the_evaluation() {
    let data = dataset();
    let protocol = protocol(70, 1234);
    let stop_at = |limit: usize| {
        run_watched(&data, &protocol, &mut |done| {
            if done >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
    };
    // Stopped after the first chunk of 32 episodes.
    let err = stop_at(1).unwrap_err();
    assert!(
        matches!(
            err,
            EvalError::Stopped {
                done: 32,
                episodes: 70
            }
        ),
        "{err}"
    );
    // A stop asked for once every episode is scored changes nothing.
    let finished = stop_at(70).unwrap();
    assert_eq!(finished.episodes, run(&data, &protocol).episodes);
}

#[test]
fn a_learner_compared_with_itself_differs_by_nothing() {
    let data = dataset();
    let evaluation = run(&data, &protocol(40, 7));
    let comparison = compare(&evaluation, &evaluation).unwrap();
    assert_eq!(comparison.n, 40);
    assert_eq!(comparison.mean_difference, 0.0);
    assert_eq!(comparison.p_value, 1.0);
    assert_eq!(comparison.mean_a, evaluation.accuracy.mean);
}

#[test]
fn evaluations_of_different_episodes_are_not_compared() {
    let data = dataset();
    let base = run(&data, &protocol(20, 1));
    let other_seed = run(&data, &protocol(20, 2));
    let err = compare(&base, &other_seed).unwrap_err();
    assert!(matches!(err, EvalError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("seed 1 vs 2"), "{err}");

    let fewer = run(&data, &protocol(10, 1));
    let err = check_same_episodes(&base, &fewer).unwrap_err();
    assert!(err.to_string().contains("episodes 20 vs 10"), "{err}");

    // Same protocol on other classes: the same indices name other episodes.
    let on_val = evaluate(
        &LEARNER,
        data.store.clone(),
        &data.val,
        &protocol(20, 1),
        &Device::Cpu,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let err = compare(&base, &on_val).unwrap_err();
    assert!(
        err.to_string().contains("different classes")
            && err.to_string().contains("test (20 classes")
            && err.to_string().contains("val (10 classes"),
        "{err}"
    );

    // An evaluation saved before the classes were recorded cannot be vouched for.
    let mut unrecorded = base.clone();
    unrecorded.classes = None;
    let err = compare(&unrecorded, &base).unwrap_err();
    assert!(
        err.to_string()
            .contains("the first evaluation does not record"),
        "{err}"
    );
    let json = serde_json::to_value(&base).unwrap();
    let mut old_file = json.as_object().unwrap().clone();
    old_file.remove("classes");
    old_file.remove("split_name");
    let old: Evaluation = serde_json::from_value(old_file.into()).unwrap();
    assert_eq!((old.classes, old.split_name), (None, None));

    // Same protocol, but the results are of other episodes (e.g. edited by hand).
    let mut shuffled = base.clone();
    shuffled.episodes.swap(3, 4);
    let err = check_same_episodes(&base, &shuffled).unwrap_err();
    assert!(
        err.to_string()
            .contains("result 3 is of episode 3 vs episode 4"),
        "{err}"
    );
}

#[test]
fn support_copies_pair_with_the_plain_episodes() {
    let data = dataset();
    let plain = run(&data, &protocol(40, 3));
    let copied_protocol = EvalProtocol {
        support_copies: Some(SupportCopies::new(4)),
        ..protocol(40, 3)
    };
    let copied = run(&data, &copied_protocol);
    assert_eq!(
        copied.episodes,
        run(&data, &copied_protocol).episodes,
        "seeded"
    );
    // Same queries, other class means: some episode scores differently.
    assert_ne!(copied.accuracies(), plain.accuracies());
    let comparison = compare(&copied, &plain).unwrap();
    assert_eq!(comparison.n, 40);

    // Old evaluation files (no field) read as no copies, and plain
    // protocols are written as before.
    let json = serde_json::to_value(&plain.protocol).unwrap();
    assert!(json.get("support_copies").is_none(), "{json}");
    let back: EvalProtocol =
        serde_json::from_value(serde_json::to_value(&copied.protocol).unwrap()).unwrap();
    assert_eq!(back, copied_protocol);
}

#[test]
fn unusable_protocols_and_learners_are_refused() {
    let data = dataset();
    let try_run = |learner: &dyn Learner, protocol: &EvalProtocol| {
        evaluate(
            learner,
            data.store.clone(),
            &data.test,
            protocol,
            &Device::Cpu,
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err()
    };

    let err = try_run(&LEARNER, &protocol(0, 0));
    assert!(matches!(err, EvalError::Empty { .. }), "{err}");

    let mut no_queries = protocol(5, 0);
    no_queries.spec.queries = 0;
    let err = try_run(&LEARNER, &no_queries);
    assert!(matches!(err, EvalError::Empty { .. }), "{err}");

    // The test split has 20 classes: a 25-way episode cannot be drawn.
    let mut too_wide = protocol(5, 0);
    too_wide.spec.ways = 25;
    let err = try_run(&LEARNER, &too_wide);
    assert!(matches!(err, EvalError::Data(_)), "{err}");

    let wrong_shape = NearestMean { extra_columns: 2 };
    let err = try_run(&wrong_shape, &protocol(5, 0));
    assert!(
        err.to_string().contains("nearest-mean") && err.to_string().contains("[25, 7]"),
        "{err}"
    );
}
