//! `EmbeddingNetwork`: the conv-4 feature extractor of seed 000.

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{Conv4, Conv4Config, EpisodeTensors, ParamSet, Result};

/// Images -> embeddings, reading its weights from a parameter set.
#[derive(Debug, Clone)]
pub struct EmbeddingNetwork {
    net: Conv4,
}

impl EmbeddingNetwork {
    pub fn new(config: Conv4Config) -> Result<Self> {
        Ok(Self {
            net: Conv4::new(config)?,
        })
    }

    pub fn embedding_dim(&self) -> usize {
        self.net.config().feature_dim()
    }

    pub fn init(&self, seed: u64, device: &Device) -> Result<ParamSet> {
        self.net.init(seed, DType::F32, device)
    }

    /// (N, C, H, W) -> (N, embedding_dim). Batch norm uses the statistics of
    /// this batch, so embedding a whole episode at once normalises it as a unit.
    pub fn forward(&self, params: &ParamSet, images: &Tensor) -> Result<Tensor> {
        self.net.forward(params, images)
    }

    /// An episode's (support, query) embeddings, normalised as one batch.
    pub fn forward_episode(
        &self,
        params: &ParamSet,
        episode: &EpisodeTensors,
    ) -> Result<(Tensor, Tensor)> {
        self.net.forward_episode(params, episode)
    }
}
