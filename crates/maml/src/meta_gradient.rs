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

use candle_core::{DType, Tensor};
use fewshot_backbone::{ops, Conv4, ParamSet, Result, VarSet};

use crate::hyperparams::{Order, QueryNormalisation};
use crate::inner_loop::{is_adapted, query_logits, support_loss, InnerLoop};

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
    /// d(query loss)/d(initial weights), named as the weights.
    pub gradient: ParamSet,
    pub query_loss: f64,
    /// Query logits of the adapted network (no graph).
    pub query_logits: Tensor,
}

/// The query loss of `params` adapted to the task's support set by `inner`,
/// and its gradient with respect to `params`: exact with [`Order::Second`],
/// first-order (inner gradients held constant) with [`Order::First`].
pub fn meta_gradient(
    net: &Conv4,
    params: &ParamSet,
    task: &Task<'_>,
    inner: &InnerLoop,
    normalisation: QueryNormalisation,
) -> Result<MetaGradient> {
    let mut adapted = ParamSet::new();
    let mut fixed = ParamSet::new();
    for (name, tensor) in params.iter() {
        match is_adapted(name, inner.adapt) {
            true => adapted.insert(name, tensor.detach())?,
            false => fixed.insert(name, tensor.detach())?,
        }
    }

    // Each step's support gradient, kept with its graph (at its own leaves)
    // for the Hessian-vector product of the backward sweep.
    let mut steps = Vec::with_capacity(inner.steps);
    for _ in 0..inner.steps {
        let (gradient, leaves) = support_gradient(net, &adapted, &fixed, task)?;
        adapted = adapted.sgd_step(&gradient.detach(), inner.lr)?;
        if inner.order == Order::Second {
            steps.push((gradient, leaves));
        }
    }

    let (adapted_vars, fixed_vars) = (adapted.to_vars()?, fixed.to_vars()?);
    let weights = joined(&adapted_vars, &fixed_vars)?;
    let logits = query_logits(net, &weights, task.support, task.query, normalisation)?;
    let loss = ops::cross_entropy(&logits, task.query_labels)?;
    let grads = loss.backward()?;
    let mut v_adapted = adapted_vars.gradients(&grads)?.detach();
    let mut v_fixed = fixed_vars.gradients(&grads)?.detach();

    for (gradient, leaves) in steps.iter().rev() {
        let mut dot = Tensor::zeros((), loss.dtype(), loss.device())?;
        for ((_, g), (_, v)) in gradient.iter().zip(v_adapted.iter()) {
            dot = (dot + (g * v)?.sum_all()?)?;
        }
        let products = dot.backward()?;
        let h_fixed = leaves.fixed.gradients(&products)?.detach();
        let h_adapted = leaves.adapted.gradients(&products)?.detach();
        v_fixed = v_fixed.add_scaled(&h_fixed, -inner.lr)?;
        v_adapted = v_adapted.add_scaled(&h_adapted, -inner.lr)?;
    }

    let mut gradient = ParamSet::new();
    for (name, _) in params.iter() {
        let g = match is_adapted(name, inner.adapt) {
            true => v_adapted.get(name)?,
            false => v_fixed.get(name)?,
        };
        gradient.insert(name, g.clone())?;
    }
    Ok(MetaGradient {
        gradient,
        query_loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        query_logits: logits.detach(),
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
