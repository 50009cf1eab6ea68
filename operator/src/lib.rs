//! shardseek-operator: turns one `DeepSeekDeployment` into a running shardseek cluster.
//!
//! - [`crd`]: the custom resource types, the source of truth for the CRD YAML;
//! - [`builders`]: pure functions from a `DeepSeekDeployment` to the objects it owns;
//! - [`status`]: pure functions from what the owned objects report to status conditions;
//! - [`controller`]: the kube-runtime reconciler (server-side apply, status, Events,
//!   per-object backoff);
//! - [`leader`]: Lease-based leader election so only one replica writes;
//! - [`metrics`]: the operator's own metrics and its `/metrics`, `/health`, `/ready` server;
//! - [`metrics_catalog`]: every metric name shardseek exports, which the dashboard test checks;
//! - [`rebalance`]: online expert rebalancing (EPLB) of the deployments that ask for it;
//! - [`render`]: `shardseek render`, the objects the operator would apply, without a cluster.
//!
//! See `operator/README.md` for installation and what the tests cover.

pub mod builders;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod metrics_catalog;
pub mod rebalance;
pub mod render;
pub mod status;

use std::time::Duration;

pub use controller::{Context, ControllerSettings, run_controller};
pub use crd::{DeepSeekDeployment, DeepSeekDeploymentSpec, DeepSeekDeploymentStatus};

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API call `{op}` failed")]
    Kube {
        /// What the operator was doing, e.g. `apply StatefulSet v3-attention`.
        op: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The object's spec cannot be turned into a cluster (a rule the schema could not enforce).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The object lacks a field the API server always sets (name, namespace, uid).
    #[error("object is missing `{0}`")]
    MissingField(&'static str),
    /// Serialising an object to YAML failed.
    #[error("yaml: {0}")]
    Yaml(#[source] serde_norway::Error),
    /// Serialising an object to JSON failed.
    #[error("json: {0}")]
    Json(#[source] serde_json::Error),
    /// The cluster config rendered from the spec is not valid.
    #[error("cluster config: {0}")]
    ClusterConfig(#[source] shardseek_proto::cluster_config::ClusterConfigError),
    /// Registering or encoding a metric failed.
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    /// Binding or serving the metrics endpoint failed.
    #[error("io while {op}: {source}")]
    Io {
        /// What the operator was doing.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Building the Kubernetes client from kubeconfig or the in-cluster environment failed.
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// This replica lost its leader Lease; it stops so that only one replica writes.
    #[error("lost leadership of lease {0}")]
    LostLease(String),
}

impl Error {
    /// A short label for metrics, without unbounded values.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::MissingField(_) => "missing_field",
            Self::Yaml(_) | Self::Json(_) => "serialize",
            Self::ClusterConfig(_) => "cluster_config",
            Self::Metrics(_) => "metrics",
            Self::Io { .. } => "io",
            Self::Config(_) => "config",
            Self::LostLease(_) => "lost_lease",
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of `shardseek operator` (clap derive; every flag has an environment fallback so the
/// chart can set them through `env:`).
#[derive(Clone, Debug, clap::Args)]
pub struct OperatorArgs {
    /// Address of the `/metrics`, `/health` and `/ready` server.
    #[arg(
        long,
        env = "SHARDSEEK_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_addr: std::net::SocketAddr,
    /// Namespace to watch; all namespaces when unset.
    #[arg(long, env = "SHARDSEEK_OPERATOR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Run without leader election (a single replica, or local development).
    #[arg(long, env = "SHARDSEEK_OPERATOR_DISABLE_LEADER_ELECTION")]
    pub disable_leader_election: bool,
    /// Namespace of the leader Lease (normally the operator's own, from the downward API).
    #[arg(
        long,
        env = "SHARDSEEK_OPERATOR_LEASE_NAMESPACE",
        default_value = "default"
    )]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "SHARDSEEK_OPERATOR_LEASE_NAME",
        default_value = "shardseek-operator"
    )]
    pub lease_name: String,
    /// This replica's identity in the Lease and in Events (normally the pod name).
    #[arg(
        long,
        env = "SHARDSEEK_OPERATOR_POD_NAME",
        default_value = "shardseek-operator"
    )]
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    #[arg(long, env = "SHARDSEEK_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u32,
    /// Re-reconcile every object at least this often, to pick up pod failures that change no
    /// owned object's status.
    #[arg(long, env = "SHARDSEEK_OPERATOR_RESYNC_SECONDS", default_value_t = 60)]
    pub resync_seconds: u64,
}

/// Runs `shardseek operator` to completion on its own tokio runtime: metrics server, leader
/// election, then the controller until SIGTERM/SIGINT or the Lease is lost.
pub fn run(args: OperatorArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            op: "starting the tokio runtime",
            source,
        })?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: OperatorArgs) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| Error::Io {
            op: "binding the metrics address",
            source,
        })?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /health, /ready");
    run_with(args, client, listener, shutdown_signal()).await
}

/// The whole operator on an existing client and metrics listener until `shutdown` resolves:
/// what `shardseek operator` runs, and what the tests run against their fake API server.
pub async fn run_with(
    args: OperatorArgs,
    client: kube::Client,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = std::sync::Arc::new(metrics::Metrics::new()?);
    let health = metrics::Health::default();
    let server = tokio::spawn(metrics::serve(listener, metrics.clone(), health.clone()));

    let settings = ControllerSettings {
        resync: Duration::from_secs(args.resync_seconds),
        reporter_instance: Some(args.identity.clone()),
        ..ControllerSettings::default()
    };
    let ctx = Context::new(client.clone(), metrics.clone(), settings);

    let result = if args.disable_leader_election {
        metrics.leader.set(1);
        health.set_ready(true);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        run_controller(ctx, args.watch_namespace.clone(), leader::stopped(stop_rx)).await;
        Ok(())
    } else {
        let lease = leader::LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &args.identity,
            Duration::from_secs(u64::from(args.lease_seconds)),
        );
        leader::run_while_leader(lease, metrics.clone(), health.clone(), shutdown, {
            let watch_namespace = args.watch_namespace.clone();
            move |stop| run_controller(ctx, watch_namespace, stop)
        })
        .await
    };
    server.abort();
    result
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, only SIGTERM stops the operator.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupted; shutting down"),
        () = term => tracing::info!("SIGTERM; shutting down"),
    }
}
