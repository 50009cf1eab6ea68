//! The cluster config file: the one description of a shardseek cluster that every process reads.
//!
//! The operator renders it from a `DeepSeekDeployment` into a ConfigMap (key [`FILE_NAME`]) that
//! is mounted into every pod at [`MOUNT_DIR`]; `shardseek up` writes the same file for a cluster
//! of local processes. The router and the workers read it at start-up instead of each growing its
//! own flags for the cluster shape, so the shape cannot disagree between processes. The format is
//! JSON (camelCase keys, like the Kubernetes objects it is rendered next to) and unknown keys are
//! rejected, so a newer operator talking to an older worker fails loudly instead of silently
//! dropping a setting.
//!
//! How a pod finds its place in the cluster:
//! - an expert shard's id is its StatefulSet pod ordinal; the operator passes it in the
//!   environment variable [`ENV_SHARD_ID`] (from the pod label `apps.kubernetes.io/pod-index`),
//!   and [`shard_id_from_hostname`] recovers it from `NAME-experts-I` where that label is absent;
//! - attention pods reach the shards through [`ExpertsConfig::addresses`], the stable DNS names of
//!   the experts' headless service (`NAME-experts-I.NAME-experts.NS.svc:PORT`);
//! - the router finds attention pods by resolving [`AttentionConfig::service`], the attention
//!   headless service, whose DNS answer lists one address per ready pod.

use serde::{Deserialize, Serialize};

/// The file name of the cluster config inside its ConfigMap and inside [`MOUNT_DIR`].
pub const FILE_NAME: &str = "cluster.json";
/// Where pods mount the ConfigMap (read-only).
pub const MOUNT_DIR: &str = "/etc/shardseek";
/// Environment variable carrying an expert shard's id (its pod ordinal).
pub const ENV_SHARD_ID: &str = "SHARDSEEK_SHARD_ID";
/// Environment variable carrying the pod's name (downward API), used in logs and metrics labels.
pub const ENV_POD_NAME: &str = "SHARDSEEK_POD_NAME";
/// Environment variable carrying the pod's IP (downward API `status.podIP`): the process
/// listens on it (every port of the pod) instead of on every interface.
pub const ENV_POD_IP: &str = "SHARDSEEK_POD_IP";
/// Environment variable naming the cluster config file, so local runs can point elsewhere.
pub const ENV_CLUSTER_CONFIG: &str = "SHARDSEEK_CLUSTER_CONFIG";

/// Default ports. One gRPC port per role plus one HTTP port for `/metrics`, `/health`, `/ready`,
/// so probes and scraping never compete with the data path on the same listener.
pub const DEFAULT_ROUTER_HTTP_PORT: u16 = 8080;
/// The router's public gRPC `Generate` port.
pub const DEFAULT_ROUTER_GRPC_PORT: u16 = 50051;
/// An attention pod's gRPC port (`Attention.Generate`, `Attention.Stats`).
pub const DEFAULT_ATTENTION_GRPC_PORT: u16 = 50052;
/// An expert shard's gRPC port (`Expert.Dispatch`).
pub const DEFAULT_EXPERT_GRPC_PORT: u16 = 50053;
/// Every process's HTTP port for `/metrics`, `/health` and `/ready`.
pub const DEFAULT_METRICS_PORT: u16 = 9090;

/// Errors found when reading or checking a cluster config.
#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    /// The file is not valid JSON for this schema (including unknown keys).
    #[error("cluster config is not valid: {0}")]
    Parse(#[source] serde_json::Error),
    /// A field has a value the cluster cannot run with.
    #[error("cluster config field `{field}` is invalid: {reason}")]
    Invalid {
        /// The camelCase path of the field.
        field: &'static str,
        /// Why the value is rejected.
        reason: String,
    },
}

/// The element type of token rows sent to expert shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatchDtype {
    /// Full precision; twice the bytes of bf16, for debugging numerics.
    F32,
    /// The default: what the expert GEMMs accumulate back into.
    #[default]
    Bf16,
    /// FP8 e4m3 with one f32 scale per 128 values; half the bytes of bf16.
    Fp8,
}

/// How rows move between attention pods and expert shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// gRPC streams; always available.
    #[default]
    Grpc,
    /// NCCL between GPUs; needs the `nccl` build feature.
    Nccl,
}

/// Where a role computes: `cpu`, or a CUDA device (`cuda` is `cuda:0`). Spelled the same in the
/// cluster config, the CRD and the worker's `--device` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU kernels (AVX-512, AVX2 or portable, chosen at run time).
    #[default]
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(u32),
}

impl Device {
    /// Whether this is a GPU (the role needs an `nvidia.com/gpu` resource).
    pub fn is_gpu(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Whether this is the CPU, the default (a serde `skip_serializing_if` predicate, hence the
    /// reference).
    pub fn is_cpu(&self) -> bool {
        *self == Self::Cpu
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The whole cluster as every process sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// The deployment's name; prefixes pod and service names.
    pub name: String,
    /// The Kubernetes namespace, or `None` for a local cluster of processes.
    pub namespace: Option<String>,
    /// The model to serve.
    pub model: ModelConfig,
    /// The attention role.
    pub attention: AttentionConfig,
    /// The expert role.
    pub experts: ExpertsConfig,
    /// The router (gateway).
    pub router: RouterConfig,
    /// Element type of dispatched rows.
    pub dispatch_dtype: DispatchDtype,
    /// How rows move between roles.
    pub transport: Transport,
    /// The HTTP port of `/metrics`, `/health`, `/ready` in every process.
    pub metrics_port: u16,
}

/// The model every pod loads (each its own part of it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in `"model"` of an OpenAI request.
    pub served_name: String,
    /// The checkpoint directory (Hugging Face layout) inside the pod.
    pub path: String,
}

/// The attention pods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttentionConfig {
    /// How many attention pods there are.
    pub replicas: u32,
    /// The DNS name of the attention headless service (`NAME-attention.NS.svc`) or, locally,
    /// a host name; the router resolves it to find the pods.
    pub service: String,
    /// The explicit addresses of attention pods when there is no DNS (local runs); empty on
    /// Kubernetes, where [`AttentionConfig::service`] is resolved instead.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The gRPC port of every attention pod.
    pub grpc_port: u16,
    /// The most tokens (prefill chunks plus decode tokens) in one forward step of one pod.
    pub max_batch_tokens: u32,
    /// The longest sequence (prompt plus generated tokens) a request may reach.
    pub max_seq_len: u32,
    /// The latent KV cache of each pod.
    #[serde(default)]
    pub kv_cache: KvCacheConfig,
    /// Where attention pods compute. Left out of the file when `cpu`, so a CPU cluster's config text,
    /// and so its pods' config hashes, stay what they were before devices existed (upgrading
    /// the operator rolls no pod).
    #[serde(default, skip_serializing_if = "Device::is_cpu")]
    pub device: Device,
    /// How the pods' GEMMs multiply activations (`--activation-dtype`). Left out of the file
    /// when `f32`, so configs written before it existed, and their pods' config hashes, are
    /// unchanged.
    #[serde(default, skip_serializing_if = "ActivationDtype::is_f32")]
    pub activation_dtype: ActivationDtype,
}

/// How GEMMs multiply activations: the worker's `--activation-dtype`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationDtype {
    /// Exact f32 products: the default.
    #[default]
    F32,
    /// Activations rounded to bf16 for the CPU's bf16 dot products (AVX512-BF16 only).
    Bf16,
}

impl ActivationDtype {
    /// The spelling of the worker's `--activation-dtype` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// Whether this is the default (a serde `skip_serializing_if` predicate, hence the
    /// reference).
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

/// Element type of the latent KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// 4 bytes a value: exact, for tests.
    F32,
    /// 2 bytes a value: the default.
    #[default]
    Bf16,
    /// 1 byte a value.
    Fp8,
}

impl KvCacheDtype {
    /// The spelling of the worker's `--kv-cache-dtype` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }
}

/// What an attention pod does when one `maxSeqLen` sequence does not fit its KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvOverflow {
    /// Refuse to start, with the numbers (written to the termination message).
    #[default]
    Refuse,
    /// Start with the longest length that fits, and warn.
    Cap,
}

impl KvOverflow {
    /// The spelling of the worker's `--kv-cache-on-overflow` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::Cap => "cap",
        }
    }
}

/// The latent KV cache of an attention pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KvCacheConfig {
    /// Element type.
    #[serde(default)]
    pub dtype: KvCacheDtype,
    /// Bytes for the cache; `None` sizes it automatically (room for one `maxSeqLen` sequence,
    /// bounded by the pod's memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// When one `maxSeqLen` sequence does not fit.
    #[serde(default)]
    pub on_overflow: KvOverflow,
    /// On a GPU: the fraction of the device's memory the pod may use (weights plus cache); the
    /// cache gets what is left after the weights. Only valid with `attention.device` a GPU and
    /// without `memoryBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_utilization: Option<f64>,
}

/// The expert shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExpertsConfig {
    /// How many expert shards; 0 keeps the experts inside the attention pods.
    pub shards: u32,
    /// Extra expert slots across all shards for replicas of hot experts (EPLB); a multiple of
    /// `shards` so every shard holds the same number of slots.
    pub redundant_slots: u32,
    /// The stable address of each shard, indexed by shard id.
    pub addresses: Vec<String>,
    /// The gRPC port of every shard.
    pub grpc_port: u16,
    /// Seconds between placement rebalances; `None` keeps the initial placement.
    pub rebalance_interval_seconds: Option<u32>,
    /// How long (ms) attention pods hold tokens whose experts have no live copy, waiting for the
    /// shard's restart (`--failover-wait-ms`); `None` takes the pods' default (5 s with
    /// redundant slots, 0 without). Left out of the file when unset, so configs written before
    /// it existed, and their pods' config hashes, are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_wait_ms: Option<u32>,
    /// Where expert shards compute. Left out of the file when `cpu`, so a CPU cluster's config text,
    /// and so its pods' config hashes, stay what they were before devices existed (upgrading
    /// the operator rolls no pod).
    #[serde(default, skip_serializing_if = "Device::is_cpu")]
    pub device: Device,
    /// How the shards' expert GEMMs multiply activations (`--activation-dtype`). Left out of
    /// the file when `f32`, so configs written before it existed, and their pods' config
    /// hashes, are unchanged.
    #[serde(default, skip_serializing_if = "ActivationDtype::is_f32")]
    pub activation_dtype: ActivationDtype,
}

/// The router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterConfig {
    /// The OpenAI-compatible HTTP port.
    pub http_port: u16,
    /// The public gRPC `Generate` port.
    pub grpc_port: u16,
}

impl ExpertsConfig {
    /// The stable DNS addresses of `shards` expert pods of StatefulSet `NAME-experts` behind the
    /// headless service of the same name: `NAME-experts-I.NAME-experts.NS.svc:PORT`.
    pub fn kubernetes_addresses(
        name: &str,
        namespace: &str,
        shards: u32,
        port: u16,
    ) -> Vec<String> {
        (0..shards)
            .map(|i| format!("{name}-experts-{i}.{name}-experts.{namespace}.svc:{port}"))
            .collect()
    }
}

impl ClusterConfig {
    /// Parses and checks a cluster config.
    pub fn from_json(text: &str) -> Result<Self, ClusterConfigError> {
        let config: Self = serde_json::from_str(text).map_err(ClusterConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }

    /// The canonical text of this config: pretty JSON with a trailing newline. The operator
    /// hashes exactly these bytes into pod templates, so it must be deterministic (it is: struct
    /// fields serialise in declaration order).
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and integers cannot fail.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Checks the relations between fields that the types alone cannot express.
    pub fn validate(&self) -> Result<(), ClusterConfigError> {
        let invalid = |field, reason: String| Err(ClusterConfigError::Invalid { field, reason });
        if self.name.is_empty() {
            return invalid("name", "must not be empty".into());
        }
        if self.model.served_name.is_empty() {
            return invalid("model.servedName", "must not be empty".into());
        }
        if self.model.path.is_empty() {
            return invalid("model.path", "must not be empty".into());
        }
        if self.attention.replicas == 0 {
            return invalid("attention.replicas", "must be at least 1".into());
        }
        if self.attention.max_batch_tokens == 0 {
            return invalid("attention.maxBatchTokens", "must be at least 1".into());
        }
        if self.attention.max_seq_len == 0 {
            return invalid("attention.maxSeqLen", "must be at least 1".into());
        }
        let shards = self.experts.shards;
        if shards == 0 && self.experts.redundant_slots != 0 {
            return invalid(
                "experts.redundantSlots",
                "must be 0 when experts run inside the attention pods (shards = 0)".into(),
            );
        }
        if shards != 0 && !self.experts.redundant_slots.is_multiple_of(shards) {
            return invalid(
                "experts.redundantSlots",
                format!(
                    "{} is not a multiple of shards ({shards})",
                    self.experts.redundant_slots
                ),
            );
        }
        if self.experts.addresses.len() != shards as usize {
            return invalid(
                "experts.addresses",
                format!(
                    "has {} entries for {shards} shards",
                    self.experts.addresses.len()
                ),
            );
        }
        if let Some(u) = self.attention.kv_cache.gpu_memory_utilization {
            if !(u > 0.0 && u <= 1.0) {
                return invalid(
                    "attention.kvCache.gpuMemoryUtilization",
                    format!("{u} is not in (0, 1]"),
                );
            }
            if !self.attention.device.is_gpu() {
                return invalid(
                    "attention.kvCache.gpuMemoryUtilization",
                    "applies only when attention.device is a GPU".into(),
                );
            }
            if self.attention.kv_cache.memory_bytes.is_some() {
                return invalid(
                    "attention.kvCache.gpuMemoryUtilization",
                    "set either memoryBytes or gpuMemoryUtilization, not both".into(),
                );
            }
        }
        for (key, act, device) in [
            (
                "attention.activationDtype",
                self.attention.activation_dtype,
                self.attention.device,
            ),
            (
                "experts.activationDtype",
                self.experts.activation_dtype,
                self.experts.device,
            ),
        ] {
            if act == ActivationDtype::Bf16 && device.is_gpu() {
                return invalid(
                    key,
                    format!("bf16 is a CPU setting; the role's device is {device}"),
                );
            }
        }
        if self.transport == Transport::Nccl {
            // Expert shards compute on CPUs and no worker opens an NCCL communicator yet:
            // refusing beats serving over gRPC while the config says NCCL.
            return invalid(
                "transport",
                "nccl is not wired yet (expert shards exchange rows over gRPC only); use grpc"
                    .into(),
            );
        }
        Ok(())
    }

    /// The address of expert shard `shard`, if it exists.
    pub fn expert_address(&self, shard: u32) -> Option<&str> {
        self.experts
            .addresses
            .get(shard as usize)
            .map(String::as_str)
    }
}

/// The kinds of process that read the cluster config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reader {
    /// `shardseek worker --role attention`.
    Attention,
    /// `shardseek worker --role expert`.
    Expert,
    /// `shardseek router`.
    Router,
}

impl ClusterConfig {
    /// This config with every field that `reader` does not read set to a neutral value: what
    /// the operator hashes into that role's pod template, so a change rolls exactly the pods
    /// that would behave differently. Scaling attention (`attention.replicas`) changes no view:
    /// routers follow the attention Service's DNS, and no process reads the count.
    ///
    /// Keep in step with the readers (src/main.rs `run_worker`, `run_router`); the tests below
    /// pin which fields each view keeps.
    pub fn view_of(&self, reader: Reader) -> ClusterConfig {
        let mut v = self.clone();
        // Nobody reads the replica count of attention pods.
        v.attention.replicas = 1;
        match reader {
            Reader::Attention => {
                v.model.served_name = String::new();
                // With shards, the experts' device is theirs alone (a shard does not care where
                // the attention runs, nor the reverse); with none, the attention pods run the
                // experts themselves.
                if v.experts.shards > 0 {
                    v.experts.device = Device::default();
                    v.experts.activation_dtype = ActivationDtype::default();
                }
                v.attention.service = String::new();
                v.attention.addresses = Vec::new();
                v.router = RouterConfig {
                    http_port: 0,
                    grpc_port: 0,
                };
            }
            Reader::Expert => {
                v.model.served_name = String::new();
                v.attention = AttentionConfig {
                    replicas: 1,
                    service: String::new(),
                    addresses: Vec::new(),
                    grpc_port: 0,
                    max_batch_tokens: 1,
                    max_seq_len: 1,
                    kv_cache: KvCacheConfig::default(),
                    device: Device::default(),
                    activation_dtype: ActivationDtype::default(),
                };
                // A shard learns its own id from its ordinal and listens on its port; the other
                // shards' addresses are for attention pods.
                v.experts.addresses = Vec::new();
                // How long pods hold tokens for a restarting shard is the pods' policy.
                v.experts.failover_wait_ms = None;
                v.dispatch_dtype = DispatchDtype::default();
                v.router = RouterConfig {
                    http_port: 0,
                    grpc_port: 0,
                };
            }
            Reader::Router => {
                v.attention.max_batch_tokens = 1;
                v.attention.kv_cache = KvCacheConfig::default();
                v.attention.device = Device::default();
                v.attention.activation_dtype = ActivationDtype::default();
                v.experts = ExpertsConfig {
                    shards: 0,
                    redundant_slots: 0,
                    addresses: Vec::new(),
                    grpc_port: 0,
                    rebalance_interval_seconds: None,
                    failover_wait_ms: None,
                    device: Device::default(),
                    activation_dtype: ActivationDtype::default(),
                };
                v.dispatch_dtype = DispatchDtype::default();
                v.transport = Transport::default();
            }
        }
        v
    }
}

/// Parses a memory size: plain bytes or a Kubernetes quantity (`8Gi`, `512Mi`, `1G`, `1.5Gi`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: not a number of bytes"))?;
    let factor: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use k, M, G, T, Ki, Mi, Gi or Ti)"
            ));
        }
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}`: out of range"));
    }
    Ok(bytes as u64)
}

/// Recovers a StatefulSet pod's ordinal from its host name `NAME-experts-I`.
pub fn shard_id_from_hostname(hostname: &str) -> Option<u32> {
    let (_, ordinal) = hostname.rsplit_once('-')?;
    ordinal.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterConfig {
        ClusterConfig {
            name: "v3".into(),
            namespace: Some("llm".into()),
            model: ModelConfig {
                served_name: "deepseek-v3".into(),
                path: "/models/v3".into(),
            },
            attention: AttentionConfig {
                replicas: 2,
                service: "v3-attention.llm.svc".into(),
                addresses: vec![],
                grpc_port: DEFAULT_ATTENTION_GRPC_PORT,
                max_batch_tokens: 8192,
                max_seq_len: 16384,
                kv_cache: KvCacheConfig::default(),
                device: Device::Cuda(0),
                activation_dtype: ActivationDtype::F32,
            },
            experts: ExpertsConfig {
                shards: 4,
                redundant_slots: 8,
                addresses: ExpertsConfig::kubernetes_addresses(
                    "v3",
                    "llm",
                    4,
                    DEFAULT_EXPERT_GRPC_PORT,
                ),
                grpc_port: DEFAULT_EXPERT_GRPC_PORT,
                rebalance_interval_seconds: Some(600),
                failover_wait_ms: Some(10_000),
                device: Device::Cpu,
                activation_dtype: ActivationDtype::Bf16,
            },
            router: RouterConfig {
                http_port: DEFAULT_ROUTER_HTTP_PORT,
                grpc_port: DEFAULT_ROUTER_GRPC_PORT,
            },
            dispatch_dtype: DispatchDtype::Fp8,
            transport: Transport::Grpc,
            metrics_port: DEFAULT_METRICS_PORT,
        }
    }

    #[test]
    fn bf16_activations_round_trip_and_stay_off_gpus() {
        let c = sample();
        c.validate().unwrap();
        let text = c.to_json();
        assert!(text.contains("\"activationDtype\": \"bf16\""), "{text}");
        assert_eq!(ClusterConfig::from_json(&text).unwrap(), c);
        let mut gpu = sample();
        gpu.attention.activation_dtype = ActivationDtype::Bf16;
        let e = gpu.validate().unwrap_err().to_string();
        assert!(
            e.contains("attention.activationDtype") && e.contains("cuda:0"),
            "{e}"
        );
        let mut gpu = sample();
        gpu.experts.device = Device::Cuda(1);
        let e = gpu.validate().unwrap_err().to_string();
        assert!(e.contains("experts.activationDtype"), "{e}");
    }

    #[test]
    fn devices_parse_print_and_gpu_memory_utilization_is_checked() {
        for (text, dev) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), dev);
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        let mut c = sample();
        c.attention.kv_cache.gpu_memory_utilization = Some(0.9);
        c.validate().unwrap();
        let text = c.to_json();
        assert!(text.contains("\"device\": \"cuda:0\""), "{text}");
        assert_eq!(ClusterConfig::from_json(&text).unwrap(), c);
        for (u, dev, mem, want) in [
            (0.0, Device::Cuda(0), None, "not in (0, 1]"),
            (1.5, Device::Cuda(0), None, "not in (0, 1]"),
            (
                0.9,
                Device::Cpu,
                None,
                "only when attention.device is a GPU",
            ),
            (0.9, Device::Cuda(0), Some(1 << 30), "not both"),
        ] {
            let mut c = sample();
            c.attention.device = dev;
            c.attention.kv_cache.gpu_memory_utilization = Some(u);
            c.attention.kv_cache.memory_bytes = mem;
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("attention.kvCache.gpuMemoryUtilization") && e.contains(want),
                "{e}"
            );
        }
        let bad = c.to_json().replace("\"cuda:0\"", "\"tpu\"");
        let e = ClusterConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("tpu"), "{e}");
    }

    #[test]
    fn round_trips_through_json() {
        let config = sample();
        let text = config.to_json();
        assert!(text.contains("\"dispatchDtype\": \"fp8\""), "{text}");
        assert_eq!(ClusterConfig::from_json(&text).unwrap(), config);
    }

    #[test]
    fn expert_addresses_are_stable_dns_names() {
        let config = sample();
        assert_eq!(
            config.expert_address(3),
            Some("v3-experts-3.v3-experts.llm.svc:50053")
        );
        assert_eq!(config.expert_address(4), None);
    }

    #[test]
    fn rejects_unknown_keys() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["surprise"] = serde_json::json!(1);
        let err = ClusterConfig::from_json(&value.to_string()).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
    }

    #[test]
    fn rejects_slots_not_divisible_by_shards() {
        let mut config = sample();
        config.experts.redundant_slots = 6;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("experts.redundantSlots"), "{err}");
    }

    #[test]
    fn rejects_address_count_mismatch() {
        let mut config = sample();
        config.experts.addresses.pop();
        assert!(config.validate().is_err());
    }

    #[test]
    fn nccl_is_refused_until_it_is_wired() {
        let mut config = sample();
        config.transport = Transport::Nccl;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("transport") && err.contains("nccl"), "{err}");
    }

    #[test]
    fn scaling_attention_changes_no_view() {
        let config = sample();
        let mut scaled = sample();
        scaled.attention.replicas = 7;
        for reader in [Reader::Attention, Reader::Expert, Reader::Router] {
            assert_eq!(config.view_of(reader), scaled.view_of(reader), "{reader:?}");
        }
    }

    #[test]
    fn each_view_keeps_what_its_reader_reads() {
        let config = sample();
        let changed = |f: &dyn Fn(&mut ClusterConfig)| {
            let mut c = sample();
            f(&mut c);
            [Reader::Attention, Reader::Expert, Reader::Router]
                .map(|r| c.view_of(r) != config.view_of(r))
        };
        // [attention, expert, router]
        assert_eq!(
            changed(&|c| c.attention.max_batch_tokens = 1),
            [true, false, false]
        );
        assert_eq!(
            changed(&|c| c.attention.max_seq_len = 1),
            [true, false, true]
        );
        assert_eq!(
            changed(&|c| c.attention.kv_cache.on_overflow = KvOverflow::Cap),
            [true, false, false]
        );
        assert_eq!(
            changed(&|c| c.model.served_name = "x".into()),
            [false, false, true]
        );
        assert_eq!(changed(&|c| c.model.path = "/x".into()), [true, true, true]);
        assert_eq!(
            changed(&|c| c.dispatch_dtype = DispatchDtype::Bf16),
            [true, false, false]
        );
        assert_eq!(
            changed(&|c| c.experts.redundant_slots = 4),
            [true, true, false]
        );
        assert_eq!(
            changed(&|c| c.experts.failover_wait_ms = Some(1)),
            [true, false, false]
        );
        assert_eq!(changed(&|c| c.router.http_port = 1), [false, false, true]);
        assert_eq!(
            changed(&|c| c.attention.device = Device::Cpu),
            [true, false, false]
        );
        assert_eq!(
            changed(&|c| c.attention.kv_cache.gpu_memory_utilization = Some(0.8)),
            [true, false, false]
        );
        assert_eq!(
            changed(&|c| c.experts.device = Device::Cuda(0)),
            [false, true, false]
        );
        assert_eq!(
            changed(&|c| c.attention.activation_dtype = ActivationDtype::Bf16),
            [true, false, false]
        );
        assert_eq!(
            changed(&|c| c.experts.activation_dtype = ActivationDtype::F32),
            [false, true, false]
        );
        // Without shards the attention pods run the experts: their device is the pods' own.
        let mut cpu = sample();
        cpu.experts.shards = 0;
        cpu.experts.redundant_slots = 0;
        cpu.experts.addresses.clear();
        let mut gpu = cpu.clone();
        gpu.experts.device = Device::Cuda(0);
        assert_ne!(
            cpu.view_of(Reader::Attention),
            gpu.view_of(Reader::Attention)
        );
        let mut exact = cpu.clone();
        exact.experts.activation_dtype = ActivationDtype::F32;
        assert_ne!(
            cpu.view_of(Reader::Attention),
            exact.view_of(Reader::Attention)
        );
        assert_eq!(changed(&|c| c.metrics_port = 1), [true, true, true]);
    }

    #[test]
    fn kv_cache_defaults_when_absent() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["attention"]
            .as_object_mut()
            .unwrap()
            .remove("kvCache");
        let config = ClusterConfig::from_json(&value.to_string()).unwrap();
        assert_eq!(config.attention.kv_cache, KvCacheConfig::default());
        assert_eq!(config.attention.kv_cache.dtype, KvCacheDtype::Bf16);
    }

    #[test]
    fn shard_id_comes_from_the_ordinal() {
        assert_eq!(shard_id_from_hostname("v3-experts-12"), Some(12));
        assert_eq!(shard_id_from_hostname("v3-experts"), None);
    }
}
