//! Does a device compute what the CPU kernels compute?
//!
//! Every op of [`crate::ops`] runs on the same inputs twice: on the CPU
//! kernels (the reference, itself checked against finite differences in
//! `tests/gradients.rs`) and on the device under test. Three things are
//! compared: the op's value, the gradient of a curved scalar of its output
//! with respect to each input, and the gradient of that gradient's product
//! with a random direction (a Hessian-vector product: second order, what
//! MAML's meta-gradient is made of).
//!
//! A GPU runs the portable path; on the CPU the caller forces the portable
//! path around [`compare_ops`] ([`crate::ops::path::with_path`]) and the
//! check compares the two paths. CI runs it so, and `fewshot check-device
//! --device cuda` runs the same code on a GPU.

use std::rc::Rc;

use candle_core::{Device, Tensor, Var};
use fewshot_data::Rng;

use crate::error::Result;
use crate::ops::{self, path};

/// An op under test: its inputs in, its output out.
pub type Op = Rc<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// The largest difference an f32 op may show, relative to the largest
/// magnitude of the reference: sums taken in another order (another thread
/// split, a GPU's reduction tree) differ by a few units of f32 rounding per
/// term.
pub const F32_TOLERANCE: f64 = 5e-4;

/// One op on inputs of fixed shapes.
pub struct OpCase {
    pub name: &'static str,
    pub shapes: Vec<Vec<usize>>,
    /// Inputs that start at exactly zero (the others are standard normal).
    pub zero_inputs: Vec<usize>,
    pub op: Op,
}

/// How far the device's value of one quantity is from the CPU's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Agreement {
    pub op: String,
    /// `value`, `gradient of input i` or `second-order gradient of input i`.
    pub quantity: String,
    /// max |device - cpu| / max(1, max |cpu|).
    pub max_relative_difference: f64,
}

impl Agreement {
    pub fn passes(&self) -> bool {
        self.max_relative_difference <= F32_TOLERANCE
    }
}

/// A scalar that weighs every output element differently, through
/// `y^2 + y`: the square makes second derivatives matter, the linear term
/// a first derivative where `y` is 0 (a ReLU's kink).
pub fn curved(y: &Tensor) -> Result<Tensor> {
    let weights: Vec<f32> = (0..y.elem_count())
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.4)
        .collect();
    let weights = Tensor::from_vec(weights, y.dims(), &Device::Cpu)?
        .to_dtype(y.dtype())?
        .to_device(y.device())?;
    Ok(((y.sqr()? + y)? * weights)?.sum_all()?)
}

/// The op's output, then the gradient of [`curved`] of it for each input,
/// then the gradient of `sum_i <gradient_i, direction_i>` for each input,
/// all detached, on the inputs' device.
pub fn derivatives(op: &Op, inputs: &[Tensor], directions: &[Tensor]) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&leaves)?;
    let grads = curved(&out)?.backward()?;
    let mut results = vec![out.detach()];
    let mut dot = Tensor::zeros((), out.dtype(), out.device())?;
    for (var, direction) in vars.iter().zip(directions) {
        let grad = match grads.get(var.as_tensor()) {
            Some(grad) => grad.clone(),
            None => var.zeros_like()?,
        };
        dot = (dot + (&grad * direction)?.sum_all()?)?;
        results.push(grad.detach());
    }
    let second = dot.backward()?;
    for var in &vars {
        results.push(match second.get(var.as_tensor()) {
            Some(h) => h.detach(),
            None => var.zeros_like()?,
        });
    }
    Ok(results)
}

/// What the `i`th tensor of [`derivatives`] is, for an op of `inputs` inputs.
pub fn quantity_name(i: usize, inputs: usize) -> String {
    match i {
        0 => "value".to_string(),
        i if i <= inputs => format!("gradient of input {}", i - 1),
        i => format!("second-order gradient of input {}", i - 1 - inputs),
    }
}

/// max |a - b| / max(1, max |b|), read back to the host.
pub fn max_relative_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(crate::BackboneError::InvalidConfig {
            field: "compared shapes",
            value: format!("{:?} and {:?}", a.dims(), b.dims()),
            reason: "the two results must have the same shape".to_string(),
        });
    }
    let a = path::to_host_vec_f64(a)?;
    let b = path::to_host_vec_f64(b)?;
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    Ok(a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale)))
}

/// Host tensors of `shape`: standard normal, or zeros.
fn host_input(shape: &[usize], zero: bool, rng: &mut Rng) -> Result<Tensor> {
    let count = shape.iter().product();
    let values: Vec<f32> = match zero {
        true => vec![0.0; count],
        false => (0..count).map(|_| rng.normal() as f32).collect(),
    };
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// One case on the CPU kernels and on `device` (on the path the calling
/// thread takes), in f32.
pub fn compare(case: &OpCase, device: &Device, seed: u64) -> Result<Vec<Agreement>> {
    let mut rng = Rng::seed_from(seed, 0);
    let inputs = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| host_input(shape, case.zero_inputs.contains(&i), &mut rng))
        .collect::<Result<Vec<_>>>()?;
    let directions = case
        .shapes
        .iter()
        .map(|shape| host_input(shape, false, &mut rng))
        .collect::<Result<Vec<_>>>()?;
    let reference = path::with_path(path::OpsPath::Kernels, || {
        derivatives(&case.op, &inputs, &directions)
    })?;
    let on_device = |tensors: &[Tensor]| -> Result<Vec<Tensor>> {
        Ok(tensors
            .iter()
            .map(|t| t.to_device(device))
            .collect::<candle_core::Result<_>>()?)
    };
    let subject = derivatives(&case.op, &on_device(&inputs)?, &on_device(&directions)?)?;
    reference
        .iter()
        .zip(&subject)
        .enumerate()
        .map(|(i, (cpu, other))| {
            Ok(Agreement {
                op: case.name.to_string(),
                quantity: quantity_name(i, inputs.len()),
                max_relative_difference: max_relative_difference(other, cpu)?,
            })
        })
        .collect()
}

/// Every case of [`op_cases`] on `device`.
pub fn compare_ops(device: &Device) -> Result<Vec<Agreement>> {
    let mut agreements = Vec::new();
    for (seed, case) in op_cases().iter().enumerate() {
        agreements.extend(compare(case, device, seed as u64)?);
    }
    Ok(agreements)
}

fn case(name: &'static str, shapes: &[&[usize]], op: Op) -> OpCase {
    OpCase {
        name,
        shapes: shapes.iter().map(|s| s.to_vec()).collect(),
        zero_inputs: Vec::new(),
        op,
    }
}

/// Each input pixel doubled across and clipped at zero: every window of a
/// 2x2 max-pool then ties in pairs, and many tie at zero, as on a drawing's
/// flat background. The gradient must reach one pixel of a tie.
pub fn tied(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(ops::relu(x)?
        .unsqueeze(4)?
        .repeat((1, 1, 1, 1, 2))?
        .reshape((n, c, h, 2 * w))?)
}

/// Every op of [`crate::ops`] the models use, on small inputs with the
/// shapes where the paths have differed before: strided convolutions that
/// leave rows over, odd pooling sizes, ties, ReLU at exactly zero.
pub fn op_cases() -> Vec<OpCase> {
    let eps = 1e-5;
    let labels = |n: usize, ways: usize, device: &Device| -> Result<Tensor> {
        let values: Vec<u32> = (0..n).map(|i| (i % ways) as u32).collect();
        Ok(Tensor::from_vec(values, n, device)?)
    };
    vec![
        case(
            "conv2d 3x3, stride 1, padding 1",
            &[&[4, 3, 9, 9], &[5, 3, 3, 3]],
            Rc::new(|t| ops::conv2d(&t[0], &t[1], 1, 1)),
        ),
        case(
            "conv2d 3x3, stride 2, padding 1",
            &[&[4, 3, 9, 9], &[5, 3, 3, 3]],
            Rc::new(|t| ops::conv2d(&t[0], &t[1], 2, 1)),
        ),
        case(
            "conv2d 3x3, stride 2, a row and column left over",
            &[&[3, 2, 6, 9], &[4, 2, 3, 3]],
            Rc::new(|t| ops::conv2d(&t[0], &t[1], 2, 0)),
        ),
        case(
            "conv2d_per_sample 3x3, padding 1",
            &[&[3, 2, 5, 5], &[3, 4, 2, 3, 3]],
            Rc::new(|t| ops::conv2d_per_sample(&t[0], &t[1], 1)),
        ),
        case(
            "batch_norm",
            &[&[4, 3, 5, 5], &[3], &[3]],
            Rc::new(move |t| ops::batch_norm(&t[0], &t[1], &t[2], eps)),
        ),
        case(
            "batch_norm_relu",
            &[&[4, 3, 5, 5], &[3], &[3]],
            Rc::new(move |t| ops::batch_norm_relu(&t[0], &t[1], &t[2], eps)),
        ),
        case(
            "batch_norm_relu_by_reference, 2 reference rows",
            &[&[5, 3, 4, 4], &[3], &[3]],
            Rc::new(move |t| ops::batch_norm_relu_by_reference(&t[0], 2, &t[1], &t[2], eps)),
        ),
        case(
            "batch_norm_relu_with_statistics",
            &[&[4, 3, 5, 5], &[3], &[3], &[3], &[3]],
            Rc::new(move |t| {
                // A variance must be positive.
                let var = (t[2].sqr()? + 0.5)?;
                ops::batch_norm_relu_with_statistics(&t[0], &t[1], &var, &t[3], &t[4], eps)
            }),
        ),
        case(
            "conv_batch_norm_relu_pool, a 5x7 convolution output",
            &[&[3, 2, 5, 7], &[4, 2, 3, 3], &[4], &[4]],
            Rc::new(move |t| {
                ops::conv_batch_norm_relu_pool(&t[0], &t[1], (&t[2], &t[3]), (1, 1), eps)
            }),
        ),
        case("relu", &[&[2, 3, 5, 7]], Rc::new(|t| ops::relu(&t[0]))),
        OpCase {
            // Meta Networks' fast weights start at exactly zero: the ReLU
            // after them sees exact zeros, and passes no gradient there.
            zero_inputs: vec![1],
            ..case(
                "relu of linear_per_sample with zero weights",
                &[&[3, 4], &[3, 5, 4]],
                Rc::new(|t| ops::relu(&ops::linear_per_sample(&t[0], &t[1])?)),
            )
        },
        case(
            "max_pool2x2, 6x7",
            &[&[2, 3, 6, 7]],
            Rc::new(|t| ops::max_pool2x2(&t[0])),
        ),
        case(
            "max_pool2x2 with ties",
            &[&[2, 3, 6, 3]],
            Rc::new(|t| ops::max_pool2x2(&tied(&t[0])?)),
        ),
        case(
            "max_pool2x2_ceil, 7x7",
            &[&[2, 3, 7, 7]],
            Rc::new(|t| ops::max_pool2x2_ceil(&t[0])),
        ),
        case(
            "spatial_mean",
            &[&[3, 4, 5, 5]],
            Rc::new(|t| ops::spatial_mean(&t[0])),
        ),
        case(
            "linear with bias",
            &[&[6, 4], &[3, 4], &[3]],
            Rc::new(|t| ops::linear(&t[0], &t[1], Some(&t[2]))),
        ),
        case(
            "log_softmax",
            &[&[6, 5]],
            Rc::new(|t| ops::log_softmax(&t[0])),
        ),
        case(
            "cross_entropy",
            &[&[10, 5]],
            Rc::new(move |t| ops::cross_entropy(&t[0], &labels(10, 5, t[0].device())?)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_path_agrees_with_the_kernels_on_every_op() {
        crate::second_order::ensure_available().unwrap();
        let agreements =
            path::with_path(path::OpsPath::Portable, || compare_ops(&Device::Cpu)).unwrap();
        // Value, then a first and a second-order gradient per input.
        let expected: usize = op_cases().iter().map(|c| 1 + 2 * c.shapes.len()).sum();
        assert_eq!(agreements.len(), expected);
        for agreement in &agreements {
            assert!(agreement.passes(), "{agreement:?}");
        }
    }

    #[test]
    fn the_check_sees_a_path_that_differs() {
        // candle's own relu passes a gradient at exactly 0 where the kernels
        // pass none: the check must report that as a disagreement, or its
        // passes above mean nothing.
        let candle_relu = OpCase {
            zero_inputs: vec![1],
            ..case(
                "candle relu at zero",
                &[&[3, 4], &[3, 5, 4]],
                Rc::new(|t| {
                    let y = ops::linear_per_sample(&t[0], &t[1])?;
                    match path::current() {
                        path::OpsPath::Kernels => ops::relu(&y),
                        path::OpsPath::Portable => Ok(y.relu()?),
                    }
                }),
            )
        };
        let agreements = path::with_path(path::OpsPath::Portable, || {
            compare(&candle_relu, &Device::Cpu, 0)
        })
        .unwrap();
        let failing: Vec<&str> = agreements
            .iter()
            .filter(|a| !a.passes())
            .map(|a| a.quantity.as_str())
            .collect();
        assert!(
            failing.contains(&"gradient of input 1")
                && failing.contains(&"second-order gradient of input 1"),
            "{agreements:?}"
        );
    }
}
