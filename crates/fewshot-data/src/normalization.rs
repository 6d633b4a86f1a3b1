//! How stored pixel bytes become a network's inputs.
//!
//! Without a [`Normalization`] a byte `v` is read as `v / 255`, in [0, 1]:
//! what MAML's and Prototypical Networks' reference code feed their
//! networks. With one, channel `c` is read as `(v / 255 - mean[c]) / std[c]`,
//! as many ImageNet-derived models expect.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Per-channel mean and standard deviation, in the [0, 1] units of `v / 255`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// ImageNet's RGB statistics (torchvision's): mean (0.485, 0.456, 0.406),
    /// std (0.229, 0.224, 0.225).
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// One mean and one positive, finite std per channel of `channels`.
    pub fn validate(&self, channels: usize) -> Result<()> {
        let bad = |reason: String| DataError::InvalidSpec {
            field: "normalize",
            value: format!("mean {:?}, std {:?}", self.mean, self.std),
            reason,
        };
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(bad(format!(
                "the images have {channels} channel(s): give one mean and one std for each"
            )));
        }
        if !self.mean.iter().all(|m| m.is_finite()) {
            return Err(bad("every mean must be a finite number".into()));
        }
        if !self.std.iter().all(|s| s.is_finite() && *s > 0.0) {
            return Err(bad("every std must be a positive finite number".into()));
        }
        Ok(())
    }

    /// The network input for byte `v` of channel `channel`.
    pub fn apply(&self, channel: usize, v: u8) -> f32 {
        (f32::from(v) / 255.0 - self.mean[channel]) / self.std[channel]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_per_channel_and_checks_its_shape() {
        let n = Normalization::imagenet();
        n.validate(3).unwrap();
        assert!((n.apply(0, 255) - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((n.apply(2, 0) - (-0.406 / 0.225)).abs() < 1e-6);

        let err = n.validate(1).unwrap_err().to_string();
        assert!(
            err.contains("normalize") && err.contains("1 channel"),
            "{err}"
        );
        let zero_std = Normalization {
            mean: vec![0.5],
            std: vec![0.0],
        };
        assert!(zero_std
            .validate(1)
            .unwrap_err()
            .to_string()
            .contains("positive"));
        let nan_mean = Normalization {
            mean: vec![f32::NAN],
            std: vec![1.0],
        };
        assert!(nan_mean.validate(1).is_err());
    }
}
