//! The meta-gradient of one task, accumulated backwards through the inner
//! loop one Hessian-vector product at a time.
//!
//! Backpropagating through the unrolled loop (what [`crate::adapt`] allows)
//! costs O(K^2) in candle for K inner steps: candle's backward visits every
//! node that leads to a leaf, so the gradient of step k re-traverses the
//! graphs of all the steps before it. Here each inner step computes its
//! support gradient at fresh leaves holding a_k (keeping that one step's
//! graph) and steps on without a graph; then, with `a` the adapted weights,
//! `f` the fixed ones (batch norm's) and `v = grad L_query(a_K, f)`, for
//! k = K-1 down to 0:
//!
//! ```text
//! v_f <- v_f - lr * H_fa(a_k) v_a
//! v_a <- v_a - lr * H_aa(a_k) v_a
//! ```
//!
//! where H is the Hessian of the support loss at (a_k, f). That is the chain
//! rule through `a_{k+1} = a_k - lr * grad_a L_support(a_k, f)`, so the result
//! is the exact second-order meta-gradient; each product differentiates a
//! kept support gradient once more, so every step costs the same. First
//! order keeps no graphs and stops after the query gradient.
//!
//! With MAML++'s multi-step loss the meta-loss is `sum_k w_k L_query(a_k)`
//! over the steps' results a_1..a_K: the sweep then adds `w_k grad
//! L_query(a_k)` to `v` when it reaches a_k. With its learned step sizes
//! (`a_(k+1) = a_k - r_k g_k`, one r per weight tensor and step) `lr` above
//! becomes `r_k` inside the product, and `d/dr_k = -<g_k, v>` with `v` at
//! a_(k+1).

use candle_core::Tensor;
use fewshot_backbone::{ops, BackboneError, Conv4, ParamSet, Result, VarSet};

use crate::hyperparams::{Order, QueryNormalisation};
use crate::inner_loop::{
    at_step, inner_step, is_adapted, query_logits, split, step_rate, stored_names, support_loss,
    InnerLoop, RATE_PREFIX,
};

/// One task's images and labels.
pub struct Task<'a> {
    pub support: &'a Tensor,
    pub support_labels: &'a Tensor,
    /// Support examples per class (the inner loss is divided by it).
    pub shots: usize,
    pub query: &'a Tensor,
    pub query_labels: &'a Tensor,
}

/// What one task contributes to a meta-training step.
pub struct MetaGradient {
    /// d(meta-loss)/d(initial weights), named as the weights.
    pub gradient: ParamSet,
    /// The meta-loss: the weighted query losses.
    pub query_loss: f64,
    /// Query logits of the network after the last inner step (no graph).
    pub query_logits: Tensor,
}

/// The meta-loss of `params` adapted to the task's support set by `inner`,
/// and its gradient with respect to `params`: exact with [`Order::Second`],
/// first-order (inner gradients held constant) with [`Order::First`]. The
/// meta-loss is the query loss after each inner step weighted by
/// `query_weights` (one a step; plain MAML's are 0, ..., 0, 1, see
/// [`crate::multi_step_loss::query_loss_weights`]).
pub fn meta_gradient(
    net: &Conv4,
    params: &ParamSet,
    task: &Task<'_>,
    inner: &InnerLoop,
    normalisation: QueryNormalisation,
    query_weights: &[f64],
) -> Result<MetaGradient> {
    if query_weights.len() != inner.steps || inner.steps == 0 {
        return Err(BackboneError::InvalidConfig {
            field: "query_weights",
            value: format!("{query_weights:?}"),
            reason: format!(
                "needs one weight for each of the {} inner steps",
                inner.steps
            ),
        });
    }
    let (adapted, fixed, rates) = split(&params.detach(), inner.adapt)?;
    let mut adapted = adapted;

    // Each step's support gradient, kept with its graph (at its own leaves)
    // for the Hessian-vector product of the backward sweep (and its values,
    // for the step sizes' gradients); and the weighted query loss gradients
    // of the steps before the last, where they count.
    let mut steps = Vec::with_capacity(inner.steps);
    let mut support_grads = Vec::with_capacity(inner.steps);
    let mut earlier_terms = Vec::with_capacity(inner.steps);
    let mut earlier_loss = 0.0;
    let last = inner.steps - 1;
    for (k, &weight) in query_weights.iter().enumerate() {
        let fixed_k = at_step(&fixed, k)?;
        let (gradient, leaves) = support_gradient(net, &adapted, &fixed_k, task)?;
        adapted = inner_step(&adapted, &gradient.detach(), &rates, inner, k)?;
        if inner.learned_rates {
            support_grads.push(gradient.detach());
        }
        if inner.order == Order::Second {
            steps.push((gradient, leaves));
        }
        let term = if k < last && weight != 0.0 {
            let mut term = query_term(net, &adapted, &fixed_k, task, normalisation, weight)?;
            term.fixed = stored_names(&term.fixed, &fixed, k)?;
            earlier_loss += term.loss;
            Some(term)
        } else {
            None
        };
        earlier_terms.push(term);
    }

    let QueryTerm {
        loss,
        logits,
        adapted: mut v_adapted,
        fixed: last_fixed,
    } = query_term(
        net,
        &adapted,
        &at_step(&fixed, last)?,
        task,
        normalisation,
        query_weights[last],
    )?;
    let mut v_fixed = with_zeros_for_missing(&stored_names(&last_fixed, &fixed, last)?, &fixed)?;

    // d(meta-loss)/d r_k of each adapted weight's step sizes, last step
    // first (`v_adapted` keeps the adapted weights' order).
    let mut rate_grads: Vec<(String, Vec<Tensor>)> = adapted
        .names()
        .iter()
        .map(|name| (name.clone(), Vec::new()))
        .collect();
    // Step k took a_k to a_(k+1); `v` is d(meta-loss)/d a_(k+1) here.
    for k in (0..inner.steps).rev() {
        if let Some(grads) = support_grads.get(k) {
            for ((_, per_step), (name, v)) in rate_grads.iter_mut().zip(v_adapted.iter()) {
                per_step.push((grads.get(name)? * v)?.sum_all()?.neg()?);
            }
        }
        if let Some((gradient, leaves)) = steps.get(k) {
            let mut dot = Tensor::zeros((), logits.dtype(), logits.device())?;
            for ((name, g), (_, v)) in gradient.iter().zip(v_adapted.iter()) {
                let gv = (g * v)?.sum_all()?;
                // Shared: lr scales the products below, as it always did.
                let term = match inner.learned_rates {
                    true => (gv * step_rate(&rates, name, k)?)?,
                    false => gv,
                };
                dot = (dot + term)?;
            }
            let products = dot.backward()?;
            let h_fixed = leaves.fixed.gradients(&products)?.detach();
            let h_fixed = stored_names(&h_fixed, &fixed, k)?;
            let h_adapted = leaves.adapted.gradients(&products)?.detach();
            let factor = if inner.learned_rates { -1.0 } else { -inner.lr };
            v_fixed = add_matching(&v_fixed, &h_fixed, factor)?;
            v_adapted = v_adapted.add_scaled(&h_adapted, factor)?;
        }
        // The query loss at a_k, the result of step k - 1.
        if let Some(Some(term)) = k.checked_sub(1).map(|before| &earlier_terms[before]) {
            v_fixed = add_matching(&v_fixed, &term.fixed, 1.0)?;
            v_adapted = v_adapted.add_scaled(&term.adapted, 1.0)?;
        }
    }

    let mut gradient = ParamSet::new();
    for (name, tensor) in params.iter() {
        let g = if let Some(weight) = name.strip_prefix(RATE_PREFIX) {
            rate_gradient(&rate_grads, weight, tensor)?
        } else if is_adapted(name, inner.adapt) {
            v_adapted.get(name)?.clone()
        } else {
            v_fixed.get(name)?.clone()
        };
        gradient.insert(name, g)?;
    }
    Ok(MetaGradient {
        gradient,
        query_loss: earlier_loss + loss,
        query_logits: logits,
    })
}

/// `grads` with a zero gradient for each of `all`'s names it lacks (the
/// per-step weights of steps the last query did not use), in `all`'s order.
fn with_zeros_for_missing(grads: &ParamSet, all: &ParamSet) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, tensor) in all.iter() {
        let grad = match grads.contains(name) {
            true => grads.get(name)?.clone(),
            false => tensor.zeros_like()?,
        };
        out.insert(name, grad)?;
    }
    Ok(out)
}

/// `v + factor * other` where `other` has the name, `v` elsewhere (one
/// step's gradient reaches only that step's per-step weights).
fn add_matching(v: &ParamSet, other: &ParamSet, factor: f64) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, tensor) in v.iter() {
        let sum = match other.contains(name) {
            true => (tensor + (other.get(name)? * factor)?)?,
            false => tensor.clone(),
        };
        out.insert(name, sum)?;
    }
    Ok(out)
}

/// The gradient of the step sizes of `weight` (shaped as `rates`): the
/// sweep's per-step values, collected last step first; zero for steps the
/// loop did not take.
fn rate_gradient(
    rate_grads: &[(String, Vec<Tensor>)],
    weight: &str,
    rates: &Tensor,
) -> Result<Tensor> {
    let Some((_, last_first)) = rate_grads.iter().find(|(n, _)| n == weight) else {
        return Ok(rates.zeros_like()?);
    };
    let mut per_step: Vec<Tensor> = last_first.iter().rev().cloned().collect();
    let zero = Tensor::zeros((), rates.dtype(), rates.device())?;
    per_step.resize(rates.elem_count(), zero);
    Ok(Tensor::stack(&per_step, 0)?)
}

/// One step's weighted query loss and its gradient at (adapted, fixed).
struct QueryTerm {
    loss: f64,
    logits: Tensor,
    adapted: ParamSet,
    fixed: ParamSet,
}

fn query_term(
    net: &Conv4,
    adapted: &ParamSet,
    fixed: &ParamSet,
    task: &Task<'_>,
    normalisation: QueryNormalisation,
    weight: f64,
) -> Result<QueryTerm> {
    let (adapted_vars, fixed_vars) = (adapted.to_vars()?, fixed.to_vars()?);
    let weights = joined(&adapted_vars, &fixed_vars)?;
    let logits = query_logits(net, &weights, task.support, task.query, normalisation)?;
    let mut loss = ops::cross_entropy(&logits, task.query_labels)?;
    // Plain MAML's single weight of 1 scales nothing, so its gradient stays
    // bit for bit what it was before the multi-step loss existed.
    if weight != 1.0 {
        loss = (loss * weight)?;
    }
    let grads = loss.backward()?;
    Ok(QueryTerm {
        loss: ops::path::to_host_f64(&loss)?,
        logits: logits.detach(),
        adapted: adapted_vars.gradients(&grads)?.detach(),
        fixed: fixed_vars.gradients(&grads)?.detach(),
    })
}

/// The weights as fresh leaves.
struct Leaves {
    adapted: VarSet,
    fixed: VarSet,
}

/// The support-loss gradient with respect to the adapted weights, computed at
/// fresh leaves (also returned) so that it can be differentiated again.
fn support_gradient(
    net: &Conv4,
    adapted: &ParamSet,
    fixed: &ParamSet,
    task: &Task<'_>,
) -> Result<(ParamSet, Leaves)> {
    let leaves = Leaves {
        adapted: adapted.to_vars()?,
        fixed: fixed.to_vars()?,
    };
    let weights = joined(&leaves.adapted, &leaves.fixed)?;
    let logits = net.forward(&weights, task.support)?;
    let loss = support_loss(&logits, task.support_labels, task.shots)?;
    let gradient = leaves.adapted.gradients(&loss.backward()?)?;
    Ok((gradient, leaves))
}

fn joined(adapted: &VarSet, fixed: &VarSet) -> Result<ParamSet> {
    let mut all = fixed.as_params();
    all.extend(&adapted.as_params())?;
    Ok(all)
}
