//! Several checkpoints of one run evaluated as one learner, as MAML++'s
//! reference code tests: the logits of its five best checkpoints by
//! validation accuracy, averaged, predict each query.

use candle_core::Tensor;
use fewshot_backbone::{BackboneError, EpisodeTensors, Learner, ParamSet, StepStats};

/// Learners whose averaged logits are the prediction. For evaluation only:
/// it cannot be trained or saved, since its members are checkpoints.
pub struct Ensemble {
    members: Vec<Box<dyn Learner>>,
}

impl Ensemble {
    /// Refuses an empty list and learners of different algorithms.
    pub fn new(members: Vec<Box<dyn Learner>>) -> fewshot_backbone::Result<Self> {
        let Some(first) = members.first() else {
            return Err(BackboneError::InvalidConfig {
                field: "ensemble",
                value: "no members".into(),
                reason: "an ensemble needs at least one learner".into(),
            });
        };
        let algorithm = first.algorithm();
        if let Some(other) = members.iter().find(|m| m.algorithm() != algorithm) {
            return Err(BackboneError::InvalidConfig {
                field: "ensemble",
                value: format!("{algorithm} and {}", other.algorithm()),
                reason: "the members of an ensemble must be of one algorithm".into(),
            });
        }
        Ok(Self { members })
    }

    fn evaluation_only(what: &str) -> BackboneError {
        BackboneError::InvalidConfig {
            field: "ensemble",
            value: what.into(),
            reason: "an ensemble of checkpoints is evaluated, not trained or saved".into(),
        }
    }
}

impl Learner for Ensemble {
    fn algorithm(&self) -> &'static str {
        self.members[0].algorithm()
    }

    /// The first member's config: the members differ only in their weights.
    fn config(&self) -> serde_json::Value {
        self.members[0].config()
    }

    fn meta_train(&mut self, _batch: &[EpisodeTensors]) -> fewshot_backbone::Result<StepStats> {
        Err(Self::evaluation_only("meta_train"))
    }

    fn predict(&self, episode: &EpisodeTensors) -> fewshot_backbone::Result<Tensor> {
        let mut sum = self.members[0].predict(episode)?;
        for member in &self.members[1..] {
            sum = (sum + member.predict(episode)?)?;
        }
        Ok((sum / self.members.len() as f64)?)
    }

    fn state(&self) -> fewshot_backbone::Result<ParamSet> {
        Err(Self::evaluation_only("state"))
    }

    fn load_state(&mut self, _state: &ParamSet) -> fewshot_backbone::Result<()> {
        Err(Self::evaluation_only("load_state"))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, SyntheticOptions};

    use super::*;

    /// Predicts the same logits for every episode.
    struct Fixed(&'static str, Vec<f32>);

    impl Learner for Fixed {
        fn algorithm(&self) -> &'static str {
            self.0
        }
        fn config(&self) -> serde_json::Value {
            serde_json::json!({"name": self.0})
        }
        fn meta_train(&mut self, _: &[EpisodeTensors]) -> fewshot_backbone::Result<StepStats> {
            unreachable!("not trained in these tests")
        }
        fn predict(&self, _: &EpisodeTensors) -> fewshot_backbone::Result<Tensor> {
            Ok(Tensor::from_vec(self.1.clone(), (1, 2), &Device::Cpu)?)
        }
        fn state(&self) -> fewshot_backbone::Result<ParamSet> {
            Ok(ParamSet::default())
        }
        fn load_state(&mut self, _: &ParamSet) -> fewshot_backbone::Result<()> {
            Ok(())
        }
    }

    fn episode() -> EpisodeTensors {
        let data = synthetic::generate(&SyntheticOptions::default()).unwrap();
        let spec = EpisodeSpec {
            ways: 2,
            shots: 1,
            queries: 1,
            same_group: false,
        };
        let sampler = EpisodeSampler::new(data.store.clone(), data.test.clone(), spec, 0).unwrap();
        EpisodeTensors::from_episode(&sampler.episode(0), &Device::Cpu, DType::F32).unwrap()
    }

    #[test]
    fn the_prediction_is_the_mean_of_the_members_logits() {
        let ensemble = Ensemble::new(vec![
            Box::new(Fixed("a", vec![1.0, 4.0])),
            Box::new(Fixed("a", vec![3.0, -2.0])),
            Box::new(Fixed("a", vec![2.0, 4.0])),
        ])
        .unwrap();
        let logits = ensemble.predict(&episode()).unwrap();
        assert_eq!(logits.to_vec2::<f32>().unwrap(), [[2.0, 2.0]]);
        assert_eq!(ensemble.members.len(), 3);
    }

    #[test]
    fn empty_and_mixed_ensembles_and_training_are_refused() {
        let empty = Ensemble::new(Vec::new()).err().unwrap().to_string();
        assert!(empty.contains("at least one"), "{empty}");
        let mixed = Ensemble::new(vec![
            Box::new(Fixed("maml", vec![0.0, 0.0])),
            Box::new(Fixed("protonet", vec![0.0, 0.0])),
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(mixed.contains("maml and protonet"), "{mixed}");
        let mut one = Ensemble::new(vec![Box::new(Fixed("a", vec![0.0, 0.0]))]).unwrap();
        let refused = one.meta_train(&[]).err().unwrap().to_string();
        assert!(refused.contains("evaluated, not trained"), "{refused}");
        assert!(one.state().is_err());
    }
}
