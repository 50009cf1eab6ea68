//! Process entry points of the worker roles: load, bind, serve gRPC and HTTP (`/metrics`,
//! `/health`, `/ready`) on one port, announce readiness, stop on the shutdown signal.

use crate::attention::AttentionService;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::expert::{ExpertServer, ExpertServerConfig};
use crate::experts::LocalExperts;
use crate::metrics::WorkerMetrics;
use crate::model::{ExpertSelection, Model, Overlap};
use crate::placement_control::PodControl;
use crate::remote::{RemoteExperts, ShardCompute};
use crate::weights::Store;
use axum::routing::get;
use shardseek_proto::v1::attention_server::AttentionServer;
use shardseek_proto::v1::placement_server::PlacementServer;
use shardseek_router::transport::grpc::{GrpcConfig, GrpcTransport};
use shardseek_router::{DispatchConfig, Dispatcher, KeptTable, Placement, WireDtype};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest gRPC message a worker accepts or sends: a 256-token prefill chunk of 7168-wide f32
/// rows is 7.3 MB; the dispatch client splits anything larger.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;

/// Configuration of an attention pod.
#[derive(Clone, Debug)]
pub struct AttentionConfig {
    pub model: PathBuf,
    pub listen: SocketAddr,
    pub engine: EngineConfig,
    pub overlap: Overlap,
    /// Expert shard addresses (`host:port`, shard id = position); empty keeps the routed
    /// experts in this process.
    pub experts: Vec<String>,
    /// Redundant expert slots per shard (must match the shards' setting).
    pub redundant_slots: usize,
    /// How long tokens whose experts have no live copy wait for their shard's restart
    /// ([`DispatchConfig::failover_wait`]); `None` takes [`default_failover_wait`].
    pub failover_wait: Option<std::time::Duration>,
    pub wire_dtype: WireDtype,
    /// Also serve `/metrics`, `/health`, `/ready` here (Kubernetes probes and scraping use a
    /// port of their own, so they never queue behind the data path).
    pub metrics_listen: Option<SocketAddr>,
    /// The placement table in force, kept by a rebalancer; when the file exists the pod starts
    /// on it instead of the initial table.
    pub placement_file: Option<PathBuf>,
    /// Where the pod computes (its model and, without shards, its routed experts).
    pub device: crate::backend::Device,
    /// The output projection's dtype (`--lm-head-dtype`).
    pub lm_head_dtype: crate::model::LmHeadDtype,
    /// How the pod's GEMMs multiply activations (`--activation-dtype`).
    pub activations: shardseek_kernels::gemm::Activations,
}

/// Configuration of an expert shard.
#[derive(Clone, Debug)]
pub struct ExpertRoleConfig {
    pub model: PathBuf,
    pub listen: SocketAddr,
    pub shard: usize,
    pub shards: usize,
    pub redundant_slots: usize,
    /// How long the shard waits to batch requests of the same layer from several pods.
    pub batch_window: std::time::Duration,
    /// Where `/metrics`, `/health`, `/ready` are served (default: an ephemeral port, printed).
    pub metrics_listen: Option<SocketAddr>,
    /// The placement table in force, kept by a rebalancer; when the file exists the shard
    /// starts on it (its version and experts) instead of the initial table.
    pub placement_file: Option<PathBuf>,
    /// Where the shard computes its experts.
    pub device: crate::backend::Device,
    /// How the shard's expert GEMMs multiply activations (`--activation-dtype`).
    pub activations: shardseek_kernels::gemm::Activations,
}

/// The hold of tokens whose experts lost every live copy, unless configured: 5 s when the
/// deployment reserves redundant slots — it asked for fault tolerance, and a restarted shard
/// rejoins well within that (`up` restarts it after 200 ms, the pod's prober reconnects within
/// another 200 ms) — and none without, so a cluster without spare copies fails the affected
/// requests at once instead of stalling every stream for a restart.
pub fn default_failover_wait(redundant_slots: usize) -> std::time::Duration {
    if redundant_slots > 0 {
        std::time::Duration::from_secs(5)
    } else {
        std::time::Duration::ZERO
    }
}

/// The table a process starts on: the rebalancer's record when there is one (with the table a
/// publication under way switches from), else the initial table every process derives alike.
fn starting_placement(
    file: Option<&std::path::Path>,
    experts: usize,
    shards: usize,
    redundant_slots: usize,
) -> Result<KeptTable> {
    let from_file = match file {
        Some(path) => KeptTable::read_file(path)
            .map_err(|e| Error::Input(format!("--placement-file: {e}")))?,
        None => None,
    };
    match from_file {
        Some(k) if k.current.shards() == shards && k.current.n_experts() == experts => {
            tracing::info!(
                version = k.current.version(),
                switching_from = k.previous.as_ref().map(Placement::version),
                "starting on the kept placement table (--placement-file)"
            );
            Ok(k)
        }
        Some(k) => Err(Error::Input(format!(
            "--placement-file: a table of {} experts on {} shards, this cluster has {experts} on {shards}",
            k.current.n_experts(),
            k.current.shards()
        ))),
        None => Placement::initial(experts, shards, redundant_slots)
            .map(KeptTable::settled)
            .map_err(|e| Error::Input(format!("placement: {e}"))),
    }
}

/// The versions shard `shard` accepts when it starts on `kept`, each with its experts in that
/// version's table: the table in force, and while a publication is under way the one it
/// switches from too (pods that have not switched yet still route with it). The shard holds
/// the union.
pub fn shard_start_versions(kept: &KeptTable, shard: usize) -> Vec<(u64, Vec<usize>)> {
    let mut out: Vec<(u64, Vec<usize>)> = kept
        .previous
        .iter()
        .map(|p| (p.version(), p.experts_of(shard)))
        .collect();
    out.push((kept.current.version(), kept.current.experts_of(shard)));
    out
}

/// Runs an expert shard until `shutdown`: loads only the experts placement gives it and serves
/// `shardseek.v1.Expert`. Prints `READY <addr>` on stdout once it serves.
pub async fn run_expert(
    cfg: ExpertRoleConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // Per-layer row buffers reuse the heap instead of fresh mmaps (see tune_allocator).
    crate::expert::tune_allocator();
    let mcfg = ModelConfig::from_dir(&cfg.model)?;
    if cfg.shards == 0 || cfg.shard >= cfg.shards {
        return Err(Error::Input(format!(
            "--shard {} must be below --shards {}",
            cfg.shard, cfg.shards
        )));
    }
    let placement = starting_placement(
        cfg.placement_file.as_deref(),
        mcfg.n_routed_experts,
        cfg.shards,
        cfg.redundant_slots,
    )?;
    let versions = shard_start_versions(&placement, cfg.shard);
    let mut held: Vec<usize> = versions.iter().flat_map(|v| v.1.iter().copied()).collect();
    held.sort_unstable();
    held.dedup();
    let store = Store::open(&cfg.model)?;
    let backend = crate::backend::for_device(cfg.device, cfg.activations)?;
    let experts = LocalExperts::load_on(&mcfg, store.clone(), &held, backend)?;
    tracing::info!(
        shard = cfg.shard,
        experts = held.len(),
        bytes = experts.stored_bytes(),
        "expert shard loaded"
    );
    let fingerprint = shardseek_proto::fingerprint_from_model_dir(&cfg.model)
        .map_err(|e| Error::Input(format!("fingerprint of {}: {e}", cfg.model.display())))?;
    let metrics = Arc::new(WorkerMetrics::new());
    let mut scfg = ExpertServerConfig::new(cfg.shard, cfg.shards, fingerprint);
    scfg.addr = cfg.listen;
    scfg.placement_version = placement.current.version();
    scfg.accepted = versions;
    scfg.batch_window = cfg.batch_window;
    let compute = ShardCompute::new(experts, mcfg.clone(), store, metrics.clone());
    let server = ExpertServer::start(Arc::new(compute), scfg)
        .await
        .map_err(|e| Error::Input(format!("expert server: {e}")))?;
    // Metrics of the shard on a second, HTTP-only listener next to the gRPC port (port + 1000
    // would collide on shared machines; an ephemeral port announced on stdout is simpler).
    let http = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render(None) }
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(|| async { "ready" }));
    let mlisten = cfg
        .metrics_listen
        .unwrap_or_else(|| SocketAddr::new(cfg.listen.ip(), 0));
    let listener = tokio::net::TcpListener::bind(mlisten)
        .await
        .map_err(|e| io_err("bind metrics", e))?;
    let maddr = listener.local_addr().map_err(|e| io_err("local_addr", e))?;
    println!("METRICS {maddr}");
    println!("READY {}", server.local_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        let _ = axum::serve(listener, http)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await;
    });
    shutdown.await;
    let _ = stop_tx.send(());
    let _ = http_task.await;
    server
        .shutdown()
        .await
        .map_err(|e| Error::Input(format!("expert server: {e}")))?;
    Ok(())
}

/// A probe's answer: 200 with `ok` while the engine runs, 503 once its thread is gone.
fn engine_probe(alive: bool, ok: &'static str) -> (axum::http::StatusCode, &'static str) {
    if alive {
        (axum::http::StatusCode::OK, ok)
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the engine thread has stopped",
        )
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Io {
        path: PathBuf::from(what),
        source: e,
    }
}

/// Runs an attention pod with its routed experts in process (no shards) until `shutdown`.
/// Prints `READY <addr>` on stdout once it serves.
pub async fn run_attention(
    cfg: AttentionConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // The forward pass's multi-megabyte buffers (a prefill chunk's activations, the kernels'
    // per-operation buffers, the dispatch client's per-layer rows) would otherwise come fresh
    // from mmap at every step and layer, paying a page fault and a zero-fill per 4 KiB (page
    // faults, zero-fills and unmaps were ~5% of the pod's perf samples in a 32-request run). As
    // on the shards (see tune_allocator).
    crate::expert::tune_allocator();
    let model_dir = cfg.model.clone();
    let sel = if cfg.experts.is_empty() {
        ExpertSelection::All
    } else {
        ExpertSelection::Remote
    };
    let (device, lm_head, act) = (cfg.device, cfg.lm_head_dtype, cfg.activations);
    let mut model = tokio::task::spawn_blocking(move || {
        let mut m = Model::load_on(&model_dir, sel, crate::backend::for_device(device, act)?)?;
        lm_head.apply(&mut m)?;
        Ok::<_, Error>(m)
    })
    .await
    .map_err(|e| Error::Input(format!("model loading task failed: {e}")))??;
    model.set_overlap(cfg.overlap.clone());
    let metrics = Arc::new(WorkerMetrics::new());
    let mut control = None;
    if !cfg.experts.is_empty() {
        let fingerprint = shardseek_proto::fingerprint_from_model_dir(&cfg.model)
            .map_err(|e| Error::Input(format!("fingerprint of {}: {e}", cfg.model.display())))?;
        let placement = starting_placement(
            cfg.placement_file.as_deref(),
            model.cfg.n_routed_experts,
            cfg.experts.len(),
            cfg.redundant_slots,
        )?;
        let transport = Arc::new(GrpcTransport::new(
            cfg.experts.clone(),
            fingerprint,
            GrpcConfig::default(),
        ));
        // Fail loudly at start when a shard is for another model or shard count.
        transport
            .connect_all()
            .await
            .map_err(|e| Error::Input(format!("connecting to expert shards: {e}")))?;
        // A shard that dies is masked; this brings it back once it serves again. The task ends
        // when the transport is dropped.
        transport.spawn_rejoin(shardseek_router::transport::grpc::DEFAULT_RECONNECT_BACKOFF);
        // A pod routes with the table in force; shards accept it (and, while a publication is
        // under way, the one it switches from).
        let dispatcher = Dispatcher::new(
            transport,
            placement.current,
            model.cfg.hidden_size,
            DispatchConfig {
                wire_dtype: cfg.wire_dtype,
                failover_wait: cfg
                    .failover_wait
                    .unwrap_or_else(|| default_failover_wait(cfg.redundant_slots)),
                ..DispatchConfig::default()
            },
        )
        .map_err(|e| Error::Input(format!("dispatch: {e}")))?;
        let dispatcher = Arc::new(dispatcher);
        control = Some(PlacementServer::new(PodControl::new(
            Arc::clone(&dispatcher),
            model.cfg.n_group,
        )));
        let top_k = model.cfg.num_experts_per_tok;
        model.set_experts(Arc::new(RemoteExperts::new(
            dispatcher,
            tokio::runtime::Handle::current(),
            metrics.clone(),
            top_k,
        )));
    }
    serve_attention(Arc::new(model), metrics, cfg, control, shutdown).await
}

/// Serves an already-loaded model (its experts local or behind a dispatch client, whose
/// placement `control` service is served beside the `Attention` service).
pub async fn serve_attention(
    model: Arc<Model>,
    metrics: Arc<WorkerMetrics>,
    cfg: AttentionConfig,
    control: Option<PlacementServer<PodControl>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let fingerprint = shardseek_proto::fingerprint_from_model_dir(&cfg.model)
        .map_err(|e| Error::Input(format!("fingerprint of {}: {e}", cfg.model.display())))?;
    // Structured output needs the token bytes; a checkpoint without tokenizer.json serves
    // everything else and refuses constraints.
    let tok_path = cfg.model.join("tokenizer.json");
    let grammar = if tok_path.exists() {
        let (vocab, eos) = (model.cfg.vocab_size, model.cfg.eos_token_ids.clone());
        let compiler = tokio::task::spawn_blocking(move || {
            crate::engine::grammar::GrammarCompiler::from_tokenizer_file(&tok_path, vocab, &eos)
        })
        .await
        .map_err(|e| Error::Input(format!("grammar setup task failed: {e}")))??;
        Some(Arc::new(compiler))
    } else {
        None
    };
    let engine = Engine::start_with_grammar(model, cfg.engine.clone(), grammar);
    let svc = AttentionServer::new(AttentionService::new(engine.clone(), fingerprint))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let mut routes = tonic::service::Routes::new(svc);
    if let Some(control) = control {
        routes = routes.add_service(control);
    }
    let grpc = routes.into_axum_router();
    let (m, e) = (metrics.clone(), engine.clone());
    // Probes (the pod's startup, liveness and readiness): nothing listens until the weights
    // are loaded and the shards connected, so the startup probe covers loading; after that
    // both answer 503 once the engine's thread is gone (stopped or panicked), so the kubelet
    // restarts the pod instead of leaving it serving errors.
    let (alive, ready) = (engine.clone(), engine.clone());
    let http = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (m, e) = (m.clone(), e.clone());
                async move { m.render(Some(&e.stats)) }
            }),
        )
        .route(
            "/health",
            get(move || {
                let alive = alive.is_alive();
                async move { engine_probe(alive, "ok") }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let alive = ready.is_alive();
                async move { engine_probe(alive, "ready") }
            }),
        );
    if let Some(maddr) = cfg.metrics_listen {
        let ml = tokio::net::TcpListener::bind(maddr)
            .await
            .map_err(|e| io_err("bind metrics", e))?;
        let http = http.clone();
        tokio::spawn(async move {
            let _ = axum::serve(ml, http).await;
        });
    }
    let app = grpc.merge(http);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| io_err("bind", e))?;
    let addr = listener.local_addr().map_err(|e| io_err("local_addr", e))?;
    println!("READY {addr}");
    tracing::info!(%addr, "attention pod serving");
    // Each generated token is one small HTTP/2 DATA frame to the router. Without TCP_NODELAY,
    // Nagle's algorithm holds a frame while the previous one is unacknowledged and the router's
    // delayed ACK (40-200 ms) then releases the tokens in bursts.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| io_err("serve", e))?;
    engine.stop();
    Ok(())
}
