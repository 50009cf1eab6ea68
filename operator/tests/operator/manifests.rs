//! Checked-in manifests against the Rust code: the builders' golden output, the CRD and its
//! chart copy, the example objects against the CRD's CEL rules, the Helm chart's rendered
//! documents against their k8s-openapi types, and the Grafana dashboard against the metric
//! catalog.
//!
//! Golden files are rewritten with `SHARDSEEK_UPDATE_GOLDEN=1`; review the diff before committing.

use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;
use shardseek_operator::builders;
use shardseek_operator::crd::{self, DeepSeekDeployment};
use shardseek_operator::metrics_catalog;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn updating() -> bool {
    std::env::var_os("SHARDSEEK_UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// Compares `actual` with the file at `path` (or rewrites it when updating).
/// What the CRD's CEL rules say of `dsd` (empty when they accept it).
fn cel_errors(dsd: &DeepSeekDeployment) -> String {
    kube::core::cel::validate_cel(dsd)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

fn golden(path: &Path, actual: &str) {
    if updating() {
        std::fs::write(path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the code at line {} (expected {:?}, got {:?}); run with SHARDSEEK_UPDATE_GOLDEN=1 and review",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

/// The `nvidia.com/gpu` of a container's (limits, requests).
fn gpus(
    resources: &Option<k8s_openapi::api::core::v1::ResourceRequirements>,
) -> (Option<String>, Option<String>) {
    let get = |map: &Option<std::collections::BTreeMap<String, Quantity>>| {
        map.as_ref()
            .and_then(|m| m.get(builders::GPU_RESOURCE))
            .map(|q| q.0.clone())
    };
    resources
        .as_ref()
        .map(|r| (get(&r.limits), get(&r.requests)))
        .unwrap_or_default()
}

fn example(name: &str) -> DeepSeekDeployment {
    let path = repo().join("crds/examples").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// An example as the API server would hand it to the operator (namespace, uid, generation).
fn as_stored(mut dsd: DeepSeekDeployment) -> DeepSeekDeployment {
    dsd.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    dsd.metadata.uid = Some("0c5e2a34-7f0b-4c1e-9a53-1d2f3b4c5d6e".into());
    dsd.metadata.generation = Some(1);
    dsd
}

#[test]
fn builders_match_golden_yaml() {
    for (example_name, golden_name) in [
        ("full.yaml", "full.yaml"),
        ("minimal.yaml", "minimal.yaml"),
        ("hub.yaml", "hub.yaml"),
    ] {
        let dsd = as_stored(example(example_name));
        let owned = builders::build(&dsd).expect("build");
        let yaml = owned.to_yaml().expect("yaml");
        golden(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(golden_name),
            &yaml,
        );
    }
}

#[test]
fn builders_carry_the_spec_into_pods() {
    // Spot checks of the golden content, so a wrongly regenerated golden file cannot hide them.
    let dsd = as_stored(example("full.yaml"));
    let owned = builders::build(&dsd).expect("build");
    let experts = owned.experts.as_ref().expect("experts");
    let spec = &experts.spec;
    assert_eq!(spec.replicas, Some(4));
    assert_eq!(spec.service_name.as_deref(), Some("v3-experts"));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/shardseek/shardseek:0.1.0")
    );
    assert_eq!(
        container.args.as_deref(),
        Some(
            &[
                "worker",
                "--role",
                "expert",
                "--cluster-config",
                "/etc/shardseek/cluster.json"
            ]
            .map(String::from)[..]
        )
    );
    let env = container.env.as_ref().expect("env");
    let shard = env
        .iter()
        .find(|e| e.name == "SHARDSEEK_SHARD_ID")
        .expect("shard id env");
    assert_eq!(
        shard
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.labels['apps.kubernetes.io/pod-index']")
    );
    // The shards are on the CPU (a hybrid deployment): no GPU, their own node type.
    assert_eq!(gpus(&container.resources), (None, None));
    let selector = pod.node_selector.as_ref().expect("node selector");
    assert_eq!(selector["node.kubernetes.io/instance-type"], "r7i.48xlarge");
    assert_eq!(selector["topology.kubernetes.io/zone"], "us-east-1a");
    let attention_pod = owned.attention.spec.template.spec.as_ref().expect("pod");
    assert_eq!(
        gpus(&attention_pod.containers[0].resources),
        (Some("1".into()), Some("1".into()))
    );
    assert_eq!(
        attention_pod.node_selector.as_ref().expect("node selector")["node.kubernetes.io/instance-type"],
        "p5.48xlarge"
    );
    assert_eq!(
        pod.tolerations.as_ref().expect("tolerations")[0]
            .key
            .as_deref(),
        Some("nvidia.com/gpu")
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("inference-high"));
    let model = pod
        .volumes
        .as_ref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == "model")
        .expect("model volume");
    assert_eq!(
        model
            .persistent_volume_claim
            .as_ref()
            .map(|p| p.claim_name.as_str()),
        Some("deepseek-v3-weights")
    );
    let mount = container
        .volume_mounts
        .as_ref()
        .expect("mounts")
        .iter()
        .find(|m| m.name == "model")
        .expect("model mount");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/models", Some(true))
    );
    let security = container
        .security_context
        .as_ref()
        .expect("security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .expect("annotations");
    // The shards' hash covers only what shards read: not the whole config's.
    let config_text = &owned.config_map.data.as_ref().expect("data")["cluster.json"];
    let config = shardseek_proto::cluster_config::ClusterConfig::from_json(config_text).unwrap();
    assert_eq!(
        annotations[builders::CONFIG_HASH_ANNOTATION],
        builders::config_hash(
            &config
                .view_of(shardseek_proto::cluster_config::Reader::Expert)
                .to_json()
        )
    );
    assert_ne!(
        annotations[builders::CONFIG_HASH_ANNOTATION],
        owned.config_hash
    );
    let owner = &experts.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("DeepSeekDeployment", "v3", Some(true))
    );
    assert_eq!(
        owned
            .router_service
            .spec
            .as_ref()
            .and_then(|s| s.type_.as_deref()),
        Some("LoadBalancer")
    );
    let config = owned.config_map.data.as_ref().expect("data")["cluster.json"].clone();
    let config = shardseek_proto::cluster_config::ClusterConfig::from_json(&config)
        .expect("valid cluster config");
    assert_eq!(config.experts.redundant_slots, 8);
    assert_eq!(config.attention.service, "v3-attention.llm.svc");
    assert_eq!(config.attention.max_batch_tokens, 16384);
}

/// The init container, its env and the cache volume of a hub source, in every role.
#[test]
fn hub_source_pulls_in_an_init_container() {
    let owned = builders::build(&as_stored(example("hub.yaml"))).expect("build");
    let source = "hf://deepseek-ai/DeepSeek-V3@86518964eaef84e3fdd98e9861759a1384f9c29d";
    let attention = owned.attention.spec.template.spec.clone().expect("pod");
    let experts = owned
        .experts
        .as_ref()
        .expect("experts")
        .spec
        .template
        .spec
        .clone()
        .expect("pod");
    let router = owned.router.spec.template.spec.clone().expect("pod");
    for (role, pod, include) in [
        ("attention", &attention, false),
        ("experts", &experts, false),
        ("router", &router, true),
    ] {
        let init = pod.init_containers.as_deref().expect("init containers");
        assert_eq!(init.len(), 1, "{role}");
        let pull = &init[0];
        assert_eq!(pull.name, builders::MODEL_PULL_CONTAINER);
        assert_eq!(pull.image, pod.containers[0].image, "{role}");
        let mut want = vec!["model", "pull", source, "--out", "/models"];
        if include {
            want.extend(["--include", "*.json"]);
        }
        assert_eq!(
            pull.args.as_deref(),
            Some(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()[..]),
            "{role}"
        );
        let env = pull.env.as_deref().expect("env");
        let endpoint = env
            .iter()
            .find(|e| e.name == "HF_ENDPOINT")
            .expect("HF_ENDPOINT");
        assert_eq!(
            endpoint.value.as_deref(),
            Some("https://hf-mirror.internal.example")
        );
        let token = env.iter().find(|e| e.name == "HF_TOKEN").expect("HF_TOKEN");
        let secret = token
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("secret ref");
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("hf-token", "token")
        );
        assert!(token.value.is_none(), "the token is never inlined");
        // The pull writes the volume the server then mounts read-only, at the same place.
        let rw = pull
            .volume_mounts
            .as_deref()
            .expect("mounts")
            .iter()
            .find(|m| m.name == builders::MODEL_VOLUME)
            .expect("model mount");
        assert_eq!((rw.mount_path.as_str(), rw.read_only), ("/models", None));
        let ro = pod.containers[0]
            .volume_mounts
            .as_deref()
            .expect("mounts")
            .iter()
            .find(|m| m.name == builders::MODEL_VOLUME)
            .expect("model mount");
        assert_eq!(
            (ro.mount_path.as_str(), ro.read_only),
            ("/models", Some(true))
        );
        let volume = pod
            .volumes
            .as_deref()
            .expect("volumes")
            .iter()
            .find(|v| v.name == builders::MODEL_VOLUME)
            .expect("model volume");
        assert_eq!(
            volume
                .persistent_volume_claim
                .as_ref()
                .map(|p| p.claim_name.as_str()),
            Some("deepseek-v3-cache"),
            "{role}"
        );
        assert!(volume.empty_dir.is_none() && volume.host_path.is_none());
    }

    // Without cacheClaim: an emptyDir per pod, and no env for unset endpoint/token.
    let mut dsd = as_stored(example("hub.yaml"));
    dsd.spec.model.cache_claim = None;
    dsd.spec.model.endpoint = None;
    dsd.spec.model.token_secret = None;
    let owned = builders::build(&dsd).expect("build");
    let pod = owned.attention.spec.template.spec.expect("pod");
    let volume = pod
        .volumes
        .as_deref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == builders::MODEL_VOLUME)
        .expect("model volume")
        .clone();
    assert!(volume.empty_dir.is_some() && volume.persistent_volume_claim.is_none());
    let env = pod.init_containers.expect("init")[0]
        .env
        .clone()
        .expect("env");
    assert!(env.iter().all(|e| !e.name.starts_with("HF_")), "{env:?}");

    // A volume source has no init container: the existing path is unchanged.
    let owned = builders::build(&as_stored(example("minimal.yaml"))).expect("build");
    assert!(
        owned
            .attention
            .spec
            .template
            .spec
            .expect("pod")
            .init_containers
            .is_none()
    );
}

/// The CEL rules that tie source, volume and the source-only fields together.
#[test]
fn model_source_rules() {
    let hub = example("hub.yaml");
    let mut both = hub.clone();
    both.spec.model.volume = example("minimal.yaml").spec.model.volume;
    assert!(
        cel_errors(&both).contains("exactly one of volume, source"),
        "{}",
        cel_errors(&both)
    );
    let mut neither = hub.clone();
    neither.spec.model.source = None;
    assert!(cel_errors(&neither).contains("exactly one of volume, source"));
    // Source-only fields on a volume source would be accepted and ignored: refused.
    let mut stray = example("minimal.yaml");
    stray.spec.model.cache_claim = Some("c".into());
    assert!(
        cel_errors(&stray).contains("apply to model.source only"),
        "{}",
        cel_errors(&stray)
    );
    for bad in [
        "deepseek-ai/DeepSeek-V3",
        "hf://DeepSeek-V3",
        "hf://a/b/c",
        "hf://a/b@",
        "s3://a/b",
    ] {
        let mut dsd = hub.clone();
        dsd.spec.model.source = Some(bad.into());
        assert!(
            cel_errors(&dsd).contains("source must be hf://"),
            "{bad} accepted"
        );
    }
    for good in [
        "hf://a/b",
        "hf://deepseek-ai/DeepSeek-V3.1@main",
        "hf://a/b@refs/pr/1",
    ] {
        let mut dsd = hub.clone();
        dsd.spec.model.source = Some(good.into());
        assert_eq!(cel_errors(&dsd), "", "{good}");
    }
    let mut outside = hub.clone();
    outside.spec.model.path = "/data".into();
    assert!(cel_errors(&outside).contains("path must be /models or below"));
    let mut endpoint = hub;
    endpoint.spec.model.endpoint = Some("hf-mirror.internal".into());
    assert!(cel_errors(&endpoint).contains("endpoint must be an http"));
}

#[test]
fn zero_shards_keep_experts_in_attention_pods() {
    let mut dsd = as_stored(example("minimal.yaml"));
    dsd.spec.experts.shards = 0;
    let owned = builders::build(&dsd).expect("build");
    assert!(owned.experts.is_none() && owned.experts_service.is_none());
    assert_eq!(owned.pod_disruption_budgets.len(), 2);
}

#[test]
fn crd_files_match_the_rust_types() {
    let yaml = crd::crd_yaml().expect("crd yaml");
    golden(&repo().join("crds/deepseekdeployment.yaml"), &yaml);
    golden(
        &repo().join("charts/shardseek/crds/deepseekdeployment.yaml"),
        &yaml,
    );
}

#[test]
fn crd_has_scale_printer_columns_and_rules() {
    let crd = crd::crd();
    let version = &crd.spec.versions[0];
    let scale = version
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.attention.replicas");
    assert_eq!(scale.status_replicas_path, ".status.attentionReplicas");
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Phase", "Attention", "Experts", "Model", "Age"]);
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["dsd".to_string()][..])
    );
    let text = serde_json::to_string(&crd).expect("json");
    for rule in [
        "self.redundantSlots % self.shards == 0",
        "self.transport != 'nccl'",
        "size(self.metadata.name) <= 40",
    ] {
        assert!(text.contains(rule), "rule {rule} missing");
    }
}

#[test]
fn examples_pass_and_fail_the_cel_rules() {
    for name in ["minimal.yaml", "full.yaml", "hub.yaml"] {
        let dsd = example(name);
        kube::core::cel::validate_cel(&dsd)
            .unwrap_or_else(|e| panic!("{name} should be valid: {e}"));
        builders::build(&as_stored(dsd)).unwrap_or_else(|e| panic!("{name} should build: {e}"));
    }
    let invalid = example("invalid.yaml");
    let errors = kube::core::cel::validate_cel(&invalid)
        .expect_err("invalid.yaml must be rejected")
        .to_string();
    for message in [
        "experts.redundantSlots must be a multiple of experts.shards",
        "model.volume must set exactly one of",
        "transport nccl is not wired yet",
        "attention.device must be cpu, cuda or cuda:N",
    ] {
        assert!(errors.contains(message), "expected {message:?} in {errors}");
    }
    // Each rule alone: fixing the other three leaves exactly one error.
    let mut one = invalid.clone();
    one.spec.model.volume.as_mut().expect("volume").host_path = None;
    one.spec.transport = crd::Transport::Grpc;
    one.spec.attention.device = "cuda".into();
    let errors = kube::core::cel::validate_cel(&one)
        .expect_err("slots rule")
        .to_string();
    assert!(
        errors.contains("redundantSlots") && !errors.contains("model.volume"),
        "{errors}"
    );
    let mut long = example("minimal.yaml");
    long.metadata.name = Some("x".repeat(41));
    assert!(
        kube::core::cel::validate_cel(&long).is_err(),
        "a 41-character name is rejected"
    );
    // Names that pass the length rule but cannot prefix a Service name.
    for bad in ["deepseek-v3.1", "V3", "3v", "v3-"] {
        let mut dsd = example("minimal.yaml");
        dsd.metadata.name = Some(bad.to_string());
        let errors = kube::core::cel::validate_cel(&dsd)
            .expect_err(bad)
            .to_string();
        assert!(errors.contains("DNS-1035"), "{bad}: {errors}");
    }
    let mut ok = example("minimal.yaml");
    ok.metadata.name = Some("deepseek-v3-1".to_string());
    kube::core::cel::validate_cel(&ok).expect("deepseek-v3-1 is a valid name");
    // Rebalancing needs shards to move experts between.
    let mut rebalanced = example("minimal.yaml");
    rebalanced.spec.experts.rebalance_interval_seconds = Some(60);
    kube::core::cel::validate_cel(&rebalanced).expect("an interval with shards is valid");
    rebalanced.spec.experts.shards = 0;
    let errors = kube::core::cel::validate_cel(&rebalanced)
        .expect_err("an interval without shards")
        .to_string();
    assert!(
        errors.contains("experts.rebalanceIntervalSeconds needs expert shards"),
        "{errors}"
    );
}

/// `shardseek render` of every example at attention replicas 1 and 2: the expert-shard and router
/// pod templates are identical (scaling attention rolls nothing else), and the attention
/// template too (the replica count is no pod's configuration).
#[test]
fn scaling_attention_changes_no_other_pod_template() {
    for name in ["minimal.yaml", "full.yaml"] {
        let text = std::fs::read_to_string(repo().join("crds/examples").join(name)).unwrap();
        let render = |replicas: i32| {
            let mut dsd = shardseek_operator::render::parse(&text, None)
                .unwrap()
                .remove(0);
            dsd.spec.attention.replicas = replicas;
            builders::build(&dsd).unwrap()
        };
        let (one, two) = (render(1), render(2));
        assert_ne!(
            one.config_map, two.config_map,
            "{name}: the ConfigMap lists the replicas"
        );
        assert_eq!(one.attention.spec.replicas, Some(1));
        assert_eq!(two.attention.spec.replicas, Some(2));
        assert_eq!(
            one.attention.spec.template, two.attention.spec.template,
            "{name}: attention template"
        );
        let experts =
            |o: &builders::OwnedObjects| o.experts.as_ref().map(|s| s.spec.template.clone());
        assert!(experts(&one).is_some(), "{name} has expert shards");
        assert_eq!(
            experts(&one),
            experts(&two),
            "{name}: expert-shard template"
        );
        assert_eq!(
            one.router.spec.template, two.router.spec.template,
            "{name}: router template"
        );
        // A change the shards read does roll them.
        let mut dsd = shardseek_operator::render::parse(&text, None)
            .unwrap()
            .remove(0);
        dsd.spec.experts.redundant_slots += dsd.spec.experts.shards;
        let three = builders::build(&dsd).unwrap();
        assert_ne!(
            experts(&one),
            experts(&three),
            "{name}: redundant slots roll the shards"
        );
        assert_eq!(
            one.router.spec.template, three.router.spec.template,
            "{name}: routers do not read the expert slots"
        );
    }
}

/// Fails with the path of the first field of `original` that `round_trip` lost: a field the
/// typed struct does not know (serde ignores unknown fields, so this is how they are denied).
fn assert_no_unknown_fields(original: &Value, round_trip: &Value, path: &str) {
    match original {
        Value::Null => {}
        Value::Object(map) => {
            for (key, value) in map {
                if value.is_null() {
                    continue;
                }
                let child = format!("{path}.{key}");
                let other = round_trip
                    .get(key)
                    .unwrap_or_else(|| panic!("unknown field {child}"));
                assert_no_unknown_fields(value, other, &child);
            }
        }
        Value::Array(items) => {
            let others = round_trip
                .as_array()
                .unwrap_or_else(|| panic!("{path} is not a list after parsing"));
            assert_eq!(items.len(), others.len(), "{path}");
            for (i, (a, b)) in items.iter().zip(others).enumerate() {
                assert_no_unknown_fields(a, b, &format!("{path}[{i}]"));
            }
        }
        scalar => {
            let same = scalar == round_trip
                || scalar
                    .as_f64()
                    .is_some_and(|f| round_trip.as_f64() == Some(f));
            assert!(same, "{path}: {scalar} became {round_trip}");
        }
    }
}

fn check_typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, what: &str) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_no_unknown_fields(doc, &back, what);
}

/// Checks every document of a `helm template` output; returns the kinds seen.
fn check_rendered(text: &str) -> Vec<String> {
    use k8s_openapi::api::{
        apps::v1 as apps, core::v1 as core, networking::v1 as net, rbac::v1 as rbac,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    let mut kinds = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc).expect("a YAML document");
        if value.is_null() {
            continue;
        }
        let api_version = value["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let what = format!(
            "{kind} {}",
            value["metadata"]["name"].as_str().unwrap_or("?")
        );
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "ServiceAccount") => check_typed::<core::ServiceAccount>(&value, &what),
            ("v1", "Service") => check_typed::<core::Service>(&value, &what),
            ("v1", "ConfigMap") => check_typed::<core::ConfigMap>(&value, &what),
            ("apps/v1", "Deployment") => check_typed::<apps::Deployment>(&value, &what),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                check_typed::<rbac::ClusterRole>(&value, &what)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                check_typed::<rbac::ClusterRoleBinding>(&value, &what)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => check_typed::<rbac::Role>(&value, &what),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                check_typed::<rbac::RoleBinding>(&value, &what)
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                check_typed::<net::NetworkPolicy>(&value, &what)
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                check_typed::<ext::CustomResourceDefinition>(&value, &what)
            }
            // Not in k8s-openapi: the operator's own typed ServiceMonitor (deny_unknown_fields).
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                check_typed::<builders::ServiceMonitor>(&value, &what)
            }
            _ => panic!("{what}: no type known for {api_version} {kind}"),
        }
        kinds.push(kind);
    }
    kinds
}

fn helm_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SHARDSEEK_HELM") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("helm"))
            .find(|p| p.is_file())
    })
}

/// The rendered chart: from the file `.ci/helm-check.sh` writes (`SHARDSEEK_HELM_TEMPLATE`), or
/// by running helm here when it is installed. `None` means skipped, which
/// `SHARDSEEK_REQUIRE_HELM=1` (set by CI) turns into a failure.
fn rendered_chart() -> Option<Vec<(String, String)>> {
    if let Some(path) = std::env::var_os("SHARDSEEK_HELM_TEMPLATE") {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"));
        return Some(vec![(format!("{path:?}"), text)]);
    }
    let helm = helm_binary()?;
    let chart = repo().join("charts/shardseek");
    let mut outputs = Vec::new();
    for (label, extra) in [
        ("defaults", vec![]),
        (
            "everything enabled",
            vec![
                "--set",
                "serviceMonitor.enabled=true",
                "--set",
                "networkPolicy.enabled=true",
                "--set",
                "watchNamespace=llm",
            ],
        ),
    ] {
        let output = std::process::Command::new(&helm)
            .args(["template", "shardseek"])
            .arg(&chart)
            .args(["--namespace", "shardseek-system", "--include-crds"])
            .args(extra)
            .output()
            .expect("running helm");
        assert!(
            output.status.success(),
            "helm template ({label}) failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push((
            label.to_string(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ));
    }
    Some(outputs)
}

#[test]
fn helm_template_documents_are_valid_kubernetes_objects() {
    let Some(outputs) = rendered_chart() else {
        assert!(
            std::env::var_os("SHARDSEEK_REQUIRE_HELM").is_none_or(|v| v != "1"),
            "SHARDSEEK_REQUIRE_HELM=1 but neither SHARDSEEK_HELM_TEMPLATE nor a helm binary is available"
        );
        eprintln!(
            "SKIPPED: helm is not installed and SHARDSEEK_HELM_TEMPLATE is unset; .ci/helm-check.sh runs this for real"
        );
        return;
    };
    for (label, text) in outputs {
        let kinds = check_rendered(&text);
        for kind in [
            "CustomResourceDefinition",
            "ServiceAccount",
            "Deployment",
            "ConfigMap",
            "Service",
        ] {
            assert!(
                kinds.iter().any(|k| k == kind),
                "{label}: no {kind} rendered ({kinds:?})"
            );
        }
        assert!(
            kinds.iter().any(|k| k == "ClusterRole" || k == "Role"),
            "{label}: no RBAC rendered ({kinds:?})"
        );
    }
}

#[test]
fn unknown_fields_are_caught() {
    // The checker itself must fail on a misspelt field, or the chart test above proves nothing.
    let doc: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "labelz": {"a": "b"}},
    });
    let result = std::panic::catch_unwind(|| {
        check_typed::<k8s_openapi::api::core::v1::ServiceAccount>(&doc, "sa")
    });
    assert!(result.is_err(), "metadata.labelz must be reported");
}

/// Every `shardseek_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            if current.starts_with("shardseek_") {
                names.push(current.clone());
            }
            current.clear();
        }
    }
    names
}

/// Every query string in a Grafana dashboard: panel targets' `expr` and template variables'
/// `query` (a string, or an object with a `query` string).
fn queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) => out.push(s.clone()),
                    _ => queries(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let path = repo().join("charts/shardseek/dashboards/shardseek.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
            .expect("dashboard json");
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() >= 10, "the dashboard has {} queries", all.len());
    let mut used = Vec::new();
    for expr in &all {
        let names = metric_names(expr);
        for name in &names {
            assert!(
                metrics_catalog::is_exported_series(name),
                "dashboard queries {name}, which no component exports: {expr}"
            );
        }
        used.extend(names);
    }
    // The panels the issue asks for, by the metric each needs.
    for needed in [
        "shardseek_time_to_first_token_seconds_bucket",
        "shardseek_inter_token_latency_seconds_bucket",
        "shardseek_generation_tokens_total",
        "shardseek_requests_running",
        "shardseek_requests_waiting",
        "shardseek_kv_cache_usage_ratio",
        "shardseek_dispatch_duration_seconds_bucket",
        "shardseek_dispatch_bytes_total",
        "shardseek_expert_tokens_total",
        "shardseek_expert_load_imbalance_ratio",
    ] {
        assert!(
            used.iter().any(|u| u == needed),
            "no panel queries {needed}"
        );
    }
    // The names the test extracts are real: a made-up name is caught.
    assert!(!metrics_catalog::is_exported_series(
        &metric_names("rate(shardseek_bogus_total[5m])")[0]
    ));
}

/// The rebalancing interval is the operator's: it is accepted, rendered into no pod and no
/// cluster config (changing it rolls nothing), and bounded below (10 s, as the schema says) and
/// to clusters with shards for objects stored before the rules.
#[test]
fn rebalance_interval_is_the_operators_and_rolls_no_pod() {
    let mut dsd = as_stored(example("full.yaml"));
    assert_eq!(dsd.spec.experts.rebalance_interval_seconds, Some(300));
    let with = builders::build(&dsd).expect("an interval builds");
    dsd.spec.experts.rebalance_interval_seconds = None;
    let without = builders::build(&dsd).expect("no interval builds");
    assert_eq!(with, without, "the interval changes no owned object");
    assert_eq!(
        builders::cluster_config(&dsd)
            .expect("config")
            .experts
            .rebalance_interval_seconds,
        None
    );
    dsd.spec.experts.rebalance_interval_seconds = Some(9);
    let err = builders::build(&dsd).expect_err("below 10 s").to_string();
    assert!(err.contains("at least 10"), "{err}");
    dsd.spec.experts.rebalance_interval_seconds = Some(60);
    dsd.spec.experts.shards = 0;
    dsd.spec.experts.redundant_slots = 0;
    let err = builders::build(&dsd).expect_err("no shards").to_string();
    assert!(err.contains("needs expert shards"), "{err}");
}

/// The failover wait reaches the pods' cluster config in milliseconds; unset, it stays out of the
/// config text (existing objects' configs and pod hashes are unchanged); above 300 s, the
/// schema's bound, it is refused for objects stored before the bound.
#[test]
fn failover_wait_reaches_the_pods_config_and_is_bounded() {
    let mut dsd = as_stored(example("full.yaml"));
    dsd.spec.experts.failover_wait_seconds = None;
    let unset = builders::cluster_config(&dsd).expect("config");
    assert_eq!(unset.experts.failover_wait_ms, None);
    let text = serde_json::to_string(&unset).expect("json");
    assert!(!text.contains("failoverWait"), "{text}");
    dsd.spec.experts.failover_wait_seconds = Some(30);
    let set = builders::cluster_config(&dsd).expect("config");
    assert_eq!(set.experts.failover_wait_ms, Some(30_000));
    assert_ne!(
        builders::build(&dsd).expect("builds"),
        {
            let mut d = dsd.clone();
            d.spec.experts.failover_wait_seconds = None;
            builders::build(&d).expect("builds")
        },
        "the pods' configuration changes with it"
    );
    dsd.spec.experts.failover_wait_seconds = Some(301);
    let err = builders::build(&dsd).expect_err("above 300 s").to_string();
    assert!(err.contains("at most 300"), "{err}");
    dsd.spec.experts.failover_wait_seconds = Some(-1);
    let err = builders::build(&dsd).expect_err("negative").to_string();
    assert!(err.contains("failoverWaitSeconds is negative"), "{err}");
}

/// Attention pods and expert shards mount the placement ConfigMap (optional: it exists once a
/// rebalance published a table) and are told its file; routers and clusters without shards do
/// not. The ConfigMap the rebalancer writes is owned by the object and carries its shape; a
/// table of another shape is not taken as the one in force.
#[test]
fn placement_config_map_is_mounted_optional_and_owned() {
    let dsd = as_stored(example("full.yaml"));
    let owned = builders::build(&dsd).expect("build");
    let pod = |sts: &k8s_openapi::api::apps::v1::StatefulSet| {
        sts.spec.template.spec.clone().expect("pod spec")
    };
    let experts = owned.experts.as_ref().expect("experts");
    for spec in [pod(&owned.attention), pod(experts)] {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "placement")
            .expect("placement volume");
        let source = volume.config_map.as_ref().expect("a ConfigMap volume");
        assert_eq!(source.name, "v3-placement");
        assert_eq!(source.optional, Some(true));
        let container = &spec.containers[0];
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "placement")
            .expect("placement mount");
        assert_eq!(mount.mount_path, builders::PLACEMENT_MOUNT_DIR);
        assert_eq!(mount.read_only, Some(true));
        let env = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == builders::PLACEMENT_FILE_ENV)
            .expect("placement file env");
        assert_eq!(
            env.value.as_deref(),
            Some("/etc/shardseek-placement/placement.json")
        );
    }
    let router = owned.router.spec.template.spec.clone();
    assert!(
        !router
            .expect("router pod")
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "placement"),
        "routers route requests, not expert rows"
    );
    let mut no_shards = dsd.clone();
    no_shards.spec.experts.shards = 0;
    no_shards.spec.experts.redundant_slots = 0;
    no_shards.spec.experts.rebalance_interval_seconds = None;
    // The experts then run in the attention pods, on their GPU, as they do.
    no_shards.spec.experts.device = no_shards.spec.attention.device.clone();
    no_shards.spec.experts.activation_dtype = no_shards.spec.attention.activation_dtype;
    let owned = builders::build(&no_shards).expect("build");
    assert!(
        !pod(&owned.attention)
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "placement")
    );

    let table = shardseek_router::Placement::initial(256, 4, 2).expect("table");
    let cm = builders::placement_config_map(&dsd, &table.to_json()).expect("config map");
    assert_eq!(cm.metadata.name.as_deref(), Some("v3-placement"));
    let owner = &cm.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("DeepSeekDeployment", Some(true))
    );
    assert_eq!(
        cm.metadata.annotations.as_ref().expect("annotations")
            [builders::PLACEMENT_SHAPE_ANNOTATION],
        "shards=4,redundantSlots=8,model=/models/DeepSeek-V3"
    );
    let kept = shardseek_operator::rebalance::kept_table(&dsd, &cm).expect("same shape");
    assert_eq!(kept, shardseek_router::KeptTable::settled(table.clone()));
    // A publication under way keeps the table it switches from beside the new one.
    let next = shardseek_router::Placement::from_assignments(
        2,
        4,
        (0..256).map(|e| vec![(e + 1) % 4]).collect(),
    )
    .expect("next table");
    let switching = shardseek_router::KeptTable {
        current: next,
        previous: Some(table),
    };
    let cm2 = builders::placement_config_map(&dsd, &switching.to_json()).expect("config map");
    assert_eq!(
        shardseek_operator::rebalance::kept_table(&dsd, &cm2),
        Some(switching)
    );
    let mut resharded = dsd.clone();
    resharded.spec.experts.shards = 8;
    assert_eq!(
        shardseek_operator::rebalance::kept_table(&resharded, &cm),
        None,
        "a table of 4 shards is not kept for 8"
    );
}

fn pod_of(
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
) -> &k8s_openapi::api::core::v1::PodSpec {
    template.spec.as_ref().expect("pod spec")
}

/// A hybrid deployment (attention on a GPU, expert shards on the CPU): `nvidia.com/gpu` only in
/// the attention pods, in both limits and requests (Kubernetes requires an extended resource's
/// request to equal its limit); the device and the GPU memory fraction only in the attention
/// view of cluster.json; routers still prefer nodes without a GPU.
#[test]
fn devices_put_gpus_only_on_roles_on_a_gpu() {
    let mut dsd = as_stored(example("full.yaml"));
    // Without a count in the resources the operator asks for the GPU itself.
    dsd.spec.attention.resources = None;
    let owned = builders::build(&dsd).expect("build");
    let attention = pod_of(&owned.attention.spec.template);
    let experts = pod_of(&owned.experts.as_ref().expect("experts").spec.template);
    let router = pod_of(&owned.router.spec.template);
    assert_eq!(
        gpus(&attention.containers[0].resources),
        (Some("1".into()), Some("1".into()))
    );
    assert_eq!(gpus(&experts.containers[0].resources), (None, None));
    assert_eq!(gpus(&router.containers[0].resources), (None, None));
    let prefers_no_gpu = |pod: &k8s_openapi::api::core::v1::PodSpec| {
        serde_json::to_string(&pod.affinity)
            .unwrap()
            .contains(builders::GPU_NODE_LABEL)
    };
    assert!(prefers_no_gpu(router), "{:?}", router.affinity);

    let text = &owned.config_map.data.as_ref().expect("data")["cluster.json"];
    let config = shardseek_proto::cluster_config::ClusterConfig::from_json(text).unwrap();
    use shardseek_proto::cluster_config::{Device, Reader};
    assert_eq!(config.attention.device, Device::Cuda(0));
    assert_eq!(config.experts.device, Device::Cpu);
    assert_eq!(config.attention.kv_cache.gpu_memory_utilization, Some(0.9));
    let view = |r| config.view_of(r).to_json();
    let attention_view = view(Reader::Attention);
    assert!(
        attention_view.contains("\"device\": \"cuda:0\"")
            && attention_view.contains("\"gpuMemoryUtilization\": 0.9"),
        "{attention_view}"
    );
    for reader in [Reader::Expert, Reader::Router] {
        let text = view(reader);
        assert!(
            !text.contains("cuda") && !text.contains("gpuMemoryUtilization"),
            "{reader:?}: {text}"
        );
    }

    // cuda:N needs GPUs 0..=N in the pod: N + 1 unless the user says, and never fewer.
    let mut second = dsd.clone();
    second.spec.attention.device = "cuda:1".into();
    let owned = builders::build(&second).expect("build");
    assert_eq!(
        gpus(&pod_of(&owned.attention.spec.template).containers[0].resources),
        (Some("2".into()), Some("2".into()))
    );
    let with_limits = |limits: &[(&str, &str)], requests: &[(&str, &str)]| {
        let map = |items: &[(&str, &str)]| {
            (!items.is_empty()).then(|| {
                items
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect()
            })
        };
        Some(k8s_openapi::api::core::v1::ResourceRequirements {
            limits: map(limits),
            requests: map(requests),
            ..Default::default()
        })
    };
    // The user's count is kept (a whole node's GPUs, say), and copied to the requests.
    let mut eight = dsd.clone();
    eight.spec.attention.resources =
        with_limits(&[("nvidia.com/gpu", "8"), ("memory", "1Gi")], &[]);
    let owned = builders::build(&eight).expect("build");
    let resources = &pod_of(&owned.attention.spec.template).containers[0].resources;
    assert_eq!(gpus(resources), (Some("8".into()), Some("8".into())));
    assert_eq!(
        resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
        "1Gi"
    );
    // A count in the requests alone becomes the limit too.
    eight.spec.attention.resources = with_limits(&[], &[("nvidia.com/gpu", "4")]);
    let owned = builders::build(&eight).expect("build");
    assert_eq!(
        gpus(&pod_of(&owned.attention.spec.template).containers[0].resources),
        (Some("4".into()), Some("4".into()))
    );
    for (device, limits, requests, want) in [
        (
            "cuda:1",
            vec![("nvidia.com/gpu", "1")],
            vec![],
            "needs at least 2",
        ),
        (
            "cuda",
            vec![("nvidia.com/gpu", "0")],
            vec![],
            "needs at least 1",
        ),
        (
            "cuda",
            vec![("nvidia.com/gpu", "2")],
            vec![("nvidia.com/gpu", "1")],
            "must equal its limit",
        ),
        (
            "cuda",
            vec![("nvidia.com/gpu", "1.5")],
            vec![],
            "not a whole number",
        ),
        (
            "cpu",
            vec![("nvidia.com/gpu", "1")],
            vec![],
            "attention.device is cpu",
        ),
    ] {
        let mut bad = dsd.clone();
        bad.spec.attention.device = device.into();
        bad.spec.attention.kv_cache.gpu_memory_utilization = None;
        bad.spec.attention.resources = with_limits(&limits, &requests);
        let err = builders::build(&bad).expect_err(want).to_string();
        assert!(
            err.contains(want) && err.contains("attention."),
            "{device} {limits:?} {requests:?}: {err}"
        );
    }

    // An all-CPU deployment asks for no GPU anywhere, and its cluster.json is the one from
    // before devices existed (the defaults are left out), so upgrading rolls none of its pods.
    let owned = builders::build(&as_stored(example("minimal.yaml"))).expect("build");
    let text = &owned.config_map.data.as_ref().expect("data")["cluster.json"];
    assert!(!text.contains("device") && !text.contains("gpu"), "{text}");
    for template in [
        &owned.attention.spec.template,
        &owned.experts.as_ref().unwrap().spec.template,
    ] {
        let pod = pod_of(template);
        assert_eq!(gpus(&pod.containers[0].resources), (None, None));
    }
}

/// The CRD's rules for devices and the GPU memory fraction, each with a message naming the
/// field; the builders refuse the same for objects stored before the rules.
#[test]
fn device_rules_name_the_field() {
    let full = example("full.yaml");
    for good in ["cpu", "cuda", "cuda:0", "cuda:7"] {
        let mut dsd = full.clone();
        dsd.spec.experts.device = good.into();
        // The example's bf16 activations are a CPU setting.
        dsd.spec.experts.activation_dtype = crd::ActivationDtype::F32;
        assert_eq!(cel_errors(&dsd), "", "{good}");
        builders::build(&as_stored(dsd)).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda0", "rocm", "",
    ] {
        for role in ["attention", "experts"] {
            let mut dsd = full.clone();
            if role == "attention" {
                dsd.spec.attention.device = bad.into();
            } else {
                dsd.spec.experts.device = bad.into();
            }
            let errors = cel_errors(&dsd);
            assert!(
                errors.contains(&format!("{role}.device must be cpu, cuda or cuda:N")),
                "{role}.device {bad:?}: {errors}"
            );
            let err = builders::build(&as_stored(dsd)).expect_err(bad).to_string();
            assert!(err.contains(&format!("{role}.device")), "{err}");
        }
    }

    let mut on_cpu = full.clone();
    on_cpu.spec.attention.device = "cpu".into();
    on_cpu.spec.attention.resources = None;
    assert!(
        cel_errors(&on_cpu).contains(
            "attention.kvCache.gpuMemoryUtilization applies only when attention.device is cuda"
        ),
        "{}",
        cel_errors(&on_cpu)
    );
    let err = builders::build(&as_stored(on_cpu)).unwrap_err().to_string();
    assert!(
        err.contains("attention.kvCache.gpuMemoryUtilization") && err.contains("GPU"),
        "{err}"
    );
    let mut both = full.clone();
    both.spec.attention.kv_cache.memory = Some(Quantity("64Gi".into()));
    assert!(
        cel_errors(&both).contains(
            "attention.kvCache.gpuMemoryUtilization and attention.kvCache.memory both size"
        ),
        "{}",
        cel_errors(&both)
    );
    let err = builders::build(&as_stored(both)).unwrap_err().to_string();
    assert!(err.contains("not both"), "{err}");
    // The range is the schema's (the API server enforces it); the builders check it too.
    let crd = serde_json::to_value(crd::crd()).unwrap();
    let field = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["attention"]["properties"]["kvCache"]["properties"]["gpuMemoryUtilization"];
    assert_eq!(
        (
            &field["minimum"],
            &field["exclusiveMinimum"],
            &field["maximum"]
        ),
        (
            &serde_json::json!(0.0),
            &serde_json::json!(true),
            &serde_json::json!(1.0)
        ),
        "{field}"
    );
    for out in [0.0, 1.5, -0.1] {
        let mut dsd = full.clone();
        dsd.spec.attention.kv_cache.gpu_memory_utilization = Some(out);
        let err = builders::build(&as_stored(dsd)).unwrap_err().to_string();
        assert!(
            err.contains("attention.kvCache.gpuMemoryUtilization") && err.contains("(0, 1]"),
            "{out}: {err}"
        );
    }

    // A CPU role asking for a GPU would hold it unused.
    let mut hoarding = full.clone();
    hoarding.spec.experts.resources = hoarding.spec.attention.resources.clone();
    assert!(
        cel_errors(&hoarding)
            .contains("experts.resources asks for nvidia.com/gpu but experts.device is cpu"),
        "{}",
        cel_errors(&hoarding)
    );
    let mut in_requests = full.clone();
    in_requests.spec.experts.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some([("nvidia.com/gpu".to_string(), Quantity("1".into()))].into()),
        ..Default::default()
    });
    assert!(cel_errors(&in_requests).contains("experts.resources asks for nvidia.com/gpu"));
    let mut attention_on_cpu = full.clone();
    attention_on_cpu.spec.attention.device = "cpu".into();
    attention_on_cpu
        .spec
        .attention
        .kv_cache
        .gpu_memory_utilization = None;
    assert!(
        cel_errors(&attention_on_cpu)
            .contains("attention.resources asks for nvidia.com/gpu but attention.device is cpu"),
        "{}",
        cel_errors(&attention_on_cpu)
    );

    // Without shards the experts run in the attention pods, on their device.
    let mut no_shards = full.clone();
    no_shards.spec.experts.shards = 0;
    no_shards.spec.experts.redundant_slots = 0;
    no_shards.spec.experts.rebalance_interval_seconds = None;
    assert!(
        cel_errors(&no_shards).contains("experts.device must equal attention.device"),
        "{}",
        cel_errors(&no_shards)
    );
    let err = builders::build(&as_stored(no_shards.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("experts.device (cpu) must equal attention.device (cuda:0)"),
        "{err}"
    );
    no_shards.spec.experts.device = "cuda".into();
    no_shards.spec.experts.activation_dtype = crd::ActivationDtype::F32;
    assert_eq!(cel_errors(&no_shards), "");
    builders::build(&as_stored(no_shards)).expect("same device without shards");
}

/// Each role's device is in only that role's config hash: moving the shards to GPUs rolls the
/// shards alone, moving the attention pods rolls them alone.
#[test]
fn changing_a_roles_device_rolls_only_that_role() {
    let base = as_stored(example("full.yaml"));
    let before = builders::build(&base).expect("build");
    let hash = |template: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[builders::CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let experts = |o: &builders::OwnedObjects| o.experts.as_ref().unwrap().spec.template.clone();

    let mut shards_on_gpu = base.clone();
    shards_on_gpu.spec.experts.device = "cuda".into();
    shards_on_gpu.spec.experts.activation_dtype = crd::ActivationDtype::F32;
    let after = builders::build(&shards_on_gpu).expect("build");
    assert_ne!(hash(&experts(&before)), hash(&experts(&after)));
    assert_eq!(
        gpus(&pod_of(&experts(&after)).containers[0].resources),
        (Some("1".into()), Some("1".into()))
    );
    assert_eq!(
        before.attention.spec.template,
        after.attention.spec.template
    );
    assert_eq!(before.router.spec.template, after.router.spec.template);

    let mut attention_on_cpu = base.clone();
    attention_on_cpu.spec.attention.device = "cpu".into();
    attention_on_cpu
        .spec
        .attention
        .kv_cache
        .gpu_memory_utilization = None;
    attention_on_cpu.spec.attention.resources = None;
    let after = builders::build(&attention_on_cpu).expect("build");
    assert_ne!(
        hash(&before.attention.spec.template),
        hash(&after.attention.spec.template)
    );
    assert_eq!(experts(&before), experts(&after));
    assert_eq!(before.router.spec.template, after.router.spec.template);

    // The GPU memory fraction is the attention pods' alone too.
    let mut fraction = base.clone();
    fraction.spec.attention.kv_cache.gpu_memory_utilization = Some(0.8);
    let after = builders::build(&fraction).expect("build");
    assert_ne!(
        hash(&before.attention.spec.template),
        hash(&after.attention.spec.template)
    );
    assert_eq!(experts(&before), experts(&after));
    assert_eq!(before.router.spec.template, after.router.spec.template);
}

/// `activationDtype` of each role: in that role's config (and so its pods' hash) alone, out of
/// the config text at the default, refused on a GPU by the schema's rule and by the builder,
/// and, with the experts inside the attention pods (0 shards), required to agree.
#[test]
fn activation_dtype_reaches_only_its_role_and_only_cpus() {
    use shardseek_operator::crd::ActivationDtype;
    let full = example("full.yaml");
    assert_eq!(full.spec.experts.activation_dtype, ActivationDtype::Bf16);
    assert_eq!(cel_errors(&full), "");
    let base = as_stored(full.clone());
    let cfg = builders::cluster_config(&base).expect("config");
    assert_eq!(
        cfg.experts.activation_dtype,
        shardseek_proto::cluster_config::ActivationDtype::Bf16
    );
    assert_eq!(
        cfg.attention.activation_dtype,
        shardseek_proto::cluster_config::ActivationDtype::F32
    );
    let before = builders::build(&base).expect("build");

    let mut exact = base.clone();
    exact.spec.experts.activation_dtype = ActivationDtype::F32;
    let text = serde_json::to_string(&builders::cluster_config(&exact).expect("config")).unwrap();
    assert!(!text.contains("activationDtype"), "{text}");
    let after = builders::build(&exact).expect("build");
    assert_ne!(
        before.experts.as_ref().unwrap().spec.template,
        after.experts.as_ref().unwrap().spec.template,
        "the shards roll"
    );
    assert_eq!(
        before.attention.spec.template,
        after.attention.spec.template
    );
    assert_eq!(before.router.spec.template, after.router.spec.template);

    // bf16 on a GPU role: the schema's rule and the builder both name the field.
    let mut on_gpu = full.clone();
    on_gpu.spec.attention.activation_dtype = ActivationDtype::Bf16;
    assert!(
        cel_errors(&on_gpu).contains("attention.activationDtype bf16 is a CPU setting"),
        "{}",
        cel_errors(&on_gpu)
    );
    let err = builders::build(&as_stored(on_gpu))
        .expect_err("bf16 on cuda")
        .to_string();
    assert!(err.contains("attention.activationDtype"), "{err}");

    // No shards: the experts run in the attention pods, so the two must agree.
    let mut no_shards = full.clone();
    no_shards.spec.attention.device = "cpu".into();
    no_shards.spec.attention.resources = None;
    no_shards.spec.attention.kv_cache.gpu_memory_utilization = None;
    no_shards.spec.experts.shards = 0;
    no_shards.spec.experts.redundant_slots = 0;
    no_shards.spec.experts.rebalance_interval_seconds = None;
    assert!(
        cel_errors(&no_shards)
            .contains("experts.activationDtype must equal attention.activationDtype"),
        "{}",
        cel_errors(&no_shards)
    );
    let err = builders::build(&as_stored(no_shards.clone()))
        .expect_err("mismatch")
        .to_string();
    assert!(
        err.contains("experts.activationDtype (bf16) must equal attention.activationDtype (f32)"),
        "{err}"
    );
    no_shards.spec.attention.activation_dtype = ActivationDtype::Bf16;
    assert_eq!(cel_errors(&no_shards), "");
    let cfg = builders::cluster_config(&as_stored(no_shards)).expect("config");
    assert_eq!(
        cfg.attention.activation_dtype,
        shardseek_proto::cluster_config::ActivationDtype::Bf16
    );
}
