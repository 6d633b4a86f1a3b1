//! Evaluation of few-shot learners, as the papers report it.
//!
//! [`evaluate`] scores a [`Learner`](fewshot_backbone::Learner) on a fixed,
//! seeded list of test episodes (the [`EvalProtocol`]): the same episodes
//! for every learner, so two evaluations can be compared episode by episode
//! with a paired t-test ([`compare`]) rather than by eyeballing overlapping
//! confidence intervals. [`summarize`] gives the mean ± 95% interval of the
//! papers, and [`write_report`] turns a run into Markdown with SVG plots.
//!
//! ```no_run
//! # fn run(learner: &dyn fewshot_backbone::Learner) -> fewshot_eval::Result<()> {
//! use fewshot_data::{synthetic, EpisodeSpec, SplitName, SyntheticOptions};
//! use fewshot_eval::{evaluate, EvalProtocol};
//!
//! let data = synthetic::generate(&SyntheticOptions::default())?;
//! let protocol = EvalProtocol {
//!     episodes: 1000,
//!     seed: 1234,
//!     spec: EpisodeSpec { ways: 5, shots: 1, queries: 15, same_group: false },
//!     split: SplitName::Test,
//!     support_copies: None,
//! };
//! let device = candle_core::Device::Cpu;
//! let mut on_progress = |_done| std::ops::ControlFlow::Continue(());
//! let result = evaluate(learner, data.store.clone(), &data.test, &protocol, &device, &mut on_progress)?;
//! println!("{:.2}% ± {:.2}%", result.accuracy.mean * 100.0, result.accuracy.ci95 * 100.0);
//! # Ok(())
//! # }
//! ```

pub mod curves;
pub mod ensemble;
pub mod error;
mod json_float;
mod plots;
pub mod protocol;
pub mod report;
mod special;
pub mod stats;

pub use ensemble::Ensemble;
pub use error::{EvalError, Result};
pub use protocol::{
    check_same_episodes, compare, evaluate, EpisodeResult, EvalProtocol, Evaluation,
};
pub use report::{accuracy_line, duration, write_report, ReportInput, TrainingRecord};
pub use stats::{paired_comparison, student_t_two_sided_p, summarize, PairedComparison, Summary};
