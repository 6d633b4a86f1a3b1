//! The inner loop: a few SGD steps on a task's support set, run functionally
//! on a parameter set so that the query loss stays a differentiable function
//! of the initial weights.

use candle_core::Tensor;
use fewshot_backbone::{ops, Conv4, ParamSet, Result};

use crate::hyperparams::{Adapt, Order, QueryNormalisation};

#[derive(Debug, Clone, Copy)]
pub struct InnerLoop {
    pub lr: f64,
    pub steps: usize,
    pub order: Order,
    pub adapt: Adapt,
}

/// Whether the inner loop adapts the weight `name`. Batch norm's weights
/// are meta-learned but not adapted, as in the reference code.
pub fn is_adapted(name: &str, adapt: Adapt) -> bool {
    match adapt {
        Adapt::All => !name.contains(".bn."),
        Adapt::Head => name.starts_with("head."),
    }
}

/// The support loss as the reference code divides it: per-example
/// cross-entropy summed over the support set and divided by the shots, which
/// is `ways` times the mean. The paper's inner learning rates (0.4 for
/// 5-way Omniglot) are tuned for this scale.
pub fn support_loss(logits: &Tensor, labels: &Tensor, shots: usize) -> Result<Tensor> {
    let examples = labels.elem_count();
    Ok((ops::cross_entropy(logits, labels)? * (examples as f64 / shots as f64))?)
}

/// The query logits of the network at (adapted) `weights`, batch norm taking
/// the statistics `normalisation` names.
pub fn query_logits(
    net: &Conv4,
    weights: &ParamSet,
    support: &Tensor,
    query: &Tensor,
    normalisation: QueryNormalisation,
) -> Result<Tensor> {
    match normalisation {
        QueryNormalisation::Batch => net.forward(weights, query),
        QueryNormalisation::Support => net.forward_normalised_by(weights, support, query),
    }
}

/// `params` adapted to the support set by `inner.steps` SGD steps.
///
/// With [`Order::Second`] every inner gradient keeps its graph, so a loss on
/// the result differentiates through the whole loop; with [`Order::First`]
/// the inner gradients are constants and each step backpropagates through
/// itself only.
pub fn adapt(
    net: &Conv4,
    params: &ParamSet,
    support: &Tensor,
    labels: &Tensor,
    shots: usize,
    inner: &InnerLoop,
) -> Result<ParamSet> {
    let mut adapted = ParamSet::new();
    let mut fixed = ParamSet::new();
    for (name, tensor) in params.iter() {
        match is_adapted(name, inner.adapt) {
            true => adapted.insert(name, tensor.clone())?,
            false => fixed.insert(name, tensor.clone())?,
        }
    }
    for _ in 0..inner.steps {
        let start = match inner.order {
            Order::Second => adapted.clone(),
            Order::First => adapted.detach(),
        };
        let (probed, probes) = start.probed()?;
        let mut full = fixed.clone();
        full.extend(&probed)?;
        let loss = support_loss(&net.forward(&full, support)?, labels, shots)?;
        let grads = probes.gradients(&loss.backward()?)?;
        let grads = match inner.order {
            Order::Second => grads,
            Order::First => grads.detach(),
        };
        adapted = adapted.sgd_step(&grads, inner.lr)?;
    }
    fixed.extend(&adapted)?;
    Ok(fixed)
}
