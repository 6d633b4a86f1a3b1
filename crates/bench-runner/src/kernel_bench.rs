//! `fewshot bench --suite kernels`: the backbone's CPU path (or a GPU's, with
//! `--device`) on the shapes that matter, each case timed as the median of
//! repeated steps. The same cases, with the same shapes, are in
//! `scripts/pytorch_kernels.py`.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    kernels, ops, Adam, AdamConfig, Conv4, Conv4Config, DeviceChoice, Downsample, EpisodeTensors,
    FeatureHead, Learner, ParamSet, VarSet,
};
use fewshot_data::Rng;
use maml::{Adapt, InnerLoop, Order};
use serde_json::json;

/// Images per training or evaluation batch.
const BATCH: usize = 80;
const WAYS: usize = 5;
/// MAML tasks: 5-way 1-shot with 15 queries per class.
const SUPPORT: usize = 5;
const QUERY: usize = 75;
/// The paper's Omniglot meta-batch: 32 tasks of 5-way 1-shot, 1 query per class.
const META_BATCH: usize = 32;

/// A benchmark case: a name and one step of work.
struct Case {
    name: &'static str,
    what: &'static str,
    step: Box<dyn FnMut() -> Result<()>>,
}

/// Every case's name, in the order they run.
pub const CASES: [&str; 10] = [
    "train-conv4-28",
    "train-conv4-84",
    "train-conv4-105",
    "train-conv5-128-56",
    "protonet-60way-28",
    "maml2-1step-28",
    "maml2-5step-28",
    "maml2-5step-84",
    "maml2-batch32-28",
    "eval-conv4-28",
];

pub fn run(only: &[String], repeats: usize, choice: DeviceChoice, as_json: bool) -> Result<()> {
    for name in only {
        if !CASES.contains(&name.as_str()) {
            bail!(
                "unknown kernel case `{name}`; the cases are {}",
                CASES.join(", ")
            );
        }
    }
    let device = choice.open()?;
    let mut results = Vec::new();
    for name in CASES {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let mut case = build(name, &device)?;
        // Warm-up; on the CPU it also counts the convolution work.
        let flops = match device.is_cpu() {
            true => counted_step(&mut case)?,
            false => convolution_flops(name)?,
        };
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            (case.step)()?;
            // A GPU runs ahead of the host: time the work, not its queueing.
            device.synchronize()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let gflops = flops / median / 1e9;
        if !as_json {
            println!(
                "{:<16} {:>9.1} ms  {:>6.1} GFLOP/s  ({})",
                case.name,
                median * 1e3,
                gflops,
                case.what
            );
        }
        results.push(json!({
            "name": case.name,
            "median_ms": median * 1e3,
            "gflops": gflops,
            "conv_gflop_per_step": flops / 1e9,
            "repeats": times.len(),
        }));
    }
    let peak = peak_memory_mib();
    if as_json {
        let report = json!({
            "device": choice.to_string(),
            "threads": rayon::current_num_threads(),
            "peak_rss_mib": peak,
            "cases": results,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if let Some(peak) = peak {
        println!("peak resident memory of this process: {peak:.0} MiB");
    }
    Ok(())
}

/// The multiply-adds (times 2) of one step's convolutions as the CPU
/// kernels count them (none on another device or path).
fn counted_step(case: &mut Case) -> Result<f64> {
    let before = kernels::convolution_flops();
    (case.step)()?;
    Ok((kernels::convolution_flops() - before) as f64)
}

/// [`counted_step`] of the case built on the CPU kernels, after a warm-up:
/// a GPU does the same work.
fn convolution_flops(name: &'static str) -> Result<f64> {
    let mut case = build(name, &Device::Cpu)?;
    ops::path::with_path(ops::path::OpsPath::Kernels, || {
        (case.step)()?;
        counted_step(&mut case)
    })
}

fn build(name: &'static str, device: &Device) -> Result<Case> {
    let mut rng = Rng::seed_from(0, 0);
    Ok(match name {
        "train-conv4-28" => train_case(name, classifier_net(pooled_28()), &mut rng, device)?,
        "train-conv4-84" => train_case(
            name,
            classifier_net(Conv4Config::mini_imagenet()),
            &mut rng,
            device,
        )?,
        "train-conv4-105" => train_case(
            name,
            classifier_net(Conv4Config {
                image_size: 105,
                ..pooled_28()
            }),
            &mut rng,
            device,
        )?,
        "train-conv5-128-56" => train_case(
            name,
            classifier_net(Conv4Config {
                image_size: 56,
                filters: 128,
                blocks: 5,
                ..pooled_28()
            }),
            &mut rng,
            device,
        )?,
        "protonet-60way-28" => protonet_case(name, &mut rng, device)?,
        "eval-conv4-28" => eval_case(name, classifier_net(pooled_28()), &mut rng, device)?,
        "maml2-1step-28" => maml_case(name, Conv4Config::omniglot(), 0.4, 1, &mut rng, device)?,
        "maml2-5step-28" => maml_case(name, Conv4Config::omniglot(), 0.4, 5, &mut rng, device)?,
        "maml2-5step-84" => maml_case(
            name,
            Conv4Config::mini_imagenet(),
            0.01,
            5,
            &mut rng,
            device,
        )?,
        "maml2-batch32-28" => maml_batch_case(name, &mut rng, device)?,
        other => bail!("unknown kernel case `{other}`"),
    })
}

/// The 64-filter conv-4 of Prototypical Networks on 28x28 Omniglot:
/// stride-1 convolutions and max-pooling (28 -> 14 -> 7 -> 3 -> 1).
fn pooled_28() -> Conv4Config {
    Conv4Config {
        downsample: Downsample::MaxPool,
        feature_head: FeatureHead::Flatten,
        ..Conv4Config::omniglot()
    }
}

fn classifier_net(config: Conv4Config) -> Conv4Config {
    Conv4Config {
        classifier_outputs: Some(WAYS),
        ..config
    }
}

fn images(count: usize, config: &Conv4Config, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    let side = config.image_size;
    let len = count * config.in_channels * side * side;
    let values: Vec<f32> = (0..len).map(|_| rng.uniform() as f32).collect();
    Ok(Tensor::from_vec(
        values,
        (count, config.in_channels, side, side),
        device,
    )?)
}

/// `count` labels cycling through `ways` classes.
fn labels(count: usize, ways: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<u32> = (0..count).map(|i| (i % ways) as u32).collect();
    Ok(Tensor::from_vec(values, count, device)?)
}

fn network(config: Conv4Config, device: &Device) -> Result<(Conv4, ParamSet)> {
    let net = Conv4::new(config)?;
    let params = net.init(0, DType::F32, device)?;
    Ok((net, params))
}

/// Forward, backward and an Adam step on a batch of 80 images.
fn train_case(
    name: &'static str,
    config: Conv4Config,
    rng: &mut Rng,
    device: &Device,
) -> Result<Case> {
    let x = images(BATCH, &config, rng, device)?;
    let y = labels(BATCH, WAYS, device)?;
    let (net, params) = network(config, device)?;
    let weights: VarSet = params.to_vars()?;
    let mut adam = Adam::new(AdamConfig::default(), &weights)?;
    let step = move || -> Result<()> {
        let logits = net.forward(&weights.as_params(), &x)?;
        let loss = ops::cross_entropy(&logits, &y)?;
        let grads = weights.gradients(&loss.backward()?)?;
        adam.step(&weights, &grads)?;
        Ok(())
    };
    Ok(Case {
        name,
        what: "batch of 80: forward, backward, Adam",
        step: Box::new(step),
    })
}

/// Forward only, no gradient, on a batch of 80 images.
fn eval_case(
    name: &'static str,
    config: Conv4Config,
    rng: &mut Rng,
    device: &Device,
) -> Result<Case> {
    let x = images(BATCH, &config, rng, device)?;
    let (net, params) = network(config, device)?;
    let step = move || -> Result<()> {
        net.forward(&params, &x)?;
        Ok(())
    };
    Ok(Case {
        name,
        what: "batch of 80: forward only",
        step: Box::new(step),
    })
}

/// One MAML task, 5-way 1-shot with 75 queries: `steps` inner SGD steps and
/// the exact (second-order) meta-gradient of the query loss.
fn maml_case(
    name: &'static str,
    config: Conv4Config,
    inner_lr: f64,
    steps: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Case> {
    fewshot_backbone::second_order::ensure_available()?;
    let config = classifier_net(config);
    let support = images(SUPPORT, &config, rng, device)?;
    let query = images(QUERY, &config, rng, device)?;
    let (support_labels, query_labels) =
        (labels(SUPPORT, WAYS, device)?, labels(QUERY, WAYS, device)?);
    let (net, params) = network(config, device)?;
    let inner = InnerLoop {
        lr: inner_lr,
        steps,
        order: Order::Second,
        adapt: Adapt::All,
        learned_rates: false,
    };
    let query_weights = maml::query_loss_weights(steps, None, 0);
    let step = move || -> Result<()> {
        let task = maml::Task {
            support: &support,
            support_labels: &support_labels,
            shots: 1,
            query: &query,
            query_labels: &query_labels,
        };
        maml::meta_gradient(
            &net,
            &params,
            &task,
            &inner,
            maml::QueryNormalisation::Batch,
            &query_weights,
        )?;
        Ok(())
    };
    Ok(Case {
        name,
        what: "one 5-way 1-shot task, 75 queries: inner loop and exact meta-gradient",
        step: Box::new(step),
    })
}

/// One meta-training step of the `maml` learner as the paper trains Omniglot
/// 5-way 1-shot: 32 tasks (5 support and 5 query images each), 1 inner step,
/// the exact meta-gradient, Adam. The learner spreads the tasks over the
/// threads; its peak memory is that of a whole meta-batch.
fn maml_batch_case(name: &'static str, rng: &mut Rng, device: &Device) -> Result<Case> {
    let config = maml::MamlConfig::omniglot_5way();
    let network = config.network();
    let batch = (0..META_BATCH)
        .map(|_| {
            Ok(EpisodeTensors {
                ways: WAYS,
                support: images(WAYS, &network, rng, device)?,
                support_labels: labels(WAYS, WAYS, device)?,
                query: images(WAYS, &network, rng, device)?,
                query_labels: Some(labels(WAYS, WAYS, device)?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut learner = maml::Maml::new(config, device)?;
    let step = move || -> Result<()> {
        learner.meta_train(&batch)?;
        Ok(())
    };
    Ok(Case {
        name,
        what: "meta-batch of 32 5-way 1-shot tasks, 1 query per class, 1 inner step, second order, Adam",
        step: Box::new(step),
    })
}

/// One meta-training step of the `protonet` learner as the paper trains
/// Omniglot: a 60-way 1-shot episode with 5 queries a class (360 images
/// through the 64-filter conv-4 in one batch), prototypes, distances,
/// cross-entropy, backward, Adam.
fn protonet_case(name: &'static str, rng: &mut Rng, device: &Device) -> Result<Case> {
    const PROTONET_WAYS: usize = 60;
    const PROTONET_QUERIES: usize = 5;
    let config = protonet::ProtoNetConfig::default();
    let query_count = PROTONET_WAYS * PROTONET_QUERIES;
    let episode = EpisodeTensors {
        ways: PROTONET_WAYS,
        support: images(PROTONET_WAYS, &config.embedding, rng, device)?,
        support_labels: labels(PROTONET_WAYS, PROTONET_WAYS, device)?,
        query: images(query_count, &config.embedding, rng, device)?,
        query_labels: Some(labels(query_count, PROTONET_WAYS, device)?),
    };
    let mut learner = protonet::ProtoNet::new(config, device)?;
    let step = move || -> Result<()> {
        learner.meta_train(std::slice::from_ref(&episode))?;
        Ok(())
    };
    Ok(Case {
        name,
        what: "60-way 1-shot 5-query episode: 360 images, prototypes, distances, backward, Adam",
        step: Box::new(step),
    })
}

/// The process's peak resident memory so far (Linux), in MiB.
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
