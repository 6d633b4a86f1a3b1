//! Hyperparameters, validated when the learner is built. Defaults are the
//! reference code's Omniglot settings (seed 001, SPEC.md); what it leaves
//! open is chosen here and explained.

use fewshot_backbone::{AdamConfig, BackboneError, Result, StepDecay};
use serde::{Deserialize, Serialize};

/// What the base learner b is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaseLearner {
    /// A conv net of u's shape on the images (Omniglot).
    Conv,
    /// An MLP on u's embeddings (the reference's miniImageNet model).
    Mlp,
}

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
    /// Blocks of [3x3 conv, ReLU, 2x2 ceil-mode max-pool] in the
    /// representation network (and a conv base learner). Default 5
    /// (28 -> ... -> 1). Hidden layers are as wide as the last block's
    /// flattened output (64 on Omniglot, 288 on miniImageNet).
    pub blocks: usize,
    /// Leading blocks of the representation network with batch norm (before
    /// the ReLU; statistics of the support set, see the crate's docs).
    /// Default 0; 3 on miniImageNet.
    pub key_batch_norm_blocks: usize,
    /// Trailing conv blocks that take fast weights. Default (null): every
    /// block without batch norm (5 on Omniglot, 2 on miniImageNet).
    pub fast_blocks: Option<usize>,
    /// The base learner b. Default `conv`; `mlp` on miniImageNet.
    pub base: BaseLearner,
    /// Hidden layers of b before its head. Default 1 (fc1); 2 on
    /// miniImageNet.
    pub base_hidden_layers: usize,
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
    /// Multiply the learning rate by `lr_decay_factor` every this many steps.
    /// Default 0 (never): the reference keeps it constant.
    pub lr_decay_every: u64,
    /// Default 0.5.
    pub lr_decay_factor: f64,
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
            key_batch_norm_blocks: 0,
            fast_blocks: None,
            base: BaseLearner::Conv,
            base_hidden_layers: 1,
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
            lr_decay_every: 0,
            lr_decay_factor: 0.5,
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

    /// The reference's miniImageNet model: 84x84 RGB, 32 filters, batch
    /// norm on u's first three blocks, fast weights on its last two and on
    /// fc1, b an MLP with two hidden layers on u's embeddings, trained
    /// 10-way and tested 5-way, the support gradients in up to 10 chunks.
    pub fn mini_imagenet() -> Self {
        Self {
            in_channels: 3,
            image_size: 84,
            filters: 32,
            key_batch_norm_blocks: 3,
            base: BaseLearner::Mlp,
            base_hidden_layers: 2,
            n_outputs_train: 10,
            n_outputs_test: 5,
            gradient_chunks: 10,
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
            ("base_hidden_layers", self.base_hidden_layers),
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
        if self.key_batch_norm_blocks > self.blocks {
            return invalid(
                "key_batch_norm_blocks",
                self.key_batch_norm_blocks.to_string(),
                &format!("the network has {} blocks", self.blocks),
            );
        }
        if self.key_batch_norm_blocks + self.fast_block_count() > self.blocks {
            return invalid(
                "fast_blocks",
                self.fast_block_count().to_string(),
                &format!(
                    "with key_batch_norm_blocks = {}, at most {} of the {} blocks can take fast weights (batch-normalised blocks take none)",
                    self.key_batch_norm_blocks,
                    self.blocks.saturating_sub(self.key_batch_norm_blocks),
                    self.blocks
                ),
            );
        }
        if !(self.gradient_k > 0.0 && self.gradient_k.is_finite()) {
            return invalid(
                "gradient_k",
                self.gradient_k.to_string(),
                "must be positive",
            );
        }
        self.optimizer.validate()?;
        self.lr_schedule().validate("lr_decay_factor")
    }

    /// How the optimiser's learning rate changes over the steps.
    pub fn lr_schedule(&self) -> StepDecay {
        StepDecay {
            every: self.lr_decay_every,
            factor: self.lr_decay_factor,
        }
    }

    /// Trailing conv blocks with fast weights.
    pub fn fast_block_count(&self) -> usize {
        self.fast_blocks
            .unwrap_or(self.blocks.saturating_sub(self.key_batch_norm_blocks))
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
    fn a_config_that_sets_only_the_rate_keeps_the_reference_clip() {
        let section = serde_json::json!({"name": "metanet-original", "optimizer": {"lr": 1e-4}});
        let config: MetaNetConfig =
            fewshot_backbone::parse_algorithm_section(&section, crate::ALGORITHM).unwrap();
        assert_eq!(config.optimizer.lr, 1e-4);
        assert_eq!(config.optimizer.max_grad_norm, Some(10.0));
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
        let config = MetaNetConfig {
            key_batch_norm_blocks: 4,
            fast_blocks: Some(2),
            ..MetaNetConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("fast_blocks"), "{err}");
        let config = MetaNetConfig {
            lr_decay_factor: 0.0,
            ..MetaNetConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("lr_decay_factor"), "{err}");
    }

    #[test]
    fn the_learning_rate_is_constant_unless_a_decay_is_set() {
        let config = MetaNetConfig::default();
        let lr_at =
            |config: &MetaNetConfig, step| config.lr_schedule().lr_at(config.optimizer.lr, step);
        assert_eq!(lr_at(&config, 0), 1e-3);
        assert_eq!(lr_at(&config, 1_000_000), 1e-3);
        let halving = MetaNetConfig {
            lr_decay_every: 10_000,
            ..config
        };
        assert_eq!(lr_at(&halving, 9_999), 1e-3);
        assert_eq!(lr_at(&halving, 25_000), 2.5e-4);
    }

    #[test]
    fn the_mini_imagenet_model_pools_84_down_to_3() {
        let config = MetaNetConfig::mini_imagenet();
        config.validate().unwrap();
        // 32 filters x 3 x 3 = 288 features, as the reference's fc1.
        assert_eq!(config.sides(), vec![42, 21, 11, 6, 3]);
        assert_eq!(config.head_widths(), vec![10, 5]);
        assert_eq!(config.fast_block_count(), 2);
    }
}
