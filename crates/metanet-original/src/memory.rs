//! The memory of example-level fast weights, one row per support example,
//! read by softmax attention over the cosine similarity of the query's
//! representation to each support example's.

use candle_core::{Tensor, D};
use fewshot_backbone::{ops, Result};

/// Keeps the norm of an all-zero representation away from 0.
const NORM_EPS: f64 = 1e-12;

/// Attention weights (Q, N): row q is the softmax over support examples of
/// cos(keys[i], queries[q]), for `keys` (N, E) and `queries` (Q, E).
pub fn attention(keys: &Tensor, queries: &Tensor) -> Result<Tensor> {
    let unit = |x: &Tensor| -> Result<Tensor> {
        let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + NORM_EPS)?.sqrt()?;
        Ok(x.broadcast_div(&norm)?)
    };
    let cosine = unit(queries)?.matmul(&unit(keys)?.t()?)?;
    ops::softmax(&cosine)
}

/// Each query's fast weights (Q, P): the attention-weighted sum of the
/// memory rows (N, P).
pub fn read(weights: &Tensor, memory: &Tensor) -> Result<Tensor> {
    Ok(weights.matmul(memory)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_is_the_softmax_of_cosine_similarities() {
        let keys = Tensor::new(&[[1f64, 0.], [0., 2.], [-3., 0.]], &Device::Cpu).unwrap();
        let queries = Tensor::new(&[[2f64, 2.]], &Device::Cpu).unwrap();
        let got: Vec<Vec<f64>> = attention(&keys, &queries).unwrap().to_vec2().unwrap();
        let cos = [0.5f64.sqrt(), 0.5f64.sqrt(), -(0.5f64.sqrt())];
        let total: f64 = cos.iter().map(|c| c.exp()).sum();
        for (g, c) in got[0].iter().zip(cos) {
            assert!((g - c.exp() / total).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn read_mixes_memory_rows_by_their_weights() {
        let weights = Tensor::new(&[[0.25f64, 0.75], [1., 0.]], &Device::Cpu).unwrap();
        let memory = Tensor::new(&[[4f64, 0., 8.], [0., 4., 4.]], &Device::Cpu).unwrap();
        let got: Vec<Vec<f64>> = read(&weights, &memory).unwrap().to_vec2().unwrap();
        assert_eq!(got, vec![vec![1., 3., 5.], vec![4., 0., 8.]]);
    }
}
