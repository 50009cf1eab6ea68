//! Pure functions from what the owned objects report to the `DeepSeekDeployment` status
//! (STYLE.md rule 4: status is conditions, each with a reason, a message, the time it last
//! changed, and the generation it describes).
//!
//! The conditions:
//! - **Available**: every role has all its desired pods ready (attention, expert shards,
//!   routers). False while any is short, with the counts in the message.
//! - **Progressing**: a rollout is under way: an owned workload has not yet observed its latest
//!   spec or not all pods run the latest template. False (`RolloutComplete`) once done.
//! - **Degraded**: something needs a human: a worker exited with an error (its termination
//!   message is the condition's message), or the spec cannot be rendered. False otherwise.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::builders::{self, Role};
use crate::crd::{DeepSeekDeployment, DeepSeekDeploymentStatus, Phase};

/// Condition type: all pods of every role ready.
pub const AVAILABLE: &str = "Available";
/// Condition type: a rollout is under way.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: a failure needs attention.
pub const DEGRADED: &str = "Degraded";

/// A termination message is capped by the kubelet at 4 KiB; keep the condition readable.
const MAX_FAILURE_MESSAGE: usize = 1024;

/// What a workload reports, reduced to what the conditions need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleState {
    /// Pods the spec asks for.
    pub desired: i32,
    /// Pods ready.
    pub ready: i32,
    /// Whether the workload has observed its latest spec and every pod runs the latest template.
    pub rolled_out: bool,
}

impl RoleState {
    /// From a StatefulSet as read back from the API server (`None`: not created yet).
    pub fn from_stateful_set(desired: i32, sts: Option<&StatefulSet>) -> Self {
        let Some(sts) = sts else {
            return Self {
                desired,
                ready: 0,
                rolled_out: desired == 0,
            };
        };
        let generation = sts.metadata.generation.unwrap_or(0);
        let Some(status) = &sts.status else {
            return Self {
                desired,
                ready: 0,
                rolled_out: false,
            };
        };
        let ready = status.ready_replicas.unwrap_or(0);
        let updated = status.updated_replicas.unwrap_or(0);
        let same_revision =
            status.update_revision.is_none() || status.current_revision == status.update_revision;
        let rolled_out = status.observed_generation.unwrap_or(0) >= generation
            && updated == desired
            && status.replicas == desired
            && same_revision;
        Self {
            desired,
            ready,
            rolled_out,
        }
    }

    /// From a Deployment as read back from the API server.
    pub fn from_deployment(desired: i32, deployment: Option<&Deployment>) -> Self {
        let Some(deployment) = deployment else {
            return Self {
                desired,
                ready: 0,
                rolled_out: desired == 0,
            };
        };
        let generation = deployment.metadata.generation.unwrap_or(0);
        let Some(status) = &deployment.status else {
            return Self {
                desired,
                ready: 0,
                rolled_out: false,
            };
        };
        let ready = status.ready_replicas.unwrap_or(0);
        let rolled_out = status.observed_generation.unwrap_or(0) >= generation
            && status.updated_replicas.unwrap_or(0) == desired
            && status.replicas.unwrap_or(0) == desired;
        Self {
            desired,
            ready,
            rolled_out,
        }
    }

    fn summary(&self) -> String {
        format!("{}/{}", self.ready, self.desired)
    }

    fn all_ready(&self) -> bool {
        self.ready >= self.desired
    }
}

/// Everything the status is computed from.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Attention pods.
    pub attention: RoleState,
    /// Expert shards.
    pub experts: RoleState,
    /// Routers.
    pub router: RoleState,
    /// Worker failures: `(pod name, termination message)`.
    pub failures: Vec<(String, String)>,
    /// Set when the spec could not be turned into objects.
    pub invalid_spec: Option<String>,
    /// The cluster config hash on the pod templates.
    pub config_hash: Option<String>,
    /// The expert placement version in force when it is not the initial table's: the running
    /// rebalancer's, else the one kept in the placement ConfigMap. `None`: version 1.
    pub placement_version: Option<u64>,
}

/// The failures of the pods of one deployment: a container that is not running now and whose
/// current or last termination was an error. A pod that restarted and runs again is not counted.
pub fn pod_failures(pods: &[Pod]) -> Vec<(String, String)> {
    let mut failures = Vec::new();
    for pod in pods {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref());
        for status in statuses.into_iter().flatten() {
            let state = status.state.as_ref();
            let running = state.is_some_and(|s| s.running.is_some());
            if running {
                continue;
            }
            let terminated = state.and_then(|s| s.terminated.as_ref()).or_else(|| {
                status
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
            });
            if let Some(t) = terminated.filter(|t| t.exit_code != 0) {
                let text = t
                    .message
                    .as_deref()
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        format!(
                            "exited with code {} ({})",
                            t.exit_code,
                            t.reason.as_deref().unwrap_or("no reason")
                        )
                    });
                failures.push((pod.name_any(), truncate(&text, MAX_FAILURE_MESSAGE)));
            }
        }
    }
    failures.sort();
    failures
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Computes the new status. `previous` supplies the last transition times: a condition whose
/// status did not change keeps its time, so that an unchanged world gives an identical status
/// (and a second reconcile writes nothing new).
pub fn compute(
    dsd: &DeepSeekDeployment,
    observed: &Observed,
    previous: Option<&DeepSeekDeploymentStatus>,
    now: Timestamp,
) -> DeepSeekDeploymentStatus {
    let generation = dsd.metadata.generation;
    let name = dsd.name_any();
    let roles = [
        ("attention", observed.attention),
        ("experts", observed.experts),
        ("router", observed.router),
    ];
    let counts = roles
        .iter()
        .map(|(role, state)| format!("{role} {}", state.summary()))
        .collect::<Vec<_>>()
        .join(", ");

    let all_ready = observed.invalid_spec.is_none() && roles.iter().all(|(_, s)| s.all_ready());
    let rolled_out = observed.invalid_spec.is_none() && roles.iter().all(|(_, s)| s.rolled_out);

    let available = if all_ready {
        (
            "True",
            "AllReplicasReady",
            format!("all pods ready: {counts}"),
        )
    } else if let Some(reason) = &observed.invalid_spec {
        ("False", "InvalidSpec", reason.clone())
    } else {
        (
            "False",
            "ReplicasNotReady",
            format!("waiting for pods: {counts}"),
        )
    };
    let progressing = if observed.invalid_spec.is_some() {
        (
            "False",
            "InvalidSpec",
            "the spec cannot be rolled out; see Degraded".to_string(),
        )
    } else if rolled_out {
        (
            "False",
            "RolloutComplete",
            format!("every workload runs the latest template: {counts}"),
        )
    } else {
        ("True", "RollingOut", format!("rolling out: {counts}"))
    };
    let degraded = if let Some(reason) = &observed.invalid_spec {
        ("True", "InvalidSpec", reason.clone())
    } else if !observed.failures.is_empty() {
        let message = observed
            .failures
            .iter()
            .map(|(pod, message)| format!("{pod}: {message}"))
            .collect::<Vec<_>>()
            .join("; ");
        (
            "True",
            "WorkerFailed",
            truncate(&message, MAX_FAILURE_MESSAGE),
        )
    } else {
        ("False", "AsExpected", "no worker failures".to_string())
    };

    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let condition = |type_: &str, (status, reason, message): (&str, &str, String)| {
        let last = previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: last.unwrap_or(Time(now)),
        }
    };

    let phase = if degraded.0 == "True" {
        Phase::Degraded
    } else if available.0 == "True" && rolled_out {
        Phase::Available
    } else {
        Phase::Progressing
    };

    DeepSeekDeploymentStatus {
        observed_generation: generation,
        phase,
        conditions: vec![
            condition(AVAILABLE, available),
            condition(PROGRESSING, progressing),
            condition(DEGRADED, degraded),
        ],
        attention_replicas: observed.attention.desired,
        attention_ready: observed.attention.ready,
        attention_summary: observed.attention.summary(),
        attention_selector: builders::selector_string(&name, Role::Attention),
        experts_desired: observed.experts.desired,
        experts_ready: observed.experts.ready,
        experts_summary: observed.experts.summary(),
        router_desired: observed.router.desired,
        router_ready: observed.router.ready,
        placement_version: placement_version(dsd, observed.placement_version),
        endpoint: builders::endpoint(dsd),
        config_hash: observed.config_hash.clone(),
    }
}

/// The expert placement version in force while there are expert shards (none without): the
/// one a rebalancer published (`observed`), else 1, the initial table every process derives
/// from (experts, shards, redundant slots).
pub fn placement_version(dsd: &DeepSeekDeployment, observed: Option<u64>) -> Option<i64> {
    (dsd.spec.experts.shards > 0).then(|| observed.and_then(|v| i64::try_from(v).ok()).unwrap_or(1))
}

/// The conditions whose status changed from `previous` to `next`, as `(type, status, reason,
/// message)`: each becomes one Event.
pub fn transitions<'a>(
    previous: Option<&DeepSeekDeploymentStatus>,
    next: &'a DeepSeekDeploymentStatus,
) -> Vec<&'a Condition> {
    next.conditions
        .iter()
        .filter(|c| {
            let before = previous.and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_));
            before.is_none_or(|b| b.status != c.status || b.reason != c.reason)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, PodStatus,
    };

    fn dsd() -> DeepSeekDeployment {
        let mut d: DeepSeekDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "shardseek.io/v1alpha1",
            "kind": "DeepSeekDeployment",
            "metadata": {"name": "v3", "namespace": "llm", "generation": 3, "uid": "u"},
            "spec": {"image": "img", "model": {"servedName": "m", "volume": {"hostPath": {"path": "/m"}}}}
        }))
        .unwrap();
        d.metadata.generation = Some(3);
        d
    }

    fn ready(desired: i32) -> RoleState {
        RoleState {
            desired,
            ready: desired,
            rolled_out: true,
        }
    }

    fn find<'a>(s: &'a DeepSeekDeploymentStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn all_ready_is_available() {
        let observed = Observed {
            attention: ready(2),
            experts: ready(4),
            router: ready(1),
            ..Observed::default()
        };
        let s = compute(&dsd(), &observed, None, Timestamp::UNIX_EPOCH);
        assert_eq!(s.phase, Phase::Available);
        assert_eq!(find(&s, AVAILABLE).status, "True");
        assert_eq!(find(&s, PROGRESSING).status, "False");
        assert_eq!(find(&s, DEGRADED).status, "False");
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(find(&s, AVAILABLE).observed_generation, Some(3));
        assert_eq!(s.experts_summary, "4/4");
    }

    #[test]
    fn placement_version_is_the_initial_one_with_shards_and_none_without() {
        let mut d = dsd();
        d.spec.experts.shards = 4;
        let s = compute(&d, &Observed::default(), None, Timestamp::UNIX_EPOCH);
        assert_eq!(s.placement_version, Some(1));
        let rebalanced = Observed {
            placement_version: Some(7),
            ..Observed::default()
        };
        let s = compute(&d, &rebalanced, None, Timestamp::UNIX_EPOCH);
        assert_eq!(s.placement_version, Some(7));
        d.spec.experts.shards = 0;
        let s = compute(&d, &Observed::default(), None, Timestamp::UNIX_EPOCH);
        assert_eq!(s.placement_version, None);
    }

    #[test]
    fn short_role_is_progressing_with_counts() {
        let observed = Observed {
            attention: ready(2),
            experts: RoleState {
                desired: 4,
                ready: 1,
                rolled_out: false,
            },
            router: ready(1),
            ..Observed::default()
        };
        let s = compute(&dsd(), &observed, None, Timestamp::UNIX_EPOCH);
        assert_eq!(s.phase, Phase::Progressing);
        assert_eq!(find(&s, AVAILABLE).status, "False");
        assert!(find(&s, AVAILABLE).message.contains("experts 1/4"));
        assert_eq!(find(&s, PROGRESSING).status, "True");
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let observed = Observed {
            attention: ready(1),
            experts: ready(1),
            router: ready(1),
            ..Observed::default()
        };
        let first = compute(&dsd(), &observed, None, Timestamp::UNIX_EPOCH);
        let later = Timestamp::from_second(1_000).unwrap();
        let second = compute(&dsd(), &observed, Some(&first), later);
        assert_eq!(first, second);
        assert!(transitions(Some(&first), &second).is_empty());
        let mut failing = observed.clone();
        failing
            .failures
            .push(("v3-experts-0".into(), "boom".into()));
        let third = compute(&dsd(), &failing, Some(&second), later);
        assert_eq!(find(&third, DEGRADED).last_transition_time, Time(later));
        assert_eq!(
            find(&third, AVAILABLE).last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
        let changed: Vec<_> = transitions(Some(&second), &third)
            .iter()
            .map(|c| c.type_.clone())
            .collect();
        assert_eq!(changed, vec![DEGRADED.to_string()]);
    }

    #[test]
    fn termination_message_becomes_degraded_message() {
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("v3-experts-1".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "experts".into(),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("CrashLoopBackOff".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    last_state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            message: Some("model config: unsupported key `topk_method`\n".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let failures = pod_failures(&[pod]);
        assert_eq!(
            failures,
            vec![(
                "v3-experts-1".to_string(),
                "model config: unsupported key `topk_method`".to_string()
            )]
        );
        let observed = Observed {
            attention: ready(1),
            experts: ready(1),
            router: ready(1),
            failures,
            ..Observed::default()
        };
        let s = compute(&dsd(), &observed, None, Timestamp::UNIX_EPOCH);
        assert_eq!(s.phase, Phase::Degraded);
        let degraded = find(&s, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "WorkerFailed")
        );
        assert!(
            degraded
                .message
                .contains("v3-experts-1: model config: unsupported key `topk_method`")
        );
    }

    #[test]
    fn running_pod_after_restart_is_not_a_failure() {
        let pod = Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    state: Some(ContainerState {
                        running: Some(Default::default()),
                        ..Default::default()
                    }),
                    last_state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(pod_failures(&[pod]).is_empty());
    }
}
