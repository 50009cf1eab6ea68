//! Every metric shardseek exports, in one place.
//!
//! The Grafana dashboard in the chart may query only names listed here (a test checks every
//! query), and each component's exporter should register exactly its entries. The worker and
//! router names come from DESIGN.md §7; the operator's own names are registered by
//! [`crate::metrics::Metrics`], and a test checks that the operator's registry and this list
//! agree.

/// The Prometheus type of a metric, which decides which series names a query may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// A monotonically increasing counter (queried through `rate`/`increase`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A histogram: queried as `NAME_bucket`, `NAME_sum`, `NAME_count`.
    Histogram,
}

/// The process that exports a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// The gateway.
    Router,
    /// An attention pod.
    Attention,
    /// An expert shard.
    Expert,
    /// The Kubernetes operator.
    Operator,
}

/// One exported metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricInfo {
    /// The full name, `shardseek_` prefixed.
    pub name: &'static str,
    /// Its type.
    pub kind: MetricKind,
    /// Who exports it.
    pub component: Component,
    /// What it measures.
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: MetricKind,
    component: Component,
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        component,
        help,
    }
}

use Component::{Attention, Expert, Operator, Router};
use MetricKind::{Counter, Gauge, Histogram};

/// Every exported metric.
pub const METRICS: &[MetricInfo] = &[
    metric(
        "shardseek_time_to_first_token_seconds",
        Histogram,
        Router,
        "Time from request arrival to the first generated token.",
    ),
    metric(
        "shardseek_inter_token_latency_seconds",
        Histogram,
        Router,
        "Time between consecutive generated tokens of one request.",
    ),
    metric(
        "shardseek_request_duration_seconds",
        Histogram,
        Router,
        "Time from request arrival to its last token.",
    ),
    metric(
        "shardseek_prompt_tokens_total",
        Counter,
        Router,
        "Prompt tokens processed.",
    ),
    metric(
        "shardseek_generation_tokens_total",
        Counter,
        Router,
        "Tokens generated.",
    ),
    metric(
        "shardseek_requests_running",
        Gauge,
        Attention,
        "Requests in the running batch.",
    ),
    metric(
        "shardseek_requests_waiting",
        Gauge,
        Attention,
        "Requests queued for admission.",
    ),
    metric(
        "shardseek_kv_cache_usage_ratio",
        Gauge,
        Attention,
        "Fraction of KV cache blocks in use.",
    ),
    metric(
        "shardseek_dispatch_duration_seconds",
        Histogram,
        Attention,
        "Time of one MoE layer's dispatch and combine round trip.",
    ),
    metric(
        "shardseek_dispatch_bytes_total",
        Counter,
        Attention,
        "Bytes of token rows sent to and received from expert shards.",
    ),
    metric(
        "shardseek_dispatch_held_tokens_total",
        Counter,
        Attention,
        "Tokens held for a restarting expert shard that had the only copy of one of their experts.",
    ),
    metric(
        "shardseek_expert_tokens_total",
        Counter,
        Expert,
        "Token rows computed per expert, summed over layers (labels: shard, expert).",
    ),
    metric(
        "shardseek_expert_load_imbalance_ratio",
        Gauge,
        Router,
        "Most loaded shard's token rate over the mean shard's.",
    ),
    metric(
        "shardseek_operator_reconciliations_total",
        Counter,
        Operator,
        "Reconciliations run.",
    ),
    metric(
        "shardseek_operator_reconcile_errors_total",
        Counter,
        Operator,
        "Reconciliations that failed (label: error).",
    ),
    metric(
        "shardseek_operator_reconcile_duration_seconds",
        Histogram,
        Operator,
        "Duration of one reconciliation.",
    ),
    metric(
        "shardseek_operator_leader",
        Gauge,
        Operator,
        "1 while this replica holds the leader Lease.",
    ),
    metric(
        "shardseek_operator_rebalances_total",
        Counter,
        Operator,
        "Expert rebalance rounds run for DeepSeekDeployments (label: outcome = published, unchanged, no_load, failed).",
    ),
    metric(
        "shardseek_operator_rebalancers",
        Gauge,
        Operator,
        "DeepSeekDeployments whose expert placement this replica rebalances now.",
    ),
];

/// The catalog entry of `name`, if any.
pub fn find(name: &str) -> Option<&'static MetricInfo> {
    METRICS.iter().find(|m| m.name == name)
}

/// Whether `series` (a name as it appears in a PromQL query) is exported: a listed name, or a
/// histogram's `_bucket`, `_sum` or `_count` series.
pub fn is_exported_series(series: &str) -> bool {
    if find(series).is_some_and(|m| m.kind != Histogram) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        series
            .strip_suffix(suffix)
            .and_then(find)
            .is_some_and(|m| m.kind == Histogram)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut names: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        assert!(METRICS.iter().all(|m| m.name.starts_with("shardseek_")));
    }

    #[test]
    fn histogram_series_follow_the_type() {
        assert!(is_exported_series(
            "shardseek_time_to_first_token_seconds_bucket"
        ));
        assert!(!is_exported_series("shardseek_time_to_first_token_seconds"));
        assert!(is_exported_series("shardseek_requests_running"));
        assert!(!is_exported_series("shardseek_requests_running_bucket"));
        assert!(!is_exported_series("shardseek_made_up_total"));
    }
}
