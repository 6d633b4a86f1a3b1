//! The networks of the base learner b and the representation network u:
//! blocks of [3x3 conv (no bias), batch norm on the first few (u only),
//! ReLU, 2x2 ceil-mode max-pool], hidden fully connected layers and one
//! softmax head per way count. Every conv block after the normalised ones
//! and every fully connected layer can be augmented with fast weights:
//! hidden layers compute relu(W h) + relu(W* h), the output and the
//! embedding W h + W* h.
//!
//! On Omniglot both are 5 conv blocks and fc1 (SPEC.md). On miniImageNet u
//! has batch norm on its first three blocks and fast weights on its last two
//! only, and b is an MLP (two hidden layers) on u's embeddings: a network
//! with no conv blocks whose input is a vector.

use candle_core::Tensor;
use fewshot_backbone::{ops, BackboneError, ParamSet, Result};

use crate::hyperparams::{BaseLearner, MetaNetConfig};

/// Fast weights for an [`AugmentedNet`], named as the slow weights they
/// augment; layers without an entry are not augmented.
#[derive(Debug, Clone, Copy)]
pub enum Fast<'a> {
    None,
    /// One set for the whole batch (u's task-level Q*).
    Shared(&'a ParamSet),
    /// One set per input, each tensor with a leading batch axis (b's W* of
    /// each query).
    PerSample(&'a ParamSet),
}

/// What a network reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Square images (N, channels, size, size).
    Images { channels: usize, size: usize },
    /// Vectors (N, dim): u's embeddings, for an MLP base learner.
    Vector(usize),
}

#[derive(Debug, Clone)]
pub struct AugmentedNet {
    input: Input,
    filters: usize,
    blocks: usize,
    /// Leading conv blocks with batch norm (never fast weights).
    batch_norm_blocks: usize,
    /// Trailing conv blocks that take fast weights.
    fast_blocks: usize,
    hidden_layers: usize,
    /// Width of the features and of every hidden layer.
    width: usize,
    head_widths: Vec<usize>,
}

/// u's hidden layer, whose augmented output is the embedding.
pub const FC1: &str = "fc1.weight";

/// Batch norm's epsilon (Chainer's default, as the reference).
const BATCH_NORM_EPS: f64 = 2e-5;

impl AugmentedNet {
    /// The representation network u.
    pub fn key(config: &MetaNetConfig) -> Self {
        let side = config.sides().last().copied().unwrap_or(config.image_size);
        Self {
            input: Input::Images {
                channels: config.in_channels,
                size: config.image_size,
            },
            filters: config.filters,
            blocks: config.blocks,
            batch_norm_blocks: config.key_batch_norm_blocks,
            fast_blocks: config.fast_block_count(),
            hidden_layers: 1,
            width: config.filters * side * side,
            head_widths: config.head_widths(),
        }
    }

    /// The base learner b: the same conv net without batch norm, or an MLP
    /// on u's embeddings.
    pub fn base(config: &MetaNetConfig) -> Self {
        let key = Self::key(config);
        let (input, blocks) = match config.base {
            BaseLearner::Conv => (key.input, key.blocks),
            BaseLearner::Mlp => (Input::Vector(key.width), 0),
        };
        Self {
            input,
            blocks,
            batch_norm_blocks: 0,
            fast_blocks: config.fast_block_count().min(blocks),
            hidden_layers: config.base_hidden_layers,
            ..key
        }
    }

    pub fn conv_name(block: usize) -> String {
        format!("conv{block}.weight")
    }

    pub fn hidden_name(layer: usize) -> String {
        format!("fc{}.weight", layer + 1)
    }

    pub fn head_name(ways: usize) -> String {
        format!("out{ways}.weight")
    }

    fn batch_norm_names(block: usize) -> (String, String) {
        (format!("bn{block}.weight"), format!("bn{block}.bias"))
    }

    /// Shapes of the convolutions, in forward order.
    pub fn conv_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let channels = match self.input {
            Input::Images { channels, .. } => channels,
            Input::Vector(_) => 0,
        };
        (0..self.blocks)
            .map(|block| {
                let cin = if block == 0 { channels } else { self.filters };
                (Self::conv_name(block), vec![self.filters, cin, 3, 3])
            })
            .collect()
    }

    /// The convolutions that take fast weights (the last `fast_blocks`).
    pub fn fast_conv_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = self.conv_shapes();
        shapes.drain(..self.blocks - self.fast_blocks);
        shapes
    }

    /// Shapes of the hidden layers, in forward order.
    pub fn hidden_shapes(&self) -> Vec<(String, Vec<usize>)> {
        (0..self.hidden_layers)
            .map(|layer| (Self::hidden_name(layer), vec![self.width, self.width]))
            .collect()
    }

    pub fn head_shape(&self, ways: usize) -> (String, Vec<usize>) {
        (Self::head_name(ways), vec![ways, self.width])
    }

    /// Every slow weight: convolutions, batch-norm scales and shifts, hidden
    /// layers and a head per way count.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = self.conv_shapes();
        for block in 0..self.batch_norm_blocks {
            let (scale, shift) = Self::batch_norm_names(block);
            shapes.push((scale, vec![self.filters]));
            shapes.push((shift, vec![self.filters]));
        }
        shapes.extend(self.hidden_shapes());
        shapes.extend(self.head_widths.iter().map(|&w| self.head_shape(w)));
        shapes
    }

    /// Whether `name` (possibly prefixed) is a batch-norm scale, which
    /// starts at 1 rather than at random.
    pub fn is_batch_norm_scale(name: &str) -> bool {
        let mut parts = name.rsplit('.');
        parts.next() == Some("weight") && parts.next().is_some_and(|layer| layer.starts_with("bn"))
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

    /// The features the hidden layers read (N, width): the last conv block's
    /// output flattened, or the input vectors. Batch norm uses the statistics
    /// of the first `reference_rows` inputs (the support set's).
    fn features(
        &self,
        slow: &ParamSet,
        fast: Fast,
        input: &Tensor,
        reference_rows: usize,
    ) -> Result<Tensor> {
        let (channels, size) = match self.input {
            Input::Vector(dim) => {
                let (_, got) = input.dims2()?;
                if got != dim {
                    return Err(BackboneError::InvalidConfig {
                        field: "base learner input",
                        value: format!("{:?}", input.dims()),
                        reason: format!("the MLP base learner reads embeddings of {dim}"),
                    });
                }
                return Ok(input.clone());
            }
            Input::Images { channels, size } => (channels, size),
        };
        let (_, got_channels, h, w) = input.dims4()?;
        if got_channels != channels || h != size || w != size {
            return Err(BackboneError::input_shape(
                (got_channels, h, w),
                (channels, size, size),
            ));
        }
        let mut x = input.clone();
        for block in 0..self.blocks {
            let name = Self::conv_name(block);
            let conv = ops::conv2d(&x, slow.get(&name)?, 1, 1)?;
            let mut y = match block < self.batch_norm_blocks {
                true => {
                    let (scale, shift) = Self::batch_norm_names(block);
                    let (scale, shift) = (slow.get(&scale)?, slow.get(&shift)?);
                    match reference_rows == conv.dim(0)? {
                        true => ops::batch_norm_relu(&conv, scale, shift, BATCH_NORM_EPS)?,
                        false => ops::batch_norm_relu_by_reference(
                            &conv,
                            reference_rows,
                            scale,
                            shift,
                            BATCH_NORM_EPS,
                        )?,
                    }
                }
                false => ops::relu(&conv)?,
            };
            let fast_out = match fast {
                Fast::Shared(f) if f.contains(&name) => Some(ops::conv2d(&x, f.get(&name)?, 1, 1)?),
                Fast::PerSample(f) if f.contains(&name) => {
                    Some(ops::conv2d_per_sample(&x, f.get(&name)?, 1)?)
                }
                _ => None,
            };
            if let Some(fast_out) = fast_out {
                y = (y + ops::relu(&fast_out)?)?;
            }
            x = ops::max_pool2x2_ceil(&y)?;
        }
        ops::flatten(&x)
    }

    /// The representation: the hidden layers, the last one augmented
    /// without a nonlinearity (u's embedding in the reference), batch norm
    /// with the statistics of the first `reference_rows` inputs.
    pub fn embed(
        &self,
        slow: &ParamSet,
        fast: Fast,
        input: &Tensor,
        reference_rows: usize,
    ) -> Result<Tensor> {
        let mut h = self.features(slow, fast, input, reference_rows)?;
        for layer in 0..self.hidden_layers {
            let hidden = layer + 1 < self.hidden_layers;
            h = augmented_linear(&h, slow, fast, &Self::hidden_name(layer), hidden)?;
        }
        Ok(h)
    }

    /// Logits (N, ways): every hidden layer relu(W h) + relu(W* h), then the
    /// head W h + W* h; batch norm with the statistics of the whole batch.
    pub fn logits(
        &self,
        slow: &ParamSet,
        fast: Fast,
        input: &Tensor,
        ways: usize,
    ) -> Result<Tensor> {
        self.check_ways(ways)?;
        let mut h = self.features(slow, fast, input, input.dim(0)?)?;
        for layer in 0..self.hidden_layers {
            h = augmented_linear(&h, slow, fast, &Self::hidden_name(layer), true)?;
        }
        augmented_linear(&h, slow, fast, &Self::head_name(ways), false)
    }

    /// Whether the network has batch norm (whose statistics make one input's
    /// output depend on the others in its batch).
    pub fn has_batch_norm(&self) -> bool {
        self.batch_norm_blocks > 0
    }

    /// Whether the network reads images (else u's embeddings).
    pub fn reads_images(&self) -> bool {
        matches!(self.input, Input::Images { .. })
    }
}

/// The fully connected layer `name` with its fast weight, if any: with
/// `relu`, relu(W x) + relu(W* x), else W x + W* x.
fn augmented_linear(
    x: &Tensor,
    slow: &ParamSet,
    fast: Fast,
    name: &str,
    relu: bool,
) -> Result<Tensor> {
    let activate = |t: Tensor| if relu { ops::relu(&t) } else { Ok(t) };
    let slow_out = activate(ops::linear(x, slow.get(name)?, None)?)?;
    let fast_out = match fast {
        Fast::Shared(f) if f.contains(name) => Some(ops::linear(x, f.get(name)?, None)?),
        Fast::PerSample(f) if f.contains(name) => Some(ops::linear_per_sample(x, f.get(name)?)?),
        _ => None,
    };
    match fast_out {
        Some(fast_out) => Ok((slow_out + activate(fast_out)?)?),
        None => Ok(slow_out),
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
        let net = AugmentedNet::key(&config);
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
        assert_eq!(params.get(FC1).unwrap().dims(), [12, 12]);
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
        let plain = net.embed(&slow, Fast::None, &x, 2).unwrap();
        let doubled = net.embed(&slow, Fast::Shared(&slow), &x, 2).unwrap();
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
