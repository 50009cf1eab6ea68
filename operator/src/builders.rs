//! Pure functions from a `DeepSeekDeployment` to the objects it owns (DESIGN.md §6).
//!
//! Nothing here talks to the API server, so the golden tests can pin every field. Names are
//! deterministic (`NAME-attention`, `NAME-experts`, `NAME-router`, `NAME-config`), every object
//! carries the owner reference with `controller: true`, and every pod template carries the hash
//! of the part of the cluster config its role reads, so a spec change rolls exactly the pods it
//! affects (scaling attention rolls no expert shard and no router).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference, NodeAffinity,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    PreferredSchedulingTerm, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shardseek_proto::cluster_config::{self as cc, ClusterConfig};

use crate::crd::{
    ActivationDtype, DeepSeekDeployment, DispatchDtype, KvCacheDtype, KvOverflow,
    PodTemplateOverrides, Transport,
};
use crate::{Error, Result};

/// Where the model volume is mounted in every pod.
pub const MODEL_MOUNT_DIR: &str = "/models";
/// The pod volume holding the checkpoint (a user's volume, or the pull cache).
pub const MODEL_VOLUME: &str = "model";
/// The init container that pulls `spec.model.source`.
pub const MODEL_PULL_CONTAINER: &str = "model-pull";
/// The hub mirror URL the pull reads (the variable `huggingface_hub` reads too).
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// The hub token the pull sends as a bearer token.
pub const HF_TOKEN_ENV: &str = "HF_TOKEN";
/// Annotation on pod templates with the hash of the part of the cluster config that the pod's
/// role reads (`ClusterConfig::view_of`).
pub const CONFIG_HASH_ANNOTATION: &str = "shardseek.io/config-hash";
/// The label every owned object carries with the owning object's name.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// The label that names the role of a pod or service.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Who manages the owned objects.
pub const MANAGED_BY: &str = "shardseek-operator";
/// The StatefulSet controller's pod label holding the pod ordinal (Kubernetes ≥ 1.28).
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The port name of the `/metrics`, `/health`, `/ready` server in every pod.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Seconds an attention pod must be ready before a rollout moves on (see `stateful_set`): the
/// router's discovery interval plus the DNS cache time, with a margin.
pub const ATTENTION_MIN_READY_SECONDS: i32 = 12;
/// The router's environment variable holding the API key clients must present.
pub const API_KEY_ENV: &str = "SHARDSEEK_API_KEY";
/// Non-root user the image runs as (the chart and the restricted Pod Security Standard need a
/// numeric non-zero uid to verify runAsNonRoot).
pub const RUN_AS_USER: i64 = 65532;

/// Where attention pods and expert shards mount the ConfigMap `NAME-placement` (optional: it
/// exists once a rebalance has published a table). Not below the config mount, which is
/// read-only and could not hold the mount point.
pub const PLACEMENT_MOUNT_DIR: &str = "/etc/shardseek-placement";
/// The ConfigMap key (and so the file name) of the placement table in force, in the format of
/// `shardseek worker --placement-file`.
pub const PLACEMENT_KEY: &str = "placement.json";
/// The workers' environment variable naming the placement file (`--placement-file`).
pub const PLACEMENT_FILE_ENV: &str = "SHARDSEEK_PLACEMENT_FILE";
/// Annotation of the placement ConfigMap: the shape its table was computed for
/// ([`placement_shape`]). A table of another shape (shards, redundant slots or model changed)
/// is deleted before the workloads are applied, so no pod starts on it.
pub const PLACEMENT_SHAPE_ANNOTATION: &str = "shardseek.io/placement-shape";
/// The pod volume of the placement ConfigMap.
const PLACEMENT_VOLUME: &str = "placement";

/// Model loading reads hundreds of GB; allow 30 minutes (180 probes × 10 s) before the kubelet
/// gives up on a starting pod, while liveness after start stays strict.
const STARTUP_PROBE_FAILURES: i32 = 180;

/// The Prometheus Operator's ServiceMonitor, the subset of fields shardseek sets. Applied only
/// where the `monitoring.coreos.com/v1` API exists.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "monitoring.coreos.com",
    version = "v1",
    kind = "ServiceMonitor",
    namespaced,
    derive = "PartialEq",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorSpec {
    /// Which Services to scrape.
    pub selector: LabelSelector,
    /// Which ports of them, and how.
    pub endpoints: Vec<ServiceMonitorEndpoint>,
    /// Pod labels copied onto the scraped series (as `app_kubernetes_io_instance` etc.), so the
    /// dashboard can select one deployment and one role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_target_labels: Vec<String>,
}

/// One scrape endpoint of a ServiceMonitor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorEndpoint {
    /// The Service port's name.
    pub port: String,
    /// The HTTP path.
    pub path: String,
    /// Scrape interval, e.g. `15s`.
    pub interval: String,
}

/// Every object one `DeepSeekDeployment` owns, in apply order (config first, so that pods that
/// start find it).
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedObjects {
    /// The cluster config file.
    pub config_map: ConfigMap,
    /// Headless Service of the attention pods (the router resolves it).
    pub attention_service: Service,
    /// The attention pods.
    pub attention: StatefulSet,
    /// Headless Service of the expert shards (stable per-shard DNS); `None` with 0 shards.
    pub experts_service: Option<Service>,
    /// The expert shards; `None` with 0 shards.
    pub experts: Option<StatefulSet>,
    /// The router pods.
    pub router: Deployment,
    /// The router's Service (the API endpoint).
    pub router_service: Service,
    /// Disruption budgets, one per role that exists.
    pub pod_disruption_budgets: Vec<PodDisruptionBudget>,
    /// Scrape configuration for the Prometheus Operator.
    pub service_monitor: ServiceMonitor,
    /// The hash of the cluster config on every pod template.
    pub config_hash: String,
}

/// Names of the owned objects, derived only from the owner's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// `NAME-attention`: StatefulSet, headless Service and PDB.
    pub attention: String,
    /// `NAME-experts`: StatefulSet, headless Service and PDB.
    pub experts: String,
    /// `NAME-router`: Deployment, Service and PDB.
    pub router: String,
    /// `NAME-config`: ConfigMap.
    pub config: String,
    /// `NAME-placement`: ConfigMap of the expert placement in force (written by the
    /// rebalancer, not by the reconcile).
    pub placement: String,
    /// `NAME`: ServiceMonitor.
    pub monitor: String,
}

impl Names {
    /// The names for owner `name`.
    pub fn new(name: &str) -> Self {
        Self {
            attention: format!("{name}-attention"),
            experts: format!("{name}-experts"),
            router: format!("{name}-router"),
            config: format!("{name}-config"),
            placement: format!("{name}-placement"),
            monitor: name.to_string(),
        }
    }
}

/// The role of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Attention pods.
    Attention,
    /// Expert shards.
    Experts,
    /// Routers.
    Router,
}

impl Role {
    /// The spec field of the role (`attention`, `experts`, `router`).
    pub fn spec_field(self) -> &'static str {
        self.component()
    }

    /// The component label value.
    pub fn component(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::Experts => "experts",
            Self::Router => "router",
        }
    }
}

/// Labels selecting the pods of `role` of owner `name`.
pub fn selector_labels(name: &str, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "shardseek".to_string(),
        ),
        (INSTANCE_LABEL.to_string(), name.to_string()),
        (COMPONENT_LABEL.to_string(), role.component().to_string()),
    ])
}

/// The `key=value,...` form of [`selector_labels`], as the scale subresource reports it.
pub fn selector_string(name: &str, role: Role) -> String {
    selector_labels(name, role)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(name: &str, role: Option<Role>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "shardseek".to_string(),
        ),
        (INSTANCE_LABEL.to_string(), name.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ]);
    if let Some(role) = role {
        labels.insert(COMPONENT_LABEL.to_string(), role.component().to_string());
    }
    labels
}

struct Owner {
    name: String,
    namespace: String,
    reference: OwnerReference,
}

impl Owner {
    fn of(dsd: &DeepSeekDeployment) -> Result<Self> {
        let name = dsd
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingField("metadata.name"))?;
        let namespace = dsd
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let reference = dsd
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        Ok(Self {
            name,
            namespace,
            reference,
        })
    }

    fn meta(&self, name: &str, role: Option<Role>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name, role)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Renders the cluster config of `dsd` (what every pod reads from the ConfigMap).
pub fn cluster_config(dsd: &DeepSeekDeployment) -> Result<ClusterConfig> {
    let name = dsd
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let namespace = dsd
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let spec = &dsd.spec;
    let non_negative = |field: &'static str, value: i32| {
        u32::try_from(value)
            .map_err(|_| Error::InvalidSpec(format!("{field} is negative ({value})")))
    };
    let names = Names::new(&name);
    let shards = non_negative("experts.shards", spec.experts.shards)?;
    // The CRD's schema and CEL rules say the same; objects stored before them are refused here.
    if let Some(secs) = spec.experts.rebalance_interval_seconds {
        if secs < 10 {
            return Err(Error::InvalidSpec(format!(
                "experts.rebalanceIntervalSeconds is {secs}; it must be at least 10"
            )));
        }
        if shards == 0 {
            return Err(Error::InvalidSpec(
                "experts.rebalanceIntervalSeconds needs expert shards (experts.shards 1 or more)"
                    .to_string(),
            ));
        }
    }
    // Spelled as the CRD's CEL rule allows; objects stored before it are refused here.
    let device = |field: &str, text: &str| {
        text.parse::<cc::Device>()
            .map_err(|e| Error::InvalidSpec(format!("{field}: {e}")))
    };
    let attention_device = device("attention.device", &spec.attention.device)?;
    let experts_device = device("experts.device", &spec.experts.device)?;
    if shards == 0 && experts_device != attention_device {
        return Err(Error::InvalidSpec(format!(
            "experts.device ({experts_device}) must equal attention.device ({attention_device}) when experts.shards is 0: the experts then run inside the attention pods, on attention.device"
        )));
    }
    let (attention_act, experts_act) = (
        activation_dtype(spec.attention.activation_dtype),
        activation_dtype(spec.experts.activation_dtype),
    );
    if shards == 0 && experts_act != attention_act {
        return Err(Error::InvalidSpec(format!(
            "experts.activationDtype ({}) must equal attention.activationDtype ({}) when experts.shards is 0: the experts then run inside the attention pods, with attention.activationDtype",
            experts_act.as_str(),
            attention_act.as_str()
        )));
    }
    let config = ClusterConfig {
        name: name.clone(),
        namespace: Some(namespace.clone()),
        model: cc::ModelConfig {
            served_name: spec.model.served_name.clone(),
            path: spec.model.path.clone(),
        },
        attention: cc::AttentionConfig {
            replicas: non_negative("attention.replicas", spec.attention.replicas)?,
            service: format!("{}.{namespace}.svc", names.attention),
            addresses: Vec::new(),
            grpc_port: cc::DEFAULT_ATTENTION_GRPC_PORT,
            max_batch_tokens: non_negative(
                "attention.maxBatchTokens",
                spec.attention.max_batch_tokens,
            )?,
            max_seq_len: non_negative("attention.maxSeqLen", spec.attention.max_seq_len)?,
            kv_cache: cc::KvCacheConfig {
                dtype: match spec.attention.kv_cache.dtype {
                    KvCacheDtype::F32 => cc::KvCacheDtype::F32,
                    KvCacheDtype::Bf16 => cc::KvCacheDtype::Bf16,
                    KvCacheDtype::Fp8 => cc::KvCacheDtype::Fp8,
                },
                memory_bytes: spec
                    .attention
                    .kv_cache
                    .memory
                    .as_ref()
                    .map(|q| {
                        cc::parse_bytes(&q.0).map_err(|e| {
                            Error::InvalidSpec(format!("attention.kvCache.memory {e}"))
                        })
                    })
                    .transpose()?,
                on_overflow: match spec.attention.kv_cache.on_overflow {
                    KvOverflow::Refuse => cc::KvOverflow::Refuse,
                    KvOverflow::Cap => cc::KvOverflow::Cap,
                },
                gpu_memory_utilization: spec.attention.kv_cache.gpu_memory_utilization,
            },
            device: attention_device,
            activation_dtype: attention_act,
        },
        experts: cc::ExpertsConfig {
            shards,
            redundant_slots: non_negative("experts.redundantSlots", spec.experts.redundant_slots)?,
            addresses: cc::ExpertsConfig::kubernetes_addresses(
                &name,
                &namespace,
                shards,
                cc::DEFAULT_EXPERT_GRPC_PORT,
            ),
            grpc_port: cc::DEFAULT_EXPERT_GRPC_PORT,
            // The operator runs the rebalancer; no worker reads the interval, so it stays out
            // of the config (and of the pods' config hashes: changing it rolls no pod).
            rebalance_interval_seconds: None,
            failover_wait_ms: spec
                .experts
                .failover_wait_seconds
                .map(|s| match non_negative("experts.failoverWaitSeconds", s)? {
                    s if s > 300 => Err(Error::InvalidSpec(format!(
                        "experts.failoverWaitSeconds is {s}; it must be at most 300"
                    ))),
                    s => Ok(s * 1000),
                })
                .transpose()?,
            device: experts_device,
            activation_dtype: experts_act,
        },
        router: cc::RouterConfig {
            http_port: cc::DEFAULT_ROUTER_HTTP_PORT,
            grpc_port: cc::DEFAULT_ROUTER_GRPC_PORT,
        },
        dispatch_dtype: match spec.dispatch_dtype {
            DispatchDtype::F32 => cc::DispatchDtype::F32,
            DispatchDtype::Bf16 => cc::DispatchDtype::Bf16,
            DispatchDtype::Fp8 => cc::DispatchDtype::Fp8,
        },
        transport: match spec.transport {
            Transport::Grpc => cc::Transport::Grpc,
            Transport::Nccl => cc::Transport::Nccl,
        },
        metrics_port: cc::DEFAULT_METRICS_PORT,
    };
    config.validate().map_err(Error::ClusterConfig)?;
    Ok(config)
}

/// The shape a placement table is computed for: what must not change for a kept table to stay
/// valid (shards, redundant slots, the model). Kept on the placement ConfigMap.
pub fn placement_shape(dsd: &DeepSeekDeployment) -> String {
    let spec = &dsd.spec;
    format!(
        "shards={},redundantSlots={},model={}{}",
        spec.experts.shards,
        spec.experts.redundant_slots,
        spec.model.path,
        spec.model
            .source
            .as_ref()
            .map(|s| format!(",source={s}"))
            .unwrap_or_default()
    )
}

/// The ConfigMap `NAME-placement` holding `table` (the placement in force), owned by `dsd` and
/// annotated with the shape it was computed for. The rebalancer applies it once every shard has
/// prepared a new version; pods mount it (see [`PLACEMENT_MOUNT_DIR`]).
pub fn placement_config_map(dsd: &DeepSeekDeployment, table_json: &str) -> Result<ConfigMap> {
    let owner = Owner::of(dsd)?;
    let names = Names::new(&owner.name);
    let mut metadata = owner.meta(&names.placement, None);
    metadata.annotations = Some(BTreeMap::from([(
        PLACEMENT_SHAPE_ANNOTATION.to_string(),
        placement_shape(dsd),
    )]));
    Ok(ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(
            PLACEMENT_KEY.to_string(),
            table_json.to_string(),
        )])),
        ..ConfigMap::default()
    })
}

/// The first 16 hex digits of the SHA-256 of the config file's bytes: enough to tell configs
/// apart, short enough to read in `kubectl describe`.
pub fn config_hash(config_text: &str) -> String {
    let digest = Sha256::digest(config_text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Builds every object `dsd` owns.
pub fn build(dsd: &DeepSeekDeployment) -> Result<OwnedObjects> {
    let owner = Owner::of(dsd)?;
    let names = Names::new(&owner.name);
    let config = cluster_config(dsd)?;
    let config_text = config.to_json();
    let hash = config_hash(&config_text);
    // Each role's pods carry the hash of only what that role reads (DESIGN.md §6), so scaling
    // attention or changing the served name rolls no expert shard.
    let role_hash = |reader| config_hash(&config.view_of(reader).to_json());

    let config_map = ConfigMap {
        metadata: owner.meta(&names.config, None),
        data: Some(BTreeMap::from([(cc::FILE_NAME.to_string(), config_text)])),
        ..ConfigMap::default()
    };

    let attention_ports = vec![
        container_port("grpc", i32::from(cc::DEFAULT_ATTENTION_GRPC_PORT)),
        container_port(METRICS_PORT_NAME, i32::from(cc::DEFAULT_METRICS_PORT)),
    ];
    let attention_service = headless_service(
        &owner,
        &names.attention,
        Role::Attention,
        &attention_ports,
        false,
    );
    let attention = stateful_set(
        &owner,
        dsd,
        &names,
        Role::Attention,
        dsd.spec.attention.replicas,
        role_resources(
            dsd.spec.attention.resources.clone(),
            config.attention.device,
            Role::Attention,
        )?,
        attention_ports,
        &role_hash(cc::Reader::Attention),
    )?;

    let (experts_service, experts) = if dsd.spec.experts.shards > 0 {
        let ports = vec![
            container_port("grpc", i32::from(cc::DEFAULT_EXPERT_GRPC_PORT)),
            container_port(METRICS_PORT_NAME, i32::from(cc::DEFAULT_METRICS_PORT)),
        ];
        // Shards publish their DNS names before they are ready: attention pods hold one stream
        // per shard and retry it, and a shard's address must not depend on its readiness.
        let service = headless_service(&owner, &names.experts, Role::Experts, &ports, true);
        let sts = stateful_set(
            &owner,
            dsd,
            &names,
            Role::Experts,
            dsd.spec.experts.shards,
            role_resources(
                dsd.spec.experts.resources.clone(),
                config.experts.device,
                Role::Experts,
            )?,
            ports,
            &role_hash(cc::Reader::Expert),
        )?;
        (Some(service), Some(sts))
    } else {
        (None, None)
    };

    let router = router_deployment(&owner, dsd, &names, &role_hash(cc::Reader::Router))?;
    let router_service = router_service(&owner, dsd, &names);

    let mut pod_disruption_budgets = vec![pdb(&owner, &names.attention, Role::Attention)];
    if experts.is_some() {
        pod_disruption_budgets.push(pdb(&owner, &names.experts, Role::Experts));
    }
    pod_disruption_budgets.push(pdb(&owner, &names.router, Role::Router));

    let mut monitor_meta = owner.meta(&names.monitor, None);
    if let Some(labels) = monitor_meta.labels.as_mut() {
        for (k, v) in &dsd.spec.monitoring.service_monitor_labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let service_monitor = ServiceMonitor {
        metadata: monitor_meta,
        spec: ServiceMonitorSpec {
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/name".to_string(),
                        "shardseek".to_string(),
                    ),
                    (INSTANCE_LABEL.to_string(), owner.name.clone()),
                ])),
                ..LabelSelector::default()
            },
            endpoints: vec![ServiceMonitorEndpoint {
                port: METRICS_PORT_NAME.to_string(),
                path: "/metrics".to_string(),
                interval: "15s".to_string(),
            }],
            pod_target_labels: vec![INSTANCE_LABEL.to_string(), COMPONENT_LABEL.to_string()],
        },
    };

    Ok(OwnedObjects {
        config_map,
        attention_service,
        attention,
        experts_service,
        experts,
        router,
        router_service,
        pod_disruption_budgets,
        service_monitor,
        config_hash: hash,
    })
}

impl OwnedObjects {
    /// All objects as YAML documents in apply order (what the golden tests compare).
    pub fn to_yaml(&self) -> Result<String> {
        let mut docs: Vec<serde_json::Value> = Vec::new();
        let mut push = |value: serde_json::Result<serde_json::Value>| -> Result<()> {
            docs.push(value.map_err(Error::Json)?);
            Ok(())
        };
        push(serde_json::to_value(&self.config_map))?;
        push(serde_json::to_value(&self.attention_service))?;
        push(serde_json::to_value(&self.attention))?;
        if let Some(service) = &self.experts_service {
            push(serde_json::to_value(service))?;
        }
        if let Some(sts) = &self.experts {
            push(serde_json::to_value(sts))?;
        }
        push(serde_json::to_value(&self.router))?;
        push(serde_json::to_value(&self.router_service))?;
        for pdb in &self.pod_disruption_budgets {
            push(serde_json::to_value(pdb))?;
        }
        push(serde_json::to_value(&self.service_monitor))?;
        let mut out = String::new();
        for doc in docs {
            out.push_str("---\n");
            out.push_str(&serde_norway::to_string(&doc).map_err(Error::Yaml)?);
        }
        Ok(out)
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

fn headless_service(
    owner: &Owner,
    name: &str,
    role: Role,
    ports: &[ContainerPort],
    publish_not_ready: bool,
) -> Service {
    Service {
        metadata: owner.meta(name, Some(role)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            selector: Some(selector_labels(&owner.name, role)),
            publish_not_ready_addresses: Some(publish_not_ready),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.container_port,
                        target_port: p.name.clone().map(IntOrString::String),
                        protocol: Some("TCP".to_string()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(METRICS_PORT_NAME.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

/// The restricted container security context (STYLE.md rule 14): the processes need no
/// privileges, and write only to `/tmp` (an emptyDir).
fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

fn config_path() -> String {
    format!("{}/{}", cc::MOUNT_DIR, cc::FILE_NAME)
}

fn pod_volumes(dsd: &DeepSeekDeployment, names: &Names) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".to_string(),
            mount_path: cc::MOUNT_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".to_string(),
            mount_path: "/tmp".to_string(),
            ..VolumeMount::default()
        },
    ];
    let model = &dsd.spec.model;
    volumes.push(match (&model.volume, &model.cache_claim) {
        (Some(source), _) => Volume {
            name: MODEL_VOLUME.to_string(),
            persistent_volume_claim: source.persistent_volume_claim.clone(),
            host_path: source.host_path.clone(),
            nfs: source.nfs.clone(),
            csi: source.csi.clone(),
            image: source.image.clone(),
            ..Volume::default()
        },
        // A hub source: the init container pulls into this cache.
        (None, Some(claim)) => Volume {
            name: MODEL_VOLUME.to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Volume::default()
        },
        (None, None) => Volume {
            name: MODEL_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    });
    mounts.push(VolumeMount {
        name: MODEL_VOLUME.to_string(),
        mount_path: MODEL_MOUNT_DIR.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    (volumes, mounts)
}

/// The init container that pulls a hub source (`spec.model.source`) into the model volume
/// before the server starts; `None` for a volume source. It runs the same image
/// (`shardseek model pull`), mounts the model volume writable where the server mounts it
/// read-only, and gets `HF_ENDPOINT` / `HF_TOKEN` from the spec. Routers read only the
/// tokenizer and config, so they pull the `*.json` files alone.
fn model_pull_container(dsd: &DeepSeekDeployment, role: Role) -> Option<Container> {
    let spec = &dsd.spec;
    let source = spec.model.source.as_ref()?;
    let mut args: Vec<String> = ["model", "pull", source, "--out", &spec.model.path]
        .into_iter()
        .map(str::to_string)
        .collect();
    if role == Role::Router {
        args.extend(["--include".to_string(), "*.json".to_string()]);
    }
    let mut env = vec![value_env("SHARDSEEK_LOG_FORMAT", "json")];
    if let Some(endpoint) = &spec.model.endpoint {
        env.push(value_env(HF_ENDPOINT_ENV, endpoint));
    }
    if let Some(secret) = &spec.model.token_secret {
        env.push(EnvVar {
            name: HF_TOKEN_ENV.to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(secret.clone()),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    Some(Container {
        name: MODEL_PULL_CONTAINER.to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().to_string()),
        args: Some(args),
        env: Some(env),
        volume_mounts: Some(vec![
            VolumeMount {
                name: MODEL_VOLUME.to_string(),
                mount_path: MODEL_MOUNT_DIR.to_string(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_string(),
                mount_path: "/tmp".to_string(),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(restricted_security_context()),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Container::default()
    })
}

#[allow(clippy::too_many_arguments)] // one call site per role; a struct would only rename them
fn pod_template(
    owner: &Owner,
    dsd: &DeepSeekDeployment,
    names: &Names,
    role: Role,
    args: Vec<String>,
    mut env: Vec<EnvVar>,
    ports: Vec<ContainerPort>,
    resources: Option<ResourceRequirements>,
    config_hash: &str,
) -> Result<PodTemplateSpec> {
    let spec = &dsd.spec;
    // `spec.scheduling` places the workers (attention pods and expert shards), which may carry
    // accelerators; routers never do.
    let worker_role = role != Role::Router;
    let mut labels = labels(&owner.name, Some(role));
    labels.extend(selector_labels(&owner.name, role));
    env.splice(
        0..0,
        [
            field_env(cc::ENV_POD_NAME, "metadata.name"),
            field_env(cc::ENV_POD_IP, "status.podIP"),
            value_env(cc::ENV_CLUSTER_CONFIG, &config_path()),
            value_env("SHARDSEEK_LOG_FORMAT", "json"),
        ],
    );
    // The router mounts the model too: it reads tokenizer.json and tokenizer_config.json from
    // the checkpoint directory to apply the chat template and tokenize (DESIGN.md §2).
    let (mut volumes, mut volume_mounts) = pod_volumes(dsd, names);
    // Workers of a cluster with shards start on the placement in force: the rebalancer's table
    // when one was published (even if rebalancing was switched off since), else the initial
    // one. The ConfigMap is optional and not hashed: a new table rolls no pod (running pods
    // switch through the placement control plane; the file is for pods that start later).
    if role != Role::Router && spec.experts.shards > 0 {
        volumes.push(Volume {
            name: PLACEMENT_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.placement.clone(),
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        volume_mounts.push(VolumeMount {
            name: PLACEMENT_VOLUME.to_string(),
            mount_path: PLACEMENT_MOUNT_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        env.push(value_env(
            PLACEMENT_FILE_ENV,
            &format!("{PLACEMENT_MOUNT_DIR}/{PLACEMENT_KEY}"),
        ));
    }
    let container = Container {
        name: role.component().to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.image_pull_policy.as_str().to_string()),
        args: Some(args),
        env: Some(env),
        ports: Some(ports),
        resources,
        volume_mounts: Some(volume_mounts),
        startup_probe: Some(http_probe("/health", 10, STARTUP_PROBE_FAILURES)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        security_context: Some(restricted_security_context()),
        // A worker that exits with an error writes the reason to /dev/termination-log; when it
        // could not, the kubelet falls back to the log tail. The operator surfaces either in the
        // Degraded condition.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Container::default()
    };
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_string(),
                config_hash.to_string(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            init_containers: model_pull_container(dsd, role).map(|c| vec![c]),
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: (worker_role && !spec.scheduling.node_selector.is_empty())
                .then(|| spec.scheduling.node_selector.clone()),
            tolerations: (worker_role && !spec.scheduling.tolerations.is_empty())
                .then(|| spec.scheduling.tolerations.clone()),
            affinity: if worker_role {
                spec.scheduling.affinity.clone()
            } else {
                Some(prefer_nodes_without_gpu())
            },
            priority_class_name: spec.scheduling.priority_class_name.clone(),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                spec.image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            // The pods call no Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            // Let in-flight requests finish or fail cleanly before SIGKILL.
            termination_grace_period_seconds: Some(60),
            ..PodSpec::default()
        }),
    };
    let overrides = match role {
        Role::Attention => &spec.attention.pod_template,
        Role::Experts => &spec.experts.pod_template,
        Role::Router => &spec.router.pod_template,
    };
    apply_overrides(&mut template, overrides, role)?;
    Ok(template)
}

/// The label NVIDIA's GPU feature discovery puts on nodes with a GPU.
pub const GPU_NODE_LABEL: &str = "nvidia.com/gpu.present";

/// Routers by default prefer nodes without a GPU (preferred, so a cluster of GPU nodes only
/// still schedules them). Workers on the CPU do not: that would change, and so roll, the pods
/// of every existing CPU deployment; a hybrid deployment places its CPU shards with
/// `experts.podTemplate.nodeSelector` (see `crds/examples/full.yaml`).
fn prefer_nodes_without_gpu() -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                PreferredSchedulingTerm {
                    weight: 100,
                    preference: NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: GPU_NODE_LABEL.to_string(),
                            operator: "NotIn".to_string(),
                            values: Some(vec!["true".to_string()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    },
                },
            ]),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The extended resource of one NVIDIA GPU, offered by NVIDIA's device plugin.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A worker role's resources with the GPUs its device needs (see the CRD's `experts.device`):
/// none for `cpu`, where asking for one is refused (it would be held and never used); for
/// `cuda:N` the count the user set in limits or requests, or else `N + 1` (the device plugin
/// numbers a pod's GPUs from 0), written to both limits and requests because Kubernetes
/// requires an extended resource's request to equal its limit.
fn role_resources(
    resources: Option<ResourceRequirements>,
    device: cc::Device,
    role: Role,
) -> Result<Option<ResourceRequirements>> {
    let field = role.spec_field();
    let key = GPU_RESOURCE.to_string();
    let user = |map: &Option<BTreeMap<String, Quantity>>| {
        map.as_ref().and_then(|m| m.get(&key)).map(|q| q.0.clone())
    };
    let (limit, request) = resources
        .as_ref()
        .map(|r| (user(&r.limits), user(&r.requests)))
        .unwrap_or_default();
    let cc::Device::Cuda(ordinal) = device else {
        if limit.is_some() || request.is_some() {
            return Err(Error::InvalidSpec(format!(
                "{field}.resources asks for {GPU_RESOURCE} but {field}.device is cpu: set {field}.device to cuda, or drop the GPU"
            )));
        }
        return Ok(resources);
    };
    let needed = u64::from(ordinal) + 1;
    let count = match (&limit, &request) {
        (Some(l), Some(r)) if l != r => {
            return Err(Error::InvalidSpec(format!(
                "{field}.resources: the {GPU_RESOURCE} request ({r}) must equal its limit ({l}), as Kubernetes requires for extended resources"
            )));
        }
        (Some(n), _) | (None, Some(n)) => {
            let count: u64 = n.trim().parse().map_err(|_| {
                Error::InvalidSpec(format!(
                    "{field}.resources: {GPU_RESOURCE} `{n}` is not a whole number of GPUs"
                ))
            })?;
            if count < needed {
                return Err(Error::InvalidSpec(format!(
                    "{field}.device is {device} but {field}.resources gives the pod {count} {GPU_RESOURCE}: the device plugin numbers a pod's GPUs from cuda:0, so {device} needs at least {needed}"
                )));
            }
            n.clone()
        }
        (None, None) => needed.to_string(),
    };
    let mut resources = resources.unwrap_or_default();
    for map in [&mut resources.limits, &mut resources.requests] {
        map.get_or_insert_with(BTreeMap::new)
            .insert(key.clone(), Quantity(count.clone()));
    }
    Ok(Some(resources))
}

/// RFC 7386 JSON merge patch: `patch`'s fields replace `target`'s, objects merge recursively,
/// `null` removes.
fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn merged<T: Serialize + serde::de::DeserializeOwned + Default>(
    base: Option<&T>,
    patch: &T,
    what: &str,
) -> Result<T> {
    let mut value = serde_json::to_value(base.unwrap_or(&T::default())).map_err(Error::Json)?;
    json_merge(
        &mut value,
        &serde_json::to_value(patch).map_err(Error::Json)?,
    );
    serde_json::from_value(value).map_err(|e| Error::InvalidSpec(format!("{what}: {e}")))
}

/// Replaces the items of `base` that have the key of an item of `extra`, appends the others.
fn merge_by<T: Clone, K: PartialEq>(base: &mut Vec<T>, extra: &[T], key: impl Fn(&T) -> K) {
    for item in extra {
        match base.iter_mut().find(|b| key(b) == key(item)) {
            Some(slot) => *slot = item.clone(),
            None => base.push(item.clone()),
        }
    }
}

/// Merges a role's `podTemplate` over the pod the operator built (see [`PodTemplateOverrides`]).
fn apply_overrides(
    template: &mut PodTemplateSpec,
    o: &PodTemplateOverrides,
    role: Role,
) -> Result<()> {
    let field = |name: &str| format!("{}.podTemplate.{name}", role.spec_field());
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in &o.labels {
        labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    for (k, v) in &o.annotations {
        annotations.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let pod = template.spec.get_or_insert_with(PodSpec::default);
    let container = pod
        .containers
        .first_mut()
        .ok_or(Error::MissingField("spec.template.spec.containers"))?;
    merge_by(
        container.env.get_or_insert_with(Vec::new),
        &o.env,
        |e: &EnvVar| e.name.clone(),
    );
    merge_by(
        pod.volumes.get_or_insert_with(Vec::new),
        &o.volumes,
        |v: &Volume| v.name.clone(),
    );
    merge_by(
        container.volume_mounts.get_or_insert_with(Vec::new),
        &o.volume_mounts,
        |m: &VolumeMount| m.mount_path.clone(),
    );
    if let Some(size) = &o.shared_memory {
        merge_by(
            pod.volumes.get_or_insert_with(Vec::new),
            &[Volume {
                name: "dshm".to_string(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".to_string()),
                    size_limit: Some(size.clone()),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            }],
            |v: &Volume| v.name.clone(),
        );
        merge_by(
            container.volume_mounts.get_or_insert_with(Vec::new),
            &[VolumeMount {
                name: "dshm".to_string(),
                mount_path: "/dev/shm".to_string(),
                ..VolumeMount::default()
            }],
            |m: &VolumeMount| m.mount_path.clone(),
        );
    }
    if !o.node_selector.is_empty() {
        pod.node_selector
            .get_or_insert_with(BTreeMap::new)
            .extend(o.node_selector.clone());
    }
    if !o.tolerations.is_empty() {
        pod.tolerations
            .get_or_insert_with(Vec::new)
            .extend(o.tolerations.iter().cloned());
    }
    if let Some(affinity) = &o.affinity {
        pod.affinity = Some(affinity.clone());
    }
    if !o.topology_spread_constraints.is_empty() {
        pod.topology_spread_constraints = Some(o.topology_spread_constraints.clone());
    }
    if let Some(p) = &o.priority_class_name {
        pod.priority_class_name = Some(p.clone());
    }
    if let Some(r) = &o.runtime_class_name {
        pod.runtime_class_name = Some(r.clone());
    }
    if let Some(sc) = &o.security_context {
        container.security_context = Some(merged(
            container.security_context.as_ref(),
            sc,
            &field("securityContext"),
        )?);
    }
    if o.ipc_lock {
        let caps = container
            .security_context
            .get_or_insert_with(SecurityContext::default)
            .capabilities
            .get_or_insert_with(Capabilities::default);
        let add = caps.add.get_or_insert_with(Vec::new);
        if !add.iter().any(|c| c == "IPC_LOCK") {
            add.push("IPC_LOCK".to_string());
        }
    }
    if let Some(psc) = &o.pod_security_context {
        pod.security_context = Some(merged(
            pod.security_context.as_ref(),
            psc,
            &field("podSecurityContext"),
        )?);
    }
    Ok(())
}

fn role_args(role: Role) -> Vec<String> {
    let mut args = match role {
        Role::Attention => vec!["worker", "--role", "attention"],
        Role::Experts => vec!["worker", "--role", "expert"],
        Role::Router => vec!["router"],
    };
    args.push("--cluster-config");
    let mut args: Vec<String> = args.into_iter().map(str::to_string).collect();
    args.push(config_path());
    args
}

#[allow(clippy::too_many_arguments)] // mirrors pod_template's inputs plus the replica count
fn stateful_set(
    owner: &Owner,
    dsd: &DeepSeekDeployment,
    names: &Names,
    role: Role,
    replicas: i32,
    resources: Option<ResourceRequirements>,
    ports: Vec<ContainerPort>,
    config_hash: &str,
) -> Result<StatefulSet> {
    let name = match role {
        Role::Experts => &names.experts,
        _ => &names.attention,
    };
    let env = match role {
        // The shard id is the pod ordinal, which the StatefulSet controller puts in a label.
        Role::Experts => vec![field_env(
            cc::ENV_SHARD_ID,
            &format!("metadata.labels['{POD_INDEX_LABEL}']"),
        )],
        _ => Vec::new(),
    };
    Ok(StatefulSet {
        metadata: owner.meta(name, Some(role)),
        spec: StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(name.clone()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&owner.name, role)),
                ..LabelSelector::default()
            },
            // Pods are independent peers; starting them one by one would multiply the model
            // load time by the replica count.
            pod_management_policy: Some("Parallel".to_string()),
            // A rolling update replaces the next attention pod only once routers can have seen
            // the new one: they re-resolve the Service every DISCOVERY_INTERVAL (5 s) through
            // DNS that caches answers up to 5 s. Without this, the last old pod could go before
            // any router knew a new one, and requests would find no pod.
            min_ready_seconds: (role == Role::Attention).then_some(ATTENTION_MIN_READY_SECONDS),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".to_string()),
                    when_scaled: Some("Delete".to_string()),
                },
            ),
            template: pod_template(
                owner,
                dsd,
                names,
                role,
                role_args(role),
                env,
                ports,
                resources,
                config_hash,
            )?,
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    })
}

fn router_deployment(
    owner: &Owner,
    dsd: &DeepSeekDeployment,
    names: &Names,
    config_hash: &str,
) -> Result<Deployment> {
    let ports = vec![
        container_port("http", i32::from(cc::DEFAULT_ROUTER_HTTP_PORT)),
        container_port("grpc", i32::from(cc::DEFAULT_ROUTER_GRPC_PORT)),
        container_port(METRICS_PORT_NAME, i32::from(cc::DEFAULT_METRICS_PORT)),
    ];
    Ok(Deployment {
        metadata: owner.meta(&names.router, Some(Role::Router)),
        spec: DeploymentSpec {
            replicas: Some(dsd.spec.router.replicas),
            // A new router is ready before an old one goes: a rollout never lowers capacity.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&owner.name, Role::Router)),
                ..LabelSelector::default()
            },
            template: pod_template(
                owner,
                dsd,
                names,
                Role::Router,
                role_args(Role::Router),
                dsd.spec
                    .router
                    .api_key_secret
                    .iter()
                    .map(|secret| EnvVar {
                        name: API_KEY_ENV.to_string(),
                        value_from: Some(EnvVarSource {
                            secret_key_ref: Some(secret.clone()),
                            ..EnvVarSource::default()
                        }),
                        ..EnvVar::default()
                    })
                    .collect(),
                ports,
                dsd.spec.router.resources.clone(),
                config_hash,
            )?,
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    })
}

fn router_service(owner: &Owner, dsd: &DeepSeekDeployment, names: &Names) -> Service {
    let service = &dsd.spec.router.service;
    let mut metadata = owner.meta(&names.router, Some(Role::Router));
    if !service.annotations.is_empty() {
        metadata.annotations = Some(service.annotations.clone());
    }
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(service.type_.as_str().to_string()),
            selector: Some(selector_labels(&owner.name, Role::Router)),
            ports: Some(vec![
                port("http", service.port),
                port("grpc", i32::from(cc::DEFAULT_ROUTER_GRPC_PORT)),
                port(METRICS_PORT_NAME, i32::from(cc::DEFAULT_METRICS_PORT)),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// One pod of a role may be evicted at a time: a drained node never takes down two expert
/// shards (whose experts may have no replica) or all attention pods at once.
fn pdb(owner: &Owner, name: &str, role: Role) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owner.meta(name, Some(role)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&owner.name, role)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The in-cluster URL of the router's HTTP API.
pub fn endpoint(dsd: &DeepSeekDeployment) -> Option<String> {
    let name = dsd.metadata.name.as_deref()?;
    let namespace = dsd.metadata.namespace.as_deref()?;
    Some(format!(
        "http://{}.{namespace}.svc:{}",
        Names::new(name).router,
        dsd.spec.router.service.port
    ))
}

/// The name of `dsd`'s owned object of kind `kind`, for log lines and error context.
pub fn describe<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!("{} {}", K::kind(&()), object.name_any())
}

fn activation_dtype(a: ActivationDtype) -> cc::ActivationDtype {
    match a {
        ActivationDtype::F32 => cc::ActivationDtype::F32,
        ActivationDtype::Bf16 => cc::ActivationDtype::Bf16,
    }
}
