//! The CPU kernels against candle's own ops (`ops::candle_path`) on the same
//! inputs: values, gradients, and gradients of a gradient-vector product, on
//! odd sizes, strides and paddings, in f64 and f32. (`tests/gradients.rs`
//! checks the same ops, which run on these kernels on the CPU, against finite
//! differences.)

use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::device_check::{
    derivatives, max_relative_difference, quantity_name, tied, Op,
};
use fewshot_backbone::ops::candle_path;
use fewshot_backbone::{kernels, second_order};
use fewshot_data::Rng;

fn random(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn agree(name: &str, kernel: Op, reference: Op, shapes: &[&[usize]], seed: u64) {
    second_order::ensure_available().unwrap();
    for (dtype, tolerance) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
        let mut rng = Rng::seed_from(seed, 0);
        let inputs: Vec<Tensor> = shapes.iter().map(|s| random(s, dtype, &mut rng)).collect();
        let directions: Vec<Tensor> = shapes.iter().map(|s| random(s, dtype, &mut rng)).collect();
        let ours = derivatives(&kernel, &inputs, &directions).unwrap();
        let theirs = derivatives(&reference, &inputs, &directions).unwrap();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let diff = max_relative_difference(a, b).unwrap();
            assert!(
                diff < tolerance,
                "{name} {dtype:?}: {} differs by {diff:e}",
                quantity_name(i, inputs.len())
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
        let kernel: Op = Rc::new(move |t| Ok(kernels::conv2d(&t[0], &t[1], stride, padding)?));
        let reference: Op = Rc::new(move |t| candle_path::conv2d(&t[0], &t[1], stride, padding));
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
fn channels_last_convolution_matches_candle() {
    // 8 input channels and at least 256 output pixels a weight: the kernels
    // unfold the input channels-last. Odd sizes, strides and paddings, one
    // and several images a chunk, and a per-sample weight.
    for (batch, stride, padding, h, w, k) in [
        (5, 1, 0, 9, 11, 3),
        (12, 2, 1, 9, 11, 3),
        (24, 3, 2, 8, 7, 3),
        (3, 1, 2, 12, 10, 5),
    ] {
        let kernel: Op = Rc::new(move |t| Ok(kernels::conv2d(&t[0], &t[1], stride, padding)?));
        let reference: Op = Rc::new(move |t| candle_path::conv2d(&t[0], &t[1], stride, padding));
        agree(
            &format!("channels-last conv2d batch {batch} stride {stride} padding {padding} {h}x{w} kernel {k}"),
            kernel,
            reference,
            &[&[batch, 8, h, w], &[4, 8, k, k]],
            (batch * 100 + stride * 10 + padding) as u64,
        );
    }
    let kernel: Op = Rc::new(|t| Ok(kernels::conv2d_per_sample(&t[0], &t[1], 1, 1)?));
    let reference: Op = Rc::new(|t| candle_path::conv2d_per_sample(&t[0], &t[1], 1));
    agree(
        "channels-last conv2d_per_sample",
        kernel,
        reference,
        &[&[2, 8, 16, 17], &[2, 4, 8, 3, 3]],
        17,
    );
}

#[test]
fn per_sample_convolution_matches_candle() {
    // One image (its products use every thread), and several (images in
    // parallel); odd sizes and paddings.
    for (batch, padding, h, w, k) in [(1, 1, 5, 7, 3), (3, 0, 6, 5, 3), (5, 2, 4, 4, 5)] {
        let kernel: Op =
            Rc::new(move |t| Ok(kernels::conv2d_per_sample(&t[0], &t[1], 1, padding)?));
        let reference: Op = Rc::new(move |t| candle_path::conv2d_per_sample(&t[0], &t[1], padding));
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
    let kernel: Op = Rc::new(|t| Ok(kernels::conv2d(&t[0], &t[1], 1, 1)?));
    let reference: Op = Rc::new(|t| candle_path::conv2d(&t[0], &t[1], 1, 1));
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
    let kernel: Op = Rc::new(|t| Ok(kernels::batch_norm(&t[0], &t[1], &t[2], 1e-5)?));
    let reference: Op = Rc::new(|t| candle_path::batch_norm(&t[0], &t[1], &t[2], 1e-5));
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
    let kernel: Op = Rc::new(|t| Ok(kernels::batch_norm_relu(&t[0], &t[1], &t[2], 1e-5)?));
    let reference: Op = Rc::new(|t| {
        let normalised = candle_path::batch_norm(&t[0], &t[1], &t[2], 1e-5)?;
        candle_path::relu(&normalised)
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
fn batch_norm_relu_pool_matches_the_three_ops_apart() {
    let kernel: Op = Rc::new(|t| Ok(kernels::batch_norm_relu_pool(&t[0], &t[1], &t[2], 1e-5)?));
    let reference: Op = Rc::new(|t| {
        let normalised = candle_path::batch_norm(&t[0], &t[1], &t[2], 1e-5)?;
        candle_path::max_pool2x2(&candle_path::relu(&normalised)?)
    });
    // Odd sizes leave a row and a column outside every window.
    for (shape, seed) in [([4, 3, 6, 8], 23), ([3, 2, 7, 5], 24)] {
        agree(
            "batch_norm_relu_pool",
            kernel.clone(),
            reference.clone(),
            &[&shape, &[shape[1]], &[shape[1]]],
            seed,
        );
    }
}

#[test]
fn batch_norm_relu_pool_matches_the_three_ops_apart_on_ties() {
    // The backward sends each window's gradient to the winner the forward
    // picked: on ties (pairs, and zeros before the normalisation) that must
    // be the pixel the pooling apart picks.
    let kernel: Op = Rc::new(|t| {
        Ok(kernels::batch_norm_relu_pool(
            &tied(&t[0])?,
            &t[1],
            &t[2],
            1e-5,
        )?)
    });
    let reference: Op = Rc::new(|t| {
        let normalised = candle_path::batch_norm(&tied(&t[0])?, &t[1], &t[2], 1e-5)?;
        candle_path::max_pool2x2(&candle_path::relu(&normalised)?)
    });
    agree(
        "batch_norm_relu_pool with ties",
        kernel,
        reference,
        &[&[3, 2, 6, 3], &[2], &[2]],
        25,
    );
}

#[test]
fn batch_norm_relu_pool_is_the_same_with_and_without_a_graph() {
    // With a graph the forward also picks each window's winner for the
    // backward, without one it takes the plain maximum: the same bits, ties
    // and windows below zero included.
    let mut rng = Rng::seed_from(26, 0);
    let [x, gamma, beta] = [&[3, 4, 6, 5][..], &[4], &[4]].map(|s| random(s, DType::F32, &mut rng));
    let x = tied(&x).unwrap();
    let plain = kernels::batch_norm_relu_pool(&x, &gamma, &beta, 1e-5).unwrap();
    let variable = candle_core::Var::from_tensor(&x).unwrap();
    let tracked = kernels::batch_norm_relu_pool(variable.as_tensor(), &gamma, &beta, 1e-5).unwrap();
    assert_eq!(max_relative_difference(&plain, &tracked).unwrap(), 0.0);
    let values = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.contains(&0.0) && values.iter().any(|&v| v > 0.0));
}

/// The fused block against the convolution and the fused batch norm, ReLU
/// and pooling op apart, in f32: the forward and first-order gradients run
/// the same kernels, so they must be equal bit for bit (the fused op only
/// skips candle's zero tensor the convolution's output gradient was added to).
fn identical_to_first_order(name: &str, fused: &Op, apart: &Op, shapes: &[&[usize]], seed: u64) {
    let mut rng = Rng::seed_from(seed, 0);
    let inputs: Vec<Tensor> = shapes
        .iter()
        .map(|s| random(s, DType::F32, &mut rng))
        .collect();
    let directions: Vec<Tensor> = shapes
        .iter()
        .map(|s| random(s, DType::F32, &mut rng))
        .collect();
    let ours = derivatives(fused, &inputs, &directions).unwrap();
    let theirs = derivatives(apart, &inputs, &directions).unwrap();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate().take(1 + inputs.len()) {
        let diff = max_relative_difference(a, b).unwrap();
        assert_eq!(
            diff,
            0.0,
            "{name}: {} differs",
            quantity_name(i, inputs.len())
        );
    }
}

#[test]
fn fused_conv_block_matches_the_ops_apart() {
    // Odd sizes leave a row or a column of the convolution's output outside
    // every window; a stride of 2 and no padding change its size.
    for (stride, padding, h, w, seed) in [(1, 1, 6, 8, 41), (2, 1, 9, 7, 42), (1, 0, 7, 6, 43)] {
        let fused: Op = Rc::new(move |t| {
            let block = (stride, padding);
            Ok(kernels::conv_batch_norm_relu_pool(
                &t[0],
                &t[1],
                (&t[2], &t[3]),
                block,
                1e-5,
            )?)
        });
        let apart: Op = Rc::new(move |t| {
            let y = kernels::conv2d(&t[0], &t[1], stride, padding)?;
            Ok(kernels::batch_norm_relu_pool(&y, &t[2], &t[3], 1e-5)?)
        });
        let reference: Op = Rc::new(move |t| {
            let y = candle_path::conv2d(&t[0], &t[1], stride, padding)?;
            let normalised = candle_path::batch_norm(&y, &t[2], &t[3], 1e-5)?;
            candle_path::max_pool2x2(&candle_path::relu(&normalised)?)
        });
        let shapes: [&[usize]; 4] = [&[4, 3, h, w], &[5, 3, 3, 3], &[5], &[5]];
        let name = format!("conv_batch_norm_relu_pool stride {stride} padding {padding} {h}x{w}");
        identical_to_first_order(&name, &fused, &apart, &shapes, seed);
        agree(&name, fused, reference, &shapes, seed);
    }
}

#[test]
fn two_fused_conv_blocks_match_the_ops_apart_to_second_order() {
    // In a chain, the second-order pass runs the first block's backward a
    // second time (its output is the second block's input): the kept
    // convolution output must serve both.
    let two_blocks = |fused: bool| -> Op {
        Rc::new(move |t| {
            let mut x = t[0].clone();
            for block in 0..2 {
                let (w, gamma, beta) = (&t[1 + 3 * block], &t[2 + 3 * block], &t[3 + 3 * block]);
                x = match fused {
                    true => kernels::conv_batch_norm_relu_pool(&x, w, (gamma, beta), (1, 1), 1e-5)?,
                    false => kernels::batch_norm_relu_pool(
                        &kernels::conv2d(&x, w, 1, 1)?,
                        gamma,
                        beta,
                        1e-5,
                    )?,
                };
            }
            Ok(x)
        })
    };
    let shapes: [&[usize]; 7] = [
        &[3, 2, 8, 8],
        &[4, 2, 3, 3],
        &[4],
        &[4],
        &[3, 4, 3, 3],
        &[3],
        &[3],
    ];
    identical_to_first_order(
        "two blocks",
        &two_blocks(true),
        &two_blocks(false),
        &shapes,
        44,
    );
    agree(
        "two blocks",
        two_blocks(true),
        two_blocks(false),
        &shapes,
        45,
    );
}

#[test]
fn fused_conv_block_without_a_graph() {
    // Plain tensors: nothing is kept for a backward, and the values are the same.
    let mut rng = Rng::seed_from(46, 0);
    let [x, w, gamma, beta] = [&[3, 2, 6, 6][..], &[4, 2, 3, 3], &[4], &[4]]
        .map(|shape| random(shape, DType::F32, &mut rng));
    let fused = kernels::conv_batch_norm_relu_pool(&x, &w, (&gamma, &beta), (1, 1), 1e-5).unwrap();
    let y = kernels::conv2d(&x, &w, 1, 1).unwrap();
    let apart = kernels::batch_norm_relu_pool(&y, &gamma, &beta, 1e-5).unwrap();
    assert_eq!(max_relative_difference(&fused, &apart).unwrap(), 0.0);
}

#[test]
fn fused_conv_block_names_a_wrong_gamma() {
    let mut rng = Rng::seed_from(47, 0);
    let [x, w, gamma, beta] = [&[2, 2, 4, 4][..], &[4, 2, 3, 3], &[3], &[4]]
        .map(|shape| random(shape, DType::F32, &mut rng));
    let error = kernels::conv_batch_norm_relu_pool(&x, &w, (&gamma, &beta), (1, 1), 1e-5)
        .unwrap_err()
        .to_string();
    assert!(error.contains("gamma") && error.contains("(4)"), "{error}");
}

#[test]
fn channel_moments_match_candle() {
    let kernel: Op = Rc::new(|t| Ok(kernels::channel_moments(&t[0])?));
    let reference: Op = Rc::new(|t| {
        let (mean, var) = candle_path::channel_moments(&t[0])?;
        Ok(Tensor::stack(&[mean, var], 0)?)
    });
    agree("channel_moments", kernel, reference, &[&[3, 2, 7, 5]], 23);
}

#[test]
fn relu_matches_candle() {
    let kernel: Op = Rc::new(|t| Ok(kernels::relu(&t[0])?));
    let reference: Op = Rc::new(|t| candle_path::relu(&t[0]));
    agree("relu", kernel, reference, &[&[2, 3, 5, 7]], 31);
}

#[test]
fn max_pool_matches_candle_on_odd_sizes() {
    for (h, w) in [(4, 4), (5, 7), (2, 3)] {
        let kernel: Op = Rc::new(|t| Ok(kernels::max_pool2x2(&t[0])?));
        let reference: Op = Rc::new(|t| candle_path::max_pool2x2(&t[0]));
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
    // Ties in pairs and at zero, as on a drawing's flat background: the
    // gradient must reach one pixel of a tie, on both paths.
    let kernel: Op = Rc::new(|t| Ok(kernels::max_pool2x2(&tied(&t[0])?)?));
    let reference: Op = Rc::new(|t| candle_path::max_pool2x2(&tied(&t[0])?));
    agree(
        "max_pool2x2 with ties",
        kernel,
        reference,
        &[&[2, 3, 6, 3]],
        17,
    );
}
