//! Hyperparameters, validated when the learner is built. Defaults are the
//! reference code's Omniglot settings (seed 001, SPEC.md); what it leaves
//! open is chosen here and explained.

use fewshot_backbone::{AdamConfig, BackboneError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaNetConfig {
    /// Image channels: 1 for Omniglot.
    pub in_channels: usize,
    /// Side of the square input image. Default 28.
    pub image_size: usize,
    /// Filters of every convolution, and the width of the hidden layer fc1.
    /// Default 64.
    pub filters: usize,
    /// Blocks of [3x3 conv, ReLU, 2x2 ceil-mode max-pool] in both the base
    /// learner and the representation network. Default 5 (28 -> ... -> 1).
    pub blocks: usize,
    /// Width of the softmax head used on training episodes. Default 5.
    pub n_outputs_train: usize,
    /// Width of the softmax head used on episodes with another way count
    /// (a separate head when it differs from `n_outputs_train`). Default 5.
    pub n_outputs_test: usize,
    /// Hidden units of the generators (LSTM state, MLP layers). Default 20.
    pub generator_hidden: usize,
    /// Chunks of the support set whose gradients the task-level LSTM reads
    /// (T). Default 5, as the reference; fewer when the support set is smaller.
    pub gradient_chunks: usize,
    /// k of the gradient preprocessing. Default 7.
    pub gradient_k: f64,
    /// Queries classified at once by `predict` (memory, not results, depends
    /// on it: every query reads its own fast weights). Default 64.
    pub query_chunk: usize,
    /// Default: Adam, lr 1e-3, gradient-norm clip 10 (the reference's).
    pub optimizer: AdamConfig,
    /// Seeds the initial weights. Default 0.
    pub init_seed: u64,
}

impl Default for MetaNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            image_size: 28,
            filters: 64,
            blocks: 5,
            n_outputs_train: 5,
            n_outputs_test: 5,
            generator_hidden: 20,
            gradient_chunks: 5,
            gradient_k: 7.0,
            query_chunk: 64,
            optimizer: AdamConfig {
                max_grad_norm: Some(10.0),
                ..AdamConfig::default()
            },
            init_seed: 0,
        }
    }
}

impl MetaNetConfig {
    /// The paper's 20-way Omniglot model: 20-way heads, all else as 5-way.
    pub fn omniglot_20way() -> Self {
        Self {
            n_outputs_train: 20,
            n_outputs_test: 20,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("filters", self.filters),
            ("blocks", self.blocks),
            ("generator_hidden", self.generator_hidden),
            ("gradient_chunks", self.gradient_chunks),
            ("query_chunk", self.query_chunk),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "must be at least 1");
            }
        }
        for (field, value) in [
            ("n_outputs_train", self.n_outputs_train),
            ("n_outputs_test", self.n_outputs_test),
        ] {
            if value < 2 {
                return invalid(field, value.to_string(), "a task needs at least 2 ways");
            }
        }
        if !(self.gradient_k > 0.0 && self.gradient_k.is_finite()) {
            return invalid(
                "gradient_k",
                self.gradient_k.to_string(),
                "must be positive",
            );
        }
        self.optimizer.validate()
    }

    /// The way counts that have a softmax head, without repeats.
    pub fn head_widths(&self) -> Vec<usize> {
        let mut widths = vec![self.n_outputs_train, self.n_outputs_test];
        widths.dedup();
        widths
    }

    /// Side of the feature map after every block (ceil-mode pooling).
    pub fn sides(&self) -> Vec<usize> {
        let mut side = self.image_size;
        (0..self.blocks)
            .map(|_| {
                side = side.div_ceil(2);
                side
            })
            .collect()
    }
}

fn invalid(field: &'static str, value: String, reason: &str) -> Result<()> {
    Err(BackboneError::InvalidConfig {
        field,
        value,
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_omniglot_model() {
        let config = MetaNetConfig::default();
        config.validate().unwrap();
        assert_eq!(config.sides(), vec![14, 7, 4, 2, 1]);
        assert_eq!(config.head_widths(), vec![5]);
        assert_eq!(config.optimizer.max_grad_norm, Some(10.0));
        let twenty = MetaNetConfig {
            n_outputs_test: 20,
            ..config
        };
        assert_eq!(twenty.head_widths(), vec![5, 20]);
    }

    #[test]
    fn bad_values_are_named() {
        let config = MetaNetConfig {
            n_outputs_test: 1,
            ..MetaNetConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("n_outputs_test"), "{err}");
        let config = MetaNetConfig {
            gradient_k: f64::NAN,
            ..MetaNetConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("gradient_k"), "{err}");
    }
}
