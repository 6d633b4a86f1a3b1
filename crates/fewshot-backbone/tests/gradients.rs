//! Every op of the backbone, and a whole MAML inner loop through the conv-4
//! network, checked against central finite differences in f64: first order,
//! and second order (the gradient of a gradient-vector product).

use candle_core::{DType, Device, Tensor, Var};
use fewshot_backbone::{ops, second_order, Conv4, Conv4Config, Downsample, FeatureHead, ParamSet};
use fewshot_data::Rng;

type Scalar = Box<dyn Fn(&[Tensor]) -> Tensor>;

const STEP: f64 = 1e-5;
const TOLERANCE: f64 = 1e-6;

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn value(f: &Scalar, inputs: &[Tensor]) -> f64 {
    f(inputs).to_scalar::<f64>().unwrap()
}

/// Autograd gradient of `f` at `inputs`, one tensor per input, still attached
/// to the graph when second-order differentiation is on.
fn autograd(f: &Scalar, inputs: &[Tensor]) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&leaves).backward().unwrap();
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like().unwrap(),
        })
        .collect()
}

/// Largest error of the autograd gradient against central differences,
/// relative to max(1, |numeric|).
fn first_order_error(f: &Scalar, inputs: &[Tensor]) -> f64 {
    let analytic = autograd(f, inputs);
    let mut worst = 0f64;
    for (i, input) in inputs.iter().enumerate() {
        let base: Vec<f64> = input.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f64> = analytic[i].flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut moved = inputs.to_vec();
                moved[i] = Tensor::from_vec(v, input.dims(), &Device::Cpu).unwrap();
                value(f, &moved)
            };
            let numeric = (at(STEP) - at(-STEP)) / (2.0 * STEP);
            worst = worst.max((got[j] - numeric).abs() / numeric.abs().max(1.0));
        }
    }
    worst
}

/// `h(x) = sum(grad f(x) * v)` for a fixed random `v`: its gradient is the
/// Hessian-vector product, which exercises every op's backward of a backward.
fn gradient_dot(f: Scalar, inputs: &[Tensor], rng: &mut Rng) -> Scalar {
    let directions: Vec<Tensor> = inputs.iter().map(|t| random(t.dims(), rng)).collect();
    Box::new(move |xs: &[Tensor]| {
        // Zero-valued leaf probes added to the inputs: their gradients are the
        // gradients at the inputs, still attached to the inputs' graph.
        let probes: Vec<Var> = xs
            .iter()
            .map(|t| Var::from_tensor(&t.zeros_like().unwrap()).unwrap())
            .collect();
        let leaves: Vec<Tensor> = probes
            .iter()
            .zip(xs)
            .map(|(p, x)| (x + p.as_tensor()).unwrap())
            .collect();
        let grads = f(&leaves).backward().unwrap();
        let mut total = Tensor::new(0f64, &Device::Cpu).unwrap();
        for (v, d) in probes.iter().zip(&directions) {
            if let Some(g) = grads.get(v.as_tensor()) {
                total = (total + (g * d).unwrap().sum_all().unwrap()).unwrap();
            }
        }
        total
    })
}

fn check(name: &str, f: Scalar, inputs: Vec<Tensor>, rng: &mut Rng) {
    second_order::ensure_available().unwrap();
    let first = first_order_error(&f, &inputs);
    assert!(first < TOLERANCE, "{name}: first-order error {first:e}");
    let h = gradient_dot(f, &inputs, rng);
    let second = first_order_error(&h, &inputs);
    assert!(second < TOLERANCE, "{name}: second-order error {second:e}");
}

/// A scalar that depends on every output element with a different weight, so
/// that gradients are not symmetric by accident.
fn weighted_sum(y: &Tensor) -> Tensor {
    let n = y.elem_count();
    let w: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.4)
        .collect();
    let w = Tensor::from_vec(w, y.dims(), &Device::Cpu).unwrap();
    (y * w).unwrap().sum_all().unwrap()
}

/// A smooth nonlinearity after an op, so that its second derivative matters.
fn curved(y: &Tensor) -> Tensor {
    weighted_sum(&(y * y).unwrap())
}

#[test]
fn conv2d_every_stride_and_padding_on_odd_sizes() {
    let mut rng = Rng::seed_from(1, 0);
    for (stride, padding, h, w) in [
        (1, 0, 5, 5),
        (1, 1, 6, 6),
        (2, 1, 7, 7),
        (2, 0, 6, 9),
        (3, 2, 8, 7),
    ] {
        let x = random(&[2, 3, h, w], &mut rng);
        let w = random(&[4, 3, 3, 3], &mut rng);
        let f: Scalar =
            Box::new(move |t| curved(&ops::conv2d(&t[0], &t[1], stride, padding).unwrap()));
        check(
            &format!("conv2d stride {stride} padding {padding} {h}x{w}"),
            f,
            vec![x, w],
            &mut rng,
        );
    }
}

#[test]
fn batch_norm_with_batch_statistics() {
    let mut rng = Rng::seed_from(2, 0);
    let x = random(&[3, 2, 3, 3], &mut rng);
    let gamma = random(&[2], &mut rng);
    let beta = random(&[2], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::batch_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()));
    check("batch_norm", f, vec![x, gamma, beta], &mut rng);
}

#[test]
fn batch_norm_with_relu() {
    let mut rng = Rng::seed_from(8, 0);
    let x = random(&[3, 2, 4, 3], &mut rng);
    let gamma = random(&[2], &mut rng);
    let beta = random(&[2], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::batch_norm_relu(&t[0], &t[1], &t[2], 1e-5).unwrap()));
    check("batch_norm_relu", f, vec![x, gamma, beta], &mut rng);
}

#[test]
fn batch_norm_relu_and_max_pool_fused_on_odd_sizes() {
    let mut rng = Rng::seed_from(10, 0);
    // 5x7 planes: the last row and column belong to no window.
    let x = random(&[3, 2, 5, 7], &mut rng);
    let gamma = random(&[2], &mut rng);
    let beta = random(&[2], &mut rng);
    let f: Scalar =
        Box::new(|t| curved(&ops::batch_norm_relu_pool(&t[0], &t[1], &t[2], 1e-5).unwrap()));
    check("batch_norm_relu_pool", f, vec![x, gamma, beta], &mut rng);
}

#[test]
fn convolution_block_fused_on_odd_sizes() {
    let mut rng = Rng::seed_from(12, 0);
    // A 5x7 convolution output: its last row and column belong to no window.
    let x = random(&[3, 2, 5, 7], &mut rng);
    let weight = random(&[3, 2, 3, 3], &mut rng);
    let gamma = random(&[3], &mut rng);
    let beta = random(&[3], &mut rng);
    let f: Scalar = Box::new(|t| {
        let block = ops::conv_batch_norm_relu_pool(&t[0], &t[1], (&t[2], &t[3]), (1, 1), 1e-5);
        curved(&block.unwrap())
    });
    check(
        "conv_batch_norm_relu_pool",
        f,
        vec![x, weight, gamma, beta],
        &mut rng,
    );
}

#[test]
fn relu_away_from_the_kink() {
    let mut rng = Rng::seed_from(3, 0);
    let x = random(&[4, 5], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::relu(&t[0]).unwrap()));
    check("relu", f, vec![x], &mut rng);
}

#[test]
fn max_pool_floor_mode_on_odd_sizes() {
    let mut rng = Rng::seed_from(4, 0);
    let x = random(&[2, 2, 5, 7], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::max_pool2x2(&t[0]).unwrap()));
    check("max_pool2x2", f, vec![x], &mut rng);
}

#[test]
fn max_pool_ceil_mode_on_odd_sizes() {
    let mut rng = Rng::seed_from(9, 0);
    let x = random(&[2, 2, 5, 3], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::max_pool2x2_ceil(&t[0]).unwrap()));
    check("max_pool2x2_ceil", f, vec![x], &mut rng);
}

#[test]
fn per_sample_convolution_and_linear() {
    let mut rng = Rng::seed_from(10, 0);
    let x = random(&[2, 2, 4, 3], &mut rng);
    let w = random(&[2, 3, 2, 3, 3], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::conv2d_per_sample(&t[0], &t[1], 1).unwrap()));
    check("conv2d_per_sample", f, vec![x, w], &mut rng);
    let x = random(&[3, 4], &mut rng);
    let w = random(&[3, 2, 4], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::linear_per_sample(&t[0], &t[1]).unwrap()));
    check("linear_per_sample", f, vec![x, w], &mut rng);
}

#[test]
fn spatial_mean_and_flatten() {
    let mut rng = Rng::seed_from(5, 0);
    let x = random(&[2, 3, 3, 2], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::spatial_mean(&t[0]).unwrap()));
    check("spatial_mean", f, vec![x.clone()], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::flatten(&t[0]).unwrap()));
    check("flatten", f, vec![x], &mut rng);
}

#[test]
fn linear_with_bias() {
    let mut rng = Rng::seed_from(6, 0);
    let x = random(&[3, 4], &mut rng);
    let w = random(&[5, 4], &mut rng);
    let b = random(&[5], &mut rng);
    let f: Scalar = Box::new(|t| curved(&ops::linear(&t[0], &t[1], Some(&t[2])).unwrap()));
    check("linear", f, vec![x, w, b], &mut rng);
}

#[test]
fn softmax_family_and_cross_entropy() {
    let mut rng = Rng::seed_from(7, 0);
    let logits = random(&[4, 5], &mut rng);
    let f: Scalar = Box::new(|t| weighted_sum(&ops::log_softmax(&t[0]).unwrap()));
    check("log_softmax", f, vec![logits.clone()], &mut rng);
    let f: Scalar = Box::new(|t| weighted_sum(&ops::softmax(&t[0]).unwrap()));
    check("softmax", f, vec![logits.clone()], &mut rng);
    let labels = Tensor::new(&[0u32, 3, 4, 1], &Device::Cpu).unwrap();
    let f: Scalar = Box::new(move |t| ops::cross_entropy(&t[0], &labels).unwrap());
    check("cross_entropy", f, vec![logits], &mut rng);
}

/// A tiny conv-4 (both downsampling kinds) so every parameter can be checked.
fn tiny_net(downsample: Downsample) -> Conv4 {
    Conv4::new(Conv4Config {
        in_channels: 1,
        image_size: 8,
        filters: 3,
        blocks: 2,
        downsample,
        batch_norm: true,
        batch_norm_eps: 1e-5,
        feature_head: FeatureHead::SpatialMean,
        classifier_outputs: Some(3),
    })
    .unwrap()
}

struct Task {
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    query_labels: Tensor,
}

fn task(rng: &mut Rng) -> Task {
    let labels = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    Task {
        support: random(&[3, 1, 8, 8], rng),
        support_labels: labels(&[0, 1, 2]),
        query: random(&[6, 1, 8, 8], rng),
        query_labels: labels(&[0, 1, 2, 2, 1, 0]),
    }
}

const INNER_LR: f64 = 0.3;

/// MAML's meta-loss: `steps` SGD steps on the support loss, then the query loss.
/// With `second_order` false the inner gradients are treated as constants.
fn meta_loss(
    net: &Conv4,
    params: &ParamSet,
    task: &Task,
    steps: usize,
    second_order: bool,
) -> Tensor {
    let mut adapted = params.clone();
    for _ in 0..steps {
        let (probed, probes) = adapted.probed().unwrap();
        let logits = net.forward(&probed, &task.support).unwrap();
        let loss = ops::cross_entropy(&logits, &task.support_labels).unwrap();
        let grads = probes.gradients(&loss.backward().unwrap()).unwrap();
        let grads = if second_order { grads } else { grads.detach() };
        adapted = adapted.sgd_step(&grads, INNER_LR).unwrap();
    }
    let logits = net.forward(&adapted, &task.query).unwrap();
    ops::cross_entropy(&logits, &task.query_labels).unwrap()
}

fn as_params(net: &Conv4, tensors: &[Tensor]) -> ParamSet {
    let mut p = ParamSet::new();
    for ((name, _), t) in net.param_shapes().into_iter().zip(tensors) {
        p.insert(name, t.clone()).unwrap();
    }
    p
}

fn inner_loop_matches_finite_differences(downsample: Downsample, steps: usize) {
    second_order::ensure_available().unwrap();
    let mut rng = Rng::seed_from(10 + steps as u64, 0);
    let net = tiny_net(downsample);
    let init = net.init(3, DType::F64, &Device::Cpu).unwrap();
    let task = task(&mut rng);
    let exact = {
        let net = net.clone();
        let task = Task { ..task };
        Box::new(move |t: &[Tensor]| meta_loss(&net, &as_params(&net, t), &task, steps, true))
            as Scalar
    };
    let error = first_order_error(&exact, init.tensors());
    assert!(
        error < TOLERANCE,
        "{steps}-step meta-gradient error {error:e}"
    );
}

#[test]
fn meta_gradient_through_one_inner_step() {
    inner_loop_matches_finite_differences(Downsample::Stride2, 1);
}

#[test]
fn meta_gradient_through_two_inner_steps_with_max_pooling() {
    inner_loop_matches_finite_differences(Downsample::MaxPool, 2);
}

#[test]
fn first_order_meta_gradient_differs_from_the_exact_one() {
    second_order::ensure_available().unwrap();
    let mut rng = Rng::seed_from(20, 0);
    let net = tiny_net(Downsample::Stride2);
    let init = net.init(4, DType::F64, &Device::Cpu).unwrap();
    let task = task(&mut rng);
    let gradient = |second_order: bool| -> Vec<f64> {
        let vars = init.to_vars().unwrap();
        let loss = meta_loss(&net, &vars.as_params(), &task, 1, second_order);
        let grads = vars.gradients(&loss.backward().unwrap()).unwrap();
        grads
            .tensors()
            .iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    };
    let (exact, first) = (gradient(true), gradient(false));
    let diff: f64 = exact
        .iter()
        .zip(&first)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = exact.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!(
        diff / norm > 1e-3,
        "first-order equals exact: relative difference {:e}",
        diff / norm
    );
}
