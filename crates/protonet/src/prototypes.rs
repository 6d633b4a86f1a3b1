//! The two computations that make a Prototypical Network: class means of the
//! support embeddings, and distances of the queries to them.

use candle_core::Tensor;
use fewshot_backbone::{ops, BackboneError, Result};

/// Prototypes (ways x dim): the mean support embedding of each class.
/// Works for any order of the support set and any number of shots per class;
/// a class without support images is an error, not a prototype at the origin.
pub fn prototypes(support: &Tensor, labels: &Tensor, ways: usize) -> Result<Tensor> {
    let membership = ops::one_hot(labels, ways, support.dtype())?.t()?; // (ways, n)
    let counts = membership.sum_keepdim(1)?;
    let empty = ops::path::to_host_vec_f64(&counts)?
        .iter()
        .position(|&c| c == 0.0);
    if let Some(class) = empty {
        return Err(BackboneError::InvalidConfig {
            field: "support_labels",
            value: format!("class {class}"),
            reason: format!("every one of the {ways} classes needs at least one support image"),
        });
    }
    Ok(membership.matmul(support)?.broadcast_div(&counts)?)
}

/// Logits (queries x ways): minus the squared Euclidean distance of each
/// query embedding to each prototype, `-(|q|^2 - 2 q.c + |c|^2)`. The
/// expansion turns the distances into one matrix product.
pub fn distance_logits(query: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
    let query_norms = query.sqr()?.sum_keepdim(1)?; // (q, 1)
    let prototype_norms = prototypes.sqr()?.sum_keepdim(1)?.t()?; // (1, ways)
    let cross = query.matmul(&prototypes.t()?)?; // (q, ways)
    Ok(((cross * 2.0)?
        .broadcast_sub(&query_norms)?
        .broadcast_sub(&prototype_norms))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn prototypes_are_class_means_in_any_order() {
        let device = Device::Cpu;
        // Class 1, class 0, class 1: uneven shots, out of order.
        let support = Tensor::new(&[[1f32, 1.], [2., 0.], [3., 5.]], &device).unwrap();
        let labels = Tensor::new(&[1u32, 0, 1], &device).unwrap();
        let p = prototypes(&support, &labels, 2).unwrap();
        assert_eq!(
            p.to_vec2::<f32>().unwrap(),
            vec![vec![2., 0.], vec![2., 3.]]
        );
    }

    #[test]
    fn a_class_without_support_is_named() {
        let device = Device::Cpu;
        let support = Tensor::new(&[[1f32, 1.], [2., 0.]], &device).unwrap();
        let labels = Tensor::new(&[0u32, 2], &device).unwrap();
        let err = prototypes(&support, &labels, 3).unwrap_err().to_string();
        assert!(err.contains("class 1"), "{err}");
    }

    #[test]
    fn logits_are_negative_squared_distances() {
        let device = Device::Cpu;
        let query = Tensor::new(&[[0f64, 0.], [1., 2.]], &device).unwrap();
        let protos = Tensor::new(&[[3f64, 4.], [1., 1.]], &device).unwrap();
        let logits = distance_logits(&query, &protos).unwrap();
        // |(0,0)-(3,4)|^2 = 25, |(0,0)-(1,1)|^2 = 2, |(1,2)-(3,4)|^2 = 8, |(1,2)-(1,1)|^2 = 1.
        assert_eq!(
            logits.to_vec2::<f64>().unwrap(),
            vec![vec![-25., -2.], vec![-8., -1.]]
        );
    }

    #[test]
    fn logit_gradient_matches_the_distance_formula() {
        // d/dq of -|q - c|^2 summed over prototypes is -2 * sum_c (q - c).
        let device = Device::Cpu;
        let q = Var::new(&[[0.5f64, -1.0, 2.0]], &device).unwrap();
        let protos = Tensor::new(&[[1f64, 0., 0.], [0., 2., -1.]], &device).unwrap();
        let grads = distance_logits(&q, &protos)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(&q).unwrap().to_vec2::<f64>().unwrap();
        let want = [-2. * (-0.5 + 0.5), -2. * (-1. - 3.), -2. * (2. + 3.)];
        for (got, want) in g[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }
}
