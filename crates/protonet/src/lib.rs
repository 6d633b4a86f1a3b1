//! Prototypical Networks (Snell, Swersky & Zemel 2017).
//!
//! A conv net embeds every image; each class's prototype is the mean
//! embedding of its support images ([`prototypes`]), and a query is scored by
//! its negative squared Euclidean distance to each prototype
//! ([`distance_logits`]). Training minimises the query cross-entropy of those
//! scores, usually on episodes of more classes than at test time (60-way for
//! Omniglot). [`ProtoNet`] does it with Adam behind the shared
//! [`fewshot_backbone::Learner`] trait.

pub mod hyperparams;
pub mod learner;
pub mod prototypes;

use fewshot_backbone::SharedFields;
pub use hyperparams::{ProtoNetConfig, TestBatchNorm};
pub use learner::ProtoNet;
pub use prototypes::{distance_logits, prototypes};

/// The name of this algorithm in configs and checkpoints.
pub const ALGORITHM: &str = "protonet";

/// What this algorithm's section shares with the rest of an experiment
/// config: the images' shape, in `embedding`; it takes any way count.
pub const SHARED_FIELDS: SharedFields = SharedFields {
    input: "/embedding",
    train_ways: None,
    test_ways: None,
};
