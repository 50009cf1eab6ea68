//! Online expert rebalancing (EPLB) under Kubernetes: the leader runs one
//! [`shardseek_router::rebalancer::Rebalancer`] (the same one `shardseek up --rebalance-interval`
//! runs) per `DeepSeekDeployment` that sets `experts.rebalanceIntervalSeconds` (DESIGN.md §4, §6).
//!
//! - **Whom it talks to**: the attention pods and expert shards by Pod IP, read from the API
//!   (`status.podIP`, the Ready condition, the StatefulSet's pod-index label = shard id), on the
//!   gRPC ports of the cluster config. A rebalancer starts only once every desired pod of both
//!   roles is ready, and is replaced whenever that set changes (scale, a pod restarted or moved),
//!   so a publication never skips a pod that serves. A new rebalancer first finishes a
//!   publication the ConfigMap records as under way and brings every pod and shard on another
//!   version back to the table in force ([`Rebalancer::bring_back`]).
//! - **What it keeps**: nothing the cluster does not hold. The load no finished round used is
//!   kept by the attention pods (`Load`/`ConsumeLoad`), the table in force — and during a
//!   publication the one it switches from — by the ConfigMap; so replacing a rebalancer (a pod
//!   changed) or losing the leader loses no load and leaves no publication half-done for good.
//! - **Which policy**: hierarchical (DeepSeek's EPLB by expert groups and nodes) when the shards
//!   group into nodes by `spec.nodeName` ([`policy_shape`]), flat otherwise.
//! - **Where the table is kept**: the ConfigMap `NAME-placement` ([`ConfigMapStore`]), applied
//!   once every shard has prepared a new version (with the table it switches from) and again once
//!   every pod routes with it (alone), where `up` writes its file. Shards and
//!   attention pods mount it (`--placement-file`), so a restarted pod comes back on the table in
//!   force. It is owned by the `DeepSeekDeployment` and annotated with the shape it was computed
//!   for; the reconcile deletes a table of another shape before applying the workloads.
//! - **What it reports**: after each publication it merge-patches `status.placementVersion` and
//!   publishes a `PlacementPublished` Event; a failed round is a `RebalanceFailed` Warning. Rounds
//!   are counted in `shardseek_operator_rebalances_total{outcome}`.
//! - **When it stops**: when the field is removed (the pods keep the table in force, and so does
//!   the ConfigMap they restart from), when the object is deleted (each round first checks it still
//!   exists), when the shape changes, and when this replica stops leading.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use shardseek_proto::cluster_config as cc;
use shardseek_router::eplb::EplbShape;
use shardseek_router::rebalancer::{
    Outcome, PlacementStore, RebalanceReport, Rebalancer, RebalancerConfig,
};
use shardseek_router::{KeptTable, Placement};

use crate::builders::{self, COMPONENT_LABEL, POD_INDEX_LABEL, Role};
use crate::controller::FIELD_MANAGER;
use crate::crd::DeepSeekDeployment;
use crate::metrics::Metrics;

/// How long a rebalancer that could not start (no pod answered `Load`) waits before trying again.
const START_RETRY: Duration = Duration::from_secs(5);

/// The addresses a rebalancer talks to, and the pods behind them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    /// Expert shards' gRPC addresses, shard id = position.
    pub shards: Vec<String>,
    /// Attention pods' gRPC addresses, by ordinal.
    pub attention: Vec<String>,
    /// The node each shard runs on (`spec.nodeName`, empty when not set), shard id = position:
    /// the hierarchical policy needs to know which shards share a node.
    pub shard_nodes: Vec<String>,
    /// Every pod's identity (uid, IP, container restarts): a pod that restarted in place is a
    /// change too (it may have started on an older table).
    pub pods: Vec<String>,
}

/// The gRPC addresses of every desired attention pod and expert shard of `dsd` when each is
/// ready (`None` while any is missing, not ready, or being deleted).
pub fn ready_targets(dsd: &DeepSeekDeployment, pods: &[Pod]) -> Option<Targets> {
    let name = dsd.name_any();
    let names = builders::Names::new(&name);
    let mut pod_ids = Vec::new();
    let mut nodes = Vec::new();
    let mut role = |role: Role, workload: &str, replicas: i32, port: u16| {
        let mut addrs = Vec::new();
        for ordinal in 0..usize::try_from(replicas).ok()? {
            let pod = pods.iter().find(|p| {
                p.labels().get(COMPONENT_LABEL).map(String::as_str) == Some(role.component())
                    && pod_ordinal(p, workload) == Some(ordinal)
                    && p.metadata.deletion_timestamp.is_none()
            })?;
            let status = pod.status.as_ref()?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            if !ready {
                return None;
            }
            let restarts: i32 = status
                .container_statuses
                .iter()
                .flatten()
                .map(|c| c.restart_count)
                .sum();
            if role == Role::Experts {
                nodes.push(
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default(),
                );
            }
            pod_ids.push(format!(
                "{}/{}/{ip}/{restarts}",
                pod.name_any(),
                pod.metadata.uid.as_deref().unwrap_or_default()
            ));
            addrs.push(if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            });
        }
        Some(addrs)
    };
    let shards = role(
        Role::Experts,
        &names.experts,
        dsd.spec.experts.shards,
        cc::DEFAULT_EXPERT_GRPC_PORT,
    )?;
    let attention = role(
        Role::Attention,
        &names.attention,
        dsd.spec.attention.replicas,
        cc::DEFAULT_ATTENTION_GRPC_PORT,
    )?;
    Some(Targets {
        shards,
        attention,
        shard_nodes: nodes,
        pods: pod_ids,
    })
}

/// A StatefulSet pod's ordinal: its pod-index label, else the suffix of its name.
fn pod_ordinal(pod: &Pod, workload: &str) -> Option<usize> {
    if let Some(index) = pod.labels().get(POD_INDEX_LABEL) {
        return index.parse().ok();
    }
    pod.name_any()
        .strip_prefix(workload)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// The record kept in a placement ConfigMap (the table in force, and the table a publication
/// under way switches from), if it was computed for `dsd`'s current shape.
pub fn kept_table(dsd: &DeepSeekDeployment, config_map: &ConfigMap) -> Option<KeptTable> {
    let shape = config_map
        .annotations()
        .get(builders::PLACEMENT_SHAPE_ANNOTATION)?;
    if *shape != builders::placement_shape(dsd) {
        return None;
    }
    let text = config_map.data.as_ref()?.get(builders::PLACEMENT_KEY)?;
    let kept = KeptTable::from_json(text).ok()?;
    (i32::try_from(kept.current.shards()).ok() == Some(dsd.spec.experts.shards)).then_some(kept)
}

/// The rebalancer's [`PlacementStore`] under Kubernetes: server-side applies the ConfigMap
/// `NAME-placement` ([`builders::placement_config_map`]) that the pods mount.
#[derive(Clone)]
pub struct ConfigMapStore {
    api: Api<ConfigMap>,
    dsd: Arc<DeepSeekDeployment>,
}

impl std::fmt::Debug for ConfigMapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ConfigMapStore({})",
            builders::Names::new(&self.dsd.name_any()).placement
        )
    }
}

impl ConfigMapStore {
    /// The store of `dsd`'s table, written through `client`.
    pub fn new(client: Client, dsd: Arc<DeepSeekDeployment>) -> Self {
        let namespace = dsd.namespace().unwrap_or_default();
        Self {
            api: Api::namespaced(client, &namespace),
            dsd,
        }
    }

    /// Reads the kept record, if there is one of the current shape.
    pub async fn load(&self) -> kube::Result<Option<KeptTable>> {
        let name = builders::Names::new(&self.dsd.name_any()).placement;
        Ok(self
            .api
            .get_opt(&name)
            .await?
            .and_then(|cm| kept_table(&self.dsd, &cm)))
    }
}

impl PlacementStore for ConfigMapStore {
    fn save<'a>(&'a self, kept: &'a KeptTable) -> BoxFuture<'a, shardseek_router::Result<()>> {
        Box::pin(async move {
            let failed = |why: String| {
                shardseek_router::Error::Placement(format!(
                    "keeping version {} in ConfigMap {}: {why}",
                    kept.current.version(),
                    builders::Names::new(&self.dsd.name_any()).placement
                ))
            };
            let cm = builders::placement_config_map(&self.dsd, &kept.to_json())
                .map_err(|e| failed(e.to_string()))?;
            let name = cm.metadata.name.clone().unwrap_or_default();
            self.api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&cm),
                )
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        })
    }
}

/// What every rebalancer task shares with the reconciler.
#[derive(Clone)]
pub struct TaskEnv {
    /// The API client.
    pub client: Client,
    /// Publishes the rebalancer's Events.
    pub recorder: Recorder,
    /// Counts rounds.
    pub metrics: Arc<Metrics>,
}

/// Which rebalancer runs: the object, its interval and shape, and the pods it talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    uid: String,
    interval: u64,
    shape: String,
    targets: Targets,
}

struct Running {
    id: u64,
    key: Key,
    /// The version in force (0 until the rebalancer has its starting table).
    version: Arc<AtomicU64>,
    /// Aborted on drop; `None` once the task removed its own entry (it is ending by itself).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

type Table = Mutex<HashMap<ObjectRef<DeepSeekDeployment>, Running>>;

/// The running rebalancers, one per `DeepSeekDeployment` that sets an interval. Dropping it (or
/// [`stop_all`](Self::stop_all)) stops them all.
#[derive(Default)]
pub struct Rebalancers {
    running: Arc<Table>,
    next_id: AtomicU64,
}

impl Rebalancers {
    /// Starts, keeps, replaces or stops the rebalancer of `dsd` for its spec and `pods` (every
    /// pod of the deployment, as listed by the reconcile).
    pub fn sync(&self, dsd: &Arc<DeepSeekDeployment>, pods: &[Pod], env: &TaskEnv) {
        let object = ObjectRef::from_obj(dsd.as_ref());
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = dsd
            .spec
            .experts
            .rebalance_interval_seconds
            .filter(|_| dsd.spec.experts.shards > 0 && dsd.metadata.deletion_timestamp.is_none())
            .and_then(|s| u64::try_from(s).ok());
        let Some(interval) = wanted else {
            if running.remove(&object).is_some() {
                tracing::info!(object = %object, "expert rebalancing stopped");
            }
            env.metrics.rebalancers.set(running.len() as i64);
            return;
        };
        let uid = dsd.metadata.uid.clone().unwrap_or_default();
        let shape = builders::placement_shape(dsd);
        let same_spec =
            |r: &Running| r.key.uid == uid && r.key.interval == interval && r.key.shape == shape;
        if running.get(&object).is_some_and(|r| !same_spec(r)) {
            running.remove(&object);
        }
        // Pods missing or not ready: a running rebalancer keeps its pods (a pod that is not
        // ready gets no traffic; its replacement is taken in once every pod is ready again).
        let Some(targets) = ready_targets(dsd, pods) else {
            env.metrics.rebalancers.set(running.len() as i64);
            return;
        };
        let key = Key {
            uid,
            interval,
            shape,
            targets,
        };
        if running.get(&object).is_none_or(|r| r.key != key) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let version = Arc::new(AtomicU64::new(0));
            let task = tokio::spawn(run(
                Arc::clone(dsd),
                key.clone(),
                env.clone(),
                Arc::clone(&version),
                Arc::downgrade(&self.running),
                id,
            ));
            tracing::info!(object = %object, interval, shards = ?key.targets.shards, attention = ?key.targets.attention, "expert rebalancing started");
            running.insert(
                object,
                Running {
                    id,
                    key,
                    version,
                    task: Some(task),
                },
            );
        }
        env.metrics.rebalancers.set(running.len() as i64);
    }

    /// Stops the rebalancer of `object`, if one runs.
    pub fn stop(&self, object: &ObjectRef<DeepSeekDeployment>, metrics: &Metrics) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(object);
        metrics.rebalancers.set(running.len() as i64);
    }

    /// Stops every rebalancer (this replica stops leading).
    pub fn stop_all(&self, metrics: &Metrics) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        metrics.rebalancers.set(0);
    }

    /// The placement version in force under `object`'s running rebalancer, once it has its
    /// starting table.
    pub fn version(&self, object: &ObjectRef<DeepSeekDeployment>) -> Option<u64> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .get(object)
            .map(|r| r.version.load(Ordering::Relaxed))
            .filter(|&v| v > 0)
    }

    /// Whether a rebalancer runs for `object`.
    pub fn is_running(&self, object: &ObjectRef<DeepSeekDeployment>) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(object)
    }
}

/// The table the rebalancer starts from and the policy's shape: the kept record (with the table
/// a publication under way switches from, which the rebalancer then finishes), else the
/// initial table for the expert count an attention pod reports. Renumbered above every version a
/// pod reports when the kept table is gone (deleted by hand), so that no process sees one
/// version number for two tables. The shape is hierarchical when the shards group into nodes
/// (see [`policy_shape`]), with the model's expert groups the pods report.
async fn starting_table(
    store: &ConfigMapStore,
    targets: &Targets,
    shards: usize,
    redundant: usize,
) -> Result<(KeptTable, bool, EplbShape), String> {
    let mut experts = None;
    let mut groups = 1;
    let mut highest = 1;
    let mut last_error = String::from("no attention pod");
    for addr in &targets.attention {
        match shardseek_router::rebalancer::pod_load(addr).await {
            Ok(r) => {
                experts = Some(r.expert_pairs.len());
                highest = highest.max(r.placement_version);
                groups = groups.max(r.expert_groups as usize);
            }
            Err(e) => last_error = format!("attention pod {addr}: {e}"),
        }
    }
    let experts = experts.ok_or(last_error)?;
    let shape = policy_shape(shards, redundant, groups, experts, &targets.shard_nodes);
    if let Some(kept) = store
        .load()
        .await
        .map_err(|e| format!("reading the kept table: {e}"))?
    {
        return Ok((kept, false, shape));
    }
    let initial = Placement::initial(experts, shape.shards, shape.redundant / shape.shards)
        .map_err(|e| e.to_string())?;
    if highest == 1 {
        return Ok((KeptTable::settled(initial), false, shape));
    }
    let replicas = (0..experts)
        .map(|e| initial.replicas(e).unwrap_or_default().to_vec())
        .collect();
    let renumbered = Placement::from_assignments(highest + 1, shape.shards, replicas)
        .map_err(|e| e.to_string())?;
    Ok((KeptTable::settled(renumbered), true, shape))
}

/// DeepSeek's hierarchical policy (expert groups packed onto nodes, replicas chosen within each
/// node) when the shards group into nodes — consecutive shard ids on one node, the same number
/// on each, at least two nodes — and the model's shape fits it; the flat (global) policy
/// otherwise, as under `up`, whose shards share one machine.
pub fn policy_shape(
    shards: usize,
    redundant: usize,
    groups: usize,
    experts: usize,
    shard_nodes: &[String],
) -> EplbShape {
    let flat = EplbShape {
        shards,
        redundant,
        groups: 1,
        nodes: 1,
    };
    let nodes = node_runs(shard_nodes);
    let hierarchical = EplbShape {
        groups: groups.max(1),
        nodes,
        ..flat
    };
    if nodes > 1 && Rebalancer::check_shape(hierarchical, experts).is_ok() {
        hierarchical
    } else {
        flat
    }
}

/// How many nodes the shards group into: the number of runs of consecutive shards on one node
/// when every run has the same length and no node holds two runs; 1 otherwise (or when a
/// shard's node is not known).
fn node_runs(shard_nodes: &[String]) -> usize {
    if shard_nodes.is_empty() || shard_nodes.iter().any(String::is_empty) {
        return 1;
    }
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for n in shard_nodes {
        match runs.last_mut() {
            Some((last, len)) if *last == n.as_str() => *len += 1,
            _ => runs.push((n.as_str(), 1)),
        }
    }
    let same_length = runs.iter().all(|r| r.1 == runs[0].1);
    let distinct = runs
        .iter()
        .enumerate()
        .all(|(i, r)| runs[..i].iter().all(|q| q.0 != r.0));
    if same_length && distinct {
        runs.len()
    } else {
        1
    }
}

/// One rebalancer's life: its starting table, then a round every interval until stopped.
async fn run(
    dsd: Arc<DeepSeekDeployment>,
    key: Key,
    env: TaskEnv,
    version: Arc<AtomicU64>,
    registry: Weak<Table>,
    id: u64,
) {
    let name = dsd.name_any();
    let namespace = dsd.namespace().unwrap_or_default();
    let reference = dsd.object_ref(&());
    let shards = key.targets.shards.len();
    let redundant = usize::try_from(dsd.spec.experts.redundant_slots).unwrap_or(0);
    let store = Arc::new(ConfigMapStore::new(env.client.clone(), Arc::clone(&dsd)));
    let interval = Duration::from_secs(key.interval);
    let (initial, save, shape) = loop {
        match starting_table(&store, &key.targets, shards, redundant).await {
            Ok(t) => {
                tracing::info!(object = %name, nodes = t.2.nodes, groups = t.2.groups, "expert rebalancing policy: {}", if t.2.nodes > 1 { "hierarchical" } else { "flat" });
                break t;
            }
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "rebalancer cannot start yet");
                tokio::time::sleep(START_RETRY).await;
            }
        }
    };
    let config = RebalancerConfig {
        shards: key.targets.shards.clone(),
        attention: key.targets.attention.clone(),
        shape,
        interval,
        store: Some(store.clone()),
    };
    // Its own metrics go to a registry nobody reads: the operator counts rounds in its own
    // (one rebalancer per object, whose gauges would collide in one registry).
    let mut rebalancer =
        match Rebalancer::new(config, initial.clone(), &prometheus::Registry::new()) {
            Ok(r) => r,
            Err(e) => {
                // The shape cannot be balanced (e.g. experts + redundant slots do not divide over
                // the shards): say so once; a new spec restarts the rebalancer.
                env.metrics.rebalances.with_label_values(&["failed"]).inc();
                warn_event(&env.recorder, &reference, &e.to_string()).await;
                tracing::warn!(object = %name, error = %e, "rebalancer not started");
                return;
            }
        };
    if save && let Err(e) = store.save(&initial).await {
        tracing::warn!(object = %name, error = %e, "could not keep the starting table");
    }
    version.store(initial.current.version(), Ordering::Relaxed);
    if let Err(e) = rebalancer.bring_back().await {
        tracing::warn!(object = %name, error = %e, "bringing pods to the table in force failed");
    }
    let api: Api<DeepSeekDeployment> = Api::namespaced(env.client.clone(), &namespace);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Without a finalizer the reconcile may never see the object go: check it here.
        match api.get_opt(&name).await {
            Ok(Some(current)) if current.metadata.uid == dsd.metadata.uid => {}
            Ok(_) => {
                if let Some(table) = registry.upgrade() {
                    let mut running = table.lock().unwrap_or_else(|p| p.into_inner());
                    let object = ObjectRef::from_obj(dsd.as_ref());
                    if running.get(&object).is_some_and(|r| r.id == id) {
                        // Dropping our own entry must not abort this task from inside: detach it.
                        if let Some(mut entry) = running.remove(&object) {
                            entry.task = None;
                            env.metrics.rebalancers.set(running.len() as i64);
                        }
                    }
                }
                tracing::info!(object = %name, "object deleted; expert rebalancing stopped");
                return;
            }
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "cannot read the object; skipping this round");
                continue;
            }
        }
        let result = rebalancer.rebalance_once().await;
        let label = match &result {
            Ok(r) => r.outcome.label(),
            Err(_) => "failed",
        };
        env.metrics.rebalances.with_label_values(&[label]).inc();
        version.store(rebalancer.placement().version(), Ordering::Relaxed);
        match result {
            Ok(report) if report.outcome == Outcome::Published => {
                published(&api, &env.recorder, &reference, &name, &report).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(object = %name, error = %e, "rebalance failed; the next interval retries");
                warn_event(&env.recorder, &reference, &e.to_string()).await;
            }
        }
    }
}

/// After a publication: `status.placementVersion` (a merge patch of that field alone on the
/// status subresource) and a Normal Event with the figures.
async fn published(
    api: &Api<DeepSeekDeployment>,
    recorder: &Recorder,
    reference: &ObjectReference,
    name: &str,
    report: &RebalanceReport,
) {
    let patch = serde_json::json!({"status": {"placementVersion": report.version}});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        // The next reconcile writes the running rebalancer's version anyway.
        tracing::warn!(object = %name, error = %e, "could not write status.placementVersion");
    }
    let event = Event {
        type_: EventType::Normal,
        reason: "PlacementPublished".to_string(),
        note: Some(format!(
            "expert placement version {} in force: predicted imbalance {:.3} -> {:.3} (busiest shard / mean shard)",
            report.version, report.before, report.after
        )),
        action: "Rebalance".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

async fn warn_event(recorder: &Recorder, reference: &ObjectReference, message: &str) {
    let mut note = message.to_string();
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "RebalanceFailed".to_string(),
        note: Some(note),
        action: "Rebalance".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dsd() -> DeepSeekDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "shardseek.io/v1alpha1",
            "kind": "DeepSeekDeployment",
            "metadata": {"name": "v3", "namespace": "llm", "uid": "u"},
            "spec": {"image": "img", "model": {"servedName": "m", "volume": {"hostPath": {"path": "/m"}}},
                     "attention": {"replicas": 1}, "experts": {"shards": 2, "rebalanceIntervalSeconds": 30}}
        }))
        .expect("dsd")
    }

    fn pod(name: &str, role: &str, index: Option<&str>, ip: &str, ready: bool) -> Pod {
        let mut labels = serde_json::json!({"app.kubernetes.io/component": role});
        if let Some(i) = index {
            labels[POD_INDEX_LABEL] = serde_json::json!(i);
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": labels},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .expect("pod")
    }

    #[test]
    fn targets_need_every_desired_pod_ready_and_use_pod_ips() {
        let d = dsd();
        let mut pods = vec![
            pod("v3-experts-1", "experts", Some("1"), "10.0.0.2", true),
            pod("v3-experts-0", "experts", Some("0"), "10.0.0.1", true),
            // No pod-index label: the ordinal comes from the name.
            pod("v3-attention-0", "attention", None, "fd00::7", true),
            pod("v3-router-abc", "router", None, "10.0.0.9", true),
        ];
        let t = ready_targets(&d, &pods).expect("all ready");
        assert_eq!(t.shards, ["10.0.0.1:50053", "10.0.0.2:50053"]);
        assert_eq!(t.attention, ["[fd00::7]:50052"]);
        assert_eq!(t.shard_nodes, ["", ""], "no node assigned yet");
        pods[0] = pod("v3-experts-1", "experts", Some("1"), "10.0.0.2", false);
        assert_eq!(ready_targets(&d, &pods), None, "a shard not ready");
        pods.remove(0);
        assert_eq!(ready_targets(&d, &pods), None, "a shard missing");
    }

    fn on(node: &str, mut p: Pod) -> Pod {
        p.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
        p
    }

    #[test]
    fn shards_grouped_into_nodes_get_the_hierarchical_policy() {
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(node_runs(&n(&["a", "a", "b", "b"])), 2);
        assert_eq!(node_runs(&n(&["a", "b", "c", "d"])), 4);
        assert_eq!(node_runs(&n(&["a", "a", "a", "a"])), 1);
        // Not consecutive, unequal runs, a node twice, a node unknown: flat.
        assert_eq!(node_runs(&n(&["a", "b", "a", "b"])), 1);
        assert_eq!(node_runs(&n(&["a", "a", "a", "b"])), 1);
        assert_eq!(node_runs(&n(&["a", "b", "b", "a"])), 1);
        assert_eq!(node_runs(&n(&["a", "a", "", "b"])), 1);
        assert_eq!(node_runs(&[]), 1);
        // 64 experts in 8 groups, 4 shards on 2 nodes: hierarchical with the model's groups.
        let two = n(&["a", "a", "b", "b"]);
        let s = policy_shape(4, 4, 8, 64, &two);
        assert_eq!((s.nodes, s.groups, s.shards, s.redundant), (2, 8, 4, 4));
        // Groups that do not divide over the nodes: the flat policy.
        let s = policy_shape(4, 4, 3, 63, &two);
        assert_eq!((s.nodes, s.groups), (1, 1));
        // One node: flat.
        let s = policy_shape(4, 4, 8, 64, &n(&["a", "a", "a", "a"]));
        assert_eq!((s.nodes, s.groups), (1, 1));
        // The nodes come from the shard pods' spec.nodeName, by shard id.
        let mut d = dsd();
        d.spec.experts.shards = 4;
        let pods = vec![
            on(
                "n1",
                pod("v3-experts-2", "experts", Some("2"), "10.0.0.3", true),
            ),
            on(
                "n0",
                pod("v3-experts-0", "experts", Some("0"), "10.0.0.1", true),
            ),
            on(
                "n1",
                pod("v3-experts-3", "experts", Some("3"), "10.0.0.4", true),
            ),
            on(
                "n0",
                pod("v3-experts-1", "experts", Some("1"), "10.0.0.2", true),
            ),
            on(
                "n9",
                pod("v3-attention-0", "attention", None, "10.0.0.8", true),
            ),
        ];
        let t = ready_targets(&d, &pods).expect("all ready");
        assert_eq!(t.shard_nodes, ["n0", "n0", "n1", "n1"]);
        assert_eq!(node_runs(&t.shard_nodes), 2);
    }
}
