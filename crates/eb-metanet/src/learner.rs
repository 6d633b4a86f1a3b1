//! `EbMetaNet`: trains a [`MetaNetwork`] with Adam behind the shared
//! [`Learner`] trait.

use candle_core::{Device, Tensor};
use fewshot_backbone::{
    algorithm_section, load_training_state, mean_over_episodes, parse_algorithm_section,
    training_state, Adam, EpisodeGradient, EpisodeTensors, Learner, ParamSet, Result, StepStats,
    VarSet,
};

use crate::hyperparams::EbMetaNetConfig;
use crate::network::MetaNetwork;
use crate::ALGORITHM;

pub struct EbMetaNet {
    config: EbMetaNetConfig,
    network: MetaNetwork,
    weights: VarSet,
    optimizer: Adam,
}

impl EbMetaNet {
    /// A fresh learner; the config is validated first.
    pub fn new(config: EbMetaNetConfig, device: &Device) -> Result<Self> {
        config.validate()?;
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
}

impl Learner for EbMetaNet {
    fn algorithm(&self) -> &'static str {
        ALGORITHM
    }

    fn config(&self) -> serde_json::Value {
        algorithm_section(&self.config, ALGORITHM)
    }

    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        let params = self.weights.as_params();
        let (gradient, stats) = mean_over_episodes(batch, |episode| {
            let logits = self.network.logits(&params, episode)?;
            EpisodeGradient::of_query_cross_entropy(&self.weights, &logits, episode)
        })?;
        self.optimizer
            .set_lr(self.config.lr_at(self.optimizer.steps()));
        self.optimizer.step(&self.weights, &gradient)?;
        Ok(stats)
    }

    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        self.network
            .logits(&self.weights.as_params().detach(), episode)
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

    fn small_config() -> EbMetaNetConfig {
        let mut config = EbMetaNetConfig::default();
        config.embedding.filters = 16;
        config.hidden_dim = 32;
        config
    }

    fn episodes(count: usize, seed: u64) -> Vec<EpisodeTensors> {
        let data = synthetic::generate(&SyntheticOptions::default()).unwrap();
        let spec = EpisodeSpec {
            ways: 5,
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
    fn logits_have_one_column_per_way() {
        let learner = EbMetaNet::new(small_config(), &Device::Cpu).unwrap();
        let episode = &episodes(1, 0)[0];
        assert_eq!(learner.predict(episode).unwrap().dims(), [15, 5]);
    }

    #[test]
    fn training_lowers_the_loss_on_a_fixed_batch() {
        let mut learner = EbMetaNet::new(small_config(), &Device::Cpu).unwrap();
        let batch = episodes(2, 1);
        let first = learner.meta_train(&batch).unwrap();
        let mut last = first;
        for _ in 0..10 {
            last = learner.meta_train(&batch).unwrap();
        }
        assert!(
            last.loss < first.loss * 0.8,
            "{} -> {}",
            first.loss,
            last.loss
        );
    }

    #[test]
    fn config_and_state_rebuild_an_identical_learner() {
        let mut learner = EbMetaNet::new(small_config(), &Device::Cpu).unwrap();
        learner.meta_train(&episodes(2, 2)).unwrap();
        let mut rebuilt = EbMetaNet::from_json(&learner.config(), &Device::Cpu).unwrap();
        rebuilt.load_state(&learner.state().unwrap()).unwrap();
        let batch = episodes(2, 3);
        // Same predictions, and the same next step (optimiser state restored).
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

    #[test]
    fn unknown_hyperparameters_are_named() {
        let err = EbMetaNet::from_json(
            &serde_json::json!({"name": "eb-metanet", "hiden": 1}),
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("hiden"), "{err}");
    }
}
