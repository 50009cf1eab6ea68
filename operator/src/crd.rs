//! The `DeepSeekDeployment` custom resource: the Rust types are the source of truth for the CRD
//! (STYLE.md rule 2). `shardseek crd` prints [`crd_yaml`]; `crds/` and the chart's copy are that
//! output, and a test fails when they drift.
//!
//! Validation lives in the schema where the API server can enforce it: `minimum` bounds for
//! counts, enums for closed sets, and `x-kubernetes-validations` CEL rules for relations between
//! fields (expert slots divisible by shards, exactly one model volume source or hub source, no NCCL until it is
//! wired, a name short enough for the owned objects' names, devices spelt as the workers spell
//! them and GPU resources only for roles on a GPU). The tests evaluate those same CEL
//! rules client-side with kube-cel against `crds/examples/`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, EnvVar, HostPathVolumeSource, ImageVolumeSource, NFSVolumeSource,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, ResourceRequirements, SecretKeySelector,
    SecurityContext, Toleration, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of shardseek's resources.
pub const GROUP: &str = "shardseek.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Longest allowed object name. The longest owned name is `NAME-experts` (a StatefulSet), whose
/// pods are `NAME-experts-ORDINAL` and carry a `controller-revision-hash` label of
/// `NAME-experts-HASH` (about 11 characters of hash); a label value may have 63 characters, so
/// 40 leaves room for the suffixes.
pub const MAX_NAME_LEN: usize = 40;

/// One DeepSeek-V3-architecture model served with attention/expert disaggregation: attention
/// pods, expert-shard pods and a router, all owned by this object.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardseek.io",
    version = "v1alpha1",
    kind = "DeepSeekDeployment",
    namespaced,
    shortname = "dsd",
    category = "shardseek",
    status = "DeepSeekDeploymentStatus",
    derive = "PartialEq",
    doc = "A DeepSeek-V3-architecture model served by attention pods, expert-shard pods and a router.",
    scale(
        spec_replicas_path = ".spec.attention.replicas",
        status_replicas_path = ".status.attentionReplicas",
        label_selector_path = ".status.attentionSelector"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Progressing, Available or Degraded"
    ),
    printcolumn(
        name = "Attention",
        type_ = "string",
        json_path = ".status.attentionSummary",
        description = "Ready/desired attention pods"
    ),
    printcolumn(
        name = "Experts",
        type_ = "string",
        json_path = ".status.expertsSummary",
        description = "Ready/desired expert shards"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.servedName",
        priority = "1"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: owned StatefulSets and their pods append suffixes"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, ending with a letter or digit, no '.'): it prefixes the owned Services' names")
)]
#[x_kube(
    validation = Rule::new("self.transport != 'nccl'").message("transport nccl is not wired yet (expert shards exchange rows over gRPC only); use grpc"),
    validation = Rule::new("self.experts.shards > 0 || self.experts.device == self.attention.device").message("experts.device must equal attention.device when experts.shards is 0: the experts then run inside the attention pods, on attention.device"),
    validation = Rule::new("self.experts.shards > 0 || (has(self.experts.activationDtype) ? self.experts.activationDtype : 'f32') == (has(self.attention.activationDtype) ? self.attention.activationDtype : 'f32')").message("experts.activationDtype must equal attention.activationDtype when experts.shards is 0: the experts then run inside the attention pods, with attention.activationDtype")
)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekDeploymentSpec {
    /// The shardseek container image every pod runs.
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    /// The image pull policy of every container.
    #[serde(default)]
    pub image_pull_policy: ImagePullPolicy,
    /// Names of Secrets used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// The model to serve.
    pub model: ModelSpec,
    /// The attention pods.
    #[serde(default)]
    pub attention: AttentionSpec,
    /// The expert shards.
    #[serde(default)]
    pub experts: ExpertsSpec,
    /// The router (OpenAI-compatible gateway).
    #[serde(default)]
    pub router: RouterSpec,
    /// How token rows travel between attention pods and expert shards.
    #[serde(default)]
    pub transport: Transport,
    /// The element type of dispatched token rows.
    #[serde(default)]
    pub dispatch_dtype: DispatchDtype,
    /// Where the pods may run.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// Scraping by the Prometheus Operator.
    #[serde(default, skip_serializing_if = "MonitoringSpec::is_empty")]
    pub monitoring: MonitoringSpec,
}

/// The ServiceMonitor the operator applies where the Prometheus Operator's API exists.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Labels added to the ServiceMonitor, so a Prometheus's `serviceMonitorSelector` (for
    /// example `release: kube-prometheus-stack`) selects it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_monitor_labels: BTreeMap<String, String>,
}

impl MonitoringSpec {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.service_monitor_labels.is_empty()
    }
}

/// When the kubelet pulls the image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the node lacks the image.
    #[default]
    IfNotPresent,
    /// Never pull.
    Never,
}

/// The element type of token rows sent to expert shards.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DispatchDtype {
    /// 4 bytes a value; for checking numerics.
    F32,
    /// 2 bytes a value.
    #[default]
    Bf16,
    /// 1 byte a value plus one f32 scale per 128 values.
    Fp8,
}

/// How rows move between roles.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// gRPC streams over the pod network.
    #[default]
    Grpc,
    /// NCCL between GPUs. Refused by validation until workers open NCCL communicators.
    Nccl,
}

/// The model checkpoint and where it comes from: a volume that holds it, or a Hugging Face
/// repository that an init container pulls into a cache volume before the server starts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.volume) != has(self.source)").message("model must set exactly one of volume, source"),
    validation = Rule::new("has(self.source) || !(has(self.tokenSecret) || has(self.endpoint) || has(self.cacheClaim))").message("model.tokenSecret, model.endpoint and model.cacheClaim apply to model.source only"),
    validation = Rule::new("!has(self.source) || self.path == '/models' || self.path.startsWith('/models/')").message("with model.source, path must be /models or below it: the pull writes to the cache volume mounted there")
)]
pub struct ModelSpec {
    /// The name clients use in the OpenAI `model` field.
    #[x_kube(validation = Rule::new("self != ''").message("servedName must not be empty"))]
    pub served_name: String,
    /// The checkpoint directory inside the pods (Hugging Face layout). The volume is mounted at
    /// `/models`, so this is usually `/models` or a directory below it.
    #[serde(default = "default_model_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must be absolute"))]
    pub path: String,
    /// Where the checkpoint lives; mounted read-only at `/models` in every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<ModelVolume>,
    /// A Hugging Face repository, `hf://ORG/NAME@REVISION` (revision `main` when omitted; pin a
    /// commit so every pod serves the same weights). An init container (`shardseek model pull`)
    /// downloads it into `path` on the cache volume, resuming partial files and checking each
    /// against the hub's size and sha256; routers pull only the `*.json` files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?$')").message("source must be hf://ORG/NAME or hf://ORG/NAME@REVISION"))]
    pub source: Option<String>,
    /// The hub token for gated or private models (`HF_TOKEN` of the init container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeySelector>,
    /// A hub mirror's base URL (`HF_ENDPOINT`); the public hub when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("endpoint must be an http:// or https:// URL"))]
    pub endpoint: Option<String>,
    /// A PersistentVolumeClaim to pull into, so pod restarts and new pods on it skip the
    /// download. Without it each pod pulls into its own emptyDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self != ''").message("cacheClaim must not be empty"))]
    pub cache_claim: Option<String>,
}

fn default_model_path() -> String {
    crate::builders::MODEL_MOUNT_DIR.to_string()
}

/// The volume holding the checkpoint: exactly one of the sources below. A subset of the core/v1
/// volume sources: the ones that can hold hundreds of GB shared read-only by many pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.persistentVolumeClaim), has(self.hostPath), has(self.nfs), has(self.csi), has(self.image)].filter(x, x).size() == 1").message("model.volume must set exactly one of persistentVolumeClaim, hostPath, nfs, csi, image")
)]
pub struct ModelVolume {
    /// A PersistentVolumeClaim (ReadOnlyMany or ReadWriteMany when pods span nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// A directory on the node (pre-staged weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    /// An NFS export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    /// A CSI driver volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,
    /// An OCI image or artifact holding the weights (Kubernetes ≥ 1.33).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageVolumeSource>,
}

/// The attention pods: each holds the attention weights and the KV cache of its requests.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.kvCache) || !has(self.kvCache.gpuMemoryUtilization) || self.device.startsWith('cuda')").message("attention.kvCache.gpuMemoryUtilization applies only when attention.device is cuda or cuda:N (on the CPU, kvCache.memory sizes the cache)"),
    validation = Rule::new("!has(self.kvCache) || !has(self.kvCache.gpuMemoryUtilization) || !has(self.kvCache.memory)").message("attention.kvCache.gpuMemoryUtilization and attention.kvCache.memory both size the cache: set one, not both"),
    validation = Rule::new(GPU_ONLY_ON_A_GPU_DEVICE).message("attention.resources asks for nvidia.com/gpu but attention.device is cpu: set attention.device to cuda, or drop the GPU (the pod would hold a GPU it never uses)"),
    validation = Rule::new(BF16_ONLY_ON_THE_CPU).message("attention.activationDtype bf16 is a CPU setting (AVX512-BF16 dot products); attention.device is a GPU")
)]
pub struct AttentionSpec {
    /// Number of attention pods (the scale subresource moves this).
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// Where each attention pod computes (attention, dense layers, the KV cache; and the experts
    /// when `experts.shards` is 0): `cpu` (default), `cuda` or `cuda:N`. See `experts.device` for
    /// the GPU resource a GPU implies.
    #[serde(default = "default_device")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(DEVICE_RULE).message("attention.device must be cpu, cuda or cuda:N (N: the GPU's ordinal among the pod's GPUs)"))]
    pub device: String,
    /// How the pods' GEMMs multiply activations: `f32` (default, exact) or `bf16` (rounded to
    /// bf16 for the CPU's bf16 dot-product instructions: about twice the prefill and batched
    /// rate on CPUs with AVX512-BF16, which the pods then need, at ≤ 2⁻⁸ relative error per
    /// product; CPU only). The worker's `--activation-dtype`.
    #[serde(default)]
    pub activation_dtype: ActivationDtype,
    /// CPU, memory and accelerators of each attention pod. With a GPU `device` the operator adds
    /// `nvidia.com/gpu` to the limits and requests (see `experts.device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Most tokens in one forward step of one pod (prefill chunks plus decode tokens).
    #[serde(default = "default_max_batch_tokens")]
    #[schemars(range(min = 1))]
    pub max_batch_tokens: i32,
    /// Longest sequence (prompt plus completion) a request may reach.
    #[serde(default = "default_max_seq_len")]
    #[schemars(range(min = 1))]
    pub max_seq_len: i32,
    /// The latent KV cache of each pod. Each pod checks at start that one `maxSeqLen` sequence
    /// fits it.
    #[serde(default)]
    pub kv_cache: KvCacheSpec,
    /// Adjustments merged over the attention pods the operator builds.
    #[serde(default, skip_serializing_if = "PodTemplateOverrides::is_empty")]
    pub pod_template: PodTemplateOverrides,
}

/// The latent KV cache of an attention pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvCacheSpec {
    /// Element type of the cached latents.
    #[serde(default)]
    pub dtype: KvCacheDtype,
    /// Memory for the cache (a quantity such as `40Gi`). Unset: room for one `maxSeqLen`
    /// sequence (at least 1 GiB), at most half of the pod's memory limit; on a GPU see
    /// `gpuMemoryUtilization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// On a GPU (`attention.device` cuda): the fraction of the device's memory the pod may use
    /// for weights and cache together, in (0, 1] (vLLM's `--gpu-memory-utilization`); the
    /// cache gets what is left after the weights. Not with `memory`, which gives the cache's
    /// size directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1), extend("exclusiveMinimum" = true))]
    pub gpu_memory_utilization: Option<f64>,
    /// What a pod does when one `maxSeqLen` sequence does not fit: `refuse` to start, with the
    /// numbers in its termination message (and so in the Degraded condition), or `cap` the
    /// length to what fits and warn.
    #[serde(default)]
    pub on_overflow: KvOverflow,
}

/// Element type of the KV cache.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// 4 bytes a value.
    F32,
    /// 2 bytes a value.
    #[default]
    Bf16,
    /// 1 byte a value.
    Fp8,
}

/// How GEMMs multiply activations.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActivationDtype {
    /// Exact f32 products.
    #[default]
    F32,
    /// Rounded to bf16 (CPUs with AVX512-BF16).
    Bf16,
}

/// A role's `activationDtype` of bf16 needs its device to be the CPU.
const BF16_ONLY_ON_THE_CPU: &str = "!has(self.activationDtype) || self.activationDtype == 'f32' || !self.device.startsWith('cuda')";

/// When one `maxSeqLen` sequence does not fit the KV cache.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvOverflow {
    /// Refuse to start, saying how much memory the length needs.
    #[default]
    Refuse,
    /// Start with the longest length that fits, and warn.
    Cap,
}

impl Default for AttentionSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            device: default_device(),
            activation_dtype: ActivationDtype::default(),
            resources: None,
            max_batch_tokens: default_max_batch_tokens(),
            max_seq_len: default_max_seq_len(),
            kv_cache: KvCacheSpec::default(),
            pod_template: PodTemplateOverrides::default(),
        }
    }
}

fn one() -> i32 {
    1
}

/// Where a role computes when the spec does not say: the CPU kernels, which every node has.
fn default_device() -> String {
    "cpu".to_string()
}

/// The spellings of a device: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`, as the cluster config and
/// the worker's `--device` flag spell them (`shardseek_proto::cluster_config::Device`).
const DEVICE_RULE: &str = "self.matches('^(cpu|cuda(:[0-9]+)?)$')";

/// A CPU role asks for no GPU: `nvidia.com/gpu` in its resources would be held and never used.
const GPU_ONLY_ON_A_GPU_DEVICE: &str = "self.device != 'cpu' || !has(self.resources) || !((has(self.resources.limits) && 'nvidia.com/gpu' in self.resources.limits) || (has(self.resources.requests) && 'nvidia.com/gpu' in self.resources.requests))";

/// 8192 tokens per step: large enough to keep expert GEMMs efficient (hundreds of rows per
/// expert on average at top-8 of 256), small enough to bound a step's latency for decode.
fn default_max_batch_tokens() -> i32 {
    8192
}

/// 16384 tokens: a practical default context; the model supports more when memory allows.
fn default_max_seq_len() -> i32 {
    16384
}

/// The expert shards: shard `i` is StatefulSet pod ordinal `i`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.shards == 0 ? self.redundantSlots == 0 : self.redundantSlots % self.shards == 0").message("experts.redundantSlots must be a multiple of experts.shards (and 0 when shards is 0)"),
    validation = Rule::new("!has(self.rebalanceIntervalSeconds) || self.shards > 0").message("experts.rebalanceIntervalSeconds needs expert shards (experts.shards 1 or more): with 0 shards the experts run inside the attention pods and there is nothing to rebalance"),
    validation = Rule::new(GPU_ONLY_ON_A_GPU_DEVICE).message("experts.resources asks for nvidia.com/gpu but experts.device is cpu: set experts.device to cuda, or drop the GPU (the pod would hold a GPU it never uses)"),
    validation = Rule::new(BF16_ONLY_ON_THE_CPU).message("experts.activationDtype bf16 is a CPU setting (AVX512-BF16 dot products); experts.device is a GPU")
)]
pub struct ExpertsSpec {
    /// Number of expert shards; 0 keeps the experts inside the attention pods.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub shards: i32,
    /// Extra expert slots, in total over all shards, for replicas of hot experts.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub redundant_slots: i32,
    /// Where each expert shard computes: `cpu` (default), `cuda` (= `cuda:0`) or `cuda:N`. The
    /// roles choose independently: attention pods on GPUs with expert shards on CPU-only nodes
    /// with large memory (a hybrid) works with the same dispatch, since a shard does not care
    /// where the attention runs. With 0 shards the experts run inside the attention pods, on
    /// `attention.device`, and this must equal it.
    ///
    /// A role on a GPU gets `nvidia.com/gpu` in its container's limits and requests (Kubernetes
    /// requires both equal for an extended resource, and schedules the pod onto a node whose
    /// device plugin offers it): `N + 1` for `cuda:N`, since the device plugin shows a pod its
    /// GPUs as ordinals `0..count`. A count the role's `resources` already sets (limits or
    /// requests) is kept, and must be at least `N + 1`. A role on the CPU gets no GPU, and
    /// asking for one is refused (it would be held and never used). Place CPU shards on
    /// CPU-only nodes with `experts.podTemplate.nodeSelector`.
    #[serde(default = "default_device")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(DEVICE_RULE).message("experts.device must be cpu, cuda or cuda:N (N: the GPU's ordinal among the pod's GPUs)"))]
    pub device: String,
    /// How the shards' expert GEMMs multiply activations: `f32` (default) or `bf16` (see
    /// `attention.activationDtype`; CPU only). With 0 shards the experts run inside the
    /// attention pods, and this must equal `attention.activationDtype`.
    #[serde(default)]
    pub activation_dtype: ActivationDtype,
    /// CPU, memory and accelerators of each expert shard. With a GPU `device` the operator adds
    /// `nvidia.com/gpu` (see `device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Seconds between expert-placement rebalances (online EPLB, at least 10). The operator
    /// reads the expert load the attention pods observed over the interval, computes a balanced
    /// placement and publishes it to the shards and pods without restarting any; the table in
    /// force is kept in the ConfigMap `NAME-placement`, which restarted pods start from, and its
    /// version in `status.placementVersion`. Unset: the placement in force stays (the initial
    /// one unless an earlier interval rebalanced it). Changing it rolls no pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10))]
    pub rebalance_interval_seconds: Option<i32>,
    /// Seconds an attention pod holds the tokens that need an expert with no live copy left (its
    /// shard died and no replica lives), waiting for the shard to be back before failing them.
    /// The step is held meanwhile, so every sequence in it stalls; a pod that comes back in time
    /// costs the requests nothing. Unset: 5 with redundant slots, 0 (fail those requests at
    /// once, with an error naming the shard) without. Kubernetes restarts a crashed container at
    /// once, but a pod rescheduled onto another node takes longer: raise it where that must not
    /// fail requests. Changing it restarts the pods (it is part of their configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 300))]
    pub failover_wait_seconds: Option<i32>,
    /// Adjustments merged over the expert-shard pods the operator builds.
    #[serde(default, skip_serializing_if = "PodTemplateOverrides::is_empty")]
    pub pod_template: PodTemplateOverrides,
}

impl Default for ExpertsSpec {
    fn default() -> Self {
        Self {
            shards: 1,
            redundant_slots: 0,
            device: default_device(),
            activation_dtype: ActivationDtype::default(),
            resources: None,
            rebalance_interval_seconds: None,
            failover_wait_seconds: None,
            pod_template: PodTemplateOverrides::default(),
        }
    }
}

/// The router: the OpenAI-compatible HTTP API and the public gRPC API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Number of router pods.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// CPU and memory of each router pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The Service in front of the routers.
    #[serde(default)]
    pub service: RouterServiceSpec,
    /// A Secret key holding the API key clients must send (`Authorization: Bearer KEY`); the
    /// routers get it in the environment variable `SHARDSEEK_API_KEY`. Unset: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeySelector>,
    /// Adjustments merged over the router pods the operator builds. Routers need no
    /// accelerator: `spec.scheduling` does not apply to them, and by default they prefer nodes
    /// without the `nvidia.com/gpu.present=true` label; scheduling set here replaces that.
    #[serde(default, skip_serializing_if = "PodTemplateOverrides::is_empty")]
    pub pod_template: PodTemplateOverrides,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            resources: None,
            service: RouterServiceSpec::default(),
            api_key_secret: None,
            pod_template: PodTemplateOverrides::default(),
        }
    }
}

/// The router's Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterServiceSpec {
    /// The Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// The Service's HTTP port (the pods listen on 8080).
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations for the Service (for example a cloud load balancer's settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for RouterServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_http_port(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_http_port() -> i32 {
    80
}

/// How the router Service is exposed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    /// Inside the cluster only.
    #[default]
    ClusterIP,
    /// On a port of every node.
    NodePort,
    /// Through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The core/v1 spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

impl ImagePullPolicy {
    /// The core/v1 spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Where the accelerator pods (attention pods and expert shards) may be scheduled. Routers are
/// scheduled by `router.podTemplate` only; the priority class applies to every pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node labels every pod requires.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (for example GPU nodes' taints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// The PriorityClass of every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// Adjustments of one role's pods, merged over what the operator builds (as LeaderWorkerSet's
/// and KServe's pod templates are): labels and annotations are added (the operator's selector
/// labels and config hash win); `env` replaces variables of the same name and adds the rest;
/// `volumes` by name and `volumeMounts` by mount path likewise; `nodeSelector` is merged key by
/// key and `tolerations` appended to `spec.scheduling`'s; `affinity`,
/// `topologySpreadConstraints`, `priorityClassName` and `runtimeClassName` replace the
/// operator's; `securityContext` and `podSecurityContext` are JSON-merged over the restricted
/// defaults, field by field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Labels added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Environment variables of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Volumes of the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Volume mounts of the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Node labels the pods require (merged over `spec.scheduling.nodeSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (added to `spec.scheduling.tolerations`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity (replaces `spec.scheduling.affinity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the pods spread over zones or nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// The PriorityClass (replaces `spec.scheduling.priorityClassName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The RuntimeClass (for example `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// The container's security context, merged over the restricted default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// The pod's security context, merged over the default (non-root uid 65532).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
    /// Size of a memory-backed emptyDir mounted at `/dev/shm` (NCCL and other shared-memory
    /// transports need more than the runtime's 64 MiB). Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_memory: Option<Quantity>,
    /// Add the IPC_LOCK capability (NCCL pins host memory). Not allowed by the restricted Pod
    /// Security Standard: the namespace must admit it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ipc_lock: bool,
}

impl PodTemplateOverrides {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// What the operator observed, written to the status subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A one-word summary of the conditions.
    #[serde(default)]
    pub phase: Phase,
    /// Available, Progressing and Degraded, each with a reason and message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Desired attention pods (read by the scale subresource).
    #[serde(default)]
    pub attention_replicas: i32,
    /// Ready attention pods.
    #[serde(default)]
    pub attention_ready: i32,
    /// `ready/desired` attention pods, for the printer column.
    #[serde(default)]
    pub attention_summary: String,
    /// The label selector of attention pods (for the scale subresource and autoscalers).
    #[serde(default)]
    pub attention_selector: String,
    /// Desired expert shards.
    #[serde(default)]
    pub experts_desired: i32,
    /// Ready expert shards.
    #[serde(default)]
    pub experts_ready: i32,
    /// `ready/desired` expert shards, for the printer column.
    #[serde(default)]
    pub experts_summary: String,
    /// Desired router pods.
    #[serde(default)]
    pub router_desired: i32,
    /// Ready router pods.
    #[serde(default)]
    pub router_ready: i32,
    /// The expert placement version in force, owned by the operator, while there are expert
    /// shards: 1 is the initial table, which every process derives itself from experts, shards
    /// and redundant slots; each rebalance that moves experts (`experts.rebalanceIntervalSeconds`)
    /// publishes the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_version: Option<i64>,
    /// The in-cluster URL of the OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The hash of the rendered cluster config that the pod templates carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}

/// A one-word summary of the conditions, for `kubectl get`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Not reconciled yet.
    #[default]
    Pending,
    /// Owned objects are rolling out.
    Progressing,
    /// Every role has all its pods ready.
    Available,
    /// Something is wrong; see the Degraded condition's message.
    Degraded,
}

/// The CRD object.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    DeepSeekDeployment::crd()
}

/// The CRD as YAML, exactly as checked in under `crds/` and `charts/shardseek/crds/`.
pub fn crd_yaml() -> crate::Result<String> {
    let body = serde_norway::to_string(&crd()).map_err(crate::Error::Yaml)?;
    Ok(format!(
        "# Generated by `shardseek crd` from operator/src/crd.rs; do not edit.\n{body}"
    ))
}
