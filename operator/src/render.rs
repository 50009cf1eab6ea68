//! `shardseek render -f FILE`: every object the operator would apply for the
//! `DeepSeekDeployment`s in a YAML file, without a cluster (a dry run of the builders).
//!
//! What the API server would add is filled in the same way the reconciler sees it: the
//! namespace (`default` unless the file or the caller names one) and a uid for the owner
//! references. The uid is a fixed placeholder, so the output is deterministic; the real one is
//! assigned when the object is created.

use kube::ResourceExt;
use serde::Deserialize;

use crate::builders;
use crate::crd::DeepSeekDeployment;
use crate::{Error, Result};

/// The uid written into owner references of rendered objects.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// Parses every YAML document of `text` as a `DeepSeekDeployment` (other kinds are an error)
/// and puts the namespace and uid on each, as the API server would.
pub fn parse(text: &str, namespace: Option<&str>) -> Result<Vec<DeepSeekDeployment>> {
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(document).map_err(Error::Yaml)?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "DeepSeekDeployment" {
            return Err(Error::InvalidSpec(format!(
                "expected kind DeepSeekDeployment, found `{kind}`"
            )));
        }
        let mut dsd: DeepSeekDeployment = serde_json::from_value(value).map_err(Error::Json)?;
        if let Some(ns) = namespace {
            dsd.metadata.namespace = Some(ns.to_string());
        }
        dsd.metadata
            .namespace
            .get_or_insert_with(|| "default".to_string());
        dsd.metadata
            .uid
            .get_or_insert_with(|| PLACEHOLDER_UID.to_string());
        dsd.metadata.generation.get_or_insert(1);
        out.push(dsd);
    }
    Ok(out)
}

/// The YAML stream of every object the operator would apply for the objects in `text`.
pub fn render(text: &str, namespace: Option<&str>) -> Result<String> {
    let mut out = String::new();
    for dsd in parse(text, namespace)? {
        out.push_str(&format!(
            "# DeepSeekDeployment {}/{}\n",
            dsd.namespace().unwrap_or_default(),
            dsd.name_any()
        ));
        out.push_str(&builders::build(&dsd)?.to_yaml()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "apiVersion: shardseek.io/v1alpha1\nkind: DeepSeekDeployment\nmetadata: {name: v3}\nspec:\n  image: img\n  model:\n    servedName: m\n    volume: {hostPath: {path: /w}}\n";

    #[test]
    fn renders_every_owned_object() {
        let yaml = render(MINIMAL, Some("llm")).unwrap();
        for kind in [
            "ConfigMap",
            "StatefulSet",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "ServiceMonitor",
        ] {
            assert!(yaml.contains(&format!("kind: {kind}\n")), "{kind} missing");
        }
        assert!(yaml.contains("namespace: llm"));
        assert!(yaml.contains(PLACEHOLDER_UID));
    }

    #[test]
    fn refuses_other_kinds() {
        let err = render("kind: ConfigMap\n", None).unwrap_err();
        assert!(err.to_string().contains("ConfigMap"), "{err}");
    }
}
