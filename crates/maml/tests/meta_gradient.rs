//! The exact meta-gradient through 1, 2 and 5 inner steps against central
//! finite differences in f64, both as the learner computes it (reverse
//! accumulation, `maml::meta_gradient`) and by backpropagating through the
//! unrolled loop, also with MAML++'s multi-step loss; the first-order one
//! differs from it; and a setup where candle would silently drop
//! second-order terms is refused.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, Conv4, Conv4Config, Downsample, FeatureHead, ParamSet};
use maml::inner_loop::{is_adapted, per_step_name, query_logits, rate_name};
use maml::{
    adapt, meta_gradient, query_loss_weights, Adapt, InnerLoop, Maml, MamlConfig, Order,
    QueryNormalisation, Task,
};

fn tiny_net() -> Conv4 {
    Conv4::new(Conv4Config {
        in_channels: 1,
        image_size: 8,
        filters: 3,
        blocks: 2,
        downsample: Downsample::Stride2,
        batch_norm: true,
        batch_norm_eps: 1e-5,
        feature_head: FeatureHead::SpatialMean,
        classifier_outputs: Some(3),
    })
    .unwrap()
}

struct Images {
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    query_labels: Tensor,
}

fn task() -> Images {
    let mut rng = fewshot_data::Rng::seed_from(5, 0);
    let mut images = |n: usize| {
        let v: Vec<f64> = (0..n * 64).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, (n, 1, 8, 8), &Device::Cpu).unwrap()
    };
    let labels = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    Images {
        support: images(6),
        support_labels: labels(&[0, 0, 1, 1, 2, 2]),
        query: images(6),
        query_labels: labels(&[0, 1, 2, 2, 1, 0]),
    }
}

/// The inner learning rate is small enough that five steps stay in a smooth
/// region: with 0.1 on this 3-filter net a ReLU kink is crossed within the
/// finite-difference step and the numeric gradient changes with the step size.
fn inner_loop(steps: usize, order: Order, adapt: Adapt) -> InnerLoop {
    InnerLoop {
        lr: 0.05,
        steps,
        order,
        adapt,
        learned_rates: false,
    }
}

/// The meta-loss by definition: the query loss after each number of inner
/// steps (each from scratch, through the unrolled loop), weighted.
fn meta_loss(
    net: &Conv4,
    params: &ParamSet,
    task: &Images,
    inner: &InnerLoop,
    normalisation: QueryNormalisation,
    weights: &[f64],
) -> Tensor {
    let mut total = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    for (k, &weight) in weights.iter().enumerate().filter(|(_, &w)| w != 0.0) {
        let steps = InnerLoop {
            steps: k + 1,
            ..*inner
        };
        let adapted = adapt(net, params, &task.support, &task.support_labels, 2, &steps).unwrap();
        let logits =
            query_logits(net, &adapted, &task.support, &task.query, normalisation).unwrap();
        let loss = ops::cross_entropy(&logits, &task.query_labels).unwrap();
        total = (total + (loss * weight).unwrap()).unwrap();
    }
    total
}

fn flat(params: &ParamSet) -> Vec<f64> {
    params
        .tensors()
        .iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

/// Backpropagation through the unrolled inner loop.
fn unrolled_gradient(
    net: &Conv4,
    init: &ParamSet,
    task: &Images,
    inner: &InnerLoop,
    normalisation: QueryNormalisation,
    weights: &[f64],
) -> Vec<f64> {
    let vars = init.to_vars().unwrap();
    let loss = meta_loss(net, &vars.as_params(), task, inner, normalisation, weights);
    flat(&vars.gradients(&loss.backward().unwrap()).unwrap())
}

/// What the learner uses: reverse accumulation through the inner loop.
fn reverse_gradient(
    net: &Conv4,
    init: &ParamSet,
    task: &Images,
    inner: &InnerLoop,
    normalisation: QueryNormalisation,
    weights: &[f64],
) -> Vec<f64> {
    let task = Task {
        support: &task.support,
        support_labels: &task.support_labels,
        shots: 2,
        query: &task.query,
        query_labels: &task.query_labels,
    };
    let result = meta_gradient(net, init, &task, inner, normalisation, weights).unwrap();
    flat(&result.gradient)
}

/// Central differences of the meta-loss for every weight.
fn numeric_gradient(
    net: &Conv4,
    init: &ParamSet,
    task: &Images,
    inner: &InnerLoop,
    normalisation: QueryNormalisation,
    weights: &[f64],
) -> Vec<f64> {
    let value_only = InnerLoop {
        order: Order::First,
        ..*inner
    };
    const STEP: f64 = 1e-5;
    let mut grad = Vec::new();
    for (which, (_, tensor)) in init.iter().enumerate() {
        let base: Vec<f64> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut values = base.clone();
                values[j] += delta;
                let mut moved = ParamSet::new();
                for (k, (other, t)) in init.iter().enumerate() {
                    let t = if k == which {
                        Tensor::from_vec(values.clone(), t.dims(), &Device::Cpu).unwrap()
                    } else {
                        t.clone()
                    };
                    moved.insert(other, t).unwrap();
                }
                // The value of the adapted weights does not depend on the order.
                meta_loss(net, &moved, task, &value_only, normalisation, weights)
                    .to_scalar::<f64>()
                    .unwrap()
            };
            grad.push((at(STEP) - at(-STEP)) / (2.0 * STEP));
        }
    }
    grad
}

fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    diff / b.iter().map(|y| y * y).sum::<f64>().sqrt()
}

fn check_steps(steps: usize, adapt: Adapt, normalisation: QueryNormalisation) {
    check_weighted(
        &query_loss_weights(steps, None, 0),
        adapt,
        normalisation,
        PlusPlus::default(),
    );
}

/// MAML++'s options that add weights.
#[derive(Debug, Clone, Copy, Default)]
struct PlusPlus {
    /// Per-layer per-step step sizes, a different one for each weight
    /// tensor and step.
    learned_rates: bool,
    /// Batch norm weights for each step, different for each.
    per_step_bn: bool,
}

/// The meta-gradient of the query losses after each inner step, weighted by
/// `weights` (one a step), with the gradients of the weights `plus` adds.
fn check_weighted(
    weights: &[f64],
    adapt: Adapt,
    normalisation: QueryNormalisation,
    plus: PlusPlus,
) {
    fewshot_backbone::second_order::ensure_available().unwrap();
    let steps = weights.len();
    let net = tiny_net();
    let mut init = net.init(11, DType::F64, &Device::Cpu).unwrap();
    let learned_rates = plus.learned_rates;
    if plus.per_step_bn {
        let mut per_step = ParamSet::new();
        for (name, tensor) in init.iter() {
            if !name.contains(".bn.") {
                per_step.insert(name, tensor.clone()).unwrap();
                continue;
            }
            for k in 0..steps {
                let copy = (tensor * (1.0 + 0.1 * k as f64)).unwrap();
                per_step.insert(per_step_name(name, k), copy).unwrap();
            }
        }
        init = per_step;
    }
    if learned_rates {
        let mut rates = ParamSet::new();
        let adapted = init.iter().filter(|(name, _)| is_adapted(name, adapt));
        for (i, (name, _)) in adapted.enumerate() {
            let per_step: Vec<f64> = (0..steps)
                .map(|k| 0.05 * (1.0 + 0.2 * k as f64) * (1.0 - 0.1 * i as f64))
                .collect();
            let t = Tensor::from_vec(per_step, steps, &Device::Cpu).unwrap();
            rates.insert(rate_name(name), t).unwrap();
        }
        init.extend(&rates).unwrap();
    }
    let task = task();
    let exact = InnerLoop {
        learned_rates,
        ..inner_loop(steps, Order::Second, adapt)
    };
    let numeric = numeric_gradient(&net, &init, &task, &exact, normalisation, weights);
    for (how, gradient) in [
        (
            "reverse",
            reverse_gradient(&net, &init, &task, &exact, normalisation, weights),
        ),
        (
            "unrolled",
            unrolled_gradient(&net, &init, &task, &exact, normalisation, weights),
        ),
    ] {
        let error = relative_error(&gradient, &numeric);
        assert!(
            error < 1e-6,
            "{how}, {weights:?}, {adapt:?}: relative error {error:e}"
        );
    }
    let first = InnerLoop {
        order: Order::First,
        ..exact
    };
    let reverse_first = reverse_gradient(&net, &init, &task, &first, normalisation, weights);
    let unrolled_first = unrolled_gradient(&net, &init, &task, &first, normalisation, weights);
    assert!(relative_error(&reverse_first, &unrolled_first) < 1e-10);
    let gap = relative_error(&reverse_first, &numeric);
    assert!(
        gap > 1e-3,
        "{weights:?}, {adapt:?}: first order equals exact ({gap:e})"
    );
}

#[test]
fn exact_through_one_inner_step() {
    check_steps(1, Adapt::All, QueryNormalisation::Batch);
}

#[test]
fn exact_through_two_inner_steps() {
    check_steps(2, Adapt::All, QueryNormalisation::Batch);
}

#[test]
fn exact_through_five_inner_steps() {
    check_steps(5, Adapt::All, QueryNormalisation::Batch);
}

#[test]
fn exact_through_two_steps_with_queries_normalised_by_the_support_set() {
    check_steps(2, Adapt::All, QueryNormalisation::Support);
}

#[test]
fn exact_through_two_head_only_steps() {
    check_steps(2, Adapt::Head, QueryNormalisation::Batch);
}

/// MAML++'s multi-step loss: every step's query loss counts, unevenly.
#[test]
fn exact_with_the_multi_step_loss_through_three_steps() {
    check_weighted(
        &[0.2, 0.3, 0.5],
        Adapt::All,
        QueryNormalisation::Batch,
        PlusPlus::default(),
    );
}

/// A middle step's loss left out (weight 0) still leaves the others right.
#[test]
fn exact_with_a_multi_step_loss_that_skips_a_step() {
    check_weighted(
        &[0.4, 0.0, 0.6],
        Adapt::All,
        QueryNormalisation::Support,
        PlusPlus::default(),
    );
}

/// MAML++'s learned per-layer per-step step sizes: their gradients and the
/// initialisation's, through three steps.
#[test]
fn exact_with_learned_step_sizes_through_three_steps() {
    check_weighted(
        &query_loss_weights(3, None, 0),
        Adapt::All,
        QueryNormalisation::Batch,
        PlusPlus {
            learned_rates: true,
            ..Default::default()
        },
    );
}

/// Both MAML++ options at once, on the classifier only.
#[test]
fn exact_with_learned_step_sizes_and_the_multi_step_loss() {
    check_weighted(
        &[0.3, 0.7],
        Adapt::Head,
        QueryNormalisation::Batch,
        PlusPlus {
            learned_rates: true,
            ..Default::default()
        },
    );
}

/// MAML++'s per-step batch norm weights: each step's copy gets the gradient
/// of the losses that went through it.
#[test]
fn exact_with_per_step_batch_norm_through_three_steps() {
    check_weighted(
        &query_loss_weights(3, None, 0),
        Adapt::All,
        QueryNormalisation::Batch,
        PlusPlus {
            per_step_bn: true,
            ..Default::default()
        },
    );
}

/// Every MAML++ option at once.
#[test]
fn exact_with_every_maml_plus_plus_option() {
    check_weighted(
        &[0.2, 0.3, 0.5],
        Adapt::All,
        QueryNormalisation::Support,
        PlusPlus {
            learned_rates: true,
            per_step_bn: true,
        },
    );
}

/// Re-runs this test binary with candle's detach switch off: building a
/// second-order learner there must fail with the reason, not train
/// first-order in silence.
#[test]
fn second_order_is_refused_when_candle_would_detach() {
    const CHILD: &str = "MAML_SECOND_ORDER_REFUSAL_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let err = Maml::new(MamlConfig::default(), &Device::Cpu)
            .err()
            .expect("must be refused");
        assert!(
            err.to_string().contains("CANDLE_GRAD_DO_NOT_DETACH"),
            "{err}"
        );
        // First order needs no second derivatives and still works.
        let first = MamlConfig {
            order: Order::First,
            ..MamlConfig::default()
        };
        assert!(Maml::new(first, &Device::Cpu).is_ok());
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "second_order_is_refused_when_candle_would_detach",
            "--exact",
        ])
        .env(CHILD, "1")
        .env("CANDLE_GRAD_DO_NOT_DETACH", "0")
        .status()
        .unwrap();
    assert!(status.success());
}
