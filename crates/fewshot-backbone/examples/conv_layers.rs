//! Times the convolution kernels alone on the layer shapes of the benchmark
//! networks: forward, input gradient and weight gradient, with the achieved
//! GFLOP/s of each. Used to tune the kernels' chunk size.
//!
//! Run: MIMALLOC_PURGE_DELAY=-1 cargo run --release -p fewshot-backbone --example conv_layers

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use fewshot_backbone::kernels;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Median milliseconds of 20 runs after one warm-up.
fn median_ms(mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?;
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    // (batch, in channels, side, out channels, stride) of conv-4 layers on
    // 28x28 Omniglot (max-pooling and stride-2 nets, a MAML support set of
    // 5), 105x105 Omniglot and 84x84 miniImageNet.
    let layers = [
        (80, 1, 28, 64, 1),
        (80, 64, 14, 64, 1),
        (80, 64, 7, 64, 1),
        (75, 1, 28, 64, 2),
        (75, 64, 14, 64, 2),
        (75, 64, 7, 64, 2),
        (5, 64, 14, 64, 2),
        (5, 64, 7, 64, 2),
        (80, 64, 52, 64, 1),
        (80, 64, 26, 64, 1),
        (80, 64, 13, 64, 1),
        (80, 3, 84, 32, 1),
        (80, 32, 42, 32, 1),
    ];
    for (batch, cin, side, cout, stride) in layers {
        let x = Var::from_tensor(&Tensor::rand(0f32, 1., (batch, cin, side, side), &device)?)?;
        let w = Var::from_tensor(&Tensor::rand(0f32, 1., (cout, cin, 3, 3), &device)?)?;
        let y = kernels::conv2d(&x, &w, stride, 1)?;
        let g = y.ones_like()?;
        let out_side = y.dim(2)?;
        let gflop = 2.0 * (batch * cout * cin * 9 * out_side * out_side) as f64 / 1e9;
        let forward = median_ms(|| kernels::conv2d(&x, &w, stride, 1))?;
        let input = median_ms(|| kernels::conv2d_input_grad(&g, &w, stride, 1, (side, side)))?;
        let weight = median_ms(|| kernels::conv2d_weight_grad(&x, &g, stride, 1, (3, 3)))?;
        println!(
            "{batch}x{cin}x{side}x{side} -> {cout} stride {stride}: forward {forward:.2} ms \
             ({:.0} GFLOP/s), input grad {input:.2} ({:.0}), weight grad {weight:.2} ({:.0})",
            gflop / forward * 1e3,
            gflop / input * 1e3,
            gflop / weight * 1e3
        );
    }
    Ok(())
}
