//! Online EPLB: the component that keeps the expert placement balanced while the cluster serves
//! (DESIGN.md §4). `shardseek up --rebalance-interval SECS` runs one in its supervisor process.
//!
//! Every interval it
//! 1. reads, from every attention pod (`Placement.Load`), the (token, expert) pairs it has
//!    dispatched per expert, and keeps the difference since its previous read: the load of the
//!    last interval, summed over pods and layers;
//! 2. computes a table for that load with [`eplb::rebalance`] and keeps the one in force when the
//!    new one is the same table or would lower the predicted imbalance by less than
//!    [`MIN_GAIN`] (moving experts for nothing only churns);
//! 3. publishes a new version in three phases, each to every process at once:
//!    **Prepare** on every shard (it maps the experts it gains and accepts the new version while
//!    still serving the old one), then **Switch** on every attention pod (answered once the pod's
//!    steps route with the new table: pods switch between steps, never inside one), then
//!    **Commit** on every shard (it drops the experts it lost and refuses the old version, which
//!    no pod uses any more). A shard that cannot prepare or a pod that refuses to switch aborts
//!    the publication before anything is dropped; the next interval tries again with a higher
//!    version. No request fails and none waits for more than the step boundary it switches at.
//!
//! The table in force is also kept by a [`PlacementStore`] once every shard has prepared it: a
//! process that restarts reads it and comes back on the current table instead of version 1.
//! Under `up` the store is a file ([`FileStore`], see [`Placement::write_file`]) that every child
//! is given with `--placement-file`; under Kubernetes the operator keeps it in a ConfigMap that
//! the pods mount. A process that restarted while a publication was under way may have read the
//! older file: every round therefore first brings back to the table in force each shard whose
//! `Expert.Info` reports another version (Prepare + Commit) and each pod whose `Load` does
//! (Switch).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts, Registry};
use shardseek_proto::v1::expert_client::ExpertClient;
use shardseek_proto::v1::placement_client::PlacementClient;
use shardseek_proto::v1::{CommitRequest, InfoRequest, LoadReply, LoadRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::eplb::{self, EplbShape};
use crate::placement::Placement;
use crate::{Error, Result};

/// Deadline of one control call. Prepare maps a shard's gained experts (mmap: fast, but a
/// backend may prepare weights); Switch waits for the pod's current step to end, and a long
/// prefill step on CPU takes seconds.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to a pod on loopback or the cluster network takes milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Smallest predicted drop of the imbalance ratio worth publishing a new table for.
pub const MIN_GAIN: f64 = 0.01;

/// What to balance and whom to tell.
#[derive(Clone, Debug)]
pub struct RebalancerConfig {
    /// Expert shards' gRPC addresses (`host:port`, shard id = position).
    pub shards: Vec<String>,
    /// Attention pods' gRPC addresses.
    pub attention: Vec<String>,
    pub shape: EplbShape,
    pub interval: Duration,
    /// Where the table in force is kept for restarted processes; `None` keeps it nowhere (a
    /// restarted process then comes back on version 1 and the next round brings it back).
    pub store: Option<Arc<dyn PlacementStore>>,
}

/// Where a rebalancer keeps the table in force for processes that start later. Written once
/// every shard has prepared a new version, before any pod switches to it: a process that starts
/// from then on may read either version, and every round brings the ones on another version
/// back to the table in force.
pub trait PlacementStore: Send + Sync + std::fmt::Debug {
    /// Keeps `placement`, replacing the table kept before.
    fn save<'a>(&'a self, placement: &'a Placement) -> BoxFuture<'a, Result<()>>;
}

/// The placement file of `shardseek up` (its children's `--placement-file`).
#[derive(Clone, Debug)]
pub struct FileStore {
    pub path: PathBuf,
}

impl PlacementStore for FileStore {
    fn save<'a>(&'a self, placement: &'a Placement) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { placement.write_file(&self.path) })
    }
}

/// What one rebalance did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A new version is in force everywhere.
    Published,
    /// The computed table is the one in force, or not better by [`MIN_GAIN`].
    Unchanged,
    /// No pod dispatched anything since the last read.
    NoLoad,
}

impl Outcome {
    /// The outcome's label in metrics (`published`, `unchanged`, `no_load`).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Unchanged => "unchanged",
            Outcome::NoLoad => "no_load",
        }
    }
}

/// The figures of one rebalance (what `POST /rebalance` on `up`'s metrics port answers).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RebalanceReport {
    pub outcome: Outcome,
    /// The version in force afterwards.
    pub version: u64,
    /// Imbalance ratio (busiest shard ÷ mean shard, see [`eplb::imbalance`]) of the observed
    /// load under the table in force before, and under the computed table.
    pub before: f64,
    pub after: f64,
    /// The observed load per expert ((token, expert) pairs over the interval).
    pub load: Vec<f64>,
}

/// The rebalancer's state: the table in force and the pods' last load counters.
pub struct Rebalancer {
    config: RebalancerConfig,
    current: Placement,
    /// The version the next publication uses: above every version ever offered, published or
    /// not, so a shard never sees one version number for two tables.
    next_version: u64,
    last_counts: HashMap<String, Vec<u64>>,
    /// The placement version each pod reported in its last `Load`.
    pod_versions: HashMap<String, u64>,
    version_gauge: IntGauge,
    rebalances: IntCounterVec,
    predicted: GaugeVec,
}

fn metric_err(e: prometheus::Error) -> Error {
    Error::Process {
        name: "rebalancer".into(),
        reason: format!("registering metrics: {e}"),
    }
}

impl Rebalancer {
    /// Refuses a shape EPLB cannot fill (experts + redundant slots not a multiple of the
    /// shards, ...), with the reason: what `up` checks before starting anything.
    pub fn check_shape(shape: EplbShape, experts: usize) -> Result<()> {
        eplb::rebalance(&vec![1.0; experts], shape, 2).map(|_| ())
    }

    /// A rebalancer starting from `initial` (the table every process serves now); its metrics
    /// go to `registry`.
    pub fn new(config: RebalancerConfig, initial: Placement, registry: &Registry) -> Result<Self> {
        Self::check_shape(config.shape, initial.n_experts())?;
        if config.shards.len() != config.shape.shards || initial.shards() != config.shape.shards {
            return Err(Error::Placement(format!(
                "rebalancer: {} shard addresses, a shape of {} shards, a table of {}",
                config.shards.len(),
                config.shape.shards,
                initial.shards()
            )));
        }
        let version_gauge = IntGauge::new(
            "shardseek_placement_version",
            "Expert placement version in force (1 is the initial table; each rebalance that moves experts publishes the next)",
        )
        .map_err(metric_err)?;
        let rebalances = IntCounterVec::new(
            Opts::new(
                "shardseek_rebalances_total",
                "Rebalance rounds by outcome: published, unchanged, no_load, failed",
            ),
            &["outcome"],
        )
        .map_err(metric_err)?;
        let predicted = GaugeVec::new(
            Opts::new(
                "shardseek_rebalance_imbalance_ratio",
                "Busiest shard over mean shard for the last interval's expert load, under the table in force then (placement=\"before\") and the table computed for it (\"after\")",
            ),
            &["placement"],
        )
        .map_err(metric_err)?;
        registry
            .register(Box::new(version_gauge.clone()))
            .map_err(metric_err)?;
        registry
            .register(Box::new(rebalances.clone()))
            .map_err(metric_err)?;
        registry
            .register(Box::new(predicted.clone()))
            .map_err(metric_err)?;
        version_gauge.set(initial.version() as i64);
        Ok(Rebalancer {
            next_version: initial.version() + 1,
            config,
            current: initial,
            last_counts: HashMap::new(),
            pod_versions: HashMap::new(),
            version_gauge,
            rebalances,
            predicted,
        })
    }

    /// The table in force.
    pub fn placement(&self) -> &Placement {
        &self.current
    }

    /// Reads every pod's counters (the baseline of the first round's load) and brings every
    /// process on another version back to the table in force, without computing a new table:
    /// what a rebalancer that starts while the cluster already serves does first (the operator
    /// starts one whenever the pods it balances change), so a pod that started on an older
    /// table does not wait a whole interval to be switched.
    pub async fn bring_back(&mut self) -> Result<()> {
        self.gather_load().await?;
        self.reconcile().await;
        Ok(())
    }

    /// One round: read the load, compute, publish when it pays.
    pub async fn rebalance_once(&mut self) -> Result<RebalanceReport> {
        let result = self.round().await;
        let label = match &result {
            Ok(r) => r.outcome.label(),
            Err(_) => "failed",
        };
        // The round's count and the version in force change together, after the round: a
        // scrape never sees a new version whose round is not counted yet.
        self.rebalances.with_label_values(&[label]).inc();
        self.version_gauge.set(self.current.version() as i64);
        result
    }

    async fn round(&mut self) -> Result<RebalanceReport> {
        let load = self.gather_load().await?;
        self.reconcile().await;
        let before = eplb::imbalance(&self.current, &load);
        let mut report = RebalanceReport {
            outcome: Outcome::NoLoad,
            version: self.current.version(),
            before,
            after: before,
            load,
        };
        if report.load.iter().sum::<f64>() <= 0.0 {
            return Ok(report);
        }
        let version = self.next_version;
        let next = eplb::rebalance(&report.load, self.config.shape, version)?;
        report.after = eplb::imbalance(&next, &report.load);
        self.predicted.with_label_values(&["before"]).set(before);
        self.predicted
            .with_label_values(&["after"])
            .set(report.after);
        if next.same_table(&self.current) || before - report.after < MIN_GAIN {
            report.outcome = Outcome::Unchanged;
            report.after = before;
            return Ok(report);
        }
        self.next_version += 1;
        self.publish(next).await?;
        report.outcome = Outcome::Published;
        report.version = version;
        tracing::info!(
            version,
            before = report.before,
            after = report.after,
            "expert placement rebalanced"
        );
        Ok(report)
    }

    /// The load of every pod since the previous read, summed per expert. A pod that cannot be
    /// reached is left out (it is restarting; its counters start again from zero).
    async fn gather_load(&mut self) -> Result<Vec<f64>> {
        let experts = self.current.n_experts();
        let replies =
            futures::future::join_all(self.config.attention.iter().map(|addr| async move {
                let mut c = client(addr).await?;
                let r = tokio::time::timeout(RPC_TIMEOUT, c.load(LoadRequest {}))
                    .await
                    .map_err(|_| format!("Load not answered within {RPC_TIMEOUT:?}"))?
                    .map_err(|s| s.message().to_string())?;
                let r = r.into_inner();
                Ok::<_, String>((r.expert_pairs, r.placement_version))
            }))
            .await;
        let mut load = vec![0.0; experts];
        for (addr, reply) in self.config.attention.iter().zip(replies) {
            let counts = match reply {
                Ok((c, version)) if c.len() == experts => {
                    self.pod_versions.insert(addr.clone(), version);
                    c
                }
                Ok((c, _)) => {
                    return Err(Error::Placement(format!(
                        "attention pod {addr} reports load for {} experts, the model has {experts}",
                        c.len()
                    )));
                }
                Err(e) => {
                    tracing::warn!(pod = %addr, error = %e, "no expert load from this pod");
                    continue;
                }
            };
            let last = self.last_counts.get(addr);
            // Counters only grow; one that shrank belongs to a restarted pod: all of it is new.
            let restarted = last.is_some_and(|l| l.iter().zip(&counts).any(|(a, b)| b < a));
            for (e, &n) in counts.iter().enumerate() {
                let old = match last {
                    Some(l) if !restarted => l[e],
                    _ => 0,
                };
                load[e] += n.saturating_sub(old) as f64;
            }
            self.last_counts.insert(addr.clone(), counts);
        }
        Ok(load)
    }

    /// Brings back to the table in force every shard that serves another version (it restarted
    /// on an older file) and every pod whose last `Load` reported another version. Failures are
    /// only logged: the next round tries again.
    async fn reconcile(&mut self) {
        let version = self.current.version();
        let table = self.current.to_proto();
        for addr in &self.config.shards {
            let info = async {
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(RPC_TIMEOUT, ExpertClient::new(channel).info(InfoRequest {}))
                    .await
                    .map_err(|_| "Info not answered".to_string())?
                    .map_err(|s| s.message().to_string())
            };
            let Ok(info) = info.await else { continue };
            if info.into_inner().placement_version == version {
                continue;
            }
            let fixed = async {
                let mut c = client(addr).await?;
                call(c.prepare(table.clone())).await?;
                call(c.commit(CommitRequest { version })).await
            };
            match fixed.await {
                Ok(()) => {
                    tracing::info!(shard = %addr, version, "shard brought to the table in force")
                }
                Err(e) => {
                    tracing::warn!(shard = %addr, version, error = %e, "shard on another table")
                }
            }
        }
        for addr in &self.config.attention {
            if self.pod_versions.get(addr).is_none_or(|&v| v == version) {
                continue;
            }
            let fixed = async {
                let mut c = client(addr).await?;
                call(c.switch(table.clone())).await
            };
            match fixed.await {
                Ok(()) => {
                    self.pod_versions.insert(addr.clone(), version);
                    tracing::info!(pod = %addr, version, "attention pod brought to the table in force");
                }
                Err(e) => {
                    tracing::warn!(pod = %addr, version, error = %e, "attention pod on another table")
                }
            }
        }
    }

    /// Prepare on every shard, Switch on every pod, Commit on every shard.
    async fn publish(&mut self, next: Placement) -> Result<()> {
        let version = next.version();
        let table = next.to_proto();
        let failed = |what: &str, addr: &str, why: String| {
            Error::Placement(format!(
                "publishing version {version}: {what} {addr} failed: {why}"
            ))
        };
        let prepared = futures::future::join_all(self.config.shards.iter().map(|addr| {
            let table = table.clone();
            async move {
                let mut c = client(addr).await?;
                call(c.prepare(table)).await
            }
        }))
        .await;
        for (addr, r) in self.config.shards.iter().zip(prepared) {
            r.map_err(|why| failed("Prepare on shard", addr, why))?;
        }
        if let Some(store) = &self.config.store {
            store.save(&next).await?;
        }
        let switched = futures::future::join_all(self.config.attention.iter().map(|addr| {
            let table = table.clone();
            async move {
                // A pod that cannot be reached is down: it restarts on the file's table.
                let Ok(mut c) = client(addr).await else {
                    return Ok(());
                };
                call(c.switch(table)).await
            }
        }))
        .await;
        for (addr, r) in self.config.attention.iter().zip(switched) {
            r.map_err(|why| failed("Switch on attention pod", addr, why))?;
        }
        // Every pod routes with the new table now: it is in force, whatever Commit says (a shard
        // that misses it keeps serving both versions, which is harmless).
        self.current = next;
        let committed =
            futures::future::join_all(self.config.shards.iter().map(|addr| async move {
                let mut c = client(addr).await?;
                call(c.commit(CommitRequest { version })).await
            }))
            .await;
        for (addr, r) in self.config.shards.iter().zip(committed) {
            if let Err(why) = r {
                tracing::warn!(shard = %addr, version, error = %why, "commit failed");
            }
        }
        Ok(())
    }
}

/// What attention pod `addr` answers to `Placement.Load`: its (token, expert) pair counter per
/// expert (one per routed expert of the model), the placement version it routes with and the
/// model's expert groups. How a rebalancer that does not read the model (the operator) learns
/// the table's size and the model's shape.
pub async fn pod_load(addr: &str) -> std::result::Result<LoadReply, String> {
    let mut c = client(addr).await?;
    let r = tokio::time::timeout(RPC_TIMEOUT, c.load(LoadRequest {}))
        .await
        .map_err(|_| format!("Load not answered within {RPC_TIMEOUT:?}"))?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(r)
}

async fn client(addr: &str) -> std::result::Result<PlacementClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    Ok(PlacementClient::new(channel))
}

async fn call<T>(
    f: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> std::result::Result<(), String> {
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Err(_) => Err(format!("not answered within {RPC_TIMEOUT:?}")),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Ok(Ok(_)) => Ok(()),
    }
}

type Ask = oneshot::Sender<std::result::Result<RebalanceReport, String>>;

/// A running rebalancer: rounds every interval, and on demand.
pub struct RebalancerHandle {
    asks: mpsc::Sender<Ask>,
    task: tokio::task::JoinHandle<()>,
}

impl RebalancerHandle {
    /// Runs `rebalancer` every `config.interval` (the first round one interval after start)
    /// until the handle is dropped.
    pub fn spawn(mut rebalancer: Rebalancer) -> Self {
        let (asks, mut rx) = mpsc::channel::<Ask>(8);
        let interval = rebalancer.config.interval;
        let task = tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = rebalancer.rebalance_once().await {
                            tracing::warn!(error = %e, "rebalance failed; the next interval retries");
                        }
                    }
                    ask = rx.recv() => {
                        let Some(ask) = ask else { return };
                        let r = rebalancer.rebalance_once().await.map_err(|e| e.to_string());
                        let _ = ask.send(r);
                    }
                }
            }
        });
        RebalancerHandle { asks, task }
    }

    /// One round now (between the periodic ones), with its figures.
    pub async fn rebalance_now(&self) -> std::result::Result<RebalanceReport, String> {
        let (tx, rx) = oneshot::channel();
        self.asks
            .send(tx)
            .await
            .map_err(|_| "the rebalancer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the rebalancer has stopped".to_string())?
    }
}

impl Drop for RebalancerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}
