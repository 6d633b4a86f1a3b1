//! The whole Meta Network's gradient against central finite differences in
//! f64: every slow weight (b's, u's, both generator pairs') through the
//! generated fast weights, the attention and the layer augmentation, with the
//! meta information (the support set's loss gradients) held constant, as the
//! learner treats it.

use candle_core::{Device, Tensor};
use fewshot_backbone::{ops, EpisodeTensors, ParamSet};
use fewshot_data::Rng;
use metanet_original::model::MetaInfo;
use metanet_original::{BaseLearner, MetaNetConfig, MetaNetwork};

const STEP: f64 = 1e-6;
const TOLERANCE: f64 = 1e-6;

fn random(shape: &[usize], scale: f64, rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The Omniglot model's shape, tiny.
fn tiny() -> MetaNetwork {
    MetaNetwork::new(&tiny_config()).unwrap()
}

fn tiny_config() -> MetaNetConfig {
    MetaNetConfig {
        image_size: 5,
        filters: 2,
        blocks: 2,
        n_outputs_train: 3,
        n_outputs_test: 3,
        generator_hidden: 3,
        gradient_chunks: 2,
        ..MetaNetConfig::default()
    }
}

/// The miniImageNet model's shape, tiny: batch norm on u's first block,
/// fast weights on its second, b an MLP with two hidden layers.
fn tiny_mini_imagenet() -> MetaNetwork {
    MetaNetwork::new(&MetaNetConfig {
        key_batch_norm_blocks: 1,
        base: BaseLearner::Mlp,
        base_hidden_layers: 2,
        ..tiny_config()
    })
    .unwrap()
}

/// A 3-way 2-shot episode of random 5x5 images with 4 queries.
fn episode(rng: &mut Rng) -> EpisodeTensors {
    let labels = |l: &[u32]| Tensor::new(l, &Device::Cpu).unwrap();
    EpisodeTensors {
        ways: 3,
        support: random(&[6, 1, 5, 5], 1.0, rng),
        support_labels: labels(&[0, 0, 1, 1, 2, 2]),
        query: random(&[4, 1, 5, 5], 1.0, rng),
        query_labels: Some(labels(&[2, 0, 1, 1])),
    }
}

/// Random values for every weight, generator outputs included (their zero
/// initialisation would hide the paths through them).
fn random_params(network: &MetaNetwork, rng: &mut Rng) -> ParamSet {
    let mut params = ParamSet::new();
    for (name, shape) in network.param_shapes() {
        params.insert(name, random(&shape, 0.7, rng)).unwrap();
    }
    params
}

fn names_and_values(params: &ParamSet) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect()
}

fn loss(
    network: &MetaNetwork,
    params: &ParamSet,
    episode: &EpisodeTensors,
    info: &MetaInfo,
) -> Tensor {
    let memory = network.generate(params, episode, info).unwrap();
    let logits = network.classify(params, &memory, &episode.query).unwrap();
    ops::cross_entropy(&logits, episode.query_labels.as_ref().unwrap()).unwrap()
}

fn gradient(params: &ParamSet, f: impl Fn(&ParamSet) -> Tensor) -> ParamSet {
    let vars = params.to_vars().unwrap();
    let grads = f(&vars.as_params()).backward().unwrap();
    vars.gradients(&grads).unwrap()
}

/// Checks every weight's gradient against central differences, and that
/// each of `groups` gets some gradient.
fn check_against_finite_differences(network: &MetaNetwork, groups: &[&str], seed: u64) {
    let network = network.clone();
    let mut rng = Rng::seed_from(seed, 0);
    let episode = episode(&mut rng);
    let params = random_params(&network, &mut rng);
    let info = network.meta_info(&params, &episode).unwrap();
    let analytic = gradient(&params, |p| loss(&network, p, &episode, &info));

    let value = |p: &ParamSet| {
        loss(&network, p, &episode, &info)
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut worst = (0f64, String::new());
    let mut nonzero_groups = std::collections::BTreeSet::new();
    for (name, tensor) in names_and_values(&params) {
        let base: Vec<f64> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f64> = analytic
            .get(&name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut moved = ParamSet::new();
                for (other, t) in params.iter() {
                    let t = match other == name {
                        true => Tensor::from_vec(v.clone(), tensor.dims(), &Device::Cpu).unwrap(),
                        false => t.clone(),
                    };
                    moved.insert(other, t).unwrap();
                }
                value(&moved)
            };
            let numeric = (at(STEP) - at(-STEP)) / (2.0 * STEP);
            let error = (got[j] - numeric).abs() / numeric.abs().max(1.0);
            if error > worst.0 {
                worst = (
                    error,
                    format!("{name}[{j}]: autograd {} vs numeric {numeric}", got[j]),
                );
            }
            if numeric.abs() > 1e-8 {
                nonzero_groups.insert(name.split('.').take(2).collect::<Vec<_>>().join("."));
            }
        }
    }
    assert!(
        worst.0 < TOLERANCE,
        "worst error {:e} at {}",
        worst.0,
        worst.1
    );
    for group in groups {
        assert!(
            nonzero_groups.contains(*group),
            "{group} gets no gradient: {nonzero_groups:?}"
        );
    }
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    // Every part of the model is on the queries' loss path.
    let groups = [
        "base.conv0",
        "base.fc1",
        "base.out3",
        "key.conv1",
        "key.fc1",
        "task_generator.conv",
        "task_generator.fc",
        "example_generator.conv",
        "example_generator.fc",
    ];
    check_against_finite_differences(&tiny(), &groups, 11);
}

#[test]
fn mini_imagenet_model_gradient_matches_finite_differences() {
    // b reads u's embeddings, so u's slow weights (batch norm's too) get
    // gradient through b as well; b has no conv layers, so no conv
    // example-level generator.
    let network = tiny_mini_imagenet();
    assert!(!network
        .param_shapes()
        .iter()
        .any(|(name, _)| name.starts_with("example_generator.conv")));
    let groups = [
        "base.fc1",
        "base.fc2",
        "base.out3",
        "key.conv0",
        "key.bn0",
        "key.conv1",
        "key.fc1",
        "task_generator.conv",
        "task_generator.fc",
        "example_generator.fc",
    ];
    check_against_finite_differences(&network, &groups, 13);
}

#[test]
fn the_learner_treats_meta_information_as_constant() {
    // The gradient of the full forward pass (meta information computed from
    // the weights inside it) equals the one with the information held fixed:
    // no second-order terms flow through the support gradients.
    for network in [tiny(), tiny_mini_imagenet()] {
        assert_meta_information_is_constant(&network);
    }
}

fn assert_meta_information_is_constant(network: &MetaNetwork) {
    let network = network.clone();
    let mut rng = Rng::seed_from(12, 0);
    let episode = episode(&mut rng);
    let params = random_params(&network, &mut rng);
    let info = network.meta_info(&params, &episode).unwrap();
    let fixed = gradient(&params, |p| loss(&network, p, &episode, &info));
    let full = gradient(&params, |p| {
        let logits = network.logits(p, &episode).unwrap();
        ops::cross_entropy(&logits, episode.query_labels.as_ref().unwrap()).unwrap()
    });
    for (name, g) in fixed.iter() {
        let diff = (g - full.get(name).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{name}: {diff}");
    }
}
