//! Errors of the backbone crate.

use std::path::PathBuf;

/// Everything that can go wrong in the backbone: each variant names the value,
/// parameter or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Data(#[from] fewshot_data::DataError),

    #[error("device `{requested}` is not available: {reason}")]
    DeviceUnavailable { requested: String, reason: String },

    #[error("invalid {field} `{value}`: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("parameter `{name}` {problem}")]
    Parameter { name: String, problem: String },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        // Not named `source`: the message already holds it, and an error
        // source would print the reason twice in `{:#}` chains.
        error: std::io::Error,
    },

    #[error(
        "second-order gradients are not available: candle detaches gradients during backward \
         unless the environment variable CANDLE_GRAD_DO_NOT_DETACH=1 is set before the program \
         starts (check gave d2(x^3)/dx2 at x=3 = {measured}, expected 18)"
    )]
    SecondOrderUnavailable { measured: f64 },
}

impl BackboneError {
    /// Images of (channels, height, width) `got` given to a network that
    /// reads `expected`: says which settings to make agree.
    pub fn input_shape(got: (usize, usize, usize), expected: (usize, usize, usize)) -> Self {
        Self::InvalidConfig {
            field: "input images",
            value: format!("{}x{}x{}", got.0, got.1, got.2),
            reason: format!(
                "the network reads {}x{}x{} (channels x height x width): make the learner's \
                 network settings (in_channels, image_size) and the data's (data.channels, \
                 data.image_size) agree",
                expected.0, expected.1, expected.2
            ),
        }
    }
}

pub type Result<T> = std::result::Result<T, BackboneError>;
