//! `MetaNetOriginal`: trains a [`MetaNetwork`] with Adam behind the shared
//! [`Learner`] trait.

use candle_core::{Device, Tensor};
use fewshot_backbone::{
    algorithm_section, load_training_state, mean_over_episodes, ops, parse_algorithm_section,
    training_state, Adam, EpisodeGradient, EpisodeTensors, Learner, ParamSet, Result, StepStats,
    VarSet,
};

use crate::hyperparams::MetaNetConfig;
use crate::model::MetaNetwork;
use crate::ALGORITHM;

pub struct MetaNetOriginal {
    config: MetaNetConfig,
    network: MetaNetwork,
    weights: VarSet,
    optimizer: Adam,
}

impl MetaNetOriginal {
    /// A fresh learner; the config is validated first.
    pub fn new(config: MetaNetConfig, device: &Device) -> Result<Self> {
        let network = MetaNetwork::new(&config)?;
        let weights = network.init(config.init_seed, device)?.to_vars()?;
        let optimizer = Adam::new(config.optimizer, &weights)?;
        Ok(Self {
            config,
            network,
            weights,
            optimizer,
        })
    }

    /// Builds from a config's `algorithm` section.
    pub fn from_json(section: &serde_json::Value, device: &Device) -> Result<Self> {
        Self::new(parse_algorithm_section(section, ALGORITHM)?, device)
    }

    pub fn network(&self) -> &MetaNetwork {
        &self.network
    }

    pub fn weights(&self) -> &VarSet {
        &self.weights
    }
}

impl Learner for MetaNetOriginal {
    fn algorithm(&self) -> &'static str {
        ALGORITHM
    }

    fn config(&self) -> serde_json::Value {
        algorithm_section(&self.config, ALGORITHM)
    }

    /// The meta-loss of an episode is its queries' cross-entropy summed, as
    /// the reference (the reported loss is the mean per query).
    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        let params = self.weights.as_params();
        let (gradient, stats) = mean_over_episodes(batch, |episode| {
            let logits = self.network.logits(&params, episode)?;
            let labels = episode.labels_for("meta-training")?;
            let mean = ops::cross_entropy(&logits, labels)?;
            let sum = mean.affine(labels.dim(0)? as f64, 0.0)?;
            Ok(EpisodeGradient {
                gradient: self.weights.gradients(&sum.backward()?)?.detach(),
                loss: mean.to_scalar::<f32>()? as f64,
                accuracy: ops::accuracy(&logits, labels)?,
            })
        })?;
        let lr = self
            .config
            .lr_schedule()
            .lr_at(self.config.optimizer.lr, self.optimizer.steps());
        self.optimizer.set_lr(lr);
        self.optimizer.step(&self.weights, &gradient)?;
        Ok(stats)
    }

    /// Reads the support set once, then classifies the queries
    /// `query_chunk` at a time (each query's fast weights take memory).
    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        let params = self.weights.as_params().detach();
        let memory = self.network.remember(&params, episode)?;
        let queries = episode.query.dim(0)?;
        let mut logits = Vec::new();
        for start in (0..queries).step_by(self.config.query_chunk) {
            let count = self.config.query_chunk.min(queries - start);
            let chunk = episode.query.narrow(0, start, count)?;
            logits.push(self.network.classify(&params, &memory, &chunk)?.detach());
        }
        Ok(Tensor::cat(&logits, 0)?)
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
    use candle_core::DType;
    use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, SyntheticOptions};

    /// A small network on the synthetic dataset's 28x28 images.
    fn small_config() -> MetaNetConfig {
        MetaNetConfig {
            filters: 8,
            generator_hidden: 6,
            query_chunk: 4,
            ..MetaNetConfig::default()
        }
    }

    fn episodes(count: usize, seed: u64, ways: usize) -> Vec<EpisodeTensors> {
        let data = synthetic::generate(&SyntheticOptions::default()).unwrap();
        let spec = EpisodeSpec {
            ways,
            shots: 1,
            queries: 2,
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

    /// [`small_config`] shaped as the miniImageNet model: batch norm in u,
    /// b an MLP on u's embeddings.
    fn small_mini_imagenet_config() -> MetaNetConfig {
        MetaNetConfig {
            key_batch_norm_blocks: 3,
            base: crate::BaseLearner::Mlp,
            base_hidden_layers: 2,
            ..small_config()
        }
    }

    #[test]
    fn predictions_do_not_depend_on_the_query_chunking() {
        // With batch norm too: queries are normalised by the support set.
        for config in [small_config(), small_mini_imagenet_config()] {
            predictions_match_unchunked(config);
        }
    }

    fn predictions_match_unchunked(config: MetaNetConfig) {
        let mut learner = MetaNetOriginal::new(config, &Device::Cpu).unwrap();
        // A few steps first, so the fast weights are not all zero.
        let batch = episodes(1, 0, 5);
        for _ in 0..3 {
            learner.meta_train(&batch).unwrap();
        }
        let episode = &episodes(1, 1, 5)[0];
        let chunked = learner.predict(episode).unwrap();
        assert_eq!(chunked.dims(), [10, 5]);
        let whole = learner
            .network()
            .logits(&learner.weights().as_params(), episode)
            .unwrap();
        let diff = (chunked - whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn training_lowers_the_loss_on_a_fixed_batch() {
        for config in [small_config(), small_mini_imagenet_config()] {
            training_lowers_the_loss(config);
        }
    }

    fn training_lowers_the_loss(config: MetaNetConfig) {
        let mut learner = MetaNetOriginal::new(config, &Device::Cpu).unwrap();
        let batch = episodes(2, 2, 5);
        let first = learner.meta_train(&batch).unwrap();
        let mut last = first;
        // Slow at first: the generators' output layers start at zero, so the
        // fast weights (and the gradient through the attention) grow from 0.
        for _ in 0..40 {
            last = learner.meta_train(&batch).unwrap();
        }
        assert!(
            last.loss < first.loss * 0.9,
            "{} -> {}",
            first.loss,
            last.loss
        );
    }

    #[test]
    fn a_test_head_serves_other_way_counts_and_others_are_refused() {
        let config = MetaNetConfig {
            n_outputs_test: 3,
            ..small_config()
        };
        let learner = MetaNetOriginal::new(config, &Device::Cpu).unwrap();
        let three = &episodes(1, 3, 3)[0];
        assert_eq!(learner.predict(three).unwrap().dims(), [6, 3]);
        let four = &episodes(1, 3, 4)[0];
        let err = learner.predict(four).unwrap_err().to_string();
        assert!(err.contains("[5, 3]"), "{err}");
    }

    #[test]
    fn config_and_state_rebuild_an_identical_learner() {
        let mut learner = MetaNetOriginal::new(small_config(), &Device::Cpu).unwrap();
        learner.meta_train(&episodes(1, 4, 5)).unwrap();
        let mut rebuilt = MetaNetOriginal::from_json(&learner.config(), &Device::Cpu).unwrap();
        rebuilt.load_state(&learner.state().unwrap()).unwrap();
        let batch = episodes(1, 5, 5);
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
        assert_eq!(
            learner.meta_train(&batch).unwrap(),
            rebuilt.meta_train(&batch).unwrap()
        );
    }
}
