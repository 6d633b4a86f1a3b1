use candle_core::{Device, Tensor, Var};
use fewshot_backbone::kernels;
use std::time::Instant;

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut t = Vec::new();
    for _ in 0..20 {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2] * 1e3
}

fn main() {
    let d = Device::Cpu;
    for (n, cin, h, cout, stride) in [
        (80, 1, 28, 64, 1),
        (80, 64, 14, 64, 1),
        (80, 64, 7, 64, 1),
        (75, 1, 28, 64, 2),
        (75, 64, 14, 64, 2),
        (75, 64, 7, 64, 2),
        (80, 3, 84, 32, 1),
        (80, 32, 42, 32, 1),
    ] {
        let x = Var::from_tensor(&Tensor::rand(0f32, 1., (n, cin, h, h), &d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::rand(0f32, 1., (cout, cin, 3, 3), &d).unwrap()).unwrap();
        let y = kernels::conv2d(&x, &w, stride, 1).unwrap();
        let g = y.ones_like().unwrap();
        let oh = y.dim(2).unwrap();
        let flops = 2.0 * (n * cout * cin * 9 * oh * oh) as f64;
        let f = time(|| {
            kernels::conv2d(&x, &w, stride, 1).unwrap();
        });
        let di = time(|| {
            kernels::conv2d_input_grad(&g, &w, stride, 1, (h, h)).unwrap();
        });
        let dw = time(|| {
            kernels::conv2d_weight_grad(&x, &g, stride, 1, (3, 3)).unwrap();
        });
        println!("n{n} cin{cin} {h}x{h} cout{cout} s{stride}: fwd {f:.2} ms ({:.0} GF/s), dx {di:.2} ({:.0}), dw {dw:.2} ({:.0})", flops / f / 1e6, flops / di / 1e6, flops / dw / 1e6);
    }
}
