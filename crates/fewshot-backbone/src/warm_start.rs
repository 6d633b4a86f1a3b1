//! Starting a learner from another model's weights, for instance a 20-way
//! model from a trained 5-way one: the tensors whose names and shapes match
//! are copied, the others keep their fresh initialisation (the output heads
//! whose way count differs), and the optimiser starts fresh.

use crate::checkpoint::Checkpoint;
use crate::error::{BackboneError, Result};
use crate::learner::{Learner, OPTIMIZER_PREFIX};
use crate::params::ParamSet;

/// What [`warm_start`] copied and what it left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WarmStart {
    /// Weights taken from the checkpoint.
    pub copied: Vec<String>,
    /// Weights that kept their fresh values, each with the reason.
    pub kept_fresh: Vec<String>,
    /// Weights of the checkpoint the learner has no place for.
    pub unused: Vec<String>,
}

/// Overwrites the learner's weights with those of `source` that fit.
///
/// Fails if `source` is of another algorithm or if no weight fits at all
/// (a different network size, say), since either is surely a mistake.
pub fn warm_start(learner: &mut dyn Learner, source: &Checkpoint) -> Result<WarmStart> {
    if source.algorithm != learner.algorithm() {
        return Err(BackboneError::InvalidConfig {
            field: "init_from",
            value: source.algorithm.clone(),
            reason: format!(
                "the checkpoint is of the algorithm `{}`, the learner is `{}`",
                source.algorithm,
                learner.algorithm()
            ),
        });
    }
    let is_weight = |name: &str| !name.starts_with(OPTIMIZER_PREFIX);
    let fresh = learner.state()?;
    let mut merged = ParamSet::new();
    let mut report = WarmStart::default();
    for (name, tensor) in fresh.iter().filter(|(name, _)| is_weight(name)) {
        let value = if !source.tensors.contains(name) {
            report
                .kept_fresh
                .push(format!("{name} (not in the checkpoint)"));
            // A copy: candle refuses to set a variable from its own storage.
            tensor.copy()?
        } else {
            let theirs = source.tensors.get(name)?;
            if theirs.dims() == tensor.dims() {
                report.copied.push(name.to_string());
                theirs.clone()
            } else {
                report.kept_fresh.push(format!(
                    "{name} (shape {:?}, {:?} in the checkpoint)",
                    tensor.dims(),
                    theirs.dims()
                ));
                tensor.copy()?
            }
        };
        merged.insert(name, value)?;
    }
    report.unused = source
        .tensors
        .names()
        .iter()
        .filter(|name| is_weight(name) && !fresh.contains(name))
        .cloned()
        .collect();
    if report.copied.is_empty() {
        return Err(BackboneError::InvalidConfig {
            field: "init_from",
            value: source.algorithm.clone(),
            reason: format!(
                "no weight of the checkpoint fits the learner (kept fresh: {})",
                report.kept_fresh.join(", ")
            ),
        });
    }
    // Without optimiser entries the learner's optimiser starts fresh.
    learner.load_state(&merged)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::{EpisodeTensors, StepStats};
    use crate::params::VarSet;
    use candle_core::{Device, Tensor};

    /// A learner that is only its weights: a shared body and a head with a
    /// row per way.
    struct Weights {
        algorithm: &'static str,
        weights: VarSet,
    }

    impl Weights {
        fn new(algorithm: &'static str, ways: usize, fill: f32) -> Self {
            let mut p = ParamSet::new();
            p.insert("body", Tensor::full(fill, 3, &Device::Cpu).unwrap())
                .unwrap();
            p.insert("head", Tensor::full(fill, (ways, 2), &Device::Cpu).unwrap())
                .unwrap();
            Self {
                algorithm,
                weights: p.to_vars().unwrap(),
            }
        }

        fn values(&self, name: &str) -> Vec<f32> {
            let p = self.weights.as_params();
            p.get(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        }
    }

    impl Learner for Weights {
        fn algorithm(&self) -> &'static str {
            self.algorithm
        }
        fn config(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn meta_train(&mut self, _: &[EpisodeTensors]) -> Result<StepStats> {
            unreachable!("not trained here")
        }
        fn predict(&self, _: &EpisodeTensors) -> Result<Tensor> {
            unreachable!("not evaluated here")
        }
        fn state(&self) -> Result<ParamSet> {
            let mut state = self.weights.as_params().detach();
            // Stands for an optimiser's moments, which must not be carried over.
            state.insert(
                format!("{OPTIMIZER_PREFIX}m.body"),
                Tensor::full(9f32, 3, &Device::Cpu)?,
            )?;
            Ok(state)
        }
        fn load_state(&mut self, state: &ParamSet) -> Result<()> {
            assert!(
                state
                    .names()
                    .iter()
                    .all(|n| !n.starts_with(OPTIMIZER_PREFIX)),
                "optimiser state was carried over"
            );
            self.weights.set(state)
        }
    }

    #[test]
    fn matching_weights_are_copied_and_other_heads_keep_their_values() {
        let trained = Weights::new("a", 5, 1.0);
        let mut source = trained.checkpoint().unwrap();
        source
            .tensors
            .insert(
                "extra",
                Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let mut learner = Weights::new("a", 20, 0.0);
        let report = warm_start(&mut learner, &source).unwrap();
        assert_eq!(report.copied, vec!["body".to_string()]);
        assert_eq!(report.kept_fresh.len(), 1);
        assert!(
            report.kept_fresh[0].contains("head") && report.kept_fresh[0].contains("[5, 2]"),
            "{:?}",
            report.kept_fresh
        );
        assert_eq!(report.unused, vec!["extra".to_string()]);
        assert_eq!(learner.values("body"), vec![1.0; 3]);
        assert_eq!(learner.values("head"), vec![0.0; 40]);
    }

    #[test]
    fn another_algorithm_or_nothing_that_fits_is_refused() {
        let source = Weights::new("a", 5, 1.0).checkpoint().unwrap();
        let err = warm_start(&mut Weights::new("b", 5, 0.0), &source)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`a`") && err.contains("`b`"), "{err}");

        let mut unrelated = source.clone();
        unrelated.tensors = ParamSet::new();
        unrelated
            .tensors
            .insert(
                "body",
                Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let mut learner = Weights::new("a", 5, 0.5);
        let err = warm_start(&mut learner, &unrelated)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no weight") && err.contains("body"), "{err}");
        assert_eq!(
            learner.values("body"),
            vec![0.5; 3],
            "a refused start changes nothing"
        );
    }
}
