//! `EbMetaNet`: trains a [`MetaNetwork`] with Adam behind the shared
//! [`Learner`] trait.

use candle_core::{Device, Tensor};
use fewshot_backbone::{
    ops, Adam, BackboneError, EpisodeTensors, Learner, ParamSet, Result, StepStats, VarSet,
};
use rayon::prelude::*;

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

    /// Builds from the JSON of a config's `algorithm` section (the `name`
    /// field, if present, is the caller's business and is ignored).
    pub fn from_json(value: &serde_json::Value, device: &Device) -> Result<Self> {
        let mut value = value.clone();
        if let Some(map) = value.as_object_mut() {
            map.remove("name");
        }
        let config: EbMetaNetConfig =
            serde_json::from_value(value).map_err(|e| BackboneError::InvalidConfig {
                field: "algorithm",
                value: ALGORITHM.into(),
                reason: e.to_string(),
            })?;
        Self::new(config, device)
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
        let mut value = serde_json::to_value(&self.config).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("name".into(), ALGORITHM.into());
        }
        value
    }

    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        // Each episode's forward and backward runs on its own core: candle's
        // CPU ops use little more than one core on batches this small. The
        // meta-batch loss is the mean, so its gradient is the mean gradient.
        let params = self.weights.as_params();
        let per_episode: Vec<Result<(ParamSet, f64, f64)>> = batch
            .par_iter()
            .map(|episode| {
                let logits = self.network.logits(&params, episode)?;
                let labels = episode.labels_for("meta-training")?;
                let loss = ops::cross_entropy(&logits, labels)?;
                let grads = self.weights.gradients(&loss.backward()?)?.detach();
                let loss = loss.to_scalar::<f32>()? as f64;
                Ok((grads, loss, ops::accuracy(&logits, labels)?))
            })
            .collect();
        let scale = 1.0 / batch.len() as f64;
        let (mut loss, mut accuracy) = (0.0, 0.0);
        let mut grads: Option<ParamSet> = None;
        for result in per_episode {
            let (episode_grads, episode_loss, episode_accuracy) = result?;
            loss += episode_loss * scale;
            accuracy += episode_accuracy * scale;
            grads = Some(match grads {
                None => episode_grads.scale(scale)?,
                Some(sum) => sum.add_scaled(&episode_grads, scale)?,
            });
        }
        let grads = grads.ok_or_else(|| BackboneError::InvalidConfig {
            field: "meta_batch",
            value: "0".into(),
            reason: "a training step needs at least one episode".into(),
        })?;
        self.optimizer
            .set_lr(self.config.lr_at(self.optimizer.steps()));
        self.optimizer.step(&self.weights, &grads)?;
        Ok(StepStats { loss, accuracy })
    }

    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        self.network
            .logits(&self.weights.as_params().detach(), episode)
    }

    fn state(&self) -> Result<ParamSet> {
        let mut state = self.weights.as_params().detach();
        state.extend(&self.optimizer.state()?)?;
        Ok(state)
    }

    fn load_state(&mut self, state: &ParamSet) -> Result<()> {
        self.weights.set(state)?;
        self.optimizer.load_state(state)
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
