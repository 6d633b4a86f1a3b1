//! MAML's hyperparameters, validated when the learner is built, and the
//! paper's settings in one place.

use fewshot_backbone::{AdamConfig, BackboneError, Conv4Config, Result};
use serde::{Deserialize, Serialize};

use crate::cosine_annealing::CosineAnnealing;
use crate::multi_step_loss::MultiStepLoss;

/// How the meta-gradient treats the inner updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Exact: through every inner step (Hessian-vector products).
    Second,
    /// Inner gradients as constants: the paper's first-order approximation.
    First,
}

/// Which weights the inner loop adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Adapt {
    /// Every weight but batch norm's, as the reference code.
    All,
    /// The linear classifier only (ANIL, Raghu et al. 2020).
    Head,
}

/// Whose statistics batch norm uses on the query images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueryNormalisation {
    /// The query batch's own, as the reference code, also at meta-test time:
    /// transductive (a query's prediction depends on the other queries).
    Batch,
    /// The task's support set's (through the same adapted layers): each
    /// query's prediction depends on the support set and itself only.
    Support,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MamlConfig {
    /// The network; its classifier gets `ways` outputs.
    pub network: Conv4Config,
    /// Classes per episode: the classifier's width.
    pub ways: usize,
    pub inner_lr: f64,
    pub inner_steps_train: usize,
    pub inner_steps_test: usize,
    pub order: Order,
    pub adapt: Adapt,
    /// Batch norm on the queries: `batch` (transductive, the paper's) or
    /// `support` (non-transductive).
    pub query_normalisation: QueryNormalisation,
    /// The meta-optimiser. Default Adam, lr 1e-3, no clipping (the paper's).
    pub optimizer: AdamConfig,
    /// Seeds the initial weights.
    pub init_seed: u64,
    /// MAML++'s multi-step loss (null: plain MAML, the last step's query
    /// loss only).
    pub multi_step_loss: Option<MultiStepLoss>,
    /// MAML++'s per-layer per-step inner learning rates (LSLR): a step size
    /// for each adapted weight tensor and inner step, starting at
    /// `inner_lr` and meta-learned with the initialisation.
    pub learn_inner_lr: bool,
    /// MAML++'s per-step batch norm weights: a copy of each batch norm
    /// weight and bias for every inner step (`NAME.stepK`), all meta-learned.
    pub per_step_batch_norm: bool,
    /// MAML++'s cosine annealing of the meta learning rate (null: constant).
    pub cosine_annealing: Option<CosineAnnealing>,
    /// MAML++'s derivative-order annealing: epochs of first order before
    /// `order` takes over (0: `order` from the start).
    pub first_order_epochs: usize,
    /// Meta-steps in an epoch, the unit of MAML++'s schedules (its 500).
    pub iterations_per_epoch: usize,
}

impl Default for MamlConfig {
    fn default() -> Self {
        Self::omniglot_5way()
    }
}

impl MamlConfig {
    /// Omniglot 5-way: inner lr 0.4, 1 step in training, 3 at test.
    pub fn omniglot_5way() -> Self {
        Self {
            network: Conv4Config::omniglot(),
            ways: 5,
            inner_lr: 0.4,
            inner_steps_train: 1,
            inner_steps_test: 3,
            order: Order::Second,
            adapt: Adapt::All,
            query_normalisation: QueryNormalisation::Batch,
            optimizer: AdamConfig::default(),
            init_seed: 0,
            multi_step_loss: None,
            learn_inner_lr: false,
            per_step_batch_norm: false,
            cosine_annealing: None,
            first_order_epochs: 0,
            iterations_per_epoch: 500,
        }
    }

    /// Omniglot 20-way: inner lr 0.1, 5 steps in training and test.
    pub fn omniglot_20way() -> Self {
        Self {
            ways: 20,
            inner_lr: 0.1,
            inner_steps_train: 5,
            inner_steps_test: 5,
            ..Self::omniglot_5way()
        }
    }

    /// miniImageNet 5-way: 32 filters with max-pooling, inner lr 0.01, 5 steps
    /// in training and 10 at test.
    pub fn mini_imagenet() -> Self {
        Self {
            network: Conv4Config::mini_imagenet(),
            inner_lr: 0.01,
            inner_steps_train: 5,
            inner_steps_test: 10,
            ..Self::omniglot_5way()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &'static str, value: String, reason: &str| {
            Err(BackboneError::InvalidConfig {
                field,
                value,
                reason: reason.into(),
            })
        };
        self.network().validate()?;
        self.optimizer.validate()?;
        if self
            .network
            .classifier_outputs
            .is_some_and(|n| n != self.ways)
        {
            return invalid(
                "network.classifier_outputs",
                format!("{:?}", self.network.classifier_outputs),
                "leave it null: the classifier gets `ways` outputs",
            );
        }
        if self.ways < 2 {
            return invalid("ways", self.ways.to_string(), "must be at least 2");
        }
        if self.inner_lr.is_nan() || self.inner_lr <= 0.0 {
            return invalid("inner_lr", self.inner_lr.to_string(), "must be positive");
        }
        if self.inner_steps_train == 0 {
            return invalid("inner_steps_train", "0".into(), "must be at least 1");
        }
        let per_step = self.learn_inner_lr || self.per_step_batch_norm;
        if per_step && self.inner_steps_test > self.inner_steps_train {
            return invalid(
                "inner_steps_test",
                self.inner_steps_test.to_string(),
                "with learn_inner_lr or per_step_batch_norm, at most inner_steps_train: \
                 only those steps have their own weights",
            );
        }
        if self.per_step_batch_norm && !self.network.batch_norm {
            return invalid(
                "per_step_batch_norm",
                "true".into(),
                "the network has no batch norm (network.batch_norm is false)",
            );
        }
        if let Some(schedule) = self.cosine_annealing {
            if schedule.epochs == 0 {
                return invalid("cosine_annealing.epochs", "0".into(), "must be at least 1");
            }
            if !(schedule.min_lr >= 0.0 && schedule.min_lr <= self.optimizer.lr) {
                return invalid(
                    "cosine_annealing.min_lr",
                    schedule.min_lr.to_string(),
                    "must be between 0 and the optimiser's lr",
                );
            }
        }
        if self.iterations_per_epoch == 0 {
            return invalid("iterations_per_epoch", "0".into(), "must be at least 1");
        }
        if self.multi_step_loss.is_some_and(|m| m.epochs == 0) {
            return invalid(
                "multi_step_loss.epochs",
                "0".into(),
                "must be at least 1 (null turns the multi-step loss off)",
            );
        }
        Ok(())
    }

    /// The network with its `ways`-wide classifier.
    pub fn network(&self) -> Conv4Config {
        Conv4Config {
            classifier_outputs: Some(self.ways),
            ..self.network.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_the_papers_settings_and_valid() {
        for c in [
            MamlConfig::omniglot_5way(),
            MamlConfig::omniglot_20way(),
            MamlConfig::mini_imagenet(),
        ] {
            c.validate().unwrap();
        }
        let c = MamlConfig::omniglot_20way();
        assert_eq!(
            (c.inner_lr, c.inner_steps_train, c.inner_steps_test),
            (0.1, 5, 5)
        );
        assert_eq!(MamlConfig::mini_imagenet().network().feature_dim(), 800);
    }

    #[test]
    fn bad_values_are_named() {
        let c = MamlConfig {
            inner_lr: 0.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("inner_lr"));
        let c = MamlConfig {
            inner_steps_train: 0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("inner_steps_train"));
        let c = MamlConfig {
            multi_step_loss: Some(MultiStepLoss { epochs: 0 }),
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("multi_step_loss.epochs"), "{err}");
        let c = MamlConfig {
            learn_inner_lr: true,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("inner_steps_test"), "{err}");
        let c = MamlConfig {
            cosine_annealing: Some(CosineAnnealing {
                min_lr: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("cosine_annealing.min_lr"), "{err}");
        let c = MamlConfig {
            iterations_per_epoch: 0,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("iterations_per_epoch"), "{err}");
        let err = serde_json::from_str::<MamlConfig>(r#"{"order": "third"}"#).unwrap_err();
        assert!(err.to_string().contains("third"), "{err}");
    }
}
