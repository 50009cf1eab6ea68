//! Test shards: a deterministic per-expert linear map computed in plain f32, and helpers that
//! start shards on 127.0.0.1:0 and compute the same math locally.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardseek_proto::v1::ModelFingerprint;
use shardseek_router::transport::grpc::{GrpcConfig, GrpcTransport};
use shardseek_router::{DispatchConfig, Dispatcher, Placement, WireDtype};
use shardseek_worker::expert::{
    BatchRows, ComputeError, ExpertCompute, ExpertServer, ExpertServerConfig, ReplyRows,
    RowExperts, RunningExpertServer,
};

pub const HIDDEN: usize = 64;
pub const EXPERTS: usize = 16;
pub const TOP_K: usize = 4;

/// Expert `e` at layer `l`: y[j] = a·x[j] + b·x[(j+1) mod h], a and b depending on (e, l).
pub fn coefficients(expert: usize, layer: usize) -> (f32, f32) {
    (
        0.5 + 0.03 * expert as f32 + 0.01 * layer as f32,
        0.25 - 0.02 * expert as f32,
    )
}

/// Σ weight · expert(row) per row, in list order: the shard's partial combine.
pub fn partial_sums(layer: usize, rows: &[f32], lists: &[RowExperts]) -> Vec<f32> {
    let h = rows.len() / lists.len().max(1);
    let mut out = vec![0f32; rows.len()];
    for (r, list) in lists.iter().enumerate() {
        let x = &rows[r * h..(r + 1) * h];
        let y = &mut out[r * h..(r + 1) * h];
        for &(e, w) in list {
            let (a, b) = coefficients(e, layer);
            for j in 0..h {
                y[j] += w * (a * x[j] + b * x[(j + 1) % h]);
            }
        }
    }
    out
}

pub struct LinearExperts {
    pub experts: Vec<usize>,
    /// Slept in every compute call: simulates a slow or hung shard.
    pub delay: Mutex<Duration>,
    /// Rows of the largest batch computed so far (to observe cross-pod batching).
    pub max_rows: AtomicUsize,
    pub calls: AtomicUsize,
}

impl LinearExperts {
    pub fn new(experts: Vec<usize>) -> Self {
        LinearExperts {
            experts,
            delay: Mutex::new(Duration::ZERO),
            max_rows: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }
}

impl ExpertCompute for LinearExperts {
    fn hidden(&self) -> usize {
        HIDDEN
    }
    fn experts(&self) -> Vec<usize> {
        self.experts.clone()
    }
    fn compute(
        &self,
        layer: usize,
        rows: &BatchRows<'_>,
        assignments: &[RowExperts],
        out: &mut ReplyRows,
    ) -> Result<(), ComputeError> {
        let delay = *self.delay.lock().map_err(|_| "poisoned")?;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.max_rows.fetch_max(assignments.len(), Ordering::SeqCst);
        out.push_all(&partial_sums(layer, &rows.decode(), assignments))
    }
}

pub fn fingerprint() -> ModelFingerprint {
    shardseek_proto::fingerprint_from_config(
        format!(r#"{{"n_routed_experts": {EXPERTS}, "hidden_size": {HIDDEN}}}"#).as_bytes(),
    )
    .expect("valid config")
}

pub struct Shard {
    pub compute: Arc<LinearExperts>,
    pub server: RunningExpertServer,
}

/// Starts `shards` shards holding the experts `placement` gives them.
pub async fn start_shards(
    placement: &Placement,
    tweak: impl Fn(&mut ExpertServerConfig),
) -> Vec<Shard> {
    let mut out = Vec::new();
    for s in 0..placement.shards() {
        out.push(start_shard(placement, s, None, &tweak).await);
    }
    out
}

pub async fn start_shard(
    placement: &Placement,
    s: usize,
    addr: Option<std::net::SocketAddr>,
    tweak: impl Fn(&mut ExpertServerConfig),
) -> Shard {
    let compute = Arc::new(LinearExperts::new(placement.experts_of(s)));
    let mut cfg = ExpertServerConfig::new(s, placement.shards(), fingerprint());
    cfg.placement_version = placement.version();
    if let Some(a) = addr {
        cfg.addr = a;
    }
    tweak(&mut cfg);
    let server = ExpertServer::start(Arc::clone(&compute), cfg)
        .await
        .expect("shard starts");
    Shard { compute, server }
}

pub fn transport(shards: &[Shard], config: GrpcConfig) -> Arc<GrpcTransport> {
    let addrs = shards
        .iter()
        .map(|s| s.server.local_addr().to_string())
        .collect();
    Arc::new(GrpcTransport::new(addrs, fingerprint(), config))
}

pub fn dispatcher(
    transport: Arc<GrpcTransport>,
    placement: Placement,
    dtype: WireDtype,
    deadline: Duration,
) -> Dispatcher<GrpcTransport> {
    Dispatcher::new(
        transport,
        placement,
        HIDDEN,
        DispatchConfig {
            wire_dtype: dtype,
            deadline,
            ..DispatchConfig::default()
        },
    )
    .expect("placement matches transport")
}

/// Deterministic rows and top-k routes for `tokens` tokens.
pub fn batch(tokens: usize, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let rows = (0..tokens * HIDDEN)
        .map(|_| (next() % 20_001) as f32 / 10_000.0 - 1.0)
        .collect();
    let mut experts = Vec::new();
    let mut weights = Vec::new();
    for _ in 0..tokens {
        let start = experts.len();
        while experts.len() - start < TOP_K {
            let e = (next() % EXPERTS as u64) as u32;
            if !experts[start..].contains(&e) {
                experts.push(e);
                weights.push(0.1 + (next() % 1000) as f32 / 1000.0);
            }
        }
    }
    (rows, experts, weights)
}

/// The same math done locally: per token, each shard's partial sum (its experts, in routing
/// order, on the primary replica) added in shard order — exactly what the cluster computes.
pub fn local_reference(
    placement: &Placement,
    layer: usize,
    rows: &[f32],
    experts: &[u32],
    weights: &[f32],
) -> Vec<f32> {
    let tokens = rows.len() / HIDDEN;
    let mut out = vec![0f32; rows.len()];
    for t in 0..tokens {
        let x = &rows[t * HIDDEN..(t + 1) * HIDDEN];
        for s in 0..placement.shards() {
            let list: RowExperts = (0..TOP_K)
                .map(|k| (experts[t * TOP_K + k] as usize, weights[t * TOP_K + k]))
                .filter(|&(e, _)| placement.replicas(e).and_then(|r| r.first()) == Some(&s))
                .collect();
            if list.is_empty() {
                continue;
            }
            let p = partial_sums(layer, x, &[list]);
            for (o, v) in out[t * HIDDEN..(t + 1) * HIDDEN].iter_mut().zip(p) {
                *o += v;
            }
        }
    }
    out
}

/// Largest |difference| allowed between a bf16-wire result and the exact one for token `t`:
/// inputs and every shard's partial sum are rounded to bf16 (relative 2⁻⁹ each), so the error
/// is at most 2⁻⁸ of Σ|w|(|a|+|b|)·max|x| (inputs) plus 2⁻⁹ of the same (outputs), rounded up.
pub fn bf16_bound(layer: usize, rows: &[f32], experts: &[u32], weights: &[f32], t: usize) -> f32 {
    gain_times_max(layer, rows, experts, weights, t) * (1.0 / 256.0 + 1.0 / 512.0) * 1.01
}

/// Largest |difference| allowed between an fp8-wire result (fp8 e4m3 rows out, bf16 partial
/// sums back) and the exact one for token `t`: each input value is off by at most 2⁻⁴ of the
/// row's largest |x| (three mantissa bits, half a step; a subnormal code is off by less), and
/// each shard's partial sum, at most Σ|w|(|a|+|b|)·max|x|·(1 + 2⁻⁴), is rounded to bf16 (2⁻⁹).
pub fn fp8_bound(layer: usize, rows: &[f32], experts: &[u32], weights: &[f32], t: usize) -> f32 {
    gain_times_max(layer, rows, experts, weights, t)
        * (1.0 / 16.0 + (1.0 + 1.0 / 16.0) / 512.0)
        * 1.01
}

/// Σ|w|(|a|+|b|) over token `t`'s experts, times the largest |x| of its row.
fn gain_times_max(layer: usize, rows: &[f32], experts: &[u32], weights: &[f32], t: usize) -> f32 {
    let xmax = rows[t * HIDDEN..(t + 1) * HIDDEN]
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    let gain: f32 = (0..TOP_K)
        .map(|k| {
            let (a, b) = coefficients(experts[t * TOP_K + k] as usize, layer);
            weights[t * TOP_K + k].abs() * (a.abs() + b.abs())
        })
        .sum();
    gain * xmax
}
