//! The CPU kernels against candle's own ops (`ops::candle_path`) on the same
//! inputs: values, gradients, and gradients of a gradient-vector product, on
//! odd sizes, strides and paddings, in f64 and f32. (`tests/gradients.rs`
//! checks the same ops, which run on these kernels on the CPU, against finite
//! differences.)

use std::rc::Rc;

use candle_core::{DType, Device, Tensor, Var};
use fewshot_backbone::ops::candle_path;
use fewshot_backbone::{kernels, second_order};
use fewshot_data::Rng;

type Op = Rc<dyn Fn(&[Tensor]) -> Tensor>;

fn random(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A scalar weighing every output element differently, through a square so
/// that second derivatives matter.
fn curved(y: &Tensor) -> Tensor {
    let n = y.elem_count();
    let w: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.4)
        .collect();
    let w = Tensor::from_vec(w, y.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(y.dtype())
        .unwrap();
    (y.sqr().unwrap() * w).unwrap().sum_all().unwrap()
}

/// The op's output, the gradient of `curved(output)` for each input, and the
/// gradient of `sum(gradient * direction)` for each input.
fn derivatives(op: &Op, inputs: &[Tensor], directions: &[Tensor]) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&leaves);
    let grads = curved(&out).backward().unwrap();
    let mut results = vec![out.detach()];
    let mut dot = Tensor::zeros((), inputs[0].dtype(), &Device::Cpu).unwrap();
    for (v, d) in vars.iter().zip(directions) {
        let g = grads
            .get(v.as_tensor())
            .cloned()
            .unwrap_or(v.zeros_like().unwrap());
        results.push(g.detach());
        dot = (dot + (g * d).unwrap().sum_all().unwrap()).unwrap();
    }
    let second = dot.backward().unwrap();
    for v in &vars {
        let h = second
            .get(v.as_tensor())
            .cloned()
            .unwrap_or(v.zeros_like().unwrap());
        results.push(h.detach());
    }
    results
}

fn max_relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

fn agree(name: &str, kernel: Op, reference: Op, shapes: &[&[usize]], seed: u64) {
    second_order::ensure_available().unwrap();
    for (dtype, tolerance) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
        let mut rng = Rng::seed_from(seed, 0);
        let inputs: Vec<Tensor> = shapes.iter().map(|s| random(s, dtype, &mut rng)).collect();
        let directions: Vec<Tensor> = shapes.iter().map(|s| random(s, dtype, &mut rng)).collect();
        let ours = derivatives(&kernel, &inputs, &directions);
        let theirs = derivatives(&reference, &inputs, &directions);
        let what = |i: usize| match i {
            0 => "value".to_string(),
            i if i <= inputs.len() => format!("gradient of input {}", i - 1),
            i => format!("second-order gradient of input {}", i - 1 - inputs.len()),
        };
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let diff = max_relative_difference(a, b);
            assert!(
                diff < tolerance,
                "{name} {dtype:?}: {} differs by {diff:e}",
                what(i)
            );
        }
    }
}

#[test]
fn convolution_matches_candle_on_odd_sizes_strides_and_paddings() {
    // (2, 0, 6, 9) and (3, 2, 8, 7) leave rows or columns over after the
    // last window, where candle's own input gradient comes out the wrong
    // size (6x10 and 8x5): the portable path pads and cuts by hand there.
    for (stride, padding, h, w, k) in [
        (1, 0, 5, 7, 3),
        (1, 1, 6, 5, 3),
        (2, 1, 7, 7, 3),
        (2, 0, 7, 9, 3),
        (2, 0, 6, 9, 3),
        (3, 2, 8, 7, 3),
        (3, 2, 8, 8, 3),
        (1, 2, 4, 4, 5),
    ] {
        let kernel: Op = Rc::new(move |t| kernels::conv2d(&t[0], &t[1], stride, padding).unwrap());
        let reference: Op =
            Rc::new(move |t| candle_path::conv2d(&t[0], &t[1], stride, padding).unwrap());
        agree(
            &format!("conv2d stride {stride} padding {padding} {h}x{w} kernel {k}"),
            kernel,
            reference,
            &[&[3, 2, h, w], &[4, 2, k, k]],
            (stride * 100 + padding * 10 + h) as u64,
        );
    }
}

#[test]
fn per_sample_convolution_matches_candle() {
    // One image (its products use every thread), and several (images in
    // parallel); odd sizes and paddings.
    for (batch, padding, h, w, k) in [(1, 1, 5, 7, 3), (3, 0, 6, 5, 3), (5, 2, 4, 4, 5)] {
        let kernel: Op =
            Rc::new(move |t| kernels::conv2d_per_sample(&t[0], &t[1], 1, padding).unwrap());
        let reference: Op =
            Rc::new(move |t| candle_path::conv2d_per_sample(&t[0], &t[1], padding).unwrap());
        agree(
            &format!("conv2d_per_sample batch {batch} padding {padding} {h}x{w} kernel {k}"),
            kernel,
            reference,
            &[&[batch, 2, h, w], &[batch, 4, 2, k, k]],
            (batch * 100 + padding * 10 + h) as u64,
        );
    }
}

#[test]
fn convolution_in_many_chunks_matches_candle() {
    // Enough images and pixels that the kernels split the batch into chunks.
    let kernel: Op = Rc::new(|t| kernels::conv2d(&t[0], &t[1], 1, 1).unwrap());
    let reference: Op = Rc::new(|t| candle_path::conv2d(&t[0], &t[1], 1, 1).unwrap());
    agree(
        "conv2d chunked",
        kernel,
        reference,
        &[&[9, 3, 11, 10], &[5, 3, 3, 3]],
        11,
    );
}

#[test]
fn batch_norm_matches_candle() {
    let kernel: Op = Rc::new(|t| kernels::batch_norm(&t[0], &t[1], &t[2], 1e-5).unwrap());
    let reference: Op = Rc::new(|t| candle_path::batch_norm(&t[0], &t[1], &t[2], 1e-5).unwrap());
    agree(
        "batch_norm",
        kernel,
        reference,
        &[&[3, 4, 5, 3], &[4], &[4]],
        21,
    );
}

#[test]
fn batch_norm_with_relu_matches_candle() {
    let kernel: Op = Rc::new(|t| kernels::batch_norm_relu(&t[0], &t[1], &t[2], 1e-5).unwrap());
    let reference: Op = Rc::new(|t| {
        let normalised = candle_path::batch_norm(&t[0], &t[1], &t[2], 1e-5).unwrap();
        candle_path::relu(&normalised).unwrap()
    });
    agree(
        "batch_norm_relu",
        kernel,
        reference,
        &[&[4, 3, 5, 6], &[3], &[3]],
        22,
    );
}

#[test]
fn channel_moments_match_candle() {
    let kernel: Op = Rc::new(|t| kernels::channel_moments(&t[0]).unwrap());
    let reference: Op = Rc::new(|t| {
        let x = &t[0];
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let var = x
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .mean((0, 2, 3))
            .unwrap();
        Tensor::stack(&[mean.flatten_all().unwrap(), var], 0).unwrap()
    });
    agree("channel_moments", kernel, reference, &[&[3, 2, 7, 5]], 23);
}

#[test]
fn relu_matches_candle() {
    let kernel: Op = Rc::new(|t| kernels::relu(&t[0]).unwrap());
    let reference: Op = Rc::new(|t| candle_path::relu(&t[0]).unwrap());
    agree("relu", kernel, reference, &[&[2, 3, 5, 7]], 31);
}

#[test]
fn max_pool_matches_candle_on_odd_sizes() {
    for (h, w) in [(4, 4), (5, 7), (2, 3)] {
        let kernel: Op = Rc::new(|t| kernels::max_pool2x2(&t[0]).unwrap());
        let reference: Op = Rc::new(|t| candle_path::max_pool2x2(&t[0]).unwrap());
        agree(
            &format!("max_pool2x2 {h}x{w}"),
            kernel,
            reference,
            &[&[2, 3, h, w]],
            (h * 10 + w) as u64,
        );
    }
}

#[test]
fn max_pool_matches_candle_on_ties() {
    // Every pixel doubled across and clipped at zero: each window's pixels tie
    // in pairs, and many windows tie at zero, as on a drawing's flat
    // background. The gradient must reach one pixel of a tie, on both paths.
    let tied = |t: &Tensor| -> Tensor {
        let (n, c, h, w) = t.dims4().unwrap();
        t.relu()
            .unwrap()
            .unsqueeze(4)
            .unwrap()
            .repeat((1, 1, 1, 1, 2))
            .unwrap()
            .reshape((n, c, h, 2 * w))
            .unwrap()
    };
    let kernel: Op = Rc::new(move |t| kernels::max_pool2x2(&tied(&t[0])).unwrap());
    let reference: Op = Rc::new(move |t| candle_path::max_pool2x2(&tied(&t[0])).unwrap());
    agree(
        "max_pool2x2 with ties",
        kernel,
        reference,
        &[&[2, 3, 6, 3]],
        17,
    );
}
