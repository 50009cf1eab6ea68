//! The dispatch client: one MoE layer's all-to-all and combine (DESIGN.md §2 steps 4–6).
//!
//! Given a batch's rows `[T, hidden]` and each token's top-k (expert, weight) list, it groups the
//! rows **by shard** — a token travels once to each shard holding any of its experts, with the
//! list of the (expert, weight) pairs that shard serves — splits a shard's group into messages
//! under the transport's size limit, sends all of them concurrently, and adds the returned
//! partial sums into the output. When a shard fails, each of its tokens whose experts there all
//! have a live replica elsewhere is re-sent there once. The others wait for the shard's restart
//! when [`DispatchConfig::failover_wait`] allows (the step is held, then they are re-sent), or
//! fail, alone: the result ([`Dispatched`]) lists them with the error naming the shard and the
//! layer, and every other token's sum is complete, so the caller fails only the sequences those
//! tokens belong to.
//!
//! Placement changes (EPLB) take effect between steps, never inside one: the caller brackets
//! each forward step with [`Dispatcher::step_started`] / [`Dispatcher::step_finished`], and a
//! table handed to [`Dispatcher::stage_placement`] during a step waits for the step's end. So
//! every layer of a step routes with one table, and once a pod reports a version in use
//! ([`Dispatcher::wait_for_version`]) none of its requests carries an older one.
//!
//! Replica choice: for each (token, expert) the dispatcher takes, among the expert's live
//! replicas (all of them when none is live), the one with the least load, where load is the
//! (token, expert) pairs this pod has in flight on that shard (other layers, the other
//! micro-batch) plus those already given to it in this batch; ties go to a shard the token
//! already travels to (no extra row on the wire), then to the primary. A masked (dead) shard is
//! never chosen while a replica lives.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::codec::{EncodedRows, PendingRows, SharedEncoding, WireDtype};
use crate::placement::Placement;
use crate::transport::{Assignments, ShardRequest, Transport};
use crate::{Error, Result};

/// One layer's dispatch gives up after this long: long enough for a shard's grouped GEMM over a
/// large prefill chunk on CPU, short enough that a request on a hung shard fails while its
/// client is still waiting.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// How often held tokens look for their restarted shard: a fraction of a restart's time (the
/// supervisor's first back-off alone is 200 ms), cheap since it reads one flag per shard.
const FAILOVER_POLL: Duration = Duration::from_millis(20);

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

/// Row bytes per message a shard's rows are split into (see [`DispatchConfig::message_bytes`]).
pub const DEFAULT_MESSAGE_BYTES: usize = 1 << 20;

/// Settings of the dispatch client.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Dtype of the rows sent to the shards; their partial sums come back in
    /// [`WireDtype::combine_dtype`] (the same, except bf16 for fp8).
    pub wire_dtype: WireDtype,
    /// Deadline of every shard exchange.
    pub deadline: Duration,
    /// A shard's rows go in messages of about this many row bytes (equal parts; never more
    /// than the transport's limit): the messages of one shard pipeline — the shard decodes,
    /// computes and answers the first while the next is still on the wire — and each batch's
    /// rows stay small enough for the caches between the stages.
    pub message_bytes: usize,
    /// How long tokens whose experts lost every live copy wait for their shard to come back
    /// (a supervisor or the kubelet restarts it, and the transport's prober unmasks it) before
    /// they fail. Zero fails them at once. Waiting holds the whole step — every sequence of the
    /// batch stalls for the restart — which is why it is opt-in: a deployment that reserves
    /// redundant slots asks for fault tolerance and turns it on (`--failover-wait-ms`).
    pub failover_wait: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            wire_dtype: WireDtype::Bf16,
            deadline: DEFAULT_DEADLINE,
            message_bytes: DEFAULT_MESSAGE_BYTES,
            failover_wait: Duration::ZERO,
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

/// One layer's dispatch result.
#[derive(Debug)]
pub struct Dispatched {
    /// `[T, hidden]`: Σ weight · expert(row) per token; incomplete for the failed tokens.
    pub rows: Vec<f32>,
    /// Tokens whose sums are incomplete, grouped by the shard error that lost them (a token
    /// sent to two failed shards appears under both).
    pub failures: Vec<ShardFailure>,
    /// Tokens held for a restarting shard ([`DispatchConfig::failover_wait`]), once per (token,
    /// shard) held, whether they were served after the wait or failed when it ran out.
    pub held: usize,
}

/// Tokens lost to one failed shard exchange.
#[derive(Debug)]
pub struct ShardFailure {
    /// Names the shard (id and address) and the layer.
    pub error: Error,
    /// Token indices into the dispatched batch, ascending.
    pub tokens: Vec<usize>,
}

/// The tables a dispatcher routes with (see the module docs on switching between steps).
struct Tables {
    current: Arc<Placement>,
    /// A newer table waiting for the step under way to end.
    staged: Option<Arc<Placement>>,
    /// A forward step is under way: `current` must not change.
    in_step: bool,
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
    tables: Mutex<Tables>,
    /// The version of `tables.current`, for waiters on a switch.
    active: tokio::sync::watch::Sender<u64>,
    /// Per expert: (token, expert) pairs dispatched since start (the load EPLB balances).
    expert_pairs: Vec<AtomicU64>,
    /// Per expert: the part of `expert_pairs` a finished rebalance round used
    /// ([`consume_load`](Self::consume_load)). Kept here, in the pod that counts, not in the
    /// rebalancer: one that restarts (operator failover, a new set of pods) still reads every
    /// pair no round has used.
    consumed_pairs: Vec<AtomicU64>,
    /// Names this dispatcher's counters (see [`load_epoch`](Self::load_epoch)).
    load_epoch: u64,
    hidden: usize,
    config: DispatchConfig,
    /// Per shard: (token, expert) pairs sent and not yet answered (the replica-choice load).
    in_flight: Vec<AtomicUsize>,
    /// Per shard: pairs sent over the last [`LOAD_WINDOW`] (the imbalance figure).
    window: Mutex<LoadWindow>,
}

/// A value unlikely to repeat across the restarts of a pod: the start time in nanoseconds mixed
/// with the process id and a per-process counter.
fn new_load_epoch() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    (nanos ^ (u64::from(std::process::id()) << 32))
        .wrapping_add(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15))
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
        let expert_pairs = (0..placement.n_experts())
            .map(|_| AtomicU64::new(0))
            .collect();
        let consumed_pairs = (0..placement.n_experts())
            .map(|_| AtomicU64::new(0))
            .collect();
        let (active, _) = tokio::sync::watch::channel(placement.version());
        Ok(Dispatcher {
            transport,
            tables: Mutex::new(Tables {
                current: Arc::new(placement),
                staged: None,
                in_step: false,
            }),
            active,
            expert_pairs,
            consumed_pairs,
            load_epoch: new_load_epoch(),
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

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        match self.tables.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The placement table in use.
    pub fn placement(&self) -> Arc<Placement> {
        Arc::clone(&self.tables().current)
    }

    /// (token, expert) pairs dispatched per expert since this dispatcher started, summed over
    /// layers (never reset: `shardseek_expert_tokens_total` counts the same pairs).
    pub fn expert_load(&self) -> Vec<u64> {
        self.expert_pairs
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The part of [`expert_load`](Self::expert_load) finished rebalance rounds used; the
    /// difference is the load no round has used yet.
    pub fn consumed_load(&self) -> Vec<u64> {
        self.consumed_pairs
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Names these counters: differs between two dispatchers (a pod that restarted), so a
    /// rebalancer cannot consume counts that another incarnation of the pod reported.
    pub fn load_epoch(&self) -> u64 {
        self.load_epoch
    }

    /// A rebalance round that read `counts` (an [`expert_load`](Self::expert_load)) under
    /// `epoch` finished: those pairs are used. Each counter only moves forward and never past
    /// what was counted, so a repeated or late call (two rebalancers, a retry) changes nothing.
    /// Another epoch (counts of a pod that restarted since) or a list of another length is
    /// refused.
    pub fn consume_load(&self, epoch: u64, counts: &[u64]) -> Result<()> {
        if epoch != self.load_epoch {
            return Err(Error::Input(format!(
                "load epoch {epoch} was read from counters that are gone (these are epoch {})",
                self.load_epoch
            )));
        }
        if counts.len() != self.expert_pairs.len() {
            return Err(Error::Input(format!(
                "load of {} experts consumed, this model has {}",
                counts.len(),
                self.expert_pairs.len()
            )));
        }
        for ((c, total), &n) in self
            .consumed_pairs
            .iter()
            .zip(&self.expert_pairs)
            .zip(counts)
        {
            c.fetch_max(n.min(total.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        Ok(())
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
    /// over the last [`LOAD_WINDOW`] of this pod's dispatches under the placement in use (load =
    /// (token, expert) pairs, what a shard computes; the window restarts when the placement
    /// changes, so the figure describes the table in force). `None` before any dispatch.
    pub fn load_imbalance(&self) -> Option<f64> {
        let load = self.shard_load();
        let total: u64 = load.iter().sum();
        if total == 0 {
            return None;
        }
        let max = load.iter().copied().max().unwrap_or(0) as f64;
        Some(max / (total as f64 / load.len() as f64))
    }

    /// Hands over a newer placement table (EPLB): it takes effect at once when no step is under
    /// way, else when the current step ends; its version travels with later dispatches. A
    /// table for another shard count or expert count, or not newer than the one in use, is
    /// refused.
    pub fn stage_placement(&self, placement: Placement) -> Result<()> {
        if placement.shards() != self.transport.shards() {
            return Err(Error::Placement(format!(
                "placement is for {} shards, the transport reaches {}",
                placement.shards(),
                self.transport.shards()
            )));
        }
        let mut t = self.tables();
        if placement.n_experts() != t.current.n_experts() {
            return Err(Error::Placement(format!(
                "placement is for {} experts, this model has {}",
                placement.n_experts(),
                t.current.n_experts()
            )));
        }
        if placement.version() < t.current.version() {
            return Err(Error::Placement(format!(
                "placement version {} is older than version {} in use",
                placement.version(),
                t.current.version()
            )));
        }
        let placement = Arc::new(placement);
        if t.in_step {
            t.staged = Some(placement);
        } else {
            self.promote(&mut t, placement);
        }
        Ok(())
    }

    fn promote(&self, t: &mut Tables, placement: Arc<Placement>) {
        let version = placement.version();
        t.current = placement;
        // The imbalance window describes the table in force.
        match self.window.lock() {
            Ok(mut w) => w.buckets.clear(),
            Err(poisoned) => poisoned.into_inner().buckets.clear(),
        }
        self.active.send_replace(version);
        tracing::info!(version, "placement switched");
    }

    /// A forward step begins: the table in use stays until [`step_finished`](Self::step_finished).
    pub fn step_started(&self) {
        self.tables().in_step = true;
    }

    /// The forward step ended: a staged table takes over now, before the next step.
    pub fn step_finished(&self) {
        let mut t = self.tables();
        t.in_step = false;
        if let Some(p) = t.staged.take() {
            self.promote(&mut t, p);
        }
    }

    /// Waits until the steps route with version `version` or newer; false after `timeout`.
    pub async fn wait_for_version(&self, version: u64, timeout: Duration) -> bool {
        let mut rx = self.active.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&v| v >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Dispatches `rows` (`[T, hidden]`) of MoE layer `layer` to the shards and returns
    /// Σ weight · expert(row) per token, `[T, hidden]`; fails when any token lost a shard.
    /// Copies the rows once; a caller that can hand them over uses
    /// [`dispatch_shared`](Self::dispatch_shared).
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
        let d = self.dispatch_partial(layer, step, rows, routes).await?;
        match d.failures.into_iter().next() {
            None => Ok(d.rows),
            Some(f) => Err(f.error),
        }
    }

    /// [`dispatch_shared`](Self::dispatch_shared), except that tokens lost to a failed shard
    /// (with no live replica to take their experts) are reported in [`Dispatched::failures`]
    /// while the other tokens' sums are complete. `Err` only for bad input.
    pub async fn dispatch_partial(
        &self,
        layer: usize,
        step: u64,
        rows: Arc<Vec<f32>>,
        routes: Routes<'_>,
    ) -> Result<Dispatched> {
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
        for &e in routes.experts {
            if let Some(c) = self.expert_pairs.get(e as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let failed = self
            .run(&placement, layer, step, &rows, groups, &mut out)
            .await;
        if failed.is_empty() {
            return Ok(Dispatched {
                rows: out,
                failures: Vec::new(),
                held: 0,
            });
        }
        // Failover, token by token: a failed token whose experts on the failed shards all have
        // a replica elsewhere is re-sent once (only its failed pairs, each to one replica); the
        // others are lost with their shard's error.
        let dead: BTreeSet<usize> = failed.iter().map(|(g, _)| g.shard).collect();
        let mut retry_tokens: Vec<usize> = Vec::new();
        let mut retry = Vec::new();
        let mut failures = Vec::new();
        // The chunks no replica can take: they wait for their shard (`failover_wait`) or fail.
        let mut held: Vec<(ShardGroup, Error)> = Vec::new();
        for (g, error) in failed {
            let mut lost = ShardGroup {
                shard: g.shard,
                tokens: Vec::new(),
                assignments: Assignments::new(),
            };
            for (i, &t) in g.tokens.iter().enumerate() {
                let (experts, weights) = g.assignments.row(i);
                let movable = experts.iter().all(|&e| {
                    placement
                        .replicas(e as usize)
                        .is_some_and(|r| r.iter().any(|s| !dead.contains(s)))
                });
                if movable {
                    retry_tokens.push(t);
                    retry.push((experts.to_vec(), weights.to_vec()));
                } else {
                    lost.tokens.push(t);
                    lost.assignments
                        .push_row(experts.iter().copied().zip(weights.iter().copied()));
                }
            }
            if !lost.tokens.is_empty() {
                tracing::warn!(layer, %error, lost = lost.tokens.len(), "expert shard failed; its tokens have no replica");
                held.push((lost, error));
            }
        }
        if !retry_tokens.is_empty() {
            // Every pair has a replica outside `dead` (checked above), so this plans them all.
            if let Some(regroup) = self.plan_pairs(&placement, &retry_tokens, &retry, &dead) {
                tracing::warn!(
                    layer,
                    tokens = retry_tokens.len(),
                    "failing over to replicas"
                );
                for (g, error) in self
                    .run(&placement, layer, step, &rows, regroup, &mut out)
                    .await
                {
                    held.push((g, error));
                }
            }
        }
        let held_tokens = if self.config.failover_wait.is_zero() {
            0
        } else {
            held.iter().map(|(g, _)| g.tokens.len()).sum()
        };
        let lost = self
            .hold_for_restart(&placement, layer, step, &rows, held, &mut out)
            .await;
        failures.extend(lost.into_iter().map(|(g, error)| ShardFailure {
            error,
            tokens: g.tokens,
        }));
        for f in &mut failures {
            f.tokens.sort_unstable();
            f.tokens.dedup();
        }
        Ok(Dispatched {
            rows: out,
            failures,
            held: held_tokens,
        })
    }

    /// The failover of last resort: chunks whose experts have no live copy wait, up to
    /// [`DispatchConfig::failover_wait`], for their shards to be live again (restarted on their
    /// address and unmasked by the transport's prober), then are sent again — to any live
    /// replica, else to their shard. A chunk that fails again waits again while time is left.
    /// Returns the chunks still lost, each with its last error (all of them when the wait is
    /// zero). The step's other tokens are already summed into `out`; a resent chunk's partial
    /// sums are added after them.
    async fn hold_for_restart(
        &self,
        placement: &Placement,
        layer: usize,
        step: u64,
        rows: &Arc<Vec<f32>>,
        mut held: Vec<(ShardGroup, Error)>,
        out: &mut [f32],
    ) -> Vec<(ShardGroup, Error)> {
        let wait = self.config.failover_wait;
        if held.is_empty() || wait.is_zero() {
            return held;
        }
        let started = Instant::now();
        let until = started + wait;
        let waiting = held.iter().map(|(g, _)| g.tokens.len()).sum::<usize>();
        tracing::warn!(
            layer,
            tokens = waiting,
            wait_ms = wait.as_millis() as u64,
            "no live copy of some experts; holding the step for their shard's restart"
        );
        while !held.is_empty() {
            let needed: BTreeSet<usize> = held.iter().map(|(g, _)| g.shard).collect();
            while !needed.iter().all(|&s| self.transport.is_live(s)) {
                if Instant::now() >= until {
                    tracing::warn!(
                        layer,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the shard did not come back in time; its tokens fail"
                    );
                    return held;
                }
                tokio::time::sleep(FAILOVER_POLL).await;
            }
            let mut tokens = Vec::new();
            let mut pairs = Vec::new();
            for (g, _) in &held {
                for (i, &t) in g.tokens.iter().enumerate() {
                    let (e, w) = g.assignments.row(i);
                    tokens.push(t);
                    pairs.push((e.to_vec(), w.to_vec()));
                }
            }
            // Every expert in `held` came from `placement`, so each has a shard to plan on.
            let Some(regroup) = self.plan_pairs(placement, &tokens, &pairs, &BTreeSet::new())
            else {
                return held;
            };
            let failed = self.run(placement, layer, step, rows, regroup, out).await;
            if failed.is_empty() {
                tracing::info!(
                    layer,
                    tokens = waiting,
                    held_ms = started.elapsed().as_millis() as u64,
                    "held tokens served after their shard came back"
                );
                return Vec::new();
            }
            if Instant::now() >= until {
                return failed;
            }
            held = failed;
            tokio::time::sleep(FAILOVER_POLL).await;
        }
        held
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
    /// `out`. Returns the chunks that failed, each with its error (empty when all succeeded).
    async fn run(
        &self,
        placement: &Placement,
        layer: usize,
        step: u64,
        rows: &Arc<Vec<f32>>,
        groups: Vec<ShardGroup>,
        out: &mut [f32],
    ) -> Vec<(ShardGroup, Error)> {
        let h = self.hidden;
        let dtype = self.config.wire_dtype;
        let row_bytes = dtype.row_bytes(h).max(1);
        // The reply carries as many rows, in the combine dtype (bf16 for fp8: twice the bytes),
        // and the transport's message limit holds both ways.
        let widest = row_bytes.max(dtype.combine_dtype().row_bytes(h));
        let limit = (self.transport.max_request_bytes() / widest).max(1);
        let target = (self.config.message_bytes / row_bytes).clamp(1, limit);
        // (group index, first row of the chunk within the group, chunk length): each group in
        // equal parts of at most `target` rows.
        let mut chunks = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            let n = g.tokens.len();
            let parts = n.div_ceil(target).max(1);
            let per = n.div_ceil(parts);
            let mut start = 0;
            while start < n {
                let end = (start + per).min(n);
                chunks.push((gi, start, end - start));
                start = end;
            }
        }
        let deadline = self.config.deadline;
        let transport = &self.transport;
        let groups_ref = &groups;
        let shared = Arc::new(SharedEncoding::new(rows.len() / h.max(1), h, dtype));
        let shared = &shared;
        // Each chunk's rows are encoded when its message is written, in the task that writes
        // that shard's stream, so shards encode in parallel. Replies are added in chunk (= shard)
        // order once all are in ([`combine`]): a fixed summation order keeps results
        // bit-reproducible, which is what lets an f32 wire match the single process exactly.
        let mut replies: futures::stream::FuturesOrdered<_> = chunks
            .into_iter()
            .map(|(gi, start, len)| async move {
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
                )
                .and_then(|p| p.sharing(Arc::clone(shared)));
                let reply = match picked {
                    Ok(pending) => {
                        let request = ShardRequest {
                            layer,
                            step,
                            placement_version: placement.version(),
                            rows: pending,
                            assignments,
                            reply_dtype: dtype.combine_dtype(),
                        };
                        transport.exchange(g.shard, request, deadline).await
                    }
                    Err(e) => Err(e),
                };
                ((gi, start, len), reply)
            })
            .collect();
        // Failed chunks become groups of their own, so a failover re-sends exactly the rows
        // whose partial sums did not arrive (a split group may have partly succeeded).
        let mut failed: Vec<(ShardGroup, Error)> = Vec::new();
        // Replies in chunk order, combined once all are in.
        let mut arrived: Vec<((usize, usize), EncodedRows)> = Vec::new();
        while let Some(((gi, start, len), reply)) = futures::StreamExt::next(&mut replies).await {
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
                Ok(r) => arrived.push(((gi, start), r)),
                Err(err) => {
                    let mut assignments = Assignments::new();
                    for i in start..start + len {
                        let (e, w) = g.assignments.row(i);
                        assignments.push_row(e.iter().copied().zip(w.iter().copied()));
                    }
                    failed.push((
                        ShardGroup {
                            shard: g.shard,
                            tokens: g.tokens[start..start + len].to_vec(),
                            assignments,
                        },
                        err,
                    ));
                }
            }
        }
        combine(&groups, &arrived, h, out);
        failed
    }
}

/// Values per tile of the combine: 4 KiB of f32 (in L1), a multiple of the fp8 block.
const COMBINE_TILE: usize = 1024;

/// Adds every reply row into its token's row of `out` (`[T, width]`), the replies in the order
/// given (chunk order), so the sums are bit-reproducible. Token by token and tile by tile: a
/// tile of the token's row is read once, every reply's values for it are added in a buffer
/// that stays in L1, and it is written back once — instead of one pass over the token's row in
/// memory per reply (a token travels to about 3.6 of 4 shards at V3's top-8).
fn combine(
    groups: &[ShardGroup],
    replies: &[((usize, usize), EncodedRows)],
    width: usize,
    out: &mut [f32],
) {
    let tokens = out.len() / width.max(1);
    // Contributions per token, in reply order (compressed rows: counts, then offsets).
    let mut start = vec![0usize; tokens + 1];
    for ((gi, first), r) in replies {
        for &t in &groups[*gi].tokens[*first..*first + r.count] {
            start[t + 1] += 1;
        }
    }
    for t in 0..tokens {
        start[t + 1] += start[t];
    }
    let mut fill = start.clone();
    let mut contrib = vec![(0usize, 0usize); start[tokens]];
    for (ri, ((gi, first), r)) in replies.iter().enumerate() {
        for (i, &t) in groups[*gi].tokens[*first..*first + r.count]
            .iter()
            .enumerate()
        {
            contrib[fill[t]] = (ri, i);
            fill[t] += 1;
        }
    }
    let w = width.max(1);
    let add_rows = |first_token: usize, rows: &mut [f32]| {
        let mut acc = [0.0f32; COMBINE_TILE];
        for (k, row) in rows.chunks_exact_mut(w).enumerate() {
            let t = first_token + k;
            let mine = &contrib[start[t]..start[t + 1]];
            if mine.is_empty() {
                continue;
            }
            for first in (0..width).step_by(COMBINE_TILE) {
                let n = COMBINE_TILE.min(width - first);
                let tile = &mut acc[..n];
                tile.copy_from_slice(&row[first..first + n]);
                for &(ri, i) in mine {
                    replies[ri].1.add_cols_into(i, first, tile);
                }
                row[first..first + n].copy_from_slice(tile);
            }
        }
    };
    // A large combine is the serial tail of the dispatch (every reply is in): two threads take
    // half the tokens each (the sums per token, and so the results, are unchanged).
    if start[tokens] * width >= PARALLEL_COMBINE_VALUES && tokens >= 2 {
        let half = tokens / 2;
        let (a, b) = out.split_at_mut(half * w);
        std::thread::scope(|scope| {
            scope.spawn(|| add_rows(half, b));
            add_rows(0, a);
        });
    } else {
        add_rows(0, out);
    }
}

/// Reply values from which the combine runs on two threads.
const PARALLEL_COMBINE_VALUES: usize = 1 << 21;

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides of [`PARALLEL_COMBINE_VALUES`]: every token's sum is its replies' rows added
    /// in reply order onto its row of `out`, bit for bit, on one thread or two.
    #[test]
    fn the_combine_adds_each_tokens_replies_in_reply_order_on_one_or_two_threads() {
        let width = 4096 + 100;
        for tokens in [7usize, 301] {
            // Three "shards": all tokens, the even ones, every third one reversed.
            let lists: Vec<Vec<usize>> = vec![
                (0..tokens).collect(),
                (0..tokens).filter(|t| t % 2 == 0).collect(),
                (0..tokens).filter(|t| t % 3 == 0).rev().collect(),
            ];
            let value =
                |s: usize, i: usize, c: usize| ((s * 31 + i * 7 + c) % 113) as f32 * 0.37 - 20.0;
            let mut groups = Vec::new();
            let mut replies = Vec::new();
            for (s, list) in lists.iter().enumerate() {
                let rows: Vec<f32> = (0..list.len())
                    .flat_map(|i| (0..width).map(move |c| value(s, i, c)))
                    .collect();
                let r = EncodedRows::encode(&rows, width, WireDtype::F32).expect("encode");
                groups.push(ShardGroup {
                    shard: s,
                    tokens: list.clone(),
                    assignments: Assignments::new(),
                });
                replies.push(((s, 0), r));
            }
            let init = |t: usize, c: usize| (t + c) as f32 * 1e-3;
            let mut out: Vec<f32> = (0..tokens * width)
                .map(|v| init(v / width, v % width))
                .collect();
            let mut want = out.clone();
            for (s, list) in lists.iter().enumerate() {
                for (i, &t) in list.iter().enumerate() {
                    for c in 0..width {
                        want[t * width + c] += value(s, i, c);
                    }
                }
            }
            let values: usize = lists.iter().map(Vec::len).sum::<usize>() * width;
            assert_eq!(
                values >= PARALLEL_COMBINE_VALUES,
                tokens == 301,
                "both paths are covered"
            );
            combine(&groups, &replies, width, &mut out);
            assert!(out == want, "{tokens} tokens");
        }
    }
}
