//! Integration tests of the model core: reference fixtures, an f64 reference of the same
//! math, cache consistency, determinism, and bad input.

mod bad_input;
mod consistency;
mod engine;
mod fixtures;
mod kv_dtype;
mod reference;
mod variants;
