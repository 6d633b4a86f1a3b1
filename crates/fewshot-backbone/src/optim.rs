//! Adam with optional global gradient-norm clipping: the meta-optimiser of
//! every learner here. Its moments are part of a learner's state, so a resumed
//! run continues exactly where it stopped.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{BackboneError, Result};
use crate::learner::OPTIMIZER_PREFIX;
use crate::ops::path::to_host_f64;
use crate::params::{ParamSet, VarSet};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Rescale the gradients so their global L2 norm is at most this.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: None,
        }
    }
}

impl AdamConfig {
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("lr", self.lr, self.lr > 0.0),
            ("beta1", self.beta1, (0.0..1.0).contains(&self.beta1)),
            ("beta2", self.beta2, (0.0..1.0).contains(&self.beta2)),
            ("eps", self.eps, self.eps > 0.0),
            (
                "max_grad_norm",
                self.max_grad_norm.unwrap_or(1.0),
                self.max_grad_norm.is_none_or(|n| n > 0.0),
            ),
        ];
        for (field, value, ok) in checks {
            if !ok || value.is_nan() {
                return Err(BackboneError::InvalidConfig {
                    field,
                    value: value.to_string(),
                    reason: "out of range (lr, eps, max_grad_norm > 0; betas in [0, 1))".into(),
                });
            }
        }
        Ok(())
    }
}

/// A step schedule for the learning rate: multiplied by `factor` every
/// `every` optimiser steps (`every` = 0: constant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepDecay {
    pub every: u64,
    pub factor: f64,
}

impl StepDecay {
    /// Errors name `factor_field`, the factor's name in the caller's config.
    pub fn validate(&self, factor_field: &'static str) -> Result<()> {
        if !(self.factor > 0.0 && self.factor <= 1.0) {
            return Err(BackboneError::InvalidConfig {
                field: factor_field,
                value: self.factor.to_string(),
                reason: "must be in (0, 1]".into(),
            });
        }
        Ok(())
    }

    /// The learning rate after `step` optimiser steps, starting from `lr`.
    pub fn lr_at(&self, lr: f64, step: u64) -> f64 {
        match self.every {
            0 => lr,
            every => lr * self.factor.powi((step / every) as i32),
        }
    }
}

#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    steps: u64,
    first_moments: ParamSet,
    second_moments: ParamSet,
}

const STEPS: &str = "steps";
const FIRST: &str = "m.";
const SECOND: &str = "v.";

impl Adam {
    pub fn new(config: AdamConfig, weights: &VarSet) -> Result<Self> {
        config.validate()?;
        let zeros = |params: &ParamSet| -> Result<ParamSet> {
            let mut out = ParamSet::new();
            for (name, t) in params.iter() {
                out.insert(name, t.zeros_like()?.detach())?;
            }
            Ok(out)
        };
        let params = weights.as_params();
        Ok(Self {
            config,
            steps: 0,
            first_moments: zeros(&params)?,
            second_moments: zeros(&params)?,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Changes the learning rate, for schedules.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The learning rate the next step uses.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// One update of `weights` with `grads` (same names). Returns the global
    /// gradient norm before clipping.
    pub fn step(&mut self, weights: &VarSet, grads: &ParamSet) -> Result<f64> {
        // Gradients may carry their own graph (second-order mode): cut it, or
        // the moments would chain every step's graph together.
        let grads = grads.detach();
        let norm = global_norm(&grads)?;
        if !norm.is_finite() {
            return Err(BackboneError::Parameter {
                name: "gradients".into(),
                problem: format!("have a non-finite norm ({norm}); training diverged"),
            });
        }
        let scale = match self.config.max_grad_norm {
            Some(max) if norm > max => max / norm,
            _ => 1.0,
        };
        self.steps += 1;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        let mut first = ParamSet::new();
        let mut second = ParamSet::new();
        let mut updated = ParamSet::new();
        for (name, weight) in weights.as_params().iter() {
            let g = (grads.get(name)? * scale)?;
            let m = ((self.first_moments.get(name)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((self.second_moments.get(name)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let step = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + c.eps)?)?;
            updated.insert(name, (weight.detach() - (step * c.lr)?)?)?;
            first.insert(name, m)?;
            second.insert(name, v)?;
        }
        weights.set(&updated)?;
        self.first_moments = first;
        self.second_moments = second;
        Ok(norm)
    }

    /// The moments and step count, under [`OPTIMIZER_PREFIX`].
    pub fn state(&self) -> Result<ParamSet> {
        let mut state = ParamSet::new();
        // f64 for exactness, on the host: some devices (Metal) have no f64.
        state.insert(STEPS, Tensor::new(self.steps as f64, &Device::Cpu)?)?;
        state.extend(&self.first_moments.with_prefix(FIRST))?;
        state.extend(&self.second_moments.with_prefix(SECOND))?;
        Ok(state.with_prefix(OPTIMIZER_PREFIX))
    }

    /// Restores [`Adam::state`]; a state without optimiser entries keeps the
    /// fresh optimiser (a published model carries weights only).
    pub fn load_state(&mut self, state: &ParamSet) -> Result<()> {
        if !state
            .names()
            .iter()
            .any(|n| n.starts_with(OPTIMIZER_PREFIX))
        {
            return Ok(());
        }
        let steps = to_host_f64(state.get(&format!("{OPTIMIZER_PREFIX}{STEPS}"))?)?;
        let first = format!("{OPTIMIZER_PREFIX}{FIRST}");
        let second = format!("{OPTIMIZER_PREFIX}{SECOND}");
        self.first_moments = self.first_moments.read_from(state, &first)?;
        self.second_moments = self.second_moments.read_from(state, &second)?;
        self.steps = steps as u64;
        Ok(())
    }
}

/// A learner's resumable state: its weights, then the optimiser's entries.
pub fn training_state(weights: &VarSet, optimizer: &Adam) -> Result<ParamSet> {
    let mut state = weights.as_params().detach();
    state.extend(&optimizer.state()?)?;
    Ok(state)
}

/// Restores [`training_state`] (optimiser entries optional).
pub fn load_training_state(weights: &VarSet, optimizer: &mut Adam, state: &ParamSet) -> Result<()> {
    weights.set(state)?;
    optimizer.load_state(state)
}

/// L2 norm of all the tensors together.
pub fn global_norm(tensors: &ParamSet) -> Result<f64> {
    let mut total = 0.0;
    for t in tensors.tensors() {
        total += to_host_f64(&t.sqr()?.sum_all()?)?;
    }
    Ok(total.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn weights(values: &[f64]) -> VarSet {
        let mut p = ParamSet::new();
        p.insert("w", Tensor::new(values, &Device::Cpu).unwrap())
            .unwrap();
        p.to_vars().unwrap()
    }

    fn grads(values: &[f64]) -> ParamSet {
        let mut g = ParamSet::new();
        g.insert("w", Tensor::new(values, &Device::Cpu).unwrap())
            .unwrap();
        g
    }

    fn value(w: &VarSet) -> Vec<f64> {
        w.as_params().get("w").unwrap().to_vec1().unwrap()
    }

    #[test]
    fn step_decay_multiplies_once_per_period_and_checks_its_factor() {
        let halving = StepDecay {
            every: 2000,
            factor: 0.5,
        };
        let lrs: Vec<f64> = [0, 1999, 2000, 4500]
            .map(|step| halving.lr_at(1e-3, step))
            .into();
        assert_eq!(lrs, [1e-3, 1e-3, 5e-4, 2.5e-4]);
        let constant = StepDecay {
            every: 0,
            ..halving
        };
        assert_eq!(constant.lr_at(1e-3, 1_000_000), 1e-3);
        halving.validate("f").unwrap();
        for factor in [0.0, 1.5, f64::NAN] {
            let err = StepDecay { factor, ..halving }
                .validate("lr_decay_factor")
                .unwrap_err();
            assert!(err.to_string().contains("lr_decay_factor"), "{err}");
        }
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let w = weights(&[1.0, 1.0]);
        let mut adam = Adam::new(
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
            &w,
        )
        .unwrap();
        adam.step(&w, &grads(&[3.0, -0.5])).unwrap();
        let v = value(&w);
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] - 1.1).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn clipping_rescales_to_the_maximum_norm() {
        let w = weights(&[0.0, 0.0]);
        let config = AdamConfig {
            max_grad_norm: Some(1.0),
            ..Default::default()
        };
        let mut adam = Adam::new(config, &w).unwrap();
        let norm = adam.step(&w, &grads(&[3.0, 4.0])).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        // The stored first moment is (1 - beta1) times the clipped gradient.
        let m: Vec<f64> = adam
            .state()
            .unwrap()
            .get("optimizer.m.w")
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (m[0] - 0.1 * 0.6).abs() < 1e-12 && (m[1] - 0.1 * 0.8).abs() < 1e-12,
            "{m:?}"
        );
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let run = |restore_midway: bool| -> Vec<f64> {
            let w = weights(&[0.5, -0.5]);
            let mut adam = Adam::new(AdamConfig::default(), &w).unwrap();
            for step in 0..6 {
                if restore_midway && step == 3 {
                    let saved = adam.state().unwrap();
                    adam = Adam::new(AdamConfig::default(), &w).unwrap();
                    adam.load_state(&saved).unwrap();
                }
                let g = value(&w).iter().map(|x| 2.0 * x).collect::<Vec<_>>();
                adam.step(&w, &grads(&g)).unwrap();
            }
            value(&w)
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn bad_settings_and_divergence_are_named() {
        let w = weights(&[0.0]);
        let err = Adam::new(
            AdamConfig {
                lr: 0.0,
                ..Default::default()
            },
            &w,
        )
        .unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        let mut adam = Adam::new(AdamConfig::default(), &w).unwrap();
        let err = adam.step(&w, &grads(&[f64::NAN])).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }
}
