//! The `Learner` trait drives a learner without knowing its algorithm: here a
//! tiny prototype learner is trained, evaluated, checkpointed and restored
//! through `dyn Learner` alone.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{
    ops, Checkpoint, Conv4, Conv4Config, EpisodeTensors, Learner, ParamSet, Result, StepStats,
    VarSet,
};
use fewshot_data::{synthetic, EpisodeSampler, EpisodeSpec, SyntheticOptions};

/// Nearest class mean in the conv-4 feature space, trained by plain SGD.
struct Prototypes {
    net: Conv4,
    weights: VarSet,
    lr: f64,
}

impl Prototypes {
    fn new(seed: u64) -> Self {
        let net = Conv4::new(Conv4Config {
            filters: 16,
            ..Conv4Config::omniglot()
        })
        .unwrap();
        let weights = net
            .init(seed, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vars()
            .unwrap();
        Self {
            net,
            weights,
            lr: 0.05,
        }
    }

    fn logits(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<Tensor> {
        let support = self.net.forward(params, &episode.support)?;
        let query = self.net.forward(params, &episode.query)?;
        let dim = support.dim(1)?;
        let means = support.reshape((episode.ways, (), dim))?.mean(1)?;
        let distances = query
            .unsqueeze(1)?
            .broadcast_sub(&means.unsqueeze(0)?)?
            .sqr()?
            .sum(2)?;
        Ok(distances.neg()?)
    }
}

impl Learner for Prototypes {
    fn algorithm(&self) -> &'static str {
        "test-prototypes"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "lr": self.lr })
    }

    fn meta_train(&mut self, batch: &[EpisodeTensors]) -> Result<StepStats> {
        let params = self.weights.as_params();
        let mut total = Tensor::new(0f32, &Device::Cpu)?;
        let mut accuracy = 0.0;
        for episode in batch {
            let logits = self.logits(&params, episode)?;
            let labels = episode.labels_for("training")?;
            total = (total + ops::cross_entropy(&logits, labels)?)?;
            accuracy += ops::accuracy(&logits, labels)?;
        }
        let loss = (total / batch.len() as f64)?;
        let grads = self.weights.gradients(&loss.backward()?)?;
        self.weights
            .set(&params.detach().sgd_step(&grads, self.lr)?)?;
        Ok(StepStats {
            loss: loss.to_scalar::<f32>()? as f64,
            accuracy: accuracy / batch.len() as f64,
        })
    }

    fn predict(&self, episode: &EpisodeTensors) -> Result<Tensor> {
        self.logits(&self.weights.as_params().detach(), episode)
    }

    fn state(&self) -> Result<ParamSet> {
        Ok(self.weights.as_params().detach())
    }

    fn load_state(&mut self, state: &ParamSet) -> Result<()> {
        self.weights.set(state)
    }
}

fn episodes(split: &str, count: usize, seed: u64) -> Vec<EpisodeTensors> {
    let data = synthetic::generate(&SyntheticOptions::default()).unwrap();
    let split = if split == "train" {
        data.train.clone()
    } else {
        data.test.clone()
    };
    let spec = EpisodeSpec {
        ways: 5,
        shots: 1,
        queries: 5,
        same_group: false,
    };
    let sampler = EpisodeSampler::new(data.store.clone(), split, spec, seed).unwrap();
    sampler
        .episodes(0, count)
        .iter()
        .map(|e| EpisodeTensors::from_episode(e, &Device::Cpu, DType::F32).unwrap())
        .collect()
}

/// Generic over the trait, as evaluation will be.
fn mean_accuracy(learner: &dyn Learner, episodes: &[EpisodeTensors]) -> f64 {
    let total: f64 = episodes
        .iter()
        .map(|e| {
            ops::accuracy(&learner.predict(e).unwrap(), e.labels_for("test").unwrap()).unwrap()
        })
        .sum();
    total / episodes.len() as f64
}

#[test]
fn training_through_the_trait_lowers_the_loss() {
    let train = episodes("train", 40, 1);
    let mut learner: Box<dyn Learner> = Box::new(Prototypes::new(0));
    let first = learner.meta_train(&train[..4]).unwrap();
    for chunk in train[4..].chunks(4) {
        learner.meta_train(chunk).unwrap();
    }
    let after = learner.meta_train(&train[..4]).unwrap();
    assert!(
        after.loss < first.loss,
        "loss {} -> {}",
        first.loss,
        after.loss
    );
}

#[test]
fn a_checkpoint_alone_restores_the_learner() {
    let test = episodes("test", 3, 2);
    let mut trained: Box<dyn Learner> = Box::new(Prototypes::new(0));
    trained.meta_train(&episodes("train", 2, 3)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    trained.checkpoint().unwrap().save(&path).unwrap();

    let loaded = Checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.algorithm, "test-prototypes");
    let mut restored: Box<dyn Learner> = Box::new(Prototypes::new(99));
    restored.load_state(&loaded.tensors).unwrap();
    for episode in &test {
        let a: Vec<Vec<f32>> = trained.predict(episode).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = restored.predict(episode).unwrap().to_vec2().unwrap();
        assert_eq!(a, b);
    }
    assert_eq!(
        mean_accuracy(&*trained, &test),
        mean_accuracy(&*restored, &test)
    );
}
