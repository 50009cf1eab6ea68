//! The one error type of the worker crate.

use std::path::PathBuf;

/// Everything that can go wrong loading or running the model. Variants carry the context a
/// user needs to fix the input: the config key, the tensor and its file, the expected shape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config.json: key `{key}`: {detail}")]
    Config { key: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tensor `{tensor}` in {file}: {detail}")]
    Tensor {
        tensor: String,
        file: String,
        detail: String,
    },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("expert dispatch failed at layer {layer}: {detail}")]
    Dispatch { layer: usize, detail: String },
    /// A model pull's request failed: the URL and what the server (or network) said.
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    /// A pulled file does not match the hub's listing; the bad file has been removed.
    #[error("{file}: {what} mismatch: the hub lists {expected}, the download has {actual}")]
    Mismatch {
        file: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    /// The requested compute device cannot be used.
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Kernel(#[from] shardseek_kernels::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn config_err(key: &str, detail: impl Into<String>) -> Error {
    Error::Config {
        key: key.to_string(),
        detail: detail.into(),
    }
}
