//! Moving one shard's batch and bringing back its reply, behind one trait so the dispatch logic
//! does not care whether rows go over gRPC (always available, what tests use) or NCCL (GPU
//! nodes, feature `nccl`).

use std::future::Future;
use std::time::Duration;

use crate::codec::{EncodedRows, PendingRows, WireDtype};
use crate::{Error, Result};

pub mod grpc;
#[cfg(feature = "nccl")]
pub mod nccl;

/// Per-row (expert, weight) lists for one shard, in compressed-row form (the wire layout):
/// row `i` owns `experts[offsets[i]..offsets[i+1]]` and the same range of `weights`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assignments {
    offsets: Vec<u32>,
    experts: Vec<u32>,
    weights: Vec<f32>,
}

impl Assignments {
    pub fn new() -> Self {
        Assignments {
            offsets: vec![0],
            experts: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Appends one row's list.
    pub fn push_row(&mut self, pairs: impl IntoIterator<Item = (u32, f32)>) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        for (e, w) in pairs {
            self.experts.push(e);
            self.weights.push(w);
        }
        self.offsets.push(self.experts.len() as u32);
    }

    /// From the wire form (one count per row), checked.
    pub fn from_counts(counts: &[u32], experts: Vec<u32>, weights: Vec<f32>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        offsets.push(0u32);
        let mut total = 0u64;
        for &c in counts {
            total += u64::from(c);
            offsets.push(u32::try_from(total).map_err(|_| {
                Error::Input(format!(
                    "{total} expert assignments do not fit the wire format"
                ))
            })?);
        }
        if total as usize != experts.len() || experts.len() != weights.len() {
            return Err(Error::Input(format!(
                "expert counts sum to {total} but {} experts and {} weights were sent",
                experts.len(),
                weights.len()
            )));
        }
        Ok(Assignments {
            offsets,
            experts,
            weights,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Row `i`'s experts and weights.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (lo, hi) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (&self.experts[lo..hi], &self.weights[lo..hi])
    }

    /// Per-row counts (the wire form).
    pub fn counts(&self) -> Vec<u32> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    pub fn experts(&self) -> &[u32] {
        &self.experts
    }

    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// As one `Vec<(expert, weight)>` per row.
    pub fn to_lists(&self) -> Vec<Vec<(usize, f32)>> {
        (0..self.rows())
            .map(|i| {
                let (e, w) = self.row(i);
                e.iter()
                    .map(|&e| e as usize)
                    .zip(w.iter().copied())
                    .collect()
            })
            .collect()
    }
}

/// One shard's part of one MoE layer's dispatch.
#[derive(Clone, Debug)]
pub struct ShardRequest {
    pub layer: usize,
    pub step: u64,
    pub placement_version: u64,
    /// Encoded when the transport writes the message (gRPC: straight into the frame).
    pub rows: PendingRows,
    pub assignments: Assignments,
    pub reply_dtype: WireDtype,
}

/// Moves a [`ShardRequest`] to shard `shard` and returns its reply rows (one per request row).
pub trait Transport: Send + Sync + 'static {
    /// Number of shards this transport reaches (ids `0..shards()`).
    fn shards(&self) -> usize;

    /// Best knowledge of whether `shard` can be reached now: false after a failure, until a
    /// reconnect succeeds. The dispatcher uses it to prefer live replicas.
    fn is_live(&self, shard: usize) -> bool;

    /// The largest request payload (row bytes) one message may carry; bigger batches are split.
    fn max_request_bytes(&self) -> usize;

    /// Sends `request` and waits for the reply, giving up after `deadline`. Errors name the
    /// shard and the request's layer.
    fn exchange(
        &self,
        shard: usize,
        request: ShardRequest,
        deadline: Duration,
    ) -> impl Future<Output = Result<EncodedRows>> + Send;
}
