//! The attention pod's engine: a continuous-batching scheduler over the paged latent cache
//! (DESIGN.md §2, step 2). It knows nothing of HTTP or gRPC (STYLE.md rule 12): requests come
//! in through [`Engine::submit`], events go out through each request's channel.
//!
//! Every step builds one batch under `max_batch_tokens`: each running sequence contributes its
//! pending tokens — one for a decoding sequence, a chunk of the prompt for a prefilling one
//! (chunked prefill) — and waiting requests join as soon as blocks and slots allow. When the
//! pool runs dry the newest running request is preempted: its blocks are freed and it is
//! recomputed later from its prompt and the tokens it already produced, so a request that fits
//! the limits never fails for lack of cache.

//!
//! Sampling is [`sampler`]: one batched sampler with a logits-processing stage in front of
//! selection. [`run_blocking`] drives the same scheduling loop on the calling thread; that is
//! how `shardseek generate` runs a request in process, so there is one generation loop.

pub mod grammar;
pub mod logits;
pub mod sampler;
mod scheduler;

pub use scheduler::{
    Engine, EngineConfig, EngineRequest, EngineStats, Event, RequestHandle, SubmitError,
    run_blocking,
};
