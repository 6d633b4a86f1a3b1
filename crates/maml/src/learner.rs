//! `Maml`: the meta-learner behind the shared [`Learner`] trait.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    algorithm_section, load_training_state, mean_over_episodes, ops, parse_algorithm_section,
    second_order, training_state, Adam, BackboneError, Conv4, EpisodeGradient, EpisodeTensors,
    Learner, ParamSet, Result, StepStats, VarSet,
};

use crate::hyperparams::{MamlConfig, Order};
use crate::inner_loop::{adapt, is_adapted, per_step_name, query_logits, rate_name, InnerLoop};
use crate::meta_gradient::{meta_gradient, Task};
use crate::multi_step_loss::query_loss_weights;
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
        // Any second-order step differentiates the inner gradients' graph,
        // where unfused blocks are faster (see `Conv4::with_fused_blocks`).
        let second_order_steps = config.order == Order::Second;
        let net = Conv4::new(config.network())?.with_fused_blocks(!second_order_steps);
        let mut init = net.init(config.init_seed, DType::F32, device)?;
        if config.per_step_batch_norm {
            init = per_step_copies(&init, config.inner_steps_train)?;
        }
        if config.learn_inner_lr {
            let mut rates = ParamSet::new();
            for (name, _) in init.iter().filter(|(n, _)| is_adapted(n, config.adapt)) {
                let start = vec![config.inner_lr as f32; config.inner_steps_train];
                rates.insert(
                    rate_name(name),
                    Tensor::from_vec(start, config.inner_steps_train, device)?,
                )?;
            }
            init.extend(&rates)?;
        }
        let weights = init.to_vars()?;
        let optimizer = Adam::new(config.optimizer, &weights)?;
        Ok(Self {
            config,
            net,
            weights,
            optimizer,
        })
    }

    /// Builds from a config's `algorithm` section.
    pub fn from_json(section: &serde_json::Value, device: &Device) -> Result<Self> {
        Self::new(parse_algorithm_section(section, ALGORITHM)?, device)
    }

    fn inner_loop(&self, steps: usize, order: Order) -> InnerLoop {
        InnerLoop {
            lr: self.config.inner_lr,
            steps,
            order,
            adapt: self.config.adapt,
            learned_rates: self.config.learn_inner_lr,
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

    /// The (0-based) epoch of the next meta-step: the unit of MAML++'s
    /// schedules.
    fn epoch(&self) -> usize {
        let epoch = self.optimizer.steps() / self.config.iterations_per_epoch as u64;
        usize::try_from(epoch).unwrap_or(usize::MAX)
    }

    /// The weights of the query losses after each inner step at this point
    /// of training (MAML++'s multi-step loss; plain MAML: the last only).
    fn query_weights(&self) -> Vec<f64> {
        query_loss_weights(
            self.config.inner_steps_train,
            self.config.multi_step_loss,
            self.epoch(),
        )
    }

    /// The meta-gradient's order at this point of training: first order
    /// for `first_order_epochs` (MAML++'s derivative-order annealing).
    fn order(&self) -> Order {
        match self.epoch() < self.config.first_order_epochs {
            true => Order::First,
            false => self.config.order,
        }
    }

    /// The meta-gradient, meta-loss and query accuracy of one task.
    fn task_gradient(
        &self,
        params: &ParamSet,
        episode: &EpisodeTensors,
        query_weights: &[f64],
        order: Order,
    ) -> Result<EpisodeGradient> {
        if order == Order::Second {
            // candle reads its switch once per thread: check this one.
            second_order::ensure_available()?;
        }
        let shots = self.shots(episode)?;
        let inner = self.inner_loop(self.config.inner_steps_train, order);
        let labels = episode.labels_for("meta-training")?;
        let task = Task {
            support: &episode.support,
            support_labels: &episode.support_labels,
            shots,
            query: &episode.query,
            query_labels: labels,
        };
        let result = meta_gradient(
            &self.net,
            params,
            &task,
            &inner,
            self.config.query_normalisation,
            query_weights,
        )?;
        Ok(EpisodeGradient {
            gradient: result.gradient,
            loss: result.query_loss,
            accuracy: ops::accuracy(&result.query_logits, labels)?,
        })
    }
}

/// `init` with each batch norm weight replaced by one copy for each of
/// `steps` inner steps.
fn per_step_copies(init: &ParamSet, steps: usize) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, tensor) in init.iter() {
        if !name.contains(".bn.") {
            out.insert(name, tensor.clone())?;
            continue;
        }
        for step in 0..steps {
            out.insert(per_step_name(name, step), tensor.copy()?)?;
        }
    }
    Ok(out)
}

impl Learner for Maml {
    fn algorithm(&self) -> &'static str {
        ALGORITHM
    }

    fn config(&self) -> serde_json::Value {
        algorithm_section(&self.config, ALGORITHM)
    }

    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        let params = self.weights.as_params();
        let (query_weights, order) = (self.query_weights(), self.order());
        let (gradient, stats) = mean_over_episodes(batch, |episode| {
            self.task_gradient(&params, episode, &query_weights, order)
        })?;
        if let Some(schedule) = self.config.cosine_annealing {
            self.optimizer
                .set_lr(schedule.lr_at(self.config.optimizer.lr, self.epoch()));
        }
        self.optimizer.step(&self.weights, &gradient)?;
        Ok(stats)
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
        let logits = query_logits(
            &self.net,
            &adapted,
            &episode.support,
            &episode.query,
            self.config.query_normalisation,
        )?;
        Ok(logits.detach())
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
    use crate::cosine_annealing::CosineAnnealing;
    use crate::hyperparams::QueryNormalisation;
    use crate::multi_step_loss::MultiStepLoss;
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
    fn support_normalisation_makes_each_prediction_independent_of_the_other_queries() {
        let episode = &episodes(5, 1, 2)[0];
        let first_query = |e: &EpisodeTensors| EpisodeTensors {
            query: e.query.narrow(0, 0, 1).unwrap(),
            query_labels: e.query_labels.as_ref().map(|l| l.narrow(0, 0, 1).unwrap()),
            ..e.clone()
        };
        let gap = |normalisation| {
            let maml = Maml::new(
                MamlConfig {
                    query_normalisation: normalisation,
                    ..small(Order::First)
                },
                &Device::Cpu,
            )
            .unwrap();
            let all = maml.predict(episode).unwrap().narrow(0, 0, 1).unwrap();
            let alone = maml.predict(&first_query(episode)).unwrap();
            (all - alone)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(gap(QueryNormalisation::Support) < 1e-5);
        assert!(gap(QueryNormalisation::Batch) > 1e-3);
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
    fn the_multi_step_loss_counts_every_step_for_its_epochs_only() {
        let config = MamlConfig {
            inner_steps_train: 3,
            multi_step_loss: Some(MultiStepLoss { epochs: 1 }),
            iterations_per_epoch: 2,
            ..small(Order::Second)
        };
        let mut maml = Maml::new(config.clone(), &Device::Cpu).unwrap();
        let mut plain = Maml::new(
            MamlConfig {
                multi_step_loss: None,
                ..config
            },
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(maml.query_weights(), [1.0 / 3.0; 3]);
        let batch = episodes(5, 2, 1);
        let (with, without) = (
            maml.meta_train(&batch).unwrap(),
            plain.meta_train(&batch).unwrap(),
        );
        assert_ne!(with.loss, without.loss);
        maml.meta_train(&batch).unwrap();
        // Two steps make the first epoch: from here on, plain MAML's loss.
        assert_eq!(maml.query_weights(), [0.0, 0.0, 1.0]);
    }

    #[test]
    fn learned_step_sizes_are_weights_that_training_moves_and_checkpoints_keep() {
        let config = MamlConfig {
            learn_inner_lr: true,
            inner_steps_train: 2,
            inner_steps_test: 2,
            ..small(Order::Second)
        };
        let mut maml = Maml::new(config, &Device::Cpu).unwrap();
        let rates = |m: &Maml| {
            m.weights
                .as_params()
                .get("inner_lr.head.weight")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(rates(&maml), [0.4, 0.4]);
        // Batch norm's weights are not adapted, so they have no step size.
        assert!(!maml
            .weights
            .names()
            .iter()
            .any(|n| n.starts_with("inner_lr.") && n.contains(".bn.")));
        maml.meta_train(&episodes(5, 2, 1)).unwrap();
        assert!(
            rates(&maml).iter().all(|r| (r - 0.4).abs() > 1e-7),
            "{:?}",
            rates(&maml)
        );
        let mut rebuilt = Maml::from_json(&maml.config(), &Device::Cpu).unwrap();
        rebuilt.load_state(&maml.state().unwrap()).unwrap();
        assert_eq!(rates(&rebuilt), rates(&maml));
        let episode = &episodes(5, 1, 6)[0];
        let (a, b) = (
            maml.predict(episode).unwrap(),
            rebuilt.predict(episode).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }

    /// First order for the first epoch, then the configured second order.
    #[test]
    fn derivative_order_annealing_starts_first_order() {
        let annealed = MamlConfig {
            first_order_epochs: 1,
            iterations_per_epoch: 1,
            ..small(Order::Second)
        };
        let mut annealed = Maml::new(annealed, &Device::Cpu).unwrap();
        let mut first = Maml::new(small(Order::First), &Device::Cpu).unwrap();
        let batch = episodes(5, 2, 1);
        let weights = |m: &Maml| tensors(&m.state().unwrap());
        annealed.meta_train(&batch).unwrap();
        first.meta_train(&batch).unwrap();
        assert_eq!(weights(&annealed), weights(&first));
        annealed.meta_train(&batch).unwrap();
        first.meta_train(&batch).unwrap();
        assert_ne!(weights(&annealed), weights(&first));
    }

    /// The meta learning rate of each epoch is the schedule's.
    #[test]
    fn cosine_annealing_sets_each_epochs_meta_learning_rate() {
        let schedule = CosineAnnealing {
            epochs: 2,
            min_lr: 1e-4,
        };
        let annealed = MamlConfig {
            cosine_annealing: Some(schedule),
            iterations_per_epoch: 1,
            ..small(Order::First)
        };
        let mut annealed = Maml::new(annealed, &Device::Cpu).unwrap();
        let batch = episodes(5, 2, 1);
        for epoch in 0..3 {
            annealed.meta_train(&batch).unwrap();
            assert_eq!(
                annealed.optimizer.lr(),
                schedule.lr_at(1e-3, epoch),
                "epoch {epoch}"
            );
        }
        assert_eq!(annealed.optimizer.lr(), 1e-4);
    }

    fn tensors(state: &ParamSet) -> Vec<Vec<f64>> {
        state
            .tensors()
            .iter()
            .map(|t| {
                let t = t.to_dtype(DType::F64).unwrap();
                t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
            })
            .collect()
    }

    #[test]
    fn per_step_batch_norm_weights_part_after_training() {
        let config = MamlConfig {
            per_step_batch_norm: true,
            inner_steps_train: 2,
            inner_steps_test: 2,
            ..small(Order::Second)
        };
        let mut maml = Maml::new(config, &Device::Cpu).unwrap();
        let names = maml.weights.names().to_vec();
        assert!(!names.iter().any(|n| n == "block0.bn.weight"));
        let copy = |m: &Maml, k: usize| {
            m.weights
                .as_params()
                .get(&format!("block0.bn.weight.step{k}"))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(copy(&maml, 0), copy(&maml, 1));
        maml.meta_train(&episodes(5, 2, 1)).unwrap();
        assert_ne!(copy(&maml, 0), copy(&maml, 1));
        assert_eq!(maml.predict(&episodes(5, 1, 6)[0]).unwrap().dims(), [15, 5]);
    }

    #[test]
    fn episodes_of_another_width_are_refused_by_name() {
        let maml = Maml::new(small(Order::First), &Device::Cpu).unwrap();
        let err = maml.predict(&episodes(3, 1, 5)[0]).unwrap_err().to_string();
        assert!(err.contains("ways") && err.contains("5 ways"), "{err}");
    }
}
