//! Meta information: loss gradients, preprocessed per coordinate before the
//! generators read them.

use candle_core::Tensor;
use fewshot_backbone::Result;

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
}
