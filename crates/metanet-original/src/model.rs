//! The whole Meta Network: base learner b, representation network u and the
//! two generator pairs, with their weights in one [`ParamSet`]:
//! `base.*`, `key.*`, `task_generator.{conv,fc}.*`,
//! `example_generator.{conv,fc}.*` (a conv generator only where its network
//! has conv layers with fast weights).

use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{ops, BackboneError, EpisodeTensors, ParamSet, Result, VarSet};
use fewshot_data::Rng;

use crate::generators::{ExampleGenerator, TaskGenerator};
use crate::hyperparams::MetaNetConfig;
use crate::memory;
use crate::meta_info::preprocess;
use crate::network::{AugmentedNet, Fast};

const BASE: &str = "base.";
const KEY: &str = "key.";
const TASK_CONV: &str = "task_generator.conv.";
const TASK_FC: &str = "task_generator.fc.";
const EXAMPLE_CONV: &str = "example_generator.conv.";
const EXAMPLE_FC: &str = "example_generator.fc.";

type Shapes = Vec<(String, Vec<usize>)>;

/// The support set's preprocessed loss gradients, per weight tensor that
/// gets fast weights (named as in [`AugmentedNet`]; P its element count).
/// Kept per tensor rather than concatenated so that the fast weights are made
/// and read per tensor too: slicing one long vector per query costs a
/// zero-padded copy of it per slice in the backward pass.
#[derive(Debug, Clone)]
pub struct MetaInfo {
    /// u's gradients on each of the T chunks of the support set, (T, P, 2):
    /// the LSTMs' inputs.
    pub key: ParamSet,
    /// b's gradients on each of the N support examples alone, (N, P, 2).
    pub example: ParamSet,
}

/// What a task's support set leaves for its queries.
#[derive(Debug, Clone)]
pub struct TaskMemory {
    ways: usize,
    /// The support images: with batch norm in u, a query is embedded with
    /// the support set's statistics.
    support: Tensor,
    /// u's task-level fast weights Q*.
    key_fast: ParamSet,
    /// u's representation of each support example (N, E).
    support_keys: Tensor,
    /// b's example-level fast weights W*_i, per weight tensor one row per
    /// support example (N, P).
    memory: ParamSet,
}

#[derive(Debug, Clone)]
pub struct MetaNetwork {
    config: MetaNetConfig,
    key: AugmentedNet,
    base: AugmentedNet,
    task_generator: TaskGenerator,
    example_generator: ExampleGenerator,
}

impl MetaNetwork {
    pub fn new(config: &MetaNetConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
            key: AugmentedNet::key(config),
            base: AugmentedNet::base(config),
            task_generator: TaskGenerator {
                hidden: config.generator_hidden,
            },
            example_generator: ExampleGenerator {
                hidden: config.generator_hidden,
            },
        })
    }

    pub fn param_shapes(&self) -> Shapes {
        let prefixed = |prefix: &str, shapes: Shapes| -> Shapes {
            shapes
                .into_iter()
                .map(|(name, shape)| (format!("{prefix}{name}"), shape))
                .collect()
        };
        let mut shapes = prefixed(BASE, self.base.param_shapes());
        shapes.extend(prefixed(KEY, self.key.param_shapes()));
        let generators = [
            (
                TASK_CONV,
                self.key.fast_conv_shapes(),
                self.task_generator.param_shapes(),
            ),
            (
                TASK_FC,
                self.key.hidden_shapes(),
                self.task_generator.param_shapes(),
            ),
            (
                EXAMPLE_CONV,
                self.base.fast_conv_shapes(),
                self.example_generator.param_shapes(),
            ),
            (
                EXAMPLE_FC,
                self.base.hidden_shapes(),
                self.example_generator.param_shapes(),
            ),
        ];
        for (prefix, serves, generator) in generators {
            if !serves.is_empty() {
                shapes.extend(prefixed(prefix, generator));
            }
        }
        shapes
    }

    /// Fresh weights: He-normal convolutions and linear maps in b and u,
    /// batch-norm scales 1 and shifts 0,
    /// Glorot-uniform generator layers, zero biases but the LSTMs' forget
    /// gates' (1, so the cell keeps the earlier chunks at first), and zero
    /// generator output layers: every fast weight starts
    /// at 0, so training starts from the plain slow-weight networks rather
    /// than from random fast weights larger than the
    /// slow ones (which the reference's default initialisation gives).
    pub fn init(&self, seed: u64, device: &Device) -> Result<ParamSet> {
        let mut rng = Rng::seed_from(seed, 0);
        let hidden = self.config.generator_hidden;
        let mut params = ParamSet::new();
        for (name, shape) in self.param_shapes() {
            let count: usize = shape.iter().product();
            let generator_output = name.contains("generator.") && name.contains(".out.");
            let values: Vec<f64> = if generator_output {
                vec![0.0; count]
            } else if name.ends_with("lstm.bias") {
                (0..count)
                    .map(|i| {
                        if (hidden..2 * hidden).contains(&i) {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect()
            } else if name.ends_with("bias") {
                vec![0.0; count]
            } else if AugmentedNet::is_batch_norm_scale(&name) {
                vec![1.0; count]
            } else if name.starts_with(BASE) || name.starts_with(KEY) {
                // He: keeps the activations' scale through five ReLU blocks
                // without batch norm (Glorot halves the variance at every one).
                let fan_in: usize = shape[1..].iter().product();
                let std = (2.0 / fan_in as f64).sqrt();
                (0..count).map(|_| rng.normal() * std).collect()
            } else {
                let bound = (6.0 / (shape[0] + shape[1]) as f64).sqrt();
                (0..count)
                    .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                    .collect()
            };
            // Cast on the host: some devices (Metal) have no f64.
            let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_device(device)?;
            params.insert(name, tensor)?;
        }
        Ok(params)
    }

    /// Logits (queries x ways) for all of the episode's queries.
    pub fn logits(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<Tensor> {
        let memory = self.remember(params, episode)?;
        self.classify(params, &memory, &episode.query)
    }

    /// Reads the support set: its meta information, then what the queries
    /// need from it ([`MetaNetwork::generate`]).
    pub fn remember(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<TaskMemory> {
        let info = self.meta_info(params, episode)?;
        self.generate(params, episode, &info)
    }

    /// The support set's loss gradients, preprocessed: u's representation
    /// loss on T chunks of it, and b's loss on each example alone. Computed
    /// on detached copies of the weights: constants to what follows.
    pub fn meta_info(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<MetaInfo> {
        let ways = episode.ways;
        self.key.check_ways(ways)?;
        let k = self.config.gradient_k;
        let support_count = episode.support.dim(0)?;
        // The preprocessed gradient (P, 2) of each of `shapes`' weights for
        // the loss of `logits` against `labels`, appended to its list.
        let gradients = |leaves: &VarSet,
                         logits: &Tensor,
                         labels: &Tensor,
                         shapes: &Shapes,
                         lists: &mut Vec<Vec<Tensor>>| {
            let loss = ops::cross_entropy(logits, labels)?;
            let grads = leaves.gradients(&loss.backward()?)?;
            lists.resize(shapes.len(), Vec::new());
            for ((name, _), list) in shapes.iter().zip(lists.iter_mut()) {
                list.push(preprocess(&grads.get(name)?.detach().flatten_all()?, k)?);
            }
            Ok::<_, BackboneError>(())
        };
        let stacked = |shapes: &Shapes, lists: Vec<Vec<Tensor>>| {
            let mut out = ParamSet::new();
            for ((name, _), list) in shapes.iter().zip(lists) {
                out.insert(name, Tensor::stack(&list, 0)?)?;
            }
            Ok::<_, BackboneError>(out)
        };

        // u on the whole support set (batch norm sees all of it, as in the
        // reference), then one loss per chunk.
        let (mut key_shapes, key_fc) = self.key_groups();
        key_shapes.extend(key_fc);
        let leaves = params.strip_prefix(KEY).detach().to_vars()?;
        let logits = self
            .key
            .logits(&leaves.as_params(), Fast::None, &episode.support, ways)?;
        let chunks = self.config.gradient_chunks.min(support_count);
        let mut key_lists = Vec::new();
        for chunk in 0..chunks {
            // Strided, so that each chunk mixes classes (support is class-major).
            let rows: Vec<u32> = (chunk..support_count)
                .step_by(chunks)
                .map(|i| i as u32)
                .collect();
            let rows = Tensor::new(rows.as_slice(), logits.device())?;
            gradients(
                &leaves,
                &logits.index_select(&rows, 0)?,
                &episode.support_labels.index_select(&rows, 0)?,
                &key_shapes,
                &mut key_lists,
            )?;
        }
        let key = stacked(&key_shapes, key_lists)?;

        // b on each support example alone: its image, or (an MLP b) its
        // embedding by u with the task-level fast weights.
        let base_input = match self.base.reads_images() {
            true => episode.support.clone(),
            false => {
                let detached = params.detach();
                let key_fast = self.key_fast_weights(&detached, &key)?;
                self.embed_support(&detached, &key_fast, &episode.support)?
            }
        };
        let (mut base_shapes, base_fc) = self.base_groups(ways);
        base_shapes.extend(base_fc);
        let leaves = params.strip_prefix(BASE).detach().to_vars()?;
        let mut example_lists = Vec::new();
        for i in 0..support_count {
            let logits = self.base.logits(
                &leaves.as_params(),
                Fast::None,
                &base_input.narrow(0, i, 1)?,
                ways,
            )?;
            gradients(
                &leaves,
                &logits,
                &episode.support_labels.narrow(0, i, 1)?,
                &base_shapes,
                &mut example_lists,
            )?;
        }
        Ok(MetaInfo {
            key,
            example: stacked(&base_shapes, example_lists)?,
        })
    }

    /// u's task-level fast weights Q* from its meta information.
    fn key_fast_weights(&self, params: &ParamSet, key_info: &ParamSet) -> Result<ParamSet> {
        let (key_conv, key_fc) = self.key_groups();
        let mut key_fast = ParamSet::new();
        for (prefix, shapes) in [(TASK_CONV, key_conv), (TASK_FC, key_fc)] {
            let generator = params.strip_prefix(prefix);
            for (name, shape) in shapes {
                let fast = self
                    .task_generator
                    .forward(&generator, key_info.get(&name)?)?;
                key_fast.insert(name, fast.reshape(shape)?)?;
            }
        }
        Ok(key_fast)
    }

    /// u's embeddings of the support set, augmented with Q*.
    fn embed_support(
        &self,
        params: &ParamSet,
        key_fast: &ParamSet,
        support: &Tensor,
    ) -> Result<Tensor> {
        let rows = support.dim(0)?;
        self.key.embed(
            &params.strip_prefix(KEY),
            Fast::Shared(key_fast),
            support,
            rows,
        )
    }

    /// From the meta information: u's task-level fast weights Q*, the
    /// support examples' representations under them, and the memory of b's
    /// example-level fast weights. Differentiable in every slow weight.
    pub fn generate(
        &self,
        params: &ParamSet,
        episode: &EpisodeTensors,
        info: &MetaInfo,
    ) -> Result<TaskMemory> {
        let key_fast = self.key_fast_weights(params, &info.key)?;
        let support_keys = self.embed_support(params, &key_fast, &episode.support)?;
        let (base_conv, base_fc) = self.base_groups(episode.ways);
        let mut memory = ParamSet::new();
        for (prefix, shapes) in [(EXAMPLE_CONV, base_conv), (EXAMPLE_FC, base_fc)] {
            let generator = params.strip_prefix(prefix);
            for (name, _) in shapes {
                let (examples, count, _) = info.example.get(&name)?.dims3()?;
                let inputs = info.example.get(&name)?.reshape((examples * count, 2))?;
                let fast = self.example_generator.forward(&generator, &inputs)?;
                memory.insert(name, fast.reshape((examples, count))?)?;
            }
        }
        Ok(TaskMemory {
            ways: episode.ways,
            support: episode.support.clone(),
            key_fast,
            support_keys,
            memory,
        })
    }

    /// Logits (queries x ways): each query reads its fast weights from the
    /// task's memory and runs through b augmented with them.
    pub fn classify(
        &self,
        params: &ParamSet,
        task: &TaskMemory,
        queries: &Tensor,
    ) -> Result<Tensor> {
        let key_params = params.strip_prefix(KEY);
        let key_fast = Fast::Shared(&task.key_fast);
        let query_keys = match self.key.has_batch_norm() {
            // Normalised with the support set's statistics: a query's
            // output depends on its task, not on the other queries.
            true => {
                let support_count = task.support.dim(0)?;
                let both = Tensor::cat(&[&task.support, queries], 0)?;
                self.key
                    .embed(&key_params, key_fast, &both, support_count)?
                    .narrow(0, support_count, queries.dim(0)?)?
            }
            false => self
                .key
                .embed(&key_params, key_fast, queries, queries.dim(0)?)?,
        };
        let attention = memory::attention(&task.support_keys, &query_keys)?;
        let (mut shapes, fc) = self.base_groups(task.ways);
        shapes.extend(fc);
        let mut fast = ParamSet::new();
        for (name, shape) in shapes {
            let rows = memory::read(&attention, task.memory.get(&name)?)?;
            let mut dims = vec![rows.dim(0)?];
            dims.extend(shape);
            fast.insert(name, rows.reshape(dims)?)?;
        }
        let base_input = match self.base.reads_images() {
            true => queries,
            false => &query_keys,
        };
        self.base.logits(
            &params.strip_prefix(BASE),
            Fast::PerSample(&fast),
            base_input,
            task.ways,
        )
    }

    /// u's weights with task-level fast weights: its fast conv blocks, and
    /// its hidden layer fc1 (its head only makes the representation loss).
    fn key_groups(&self) -> (Shapes, Shapes) {
        (self.key.fast_conv_shapes(), self.key.hidden_shapes())
    }

    /// b's weights with example-level fast weights, in the reference's two
    /// groups (each with its own generator): its fast conv blocks, and its
    /// hidden layers with the episode's head.
    fn base_groups(&self, ways: usize) -> (Shapes, Shapes) {
        let mut fc = self.base.hidden_shapes();
        fc.push(self.base.head_shape(ways));
        (self.base.fast_conv_shapes(), fc)
    }
}
