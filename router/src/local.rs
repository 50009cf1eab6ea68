//! `shardseek up`: the whole cluster as local processes on 127.0.0.1 — expert shards, then
//! attention pods pointed at them, then the router — under one [`Supervisor`], so Ctrl-C,
//! SIGTERM or any child's crash stops every child.

use crate::supervisor::{ChildSpec, StopReason, Supervisor, SupervisorConfig};
use crate::{Error, Result};
use std::path::PathBuf;

/// What to start.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// The `shardseek` binary to run for every child (normally the current executable).
    pub program: PathBuf,
    pub model: PathBuf,
    pub attention: usize,
    /// 0 keeps the routed experts inside the attention pods.
    pub expert_shards: usize,
    /// The router's public port (0 picks one).
    pub port: u16,
    /// Extra arguments for every attention pod (limits, dispatch dtype, ...).
    pub attention_args: Vec<String>,
    /// Extra arguments for every expert shard.
    pub expert_args: Vec<String>,
    /// Extra arguments for the router (API options).
    pub router_args: Vec<String>,
    pub served_model_name: String,
}

/// A port that was free a moment ago: children are given explicit ports so the attention pods
/// can be told their shards' addresses before the shards exist.
fn free_port() -> Result<u16> {
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
}

impl LocalCluster {
    /// Starts every process and waits until each is ready.
    pub async fn start(cfg: &UpConfig) -> Result<Self> {
        if cfg.attention == 0 {
            return Err(Error::Input("--attention must be at least 1".into()));
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
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(cfg.expert_args.iter().cloned());
            specs.push(ChildSpec {
                name: format!("expert-{i}"),
                program: prog.clone(),
                args,
                env: vec![],
                wait_ready: true,
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
            }
            args.extend(cfg.attention_args.iter().cloned());
            specs.push(ChildSpec {
                name: format!("attention-{i}"),
                program: prog.clone(),
                args,
                env: vec![],
                wait_ready: true,
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
            env: vec![],
            wait_ready: true,
        });
        let supervisor = Supervisor::start(specs, SupervisorConfig::default()).await?;
        Ok(Self { supervisor, addr })
    }

    /// Serves until a signal or a child's exit, then stops every child.
    pub async fn run(self) -> Result<StopReason> {
        self.supervisor.run().await
    }
}
