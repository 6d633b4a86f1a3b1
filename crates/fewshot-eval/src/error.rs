//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while evaluating, comparing or reporting;
/// each variant names the file, run or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The learner or the tensor code under it failed. (Transparent: a
    /// message of its own would print the source's twice in an error chain.)
    #[error(transparent)]
    Backbone(#[from] fewshot_backbone::BackboneError),

    /// Episodes could not be sampled (bad spec, too few classes or images).
    #[error(transparent)]
    Data(#[from] fewshot_data::DataError),

    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        // Not named `source`: the message already holds it, and an error
        // source would print the reason twice in `{:#}` chains.
        error: std::io::Error,
    },

    /// Two things that must agree do not, e.g. two runs evaluated on
    /// different episodes, or logits of the wrong shape.
    #[error("mismatch: {what}")]
    Mismatch { what: String },

    /// Nothing to compute a statistic or an evaluation from.
    #[error("nothing to evaluate: {what}")]
    Empty { what: String },

    /// The caller's progress callback asked to stop (see
    /// [`evaluate`](crate::evaluate)).
    #[error("stopped after {done} of {episodes} episodes")]
    Stopped { done: usize, episodes: usize },

    /// A plot could not be drawn.
    #[error("{path}: cannot draw plot: {message}")]
    Plot { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, EvalError>;
