//! `shardseek up`: the whole cluster as local processes on 127.0.0.1 — expert shards, then
//! attention pods pointed at them, then the router — under one [`Supervisor`]. A child that
//! dies is restarted on the same address with backoff while the rest keep serving (as a kubelet
//! restarts a pod's container); Ctrl-C, SIGTERM, or the death of `up` itself stops every child.
//! The supervisor's own metrics (restarts per child) are served on a `/metrics` of their own.
//!
//! With [`UpConfig::rebalance`] the supervisor process also runs the online EPLB
//! [`Rebalancer`](crate::rebalancer::Rebalancer) over the shards and pods it started; every
//! worker is given the placement file the rebalancer keeps (`--placement-file`), so a restarted
//! one comes back on the table in force. `POST /rebalance` on the metrics port runs one round at
//! once and answers its figures as JSON.

use crate::eplb::EplbShape;
use crate::placement::Placement;
use crate::rebalancer::{Rebalancer, RebalancerConfig, RebalancerHandle};
use crate::supervisor::{ChildSpec, Restart, StopReason, Supervisor, SupervisorConfig};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Online rebalancing of a local cluster.
#[derive(Clone, Debug)]
pub struct RebalanceSettings {
    /// Time between rounds.
    pub interval: Duration,
    /// The model's routed experts (`n_routed_experts`).
    pub experts: usize,
    /// The model's expert groups (`n_group`), the unit of hierarchical placement.
    pub groups: usize,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// The `shardseek` binary to run for every child (normally the current executable).
    pub program: PathBuf,
    pub model: PathBuf,
    pub attention: usize,
    /// 0 keeps the routed experts inside the attention pods.
    pub expert_shards: usize,
    /// Redundant expert slots over all shards (a multiple of `expert_shards`): replicas that
    /// serve a dead shard's experts and spread hot experts' load.
    pub redundant_experts: usize,
    /// The router's public port (0 picks one).
    pub port: u16,
    /// Extra arguments for every attention pod (limits, dispatch dtype, ...).
    pub attention_args: Vec<String>,
    /// Extra arguments for every expert shard.
    pub expert_args: Vec<String>,
    /// Extra arguments for the router (API options).
    pub router_args: Vec<String>,
    /// More environment for the router alone (secrets such as `SHARDSEEK_API_KEY`, kept off
    /// command lines that `ps` shows).
    pub router_env: Vec<(String, String)>,
    pub served_model_name: String,
    /// Environment variables of every child (for example the log format).
    pub env: Vec<(String, String)>,
    /// Online EPLB; `None` keeps the initial placement.
    pub rebalance: Option<RebalanceSettings>,
}

/// A port that was free a moment ago: children are given explicit ports so the attention pods
/// can be told their shards' addresses before the shards exist.
///
/// The port is taken below the kernel's ephemeral range, not from it (which is what binding port
/// 0 hands out): the child binds it only later, and in between any outgoing connection on the
/// machine (a gRPC client of another cluster, an HTTP request) may be given the same port as its
/// local end, and the child's bind then fails with "address in use". Ports below the range are
/// never handed out that way. Each is picked at random, checked by binding it, and never given
/// to two children of this process; binding port 0 is the fallback.
fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Mutex;
    static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    const FLOOR: u16 = 10_000;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > FLOOR + 1000 {
        let span = u64::from(low - FLOOR);
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..256u64 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(attempt);
            h.write_u32(std::process::id());
            let port = FLOOR + (h.finish() % span) as u16;
            if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                taken.push(port);
                return Ok(port);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
        op: "finding a free port".into(),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            op: "finding a free port".into(),
            source,
        })
}

/// A started local cluster.
pub struct LocalCluster {
    pub supervisor: Supervisor,
    /// The router's address (`127.0.0.1:PORT`): HTTP (OpenAI API) and gRPC on one port.
    pub addr: String,
    /// Where the supervisor's `/metrics` is served (`127.0.0.1:PORT`).
    pub metrics_addr: String,
    metrics_task: tokio::task::JoinHandle<()>,
    rebalancer: Option<Arc<RebalancerHandle>>,
    /// The folder of the placement file, removed when the cluster stops.
    placement_dir: Option<PathBuf>,
}

impl LocalCluster {
    /// Starts every process and waits until each is ready.
    pub async fn start(cfg: &UpConfig) -> Result<Self> {
        if cfg.attention == 0 {
            return Err(Error::Input("--attention must be at least 1".into()));
        }
        if cfg.redundant_experts > 0
            && (cfg.expert_shards < 2 || !cfg.redundant_experts.is_multiple_of(cfg.expert_shards))
        {
            return Err(Error::Input(format!(
                "--redundant-experts {} needs at least 2 expert shards and must be a multiple of \
                 --expert-shards {}",
                cfg.redundant_experts, cfg.expert_shards
            )));
        }
        let slots_per_shard = (cfg.redundant_experts / cfg.expert_shards.max(1)).to_string();
        // Online EPLB: check the shape before anything starts, and give every worker the file
        // the table in force is kept in.
        let mut placement_dir = None;
        let mut placement_args: Vec<String> = Vec::new();
        if let Some(r) = &cfg.rebalance {
            if cfg.expert_shards == 0 {
                return Err(Error::Input(
                    "--rebalance-interval needs expert shards (--expert-shards 1 or more)".into(),
                ));
            }
            if r.interval.is_zero() {
                return Err(Error::Input(
                    "--rebalance-interval must be at least 1 second".into(),
                ));
            }
            Rebalancer::check_shape(rebalance_shape(cfg, r), r.experts)
                .map_err(|e| Error::Input(format!("--rebalance-interval: {e}")))?;
            let dir = std::env::temp_dir().join(format!("shardseek-up-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                op: format!("creating {}", dir.display()),
                source,
            })?;
            let file = dir.join("placement.json");
            // A file left by an earlier `up` with this pid would be stale.
            let _ = std::fs::remove_file(&file);
            placement_args = vec![
                "--placement-file".into(),
                file.to_string_lossy().to_string(),
            ];
            placement_dir = Some(dir);
        }
        let prog = cfg.program.to_string_lossy().to_string();
        let model = cfg.model.to_string_lossy().to_string();
        let mut specs = Vec::new();
        let mut shard_addrs = Vec::new();
        for i in 0..cfg.expert_shards {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let mut args: Vec<String> = [
                "worker",
                "--role",
                "expert",
                "--model",
                &model,
                "--listen",
                &addr,
                "--shard",
                &i.to_string(),
                "--shards",
                &cfg.expert_shards.to_string(),
                "--redundant-slots",
                &slots_per_shard,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(cfg.expert_args.iter().cloned());
            args.extend(placement_args.iter().cloned());
            specs.push(ChildSpec {
                name: format!("expert-{i}"),
                program: prog.clone(),
                args,
                env: cfg.env.clone(),
                wait_ready: true,
                restart: Restart::Always,
            });
            shard_addrs.push(addr);
        }
        let mut pod_addrs = Vec::new();
        for i in 0..cfg.attention {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let mut args: Vec<String> = [
                "worker",
                "--role",
                "attention",
                "--model",
                &model,
                "--listen",
                &addr,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if !shard_addrs.is_empty() {
                args.push("--experts".into());
                args.push(shard_addrs.join(","));
                args.push("--redundant-slots".into());
                args.push(slots_per_shard.clone());
            }
            args.extend(cfg.attention_args.iter().cloned());
            if !shard_addrs.is_empty() {
                args.extend(placement_args.iter().cloned());
            }
            specs.push(ChildSpec {
                name: format!("attention-{i}"),
                program: prog.clone(),
                args,
                env: cfg.env.clone(),
                wait_ready: true,
                restart: Restart::Always,
            });
            pod_addrs.push(addr);
        }
        let port = if cfg.port == 0 {
            free_port()?
        } else {
            cfg.port
        };
        let addr = format!("127.0.0.1:{port}");
        let args: Vec<String> = [
            "router",
            "--listen",
            &addr,
            "--attention",
            &pod_addrs.join(","),
            "--model",
            &model,
            "--served-model-name",
            &cfg.served_model_name,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(cfg.router_args.iter().cloned())
        .collect();
        specs.push(ChildSpec {
            name: "router".into(),
            program: prog.clone(),
            args,
            env: cfg.env.iter().chain(&cfg.router_env).cloned().collect(),
            wait_ready: true,
            restart: Restart::Always,
        });
        let supervisor = Supervisor::start(specs, SupervisorConfig::default()).await?;
        let rebalancer = match (&cfg.rebalance, &placement_dir) {
            (Some(r), Some(dir)) => {
                let initial = Placement::initial(
                    r.experts,
                    cfg.expert_shards,
                    cfg.redundant_experts / cfg.expert_shards,
                )?;
                let config = RebalancerConfig {
                    shards: shard_addrs.clone(),
                    attention: pod_addrs.clone(),
                    shape: rebalance_shape(cfg, r),
                    interval: r.interval,
                    store: Some(Arc::new(crate::rebalancer::FileStore {
                        path: dir.join("placement.json"),
                    })),
                };
                let rb = Rebalancer::new(
                    config,
                    crate::placement::KeptTable::settled(initial),
                    &supervisor.registry(),
                )?;
                Some(Arc::new(RebalancerHandle::spawn(rb)))
            }
            _ => None,
        };
        let io = |source| Error::Io {
            op: "serving the supervisor's /metrics".into(),
            source,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io)?;
        let metrics_addr = listener.local_addr().map_err(io)?.to_string();
        let registry = supervisor.registry();
        let mut app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    // Encoding counters into a String cannot fail.
                    let _ =
                        prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text);
                    text
                }
            }),
        );
        if let Some(rb) = &rebalancer {
            let rb = Arc::clone(rb);
            app = app.route(
                "/rebalance",
                axum::routing::post(move || {
                    let rb = Arc::clone(&rb);
                    async move {
                        match rb.rebalance_now().await {
                            Ok(report) => (
                                http::StatusCode::OK,
                                serde_json::to_string(&report).unwrap_or_default(),
                            ),
                            Err(e) => (
                                http::StatusCode::SERVICE_UNAVAILABLE,
                                serde_json::json!({ "error": e }).to_string(),
                            ),
                        }
                    }
                }),
            );
        }
        let metrics_task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            supervisor,
            addr,
            metrics_addr,
            metrics_task,
            rebalancer,
            placement_dir,
        })
    }

    /// Stops every child now (and removes the placement file).
    pub async fn stop(self) {
        let LocalCluster {
            mut supervisor,
            metrics_task,
            rebalancer,
            placement_dir,
            ..
        } = self;
        drop(rebalancer);
        supervisor.stop().await;
        metrics_task.abort();
        if let Some(dir) = placement_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Serves until a signal (restarting children that die), then stops every child.
    pub async fn run(self) -> Result<StopReason> {
        let LocalCluster {
            supervisor,
            metrics_task,
            rebalancer,
            placement_dir,
            ..
        } = self;
        let reason = supervisor.run().await;
        metrics_task.abort();
        drop(rebalancer);
        if let Some(dir) = placement_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        reason
    }
}

/// The EPLB shape of a local cluster: every shard on one node (flat, DeepSeek's global policy).
fn rebalance_shape(cfg: &UpConfig, r: &RebalanceSettings) -> EplbShape {
    EplbShape {
        shards: cfg.expert_shards,
        redundant: cfg.redundant_experts,
        groups: r.groups,
        nodes: 1,
    }
}
