//! Embedding-based Meta Networks (the metric-based variant of Munkhdalai & Yu's
//! Meta Networks, as in seed 000 of this project).
//!
//! An [`EmbeddingNetwork`] (conv-4 with batch norm, 64-d output) embeds every
//! image. The [`MetaLearner`] turns each support embedding `h_i` into fast
//! weights `w_i = U h_i + e`, averages them per class into `W_c`, and scores a
//! query embedding `h` by `(V h)^T W_c`. [`MetaNetwork`] combines the two, and
//! [`EbMetaNet`] trains it with Adam through the shared
//! [`fewshot_backbone::Learner`] trait.

pub mod embedding;
pub mod hyperparams;
pub mod learner;
pub mod meta_learner;
pub mod network;

pub use embedding::EmbeddingNetwork;
use fewshot_backbone::SharedFields;
pub use hyperparams::EbMetaNetConfig;
pub use learner::EbMetaNet;
pub use meta_learner::MetaLearner;
pub use network::MetaNetwork;

/// The name of this algorithm in configs and checkpoints.
pub const ALGORITHM: &str = "eb-metanet";

/// What this algorithm's section shares with the rest of an experiment
/// config: the images' shape, in `embedding`; it takes any way count.
pub const SHARED_FIELDS: SharedFields = SharedFields {
    input: "/embedding",
    train_ways: None,
    test_ways: None,
};
