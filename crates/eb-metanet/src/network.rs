//! `MetaNetwork`: the embedding network and the meta-learner end to end.

use candle_core::{Device, Tensor};
use fewshot_backbone::{EpisodeTensors, ParamSet, Result};

use crate::embedding::EmbeddingNetwork;
use crate::hyperparams::EbMetaNetConfig;
use crate::meta_learner::MetaLearner;

const EMBEDDING: &str = "embedding.";
const META_LEARNER: &str = "meta_learner.";

#[derive(Debug, Clone)]
pub struct MetaNetwork {
    pub embedding: EmbeddingNetwork,
    pub meta_learner: MetaLearner,
}

impl MetaNetwork {
    pub fn new(config: &EbMetaNetConfig) -> Result<Self> {
        let embedding = EmbeddingNetwork::new(config.embedding.clone())?;
        let meta_learner = MetaLearner {
            embedding_dim: embedding.embedding_dim(),
            hidden_dim: config.hidden_dim,
        };
        Ok(Self {
            embedding,
            meta_learner,
        })
    }

    /// All weights, named `embedding.*` and `meta_learner.*`.
    pub fn init(&self, seed: u64, device: &Device) -> Result<ParamSet> {
        let mut params = self.embedding.init(seed, device)?.with_prefix(EMBEDDING);
        params.extend(
            &self
                .meta_learner
                .init(seed, device)?
                .with_prefix(META_LEARNER),
        )?;
        Ok(params)
    }

    /// Query logits (queries x ways). Support and query are embedded in one
    /// batch, so batch norm sees the whole episode (transductive, like MAML).
    pub fn logits(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<Tensor> {
        let (support, query) = self
            .embedding
            .forward_episode(&params.strip_prefix(EMBEDDING), episode)?;
        let meta_params = params.strip_prefix(META_LEARNER);
        let fast_weights = self.meta_learner.fast_weights(
            &meta_params,
            &support,
            &episode.support_labels,
            episode.ways,
        )?;
        self.meta_learner
            .logits(&meta_params, &query, &fast_weights)
    }
}
