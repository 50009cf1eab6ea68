//! The dispatch client: one MoE layer's all-to-all and combine (DESIGN.md §2 steps 4–6).
//!
//! Given a batch's rows `[T, hidden]` and each token's top-k (expert, weight) list, it groups the
//! rows **by shard** — a token travels once to each shard holding any of its experts, with the
//! list of the (expert, weight) pairs that shard serves — splits a shard's group into messages
//! under the transport's size limit, sends all of them concurrently, and adds the returned
//! partial sums into the output. When a shard fails and every expert it was asked for has a
//! live replica elsewhere, those tokens are re-sent there once; otherwise the call fails with an
//! error naming the shard and the layer.
//!
//! Replica choice: for each (token, expert) the dispatcher takes, among the expert's live
//! replicas (all of them when none is live), the one with the least load, where load is the
//! (token, expert) pairs this pod has in flight on that shard (other layers, the other
//! micro-batch) plus those already given to it in this batch; ties go to a shard the token
//! already travels to (no extra row on the wire), then to the primary. A masked (dead) shard is
//! never chosen while a replica lives.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::codec::{PendingRows, WireDtype};
use crate::placement::Placement;
use crate::transport::{Assignments, ShardRequest, Transport};
use crate::{Error, Result};

/// One layer's dispatch gives up after this long: long enough for a shard's grouped GEMM over a
/// large prefill chunk on CPU, short enough that a request on a hung shard fails while its
/// client is still waiting.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// The window of [`Dispatcher::load_imbalance`]: long enough to smooth a few requests' bursts,
/// short enough that a placement change (or a shard's death) shows within a minute.
pub const LOAD_WINDOW: Duration = Duration::from_secs(60);

/// (token, expert) pairs sent per shard, in one-second buckets over [`LOAD_WINDOW`].
struct LoadWindow {
    start: Instant,
    /// (second since `start`, pairs per shard), oldest first.
    buckets: VecDeque<(u64, Vec<u64>)>,
}

impl LoadWindow {
    fn add(&mut self, shard: usize, shards: usize, pairs: u64) {
        let now = self.start.elapsed().as_secs();
        if self.buckets.back().is_none_or(|(t, _)| *t != now) {
            self.buckets.push_back((now, vec![0; shards]));
        }
        while self
            .buckets
            .front()
            .is_some_and(|(t, _)| t + LOAD_WINDOW.as_secs() <= now)
        {
            self.buckets.pop_front();
        }
        if let Some(slot) = self.buckets.back_mut().and_then(|(_, v)| v.get_mut(shard)) {
            *slot += pairs;
        }
    }

    fn totals(&self, shards: usize) -> Vec<u64> {
        let now = self.start.elapsed().as_secs();
        let mut out = vec![0u64; shards];
        for (t, v) in &self.buckets {
            if t + LOAD_WINDOW.as_secs() > now {
                for (o, x) in out.iter_mut().zip(v) {
                    *o += x;
                }
            }
        }
        out
    }
}

/// Settings of the dispatch client.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Dtype of rows on the wire, both ways.
    pub wire_dtype: WireDtype,
    /// Deadline of every shard exchange.
    pub deadline: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            wire_dtype: WireDtype::Bf16,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// A batch's routing: `experts` and `weights` are `[T, top_k]`, row-major (the gate's output).
#[derive(Clone, Copy, Debug)]
pub struct Routes<'a> {
    pub top_k: usize,
    pub experts: &'a [u32],
    pub weights: &'a [f32],
}

/// The rows of one batch headed to one shard.
struct ShardGroup {
    shard: usize,
    tokens: Vec<usize>,
    assignments: Assignments,
}

/// The dispatch client of one attention pod.
pub struct Dispatcher<T: Transport> {
    transport: Arc<T>,
    placement: RwLock<Arc<Placement>>,
    hidden: usize,
    config: DispatchConfig,
    /// Per shard: (token, expert) pairs sent and not yet answered (the replica-choice load).
    in_flight: Vec<AtomicUsize>,
    /// Per shard: pairs sent over the last [`LOAD_WINDOW`] (the imbalance figure).
    window: Mutex<LoadWindow>,
}

/// Holds a chunk's pairs in [`Dispatcher::in_flight`] until its reply (or failure) is in.
struct InFlight<'a> {
    counter: &'a AtomicUsize,
    pairs: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.pairs, Ordering::Relaxed);
    }
}

impl<T: Transport> Dispatcher<T> {
    pub fn new(
        transport: Arc<T>,
        placement: Placement,
        hidden: usize,
        config: DispatchConfig,
    ) -> Result<Self> {
        if placement.shards() != transport.shards() {
            return Err(Error::Placement(format!(
                "placement is for {} shards, the transport reaches {}",
                placement.shards(),
                transport.shards()
            )));
        }
        let in_flight = (0..transport.shards())
            .map(|_| AtomicUsize::new(0))
            .collect();
        Ok(Dispatcher {
            transport,
            placement: RwLock::new(Arc::new(placement)),
            hidden,
            config,
            in_flight,
            window: Mutex::new(LoadWindow {
                start: Instant::now(),
                buckets: VecDeque::new(),
            }),
        })
    }

    pub fn transport(&self) -> &Arc<T> {
        &self.transport
    }

    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// The placement table in use.
    pub fn placement(&self) -> Arc<Placement> {
        match self.placement.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// (token, expert) pairs this pod sent to each shard over the last [`LOAD_WINDOW`].
    pub fn shard_load(&self) -> Vec<u64> {
        let shards = self.transport.shards();
        match self.window.lock() {
            Ok(w) => w.totals(shards),
            Err(poisoned) => poisoned.into_inner().totals(shards),
        }
    }

    /// `shardseek_expert_load_imbalance_ratio`: the busiest shard's load ÷ the mean shard load
    /// over the last [`LOAD_WINDOW`] of this pod's dispatches (load = (token, expert) pairs,
    /// what a shard computes). `None` before any dispatch.
    pub fn load_imbalance(&self) -> Option<f64> {
        let load = self.shard_load();
        let total: u64 = load.iter().sum();
        if total == 0 {
            return None;
        }
        let max = load.iter().copied().max().unwrap_or(0) as f64;
        Some(max / (total as f64 / load.len() as f64))
    }

    /// Switches to a newer placement table (EPLB); its version travels with later dispatches.
    pub fn set_placement(&self, placement: Placement) -> Result<()> {
        if placement.shards() != self.transport.shards() {
            return Err(Error::Placement(format!(
                "placement is for {} shards, the transport reaches {}",
                placement.shards(),
                self.transport.shards()
            )));
        }
        let mut guard = match self.placement.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(placement);
        Ok(())
    }

    /// Dispatches `rows` (`[T, hidden]`) of MoE layer `layer` to the shards and returns
    /// Σ weight · expert(row) per token, `[T, hidden]`. Copies the rows once; a caller that can
    /// hand them over uses [`dispatch_shared`](Self::dispatch_shared).
    pub async fn dispatch(
        &self,
        layer: usize,
        step: u64,
        rows: &[f32],
        routes: Routes<'_>,
    ) -> Result<Vec<f32>> {
        self.dispatch_shared(layer, step, Arc::new(rows.to_vec()), routes)
            .await
    }

    /// [`dispatch`](Self::dispatch) of rows the caller hands over: each shard's rows are encoded
    /// from this buffer straight into that shard's outgoing frame when it is written (no
    /// gathered copy, no payload buffer), so the rows are shared, not copied.
    pub async fn dispatch_shared(
        &self,
        layer: usize,
        step: u64,
        rows: Arc<Vec<f32>>,
        routes: Routes<'_>,
    ) -> Result<Vec<f32>> {
        let h = self.hidden;
        if h == 0 || !rows.len().is_multiple_of(h) {
            return Err(Error::Input(format!(
                "{} values are not rows of hidden {h}",
                rows.len()
            )));
        }
        let tokens = rows.len() / h;
        if routes.experts.len() != tokens * routes.top_k
            || routes.weights.len() != routes.experts.len()
        {
            return Err(Error::Input(format!(
                "{tokens} tokens with top-{} need {} experts and weights, got {} and {}",
                routes.top_k,
                tokens * routes.top_k,
                routes.experts.len(),
                routes.weights.len()
            )));
        }
        let placement = self.placement();
        let mut out = vec![0.0f32; rows.len()];
        let all: Vec<usize> = (0..tokens).collect();
        let groups = self.plan(&placement, &all, routes, &BTreeSet::new(), layer)?;
        let failed = self
            .run(&placement, layer, step, &rows, groups, &mut out)
            .await;
        let Some((first_err, failed_groups)) = failed else {
            return Ok(out);
        };
        if failed_groups.is_empty() {
            return Err(first_err);
        }
        // Failover: the failed shards' tokens go to live replicas, once, if every expert has one.
        let dead: BTreeSet<usize> = failed_groups.iter().map(|g| g.shard).collect();
        let mut retry_tokens: Vec<usize> = Vec::new();
        let mut retry = Vec::new();
        for g in &failed_groups {
            // Only the (token, expert) pairs that failed are re-sent, each to one replica.
            for (i, &t) in g.tokens.iter().enumerate() {
                let (experts, weights) = g.assignments.row(i);
                retry_tokens.push(t);
                retry.push((experts.to_vec(), weights.to_vec()));
            }
        }
        let regroup = self.plan_pairs(&placement, &retry_tokens, &retry, &dead);
        let Some(regroup) = regroup else {
            return Err(first_err);
        };
        tracing::warn!(layer, error = %first_err, "failing over to replicas");
        match self
            .run(&placement, layer, step, &rows, regroup, &mut out)
            .await
        {
            None => Ok(out),
            Some((e, _)) => Err(e),
        }
    }

    /// Groups `tokens` by shard, choosing for each (token, expert) one replica not in `exclude`,
    /// preferring live shards and shards the token already goes to.
    fn plan(
        &self,
        placement: &Placement,
        tokens: &[usize],
        routes: Routes<'_>,
        exclude: &BTreeSet<usize>,
        layer: usize,
    ) -> Result<Vec<ShardGroup>> {
        let k = routes.top_k;
        let mut pairs = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let experts = &routes.experts[t * k..(t + 1) * k];
            for &e in experts {
                if placement.replicas(e as usize).is_none() {
                    return Err(Error::Input(format!(
                        "layer {layer}: token {t} routed to expert {e}, placement has {}",
                        placement.n_experts()
                    )));
                }
            }
            pairs.push((
                experts.to_vec(),
                routes.weights[t * k..(t + 1) * k].to_vec(),
            ));
        }
        self.plan_pairs(placement, tokens, &pairs, exclude)
            .ok_or_else(|| Error::Placement(format!("layer {layer}: an expert has no shard")))
    }

    /// Core of [`plan`](Self::plan) over explicit per-token pair lists. `None` when some expert
    /// has no replica outside `exclude`.
    fn plan_pairs(
        &self,
        placement: &Placement,
        tokens: &[usize],
        pairs: &[(Vec<u32>, Vec<f32>)],
        exclude: &BTreeSet<usize>,
    ) -> Option<Vec<ShardGroup>> {
        let shards = placement.shards();
        let mut groups: Vec<ShardGroup> = (0..shards)
            .map(|shard| ShardGroup {
                shard,
                tokens: Vec::new(),
                assignments: Assignments::new(),
            })
            .collect();
        let mut per_shard: Vec<Vec<(u32, f32)>> = vec![Vec::new(); shards];
        let mut load: Vec<usize> = (0..shards)
            .map(|s| {
                self.in_flight
                    .get(s)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
            })
            .collect();
        for (&t, (experts, weights)) in tokens.iter().zip(pairs) {
            for (&e, &w) in experts.iter().zip(weights) {
                let candidates: Vec<usize> = placement
                    .replicas(e as usize)?
                    .iter()
                    .copied()
                    .filter(|s| !exclude.contains(s))
                    .collect();
                let live: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&s| self.transport.is_live(s))
                    .collect();
                let pool = if live.is_empty() { &candidates } else { &live };
                // Least loaded; ties: a shard the token already goes to, then replica order.
                let shard = pool
                    .iter()
                    .copied()
                    .enumerate()
                    .min_by_key(|&(rank, s)| (load[s], per_shard[s].is_empty(), rank))
                    .map(|(_, s)| s)?;
                load[shard] += 1;
                per_shard[shard].push((e, w));
            }
            for (s, list) in per_shard.iter_mut().enumerate() {
                if !list.is_empty() {
                    groups[s].tokens.push(t);
                    groups[s].assignments.push_row(list.drain(..));
                }
            }
        }
        Some(
            groups
                .into_iter()
                .filter(|g| !g.tokens.is_empty())
                .collect(),
        )
    }

    /// Sends every group (split under the size limit) concurrently and adds the replies into
    /// `out`. Returns the first error and the groups that failed, or `None` when all succeeded.
    async fn run(
        &self,
        placement: &Placement,
        layer: usize,
        step: u64,
        rows: &Arc<Vec<f32>>,
        groups: Vec<ShardGroup>,
        out: &mut [f32],
    ) -> Option<(Error, Vec<ShardGroup>)> {
        let h = self.hidden;
        let dtype = self.config.wire_dtype;
        let row_bytes = dtype.row_bytes(h).max(1);
        let per_message = (self.transport.max_request_bytes() / row_bytes).max(1);
        // (group index, first row of the chunk within the group, chunk length)
        let mut chunks = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            let mut start = 0;
            while start < g.tokens.len() {
                let end = (start + per_message).min(g.tokens.len());
                chunks.push((gi, start, end - start));
                start = end;
            }
        }
        let deadline = self.config.deadline;
        let transport = &self.transport;
        let groups_ref = &groups;
        // Each chunk's rows are encoded when its message is written, in the task that writes
        // that shard's stream, so shards encode in parallel. Replies are added in chunk (= shard)
        // order once all have arrived: a fixed summation order keeps results bit-reproducible,
        // which is what lets an f32 wire match the single process exactly.
        let replies =
            futures::future::join_all(chunks.into_iter().map(|(gi, start, len)| async move {
                let g = &groups_ref[gi];
                let mut assignments = Assignments::new();
                for i in start..start + len {
                    let (e, w) = g.assignments.row(i);
                    assignments.push_row(e.iter().copied().zip(w.iter().copied()));
                }
                let pairs = assignments.experts().len();
                let counter = &self.in_flight[g.shard];
                counter.fetch_add(pairs, Ordering::Relaxed);
                if let Ok(mut w) = self.window.lock() {
                    w.add(g.shard, self.in_flight.len(), pairs as u64);
                }
                let _held = InFlight { counter, pairs };
                let picked = PendingRows::gather(
                    Arc::clone(rows),
                    h,
                    g.tokens[start..start + len].to_vec(),
                    dtype,
                );
                let reply = match picked {
                    Ok(pending) => {
                        let request = ShardRequest {
                            layer,
                            step,
                            placement_version: placement.version(),
                            rows: pending,
                            assignments,
                            reply_dtype: dtype,
                        };
                        transport.exchange(g.shard, request, deadline).await
                    }
                    Err(e) => Err(e),
                };
                ((gi, start, len), reply)
            }))
            .await;
        let mut first_err = None;
        // Failed chunks become groups of their own, so a failover re-sends exactly the rows
        // whose partial sums did not arrive (a split group may have partly succeeded).
        let mut failed: Vec<ShardGroup> = Vec::new();
        for ((gi, start, len), reply) in replies {
            let g = &groups[gi];
            let checked = reply.and_then(|r| {
                if r.count != len || r.width != h {
                    Err(Error::Shard {
                        shard: g.shard,
                        addr: String::new(),
                        layer,
                        reason: format!(
                            "reply is [{}, {}], expected [{len}, {h}]",
                            r.count, r.width
                        ),
                    })
                } else {
                    Ok(r)
                }
            });
            match checked {
                Ok(r) => {
                    for (i, &t) in g.tokens[start..start + len].iter().enumerate() {
                        r.add_row_into(i, &mut out[t * h..(t + 1) * h]);
                    }
                }
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                    let mut assignments = Assignments::new();
                    for i in start..start + len {
                        let (e, w) = g.assignments.row(i);
                        assignments.push_row(e.iter().copied().zip(w.iter().copied()));
                    }
                    failed.push(ShardGroup {
                        shard: g.shard,
                        tokens: g.tokens[start..start + len].to_vec(),
                        assignments,
                    });
                }
            }
        }
        let err = first_err?;
        Some((err, failed))
    }
}
