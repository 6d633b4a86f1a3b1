#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, Conv4, Conv4Config};
use std::time::Instant;

fn time(label: &str, mut f: impl FnMut()) {
    f();
    let mut t = Vec::new();
    for _ in 0..30 {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    println!("{label:<40} {:.2} ms", t[t.len() / 2] * 1e3);
}

fn main() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    let d = Device::Cpu;
    let net = Conv4::new(Conv4Config {
        classifier_outputs: Some(5),
        ..Conv4Config::omniglot()
    })
    .unwrap();
    let params = net.init(0, DType::F32, &d).unwrap();
    let q = Tensor::rand(0f32, 1., (75, 1, 28, 28), &d).unwrap();
    let s = Tensor::rand(0f32, 1., (5, 1, 28, 28), &d).unwrap();
    let ql = Tensor::from_vec((0..75u32).map(|i| i % 5).collect::<Vec<_>>(), 75, &d).unwrap();
    let sl = Tensor::from_vec((0..5u32).collect::<Vec<_>>(), 5, &d).unwrap();
    time("query forward (no grad)", || {
        net.forward(&params, &q).unwrap();
    });
    let vars = params.to_vars().unwrap();
    time("query forward (vars)", || {
        net.forward(&vars.as_params(), &q).unwrap();
    });
    time("query forward+backward", || {
        let l = ops::cross_entropy(&net.forward(&vars.as_params(), &q).unwrap(), &ql).unwrap();
        vars.gradients(&l.backward().unwrap()).unwrap();
    });
    time("support forward+backward", || {
        let l = ops::cross_entropy(&net.forward(&vars.as_params(), &s).unwrap(), &sl).unwrap();
        vars.gradients(&l.backward().unwrap()).unwrap();
    });
    time("support hvp", || {
        let l = ops::cross_entropy(&net.forward(&vars.as_params(), &s).unwrap(), &sl).unwrap();
        let g = vars.gradients(&l.backward().unwrap()).unwrap();
        let mut dot = Tensor::zeros((), DType::F32, &d).unwrap();
        for (_, t) in g.iter() {
            dot = (dot + (t * t).unwrap().sum_all().unwrap()).unwrap();
        }
        vars.gradients(&dot.backward().unwrap()).unwrap();
    });
}
