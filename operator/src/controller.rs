//! The reconciler (STYLE.md rule 3; shaped after kube-rs/controller-rs `src/controller.rs`).
//!
//! `reconcile(obj, ctx)` applies; it never asks why it runs: it renders every owned object, server-side applies each with the one field
//! manager [`FIELD_MANAGER`] (so a second run with the same spec is a no-op on the server), reads
//! back what the workloads report, lists the pods for failed workers, and writes the status
//! conditions to `/status`, publishing one Event per condition that changed. Errors requeue with
//! a per-object exponential backoff that resets on the next success.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::builders::{self, INSTANCE_LABEL, MANAGED_BY, OwnedObjects, ServiceMonitor};
use crate::crd::{DeepSeekDeployment, DeepSeekDeploymentStatus};
use crate::metrics::Metrics;
use crate::rebalance::{self, Rebalancers, TaskEnv};
use crate::status::{self, Observed, RoleState};
use crate::{Error, Result};

/// The one field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "shardseek-operator";
/// The finalizer that earlier versions of the operator put on every `DeepSeekDeployment`; the
/// operator now removes it (see [`reconcile`]).
pub const LEGACY_FINALIZER: &str = "shardseek.io/cleanup";
/// The Prometheus Operator API whose presence enables ServiceMonitors.
const MONITORING_API: &str = "monitoring.coreos.com/v1";

/// Tunables of the controller; the defaults suit a real cluster, tests shorten the times.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// First retry delay after an error; doubles per consecutive error of the same object.
    pub backoff_base: Duration,
    /// Upper bound of the retry delay.
    pub backoff_max: Duration,
    /// Requeue after a successful reconcile, so pod failures that change no owned object's
    /// status still reach the Degraded condition.
    pub resync: Duration,
    /// This replica's identity in Events.
    pub reporter_instance: Option<String>,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            // 1 s doubling to 5 min: fast recovery from a blip, and a broken object costs the
            // API server one request per 5 minutes once it keeps failing.
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            resync: Duration::from_secs(60),
            reporter_instance: None,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Tunables.
    pub settings: ControllerSettings,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<ObjectRef<DeepSeekDeployment>, u32>>,
    /// The expert rebalancers of the objects that ask for one (this replica leads while the
    /// controller runs).
    pub rebalancers: Rebalancers,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: ControllerSettings) -> Arc<Self> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: settings.reporter_instance.clone(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            failures: Mutex::new(HashMap::new()),
            rebalancers: Rebalancers::default(),
        })
    }

    /// The delay before retrying `object` after its `n`-th consecutive failure (n ≥ 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(31));
        self.settings
            .backoff_base
            .saturating_mul(factor)
            .min(self.settings.backoff_max)
    }

    fn record_failure(&self, object: ObjectRef<DeepSeekDeployment>) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(object).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn reset_failures(&self, object: &ObjectRef<DeepSeekDeployment>) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(object);
    }
}

/// Runs the controller until `shutdown` resolves; reconciles in flight finish first.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = namespace.as_deref();
    // Only objects the operator manages: a cluster's other StatefulSets never wake it.
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(
        api::<DeepSeekDeployment>(&client, ns),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(&client, ns), owned.clone())
    .owns(api::<Deployment>(&client, ns), owned.clone())
    .owns(api::<Service>(&client, ns), owned.clone())
    .owns(api::<ConfigMap>(&client, ns), owned.clone())
    .owns(api::<PodDisruptionBudget>(&client, ns), owned)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, Arc::clone(&ctx))
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => tracing::debug!(%object, "reconciled"),
            Err(error) => tracing::warn!(%error, "reconcile failed"),
        }
    })
    .await;
    // Only the leader rebalances.
    ctx.rebalancers.stop_all(&ctx.metrics);
    tracing::info!("controller stopped");
}

/// One reconciliation of one object.
///
/// No finalizer: deleting a `DeepSeekDeployment` needs no work from the operator (the garbage
/// collector removes the owned objects through their owner references), and a finalizer that
/// does nothing would only hang deletion once the operator is uninstalled. The finalizer that
/// earlier versions added is removed.
#[tracing::instrument(skip_all, fields(object = %dsd.name_any(), namespace = dsd.namespace().unwrap_or_default()))]
pub async fn reconcile(dsd: Arc<DeepSeekDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start_reconcile();
    let object = ObjectRef::from_obj(dsd.as_ref());
    remove_legacy_finalizer(&dsd, &ctx).await?;
    if dsd.metadata.deletion_timestamp.is_some() {
        // Going away: the garbage collector deletes what it owns.
        ctx.rebalancers.stop(&object, &ctx.metrics);
        ctx.reset_failures(&object);
        return Ok(Action::await_change());
    }
    let action = match apply(&dsd, &ctx).await {
        Ok(action) => action,
        Err(error) => {
            publish_error(&dsd, &ctx, &error).await;
            return Err(error);
        }
    };
    ctx.reset_failures(&object);
    Ok(action)
}

/// A failed reconcile as a Warning Event on the object (`kubectl describe dsd` shows what the
/// API server refused and why); the recorder counts repeats of the same message. Not written to
/// the status: a status write would itself wake the controller and defeat the backoff.
async fn publish_error(dsd: &DeepSeekDeployment, ctx: &Context, error: &Error) {
    let mut note = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        note.push_str(": ");
        note.push_str(&cause.to_string());
        source = cause.source();
    }
    // Events hold at most 1 kB of note.
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "ReconcileFailed".to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &dsd.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

/// Removes [`LEGACY_FINALIZER`] with a merge patch of the remaining finalizers, guarded by the
/// object's resourceVersion so a concurrent change of the list fails (and is retried) instead of
/// being overwritten.
async fn remove_legacy_finalizer(dsd: &DeepSeekDeployment, ctx: &Context) -> Result<()> {
    if !dsd.finalizers().iter().any(|f| f == LEGACY_FINALIZER) {
        return Ok(());
    }
    let namespace = dsd
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let remaining: Vec<&String> = dsd
        .finalizers()
        .iter()
        .filter(|f| *f != LEGACY_FINALIZER)
        .collect();
    let api: Api<DeepSeekDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "metadata": {"finalizers": remaining, "resourceVersion": dsd.resource_version()}
    });
    api.patch(
        &dsd.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|source| Error::Kube {
        op: format!("remove finalizer {LEGACY_FINALIZER}"),
        source,
    })?;
    Ok(())
}

/// Requeues a failed object after its backoff.
pub fn error_policy(dsd: Arc<DeepSeekDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.record_error(error);
    let n = ctx.record_failure(ObjectRef::from_obj(dsd.as_ref()));
    let delay = ctx.backoff(n);
    tracing::warn!(object = %dsd.name_any(), %error, attempt = n, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

async fn server_side_apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    // `force`: the operator is the only writer of these fields; a human's `kubectl edit` of an
    // owned object is drift to undo, not a conflict to stop at.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(|source| Error::Kube {
            op: format!("apply {}", builders::describe(object)),
            source,
        })
}

/// Whether the Prometheus Operator's API is served (so a ServiceMonitor can be applied).
async fn monitoring_api_exists(client: &Client) -> Result<bool> {
    match client.list_api_group_resources(MONITORING_API).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "servicemonitors")),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
        Err(source) => Err(Error::Kube {
            op: format!("discover {MONITORING_API}"),
            source,
        }),
    }
}

async fn apply(dsd: &Arc<DeepSeekDeployment>, ctx: &Context) -> Result<Action> {
    let namespace = dsd
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let client = &ctx.client;
    let owned = match builders::build(dsd) {
        Ok(owned) => owned,
        // A spec the schema let through but that cannot be rendered: report it and wait for a
        // new spec; retrying would fail the same way.
        Err(error @ (Error::InvalidSpec(_) | Error::ClusterConfig(_))) => {
            ctx.rebalancers
                .stop(&ObjectRef::from_obj(dsd.as_ref()), &ctx.metrics);
            let observed = Observed {
                invalid_spec: Some(error.to_string()),
                ..Observed::default()
            };
            write_status(dsd, ctx, &observed).await?;
            return Ok(Action::await_change());
        }
        Err(error) => return Err(error),
    };
    let OwnedObjects {
        config_map,
        attention_service,
        attention,
        experts_service,
        experts,
        router,
        router_service,
        pod_disruption_budgets,
        service_monitor,
        config_hash,
    } = owned;

    let kept_version = check_kept_placement(dsd, ctx, &namespace).await?;
    server_side_apply(client, &namespace, &config_map).await?;
    server_side_apply(client, &namespace, &attention_service).await?;
    let attention = server_side_apply(client, &namespace, &attention).await?;
    let experts = match (experts_service, experts) {
        (Some(service), Some(sts)) => {
            server_side_apply(client, &namespace, &service).await?;
            Some(server_side_apply(client, &namespace, &sts).await?)
        }
        _ => None,
    };
    let router = server_side_apply(client, &namespace, &router).await?;
    server_side_apply(client, &namespace, &router_service).await?;
    for pdb in &pod_disruption_budgets {
        server_side_apply(client, &namespace, pdb).await?;
    }
    if monitoring_api_exists(client).await? {
        server_side_apply::<ServiceMonitor>(client, &namespace, &service_monitor).await?;
    }
    // With 0 shards the experts run inside the attention pods; an expert StatefulSet left from
    // an earlier spec with shards > 0 is garbage collected only with the owner, so delete it.
    if dsd.spec.experts.shards == 0 {
        delete_if_exists::<StatefulSet>(
            client,
            &namespace,
            &builders::Names::new(&dsd.name_any()).experts,
        )
        .await?;
        delete_if_exists::<Service>(
            client,
            &namespace,
            &builders::Names::new(&dsd.name_any()).experts,
        )
        .await?;
        delete_if_exists::<PodDisruptionBudget>(
            client,
            &namespace,
            &builders::Names::new(&dsd.name_any()).experts,
        )
        .await?;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let selector = format!(
        "app.kubernetes.io/name=shardseek,{INSTANCE_LABEL}={}",
        dsd.name_any()
    );
    let pods = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Kube {
            op: format!("list pods {selector}"),
            source,
        })?;

    let object = ObjectRef::from_obj(dsd.as_ref());
    ctx.rebalancers.sync(
        dsd,
        &pods.items,
        &TaskEnv {
            client: client.clone(),
            recorder: ctx.recorder.clone(),
            metrics: ctx.metrics.clone(),
        },
    );
    let observed = Observed {
        placement_version: ctx.rebalancers.version(&object).or(kept_version),
        attention: RoleState::from_stateful_set(dsd.spec.attention.replicas, Some(&attention)),
        experts: RoleState::from_stateful_set(dsd.spec.experts.shards, experts.as_ref()),
        router: RoleState::from_deployment(dsd.spec.router.replicas, Some(&router)),
        failures: status::pod_failures(&pods.items),
        invalid_spec: None,
        config_hash: Some(config_hash),
    };
    write_status(dsd, ctx, &observed).await?;
    Ok(Action::requeue(ctx.settings.resync))
}

/// The placement ConfigMap (`NAME-placement`, written by the rebalancer): its version when it
/// holds a table of the current shape; deleted, with the rebalancer that wrote it stopped, when
/// it holds one of another shape (shards, redundant slots or model changed) or there are no
/// shards any more, so that no pod starts on a table that does not fit.
async fn check_kept_placement(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<u64>> {
    let name = builders::Names::new(&dsd.name_any()).placement;
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(cm) = api.get_opt(&name).await.map_err(|source| Error::Kube {
        op: format!("get ConfigMap {name}"),
        source,
    })?
    else {
        return Ok(None);
    };
    if dsd.spec.experts.shards > 0
        && let Some(table) = rebalance::kept_table(dsd, &cm)
    {
        return Ok(Some(table.current.version()));
    }
    ctx.rebalancers
        .stop(&ObjectRef::from_obj(dsd), &ctx.metrics);
    tracing::info!(configmap = %name, "deleting a kept expert placement of another shape");
    delete_if_exists::<ConfigMap>(&ctx.client, namespace, &name).await?;
    Ok(None)
}

async fn delete_if_exists<K>(client: &Client, namespace: &str, name: &str) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(source) => Err(Error::Kube {
            op: format!("delete {} {name}", K::kind(&())),
            source,
        }),
    }
}

/// Writes the status computed from `observed` (server-side apply on `/status`, skipped when
/// nothing changed) and publishes an Event per condition transition.
async fn write_status(dsd: &DeepSeekDeployment, ctx: &Context, observed: &Observed) -> Result<()> {
    let namespace = dsd
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = dsd.name_any();
    let previous = dsd.status.as_ref();
    // Whole seconds: that is what `metav1.Time` keeps, so an unchanged status compares equal
    // to the one read back.
    let now = Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| Timestamp::now());
    let next = status::compute(dsd, observed, previous, now);
    if previous == Some(&next) {
        return Ok(());
    }
    let api: Api<DeepSeekDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = StatusPatch {
        api_version: DeepSeekDeployment::api_version(&()).to_string(),
        kind: DeepSeekDeployment::kind(&()).to_string(),
        status: &next,
    };
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Kube {
        op: format!("apply status of DeepSeekDeployment {name}"),
        source,
    })?;
    let reference = dsd.object_ref(&());
    for condition in status::transitions(previous, &next) {
        let warning = (condition.type_ == status::DEGRADED && condition.status == "True")
            || (condition.type_ == status::AVAILABLE
                && condition.status == "False"
                && previous.is_some());
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: condition.reason.clone(),
            note: Some(format!(
                "{}={}: {}",
                condition.type_, condition.status, condition.message
            )),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        // An Event that cannot be published must not fail the reconcile: the status is written.
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason = %condition.reason, "could not publish event");
        }
    }
    Ok(())
}

/// The body of a status apply: type meta plus the status.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusPatch<'a> {
    api_version: String,
    kind: String,
    status: &'a DeepSeekDeploymentStatus,
}
