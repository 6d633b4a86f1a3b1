//! The Prototypical Networks loss through whole embedding networks, checked in
//! f64 on every weight of the net, first order (the learner needs no second
//! order): against central finite differences where the net is small enough,
//! and for deeper, wider and full-resolution nets (105x105, 6 blocks; 56x56,
//! 128 filters) against the same net built from candle's own ops.

use candle_core::{DType, Device, Tensor, Var};
use fewshot_backbone::ops::candle_path;
use fewshot_backbone::{ops, Conv4, Conv4Config, Downsample, FeatureHead, ParamSet};
use fewshot_data::Rng;
use protonet::{distance_logits, prototypes};

const STEP: f64 = 1e-5;
const TOLERANCE: f64 = 1e-6;

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Query cross-entropy of a 3-way 1-shot episode with two queries per class,
/// from the embeddings of its 9 images (support first).
fn episode_loss(embedded: &Tensor) -> Tensor {
    let labels = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    let support = embedded.narrow(0, 0, 3).unwrap();
    let query = embedded.narrow(0, 3, 6).unwrap();
    let protos = prototypes(&support, &labels(&[0, 1, 2]), 3).unwrap();
    let logits = distance_logits(&query, &protos).unwrap();
    ops::cross_entropy(&logits, &labels(&[0, 0, 1, 1, 2, 2])).unwrap()
}

fn as_params(net: &Conv4, tensors: &[Tensor]) -> ParamSet {
    let mut p = ParamSet::new();
    for ((name, _), t) in net.param_shapes().into_iter().zip(tensors) {
        p.insert(name, t.clone()).unwrap();
    }
    p
}

/// A net of `config` with seeded f64 weights, and 9 random images for it.
fn net_and_images(config: &Conv4Config, seed: u64) -> (Conv4, ParamSet, Tensor) {
    let mut rng = Rng::seed_from(seed, 0);
    let net = Conv4::new(config.clone()).unwrap();
    let init = net.init(seed, DType::F64, &Device::Cpu).unwrap();
    let side = config.image_size;
    let images = random(&[9, config.in_channels, side, side], &mut rng);
    (net, init, images)
}

/// The loss at `weights` and its autograd gradient, flattened per tensor.
fn loss_and_gradient(
    weights: &ParamSet,
    loss: impl Fn(&[Tensor]) -> Tensor,
) -> (f64, Vec<Vec<f64>>) {
    let vars: Vec<Var> = weights
        .tensors()
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let value = loss(&leaves);
    let grads = value.backward().unwrap();
    let flat = vars
        .iter()
        .map(|v| {
            let g = grads.get(v.as_tensor()).unwrap();
            g.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect();
    (value.to_scalar().unwrap(), flat)
}

fn matches_finite_differences(config: Conv4Config, seed: u64) {
    let (net, init, images) = net_and_images(&config, seed);
    let loss = |tensors: &[Tensor]| {
        episode_loss(&net.forward(&as_params(&net, tensors), &images).unwrap())
    };
    let (_, analytic) = loss_and_gradient(&init, loss);
    let mut worst = 0f64;
    for (i, analytic) in analytic.iter().enumerate() {
        let base: Vec<f64> = init.tensors()[i].flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut moved = init.tensors().to_vec();
                let mut v = base.clone();
                v[j] += delta;
                moved[i] = Tensor::from_vec(v, moved[i].dims(), &Device::Cpu).unwrap();
                loss(&moved).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(STEP) - at(-STEP)) / (2.0 * STEP);
            worst = worst.max((analytic[j] - numeric).abs() / numeric.abs().max(1.0));
        }
    }
    assert!(worst < TOLERANCE, "{config:?}: gradient error {worst:e}");
}

#[test]
fn four_max_pool_blocks_down_to_one_pixel() {
    // 16 -> 8 -> 4 -> 2 -> 1: the Omniglot net's shape on a smaller image,
    // small enough that no finite difference crosses a ReLU or pooling kink.
    matches_finite_differences(
        Conv4Config {
            image_size: 16,
            filters: 2,
            blocks: 4,
            downsample: Downsample::MaxPool,
            feature_head: FeatureHead::Flatten,
            ..Conv4Config::omniglot()
        },
        1,
    );
}

#[test]
fn stride_two_rgb_with_spatial_mean() {
    matches_finite_differences(
        Conv4Config {
            in_channels: 3,
            image_size: 21,
            filters: 3,
            blocks: 3,
            downsample: Downsample::Stride2,
            feature_head: FeatureHead::SpatialMean,
            ..Conv4Config::omniglot()
        },
        3,
    );
}

/// The embedding built from candle's own ops (the backbone's reference
/// path, which never uses our CPU kernels), block for block as `Conv4`.
fn reference_embedding(config: &Conv4Config, params: &ParamSet, images: &Tensor) -> Tensor {
    let get = |name: String| params.get(&name).unwrap().clone();
    let mut x = images.clone();
    for block in 0..config.blocks {
        let weight = get(format!("block{block}.conv.weight"));
        let stride = match config.downsample {
            Downsample::Stride2 => 2,
            Downsample::MaxPool => 1,
        };
        x = candle_path::conv2d(&x, &weight, stride, 1).unwrap();
        let gamma = get(format!("block{block}.bn.weight"));
        let beta = get(format!("block{block}.bn.bias"));
        let normalised = candle_path::batch_norm(&x, &gamma, &beta, config.batch_norm_eps);
        x = candle_path::relu(&normalised.unwrap()).unwrap();
        if config.downsample == Downsample::MaxPool {
            x = candle_path::max_pool2x2(&x).unwrap();
        }
    }
    match config.feature_head {
        FeatureHead::SpatialMean => x.mean((2, 3)).unwrap(),
        FeatureHead::Flatten => x.flatten_from(1).unwrap(),
    }
}

/// Nets too large for finite differences (a step of 1e-5 crosses some of
/// their hundreds of thousands of ReLU and pooling kinks): the loss and every
/// weight gradient through our CPU kernels must equal those through candle's
/// own ops, which the backbone's tests check against finite differences.
fn kernels_match_candles_ops(config: Conv4Config, seed: u64) {
    let (net, init, images) = net_and_images(&config, seed);
    let (ours_loss, ours) = loss_and_gradient(&init, |t| {
        episode_loss(&net.forward(&as_params(&net, t), &images).unwrap())
    });
    let (reference_loss, reference) = loss_and_gradient(&init, |t| {
        episode_loss(&reference_embedding(&config, &as_params(&net, t), &images))
    });
    assert!((ours_loss - reference_loss).abs() < 1e-10 * reference_loss.abs().max(1.0));
    let mut worst = 0f64;
    for (a, b) in ours.iter().flatten().zip(reference.iter().flatten()) {
        worst = worst.max((a - b).abs() / b.abs().max(1e-3));
    }
    assert!(
        worst < 1e-8,
        "{config:?}: kernels against candle's ops {worst:e}"
    );
}

#[test]
fn six_blocks_at_full_resolution() {
    // Omniglot's native 105x105: 52, 26, 13, 6, 3, 1 after the six blocks.
    kernels_match_candles_ops(
        Conv4Config {
            image_size: 105,
            filters: 4,
            blocks: 6,
            downsample: Downsample::MaxPool,
            feature_head: FeatureHead::Flatten,
            ..Conv4Config::omniglot()
        },
        1,
    );
}

#[test]
fn wide_four_blocks_at_56_with_a_flattened_map() {
    // 56 -> 28 -> 14 -> 7 -> 3: a 3x3 map of 128 filters, 1,152-d embeddings.
    kernels_match_candles_ops(
        Conv4Config {
            image_size: 56,
            filters: 128,
            blocks: 4,
            downsample: Downsample::MaxPool,
            feature_head: FeatureHead::Flatten,
            ..Conv4Config::omniglot()
        },
        2,
    );
}
