//! The whole Meta Network: base learner b, representation network u and the
//! two generator pairs, with their weights in one [`ParamSet`]:
//! `base.*`, `key.*`, `task_generator.{conv,fc}.*`,
//! `example_generator.{conv,fc}.*`.

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
    net: AugmentedNet,
    task_generator: TaskGenerator,
    example_generator: ExampleGenerator,
}

impl MetaNetwork {
    pub fn new(config: &MetaNetConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
            net: AugmentedNet::new(config),
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
        let mut shapes = prefixed(BASE, self.net.param_shapes());
        shapes.extend(prefixed(KEY, self.net.param_shapes()));
        for prefix in [TASK_CONV, TASK_FC] {
            shapes.extend(prefixed(prefix, self.task_generator.param_shapes()));
        }
        for prefix in [EXAMPLE_CONV, EXAMPLE_FC] {
            shapes.extend(prefixed(prefix, self.example_generator.param_shapes()));
        }
        shapes
    }

    /// Fresh weights: He-normal convolutions and linear maps in b and u,
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
            let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(DType::F32)?;
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
    /// on detached copies of the slow weights: constants to what follows.
    pub fn meta_info(&self, params: &ParamSet, episode: &EpisodeTensors) -> Result<MetaInfo> {
        let ways = episode.ways;
        self.net.check_ways(ways)?;
        let k = self.config.gradient_k;
        let support_count = episode.support.dim(0)?;
        // One backward pass; the preprocessed gradient (P, 2) of each of
        // `shapes`' weights, appended to its list.
        let gradients = |leaves: &VarSet,
                         images: &Tensor,
                         labels: &Tensor,
                         shapes: &Shapes,
                         lists: &mut Vec<Vec<Tensor>>| {
            let logits = self
                .net
                .logits(&leaves.as_params(), Fast::None, images, ways)?;
            let grads = ops::cross_entropy(&logits, labels)?.backward()?;
            let grads = leaves.gradients(&grads)?;
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

        let (mut key_shapes, key_fc) = self.key_groups();
        key_shapes.extend(key_fc);
        let leaves = params.strip_prefix(KEY).detach().to_vars()?;
        let chunks = self.config.gradient_chunks.min(support_count);
        let mut key_lists = Vec::new();
        for chunk in 0..chunks {
            // Strided, so that each chunk mixes classes (support is class-major).
            let rows: Vec<u32> = (chunk..support_count)
                .step_by(chunks)
                .map(|i| i as u32)
                .collect();
            let rows = Tensor::new(rows.as_slice(), episode.support.device())?;
            let images = episode.support.index_select(&rows, 0)?;
            let labels = episode.support_labels.index_select(&rows, 0)?;
            gradients(&leaves, &images, &labels, &key_shapes, &mut key_lists)?;
        }

        let (mut base_shapes, base_fc) = self.base_groups(ways);
        base_shapes.extend(base_fc);
        let leaves = params.strip_prefix(BASE).detach().to_vars()?;
        let mut example_lists = Vec::new();
        for i in 0..support_count {
            let image = episode.support.narrow(0, i, 1)?;
            let label = episode.support_labels.narrow(0, i, 1)?;
            gradients(&leaves, &image, &label, &base_shapes, &mut example_lists)?;
        }
        Ok(MetaInfo {
            key: stacked(&key_shapes, key_lists)?,
            example: stacked(&base_shapes, example_lists)?,
        })
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
        let (key_conv, key_fc) = self.key_groups();
        let mut key_fast = ParamSet::new();
        for (prefix, shapes) in [(TASK_CONV, key_conv), (TASK_FC, key_fc)] {
            let generator = params.strip_prefix(prefix);
            for (name, shape) in shapes {
                let fast = self
                    .task_generator
                    .forward(&generator, info.key.get(&name)?)?;
                key_fast.insert(name, fast.reshape(shape)?)?;
            }
        }
        let support_keys = self.net.embed(
            &params.strip_prefix(KEY),
            Fast::Shared(&key_fast),
            &episode.support,
        )?;

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
        let query_keys = self.net.embed(
            &params.strip_prefix(KEY),
            Fast::Shared(&task.key_fast),
            queries,
        )?;
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
        self.net.logits(
            &params.strip_prefix(BASE),
            Fast::PerSample(&fast),
            queries,
            task.ways,
        )
    }

    /// u's weights with task-level fast weights: the convolutions, and fc1
    /// (its head only makes the representation loss).
    fn key_groups(&self) -> (Shapes, Shapes) {
        (self.net.conv_shapes(), vec![self.net.fc1_shape()])
    }

    /// b's weights with example-level fast weights, in the reference's two
    /// groups (each with its own generator): the convolutions, and fc1 with
    /// the episode's head.
    fn base_groups(&self, ways: usize) -> (Shapes, Shapes) {
        (
            self.net.conv_shapes(),
            vec![self.net.fc1_shape(), self.net.head_shape(ways)],
        )
    }
}
