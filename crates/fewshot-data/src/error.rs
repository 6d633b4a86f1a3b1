//! The one error type of this crate.
//!
//! Every variant carries what a person needs to fix the problem without a
//! debugger: the file, the line, the field or the value that was wrong.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading, caching or sampling data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset folder (or a part of it) is not where we looked; `help`
    /// says how to get the data and where to put it.
    #[error("{dataset} not found at {path}\n{help}")]
    MissingDataset {
        dataset: String,
        path: PathBuf,
        help: String,
    },

    /// A file or folder could not be read or written.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        // Not named `source`: the message already holds it, and an error
        // source would print the reason twice in `{:#}` chains.
        error: std::io::Error,
    },

    /// An image file exists but cannot be decoded.
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },

    /// A line of a split list or CSV file is malformed or names something unknown.
    #[error("{file}:{line}: {message}")]
    SplitLine {
        file: PathBuf,
        line: usize,
        message: String,
    },

    /// A folder that should hold classes or images holds none.
    #[error("{path}: no {expected} found")]
    EmptyFolder { path: PathBuf, expected: String },

    /// A class has fewer images than an episode needs from it.
    #[error("class {class} has {have} images, but {need} are needed")]
    TooFewImages {
        class: String,
        have: usize,
        need: usize,
    },

    /// A split has fewer classes than an episode needs.
    #[error("split {split} has {have} classes, but {need} are needed")]
    TooFewClasses {
        split: String,
        have: usize,
        need: usize,
    },

    /// An option or parameter has a value we cannot work with.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidSpec {
        field: &'static str,
        value: String,
        reason: String,
    },

    /// A download from the hub failed (`file` is `owner/repo/path`).
    #[error("downloading {file}: {message}")]
    Download { file: String, message: String },

    /// A downloaded file is not the one its manifest lists: it was deleted,
    /// so the next fetch downloads it anew.
    #[error(
        "{file}: SHA-256 {actual} differs from the manifest's {expected}; the corrupt download \
         was deleted, fetch again to download it anew"
    )]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },

    /// A cache file is unusable. Loaders log this as a warning and rebuild,
    /// so it only reaches users who call the cache directly.
    #[error("cache file {path}: {message}")]
    Cache { path: PathBuf, message: String },
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// Wraps an I/O error together with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_says_its_path_and_reason_once() {
        let err = DataError::io("/data/x.png", std::io::ErrorKind::NotFound.into());
        assert_eq!(err.to_string(), "/data/x.png: entity not found");
        // No error source: a chain printer (anyhow's `{:#}`) adds nothing.
        assert!(std::error::Error::source(&err).is_none());
    }
}
