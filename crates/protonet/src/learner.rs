//! `ProtoNet`: a Prototypical Network trained with Adam behind the shared
//! [`Learner`] trait.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    algorithm_section, load_training_state, mean_over_episodes, parse_algorithm_section,
    training_state, Adam, Conv4, EpisodeGradient, EpisodeTensors, Learner, ParamSet, Result,
    StepStats, VarSet,
};

use crate::hyperparams::ProtoNetConfig;
use crate::prototypes::{distance_logits, prototypes};
use crate::ALGORITHM;

/// Weight names of the embedding network start with this.
const EMBEDDING: &str = "embedding.";

pub struct ProtoNet {
    config: ProtoNetConfig,
    embedding: Conv4,
    weights: VarSet,
    optimizer: Adam,
}

impl ProtoNet {
    /// A fresh learner; the config is validated first.
    pub fn new(config: ProtoNetConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let embedding = Conv4::new(config.embedding.clone())?;
        let weights = embedding
            .init(config.init_seed, DType::F32, device)?
            .with_prefix(EMBEDDING)
            .to_vars()?;
        let optimizer = Adam::new(config.optimizer, &weights)?;
        Ok(Self {
            config,
            embedding,
            weights,
            optimizer,
        })
    }

    /// Builds from a config's `algorithm` section.
    pub fn from_json(section: &serde_json::Value, device: &Device) -> Result<Self> {
        Self::new(parse_algorithm_section(section, ALGORITHM)?, device)
    }

    /// Query logits (queries x ways) on the given weights. Support and query
    /// are embedded in one batch, so batch norm normalises the episode as a
    /// unit, in training as the reference code does, and at test as MAML
    /// does (the reference tests with running averages instead).
    pub fn logits(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<Tensor> {
        let (support, query) = self
            .embedding
            .forward_episode(&params.strip_prefix(EMBEDDING), episode)?;
        let prototypes = prototypes(&support, &episode.support_labels, episode.ways)?;
        distance_logits(&query, &prototypes)
    }
}

impl Learner for ProtoNet {
    fn algorithm(&self) -> &'static str {
        ALGORITHM
    }

    fn config(&self) -> serde_json::Value {
        algorithm_section(&self.config, ALGORITHM)
    }

    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        let params = self.weights.as_params();
        let (gradient, stats) = mean_over_episodes(batch, |episode| {
            let logits = self.logits(&params, episode)?;
            EpisodeGradient::of_query_cross_entropy(&self.weights, &logits, episode)
        })?;
        self.optimizer
            .set_lr(self.config.lr_at(self.optimizer.steps()));
        self.optimizer.step(&self.weights, &gradient)?;
        Ok(stats)
    }

    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        self.logits(&self.weights.as_params().detach(), episode)
    }

    fn state(&self) -> Result<ParamSet> {
        training_state(&self.weights, &self.optimizer)
    }

    fn load_state(&mut self, state: &ParamSet) -> Result<()> {
        load_training_state(&self.weights, &mut self.optimizer, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fewshot_backbone::ops;
    use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, SyntheticOptions};

    fn small_config() -> ProtoNetConfig {
        let mut config = ProtoNetConfig::default();
        config.embedding.filters = 16;
        config
    }

    fn episodes(count: usize, seed: u64, ways: usize) -> Vec<EpisodeTensors> {
        let data = synthetic::generate(&SyntheticOptions::default()).unwrap();
        let spec = EpisodeSpec {
            ways,
            shots: 2,
            queries: 3,
            same_group: false,
        };
        let sampler =
            EpisodeSampler::new(data.store.clone(), data.train.clone(), spec, seed).unwrap();
        sampler
            .episodes(0, count)
            .iter()
            .map(|e| EpisodeTensors::from_episode(e, &Device::Cpu, DType::F32).unwrap())
            .collect()
    }

    #[test]
    fn logits_have_one_column_per_way_at_any_way_count() {
        let learner = ProtoNet::new(small_config(), &Device::Cpu).unwrap();
        assert_eq!(
            learner.predict(&episodes(1, 0, 5)[0]).unwrap().dims(),
            [15, 5]
        );
        assert_eq!(
            learner.predict(&episodes(1, 0, 12)[0]).unwrap().dims(),
            [36, 12]
        );
    }

    #[test]
    fn a_query_equal_to_a_support_image_is_closest_to_its_class() {
        // One shot per class and the support images themselves as queries:
        // a query's own prototype is at distance 0, the largest logit.
        let learner = ProtoNet::new(small_config(), &Device::Cpu).unwrap();
        let mut episode = episodes(1, 4, 5).remove(0);
        let firsts: Vec<u32> = (0..5).map(|c| 2 * c).collect();
        let index = Tensor::new(firsts.as_slice(), &Device::Cpu).unwrap();
        episode.support = episode.support.index_select(&index, 0).unwrap();
        episode.support_labels = episode.support_labels.index_select(&index, 0).unwrap();
        episode.query = episode.support.clone();
        episode.query_labels = Some(episode.support_labels.clone());
        // Batch norm sees support and query together; equal halves keep the
        // query embeddings equal to the support embeddings.
        let logits = learner.predict(&episode).unwrap();
        let labels = episode.query_labels.as_ref().unwrap();
        assert_eq!(ops::accuracy(&logits, labels).unwrap(), 1.0);
        let diagonal: Vec<f32> = logits
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, row)| row[i])
            .collect();
        assert!(diagonal.iter().all(|d| d.abs() < 1e-3), "{diagonal:?}");
    }

    #[test]
    fn training_lowers_the_loss_on_a_fixed_batch() {
        let mut learner = ProtoNet::new(small_config(), &Device::Cpu).unwrap();
        let batch = episodes(2, 1, 5);
        let first = learner.meta_train(&batch).unwrap();
        let mut last = first;
        for _ in 0..10 {
            last = learner.meta_train(&batch).unwrap();
        }
        assert!(
            last.loss < first.loss * 0.7,
            "{} -> {}",
            first.loss,
            last.loss
        );
    }

    #[test]
    fn config_and_state_rebuild_an_identical_learner() {
        let mut learner = ProtoNet::new(small_config(), &Device::Cpu).unwrap();
        learner.meta_train(&episodes(2, 2, 5)).unwrap();
        let mut rebuilt = ProtoNet::from_json(&learner.config(), &Device::Cpu).unwrap();
        rebuilt.load_state(&learner.state().unwrap()).unwrap();
        let batch = episodes(2, 3, 5);
        let a = learner
            .predict(&batch[0])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = rebuilt
            .predict(&batch[0])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
        // The same next step: the optimiser state came back too.
        assert_eq!(
            learner.meta_train(&batch).unwrap(),
            rebuilt.meta_train(&batch).unwrap()
        );
    }

    #[test]
    fn unknown_hyperparameters_are_named() {
        let err = ProtoNet::from_json(
            &serde_json::json!({"name": "protonet", "distanse": "cosine"}),
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("distanse"), "{err}");
    }
}
