//! Online EPLB: the component that keeps the expert placement balanced while the cluster serves
//! (DESIGN.md §4). `shardseek up --rebalance-interval SECS` runs one in its supervisor process;
//! the operator runs one per `DeepSeekDeployment` that asks for it.
//!
//! Every interval it
//! 1. reads, from every attention pod (`Placement.Load`), the (token, expert) pairs no finished
//!    round has used yet, summed over pods and layers. **The pods keep that window, not the
//!    rebalancer**: a pod counts every pair and also how many a finished round used; a round
//!    that finishes (published, or kept the table in force) tells each pod which counts it read
//!    (`ConsumeLoad`), and a failed round tells nothing, so its load is read again. A rebalancer
//!    that restarts (the operator fails over or replaces it when its pods change) therefore
//!    reads everything counted since the last finished round: it keeps no state of its own that
//!    the cluster does not also hold (the load in the pods, the table in the [`PlacementStore`]);
//! 2. first finishes a publication under way and brings every process on another version back
//!    to the table in force ([`converge`](Rebalancer::bring_back));
//! 3. computes a table for the load with [`eplb::rebalance`] and keeps the one in force when the
//!    new one is the same table or would lower the predicted imbalance by less than
//!    [`MIN_GAIN`] (moving experts for nothing only churns);
//! 4. publishes a new version:
//!    **Prepare** on every shard (it maps the experts it gains and accepts the new version while
//!    still serving the old one); the store then records "version V in force, switching from
//!    the old one" (the point of no return: from here the publication is finished, never
//!    undone); every shard is checked to accept V (one that restarted on the old record is
//!    prepared again); **Switch** on every attention pod (answered once the pod's steps route
//!    with V: pods switch between steps, never inside one), and every pod is checked to route
//!    with V — one that was restarting is waited for and switched; only then **Commit** on every
//!    shard (it drops the experts it lost and refuses the old version, which no pod uses any
//!    more), and the store records V alone. A shard that cannot prepare aborts the publication
//!    before anything is recorded or dropped; the next interval tries again with a higher
//!    version. No request fails and none waits for more than the step boundary it switches at.
//!
//! Processes that start while a publication is under way read the store: a shard accepts both
//! the old version and V (so neither the pods that switched nor those that have not are
//! refused), a pod routes with V. One that read the store before the record changed is found by
//! the checks above, which run after the record changed, before anything is committed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts, Registry};
use shardseek_proto::v1::expert_client::ExpertClient;
use shardseek_proto::v1::placement_client::PlacementClient;
use shardseek_proto::v1::{CommitRequest, ConsumeRequest, InfoRequest, LoadReply, LoadRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::eplb::{self, EplbShape};
use crate::placement::{KeptTable, Placement};
use crate::{Error, Result};

/// Deadline of one control call. Prepare maps a shard's gained experts (mmap: fast, but a
/// backend may prepare weights); Switch waits for the pod's current step to end, and a long
/// prefill step on CPU takes seconds.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to a pod on loopback or the cluster network takes milliseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// While a publication is under way, how long a process that cannot be reached (it is
/// restarting) is waited for before the round gives up; the publication stays under way (shards
/// keep serving both versions) and the next round finishes it. A restarted pod loads its model
/// before it answers.
pub const CONVERGE_WAIT: Duration = Duration::from_secs(30);
/// Between two tries to reach a restarting process.
const RETRY_EVERY: Duration = Duration::from_millis(200);
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
    /// Where the table in force is kept for processes that start later; `None` keeps it
    /// nowhere (a restarted process then comes back on version 1 and the next round brings it
    /// back).
    pub store: Option<Arc<dyn PlacementStore>>,
}

/// Where a rebalancer keeps the table in force (and, during a publication, the table it
/// switches from) for processes that start later and for a rebalancer that restarts.
pub trait PlacementStore: Send + Sync + std::fmt::Debug {
    /// Keeps `kept`, replacing what was kept before.
    fn save<'a>(&'a self, kept: &'a KeptTable) -> BoxFuture<'a, Result<()>>;
}

/// The placement file of `shardseek up` (its children's `--placement-file`).
#[derive(Clone, Debug)]
pub struct FileStore {
    pub path: PathBuf,
}

impl PlacementStore for FileStore {
    fn save<'a>(&'a self, kept: &'a KeptTable) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { kept.write_file(&self.path) })
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
    /// No pod dispatched anything no round has used.
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
    /// The observed load per expert ((token, expert) pairs no earlier round used).
    pub load: Vec<f64>,
}

/// One pod's answer to `Load`.
struct PodLoad {
    addr: String,
    reply: LoadReply,
}

/// The rebalancer: the table in force and, during a publication, the one it switches from —
/// both also in the store, so a rebalancer that restarts resumes from there.
pub struct Rebalancer {
    config: RebalancerConfig,
    current: Placement,
    /// The table a publication under way switches from: set once every shard prepared
    /// `current` and the store recorded it, cleared once every pod routes with `current` and
    /// the shards committed it.
    previous: Option<Placement>,
    /// The version the next publication uses: above every version this rebalancer offered. (A
    /// restarted one may offer again a version whose Prepare an earlier one aborted: no pod
    /// ever routed with that table, and a shard's Prepare replaces it.)
    next_version: u64,
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

    /// A rebalancer starting from `kept` (what the store keeps, or the initial table every
    /// process serves now); its metrics go to `registry`. A kept publication under way is
    /// finished by [`bring_back`](Self::bring_back) or the first round.
    pub fn new(config: RebalancerConfig, kept: KeptTable, registry: &Registry) -> Result<Self> {
        let initial = &kept.current;
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
                "Busiest shard over mean shard for the last round's expert load, under the table in force then (placement=\"before\") and the table computed for it (\"after\")",
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
            current: kept.current,
            previous: kept.previous,
            version_gauge,
            rebalances,
            predicted,
        })
    }

    /// The table in force.
    pub fn placement(&self) -> &Placement {
        &self.current
    }

    /// Whether a publication is under way (recorded, not yet committed everywhere).
    pub fn publishing(&self) -> bool {
        self.previous.is_some()
    }

    /// Finishes a publication under way and brings every process on another version back to
    /// the table in force, without reading load or computing a table: what a rebalancer that
    /// starts while the cluster already serves does first (the operator starts one whenever
    /// the pods it balances change), so a pod that started on an older table does not wait a
    /// whole interval to be switched.
    pub async fn bring_back(&mut self) -> Result<()> {
        let r = self.converge().await;
        self.version_gauge.set(self.current.version() as i64);
        r
    }

    /// One round: read the load, finish what is under way, compute, publish when it pays.
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
        let reads = self.read_load().await?;
        if let Err(e) = self.converge().await {
            if self.previous.is_some() {
                // Publishing on top of an unfinished publication could commit a version a pod
                // that was not reached still routes with.
                return Err(e);
            }
            tracing::warn!(error = %e, "a process is not on the table in force; the next round retries");
        }
        let experts = self.current.n_experts();
        let mut load = vec![0.0; experts];
        for r in &reads {
            for (e, (&n, &used)) in r
                .reply
                .expert_pairs
                .iter()
                .zip(r.reply.consumed_pairs.iter().chain(std::iter::repeat(&0)))
                .enumerate()
            {
                load[e] += n.saturating_sub(used) as f64;
            }
        }
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
            self.consume(&reads).await;
            return Ok(report);
        }
        self.next_version += 1;
        self.publish(next).await?;
        // The new table is in force from here (recorded, pods may route with it): the load that
        // chose it is used, whether or not the rest of the publication finishes in this round.
        self.consume(&reads).await;
        self.converge().await.map_err(|e| {
            Error::Placement(format!(
                "version {version} is in force but its publication is not finished ({e}); \
                 shards serve both versions until a later round finishes it"
            ))
        })?;
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

    /// Every reachable pod's `Load`. A pod that cannot be reached is left out (it is
    /// restarting; what it counted died with it, what it counts next is read later).
    async fn read_load(&self) -> Result<Vec<PodLoad>> {
        let experts = self.current.n_experts();
        let replies =
            futures::future::join_all(self.config.attention.iter().map(|addr| pod_load(addr)))
                .await;
        let mut out = Vec::new();
        for (addr, reply) in self.config.attention.iter().zip(replies) {
            match reply {
                Ok(r) if r.expert_pairs.len() == experts => out.push(PodLoad {
                    addr: addr.clone(),
                    reply: r,
                }),
                Ok(r) => {
                    return Err(Error::Placement(format!(
                        "attention pod {addr} reports load for {} experts, the model has {experts}",
                        r.expert_pairs.len()
                    )));
                }
                Err(e) => tracing::warn!(pod = %addr, error = %e, "no expert load from this pod"),
            }
        }
        Ok(out)
    }

    /// Tells every pod read in this round that the counts it reported are used. A pod that
    /// misses it (it restarted: its counters are new; or it cannot be reached) keeps them
    /// unused: the next round reads them again.
    async fn consume(&self, reads: &[PodLoad]) {
        let done = futures::future::join_all(reads.iter().map(|r| async move {
            let mut c = client(&r.addr).await?;
            call(c.consume_load(ConsumeRequest {
                expert_pairs: r.reply.expert_pairs.clone(),
                load_epoch: r.reply.load_epoch,
            }))
            .await
        }))
        .await;
        for (r, d) in reads.iter().zip(done) {
            if let Err(e) = d {
                tracing::warn!(pod = %r.addr, error = %e, "the pod keeps this round's load unused");
            }
        }
    }

    /// Brings every process to the table in force: every shard accepts it (Prepare where one
    /// does not), then every pod routes with it (Switch), then — only once every pod is known
    /// to — every shard serving another version too commits it, and a publication under way is
    /// recorded as finished. While one is under way a process that cannot be reached is waited
    /// for (up to [`CONVERGE_WAIT`]: it is restarting and may have read the older record);
    /// otherwise it is skipped. `Err` names what is not done; nothing is undone.
    async fn converge(&mut self) -> Result<()> {
        let wait = self.previous.is_some();
        let version = self.current.version();
        let table = self.current.to_proto();
        // 1. Shards.
        let shards = futures::future::join_all(self.config.shards.iter().map(|addr| {
            let table = table.clone();
            async move {
                let channel = connect(addr, wait).await?;
                let mut accepted = shard_versions(channel.clone()).await?;
                if !accepted.contains(&version) {
                    let mut c = PlacementClient::new(channel.clone());
                    call(c.prepare(table)).await?;
                    tracing::info!(shard = %addr, version, "shard prepared the table in force");
                    accepted = shard_versions(channel).await?;
                }
                Ok::<_, String>(accepted)
            }
        }))
        .await;
        let mut problems = Vec::new();
        let mut accepted = Vec::new();
        for (addr, r) in self.config.shards.iter().zip(shards) {
            match r {
                Ok(a) if a.contains(&version) => accepted.push((addr, a)),
                Ok(a) => problems.push(format!("shard {addr} accepts versions {a:?}")),
                Err(e) => problems.push(format!("shard {addr}: {e}")),
            }
        }
        if wait && !problems.is_empty() {
            // A pod must not route with a version a shard refuses.
            return Err(Error::Placement(format!(
                "version {version} not accepted everywhere: {}",
                problems.join("; ")
            )));
        }
        // 2. Pods.
        let pods = futures::future::join_all(self.config.attention.iter().map(|addr| {
            let table = table.clone();
            async move {
                let channel = connect(addr, wait).await?;
                let mut c = PlacementClient::new(channel);
                let routes = tokio::time::timeout(RPC_TIMEOUT, c.load(LoadRequest {}))
                    .await
                    .map_err(|_| format!("Load not answered within {RPC_TIMEOUT:?}"))?
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner()
                    .placement_version;
                if routes == version {
                    return Ok(());
                }
                let ack = tokio::time::timeout(RPC_TIMEOUT, c.switch(table))
                    .await
                    .map_err(|_| format!("Switch not answered within {RPC_TIMEOUT:?}"))?
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                if ack.placement_version != version {
                    return Err(format!("routes with version {} after Switch", ack.placement_version));
                }
                tracing::info!(pod = %addr, from = routes, version, "attention pod switched to the table in force");
                Ok(())
            }
        }))
        .await;
        for (addr, r) in self.config.attention.iter().zip(pods) {
            if let Err(e) = r {
                problems.push(format!("attention pod {addr}: {e}"));
            }
        }
        if !problems.is_empty() {
            // Nothing is committed while a pod may still route with another version.
            return Err(Error::Placement(format!(
                "not every process is on version {version}: {}",
                problems.join("; ")
            )));
        }
        // 3. Commit where a shard still serves another version.
        let committed = futures::future::join_all(
            accepted
                .iter()
                .filter(|(_, a)| a.as_slice() != [version])
                .map(|(addr, _)| async move {
                    let mut c = client(addr).await?;
                    call(c.commit(CommitRequest { version }))
                        .await
                        .map_err(|e| format!("shard {addr}: Commit: {e}"))
                }),
        )
        .await;
        let failed: Vec<String> = committed.into_iter().filter_map(|r| r.err()).collect();
        if self.previous.is_some() {
            // Every pod routes with `version`: whatever a shard that missed Commit still
            // serves is harmless, and a process that starts from here needs only this table.
            if let Some(store) = &self.config.store {
                store
                    .save(&KeptTable::settled(self.current.clone()))
                    .await?;
            }
            self.previous = None;
            tracing::info!(version, "publication finished");
        }
        if !failed.is_empty() {
            tracing::warn!(version, errors = ?failed, "commit failed; a later round retries");
        }
        Ok(())
    }

    /// Prepare on every shard, then record the new table in force (switching from the old):
    /// the point after which the publication is finished, never undone ([`converge`] switches
    /// the pods and commits). `Err` only before that point: nothing was recorded or dropped.
    async fn publish(&mut self, next: Placement) -> Result<()> {
        let version = next.version();
        let table = next.to_proto();
        let prepared = futures::future::join_all(self.config.shards.iter().map(|addr| {
            let table = table.clone();
            async move {
                let mut c = client(addr).await?;
                call(c.prepare(table)).await
            }
        }))
        .await;
        for (addr, r) in self.config.shards.iter().zip(prepared) {
            r.map_err(|why| {
                Error::Placement(format!(
                    "publishing version {version}: Prepare on shard {addr} failed: {why}"
                ))
            })?;
        }
        let kept = KeptTable {
            current: next,
            previous: Some(self.current.clone()),
        };
        if let Some(store) = &self.config.store {
            store.save(&kept).await?;
        }
        self.current = kept.current;
        self.previous = kept.previous;
        Ok(())
    }
}

/// The versions a shard accepts (`Expert.Info`); from a shard that does not list them, the
/// newest.
async fn shard_versions(channel: Channel) -> std::result::Result<Vec<u64>, String> {
    let info = tokio::time::timeout(RPC_TIMEOUT, ExpertClient::new(channel).info(InfoRequest {}))
        .await
        .map_err(|_| format!("Info not answered within {RPC_TIMEOUT:?}"))?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(if info.accepted_versions.is_empty() {
        vec![info.placement_version]
    } else {
        info.accepted_versions
    })
}

/// A channel to `addr`; with `wait`, connection failures are retried for [`CONVERGE_WAIT`]
/// (the process is restarting).
async fn connect(addr: &str, wait: bool) -> std::result::Result<Channel, String> {
    let deadline = tokio::time::Instant::now() + CONVERGE_WAIT;
    loop {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if !wait || tokio::time::Instant::now() >= deadline => {
                return Err(format!("connecting: {e}"));
            }
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
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
    Ok(PlacementClient::new(connect(addr, false).await?))
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
