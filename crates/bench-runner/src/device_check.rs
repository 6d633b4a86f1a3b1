//! `fewshot check-device`: does a device train as the CPU does?
//!
//! Four checks, each against the CPU kernels: candle's second-order switch
//! on the device (a gradient of a gradient that is not silently zero); every
//! op's value, gradient and second-order gradient
//! ([`fewshot_backbone::device_check`]); MAML's exact meta-gradient, which
//! must also differ from the first-order one (else second order was lost on
//! the way); and three training steps and a prediction of every learner.
//! On a GPU the device runs the portable path; `--device cpu` forces that
//! path on the CPU and so compares the two paths (what CI tests).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::device_check::{self, Agreement, F32_TOLERANCE};
use fewshot_backbone::ops::path::{self, with_path, OpsPath};
use fewshot_backbone::{second_order, Conv4, Conv4Config, DeviceChoice, EpisodeTensors, ParamSet};
use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, FewShotDataset, Rng, SyntheticOptions};
use serde_json::json;

use crate::learners;

/// A small configuration of each learner: narrow networks, so that the
/// portable path's candle convolutions stay quick on the CPU. Adam's `eps`
/// of 1 makes its steps proportional to the gradient: with the default
/// 1e-8, a gradient component at rounding-noise level (one that is zero in
/// exact arithmetic) becomes a full ±lr step whose sign differs between two
/// correct paths, and the runs part after one step.
pub fn tiny_learner_configs() -> Vec<serde_json::Value> {
    let optimizer = json!({ "lr": 0.1, "eps": 1.0 });
    let mut configs = vec![
        json!({ "name": "eb-metanet", "embedding": { "filters": 8 }, "hidden_dim": 16 }),
        json!({
            "name": "maml",
            "ways": 5,
            "inner_lr": 0.4,
            "inner_steps_train": 2,
            "inner_steps_test": 2,
            "order": "second",
            "network": { "filters": 8 }
        }),
        json!({
            "name": "metanet-original",
            "filters": 8,
            "n_outputs_train": 5,
            "n_outputs_test": 5
        }),
        json!({ "name": "protonet", "embedding": { "filters": 8 } }),
    ];
    for config in &mut configs {
        config["optimizer"] = optimizer.clone();
    }
    configs
}

/// The episodes of the learners' runs: 5-way 1-shot, 2 queries a class.
pub const SPEC: EpisodeSpec = EpisodeSpec {
    ways: 5,
    shots: 1,
    queries: 2,
    same_group: false,
};

/// The built-in synthetic glyphs, small: no dataset needed on the device's machine.
pub fn tiny_data() -> Result<FewShotDataset> {
    Ok(synthetic::generate(&SyntheticOptions {
        classes_train: 10,
        classes_val: 5,
        classes_test: 10,
        images_per_class: 4,
        image_size: 28,
        seed: 3,
    })?)
}

/// `count` meta-batches of two episodes each, on `device`.
pub fn batches(
    data: &FewShotDataset,
    count: usize,
    device: &Device,
) -> Result<Vec<Vec<EpisodeTensors>>> {
    let sampler = EpisodeSampler::new(data.store.clone(), data.train.clone(), SPEC, 5)?;
    sampler
        .episodes(0, 2 * count)
        .chunks(2)
        .map(|pair| {
            Ok(pair
                .iter()
                .map(|e| EpisodeTensors::from_episode(e, device, DType::F32))
                .collect::<fewshot_backbone::Result<_>>()?)
        })
        .collect()
}

/// A learner's losses over three training steps from its initial weights,
/// and its query logits on a fourth episode after them.
pub fn learner_run(
    config: &serde_json::Value,
    data: &FewShotDataset,
    device: &Device,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut learner = learners::build(config, device)?;
    let batches = batches(data, 4, device)?;
    let losses = batches[..3]
        .iter()
        .map(|batch| Ok(learner.meta_train(batch)?.loss))
        .collect::<Result<_>>()?;
    let logits = learner.predict(&batches[3][0])?;
    Ok((losses, path::to_host_vec_f64(&logits)?))
}

/// How two runs of one learner compare.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LearnerAgreement {
    pub learner: String,
    /// |a - b| / max(1, |a|, |b|) of the first step's loss: both start from
    /// the same weights, so this is rounding alone.
    pub first_loss: f64,
    /// The same, largest over the three steps: later steps come after
    /// updates summed in another order, and the rounding grows.
    pub losses: f64,
    /// Largest |a - b| of the final logits over their largest magnitude.
    pub logits: f64,
}

impl LearnerAgreement {
    /// The bounds the two paths keep on the CPU (before the portable path's
    /// max-pool and ReLU gave their gradients to the kernels' pixels, the
    /// runs parted by 5 to 50% after one step).
    pub fn passes(&self) -> bool {
        self.first_loss < 1e-4 && self.losses < 1e-2 && self.logits < 2e-2
    }

    pub fn of(learner: &str, a: &(Vec<f64>, Vec<f64>), b: &(Vec<f64>, Vec<f64>)) -> Self {
        let relative = |x: f64, y: f64| (x - y).abs() / x.abs().max(y.abs()).max(1.0);
        let scale = a.1.iter().fold(1f64, |m, v| m.max(v.abs()));
        Self {
            learner: learner.to_string(),
            first_loss: relative(a.0[0], b.0[0]),
            losses: a
                .0
                .iter()
                .zip(&b.0)
                .fold(0f64, |m, (x, y)| m.max(relative(*x, *y))),
            logits: a
                .1
                .iter()
                .zip(&b.1)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale)),
        }
    }
}

/// MAML's meta-gradient on the device against the CPU kernels'.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetaGradientAgreement {
    /// Largest relative difference of the second-order meta-gradient.
    pub second_order: f64,
    /// How far the first-order meta-gradient is from the second-order one,
    /// on the device: the size of the second-order terms.
    pub second_order_terms: f64,
}

impl MetaGradientAgreement {
    /// Agrees to f32 rounding, and the second-order terms are there (far
    /// larger than the rounding).
    pub fn passes(&self) -> bool {
        self.second_order <= F32_TOLERANCE && self.second_order_terms > 100.0 * F32_TOLERANCE
    }
}

/// One 5-way 1-shot task, 10 queries, 2 inner steps of MAML on a 16-filter
/// conv-4: the meta-gradient of both orders.
fn maml_meta_gradients(device: &Device) -> Result<(ParamSet, ParamSet)> {
    let config = Conv4Config {
        filters: 16,
        classifier_outputs: Some(5),
        ..Conv4Config::omniglot()
    };
    let mut rng = Rng::seed_from(17, 0);
    let mut images = |count: usize| -> Result<Tensor> {
        let values: Vec<f32> = (0..count * 28 * 28).map(|_| rng.uniform() as f32).collect();
        Ok(Tensor::from_vec(values, (count, 1, 28, 28), device)?)
    };
    let (support, query) = (images(5)?, images(10)?);
    let labels = |count: usize| -> Result<Tensor> {
        let values: Vec<u32> = (0..count).map(|i| (i % 5) as u32).collect();
        Ok(Tensor::from_vec(values, count, device)?)
    };
    let (support_labels, query_labels) = (labels(5)?, labels(10)?);
    let task = maml::Task {
        support: &support,
        support_labels: &support_labels,
        shots: 1,
        query: &query,
        query_labels: &query_labels,
    };
    let net = Conv4::new(config)?;
    let params = net.init(0, DType::F32, device)?;
    let gradient = |order| -> Result<ParamSet> {
        let inner = maml::InnerLoop {
            lr: 0.4,
            steps: 2,
            order,
            adapt: maml::Adapt::All,
            learned_rates: false,
        };
        let weights = maml::query_loss_weights(2, None, 0);
        Ok(maml::meta_gradient(
            &net,
            &params,
            &task,
            &inner,
            maml::QueryNormalisation::Batch,
            &weights,
        )?
        .gradient)
    };
    Ok((
        gradient(maml::Order::Second)?,
        gradient(maml::Order::First)?,
    ))
}

fn largest_difference(a: &ParamSet, b: &ParamSet) -> Result<f64> {
    let mut largest = 0f64;
    for (name, tensor) in a.iter() {
        largest = largest.max(device_check::max_relative_difference(tensor, b.get(name)?)?);
    }
    Ok(largest)
}

fn compare_meta_gradients(device: &Device) -> Result<MetaGradientAgreement> {
    let (cpu_second, _) = with_path(OpsPath::Kernels, || maml_meta_gradients(&Device::Cpu))?;
    let (second, first) = with_path(OpsPath::Portable, || maml_meta_gradients(device))?;
    Ok(MetaGradientAgreement {
        second_order: largest_difference(&second, &cpu_second)?,
        second_order_terms: largest_difference(&first, &second)?,
    })
}

fn compare_learners(device: &Device) -> Result<Vec<LearnerAgreement>> {
    let data = tiny_data()?;
    tiny_learner_configs()
        .iter()
        .map(|config| {
            let name = config["name"].as_str().unwrap_or_default();
            let cpu = with_path(OpsPath::Kernels, || {
                learner_run(config, &data, &Device::Cpu)
            })?;
            let other = with_path(OpsPath::Portable, || learner_run(config, &data, device))?;
            Ok(LearnerAgreement::of(name, &cpu, &other))
        })
        .collect()
}

/// Everything the check measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub device: String,
    /// What `--device auto` opens in this build on this machine.
    pub auto: String,
    pub tolerance: f64,
    pub ops: Vec<Agreement>,
    pub maml: MetaGradientAgreement,
    pub learners: Vec<LearnerAgreement>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.ops.iter().filter(|a| !a.passes()).count()
            + usize::from(!self.maml.passes())
            + self.learners.iter().filter(|l| !l.passes()).count()
    }
}

pub fn check(choice: DeviceChoice) -> Result<Report> {
    let device = choice.open()?;
    let auto = fewshot_backbone::device::device_name(&DeviceChoice::Auto.open()?);
    second_order::ensure_available_on(&device)?;
    let ops = with_path(OpsPath::Portable, || device_check::compare_ops(&device))?;
    Ok(Report {
        device: choice.to_string(),
        auto,
        tolerance: F32_TOLERANCE,
        ops,
        maml: compare_meta_gradients(&device)?,
        learners: compare_learners(&device)?,
    })
}

fn verdict(passes: bool) -> &'static str {
    match passes {
        true => "ok",
        false => "DIFFERS",
    }
}

pub fn run(choice: DeviceChoice, as_json: bool) -> Result<()> {
    tracing::info!("checking {choice} against the CPU kernels");
    let report = check(choice)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    match report.failures() {
        0 => Ok(()),
        n => bail!("{n} of the checks above differ from the CPU beyond their tolerance"),
    }
}

fn print_report(report: &Report) {
    println!(
        "device {} (auto opens {}); second order on the device: d2(x^3)/dx2 at 3 = 18, ok",
        report.device, report.auto
    );
    println!(
        "ops, f32, largest difference to the CPU kernels relative to their largest value \
         (tolerance {:.0e}):",
        report.tolerance
    );
    println!(
        "  {:<50} {:>9} {:>9} {:>9}",
        "op", "value", "gradient", "2nd order"
    );
    for chunk in report.ops.chunk_by(|a, b| a.op == b.op) {
        let largest = |prefix: &str| {
            chunk
                .iter()
                .filter(|a| a.quantity.starts_with(prefix))
                .fold(0f64, |m, a| m.max(a.max_relative_difference))
        };
        println!(
            "  {:<50} {:>9.1e} {:>9.1e} {:>9.1e}  {}",
            chunk[0].op,
            largest("value"),
            largest("gradient"),
            largest("second-order"),
            verdict(chunk.iter().all(Agreement::passes))
        );
    }
    println!(
        "MAML meta-gradient, 2 inner steps, second order: {:.1e} from the CPU's; \
         first order is {:.1e} from it  {}",
        report.maml.second_order,
        report.maml.second_order_terms,
        verdict(report.maml.passes())
    );
    println!("learners, 3 training steps and a prediction (relative differences to the CPU):");
    for learner in &report.learners {
        println!(
            "  {:<18} first loss {:.1e}, losses {:.1e}, logits {:.1e}  {}",
            learner.learner,
            learner.first_loss,
            learner.losses,
            learner.logits,
            verdict(learner.passes())
        );
    }
    match report.failures() {
        0 => println!("all agree"),
        n => println!("{n} differ"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_path_on_the_cpu_passes_the_whole_check() {
        let report = check(DeviceChoice::Cpu).unwrap();
        assert_eq!(report.failures(), 0, "{report:#?}");
        assert_eq!(report.learners.len(), learners::ALGORITHMS.len());
        // The second-order terms are far above the rounding: a first-order
        // device would fail.
        assert!(report.maml.second_order_terms > 0.01, "{:?}", report.maml);
    }

    #[test]
    fn a_learner_run_that_parts_is_reported() {
        let a = (vec![1.0, 0.9, 0.8], vec![1.0, -1.0]);
        let b = (vec![1.0, 0.95, 0.8], vec![1.0, -1.0]);
        let agreement = LearnerAgreement::of("x", &a, &b);
        assert!(!agreement.passes(), "{agreement:?}");
        assert!(LearnerAgreement::of("x", &a, &a).passes());
    }
}
