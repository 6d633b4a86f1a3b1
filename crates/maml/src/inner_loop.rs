//! The inner loop: a few SGD steps on a task's support set, run functionally
//! on a parameter set so that the query loss stays a differentiable function
//! of the initial weights.

use candle_core::Tensor;
use fewshot_backbone::{ops, Conv4, ParamSet, Result};

use crate::hyperparams::{Adapt, Order, QueryNormalisation};

#[derive(Debug, Clone, Copy)]
pub struct InnerLoop {
    /// The step size, unless `learned_rates`.
    pub lr: f64,
    pub steps: usize,
    pub order: Order,
    pub adapt: Adapt,
    /// MAML++'s per-layer per-step learning rates: the step size of weight
    /// `w` at step `k` is element `k` of the parameter [`rate_name`]`(w)`,
    /// itself meta-learned.
    pub learned_rates: bool,
}

/// Names of the learned inner step sizes start with this.
pub const RATE_PREFIX: &str = "inner_lr.";

/// The name of weight `name`'s learned inner step sizes (one a step).
pub fn rate_name(name: &str) -> String {
    format!("{RATE_PREFIX}{name}")
}

/// Whether the inner loop adapts the weight `name`. Batch norm's weights
/// are meta-learned but not adapted, as in the reference code; nor are the
/// learned step sizes.
pub fn is_adapted(name: &str, adapt: Adapt) -> bool {
    if name.starts_with(RATE_PREFIX) {
        return false;
    }
    match adapt {
        Adapt::All => !name.contains(".bn."),
        Adapt::Head => name.starts_with("head."),
    }
}

/// The parameters split into (adapted, fixed, learned step sizes).
pub fn split(params: &ParamSet, adapt: Adapt) -> Result<(ParamSet, ParamSet, ParamSet)> {
    let (mut adapted, mut fixed, mut rates) = (ParamSet::new(), ParamSet::new(), ParamSet::new());
    for (name, tensor) in params.iter() {
        let group = if name.starts_with(RATE_PREFIX) {
            &mut rates
        } else if is_adapted(name, adapt) {
            &mut adapted
        } else {
            &mut fixed
        };
        group.insert(name, tensor.clone())?;
    }
    Ok((adapted, fixed, rates))
}

/// `weights - rate * grads`, with inner step `step`'s step size for each
/// weight: the shared `inner.lr`, or the learned one (kept in the graph, so
/// that a loss on the result differentiates the step sizes too).
pub fn inner_step(
    weights: &ParamSet,
    grads: &ParamSet,
    rates: &ParamSet,
    inner: &InnerLoop,
    step: usize,
) -> Result<ParamSet> {
    if !inner.learned_rates {
        return weights.sgd_step(grads, inner.lr);
    }
    let mut out = ParamSet::new();
    for (name, weight) in weights.iter() {
        let rate = step_rate(rates, name, step)?;
        out.insert(name, (weight - grads.get(name)?.broadcast_mul(&rate)?)?)?;
    }
    Ok(out)
}

/// MAML++'s per-step batch norm weights are stored as `NAME.stepK`, one copy
/// for each inner step K; the network reads step K's copy as `NAME`.
pub const STEP_MARK: &str = ".step";

/// The name of weight `name`'s copy for inner step `step`.
pub fn per_step_name(name: &str, step: usize) -> String {
    format!("{name}{STEP_MARK}{step}")
}

/// The weights the network reads at inner step `step`: each per-step
/// weight's copy of that step under its plain name (the other steps' left
/// out), every other weight as it is.
pub fn at_step(params: &ParamSet, step: usize) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, tensor) in params.iter() {
        let copy_of = name
            .rsplit_once(STEP_MARK)
            .and_then(|(plain, k)| Some((plain, k.parse::<usize>().ok()?)));
        match copy_of {
            Some((plain, k)) if k == step => out.insert(plain, tensor.clone())?,
            Some(_) => {}
            None => out.insert(name, tensor.clone())?,
        }
    }
    Ok(out)
}

/// Gradients named as the network reads the weights at `step` renamed to
/// the stored names of `stored` (per-step weights to their step's copy).
pub fn stored_names(grads: &ParamSet, stored: &ParamSet, step: usize) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, grad) in grads.iter() {
        let copy = per_step_name(name, step);
        match stored.contains(&copy) {
            true => out.insert(copy, grad.clone())?,
            false => out.insert(name, grad.clone())?,
        }
    }
    Ok(out)
}

/// The learned step size of weight `name` at inner step `step`, as a scalar.
pub fn step_rate(rates: &ParamSet, name: &str, step: usize) -> Result<Tensor> {
    Ok(rates.get(&rate_name(name))?.get(step)?)
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
    let (mut adapted, fixed, rates) = split(params, inner.adapt)?;
    for step in 0..inner.steps {
        let start = match inner.order {
            Order::Second => adapted.clone(),
            Order::First => adapted.detach(),
        };
        let (probed, probes) = start.probed()?;
        let mut full = at_step(&fixed, step)?;
        full.extend(&probed)?;
        let loss = support_loss(&net.forward(&full, support)?, labels, shots)?;
        let grads = probes.gradients(&loss.backward()?)?;
        let grads = match inner.order {
            Order::Second => grads,
            Order::First => grads.detach(),
        };
        adapted = inner_step(&adapted, &grads, &rates, inner, step)?;
    }
    // The queries go through the batch norm of the last step taken.
    let mut weights = at_step(&fixed, inner.steps.saturating_sub(1))?;
    weights.extend(&adapted)?;
    Ok(weights)
}
