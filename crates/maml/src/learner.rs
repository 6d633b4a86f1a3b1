//! `Maml`: the meta-learner behind the shared [`Learner`] trait.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    ops, second_order, Adam, BackboneError, Conv4, EpisodeTensors, Learner, ParamSet, Result,
    StepStats, VarSet,
};
use rayon::prelude::*;

use crate::hyperparams::{MamlConfig, Order};
use crate::inner_loop::{adapt, InnerLoop};
use crate::ALGORITHM;

pub struct Maml {
    config: MamlConfig,
    net: Conv4,
    weights: VarSet,
    optimizer: Adam,
}

impl Maml {
    /// A fresh learner. Second order is refused, with the reason, when candle
    /// would silently compute first-order gradients instead.
    pub fn new(config: MamlConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        if config.order == Order::Second {
            second_order::ensure_available()?;
        }
        let net = Conv4::new(config.network())?;
        let weights = net.init(config.init_seed, DType::F32, device)?.to_vars()?;
        let optimizer = Adam::new(config.optimizer, &weights)?;
        Ok(Self {
            config,
            net,
            weights,
            optimizer,
        })
    }

    /// Builds from a config's `algorithm` section (`name` is ignored).
    pub fn from_json(value: &serde_json::Value, device: &Device) -> Result<Self> {
        let mut value = value.clone();
        if let Some(map) = value.as_object_mut() {
            map.remove("name");
        }
        let config: MamlConfig =
            serde_json::from_value(value).map_err(|e| BackboneError::InvalidConfig {
                field: "algorithm",
                value: ALGORITHM.into(),
                reason: e.to_string(),
            })?;
        Self::new(config, device)
    }

    fn inner_loop(&self, steps: usize, order: Order) -> InnerLoop {
        InnerLoop {
            lr: self.config.inner_lr,
            steps,
            order,
            adapt: self.config.adapt,
        }
    }

    /// The episode's shots, after checking it fits the classifier.
    fn shots(&self, episode: &EpisodeTensors) -> Result<usize> {
        let support = episode.support.dim(0)?;
        if episode.ways != self.config.ways || support % episode.ways != 0 {
            return Err(BackboneError::InvalidConfig {
                field: "ways",
                value: episode.ways.to_string(),
                reason: format!(
                    "this MAML model classifies {} ways (support of {support} images)",
                    self.config.ways
                ),
            });
        }
        Ok(support / episode.ways)
    }

    /// Query loss, query accuracy and the meta-gradient of one task.
    fn task_gradient(
        &self,
        params: &ParamSet,
        episode: &EpisodeTensors,
    ) -> Result<(ParamSet, f64, f64)> {
        if self.config.order == Order::Second {
            // candle reads its switch once per thread: check this one.
            second_order::ensure_available()?;
        }
        let shots = self.shots(episode)?;
        let inner = self.inner_loop(self.config.inner_steps_train, self.config.order);
        let adapted = adapt(
            &self.net,
            params,
            &episode.support,
            &episode.support_labels,
            shots,
            &inner,
        )?;
        let logits = self.net.forward(&adapted, &episode.query)?;
        let labels = episode.labels_for("meta-training")?;
        let loss = ops::cross_entropy(&logits, labels)?;
        let grads = self.weights.gradients(&loss.backward()?)?.detach();
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((grads, loss_value, ops::accuracy(&logits, labels)?))
    }
}

impl Learner for Maml {
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
        let params = self.weights.as_params();
        // Tasks are independent until their gradients are averaged: one per core.
        let tasks: Vec<Result<(ParamSet, f64, f64)>> = batch
            .par_iter()
            .map(|episode| self.task_gradient(&params, episode))
            .collect();
        let scale = 1.0 / batch.len().max(1) as f64;
        let (mut loss, mut accuracy) = (0.0, 0.0);
        let mut grads: Option<ParamSet> = None;
        for task in tasks {
            let (task_grads, task_loss, task_accuracy) = task?;
            loss += task_loss * scale;
            accuracy += task_accuracy * scale;
            grads = Some(match grads {
                None => task_grads.scale(scale)?,
                Some(sum) => sum.add_scaled(&task_grads, scale)?,
            });
        }
        let grads = grads.ok_or_else(|| BackboneError::InvalidConfig {
            field: "meta_batch",
            value: "0".into(),
            reason: "a training step needs at least one episode".into(),
        })?;
        self.optimizer.step(&self.weights, &grads)?;
        Ok(StepStats { loss, accuracy })
    }

    /// Adapts with the test step count; first order suffices, as nothing is
    /// differentiated afterwards (the adapted weights are the same).
    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        let shots = self.shots(episode)?;
        let inner = self.inner_loop(self.config.inner_steps_test, Order::First);
        let params = self.weights.as_params().detach();
        let adapted = adapt(
            &self.net,
            &params,
            &episode.support,
            &episode.support_labels,
            shots,
            &inner,
        )?;
        Ok(self.net.forward(&adapted, &episode.query)?.detach())
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
    use fewshot_backbone::Conv4Config;
    use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, SyntheticOptions};

    fn small(order: Order) -> MamlConfig {
        MamlConfig {
            network: Conv4Config {
                filters: 8,
                ..Conv4Config::omniglot()
            },
            order,
            ..MamlConfig::omniglot_5way()
        }
    }

    fn episodes(ways: usize, count: usize, seed: u64) -> Vec<EpisodeTensors> {
        let data = synthetic::generate(&SyntheticOptions::default()).unwrap();
        let spec = EpisodeSpec {
            ways,
            shots: 1,
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
    fn both_orders_lower_the_loss_on_a_fixed_batch() {
        for order in [Order::Second, Order::First] {
            let mut maml = Maml::new(small(order), &Device::Cpu).unwrap();
            let batch = episodes(5, 2, 1);
            let first = maml.meta_train(&batch).unwrap();
            let mut last = first;
            for _ in 0..15 {
                last = maml.meta_train(&batch).unwrap();
            }
            assert!(
                last.loss < first.loss,
                "{order:?}: {} -> {}",
                first.loss,
                last.loss
            );
        }
    }

    #[test]
    fn prediction_adapts_to_the_support_set() {
        let maml = Maml::new(small(Order::Second), &Device::Cpu).unwrap();
        let episode = &episodes(5, 1, 2)[0];
        let logits = maml.predict(episode).unwrap();
        assert_eq!(logits.dims(), [15, 5]);
        // Adaptation changes the classifier: zero inner steps give other logits.
        let unadapted = Maml {
            config: MamlConfig {
                inner_steps_test: 0,
                ..maml.config.clone()
            },
            net: maml.net.clone(),
            weights: maml.weights.clone(),
            optimizer: Adam::new(maml.config.optimizer, &maml.weights).unwrap(),
        };
        let before = unadapted.predict(episode).unwrap();
        let change = (logits - before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(change > 1e-3, "{change}");
    }

    #[test]
    fn config_and_state_rebuild_an_identical_learner() {
        let mut maml = Maml::new(small(Order::First), &Device::Cpu).unwrap();
        maml.meta_train(&episodes(5, 2, 3)).unwrap();
        let mut rebuilt = Maml::from_json(&maml.config(), &Device::Cpu).unwrap();
        rebuilt.load_state(&maml.state().unwrap()).unwrap();
        let batch = episodes(5, 2, 4);
        assert_eq!(
            maml.meta_train(&batch).unwrap(),
            rebuilt.meta_train(&batch).unwrap()
        );
    }

    #[test]
    fn episodes_of_another_width_are_refused_by_name() {
        let maml = Maml::new(small(Order::First), &Device::Cpu).unwrap();
        let err = maml.predict(&episodes(3, 1, 5)[0]).unwrap_err().to_string();
        assert!(err.contains("ways") && err.contains("5 ways"), "{err}");
    }
}
