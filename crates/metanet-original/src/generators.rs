//! The fast-weight generators. Both act on every weight coordinate
//! independently, with shared weights: a coordinate's preprocessed gradient
//! (2 features) in, its fast weight out. So one small network serves a layer
//! of any size, and a batch of P coordinates is one matrix product.
//!
//! On the CPU both run as the fused kernels of [`crate::kernels`]; elsewhere
//! (and as the reference the kernels are tested against) as candle ops.

use candle_core::Tensor;
use fewshot_backbone::{kernels, ops, ParamSet, Result};

use crate::kernels::{example_generator, task_generator};

/// The task-level generator d: an LSTM (2 -> hidden) per coordinate, run over
/// the gradients of T chunks of the support set, then a linear map of its
/// last hidden state to the coordinate's fast weight. Gates in the order
/// input, forget, cell, output (PyTorch's).
#[derive(Debug, Clone, Copy)]
pub struct TaskGenerator {
    pub hidden: usize,
}

impl TaskGenerator {
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        vec![
            ("lstm.w_ih".into(), vec![4 * h, 2]),
            ("lstm.w_hh".into(), vec![4 * h, h]),
            ("lstm.bias".into(), vec![4 * h]),
            ("out.weight".into(), vec![1, h]),
            ("out.bias".into(), vec![1]),
        ]
    }

    /// One LSTM step for every coordinate: input `x` (P, 2), state `h`, `c`
    /// (P, hidden) -> the new (h, c).
    pub fn step(
        &self,
        params: &ParamSet,
        x: &Tensor,
        h: &Tensor,
        c: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let gates = (ops::linear(x, params.get("lstm.w_ih")?, Some(params.get("lstm.bias")?))?
            + ops::linear(h, params.get("lstm.w_hh")?, None)?)?;
        let gate = |i: usize| gates.narrow(1, i * self.hidden, self.hidden);
        let input = sigmoid(&gate(0)?)?;
        let forget = sigmoid(&gate(1)?)?;
        let cell = gate(2)?.tanh()?;
        let output = sigmoid(&gate(3)?)?;
        let c = ((forget * c)? + (input * cell)?)?;
        let h = (output * c.tanh()?)?;
        Ok((h, c))
    }

    /// Fast weights (P) from the preprocessed gradients of the T chunks, in
    /// order: `steps` is (T, P, 2).
    pub fn forward(&self, params: &ParamSet, steps: &Tensor) -> Result<Tensor> {
        if kernels::supports(steps) {
            let packed = pack(params, &self.param_shapes())?;
            return Ok(task_generator(steps, &packed, self.hidden)?);
        }
        self.forward_with_candle_ops(params, steps)
    }

    /// [`TaskGenerator::forward`] as a chain of candle ops, one LSTM step at
    /// a time.
    pub fn forward_with_candle_ops(&self, params: &ParamSet, steps: &Tensor) -> Result<Tensor> {
        let (count, coordinates, _) = steps.dims3()?;
        if count == 0 {
            return Err(fewshot_backbone::BackboneError::InvalidConfig {
                field: "gradient_chunks",
                value: "0".into(),
                reason: "the task-level generator needs at least one gradient".into(),
            });
        }
        let mut h = Tensor::zeros((coordinates, self.hidden), steps.dtype(), steps.device())?;
        let mut c = h.clone();
        for t in 0..count {
            (h, c) = self.step(params, &steps.get(t)?, &h, &c)?;
        }
        let out = ops::linear(&h, params.get("out.weight")?, Some(params.get("out.bias")?))?;
        Ok(out.flatten_all()?)
    }
}

/// The example-level generator m: an MLP 2 -> hidden -> hidden -> 1 with
/// ReLUs, per coordinate.
#[derive(Debug, Clone, Copy)]
pub struct ExampleGenerator {
    pub hidden: usize,
}

impl ExampleGenerator {
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        vec![
            ("l1.weight".into(), vec![h, 2]),
            ("l1.bias".into(), vec![h]),
            ("l2.weight".into(), vec![h, h]),
            ("l2.bias".into(), vec![h]),
            ("out.weight".into(), vec![1, h]),
            ("out.bias".into(), vec![1]),
        ]
    }

    /// Preprocessed gradients (R, 2) -> fast weights (R).
    pub fn forward(&self, params: &ParamSet, x: &Tensor) -> Result<Tensor> {
        if kernels::supports(x) {
            let packed = pack(params, &self.param_shapes())?;
            return Ok(example_generator(x, &packed, self.hidden)?);
        }
        self.forward_with_candle_ops(params, x)
    }

    /// [`ExampleGenerator::forward`] as a chain of candle ops.
    pub fn forward_with_candle_ops(&self, params: &ParamSet, x: &Tensor) -> Result<Tensor> {
        let layer = |x: &Tensor, name: &str| -> Result<Tensor> {
            let weight = params.get(&format!("{name}.weight"))?;
            let bias = params.get(&format!("{name}.bias"))?;
            ops::linear(x, weight, Some(bias))
        };
        let h = ops::relu(&layer(x, "l1")?)?;
        let h = ops::relu(&layer(&h, "l2")?)?;
        Ok(layer(&h, "out")?.flatten_all()?)
    }
}

/// The named weights, flattened and concatenated in order: the fused
/// kernels' one weight input (`cat` routes its gradient back to each).
fn pack(params: &ParamSet, shapes: &[(String, Vec<usize>)]) -> Result<Tensor> {
    let parts = shapes
        .iter()
        .map(|(name, _)| Ok(params.get(name)?.flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// The logistic function through tanh, whose gradient candle knows:
/// sigmoid(x) = (1 + tanh(x / 2)) / 2.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(values: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn logistic(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn random_params(shapes: &[(String, Vec<usize>)], rng: &mut fewshot_data::Rng) -> ParamSet {
        let mut params = ParamSet::new();
        for (name, shape) in shapes {
            let n = shape.iter().product();
            let values: Vec<f64> = (0..n).map(|_| rng.normal() * 0.8).collect();
            params.insert(name, tensor(&values, shape)).unwrap();
        }
        params
    }

    fn random_inputs(rows: usize, rng: &mut fewshot_data::Rng) -> Tensor {
        let values: Vec<f64> = (0..rows * 2).map(|_| rng.normal()).collect();
        tensor(&values, &[rows, 2])
    }

    /// The output and every weight's gradient of `f` under a fixed random
    /// weighting of the outputs (so every output's gradient counts).
    fn output_and_gradients(params: &ParamSet, f: impl Fn(&ParamSet) -> Tensor) -> Vec<Vec<f64>> {
        let vars = params.to_vars().unwrap();
        let out = f(&vars.as_params());
        let weights = Tensor::arange(0f64, out.elem_count() as f64, &Device::Cpu)
            .unwrap()
            .affine(0.37, -2.0)
            .unwrap()
            .sin()
            .unwrap();
        let grads = (&out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads = vars.gradients(&grads).unwrap();
        let mut all = vec![out.to_vec1::<f64>().unwrap()];
        for (_, g) in grads.iter() {
            all.push(g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        }
        all
    }

    fn assert_close(a: &[Vec<f64>], b: &[Vec<f64>]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.len(), y.len());
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() < 1e-10 * (1.0 + v.abs()), "{u} vs {v}");
            }
        }
    }

    #[test]
    fn fused_task_generator_matches_the_candle_ops() {
        // 300 coordinates: two full blocks and a partial one; 3 steps.
        let mut rng = fewshot_data::Rng::seed_from(5, 0);
        let generator = TaskGenerator { hidden: 3 };
        let params = random_params(&generator.param_shapes(), &mut rng);
        let steps = Tensor::stack(
            &(0..3)
                .map(|_| random_inputs(300, &mut rng))
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let fused = output_and_gradients(&params, |p| generator.forward(p, &steps).unwrap());
        let composed = output_and_gradients(&params, |p| {
            generator.forward_with_candle_ops(p, &steps).unwrap()
        });
        assert_close(&fused, &composed);
    }

    #[test]
    fn fused_example_generator_matches_the_candle_ops() {
        let mut rng = fewshot_data::Rng::seed_from(6, 0);
        let generator = ExampleGenerator { hidden: 4 };
        let params = random_params(&generator.param_shapes(), &mut rng);
        let inputs = random_inputs(300, &mut rng);
        let fused = output_and_gradients(&params, |p| generator.forward(p, &inputs).unwrap());
        let composed = output_and_gradients(&params, |p| {
            generator.forward_with_candle_ops(p, &inputs).unwrap()
        });
        assert_close(&fused, &composed);
    }

    #[test]
    fn lstm_step_matches_a_hand_computed_step() {
        // Hidden size 1: the four gate rows are i, f, g, o.
        let mut params = ParamSet::new();
        let w_ih = [0.5, -0.2, 0.1, 0.3, -0.4, 0.8, 0.7, 0.05];
        let w_hh = [0.2, -0.1, 0.6, 0.3];
        let bias = [0.1, 1.0, -0.2, 0.0];
        params.insert("lstm.w_ih", tensor(&w_ih, &[4, 2])).unwrap();
        params.insert("lstm.w_hh", tensor(&w_hh, &[4, 1])).unwrap();
        params.insert("lstm.bias", tensor(&bias, &[4])).unwrap();
        let (x, h0, c0) = ([0.3, -0.7], 0.4, -0.25);
        let generator = TaskGenerator { hidden: 1 };
        let (h, c) = generator
            .step(
                &params,
                &tensor(&x, &[1, 2]),
                &tensor(&[h0], &[1, 1]),
                &tensor(&[c0], &[1, 1]),
            )
            .unwrap();
        let pre = |g: usize| w_ih[2 * g] * x[0] + w_ih[2 * g + 1] * x[1] + w_hh[g] * h0 + bias[g];
        let c_want = logistic(pre(1)) * c0 + logistic(pre(0)) * pre(2).tanh();
        let h_want = logistic(pre(3)) * c_want.tanh();
        let c: f64 = c.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        let h: f64 = h.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((c - c_want).abs() < 1e-12, "c {c} vs {c_want}");
        assert!((h - h_want).abs() < 1e-12, "h {h} vs {h_want}");
    }

    #[test]
    fn example_generator_is_the_mlp_applied_per_coordinate() {
        let mut params = ParamSet::new();
        params
            .insert("l1.weight", tensor(&[1.0, -1.0, 0.5, 2.0], &[2, 2]))
            .unwrap();
        params
            .insert("l1.bias", tensor(&[0.0, -0.5], &[2]))
            .unwrap();
        params
            .insert("l2.weight", tensor(&[1.0, 1.0, -1.0, 0.5], &[2, 2]))
            .unwrap();
        params.insert("l2.bias", tensor(&[0.1, 0.0], &[2])).unwrap();
        params
            .insert("out.weight", tensor(&[2.0, -3.0], &[1, 2]))
            .unwrap();
        params.insert("out.bias", tensor(&[0.25], &[1])).unwrap();
        let x = tensor(&[1.0, 0.5, -1.0, 1.0], &[2, 2]);
        let got: Vec<f64> = ExampleGenerator { hidden: 2 }
            .forward(&params, &x)
            .unwrap()
            .to_vec1()
            .unwrap();
        let relu = |v: f64| v.max(0.0);
        let want: Vec<f64> = [[1.0, 0.5], [-1.0, 1.0]]
            .iter()
            .map(|[a, b]| {
                let h1 = [relu(a - b), relu(0.5 * a + 2.0 * b - 0.5)];
                let h2 = [relu(h1[0] + h1[1] + 0.1), relu(-h1[0] + 0.5 * h1[1])];
                2.0 * h2[0] - 3.0 * h2[1] + 0.25
            })
            .collect();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }
}
