//! The real kube-runtime `Controller` (via `run_controller`) against the in-process fake API
//! server: every test starts its own server on 127.0.0.1:0 and stops the controller at the end.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shardseek_operator::crd::{DeepSeekDeployment, Phase};
use shardseek_operator::metrics::Metrics;
use shardseek_operator::{Context, ControllerSettings, run_controller};
use tokio::sync::watch;

use super::fake_api::FakeApi;

const NS: &str = "llm";
const STS: &str = "apps/v1/statefulsets";
const DEPLOY: &str = "apps/v1/deployments";
const CM: &str = "/v1/configmaps";
const SVC: &str = "/v1/services";
const PDB: &str = "policy/v1/poddisruptionbudgets";
const DSD: &str = "shardseek.io/v1alpha1/deepseekdeployments";
const EVENTS: &str = "events.k8s.io/v1/events";
const SM: &str = "monitoring.coreos.com/v1/servicemonitors";

/// Upper bound of every wait: the fake answers in microseconds, so anything this slow is a bug.
const WAIT: Duration = Duration::from_secs(20);

struct Harness {
    fake: FakeApi,
    ctx: Arc<Context>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(backoff_base: Duration) -> Self {
        let fake = FakeApi::start().await;
        Self::start_with(fake, backoff_base)
    }

    fn start_with(fake: FakeApi, backoff_base: Duration) -> Self {
        let settings = ControllerSettings {
            backoff_base,
            backoff_max: Duration::from_secs(10),
            // No periodic resync during a test: every reconcile has a cause the test controls.
            resync: Duration::from_secs(3600),
            reporter_instance: Some("test".into()),
        };
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let ctx = Context::new(fake.client(), metrics, settings);
        let (stop, mut stop_rx) = watch::channel(false);
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        let task = tokio::spawn(run_controller(ctx.clone(), Some(NS.into()), shutdown));
        Self {
            fake,
            ctx,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("controller stops")
            .expect("controller task");
    }

    fn api(&self) -> Api<DeepSeekDeployment> {
        Api::namespaced(self.fake.client(), NS)
    }

    fn dsd(&self) -> Option<Value> {
        self.fake.get(DSD, NS, "v3")
    }

    fn condition(&self, type_: &str) -> Option<Value> {
        let dsd = self.dsd()?;
        dsd.pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    /// Waits until `check` holds, failing the test with `what` after [`WAIT`].
    async fn until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no request changed anything for `quiet` (the controller has settled).
    async fn settle(&self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let last_change = self
                .fake
                .log()
                .iter()
                .filter(|l| l.changed)
                .map(|l| l.at)
                .max();
            let reconciling = self.ctx.metrics.reconciliations.get();
            tokio::time::sleep(quiet).await;
            let still = self
                .fake
                .log()
                .iter()
                .filter(|l| l.changed)
                .map(|l| l.at)
                .max()
                == last_change
                && self.ctx.metrics.reconciliations.get() == reconciling;
            if still {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "controller never settled"
            );
        }
    }
}

fn example() -> DeepSeekDeployment {
    serde_json::from_value(json!({
        "apiVersion": "shardseek.io/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": {"name": "v3", "namespace": NS},
        "spec": {
            "image": "ghcr.io/example/shardseek:0.1.0",
            "model": {"servedName": "deepseek-v3", "path": "/models/v3",
                      "volume": {"persistentVolumeClaim": {"claimName": "weights", "readOnly": true}}},
            "attention": {"replicas": 2},
            "experts": {"shards": 4, "redundantSlots": 8},
        }
    }))
    .expect("example object")
}

/// The workload controllers' view: every pod of the StatefulSets and Deployment ready and on the
/// latest template.
fn mark_ready(fake: &FakeApi) {
    for (collection, name) in [
        (STS, "v3-attention"),
        (STS, "v3-experts"),
        (DEPLOY, "v3-router"),
    ] {
        let object = fake.get(collection, NS, name).expect("workload exists");
        let replicas = object
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = object
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        fake.set_status(
            collection,
            NS,
            name,
            json!({"observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
                   "updatedReplicas": replicas, "availableReplicas": replicas,
                   "currentRevision": "r1", "updateRevision": "r1"}),
        );
    }
}

#[tokio::test]
async fn create_reconcile_ready_update_delete() {
    let fake = FakeApi::start().await;
    fake.enable_monitoring();
    let h = Harness::start_with(fake, Duration::from_millis(100));
    h.api()
        .create(&PostParams::default(), &example())
        .await
        .expect("create");

    // Create → every owned object exists, with the owner reference, and status says Progressing.
    h.until("status Progressing", |h| {
        h.condition("Progressing")
            .is_some_and(|c| c["status"] == "True")
    })
    .await;
    h.settle(Duration::from_millis(300)).await;
    let dsd = h.dsd().expect("dsd");
    let uid = dsd.pointer("/metadata/uid").cloned().expect("uid");
    assert_eq!(
        dsd.pointer("/metadata/finalizers"),
        None,
        "no finalizer: deletion needs no work from the operator"
    );
    for (collection, names) in [
        (STS, vec!["v3-attention", "v3-experts"]),
        (DEPLOY, vec!["v3-router"]),
        (SVC, vec!["v3-attention", "v3-experts", "v3-router"]),
        (CM, vec!["v3-config"]),
        (PDB, vec!["v3-attention", "v3-experts", "v3-router"]),
        (SM, vec!["v3"]),
    ] {
        for name in names {
            let object = h
                .fake
                .get(collection, NS, name)
                .unwrap_or_else(|| panic!("{collection} {name} missing"));
            let owner = &object["metadata"]["ownerReferences"][0];
            assert_eq!(owner["uid"], uid, "{collection} {name} owner");
            assert_eq!(owner["controller"], true);
            assert_eq!(owner["kind"], "DeepSeekDeployment");
        }
    }
    assert_eq!(
        h.condition("Available").expect("Available")["status"],
        "False"
    );
    assert_eq!(
        h.condition("Degraded").expect("Degraded")["status"],
        "False"
    );
    assert_eq!(dsd["status"]["phase"], "Progressing");
    assert_eq!(dsd["status"]["observedGeneration"], 1);
    assert_eq!(
        dsd["status"]["attentionSelector"],
        "app.kubernetes.io/component=attention,app.kubernetes.io/instance=v3,app.kubernetes.io/name=shardseek"
    );
    assert_eq!(dsd["status"]["endpoint"], "http://v3-router.llm.svc:80");
    let config = h.fake.get(CM, NS, "v3-config").expect("config map");
    let cluster: Value = serde_json::from_str(
        config["data"]["cluster.json"]
            .as_str()
            .expect("cluster.json"),
    )
    .expect("json");
    assert_eq!(
        cluster["experts"]["addresses"][3],
        "v3-experts-3.v3-experts.llm.svc:50053"
    );
    let events_after_create = h.fake.names(EVENTS).len();
    assert!(
        events_after_create >= 3,
        "one Event per initial condition, got {events_after_create}"
    );

    // A second reconcile changes nothing: poke the object (an annotation, not the spec), wait
    // for the reconcile it causes, and check that no write changed anything else.
    // Wait past a second boundary first: timestamps are written with second precision, so a
    // reconcile that rewrote a condition's lastTransitionTime would now change the object.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let versions = h.fake.versions();
    let reconciles = h.ctx.metrics.reconciliations.get();
    let log_len = h.fake.log().len();
    h.api()
        .patch(
            "v3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
        )
        .await
        .expect("poke");
    h.until("a reconcile after the poke", |h| {
        h.ctx.metrics.reconciliations.get() > reconciles
    })
    .await;
    h.settle(Duration::from_millis(300)).await;
    let after = h.fake.versions();
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| versions.get(*k) != Some(*v))
        .map(|(k, _)| format!("{}/{}", k.collection, k.name))
        .collect();
    assert_eq!(
        changed,
        vec![format!("{DSD}/v3")],
        "only the poke itself changed something"
    );
    let writes: Vec<_> = h.fake.log()[log_len..]
        .iter()
        .filter(|l| l.changed)
        .map(|l| format!("{} {}", l.method, l.path))
        .collect();
    assert_eq!(writes.len(), 1, "writes after the poke: {writes:?}");
    let applies = h.fake.log()[log_len..]
        .iter()
        .filter(|l| l.method == Method::PATCH && l.path.contains("statefulsets"))
        .count();
    assert!(
        applies >= 2,
        "the second reconcile re-applied the StatefulSets ({applies})"
    );

    // StatefulSets and the Deployment ready → Available.
    mark_ready(&h.fake);
    h.until("Available", |h| {
        h.condition("Available")
            .is_some_and(|c| c["status"] == "True")
    })
    .await;
    h.settle(Duration::from_millis(200)).await;
    let dsd = h.dsd().expect("dsd");
    assert_eq!(dsd["status"]["phase"], "Available");
    assert_eq!(dsd["status"]["attentionSummary"], "2/2");
    assert_eq!(dsd["status"]["expertsSummary"], "4/4");
    assert_eq!(
        h.condition("Progressing").expect("Progressing")["reason"],
        "RolloutComplete"
    );

    // Spec change → owned objects updated, pods roll (new config hash), observedGeneration 2.
    let template_hash = |h: &Harness, kind, name| {
        h.fake.get(kind, NS, name).expect("workload")["spec"]["template"]["metadata"]["annotations"]
            ["shardseek.io/config-hash"]
            .clone()
    };
    let old_hash = template_hash(&h, STS, "v3-attention");
    let old_experts_hash = template_hash(&h, STS, "v3-experts");
    let old_router_hash = template_hash(&h, DEPLOY, "v3-router");
    h.api()
        .patch(
            "v3",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"attention": {"replicas": 3}, "dispatchDtype": "fp8"}})),
        )
        .await
        .expect("spec change");
    h.until("observedGeneration 2", |h| {
        h.dsd()
            .is_some_and(|d| d["status"]["observedGeneration"] == 2)
    })
    .await;
    h.settle(Duration::from_millis(200)).await;
    let sts = h.fake.get(STS, NS, "v3-attention").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["metadata"]["generation"], 2);
    let new_hash = &sts["spec"]["template"]["metadata"]["annotations"]["shardseek.io/config-hash"];
    assert_ne!(*new_hash, old_hash, "a config change rolls the pods");
    // Attention pods read the dispatch dtype; expert shards and routers do not, and nobody reads
    // the attention replica count: only the attention pods roll.
    assert_eq!(
        template_hash(&h, STS, "v3-experts"),
        old_experts_hash,
        "the shards do not roll"
    );
    assert_eq!(
        template_hash(&h, DEPLOY, "v3-router"),
        old_router_hash,
        "the routers do not roll"
    );
    let config = h.fake.get(CM, NS, "v3-config").expect("config map");
    assert!(
        config["data"]["cluster.json"]
            .as_str()
            .expect("text")
            .contains("\"dispatchDtype\": \"fp8\"")
    );
    for condition in ["Available", "Progressing", "Degraded"] {
        assert_eq!(
            h.condition(condition).expect("condition")["observedGeneration"],
            2,
            "{condition}"
        );
    }
    assert_eq!(
        h.condition("Progressing").expect("Progressing")["status"],
        "True"
    );
    assert_eq!(
        h.condition("Available").expect("Available")["status"],
        "False",
        "attention 2/3"
    );

    // Delete → the object goes at once (nothing holds it), and a reconcile of the deleted object
    // writes nothing.
    h.api()
        .delete("v3", &DeleteParams::default())
        .await
        .expect("delete");
    h.until("object gone", |h| h.dsd().is_none()).await;
    h.stop().await;
}

#[tokio::test]
async fn failed_apply_is_retried_with_backoff() {
    let base = Duration::from_millis(300);
    let h = Harness::start(base).await;
    // The first two applies of the ConfigMap (the first object of an Apply) fail.
    h.fake.fail(Method::PATCH, "/configmaps/v3-config", 2, 500);
    h.api()
        .create(&PostParams::default(), &example())
        .await
        .expect("create");
    h.until("status written", |h| h.condition("Progressing").is_some())
        .await;
    let attempts: Vec<_> = h
        .fake
        .log()
        .into_iter()
        .filter(|l| l.method == Method::PATCH && l.path.ends_with("/configmaps/v3-config"))
        .collect();
    assert!(
        attempts.len() >= 3,
        "two failures then a success: {attempts:?}"
    );
    assert_eq!(
        (attempts[0].code, attempts[1].code, attempts[2].code),
        (500, 500, 200)
    );
    let first_gap = attempts[1].at - attempts[0].at;
    let second_gap = attempts[2].at - attempts[1].at;
    assert!(
        first_gap >= base,
        "first retry after {first_gap:?}, backoff {base:?}"
    );
    assert!(
        second_gap >= base * 2,
        "second retry after {second_gap:?}, backoff doubles to {:?}",
        base * 2
    );
    assert!(second_gap < Duration::from_secs(10));
    assert_eq!(h.ctx.metrics.errors.with_label_values(&["kube"]).get(), 2);
    assert!(
        h.fake.get(STS, NS, "v3-experts").is_some(),
        "the retry applied everything"
    );
    // Each failure is a Warning Event saying what the API server refused.
    let failed: Vec<Value> = h
        .fake
        .objects(EVENTS)
        .into_iter()
        .filter(|e| e["reason"] == "ReconcileFailed")
        .collect();
    assert!(!failed.is_empty(), "a ReconcileFailed event");
    assert_eq!(failed[0]["type"], "Warning");
    let note = failed[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("apply ConfigMap v3-config"), "{note}");
    // Success reset the backoff: the next failure waits the base delay again.
    assert_eq!(h.ctx.backoff(1), base);
    h.stop().await;
}

#[tokio::test]
async fn worker_failure_surfaces_in_degraded() {
    let h = Harness::start(Duration::from_millis(100)).await;
    h.api()
        .create(&PostParams::default(), &example())
        .await
        .expect("create");
    h.until("status written", |h| h.condition("Degraded").is_some())
        .await;
    // A crashed expert pod, as the kubelet reports it, then a StatefulSet status change that
    // wakes the controller.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(h.fake.client(), NS);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "v3-experts-2", "labels": {"app.kubernetes.io/name": "shardseek", "app.kubernetes.io/instance": "v3", "app.kubernetes.io/component": "experts"}},
        "spec": {"containers": [{"name": "experts", "image": "x"}]},
    });
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).expect("pod"),
    )
    .await
    .expect("pod");
    h.fake.set_status("/v1/pods", NS, "v3-experts-2", json!({"containerStatuses": [{
        "name": "experts", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "message": "expert shard 2: tensor model.layers.3.mlp.experts.17.down_proj.weight missing"}}
    }]}));
    mark_ready(&h.fake);
    h.until("Degraded", |h| {
        h.condition("Degraded")
            .is_some_and(|c| c["status"] == "True")
    })
    .await;
    let degraded = h.condition("Degraded").expect("Degraded");
    assert_eq!(degraded["reason"], "WorkerFailed");
    assert_eq!(
        degraded["message"],
        "v3-experts-2: expert shard 2: tensor model.layers.3.mlp.experts.17.down_proj.weight missing"
    );
    let dsd: DeepSeekDeployment = serde_json::from_value(h.dsd().expect("dsd")).expect("typed");
    assert_eq!(dsd.status.expect("status").phase, Phase::Degraded);
    let warnings = h.fake.names(EVENTS);
    assert!(!warnings.is_empty());
    h.stop().await;
}

/// An object an earlier operator gave the `shardseek.io/cleanup` finalizer loses it (another
/// controller's finalizer stays), so deleting it no longer needs a running operator.
#[tokio::test]
async fn legacy_finalizer_is_removed() {
    let h = Harness::start(Duration::from_millis(100)).await;
    let mut dsd = example();
    dsd.metadata.finalizers = Some(vec![
        "example.com/keep".to_string(),
        "shardseek.io/cleanup".to_string(),
    ]);
    h.api()
        .create(&PostParams::default(), &dsd)
        .await
        .expect("create");
    h.until("the legacy finalizer is removed", |h| {
        h.dsd()
            .is_some_and(|d| d["metadata"]["finalizers"] == json!(["example.com/keep"]))
    })
    .await;
    h.stop().await;
}

/// The placement ConfigMap a rebalancer keeps (`NAME-placement`): while it holds a table of the
/// current shape its version is `status.placementVersion`; a new shape (more shards) deletes it
/// before the workloads roll, so no pod starts on a table that does not fit, and the status goes
/// back to the initial table's version 1. Without ready pods no rebalancer starts. The fake API
/// refuses a patch whose `resourceVersion` is stale, as a real one does.
#[tokio::test]
async fn kept_placement_is_the_status_version_until_the_shape_changes() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::ObjectRef;
    use shardseek_operator::builders;
    use shardseek_router::Placement;

    let h = Harness::start(Duration::from_millis(100)).await;
    let mut dsd = example();
    dsd.spec.experts.rebalance_interval_seconds = Some(30);
    h.api()
        .create(&PostParams::default(), &dsd)
        .await
        .expect("create");
    let version = |h: &Harness| {
        h.dsd().and_then(|d| {
            d.pointer("/status/placementVersion")
                .and_then(Value::as_i64)
        })
    };
    h.until("placement version 1", |h| version(h) == Some(1))
        .await;
    let object = ObjectRef::<DeepSeekDeployment>::new("v3").within(NS);
    assert!(
        !h.ctx.rebalancers.is_running(&object),
        "no pod is ready: no rebalancer"
    );

    // A table kept by a rebalancer (of an earlier leader): version 5.
    let stored = h.api().get("v3").await.expect("get");
    let initial = Placement::initial(256, 4, 2).expect("table");
    let replicas = (0..256)
        .map(|e| initial.replicas(e).expect("expert").to_vec())
        .collect();
    let table = Placement::from_assignments(5, 4, replicas).expect("table");
    let cm = builders::placement_config_map(&stored, &table.to_json()).expect("config map");
    let cms: Api<ConfigMap> = Api::namespaced(h.fake.client(), NS);
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create the placement ConfigMap");
    h.until("placement version 5", |h| version(h) == Some(5))
        .await;

    // Twice the shards: the kept table no longer fits and goes; the status says version 1.
    h.api()
        .patch(
            "v3",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"experts": {"shards": 8}}})),
        )
        .await
        .expect("reshard");
    h.until("the kept table deleted and version 1", |h| {
        h.fake.get(CM, NS, "v3-placement").is_none() && version(h) == Some(1)
    })
    .await;

    let stale = h
        .api()
        .patch(
            "v3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "spec": {"attention": {"replicas": 3}}})),
        )
        .await
        .expect_err("a stale resourceVersion");
    assert!(
        matches!(&stale, kube::Error::Api(s) if s.code == 409),
        "{stale:?}"
    );
    h.stop().await;
}
