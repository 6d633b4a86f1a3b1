//! Meta information: loss gradients, flattened into one vector per group of
//! weights and preprocessed per coordinate before the generators read them.

use candle_core::Tensor;
use fewshot_backbone::{BackboneError, ParamSet, Result, VarSet};

/// Below this |g| the log feature is clamped anyway; it only keeps log(0) out.
const LOG_EPS: f64 = 1e-20;

/// Per coordinate g of `gradient` (P), the two features (P, 2)
/// `[max(log(|g| + eps) / k, -1), clamp(g e^k, -1, 1)]`: the log-magnitude
/// where |g| > e^-k, otherwise -1, and the sign where |g| > e^-k, otherwise
/// the scaled value. Spans many orders of magnitude in a range the
/// generators can use (Andrychowicz et al. 2016, as the reference with k = 7).
pub fn preprocess(gradient: &Tensor, k: f64) -> Result<Tensor> {
    let magnitude = (gradient.abs()? + LOG_EPS)?.log()?.affine(1.0 / k, 0.0)?;
    let magnitude = magnitude.maximum(-1.0)?;
    let scaled = gradient.affine(k.exp(), 0.0)?.clamp(-1.0, 1.0)?;
    Ok(Tensor::stack(&[magnitude, scaled], 1)?)
}

/// The gradients of `vars`' named entries, detached, flattened and
/// concatenated in the order of `names`: one vector (P).
pub fn flat_gradient(
    vars: &VarSet,
    grads: &candle_core::backprop::GradStore,
    names: &[String],
) -> Result<Tensor> {
    let all = vars.gradients(grads)?;
    let parts = names
        .iter()
        .map(|name| Ok(all.get(name)?.detach().flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Splits the rows of `flat` (R, P) into one tensor per named shape, each
/// (R, shape...): R copies of a group of weights, e.g. one per query.
pub fn unflatten(flat: &Tensor, shapes: &[(String, Vec<usize>)]) -> Result<ParamSet> {
    let (rows, total) = flat.dims2()?;
    let expected: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    if total != expected {
        return Err(BackboneError::Parameter {
            name: "fast weights".into(),
            problem: format!("have {total} values per row, the shapes need {expected}"),
        });
    }
    let mut out = ParamSet::new();
    let mut offset = 0;
    for (name, shape) in shapes {
        let count: usize = shape.iter().product();
        let mut dims = vec![rows];
        dims.extend_from_slice(shape);
        out.insert(name.clone(), flat.narrow(1, offset, count)?.reshape(dims)?)?;
        offset += count;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn preprocessing_matches_hand_computed_features() {
        let g = Tensor::new(&[0.5f64, -1e-5, 2.0, 0.0, -0.01], &Device::Cpu).unwrap();
        let features: Vec<Vec<f64>> = preprocess(&g, 7.0).unwrap().to_vec2().unwrap();
        let e7 = 7f64.exp();
        let expected = [
            [0.5f64.ln() / 7.0, 1.0],
            [-1.0, -1e-5 * e7],
            [2f64.ln() / 7.0, 1.0],
            [-1.0, 0.0],
            [0.01f64.ln() / 7.0, -1.0],
        ];
        for (got, want) in features.iter().zip(expected) {
            assert!(
                (got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn unflatten_splits_rows_into_named_shapes() {
        let flat = Tensor::arange(0f32, 20., &Device::Cpu)
            .unwrap()
            .reshape((2, 10))
            .unwrap();
        let shapes = vec![("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
        let parts = unflatten(&flat, &shapes).unwrap();
        assert_eq!(parts.get("a").unwrap().dims(), [2, 2, 3]);
        let b: Vec<Vec<f32>> = parts.get("b").unwrap().to_vec2().unwrap();
        assert_eq!(b, vec![vec![6., 7., 8., 9.], vec![16., 17., 18., 19.]]);
        let err = unflatten(&flat, &shapes[..1]).unwrap_err().to_string();
        assert!(err.contains("10"), "{err}");
    }
}
