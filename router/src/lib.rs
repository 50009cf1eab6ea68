//! shardseek-router: the dispatch client (token → expert all-to-all and combine, DESIGN.md §2
//! steps 4–6), expert placement, and the process supervisor behind `shardseek up`.
//!
//! Layers, bottom up: [`codec`] (f32 rows ↔ wire bytes), [`placement`] (expert → shards),
//! [`transport`] (moves one shard's batch and its reply: gRPC, or NCCL with feature `nccl`),
//! [`dispatch`] (groups a batch by shard, fans out, adds the partial sums), and [`supervisor`]
//! (child processes of a local cluster), with [`eplb`] and [`rebalancer`] (online rebalancing:
//! observed load → new placement versions published to shards and pods). The dispatcher moves rows and never computes experts
//! (STYLE.md rule 10); the expert side lives in `shardseek-worker`.

pub mod codec;
pub mod dispatch;
pub mod eplb;
pub mod gateway;
pub mod local;
pub mod openai;
pub mod placement;
pub mod rebalancer;
pub mod supervisor;
pub mod tokenizer;
pub mod transport;

pub use codec::{EncodedRows, PendingRows, RowEncoder, WireDtype};
pub use dispatch::{DispatchConfig, Dispatched, Dispatcher, Routes, ShardFailure};
pub use placement::{KeptTable, Placement};
pub use transport::{Assignments, ShardRequest, Transport};

/// Errors of the router crate. Dispatch failures name the shard (id and address) and the layer,
/// because "which pod and where" is the first question of whoever reads the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("row codec: {0}")]
    Codec(String),
    #[error("placement: {0}")]
    Placement(String),
    #[error("invalid dispatch input: {0}")]
    Input(String),
    #[error("expert shard {shard} ({addr}), layer {layer}: {reason}")]
    Shard {
        shard: usize,
        addr: String,
        layer: usize,
        reason: String,
    },
    #[error("expert shard {shard} ({addr}) refused the connection: {reason}")]
    Refused {
        shard: usize,
        addr: String,
        reason: String,
    },
    #[error("expert shard {shard} ({addr}): connecting failed: {reason}")]
    Connect {
        shard: usize,
        addr: String,
        reason: String,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process `{name}`: {reason}")]
    Process { name: String, reason: String },
    #[error("nccl: {0}")]
    Nccl(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
