#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{Device, Tensor};
use fewshot_backbone::{kernels, ops};
use std::time::Instant;

fn time(label: &str, mut f: impl FnMut()) {
    f();
    let mut t = Vec::new();
    for _ in 0..50 {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    println!("{label:<40} {:.3} ms", t[t.len() / 2] * 1e3);
}

fn main() {
    let d = Device::Cpu;
    for shape in [(75usize, 64usize, 14usize), (80, 64, 28), (80, 32, 84)] {
        println!("{shape:?}");
        let x = Tensor::rand(0f32, 1., (shape.0, shape.1, shape.2, shape.2), &d).unwrap();
        let g = Tensor::ones(shape.1, candle_core::DType::F32, &d).unwrap();
        let b = Tensor::zeros(shape.1, candle_core::DType::F32, &d).unwrap();
        time("channel_sum", || {
            kernels::channel_sum(&x).unwrap();
        });
        time("channel_dot", || {
            kernels::channel_dot(&x, &x).unwrap();
        });
        time("channel_affine", || {
            kernels::channel_affine(&x, &g, &b).unwrap();
        });
        time("relu", || {
            kernels::relu(&x).unwrap();
        });
        time("batch_norm", || {
            kernels::batch_norm(&x, &g, &b, 1e-5).unwrap();
        });
        time("max_pool", || {
            kernels::max_pool2x2(&x).unwrap();
        });
        time("candle add", || {
            (&x + &x).unwrap();
        });
        time("candle add bcast", || {
            x.broadcast_add(&g.reshape((1, shape.1, 1, 1)).unwrap())
                .unwrap();
        });
        time("spatial mean", || {
            ops::spatial_mean(&x).unwrap();
        });
    }
}
