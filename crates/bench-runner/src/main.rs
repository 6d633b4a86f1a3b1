//! `fewshot`: the command line of the few-shot workspace.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};

mod bench;
mod config;
mod continuation;
mod curves;
mod datasets;
mod device_check;
mod evaluation;
mod fetch;
mod inspect;
mod interrupt;
mod kernel_bench;
mod learners;
#[cfg(test)]
mod portable_path;
mod predict;
mod progress;
mod run_dir;
mod step_clock;
mod train;

use config::{DataConfig, DatasetKind, ExperimentConfig};
use fewshot_data::SplitName;

// glibc malloc costs ~1.8x in candle-heavy loops here (page faults on every
// large temporary); mimalloc keeps freed pages around.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

const RAYON_THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// mimalloc's `mi_option_purge_delay` (libmimalloc-sys names only some options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How much address space mimalloc reserves up front, in one arena.
const RESERVED_ARENA_BYTES: usize = 4 << 30;

/// `fewshot config C | head` ends quietly, as Unix tools do, when the reader
/// closes the pipe: Rust ignores SIGPIPE, so without this every `println!`
/// after the close panics with a backtrace.
fn end_quietly_when_stdout_closes() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Tells mimalloc never to return freed memory to the OS. A training step
/// frees and reallocates the same large buffers; by default mimalloc purges
/// them after a second and the next step pays a page fault (and the zeroing of
/// a huge page) on every first touch: 10,000 faults and ~25% of a conv-4
/// training step (`perf stat -e page-faults`).
///
/// Allocations of tens of megabytes (Meta Networks' per-query fast weights)
/// get pages of their own that are given back on free whatever the purge
/// delay, unless they come from an arena reserved in advance: without it the
/// kernel's page zeroing was 17% of a metanet-original step (`perf record`
/// of the `step_parts` example); with it a run's page faults no longer grow
/// with its steps (`perf stat -e page-faults fewshot train
/// configs/metanet-original-omniglot-5w1s.json --stop-after 10`, then 30:
/// 885, then 873). Reserving only claims address space; pages are backed
/// when first touched.
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; mimalloc documents it as safe at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let mut arena: libmimalloc_sys::mi_arena_id_t = std::ptr::null_mut();
    // SAFETY: mimalloc takes the address space for a new arena; `arena` is a
    // valid place for its id. Failure only costs speed, so it is logged.
    let status = unsafe {
        libmimalloc_sys::mi_reserve_os_memory_ex(
            RESERVED_ARENA_BYTES,
            true,
            true,
            false,
            &mut arena,
        )
    };
    if status != 0 {
        tracing::debug!(
            status,
            "mimalloc could not reserve its arena; large buffers will page-fault"
        );
    }
}

#[derive(Parser)]
#[command(name = "fewshot", version, about = "Few-shot meta-learning on candle")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Look at a dataset, or fetch one.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Meta-train a learner from a JSON experiment config, then evaluate it.
    /// Ctrl-C stops after the current step (or within a running
    /// validation) with a checkpoint (--resume continues); a second Ctrl-C
    /// ends at once.
    Train {
        config: PathBuf,
        /// The run directory (default: runs/<config name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue a stopped or killed run from its last checkpoint.
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps in all (resume later with --resume).
        #[arg(long)]
        stop_after: Option<u64>,
        /// With --resume: go on even where this build would not continue the
        /// run bit for bit (other code, data, CPU or thread count).
        #[arg(long, requires = "resume")]
        resume_anyway: bool,
    },
    /// Evaluate a run directory or a checkpoint on its experiment's test episodes.
    Eval {
        target: PathBuf,
        /// Number of test episodes (default: the experiment's).
        #[arg(long)]
        episodes: Option<usize>,
        /// Seed of the test episodes (default: the experiment's).
        #[arg(long)]
        seed: Option<u64>,
        /// Classes per test episode (default: the experiment's).
        #[arg(long)]
        ways: Option<usize>,
        /// Support images per class (default: the experiment's).
        #[arg(long)]
        shots: Option<usize>,
        /// Query images per class (default: the experiment's).
        #[arg(long)]
        queries: Option<usize>,
        /// Classes to draw the episodes from: train, val or test (default:
        /// the experiment's, test).
        #[arg(long)]
        split: Option<SplitName>,
        /// Test on the characters as drawn, never rotated: Vinyals' rot000
        /// classes only, no random rotation in MAML's split (the Meta
        /// Networks reference code's test protocol).
        #[arg(long)]
        unrotated: bool,
        /// Test-time augmentation: add this many distorted copies of every
        /// support image (Koch et al.'s distortions unless the experiment's
        /// `evaluation.support_copies` says others); 0 for none (default:
        /// the experiment's).
        #[arg(long)]
        support_copies: Option<usize>,
        /// Change a field of the learner's section for this test, not its
        /// weights, e.g. `--set inner_steps_test=10` (MAML); repeatable.
        /// VALUE is read as JSON, else as a string.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Average the logits of the run's kept validated checkpoints
        /// (`training.keep_best`), as MAML++'s reference tests its 5 best;
        /// TARGET must be a run directory.
        #[arg(long)]
        ensemble: bool,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Paired comparison of two evaluations on the same episodes.
    ///
    /// Refuses evaluations of different episodes: another seed, count or
    /// shape, or other classes (another split convention, e.g. MAML's and
    /// Vinyals' Omniglot, or another data folder).
    Compare {
        /// A run directory, or a JSON file from `fewshot eval --json`.
        a: PathBuf,
        b: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Validation accuracy against training time of several runs: each
    /// run's best, when it first reached `--target`, and one SVG plot.
    Curves {
        /// Run directories (each with its metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// A validation accuracy to reach, in percent (e.g. 95.8).
        #[arg(long)]
        target: Option<f64>,
        /// Where the plot goes.
        #[arg(long, default_value = "validation-curves.svg")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Classify query images given labelled support images.
    Predict {
        #[arg(long)]
        checkpoint: PathBuf,
        /// One sub-folder per class, holding that class's images.
        #[arg(long)]
        support: PathBuf,
        /// The images to classify.
        #[arg(long)]
        query: PathBuf,
        /// Test-time augmentation: add this many distorted copies of every
        /// support image (Koch et al.'s distortions unless the experiment's
        /// `evaluation.support_copies` says others); 0 for none (default:
        /// the experiment's).
        #[arg(long)]
        support_copies: Option<usize>,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a run's evaluated checkpoint as a small model file (weights and
    /// experiment config, no optimiser state), e.g. into models/.
    Publish {
        /// A finished run directory, or a JSON file from `fewshot eval --json`
        /// (its checkpoint is the one published, with its result and the
        /// learner fields its `--set` changed).
        run: PathBuf,
        model: PathBuf,
    },
    /// Check an experiment config and print it with every default filled in.
    Config {
        /// The JSON config; omit it with --defaults.
        config: Option<PathBuf>,
        /// Print the default config.
        #[arg(long)]
        defaults: bool,
    },
    /// Check that a device (a GPU) computes what the CPU kernels compute:
    /// second order on the device, every op's value and gradients to second
    /// order, MAML's meta-gradient, and training steps of every learner.
    /// Exits with an error if any differs beyond its tolerance. `--device
    /// cpu` checks the portable path (what GPUs run) against the kernels.
    CheckDevice {
        #[arg(long, default_value = "auto")]
        device: String,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Run a benchmark suite.
    Bench {
        #[arg(long, value_enum, default_value = "data")]
        suite: bench::Suite,
        /// The experiment config whose learner `--suite train` times.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        /// Episodes to sample (data) or to train on (train).
        #[arg(long, default_value_t = 20_000)]
        episodes: usize,
        /// Kernel cases to run (all when absent): train-conv4-28, train-conv4-84,
        /// train-conv4-105, train-conv5-128-56, protonet-60way-28, maml2-1step-28,
        /// maml2-5step-28, maml2-5step-84, maml2-batch32-28, eval-conv4-28.
        #[arg(long = "case")]
        cases: Vec<String>,
        /// Timed repetitions of each kernel case (after one warm-up step).
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        /// The device of the kernels and train suites (default: cpu for
        /// kernels, the config's for train).
        #[arg(long)]
        device: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Counts of alphabets, classes and images per split, and the load time.
    Inspect {
        #[command(flatten)]
        data: DataArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Download a dataset from the Hugging Face hub into the folder its
    /// loader reads, checking every file's SHA-256; a broken download
    /// resumes where it stopped. Needs a build with `--features download`.
    Fetch {
        /// The dataset's folder name.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(fetch::DATASET_FOLDERS))]
        dataset: String,
        /// The folder that holds one sub-folder per dataset (default: $FEWSHOT_DATA_DIR).
        #[arg(long)]
        root: Option<PathBuf>,
        /// A manifest of your own (hub repository, revision, files and
        /// checksums) instead of the one that comes with fewshot.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The hub's address (default: $HF_ENDPOINT, else https://huggingface.co).
        #[arg(long)]
        endpoint: Option<String>,
    },
}

/// Which dataset, where, at what size.
#[derive(clap::Args)]
struct DataArgs {
    #[arg(long, value_enum, default_value = "synthetic")]
    dataset: DatasetArg,
    /// The dataset folder (default: $FEWSHOT_DATA_DIR/<dataset>).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Side of the square images (default 28; 84 for miniImageNet,
    /// tieredImageNet and CUB; 32 for CIFAR-FS and FC100).
    #[arg(long)]
    image_size: Option<usize>,
    /// Decode every image again instead of using the cache.
    #[arg(long)]
    no_cache: bool,
    /// Named per-channel statistics the inputs are normalised with, as a
    /// config's `data.normalize` (`imagenet`); default: none (v / 255).
    #[arg(long)]
    normalize: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DatasetArg {
    Omniglot,
    MiniImagenet,
    TieredImagenet,
    CifarFs,
    Fc100,
    Cub,
    Folder,
    Synthetic,
}

impl DataArgs {
    fn to_config(&self) -> DataConfig {
        DataConfig {
            dataset: match self.dataset {
                DatasetArg::Omniglot => DatasetKind::Omniglot,
                DatasetArg::MiniImagenet => DatasetKind::MiniImagenet,
                DatasetArg::TieredImagenet => DatasetKind::TieredImagenet,
                DatasetArg::CifarFs => DatasetKind::CifarFs,
                DatasetArg::Fc100 => DatasetKind::Fc100,
                DatasetArg::Cub => DatasetKind::Cub,
                DatasetArg::Folder => DatasetKind::Folder,
                DatasetArg::Synthetic => DatasetKind::Synthetic,
            },
            root: self.root.clone(),
            image_size: self.image_size,
            cache: !self.no_cache,
            normalize: self.normalize.clone().map(config::NormalizeSetting::Named),
            ..DataConfig::default()
        }
    }
}

fn main() {
    end_quietly_when_stdout_closes();
    // candle reads this once per thread, so it must be set before any thread
    // starts: without it second-order gradients are silently zero.
    if std::env::var_os(fewshot_backbone::second_order::ENV_VAR).is_none() {
        std::env::set_var(fewshot_backbone::second_order::ENV_VAR, "1");
    }
    // candle's elementwise thread pool spins 25,000 times after each op before
    // parking; on two cores that spinning starves the kernels' rayon threads.
    // 2,000 measured best on every kernel case (200 parks too early: MAML's
    // tiny support-set ops then pay a wake-up each). Read when the pool
    // starts, so set it first.
    if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_VAR, "2000");
    }
    // candle asks how many threads may share a matmul on every matmul; with
    // RAYON_NUM_THREADS unset it answers by parsing /proc/cpuinfo (over a
    // thousand times a second in MAML training: 80 MAML steps took 7%
    // longer, docs/RESULTS.md). Setting the variable to candle's own answer
    // keeps its matmuls' thread count and makes the question an environment
    // read. Rayon's pool then has that many threads too: the physical cores
    // rather than the logical ones, where they differ.
    if std::env::var_os(RAYON_THREADS_VAR).is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var(RAYON_THREADS_VAR, threads.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    keep_freed_memory();
    let cli = Cli::parse();
    // Run the command on one of rayon's worker threads: the kernels' parallel
    // loops then split from inside the pool instead of handing every op from
    // the main thread to a worker and back, two thread switches per op.
    if let Err(error) = rayon::scope(|_| run(cli)) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    // A misspelt FEWSHOT_OPS_PATH stops the program rather than being
    // ignored; a forced portable path is said, since it is much slower.
    let ops_path = fewshot_backbone::ops::path::configured()?;
    if ops_path == fewshot_backbone::ops::path::OpsPath::Portable {
        tracing::info!("FEWSHOT_OPS_PATH=portable: candle's own ops, not the CPU kernels");
    }
    match cli.command {
        Command::Data {
            command: DataCommand::Inspect { data, json },
        } => inspect::run(&data.to_config(), json),
        Command::Data {
            command:
                DataCommand::Fetch {
                    dataset,
                    root,
                    manifest,
                    endpoint,
                },
        } => fetch::run(&dataset, root.as_deref(), manifest.as_deref(), endpoint),
        Command::Train {
            config,
            out,
            resume,
            stop_after,
            resume_anyway,
        } => train::run(&train::TrainOptions {
            config,
            out,
            resume,
            stop_after,
            resume_anyway,
        }),
        Command::Eval {
            target,
            episodes,
            seed,
            ways,
            shots,
            queries,
            split,
            unrotated,
            support_copies,
            settings,
            ensemble,
            device,
            json,
        } => {
            let device = open_device(&device)?;
            let algorithm = settings
                .iter()
                .map(|s| evaluation::parse_setting(s))
                .collect::<Result<_>>()?;
            let overrides = evaluation::Overrides {
                episodes,
                seed,
                ways,
                shots,
                queries,
                split,
                unrotated,
                support_copies,
                algorithm,
                ensemble: Vec::new(),
            };
            evaluation::run_eval(&target, &device, overrides, ensemble, json)
        }
        Command::Compare { a, b, json } => evaluation::run_compare(&a, &b, json),
        Command::Curves {
            runs,
            target,
            out,
            json,
        } => curves::run(&runs, target, &out, json),
        Command::Predict {
            checkpoint,
            support,
            query,
            support_copies,
            device,
            json,
        } => {
            let device = open_device(&device)?;
            predict::run(&checkpoint, &support, &query, support_copies, &device, json)
        }
        Command::Publish { run, model } => evaluation::publish(&run, &model),
        Command::Config { config, defaults } => {
            let config = match (config, defaults) {
                (_, true) => ExperimentConfig::default(),
                (Some(path), false) => {
                    let mut config = ExperimentConfig::from_file(&path)?;
                    // The learner's crate checks its section and fills in its defaults.
                    let learner = learners::build(&config.algorithm.clone().into(), &Device::Cpu)
                        .with_context(|| format!("config {}", path.display()))?;
                    if let serde_json::Value::Object(section) = learner.config() {
                        config.algorithm = section;
                    }
                    config
                }
                (None, false) => anyhow::bail!("give a config file, or --defaults"),
            };
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Bench {
            suite,
            config,
            data,
            episodes,
            cases,
            repeats,
            device,
            json,
        } => bench::run(bench::BenchArgs {
            suite,
            data: &data.to_config(),
            experiment: config.as_deref(),
            episodes,
            cases: &cases,
            repeats,
            device: device.map(|d| d.parse()).transpose()?,
            as_json: json,
        }),
        Command::CheckDevice { device, json } => device_check::run(device.parse()?, json),
    }
}

fn open_device(choice: &str) -> Result<candle_core::Device> {
    let choice: fewshot_backbone::DeviceChoice = choice.parse()?;
    Ok(choice.open()?)
}
