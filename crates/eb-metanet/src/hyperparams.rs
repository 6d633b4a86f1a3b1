//! Hyperparameters, validated when the learner is built. Defaults follow seed
//! 000 where it speaks (64-d embedding, hidden 128, Adam 1e-3, gradient-norm
//! clip 1.0); what it leaves open is chosen here and explained.

use fewshot_backbone::{AdamConfig, BackboneError, Conv4Config, Result, StepDecay};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbMetaNetConfig {
    /// The embedding network. Default: 4 blocks of [3x3 conv 64, batch norm,
    /// ReLU, 2x2 max-pool] on 28x28 grey images, mean over space: 64-d.
    pub embedding: Conv4Config,
    /// Rows of U and V and length of e. Default 128.
    pub hidden_dim: usize,
    /// Default: Adam, lr 1e-3, gradient-norm clip 1.0.
    pub optimizer: AdamConfig,
    /// Multiply the learning rate by `lr_decay_factor` every this many steps
    /// (0: never). Default 2000, as Prototypical Networks' schedule.
    pub lr_decay_every: u64,
    /// Default 0.5.
    pub lr_decay_factor: f64,
    /// Seeds the initial weights. Default 0.
    pub init_seed: u64,
}

impl Default for EbMetaNetConfig {
    fn default() -> Self {
        Self {
            embedding: Conv4Config {
                downsample: fewshot_backbone::Downsample::MaxPool,
                ..Conv4Config::omniglot()
            },
            hidden_dim: 128,
            optimizer: AdamConfig {
                max_grad_norm: Some(1.0),
                ..AdamConfig::default()
            },
            lr_decay_every: 2000,
            lr_decay_factor: 0.5,
            init_seed: 0,
        }
    }
}

impl EbMetaNetConfig {
    pub fn validate(&self) -> Result<()> {
        self.embedding.validate()?;
        self.optimizer.validate()?;
        if self.embedding.classifier_outputs.is_some() {
            return Err(BackboneError::InvalidConfig {
                field: "embedding.classifier_outputs",
                value: format!("{:?}", self.embedding.classifier_outputs),
                reason: "the embedding network outputs features; leave it null".into(),
            });
        }
        if self.hidden_dim == 0 {
            return Err(BackboneError::InvalidConfig {
                field: "hidden_dim",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        self.lr_schedule().validate("lr_decay_factor")
    }

    fn lr_schedule(&self) -> StepDecay {
        StepDecay {
            every: self.lr_decay_every,
            factor: self.lr_decay_factor,
        }
    }

    /// The learning rate after `step` optimiser steps.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_schedule().lr_at(self.optimizer.lr, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_settings() {
        let c = EbMetaNetConfig::default();
        c.validate().unwrap();
        assert_eq!(c.embedding.feature_dim(), 64);
        assert_eq!(c.hidden_dim, 128);
        assert_eq!(c.optimizer.lr, 1e-3);
        assert_eq!(c.optimizer.max_grad_norm, Some(1.0));
    }

    #[test]
    fn schedule_halves_every_period() {
        let c = EbMetaNetConfig::default();
        assert_eq!(c.lr_at(0), 1e-3);
        assert_eq!(c.lr_at(1999), 1e-3);
        assert_eq!(c.lr_at(2000), 5e-4);
        assert_eq!(c.lr_at(4500), 2.5e-4);
    }

    #[test]
    fn bad_values_are_named() {
        let c = EbMetaNetConfig {
            hidden_dim: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("hidden_dim"));
        let c = EbMetaNetConfig {
            lr_decay_factor: 2.0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lr_decay_factor"));
        let err = serde_json::from_str::<EbMetaNetConfig>(r#"{"hiden_dim": 3}"#).unwrap_err();
        assert!(err.to_string().contains("hiden_dim"), "{err}");
    }
}
