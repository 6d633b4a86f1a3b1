//! Hyperparameters, validated when the learner is built. Defaults are Snell
//! et al.'s Omniglot settings: four blocks of [3x3 conv 64, batch norm, ReLU,
//! 2x2 max-pool] on 28x28 grey images (a 64-d embedding), Adam at 1e-3
//! halved every 2,000 episodes, no gradient clipping.

use fewshot_backbone::{AdamConfig, BackboneError, Conv4Config, Downsample, FeatureHead};
use fewshot_backbone::{Result, StepDecay};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtoNetConfig {
    /// The embedding network. Default: the paper's conv-4 with max-pooling,
    /// its last feature map flattened (64-d at 28x28, 1,600-d at 84x84).
    pub embedding: Conv4Config,
    /// Default: Adam, lr 1e-3, no gradient clipping.
    pub optimizer: AdamConfig,
    /// Multiply the learning rate by `lr_decay_factor` every this many steps
    /// (0: never). Default 2,000 (the paper's schedule, one episode a step).
    pub lr_decay_every: u64,
    /// Default 0.5.
    pub lr_decay_factor: f64,
    /// Seeds the initial weights. Default 0.
    pub init_seed: u64,
    /// What batch norm normalises a test episode by. Default `episode`.
    pub test_batch_norm: TestBatchNorm,
    /// With `test_batch_norm: running`, the weight of each training step's
    /// batch statistics in the running averages (PyTorch's `momentum`).
    /// Default 0.1.
    pub running_momentum: f64,
}

/// What batch norm normalises a test episode by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TestBatchNorm {
    /// The statistics of the episode's support and query images together,
    /// as in training (transductive, as MAML tests).
    Episode,
    /// Running averages of the training batches' statistics, kept with the
    /// weights: the reference code's `model.eval()`. Each query is scored on
    /// its own, and batch norm sees test images as it saw training batches.
    Running,
}

impl Default for ProtoNetConfig {
    fn default() -> Self {
        Self {
            embedding: Conv4Config {
                downsample: Downsample::MaxPool,
                feature_head: FeatureHead::Flatten,
                ..Conv4Config::omniglot()
            },
            optimizer: AdamConfig::default(),
            lr_decay_every: 2000,
            lr_decay_factor: 0.5,
            init_seed: 0,
            test_batch_norm: TestBatchNorm::Episode,
            running_momentum: 0.1,
        }
    }
}

impl ProtoNetConfig {
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
        if !(self.running_momentum > 0.0 && self.running_momentum <= 1.0) {
            return Err(BackboneError::InvalidConfig {
                field: "running_momentum",
                value: self.running_momentum.to_string(),
                reason: "must be in (0, 1]".into(),
            });
        }
        if self.test_batch_norm == TestBatchNorm::Running && !self.embedding.batch_norm {
            return Err(BackboneError::InvalidConfig {
                field: "test_batch_norm",
                value: "running".into(),
                reason: "the embedding has no batch norm (embedding.batch_norm is false)".into(),
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
    fn defaults_are_the_papers_omniglot_settings() {
        let c = ProtoNetConfig::default();
        c.validate().unwrap();
        assert_eq!(c.embedding.sides(), vec![14, 7, 3, 1]);
        assert_eq!(c.embedding.feature_dim(), 64);
        assert_eq!(c.optimizer.lr, 1e-3);
        assert_eq!(c.optimizer.max_grad_norm, None);
        assert_eq!(c.lr_at(1999), 1e-3);
        assert_eq!(c.lr_at(2000), 5e-4);
        let mini = Conv4Config {
            in_channels: 3,
            image_size: 84,
            ..c.embedding
        };
        assert_eq!(mini.feature_dim(), 1600);
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = ProtoNetConfig::default();
        c.embedding.classifier_outputs = Some(5);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("embedding.classifier_outputs"), "{err}");
        let c = ProtoNetConfig {
            lr_decay_factor: 0.0,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("lr_decay_factor"), "{err}");
        let c = ProtoNetConfig {
            running_momentum: 0.0,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("running_momentum"), "{err}");
        let err = serde_json::from_str::<ProtoNetConfig>(r#"{"test_batch_norm": "eval"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eval"), "{err}");
        let err = serde_json::from_str::<ProtoNetConfig>(r#"{"lr_decay": 3}"#).unwrap_err();
        assert!(err.to_string().contains("lr_decay"), "{err}");
    }
}
