//! Meta Networks as published (Munkhdalai & Yu 2017, the Chainer code of
//! seed 001): a model-based meta-learner that turns loss gradients into fast
//! weights.
//!
//! For each task:
//! 1. The representation network u ("key") computes its loss on chunks of
//!    the support set; the [`TaskGenerator`] d, an LSTM run per weight
//!    coordinate over those chunks' preprocessed gradients
//!    ([`meta_info::preprocess`]), outputs task-level fast weights Q*.
//! 2. The base learner b computes each support example's loss alone; the
//!    [`ExampleGenerator`] m, an MLP per coordinate, turns each example's
//!    gradient into fast weights W*_i, stored as one memory row per example.
//! 3. u, augmented with Q*, embeds the support set and the queries; each
//!    query reads its fast weights from memory by softmax attention over
//!    cosine similarities ([`memory`]).
//! 4. b, augmented with the query's fast weights (relu(W h) + relu(W* h) in
//!    hidden layers, W h + W* h at the output), classifies the query.
//!
//! The gradients of steps 1 and 2 are inputs, treated as constants; the
//! queries' loss trains every slow weight (b's, u's and both generators')
//! through the generated weights and the attention. [`MetaNetOriginal`]
//! implements the shared [`fewshot_backbone::Learner`] trait.

pub mod generators;
pub mod hyperparams;
pub mod kernels;
pub mod learner;
pub mod memory;
pub mod meta_info;
pub mod model;
pub mod network;

use fewshot_backbone::SharedFields;
pub use generators::{ExampleGenerator, TaskGenerator};
pub use hyperparams::{BaseLearner, MetaNetConfig};
pub use learner::MetaNetOriginal;
pub use model::MetaNetwork;
pub use network::{AugmentedNet, Fast};

/// The name of this algorithm in configs and checkpoints.
pub const ALGORITHM: &str = "metanet-original";

/// What this algorithm's section shares with the rest of an experiment
/// config: the images' shape, in the section itself, and a softmax head as
/// wide as the training episodes' way count and one as the test episodes'.
pub const SHARED_FIELDS: SharedFields = SharedFields {
    input: "",
    train_ways: Some("n_outputs_train"),
    test_ways: Some("n_outputs_test"),
};
