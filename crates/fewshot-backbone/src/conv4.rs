//! The conv-4 backbone of MAML, Prototypical Networks and most few-shot papers:
//! blocks of [3x3 conv, batch norm, ReLU, downsampling], then a feature head
//! and an optional linear classifier.
//!
//! The forward pass is functional: it reads its weights from a [`ParamSet`], so
//! an inner loop can run the same network on adapted weights.

use candle_core::{DType, Device, Tensor};
use fewshot_data::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{BackboneError, Result};
use crate::learner::EpisodeTensors;
use crate::ops;
use crate::params::ParamSet;

/// How each block halves the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Downsample {
    /// 3x3 convolution with stride 2 (MAML on Omniglot: 28 -> 14 -> 7 -> 4 -> 2).
    Stride2,
    /// Stride-1 convolution then 2x2 max-pooling (84 -> 42 -> 21 -> 10 -> 5).
    MaxPool,
}

/// How the last feature map becomes a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureHead {
    /// Mean over the spatial axes: `filters` features.
    SpatialMean,
    /// All of the last feature map: `filters * side * side` features.
    Flatten,
}

/// The shape of a conv-4 network. `Default` is MAML's Omniglot network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conv4Config {
    /// Image channels: 1 for Omniglot, 3 for miniImageNet.
    pub in_channels: usize,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Filters in every block.
    pub filters: usize,
    /// Number of blocks.
    pub blocks: usize,
    pub downsample: Downsample,
    /// Batch norm after each convolution, with the statistics of the batch.
    pub batch_norm: bool,
    pub batch_norm_eps: f64,
    pub feature_head: FeatureHead,
    /// Width of a linear classifier on the features (`None`: output features).
    pub classifier_outputs: Option<usize>,
}

impl Default for Conv4Config {
    fn default() -> Self {
        Self::omniglot()
    }
}

impl Conv4Config {
    /// MAML's Omniglot network: 64 filters, stride-2 convs, spatial mean.
    pub fn omniglot() -> Self {
        Self {
            in_channels: 1,
            image_size: 28,
            filters: 64,
            blocks: 4,
            downsample: Downsample::Stride2,
            batch_norm: true,
            batch_norm_eps: 1e-5,
            feature_head: FeatureHead::SpatialMean,
            classifier_outputs: None,
        }
    }

    /// MAML's miniImageNet network: 32 filters, max-pooling, flattened 5x5 map.
    pub fn mini_imagenet() -> Self {
        Self {
            in_channels: 3,
            image_size: 84,
            filters: 32,
            downsample: Downsample::MaxPool,
            feature_head: FeatureHead::Flatten,
            ..Self::omniglot()
        }
    }

    /// Side of the feature map after each block.
    pub fn sides(&self) -> Vec<usize> {
        let mut side = self.image_size;
        (0..self.blocks)
            .map(|_| {
                side = match self.downsample {
                    Downsample::Stride2 => side.div_ceil(2),
                    Downsample::MaxPool => side / 2,
                };
                side
            })
            .collect()
    }

    /// Length of the feature vector before the classifier.
    pub fn feature_dim(&self) -> usize {
        let side = self.sides().last().copied().unwrap_or(self.image_size);
        match self.feature_head {
            FeatureHead::SpatialMean => self.filters,
            FeatureHead::Flatten => self.filters * side * side,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |field, value: String, reason: &str| {
            Err(BackboneError::InvalidConfig {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("filters", self.filters),
            ("blocks", self.blocks),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "must be at least 1");
            }
        }
        if self.sides().contains(&0) {
            return invalid(
                "image_size",
                self.image_size.to_string(),
                &format!("too small for {} max-pooling blocks", self.blocks),
            );
        }
        if self.classifier_outputs == Some(0) {
            return invalid("classifier_outputs", "0".into(), "must be at least 1");
        }
        if self.batch_norm_eps.is_nan() || self.batch_norm_eps <= 0.0 {
            return invalid(
                "batch_norm_eps",
                self.batch_norm_eps.to_string(),
                "must be positive",
            );
        }
        Ok(())
    }
}

/// A conv-4 network: a validated config and the functional forward pass.
#[derive(Debug, Clone)]
pub struct Conv4 {
    config: Conv4Config,
    fused_blocks: bool,
}

impl Conv4 {
    pub fn new(config: Conv4Config) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            fused_blocks: true,
        })
    }

    /// Whether a max-pooling block normalised by its batch runs as one op,
    /// [`ops::conv_batch_norm_relu_pool`] (the default), or as a convolution
    /// then [`ops::batch_norm_relu_pool`]. The values are the same. Fused,
    /// candle's backward does not add the convolution's output gradient to a
    /// tensor of zeros: a conv-4 training step is 5-6% faster. But a graph
    /// differentiated a second time (second-order MAML) reaches that output
    /// along two paths, and fused the convolution's backward runs once per
    /// path instead of once on their sum: a MAML++ step was 7-11% slower.
    pub fn with_fused_blocks(mut self, fused: bool) -> Self {
        self.fused_blocks = fused;
        self
    }

    pub fn config(&self) -> &Conv4Config {
        &self.config
    }

    /// Names and shapes of every parameter, in forward order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.config;
        let mut shapes = Vec::new();
        for block in 0..c.blocks {
            let cin = if block == 0 { c.in_channels } else { c.filters };
            shapes.push((conv_name(block), vec![c.filters, cin, 3, 3]));
            if c.batch_norm {
                shapes.push((bn_gamma_name(block), vec![c.filters]));
                shapes.push((bn_beta_name(block), vec![c.filters]));
            }
        }
        if let Some(outputs) = c.classifier_outputs {
            shapes.push((HEAD_WEIGHT.into(), vec![outputs, c.feature_dim()]));
            shapes.push((HEAD_BIAS.into(), vec![outputs]));
        }
        shapes
    }

    /// Fresh weights: Glorot-uniform convolutions and classifier (as the MAML
    /// reference), batch norm scale 1 and shift 0, zero classifier bias.
    pub fn init(&self, seed: u64, dtype: DType, device: &Device) -> Result<ParamSet> {
        let mut rng = Rng::seed_from(seed, 0);
        let mut params = ParamSet::new();
        for (name, shape) in self.param_shapes() {
            let count: usize = shape.iter().product();
            let values: Vec<f64> = if name.ends_with("bn.weight") {
                vec![1.0; count]
            } else if name.ends_with(".bias") {
                vec![0.0; count]
            } else {
                let receptive: usize = shape[2..].iter().product();
                let fan_in = shape[1] * receptive;
                let fan_out = shape[0] * receptive;
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..count)
                    .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                    .collect()
            };
            // Cast on the host: some devices (Metal) have no f64.
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?;
            params.insert(name, tensor)?;
        }
        Ok(params)
    }

    /// Images (N, C, H, W) -> features (N, feature_dim), or logits
    /// (N, classifier_outputs) when the config has a classifier.
    pub fn forward(&self, params: &ParamSet, images: &Tensor) -> Result<Tensor> {
        let features = self.features(params, images)?;
        self.head(params, features)
    }

    /// As [`Conv4::forward`] on `images`, but every batch norm uses the
    /// statistics of `reference` (passed through the same layers) instead of
    /// those of `images`: with a task's support set as the reference, each
    /// query's output depends on the support set and itself only.
    pub fn forward_normalised_by(
        &self,
        params: &ParamSet,
        reference: &Tensor,
        images: &Tensor,
    ) -> Result<Tensor> {
        let rows = reference.dim(0)?;
        let both = Tensor::cat(&[reference, images], 0)?;
        let features = self.blocks(params, &both, Statistics::Reference(rows), None)?;
        let features = features.narrow(0, rows, images.dim(0)?)?;
        self.head(params, features)
    }

    /// An episode's support and query images through the net in one batch,
    /// so batch norm normalises the episode as a unit (transductive, as MAML,
    /// and as the Prototypical Networks code trains): (support outputs,
    /// query outputs).
    pub fn forward_episode(
        &self,
        params: &ParamSet,
        episode: &EpisodeTensors,
    ) -> Result<(Tensor, Tensor)> {
        let n_support = episode.support.dim(0)?;
        let n_query = episode.query.dim(0)?;
        let images = Tensor::cat(&[&episode.support, &episode.query], 0)?;
        let outputs = self.forward(params, &images)?;
        Ok((
            outputs.narrow(0, 0, n_support)?,
            outputs.narrow(0, n_support, n_query)?,
        ))
    }

    /// As [`Conv4::forward`], also returning each batch norm's statistics
    /// of this batch (detached), named as [`Conv4::initial_running_statistics`].
    pub fn forward_recording_statistics(
        &self,
        params: &ParamSet,
        images: &Tensor,
    ) -> Result<(Tensor, ParamSet)> {
        let mut statistics = ParamSet::new();
        let features = self.blocks(params, images, Statistics::Batch, Some(&mut statistics))?;
        Ok((self.head(params, features)?, statistics))
    }

    /// As [`Conv4::forward`], but every batch norm normalises by the given
    /// statistics (running averages over training batches, named as
    /// [`Conv4::initial_running_statistics`]) instead of the batch's: each
    /// image's output depends on itself only, as in PyTorch's `eval()` mode.
    pub fn forward_with_statistics(
        &self,
        params: &ParamSet,
        statistics: &ParamSet,
        images: &Tensor,
    ) -> Result<Tensor> {
        let features = self.blocks(params, images, Statistics::Given(statistics), None)?;
        self.head(params, features)
    }

    /// Running statistics as PyTorch starts them (mean 0, variance 1 per
    /// channel), under the names the other statistics methods use; empty
    /// without batch norm.
    pub fn initial_running_statistics(&self, dtype: DType, device: &Device) -> Result<ParamSet> {
        let c = &self.config;
        let mut statistics = ParamSet::new();
        if c.batch_norm {
            for block in 0..c.blocks {
                statistics.insert(
                    running_mean_name(block),
                    Tensor::zeros(c.filters, dtype, device)?,
                )?;
                statistics.insert(
                    running_var_name(block),
                    Tensor::ones(c.filters, dtype, device)?,
                )?;
            }
        }
        Ok(statistics)
    }

    /// The feature vector, ignoring any classifier.
    pub fn features(&self, params: &ParamSet, images: &Tensor) -> Result<Tensor> {
        self.blocks(params, images, Statistics::Batch, None)
    }

    fn head(&self, params: &ParamSet, features: Tensor) -> Result<Tensor> {
        match self.config.classifier_outputs {
            Some(_) => ops::linear(
                &features,
                params.get(HEAD_WEIGHT)?,
                Some(params.get(HEAD_BIAS)?),
            ),
            None => Ok(features),
        }
    }

    /// The blocks and the feature head, batch norm normalising by `statistics`;
    /// with `record`, each batch norm's batch statistics are added to it.
    fn blocks(
        &self,
        params: &ParamSet,
        images: &Tensor,
        statistics: Statistics,
        mut record: Option<&mut ParamSet>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (_, channels, h, w) = images.dims4()?;
        if channels != c.in_channels || h != c.image_size || w != c.image_size {
            return Err(BackboneError::input_shape(
                (channels, h, w),
                (c.in_channels, c.image_size, c.image_size),
            ));
        }
        let mut x = images.clone();
        let (stride, pool) = match c.downsample {
            Downsample::Stride2 => (2, false),
            Downsample::MaxPool => (1, true),
        };
        let eps = c.batch_norm_eps;
        for block in 0..c.blocks {
            let weight = params.get(&conv_name(block))?;
            if !c.batch_norm {
                x = max_pool_if(pool, ops::relu(&ops::conv2d(&x, weight, stride, 1)?)?)?;
                continue;
            }
            let gamma = params.get(&bn_gamma_name(block))?;
            let beta = params.get(&bn_beta_name(block))?;
            if self.fused_blocks
                && pool
                && matches!(statistics, Statistics::Batch)
                && record.is_none()
            {
                // The whole block in one op: see ops::conv_batch_norm_relu_pool.
                x = ops::conv_batch_norm_relu_pool(&x, weight, (gamma, beta), (stride, 1), eps)?;
                continue;
            }
            x = ops::conv2d(&x, weight, stride, 1)?;
            if let Some(record) = record.as_deref_mut() {
                let (mean, var) = ops::channel_moments(&x.detach())?;
                record.insert(running_mean_name(block), mean)?;
                record.insert(running_var_name(block), var)?;
            }
            x = match statistics {
                // The block's ending in one op: see ops::batch_norm_relu_pool.
                Statistics::Batch if pool => ops::batch_norm_relu_pool(&x, gamma, beta, eps)?,
                Statistics::Batch => ops::batch_norm_relu(&x, gamma, beta, eps)?,
                Statistics::Reference(rows) => {
                    let y = ops::batch_norm_relu_by_reference(&x, rows, gamma, beta, eps)?;
                    max_pool_if(pool, y)?
                }
                Statistics::Given(given) => {
                    let mean = given.get(&running_mean_name(block))?;
                    let var = given.get(&running_var_name(block))?;
                    let y = ops::batch_norm_relu_with_statistics(&x, mean, var, gamma, beta, eps)?;
                    max_pool_if(pool, y)?
                }
            };
        }
        match c.feature_head {
            FeatureHead::SpatialMean => ops::spatial_mean(&x),
            FeatureHead::Flatten => ops::flatten(&x),
        }
    }
}

/// Where the batch norms of a forward pass take their statistics from.
#[derive(Clone, Copy)]
enum Statistics<'a> {
    /// The whole batch.
    Batch,
    /// The first this many images of the batch.
    Reference(usize),
    /// Given, named as [`Conv4::initial_running_statistics`].
    Given(&'a ParamSet),
}

fn max_pool_if(pool: bool, x: Tensor) -> Result<Tensor> {
    match pool {
        true => ops::max_pool2x2(&x),
        false => Ok(x),
    }
}

pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";

fn conv_name(block: usize) -> String {
    format!("block{block}.conv.weight")
}

fn bn_gamma_name(block: usize) -> String {
    format!("block{block}.bn.weight")
}

fn bn_beta_name(block: usize) -> String {
    format!("block{block}.bn.bias")
}

fn running_mean_name(block: usize) -> String {
    format!("block{block}.bn.running_mean")
}

fn running_var_name(block: usize) -> String {
    format!("block{block}.bn.running_var")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest absolute difference between two f64 tensors.
    fn max_gap(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn literature_shapes() {
        let omniglot = Conv4Config::omniglot();
        assert_eq!(omniglot.sides(), vec![14, 7, 4, 2]);
        assert_eq!(omniglot.feature_dim(), 64);
        let mini = Conv4Config::mini_imagenet();
        assert_eq!(mini.sides(), vec![42, 21, 10, 5]);
        assert_eq!(mini.feature_dim(), 800);
    }

    #[test]
    fn forward_gives_features_or_logits() {
        let config = Conv4Config {
            filters: 8,
            classifier_outputs: Some(5),
            ..Conv4Config::omniglot()
        };
        let net = Conv4::new(config).unwrap();
        let params = net.init(7, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::rand(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
        assert_eq!(net.forward(&params, &x).unwrap().dims(), [3, 5]);
        assert_eq!(net.features(&params, &x).unwrap().dims(), [3, 8]);

        let mini = Conv4::new(Conv4Config {
            filters: 4,
            ..Conv4Config::mini_imagenet()
        })
        .unwrap();
        let params = mini.init(7, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::rand(0f32, 1., (2, 3, 84, 84), &Device::Cpu).unwrap();
        assert_eq!(mini.forward(&params, &x).unwrap().dims(), [2, 100]);
    }

    #[test]
    fn normalising_by_a_reference_uses_its_statistics_only() {
        let config = Conv4Config {
            filters: 8,
            classifier_outputs: Some(5),
            ..Conv4Config::omniglot()
        };
        let net = Conv4::new(config).unwrap();
        let params = net.init(3, DType::F64, &Device::Cpu).unwrap();
        let x = Tensor::rand(0f64, 1., (4, 1, 28, 28), &Device::Cpu).unwrap();
        // The images as their own reference: the plain forward pass.
        let own = net.forward_normalised_by(&params, &x, &x).unwrap();
        assert!(max_gap(&own, &net.forward(&params, &x).unwrap()) < 1e-12);
        // Another reference: each image's output no longer depends on the others.
        let reference = Tensor::rand(0f64, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
        let all = net.forward_normalised_by(&params, &reference, &x).unwrap();
        let first = x.narrow(0, 0, 1).unwrap();
        let alone = net
            .forward_normalised_by(&params, &reference, &first)
            .unwrap();
        assert!(max_gap(&all.narrow(0, 0, 1).unwrap(), &alone) < 1e-12);
    }

    #[test]
    fn recorded_statistics_reproduce_the_batch_and_free_each_image() {
        let net = Conv4::new(Conv4Config {
            filters: 8,
            ..Conv4Config::omniglot()
        })
        .unwrap();
        let params = net.init(5, DType::F64, &Device::Cpu).unwrap();
        let x = Tensor::rand(0f64, 1., (6, 1, 28, 28), &Device::Cpu).unwrap();
        let (batch_out, statistics) = net.forward_recording_statistics(&params, &x).unwrap();
        let initial = net
            .initial_running_statistics(DType::F64, &Device::Cpu)
            .unwrap();
        for (name, start) in initial.iter() {
            assert_eq!(statistics.get(name).unwrap().dims(), start.dims());
        }
        assert_eq!(statistics.names(), initial.names());
        assert_eq!(initial.len(), 8);
        // Normalised by its own statistics, given: the batch's own output.
        let given = net
            .forward_with_statistics(&params, &statistics, &x)
            .unwrap();
        assert!(max_gap(&given, &batch_out) < 1e-10);
        // An image alone with the same statistics: its row of the batch.
        let alone = net
            .forward_with_statistics(&params, &statistics, &x.narrow(0, 2, 1).unwrap())
            .unwrap();
        assert!(max_gap(&alone, &given.narrow(0, 2, 1).unwrap()) < 1e-10);
        // Missing statistics are named.
        let err = net
            .forward_with_statistics(&params, &ParamSet::new(), &x)
            .unwrap_err()
            .to_string();
        assert!(err.contains("block0.bn.running_mean"), "{err}");
    }

    #[test]
    fn init_is_seeded() {
        let net = Conv4::new(Conv4Config::omniglot()).unwrap();
        let a = net.init(1, DType::F32, &Device::Cpu).unwrap();
        let b = net.init(1, DType::F32, &Device::Cpu).unwrap();
        let c = net.init(2, DType::F32, &Device::Cpu).unwrap();
        let first = |p: &ParamSet| -> Vec<f32> {
            p.get("block0.conv.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(first(&a), first(&b));
        assert_ne!(first(&a), first(&c));
    }

    #[test]
    fn bad_configs_and_inputs_are_named() {
        let err = Conv4::new(Conv4Config {
            image_size: 8,
            ..Conv4Config::mini_imagenet()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("image_size") && err.contains('8'), "{err}");
        let err = Conv4::new(Conv4Config {
            filters: 0,
            ..Conv4Config::omniglot()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("filters"), "{err}");

        let net = Conv4::new(Conv4Config::omniglot()).unwrap();
        let params = net.init(0, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
        let err = net.forward(&params, &x).unwrap_err().to_string();
        assert!(err.contains("1x32x32") && err.contains("1x28x28"), "{err}");
    }
}
