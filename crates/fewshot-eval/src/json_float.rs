//! JSON has no NaN or infinity: serde_json writes them as `null`, and then
//! refuses to read that `null` back as a number. A diverged run logs NaN
//! losses, and its `metrics.jsonl` and results must stay readable, so
//! fields that can be non-finite read `null` as NaN.

use serde::{Deserialize, Deserializer};

/// Use as `#[serde(deserialize_with = "crate::json_float::nan_if_null")]`.
pub(crate) fn nan_if_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Loss {
        #[serde(deserialize_with = "super::nan_if_null")]
        loss: f64,
    }

    #[test]
    fn non_finite_values_survive_a_json_round_trip_as_nan() {
        for value in [f64::NAN, f64::INFINITY] {
            let json = serde_json::to_string(&Loss { loss: value }).unwrap();
            assert_eq!(json, r#"{"loss":null}"#);
            let back: Loss = serde_json::from_str(&json).unwrap();
            assert!(back.loss.is_nan());
        }
        let back: Loss = serde_json::from_str(r#"{"loss":0.25}"#).unwrap();
        assert_eq!(back.loss, 0.25);
    }
}
