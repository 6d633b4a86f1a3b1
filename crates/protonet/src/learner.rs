//! `ProtoNet`: a Prototypical Network trained with Adam behind the shared
//! [`Learner`] trait.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    algorithm_section, load_training_state, mean_over_episodes_with, parse_algorithm_section,
    training_state, Adam, BackboneError, Conv4, EpisodeGradient, EpisodeTensors, Learner, ParamSet,
    Result, StepStats, VarSet,
};

use crate::hyperparams::{ProtoNetConfig, TestBatchNorm};
use crate::prototypes::{distance_logits, prototypes};
use crate::ALGORITHM;

/// Weight names of the embedding network start with this.
const EMBEDDING: &str = "embedding.";

pub struct ProtoNet {
    config: ProtoNetConfig,
    embedding: Conv4,
    weights: VarSet,
    optimizer: Adam,
    /// With `test_batch_norm: running`, the running averages of each batch
    /// norm's training statistics (names start with [`EMBEDDING`]); they are
    /// part of [`Learner::state`], so checkpoints and published models keep them.
    running_statistics: Option<ParamSet>,
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
        let running_statistics = match config.test_batch_norm {
            TestBatchNorm::Episode => None,
            TestBatchNorm::Running => Some(
                embedding
                    .initial_running_statistics(DType::F32, device)?
                    .with_prefix(EMBEDDING),
            ),
        };
        Ok(Self {
            config,
            embedding,
            weights,
            optimizer,
            running_statistics,
        })
    }

    /// Builds from a config's `algorithm` section.
    pub fn from_json(section: &serde_json::Value, device: &Device) -> Result<Self> {
        Self::new(parse_algorithm_section(section, ALGORITHM)?, device)
    }

    /// The running averages of the batch norms' training statistics, with
    /// `test_batch_norm: running`.
    pub fn running_statistics(&self) -> Option<&ParamSet> {
        self.running_statistics.as_ref()
    }
}

/// Support and query images in one batch: batch norm normalises the episode
/// as a unit, in training as the reference code does.
fn episode_images(episode: &EpisodeTensors) -> Result<Tensor> {
    Ok(Tensor::cat(&[&episode.support, &episode.query], 0)?)
}

/// Query logits (queries x ways) from the embeddings of [`episode_images`].
fn score(episode: &EpisodeTensors, embedded: &Tensor) -> Result<Tensor> {
    let support_rows = episode.support.dim(0)?;
    let support = embedded.narrow(0, 0, support_rows)?;
    let query = embedded.narrow(0, support_rows, episode.query.dim(0)?)?;
    let prototypes = prototypes(&support, &episode.support_labels, episode.ways)?;
    distance_logits(&query, &prototypes)
}

impl Learner for ProtoNet {
    fn algorithm(&self) -> &'static str {
        ALGORITHM
    }

    fn config(&self) -> serde_json::Value {
        algorithm_section(&self.config, ALGORITHM)
    }

    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        let params = self.weights.as_params().strip_prefix(EMBEDDING);
        let record = self.running_statistics.is_some();
        let (gradient, stats, batch_statistics) = mean_over_episodes_with(batch, |episode| {
            let images = episode_images(episode)?;
            let (embedded, statistics) = match record {
                true => {
                    let (embedded, statistics) = self
                        .embedding
                        .forward_recording_statistics(&params, &images)?;
                    (embedded, Some(statistics))
                }
                false => (self.embedding.forward(&params, &images)?, None),
            };
            let logits = score(episode, &embedded)?;
            let gradient =
                EpisodeGradient::of_query_cross_entropy(&self.weights, &logits, episode)?;
            Ok((gradient, statistics))
        })?;
        self.optimizer
            .set_lr(self.config.lr_at(self.optimizer.steps()));
        self.optimizer.step(&self.weights, &gradient)?;
        if let Some(running) = self.running_statistics.as_mut() {
            // One update per episode, in the batch's order (PyTorch's, had
            // it run the episodes one after another).
            let momentum = self.config.running_momentum;
            for statistics in batch_statistics.into_iter().flatten() {
                *running = running
                    .scale(1.0 - momentum)?
                    .add_scaled(&statistics.with_prefix(EMBEDDING), momentum)?;
            }
        }
        Ok(stats)
    }

    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        let params = self.weights.as_params().detach().strip_prefix(EMBEDDING);
        let images = episode_images(episode)?;
        let embedded = match &self.running_statistics {
            Some(running) => self.embedding.forward_with_statistics(
                &params,
                &running.strip_prefix(EMBEDDING),
                &images,
            )?,
            None => self.embedding.forward(&params, &images)?,
        };
        score(episode, &embedded)
    }

    fn state(&self) -> Result<ParamSet> {
        let mut state = training_state(&self.weights, &self.optimizer)?;
        if let Some(running) = &self.running_statistics {
            state.extend(running)?;
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &ParamSet) -> Result<()> {
        load_training_state(&self.weights, &mut self.optimizer, state)?;
        if let Some(running) = self.running_statistics.as_mut() {
            if let Some(missing) = running.names().iter().find(|n| !state.contains(n)) {
                return Err(BackboneError::Parameter {
                    name: missing.clone(),
                    problem: "is missing: `test_batch_norm: running` needs the running \
                              averages of a model trained with it"
                        .into(),
                });
            }
            *running = running.read_from(state, "")?;
        }
        Ok(())
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

    fn running_config(momentum: f64) -> ProtoNetConfig {
        ProtoNetConfig {
            test_batch_norm: TestBatchNorm::Running,
            running_momentum: momentum,
            ..small_config()
        }
    }

    #[test]
    fn running_statistics_follow_the_training_batches() {
        // Momentum 1: the running averages are the last episode's statistics,
        // taken at the weights before the step.
        let mut learner = ProtoNet::new(running_config(1.0), &Device::Cpu).unwrap();
        let batch = episodes(2, 5, 5);
        let before = learner.weights.as_params().detach().strip_prefix(EMBEDDING);
        let images = episode_images(&batch[1]).unwrap();
        let (_, expected) = learner
            .embedding
            .forward_recording_statistics(&before, &images)
            .unwrap();
        learner.meta_train(&batch).unwrap();
        let running = learner
            .running_statistics()
            .unwrap()
            .strip_prefix(EMBEDDING);
        assert_eq!(running.names(), expected.names());
        for (name, value) in expected.iter() {
            let got = running.get(name).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, value.to_vec1::<f32>().unwrap(), "{name}");
        }
        // Momentum 0.1 from mean 0, variance 1: one step moves a tenth of the way.
        let mut learner = ProtoNet::new(running_config(0.1), &Device::Cpu).unwrap();
        learner.meta_train(&batch[1..]).unwrap();
        let mean = learner
            .running_statistics()
            .unwrap()
            .get("embedding.block0.bn.running_mean")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let batch_mean = expected
            .get("block0.bn.running_mean")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (got, batch) in mean.iter().zip(&batch_mean) {
            assert!((got - 0.1 * batch).abs() < 1e-6, "{got} vs 0.1 * {batch}");
        }
    }

    #[test]
    fn running_statistics_score_each_query_alone_and_survive_a_checkpoint() {
        let mut learner = ProtoNet::new(running_config(0.1), &Device::Cpu).unwrap();
        learner.meta_train(&episodes(2, 6, 5)).unwrap();
        let episode = episodes(1, 7, 5).remove(0);
        let all = learner.predict(&episode).unwrap();
        let mut first_only = episode.clone();
        first_only.query = episode.query.narrow(0, 0, 1).unwrap();
        let alone = learner.predict(&first_only).unwrap();
        let gap = (all.narrow(0, 0, 1).unwrap() - alone)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gap < 1e-4, "{gap}");
        // The running averages travel with the state.
        let mut rebuilt = ProtoNet::from_json(&learner.config(), &Device::Cpu).unwrap();
        rebuilt.load_state(&learner.state().unwrap()).unwrap();
        assert_eq!(
            rebuilt.predict(&episode).unwrap().to_vec2::<f32>().unwrap(),
            all.to_vec2::<f32>().unwrap()
        );
        // A model trained without them cannot pretend to have them.
        let plain = ProtoNet::new(small_config(), &Device::Cpu).unwrap();
        let err = rebuilt
            .load_state(&plain.state().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("embedding.block0.bn.running_mean"), "{err}");
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
