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

pub use hyperparams::{ProtoNetConfig, TestBatchNorm};
pub use learner::ProtoNet;
pub use prototypes::{distance_logits, prototypes};

/// The name of this algorithm in configs and checkpoints.
pub const ALGORITHM: &str = "protonet";

/// Where this algorithm's config section keeps the shape of the images it
/// reads (`in_channels`, `image_size`): `embedding`, as a JSON pointer into
/// the section. A runner can fill them from its data settings.
pub const INPUT_SECTION: &str = "/embedding";
