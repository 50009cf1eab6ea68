//! `shardseek bench dispatch`: one MoE layer's dispatch + combine round trip over loopback,
//! next to a plain TCP exchange of the same bytes (the "echo") in the same run.
//!
//! Four (by default) expert shards run in this process with a compute that returns zeros, so
//! the figure is the cost of moving rows: encoding, gRPC/HTTP/2, the shard's encode of its
//! partial sums, and the combine. (A shard decodes its rows where its compute reads them — the
//! grouped experts decode each row into the expert's input block, which they fill anyway — so
//! a compute that reads nothing decodes nothing.) The TCP exchange sends each shard's request
//! bytes over one plain connection per shard and reads back as many bytes as the shard's reply
//! carries (the same bytes both ways, except for fp8, whose partial sums come back in bf16) —
//! the floor any protocol on this machine's loopback pays. Both run on the same runtime and
//! threads, alternate round by round, reuse their connections, and neither allocates its
//! payload inside the timed region (the dispatch's rows are built once per batch size, the
//! exchange's buffers too).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use shardseek_proto::v1::ModelFingerprint;
use shardseek_router::transport::grpc::{GrpcConfig, GrpcTransport};
use shardseek_router::{DispatchConfig, Dispatcher, Error, Placement, Result, Routes, WireDtype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::server::{ExpertServer, ExpertServerConfig};
use super::{BatchRows, ComputeError, ExpertCompute, ReplyRows, RowExperts};

/// What to measure.
#[derive(Clone, Debug)]
pub struct DispatchBenchConfig {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub shards: usize,
    pub batches: Vec<usize>,
    pub dtype: WireDtype,
    /// Measured round trips per batch size (after warm-up).
    pub iterations: usize,
    /// Row bytes per dispatch message ([`DispatchConfig::message_bytes`]).
    pub message_bytes: usize,
}

impl Default for DispatchBenchConfig {
    /// DeepSeek-V3's MoE layer: hidden 7168, top-8 of 256 routed experts, over 4 shards.
    fn default() -> Self {
        DispatchBenchConfig {
            hidden: 7168,
            experts: 256,
            top_k: 8,
            shards: 4,
            batches: vec![1, 4, 16, 64, 128, 256],
            dtype: WireDtype::Bf16,
            iterations: 40,
            message_bytes: shardseek_router::dispatch::DEFAULT_MESSAGE_BYTES,
        }
    }
}

/// One batch size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct DispatchBenchRow {
    pub tokens: usize,
    /// Row bytes moved per round trip, both directions, all shards.
    pub bytes: usize,
    pub dispatch_p50_us: f64,
    pub dispatch_p90_us: f64,
    pub dispatch_gb_per_s: f64,
    pub tcp_echo_p50_us: f64,
    pub tcp_echo_p90_us: f64,
    pub tcp_echo_gb_per_s: f64,
    /// dispatch p50 / TCP echo p50 (target: ≤ 1.5 at 64+ tokens).
    pub ratio_p50: f64,
    /// CPU time of the whole process (client, shards, kernel work on their behalf) per round
    /// trip, median: the work a round trip costs, which a machine busy with other processes
    /// distorts far less than the wall time.
    pub dispatch_cpu_us: f64,
    pub tcp_echo_cpu_us: f64,
    /// dispatch CPU / TCP echo CPU.
    pub cpu_ratio: f64,
}

/// The whole table.
#[derive(Clone, Debug, Serialize)]
pub struct DispatchBenchReport {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub shards: usize,
    pub dtype: String,
    /// Dtype the partial sums come back in.
    pub combine_dtype: String,
    pub iterations: usize,
    pub message_bytes: usize,
    pub rows: Vec<DispatchBenchRow>,
}

impl fmt::Display for DispatchBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dispatch + combine over loopback: hidden {}, top-{} of {} experts, {} shards (no compute), {} wire ({} combine), messages of {} row bytes, {} iterations",
            self.hidden,
            self.top_k,
            self.experts,
            self.shards,
            self.dtype,
            self.combine_dtype,
            self.message_bytes,
            self.iterations
        )?;
        writeln!(
            f,
            "{:>6} {:>10} | {:>10} {:>10} {:>8} | {:>10} {:>10} {:>8} | {:>6} | {:>8} {:>8} {:>6}",
            "tokens",
            "bytes",
            "p50 µs",
            "p90 µs",
            "GB/s",
            "echo p50",
            "echo p90",
            "GB/s",
            "ratio",
            "cpu µs",
            "echo cpu",
            "ratio"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:>6} {:>10} | {:>10.0} {:>10.0} {:>8.2} | {:>10.0} {:>10.0} {:>8.2} | {:>6.2} | {:>8.0} {:>8.0} {:>6.2}",
                r.tokens,
                r.bytes,
                r.dispatch_p50_us,
                r.dispatch_p90_us,
                r.dispatch_gb_per_s,
                r.tcp_echo_p50_us,
                r.tcp_echo_p90_us,
                r.tcp_echo_gb_per_s,
                r.ratio_p50,
                r.dispatch_cpu_us,
                r.tcp_echo_cpu_us,
                r.cpu_ratio
            )?;
        }
        Ok(())
    }
}

/// A shard that computes nothing: every token's partial sum is zero (a row the compute holds
/// in its cache, as a real one holds the row it just summed, encoded into the reply).
struct NoCompute {
    hidden: usize,
    experts: Vec<usize>,
}

impl ExpertCompute for NoCompute {
    fn hidden(&self) -> usize {
        self.hidden
    }
    fn experts(&self) -> Vec<usize> {
        self.experts.clone()
    }
    fn compute(
        &self,
        _layer: usize,
        rows: &BatchRows<'_>,
        _assignments: &[RowExperts],
        out: &mut ReplyRows,
    ) -> std::result::Result<(), ComputeError> {
        let zero = vec![0.0; self.hidden];
        (0..rows.len()).try_for_each(|_| out.push(&zero))
    }
}

impl DispatchBenchConfig {
    /// Sets the wire dtype from its command-line name (`f32`, `bf16`, `fp8`).
    pub fn with_dtype(mut self, name: &str) -> Result<Self> {
        self.dtype = name.parse()?;
        Ok(self)
    }
}

/// Runs the benchmark on its own multi-threaded runtime.
pub fn run(config: &DispatchBenchConfig) -> Result<DispatchBenchReport> {
    super::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            op: "starting the benchmark runtime".into(),
            source,
        })?;
    runtime.block_on(run_async(config))
}

/// Deterministic routing: `top_k` distinct experts per token from a fixed-seed generator.
fn routing(tokens: usize, experts: usize, top_k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let start = ids.len();
        while ids.len() - start < top_k.min(experts) {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let e = ((state >> 33) % experts as u64) as u32;
            if !ids[start..].contains(&e) {
                ids.push(e);
            }
        }
    }
    let weights = vec![1.0 / top_k as f32; ids.len()];
    (ids, weights)
}

/// CPU time consumed so far by every thread of this process (shards and echo servers run in
/// it too, and the kernel's TCP work is charged to the threads that send and receive).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; it cannot fail for
    // CLOCK_PROCESS_CPUTIME_ID on Linux, and a failure would leave zeros (a zero reading).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

async fn run_async(cfg: &DispatchBenchConfig) -> Result<DispatchBenchReport> {
    let fingerprint = ModelFingerprint {
        config_sha256: "bench".into(),
        n_routed_experts: cfg.experts as u32,
        hidden_size: cfg.hidden as u32,
    };
    let placement = Placement::initial(cfg.experts, cfg.shards, 0)?;
    let mut servers = Vec::new();
    for s in 0..cfg.shards {
        let compute = Arc::new(NoCompute {
            hidden: cfg.hidden,
            experts: placement.experts_of(s),
        });
        let server_cfg = ExpertServerConfig::new(s, cfg.shards, fingerprint.clone());
        servers.push(ExpertServer::start(compute, server_cfg).await?);
    }
    let addrs = servers.iter().map(|s| s.local_addr().to_string()).collect();
    let transport = Arc::new(GrpcTransport::new(
        addrs,
        fingerprint,
        GrpcConfig::default(),
    ));
    transport.connect_all().await?;
    let dispatcher = Dispatcher::new(
        Arc::clone(&transport),
        placement.clone(),
        cfg.hidden,
        DispatchConfig {
            wire_dtype: cfg.dtype,
            message_bytes: cfg.message_bytes,
            ..DispatchConfig::default()
        },
    )?;
    let echo = EchoCluster::start(cfg.shards).await?;

    let mut rows_out = Vec::new();
    for &tokens in &cfg.batches {
        let rows: Arc<Vec<f32>> = Arc::new(
            (0..tokens * cfg.hidden)
                .map(|i| ((i % 997) as f32 - 498.0) * 1e-3)
                .collect(),
        );
        let (ids, weights) = routing(tokens, cfg.experts, cfg.top_k);
        let routes = Routes {
            top_k: cfg.top_k,
            experts: &ids,
            weights: &weights,
        };
        // Each shard's rows: tokens with at least one of its experts.
        let mut per_shard = vec![0usize; cfg.shards];
        for t in 0..tokens {
            let mut seen = vec![false; cfg.shards];
            for &e in &ids[t * cfg.top_k..(t + 1) * cfg.top_k] {
                if let Some(&s) = placement.replicas(e as usize).and_then(|r| r.first()) {
                    seen[s] = true;
                }
            }
            for (s, hit) in seen.into_iter().enumerate() {
                per_shard[s] += usize::from(hit);
            }
        }
        let (ask, answer) = (
            cfg.dtype.row_bytes(cfg.hidden),
            cfg.dtype.combine_dtype().row_bytes(cfg.hidden),
        );
        let shard_bytes: Vec<(usize, usize)> =
            per_shard.iter().map(|n| (n * ask, n * answer)).collect();
        let bytes = shard_bytes.iter().map(|(a, b)| a + b).sum::<usize>();

        let warmup = 3;
        let mut dispatch_times = Vec::with_capacity(cfg.iterations);
        let mut echo_times = Vec::with_capacity(cfg.iterations);
        let mut dispatch_cpu = Vec::with_capacity(cfg.iterations);
        let mut echo_cpu = Vec::with_capacity(cfg.iterations);
        for i in 0..warmup + cfg.iterations {
            // Alternate the two so that machine noise hits both alike.
            let c0 = process_cpu();
            let t0 = Instant::now();
            let out = dispatcher
                .dispatch_shared(3, i as u64, Arc::clone(&rows), routes)
                .await?;
            let dt = t0.elapsed();
            let dc = process_cpu().saturating_sub(c0);
            if out.len() != rows.len() {
                return Err(Error::Input(format!(
                    "dispatch returned {} values for {}",
                    out.len(),
                    rows.len()
                )));
            }
            let c1 = process_cpu();
            let t1 = Instant::now();
            echo.round_trip(&shard_bytes).await?;
            let et = t1.elapsed();
            let ec = process_cpu().saturating_sub(c1);
            if i >= warmup {
                dispatch_times.push(dt);
                echo_times.push(et);
                dispatch_cpu.push(dc);
                echo_cpu.push(ec);
            }
        }
        dispatch_times.sort_unstable();
        echo_times.sort_unstable();
        dispatch_cpu.sort_unstable();
        echo_cpu.sort_unstable();
        let (dcpu, ecpu) = (percentile(&dispatch_cpu, 0.5), percentile(&echo_cpu, 0.5));
        let (d50, d90) = (
            percentile(&dispatch_times, 0.5),
            percentile(&dispatch_times, 0.9),
        );
        let (e50, e90) = (percentile(&echo_times, 0.5), percentile(&echo_times, 0.9));
        rows_out.push(DispatchBenchRow {
            tokens,
            bytes,
            dispatch_p50_us: d50,
            dispatch_p90_us: d90,
            dispatch_gb_per_s: bytes as f64 / d50 / 1e3,
            tcp_echo_p50_us: e50,
            tcp_echo_p90_us: e90,
            tcp_echo_gb_per_s: bytes as f64 / e50 / 1e3,
            ratio_p50: d50 / e50,
            dispatch_cpu_us: dcpu,
            tcp_echo_cpu_us: ecpu,
            cpu_ratio: dcpu / ecpu.max(f64::MIN_POSITIVE),
        });
    }
    echo.stop();
    for s in servers {
        s.shutdown().await?;
    }
    Ok(DispatchBenchReport {
        hidden: cfg.hidden,
        experts: cfg.experts,
        top_k: cfg.top_k,
        shards: cfg.shards,
        dtype: cfg.dtype.to_string(),
        combine_dtype: cfg.dtype.combine_dtype().to_string(),
        iterations: cfg.iterations,
        message_bytes: cfg.message_bytes,
        rows: rows_out,
    })
}

/// One exchange server and one client connection per shard: the client sends a 16-byte header
/// (request and reply lengths, little-endian u64) and the request; the server reads them and
/// writes the reply's bytes.
struct EchoCluster {
    conns: Vec<tokio::sync::Mutex<EchoConn>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

/// A client connection and its send and receive buffers, kept across round trips (as the
/// dispatch keeps its rows): the exchange pays for moving bytes, not for allocating them.
struct EchoConn {
    stream: TcpStream,
    payload: Vec<u8>,
    back: Vec<u8>,
}

impl EchoCluster {
    async fn start(n: usize) -> Result<Self> {
        let io = |op: &'static str| {
            move |source| Error::Io {
                op: op.into(),
                source,
            }
        };
        let mut conns = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(io("binding echo"))?;
            let addr = listener.local_addr().map_err(io("echo address"))?;
            servers.push(tokio::spawn(async move {
                if let Ok((mut sock, _)) = listener.accept().await {
                    let _ = sock.set_nodelay(true);
                    let (mut ask, mut answer) = (Vec::new(), Vec::new());
                    let mut header = [0u8; 16];
                    while sock.read_exact(&mut header).await.is_ok() {
                        let len =
                            |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize;
                        let (n, m) = (len(&header[..8]), len(&header[8..]));
                        ask.resize(n, 0);
                        answer.resize(m, 0xA5);
                        if sock.read_exact(&mut ask).await.is_err()
                            || sock.write_all(&answer).await.is_err()
                        {
                            break;
                        }
                    }
                }
            }));
            let stream = TcpStream::connect(addr)
                .await
                .map_err(io("connecting echo"))?;
            stream.set_nodelay(true).map_err(io("echo nodelay"))?;
            conns.push(tokio::sync::Mutex::new(EchoConn {
                stream,
                payload: Vec::new(),
                back: Vec::new(),
            }));
        }
        Ok(EchoCluster { conns, servers })
    }

    /// Sends `sizes[i].0` bytes on connection `i` and reads `sizes[i].1` back, all connections
    /// at once. Buffers are sized on the first call of a size (a warm-up round).
    async fn round_trip(&self, sizes: &[(usize, usize)]) -> Result<()> {
        let results = futures::future::join_all(self.conns.iter().zip(sizes).map(
            |(c, &(n, m))| async move {
                let mut guard = c.lock().await;
                let conn = &mut *guard;
                if conn.payload.len() != n + 16 || conn.back.len() != m {
                    conn.payload = vec![0x5Au8; n + 16];
                    conn.payload[..8].copy_from_slice(&(n as u64).to_le_bytes());
                    conn.payload[8..16].copy_from_slice(&(m as u64).to_le_bytes());
                    conn.back = vec![0u8; m];
                }
                let (mut r, mut w) = conn.stream.split();
                let write = w.write_all(&conn.payload);
                let read = r.read_exact(&mut conn.back);
                let (a, b) = tokio::join!(write, read);
                a.and(b.map(|_| ()))
            },
        ))
        .await;
        for r in results {
            r.map_err(|source| Error::Io {
                op: "TCP echo".into(),
                source,
            })?;
        }
        Ok(())
    }

    fn stop(self) {
        for s in self.servers {
            s.abort();
        }
    }
}
