//! `MetaLearner`: generates a classifier's fast weights from support embeddings.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, ParamSet, Result};
use fewshot_data::Rng;

pub const U: &str = "U";
pub const V: &str = "V";
pub const E: &str = "e";

/// U, V (hidden x embedding) and e (hidden).
#[derive(Debug, Clone, Copy)]
pub struct MetaLearner {
    pub embedding_dim: usize,
    pub hidden_dim: usize,
}

impl MetaLearner {
    /// Glorot-uniform U and V, zero e.
    pub fn init(&self, seed: u64, device: &Device) -> Result<ParamSet> {
        let mut rng = Rng::seed_from(seed, 1);
        let bound = (6.0 / (self.embedding_dim + self.hidden_dim) as f64).sqrt();
        let shape = (self.hidden_dim, self.embedding_dim);
        let mut matrix = || -> Result<Tensor> {
            let values: Vec<f32> = (0..self.hidden_dim * self.embedding_dim)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect();
            Ok(Tensor::from_vec(values, shape, device)?)
        };
        let mut params = ParamSet::new();
        params.insert(U, matrix()?)?;
        params.insert(V, matrix()?)?;
        params.insert(E, Tensor::zeros(self.hidden_dim, DType::F32, device)?)?;
        Ok(params)
    }

    /// Fast weights W (ways x hidden): `W_c` is the mean of `U h_i + e` over the
    /// support examples of class `c`. Works for any order of the support set.
    pub fn fast_weights(
        &self,
        params: &ParamSet,
        support: &Tensor,
        labels: &Tensor,
        ways: usize,
    ) -> Result<Tensor> {
        let w = ops::linear(support, params.get(U)?, Some(params.get(E)?))?;
        let membership = ops::one_hot(labels, ways, w.dtype())?.t()?; // (ways, n)
        let counts = membership.sum_keepdim(1)?;
        Ok(membership.matmul(&w)?.broadcast_div(&counts)?)
    }

    /// Logits (queries x ways): `(V h)^T W_c`.
    pub fn logits(
        &self,
        params: &ParamSet,
        query: &Tensor,
        fast_weights: &Tensor,
    ) -> Result<Tensor> {
        let projected = ops::linear(query, params.get(V)?, None)?;
        Ok(projected.matmul(&fast_weights.t()?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_weights_are_class_means_of_projected_support() {
        let device = Device::Cpu;
        let ml = MetaLearner {
            embedding_dim: 2,
            hidden_dim: 2,
        };
        let mut p = ParamSet::new();
        p.insert(U, Tensor::new(&[[1f32, 0.], [0., 2.]], &device).unwrap())
            .unwrap();
        p.insert(V, Tensor::new(&[[1f32, 1.], [0., 1.]], &device).unwrap())
            .unwrap();
        p.insert(E, Tensor::new(&[1f32, 0.], &device).unwrap())
            .unwrap();
        // Support out of class order: class 1, class 0, class 1.
        let support = Tensor::new(&[[1f32, 1.], [2., 0.], [3., 1.]], &device).unwrap();
        let labels = Tensor::new(&[1u32, 0, 1], &device).unwrap();
        let w = ml.fast_weights(&p, &support, &labels, 2).unwrap();
        // U h + e: [2, 2], [3, 0], [4, 2]; class 0 -> [3, 0], class 1 -> [3, 2].
        assert_eq!(
            w.to_vec2::<f32>().unwrap(),
            vec![vec![3., 0.], vec![3., 2.]]
        );
        let query = Tensor::new(&[[1f32, 2.]], &device).unwrap();
        // V h = [3, 2]; logits = [9, 13].
        let logits = ml.logits(&p, &query, &w).unwrap();
        assert_eq!(logits.to_vec2::<f32>().unwrap(), vec![vec![9., 13.]]);
    }
}
