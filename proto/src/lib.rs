//! shardseek-proto: the contracts between shardseek processes (DESIGN.md §1, §4).
//!
//! The gRPC services (`Expert`, `Attention`, `Gateway`, `Placement`) are generated from `proto/shardseek/v1/`
//! by `build.rs`; this crate adds the few helpers every side of a connection needs to agree on —
//! the model fingerprint and the metadata keys that carry it.

/// Generated messages, clients and servers of package `shardseek.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("shardseek.v1");
}

pub mod cluster_config;
pub mod codec;
mod fingerprint;
pub mod frames;
pub mod rows;

pub use fingerprint::{
    METADATA_MODEL, METADATA_SHARDS, fingerprint_from_config, fingerprint_from_model_dir,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config.json is not valid JSON: {0}")]
    ConfigJson(#[source] serde_json::Error),
    #[error("config.json has no usable `{key}` (an unsigned integer is required)")]
    ConfigKey { key: &'static str },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
