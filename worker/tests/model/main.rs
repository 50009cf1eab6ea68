//! Integration tests of the model core: reference fixtures, an f64 reference of the same
//! math, cache consistency, determinism, bad input, and `model pull` from a local hub.

mod alloc;
mod bad_input;
mod consistency;
#[cfg(feature = "cuda")]
mod cuda;
mod engine;
mod fixtures;
mod kv_dtype;
mod pull;
mod reference;
mod variants;
