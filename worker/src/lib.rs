//! shardseek-worker: the DeepSeek-V3 model (config, weights, layers) and generation.
//!
//! Layers of the crate, bottom up: [`config`] (config.json), [`weights`] (mapped safetensors),
//! [`backend`] (the compute interface the model is written in; the CPU backend is the kernels
//! crate), [`kv`] (the paged latent cache), [`model`] (forward pass), [`experts`] (routed
//! experts behind a trait, local or remote), [`engine`] (continuous batching, the one
//! generation loop, the sampler), [`generate`] (one request in process, and its JSON result).
//! [`pull`] downloads a model from the Hugging Face hub (`shardseek model pull`).

pub mod attention;
pub mod backend;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod expert;
pub mod experts;
pub mod generate;
pub mod kv;
pub mod kv_sizing;
pub mod metrics;
pub mod model;
pub mod modelgen;
pub mod placement_control;
pub mod prefix;
pub mod pull;
pub mod remote;
pub mod serve;
pub mod speed;
pub mod weights;

pub use error::{Error, Result};
/// The tokenizer lives with the router (which tokenizes requests); re-exported for the CLI.
pub use shardseek_router::tokenizer;
