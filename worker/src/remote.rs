//! The two ends of the attention ↔ expert-shard hop that touch the model: [`RemoteExperts`]
//! (an attention pod's routed experts, through the dispatch client) and [`ShardCompute`] (an
//! expert shard's experts, behind the shard server).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::{BatchRows, ComputeError, ExpertCompute, ReplyRows, RowExperts};
use crate::experts::{LocalExperts, PendingExperts, RoutedExperts, RowFailure};
use crate::metrics::WorkerMetrics;
use crate::weights::Store;
use shardseek_kernels::gate::Routing;
use shardseek_router::transport::grpc::GrpcTransport;
use shardseek_router::{Dispatcher, Routes};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Routed experts on expert shards: `start` hands the layer to the dispatch client on the
/// async runtime and returns at once, so the model can compute the other micro-batch.
pub struct RemoteExperts {
    dispatcher: Arc<Dispatcher<GrpcTransport>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<WorkerMetrics>,
    step: AtomicU64,
    top_k: usize,
}

impl RemoteExperts {
    pub fn new(
        dispatcher: Arc<Dispatcher<GrpcTransport>>,
        runtime: tokio::runtime::Handle,
        metrics: Arc<WorkerMetrics>,
        top_k: usize,
    ) -> Self {
        Self {
            dispatcher,
            runtime,
            metrics,
            step: AtomicU64::new(0),
            top_k,
        }
    }
}

impl RoutedExperts for RemoteExperts {
    fn start(&self, layer: usize, rows: &[f32], routing: &[Routing]) -> Result<PendingExperts> {
        let k = self.top_k;
        let mut experts = Vec::with_capacity(routing.len() * k);
        let mut weights = Vec::with_capacity(routing.len() * k);
        for r in routing {
            if r.experts.len() != k {
                return Err(Error::Dispatch {
                    layer,
                    detail: format!("routing has {} experts, top-k is {k}", r.experts.len()),
                });
            }
            experts.extend(r.experts.iter().map(|&e| e as u32));
            weights.extend_from_slice(&r.weights);
        }
        // Bytes on the wire: each token goes once to every distinct shard of its experts, and
        // one row per (token, shard) comes back.
        let placement = self.dispatcher.placement();
        let mut pairs = 0usize;
        for chunk in experts.chunks(k.max(1)) {
            let mut shards: Vec<usize> = chunk
                .iter()
                .filter_map(|&e| {
                    placement
                        .replicas(e as usize)
                        .and_then(|r| r.first().copied())
                })
                .collect();
            shards.sort_unstable();
            shards.dedup();
            pairs += shards.len();
        }
        let row_bytes = self
            .dispatcher
            .config()
            .wire_dtype
            .row_bytes(rows.len() / routing.len().max(1));
        self.metrics
            .dispatch_bytes
            .inc_by((2 * pairs * row_bytes) as u64);
        let (tx, rx) = std::sync::mpsc::channel();
        let dispatcher = self.dispatcher.clone();
        // The dispatch task needs the rows beyond this call; shared, they are encoded from this
        // one copy straight into each shard's frame.
        let rows = Arc::new(rows.to_vec());
        let step = self.step.fetch_add(1, Ordering::Relaxed);
        let hist = self.metrics.dispatch_duration.clone();
        let imbalance = self.metrics.expert_load_imbalance.clone();
        let held = self.metrics.dispatch_held_tokens.clone();
        self.runtime.spawn(async move {
            let t0 = std::time::Instant::now();
            let routes = Routes {
                top_k: k,
                experts: &experts,
                weights: &weights,
            };
            let out = dispatcher.dispatch_partial(layer, step, rows, routes).await;
            hist.observe(t0.elapsed().as_secs_f64());
            if let Some(ratio) = dispatcher.load_imbalance() {
                imbalance.set(ratio);
            }
            let out = out
                .map(|d| {
                    held.inc_by(d.held as u64);
                    let failures = d
                        .failures
                        .into_iter()
                        .map(|f| RowFailure {
                            layer,
                            rows: f.tokens,
                            error: f.error.to_string(),
                        })
                        .collect();
                    (d.rows, failures)
                })
                .map_err(|e| Error::Dispatch {
                    layer,
                    detail: e.to_string(),
                });
            let _ = tx.send(out);
        });
        Ok(PendingExperts::Partial(rx))
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn step_started(&self) {
        self.dispatcher.step_started();
    }

    fn step_finished(&self) {
        self.dispatcher.step_finished();
    }
}

/// An expert shard's experts: the model's weights for the experts placement gives it. A new
/// placement swaps in another set (gained experts located in the checkpoint, kept ones shared);
/// a batch computes on the set it started with.
pub struct ShardCompute {
    experts: RwLock<Arc<LocalExperts>>,
    cfg: ModelConfig,
    store: Arc<Store>,
    metrics: Arc<WorkerMetrics>,
}

impl ShardCompute {
    pub fn new(
        experts: LocalExperts,
        cfg: ModelConfig,
        store: Arc<Store>,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            experts: RwLock::new(Arc::new(experts)),
            cfg,
            store,
            metrics,
        }
    }

    fn current(&self) -> Arc<LocalExperts> {
        match self.experts.read() {
            Ok(e) => Arc::clone(&e),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl ExpertCompute for ShardCompute {
    fn hidden(&self) -> usize {
        self.cfg.hidden_size
    }

    fn experts(&self) -> Vec<usize> {
        self.current().held().to_vec()
    }

    fn set_experts(&self, experts: &[usize]) -> Result<(), ComputeError> {
        let next = self
            .current()
            .with_experts(&self.cfg, &self.store, experts)?;
        match self.experts.write() {
            Ok(mut e) => *e = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        Ok(())
    }

    fn compute(
        &self,
        layer: usize,
        rows: &BatchRows<'_>,
        assignments: &[RowExperts],
        out: &mut ReplyRows,
    ) -> Result<(), ComputeError> {
        let mut counts: std::collections::BTreeMap<usize, u64> = Default::default();
        for a in assignments {
            for &(e, _) in a {
                *counts.entry(e).or_default() += 1;
            }
        }
        self.current().combine(layer, rows, assignments, out)?;
        self.metrics
            .record_expert_tokens(&counts.into_iter().collect::<Vec<_>>());
        Ok(())
    }
}
