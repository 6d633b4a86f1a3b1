//! The exact meta-gradient through 1, 2 and 5 inner steps against central
//! finite differences in f64; the first-order one differs from it; and a
//! setup where candle would silently drop second-order terms is refused.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, Conv4, Conv4Config, Downsample, FeatureHead, ParamSet};
use maml::{adapt, Adapt, InnerLoop, Maml, MamlConfig, Order};

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

struct Task {
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    query_labels: Tensor,
}

fn task() -> Task {
    let mut rng = fewshot_data::Rng::seed_from(5, 0);
    let mut images = |n: usize| {
        let v: Vec<f64> = (0..n * 64).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, (n, 1, 8, 8), &Device::Cpu).unwrap()
    };
    let labels = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
    Task {
        support: images(6),
        support_labels: labels(&[0, 0, 1, 1, 2, 2]),
        query: images(6),
        query_labels: labels(&[0, 1, 2, 2, 1, 0]),
    }
}

/// The inner learning rate is small enough that five steps stay in a smooth
/// region: with 0.1 on this 3-filter net a ReLU kink is crossed within the
/// finite-difference step and the numeric gradient changes with the step size.
fn meta_loss(net: &Conv4, params: &ParamSet, task: &Task, steps: usize, order: Order) -> Tensor {
    let inner = InnerLoop {
        lr: 0.05,
        steps,
        order,
        adapt: Adapt::All,
    };
    let adapted = adapt(net, params, &task.support, &task.support_labels, 2, &inner).unwrap();
    ops::cross_entropy(
        &net.forward(&adapted, &task.query).unwrap(),
        &task.query_labels,
    )
    .unwrap()
}

fn flat(params: &ParamSet) -> Vec<f64> {
    params
        .tensors()
        .iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

fn meta_gradient(
    net: &Conv4,
    init: &ParamSet,
    task: &Task,
    steps: usize,
    order: Order,
) -> Vec<f64> {
    let vars = init.to_vars().unwrap();
    let loss = meta_loss(net, &vars.as_params(), task, steps, order);
    flat(&vars.gradients(&loss.backward().unwrap()).unwrap())
}

/// Central differences of the meta-loss for every weight.
fn numeric_gradient(net: &Conv4, init: &ParamSet, task: &Task, steps: usize) -> Vec<f64> {
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
                meta_loss(net, &moved, task, steps, Order::First)
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

fn check_steps(steps: usize) {
    fewshot_backbone::second_order::ensure_available().unwrap();
    let net = tiny_net();
    let init = net.init(11, DType::F64, &Device::Cpu).unwrap();
    let task = task();
    let exact = meta_gradient(&net, &init, &task, steps, Order::Second);
    let numeric = numeric_gradient(&net, &init, &task, steps);
    let error = relative_error(&exact, &numeric);
    assert!(
        error < 1e-6,
        "{steps} inner steps: relative error {error:e}"
    );
    let first = meta_gradient(&net, &init, &task, steps, Order::First);
    let gap = relative_error(&first, &exact);
    assert!(
        gap > 1e-3,
        "{steps} inner steps: first order equals exact ({gap:e})"
    );
}

#[test]
fn exact_through_one_inner_step() {
    check_steps(1);
}

#[test]
fn exact_through_two_inner_steps() {
    check_steps(2);
}

#[test]
fn exact_through_five_inner_steps() {
    check_steps(5);
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
