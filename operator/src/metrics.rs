//! The operator's own metrics and its `/metrics`, `/health`, `/ready` endpoints (STYLE.md rule
//! 6; shaped after kube-rs/controller-rs `src/metrics.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::{Error, Result};

/// The operator's metrics, registered in their own registry (names in
/// [`crate::metrics_catalog`]).
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciliations run.
    pub reconciliations: IntCounter,
    /// Reconciliations that failed, by error kind.
    pub errors: IntCounterVec,
    /// Duration of reconciliations.
    pub duration: Histogram,
    /// 1 while this replica leads.
    pub leader: IntGauge,
    /// Rebalance rounds, by outcome (`published`, `unchanged`, `no_load`, `failed`).
    pub rebalances: IntCounterVec,
    /// Rebalancers running (one per `DeepSeekDeployment` that sets an interval).
    pub rebalancers: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let reconciliations = IntCounter::new(
            "shardseek_operator_reconciliations_total",
            "Reconciliations run.",
        )
        .map_err(Error::Metrics)?;
        let errors = IntCounterVec::new(
            Opts::new(
                "shardseek_operator_reconcile_errors_total",
                "Reconciliations that failed.",
            ),
            &["error"],
        )
        .map_err(Error::Metrics)?;
        // Reconciles are a handful of API calls: milliseconds normally, seconds when the API
        // server is slow.
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "shardseek_operator_reconcile_duration_seconds",
                "Duration of one reconciliation.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .map_err(Error::Metrics)?;
        let leader = IntGauge::new(
            "shardseek_operator_leader",
            "1 while this replica holds the leader Lease.",
        )
        .map_err(Error::Metrics)?;
        registry
            .register(Box::new(reconciliations.clone()))
            .map_err(Error::Metrics)?;
        registry
            .register(Box::new(errors.clone()))
            .map_err(Error::Metrics)?;
        registry
            .register(Box::new(duration.clone()))
            .map_err(Error::Metrics)?;
        let rebalances = IntCounterVec::new(
            Opts::new(
                "shardseek_operator_rebalances_total",
                "Expert rebalance rounds run for DeepSeekDeployments.",
            ),
            &["outcome"],
        )
        .map_err(Error::Metrics)?;
        let rebalancers = IntGauge::new(
            "shardseek_operator_rebalancers",
            "DeepSeekDeployments whose expert placement this replica rebalances now.",
        )
        .map_err(Error::Metrics)?;
        registry
            .register(Box::new(leader.clone()))
            .map_err(Error::Metrics)?;
        registry
            .register(Box::new(rebalances.clone()))
            .map_err(Error::Metrics)?;
        registry
            .register(Box::new(rebalancers.clone()))
            .map_err(Error::Metrics)?;
        Ok(Self {
            registry,
            reconciliations,
            errors,
            duration,
            leader,
            rebalances,
            rebalancers,
        })
    }

    /// Counts a reconciliation and returns a guard that records its duration when dropped, so
    /// that every exit path (including `?`) is measured.
    pub fn start_reconcile(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        ReconcileTimer {
            histogram: &self.duration,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconciliation.
    pub fn record_error(&self, error: &Error) {
        self.errors.with_label_values(&[error.metric_label()]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String> {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .map_err(Error::Metrics)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

/// Records a reconciliation's duration on drop.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Readiness shared between the controller and the HTTP server: ready once the process has its
/// client and runs the controller or campaigns for the Lease (standbys are ready, so rollouts
/// of the operator's Deployment progress). Liveness is the server answering.
#[derive(Clone, Debug, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Sets readiness.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Current readiness.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Health,
}

/// The HTTP routes: `/metrics`, `/health`, `/ready`.
pub fn router(metrics: Arc<Metrics>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(state): State<AppState>) -> (StatusCode, String) {
    match state.metrics.encode() {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn ready_handler(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Serves the routes on `listener` until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
) -> Result<()> {
    axum::serve(listener, router(metrics, health))
        .await
        .map_err(|source| Error::Io {
            op: "serving metrics",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_matches_the_catalog() {
        let metrics = Metrics::new().unwrap();
        metrics.errors.with_label_values(&["kube"]).inc();
        metrics.rebalances.with_label_values(&["published"]).inc();
        let mut registered: Vec<String> = metrics
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        registered.sort();
        let mut catalog: Vec<String> = crate::metrics_catalog::METRICS
            .iter()
            .filter(|m| m.component == crate::metrics_catalog::Component::Operator)
            .map(|m| m.name.to_string())
            .collect();
        catalog.sort();
        assert_eq!(registered, catalog);
    }

    #[test]
    fn timer_observes_on_drop() {
        let metrics = Metrics::new().unwrap();
        drop(metrics.start_reconcile());
        assert_eq!(metrics.duration.get_sample_count(), 1);
        assert_eq!(metrics.reconciliations.get(), 1);
        assert!(
            metrics
                .encode()
                .unwrap()
                .contains("shardseek_operator_reconcile_duration_seconds_bucket")
        );
    }
}
