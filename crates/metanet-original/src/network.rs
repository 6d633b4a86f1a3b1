//! The network shared by the base learner b and the representation network
//! u: blocks of [3x3 conv (no bias), ReLU, 2x2 ceil-mode max-pool], a hidden
//! layer fc1 and one softmax head per way count, no batch norm. Every layer
//! can be augmented with fast weights: hidden layers compute
//! relu(W h) + relu(W* h), the output and the embedding W h + W* h.

use candle_core::Tensor;
use fewshot_backbone::{ops, BackboneError, ParamSet, Result};

use crate::hyperparams::MetaNetConfig;

/// Fast weights for an [`AugmentedNet`], named as the slow weights they
/// augment; layers without an entry are not augmented.
#[derive(Debug, Clone, Copy)]
pub enum Fast<'a> {
    None,
    /// One set for the whole batch (u's task-level Q*).
    Shared(&'a ParamSet),
    /// One set per image, each tensor with a leading batch axis (b's W* of
    /// each query).
    PerSample(&'a ParamSet),
}

#[derive(Debug, Clone)]
pub struct AugmentedNet {
    in_channels: usize,
    image_size: usize,
    filters: usize,
    blocks: usize,
    feature_dim: usize,
    head_widths: Vec<usize>,
}

pub const FC1: &str = "fc1.weight";

impl AugmentedNet {
    pub fn new(config: &MetaNetConfig) -> Self {
        let side = config.sides().last().copied().unwrap_or(config.image_size);
        Self {
            in_channels: config.in_channels,
            image_size: config.image_size,
            filters: config.filters,
            blocks: config.blocks,
            feature_dim: config.filters * side * side,
            head_widths: config.head_widths(),
        }
    }

    pub fn conv_name(block: usize) -> String {
        format!("conv{block}.weight")
    }

    pub fn head_name(ways: usize) -> String {
        format!("out{ways}.weight")
    }

    /// Shapes of the convolutions, in forward order.
    pub fn conv_shapes(&self) -> Vec<(String, Vec<usize>)> {
        (0..self.blocks)
            .map(|block| {
                let cin = if block == 0 {
                    self.in_channels
                } else {
                    self.filters
                };
                (Self::conv_name(block), vec![self.filters, cin, 3, 3])
            })
            .collect()
    }

    pub fn fc1_shape(&self) -> (String, Vec<usize>) {
        (FC1.into(), vec![self.filters, self.feature_dim])
    }

    pub fn head_shape(&self, ways: usize) -> (String, Vec<usize>) {
        (Self::head_name(ways), vec![ways, self.filters])
    }

    /// Every slow weight: convolutions, fc1 and a head per way count.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = self.conv_shapes();
        shapes.push(self.fc1_shape());
        shapes.extend(self.head_widths.iter().map(|&w| self.head_shape(w)));
        shapes
    }

    /// The head for `ways`, or an error naming the ways this model has.
    pub fn check_ways(&self, ways: usize) -> Result<()> {
        match self.head_widths.contains(&ways) {
            true => Ok(()),
            false => Err(BackboneError::InvalidConfig {
                field: "episode ways",
                value: ways.to_string(),
                reason: format!(
                    "this model has softmax heads for {:?} ways (n_outputs_train / n_outputs_test)",
                    self.head_widths
                ),
            }),
        }
    }

    /// The flattened output of the last block (N, filters * side * side).
    pub fn features(&self, slow: &ParamSet, fast: Fast, images: &Tensor) -> Result<Tensor> {
        let (_, channels, h, w) = images.dims4()?;
        if channels != self.in_channels || h != self.image_size || w != self.image_size {
            return Err(BackboneError::InvalidConfig {
                field: "input images",
                value: format!("{channels}x{h}x{w}"),
                reason: format!(
                    "the network expects {}x{}x{}",
                    self.in_channels, self.image_size, self.image_size
                ),
            });
        }
        let mut x = images.clone();
        for block in 0..self.blocks {
            let name = Self::conv_name(block);
            let mut y = ops::relu(&ops::conv2d(&x, slow.get(&name)?, 1, 1)?)?;
            let fast_out = match fast {
                Fast::None => None,
                Fast::Shared(f) => Some(ops::conv2d(&x, f.get(&name)?, 1, 1)?),
                Fast::PerSample(f) => Some(ops::conv2d_per_sample(&x, f.get(&name)?, 1)?),
            };
            if let Some(fast_out) = fast_out {
                y = (y + ops::relu(&fast_out)?)?;
            }
            x = ops::max_pool2x2_ceil(&y)?;
        }
        ops::flatten(&x)
    }

    /// The representation: fc1's output, augmented, without a nonlinearity
    /// (u's embedding in the reference).
    pub fn embed(&self, slow: &ParamSet, fast: Fast, images: &Tensor) -> Result<Tensor> {
        let h = self.features(slow, fast, images)?;
        let slow_out = ops::linear(&h, slow.get(FC1)?, None)?;
        match fast_linear(&h, fast, FC1)? {
            Some(fast_out) => Ok((slow_out + fast_out)?),
            None => Ok(slow_out),
        }
    }

    /// Logits (N, ways): relu(fc1 h) + relu(fc1* h), then out h + out* h.
    pub fn logits(
        &self,
        slow: &ParamSet,
        fast: Fast,
        images: &Tensor,
        ways: usize,
    ) -> Result<Tensor> {
        self.check_ways(ways)?;
        let h = self.features(slow, fast, images)?;
        let mut hidden = ops::relu(&ops::linear(&h, slow.get(FC1)?, None)?)?;
        if let Some(fast_out) = fast_linear(&h, fast, FC1)? {
            hidden = (hidden + ops::relu(&fast_out)?)?;
        }
        let head = Self::head_name(ways);
        let logits = ops::linear(&hidden, slow.get(&head)?, None)?;
        match fast_linear(&hidden, fast, &head)? {
            Some(fast_out) => Ok((logits + fast_out)?),
            None => Ok(logits),
        }
    }
}

/// `x` through the fast weight `name`, if there is one.
fn fast_linear(x: &Tensor, fast: Fast, name: &str) -> Result<Option<Tensor>> {
    match fast {
        Fast::Shared(f) if f.contains(name) => Ok(Some(ops::linear(x, f.get(name)?, None)?)),
        Fast::PerSample(f) if f.contains(name) => {
            Ok(Some(ops::linear_per_sample(x, f.get(name)?)?))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use fewshot_data::Rng;

    /// Seeded normal values, so every run checks the same network.
    fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
        let values: Vec<f64> = (0..shape.iter().product()).map(|_| rng.normal()).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn tiny() -> (AugmentedNet, ParamSet) {
        let config = MetaNetConfig {
            image_size: 5,
            filters: 3,
            blocks: 2,
            n_outputs_train: 2,
            n_outputs_test: 3,
            ..MetaNetConfig::default()
        };
        let net = AugmentedNet::new(&config);
        let mut params = ParamSet::new();
        let mut rng = Rng::seed_from(3, 0);
        for (name, shape) in net.param_shapes() {
            params.insert(name, random(&shape, &mut rng)).unwrap();
        }
        (net, params)
    }

    #[test]
    fn shapes_follow_ceil_mode_pooling_and_the_heads() {
        let (net, params) = tiny();
        // 5 -> 3 -> 2: fc1 reads 3 filters x 2 x 2.
        assert_eq!(params.get(FC1).unwrap().dims(), [3, 12]);
        let x = random(&[4, 1, 5, 5], &mut Rng::seed_from(4, 0));
        assert_eq!(
            net.logits(&params, Fast::None, &x, 3).unwrap().dims(),
            [4, 3]
        );
        let err = net
            .logits(&params, Fast::None, &x, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3]"), "{err}");
        let err = net
            .logits(&params, Fast::None, &x.narrow(2, 0, 4).unwrap(), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1x4x5"), "{err}");
    }

    #[test]
    fn augmented_layers_add_the_fast_path_after_its_own_relu() {
        let (net, slow) = tiny();
        let x = random(&[2, 1, 5, 5], &mut Rng::seed_from(5, 0));
        // Fast weights equal to the slow ones double every hidden activation
        // (relu(Wh) + relu(Wh) = 2 relu(Wh)): through two blocks and fc1 the
        // features scale by 2 per layer and pooling commutes with scaling.
        let plain = net.embed(&slow, Fast::None, &x).unwrap();
        let doubled = net.embed(&slow, Fast::Shared(&slow), &x).unwrap();
        let scaled = plain.affine(8.0, 0.0).unwrap();
        let gap = (doubled - scaled)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(gap.to_scalar::<f64>().unwrap() < 1e-9);
        // Per-sample fast weights: image 0 gets zeros (the plain network),
        // image 1 the slow weights (doubling), in one batch.
        let mut per_sample = ParamSet::new();
        for (name, w) in slow.iter() {
            let stacked = Tensor::stack(&[&w.zeros_like().unwrap(), w], 0).unwrap();
            per_sample.insert(name, stacked).unwrap();
        }
        let mixed = net
            .logits(&slow, Fast::PerSample(&per_sample), &x, 2)
            .unwrap();
        let plain = net.logits(&slow, Fast::None, &x, 2).unwrap();
        let twice = net.logits(&slow, Fast::Shared(&slow), &x, 2).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                < 1e-9
        };
        assert!(close(&mixed.get(0).unwrap(), &plain.get(0).unwrap()));
        assert!(close(&mixed.get(1).unwrap(), &twice.get(1).unwrap()));
        assert!(!close(&plain, &twice));
    }
}
