//! MAML (Finn, Abbeel & Levine 2017): learn an initialisation from which a
//! few steps of gradient descent on a task's support set fit the task.
//!
//! - [`inner_loop::adapt`] runs the conv-4 backbone functionally on adapted
//!   weights: K SGD steps on the support loss.
//! - Second order ([`Order::Second`]) differentiates the query loss through
//!   every inner step (gradients of gradients); first order drops those
//!   terms; [`Adapt::Head`] adapts the classifier only (ANIL).
//! - MAML++ options (Antoniou et al. 2019): [`MultiStepLoss`], the query
//!   loss after every inner step, annealed toward the last; learned
//!   per-layer per-step inner step sizes (`InnerLoop::learned_rates`);
//!   [`CosineAnnealing`] of the meta learning rate; first order for the
//!   first epochs (`MamlConfig::first_order_epochs`).
//! - [`Maml`] is the meta-learner behind the shared `Learner` trait.

pub mod cosine_annealing;
pub mod hyperparams;
pub mod inner_loop;
pub mod learner;
pub mod meta_gradient;
pub mod multi_step_loss;

pub use cosine_annealing::CosineAnnealing;
use fewshot_backbone::SharedFields;
pub use hyperparams::{Adapt, MamlConfig, Order, QueryNormalisation};
pub use inner_loop::{adapt, InnerLoop};
pub use learner::Maml;
pub use meta_gradient::{meta_gradient, MetaGradient, Task};
pub use multi_step_loss::{query_loss_weights, MultiStepLoss};

/// The name of this algorithm in configs and checkpoints.
pub const ALGORITHM: &str = "maml";

/// What this algorithm's section shares with the rest of an experiment
/// config: the images' shape, in `network`, and `ways`, the classifier's
/// width, which is the training and the test episodes' way count.
pub const SHARED_FIELDS: SharedFields = SharedFields {
    input: "/network",
    train_ways: Some("ways"),
    test_ways: Some("ways"),
};
