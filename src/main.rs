//! The `shardseek` command line: parses arguments and calls the crates' entry points.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shardseek_kernels::gemm::Activations;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_proto::cluster_config::Device;
use shardseek_worker::generate::{GenerateRequest, generate};
use shardseek_worker::model::{ExpertSelection, Model};
use shardseek_worker::modelgen;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "shardseek",
    version,
    about = "Serve DeepSeek-V3-style MoE models with attention/expert disaggregation"
)]
struct Cli {
    /// Worker threads for the numeric kernels (default: the process's CPU limit, cgroup aware).
    #[arg(long, global = true, env = "SHARDSEEK_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one request, in process.
    Generate(GenerateArgs),
    /// Run one pod's process: an attention pod or an expert shard.
    Worker(WorkerArgs),
    /// Run the gateway: OpenAI HTTP API and gRPC `Gateway` in front of attention pods.
    Router(RouterArgs),
    /// Run the whole cluster as local processes (router, attention pods, expert shards).
    Up(UpArgs),
    /// Measurements next to this machine's ceilings.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the Kubernetes operator (the DeepSeekDeployment controller).
    Operator(shardseek_operator::OperatorArgs),
    /// Print the DeepSeekDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print every object the operator would apply for the DeepSeekDeployment(s) in a file.
    Render {
        /// A YAML file of DeepSeekDeployment objects (`-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Namespace for objects that name none (default: `default`).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Model files: generate random checkpoints in the published layout, or pull one from the
    /// Hugging Face hub.
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Write a random DeepSeek-V3-architecture model (sharded safetensors, index, config,
    /// tokenizer) in exactly the Hugging Face layout.
    Gen {
        /// tiny | small | medium | v3-slice
        #[arg(long)]
        preset: String,
        /// bf16 | fp8 (DeepSeek-V3's FP8 layout with 128x128 block scales)
        #[arg(long, default_value = "fp8")]
        dtype: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Override a config.json key after the preset, value in JSON (repeatable), e.g.
        /// `--set q_lora_rank=null --set n_shared_experts=2`.
        #[arg(long = "set", value_name = "KEY=JSON")]
        set: Vec<String>,
    },
    /// Download a model from the Hugging Face hub (or the `HF_ENDPOINT` mirror), resuming
    /// partial files and checking each against the hub's size and sha256. `HF_TOKEN`, when
    /// set, is sent as a bearer token (gated and private models).
    Pull {
        /// hf://ORG/NAME[@REVISION] (revision `main` when omitted).
        source: String,
        /// Output directory (created if missing); files already there and verified are kept.
        #[arg(long)]
        out: PathBuf,
        /// Pull only files whose path matches one of these globs (`*` = any characters),
        /// e.g. `--include '*.json'` for the tokenizer and config alone.
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// CPU kernels (GEMM, grouped MoE, MLA decode) against read bandwidth and FMA peak.
    Kernels {
        /// Print one JSON object instead of the table (CPU only).
        #[arg(long)]
        json: bool,
        /// cpu, or cuda[:N]: the CUDA kernels against the GPU's copy bandwidth and peaks.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Measure only the rows whose name contains TEXT (case-insensitive; repeatable, or
        /// comma-separated), e.g. `--only "grouped moe" --only "decode fp8 gemm"`; the
        /// ceilings are always measured (CPU only).
        #[arg(long, value_name = "TEXT", value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Load-test a running server's /v1/completions (like vLLM's benchmark_serving).
    Serve(BenchServeArgs),
    /// Prefill and decode tokens/s of one process at each --batch size, and the peak RSS.
    Model {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Batch sizes (concurrent sequences), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// Element type of the latent KV cache: f32, bf16 or fp8.
        #[arg(long, default_value = "bf16")]
        kv_cache_dtype: String,
        /// cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// The output projection's dtype: checkpoint or fp8.
        #[arg(long, default_value = "checkpoint")]
        lm_head_dtype: String,
        /// How GEMMs multiply activations: f32 (exact) or bf16 (x rounded to bf16, the weights'
        /// exact values, f32 sums: about twice the prefill and batched rate on CPUs with
        /// AVX512-BF16, which it needs; relative error ≤ 2⁻⁸ per product, like vLLM's and SGLang's
        /// CPU backends). Applies to GEMMs of more than 2 rows; decode GEMVs stay exact.
        #[arg(long, default_value = "f32")]
        activation_dtype: Activations,
        #[arg(long)]
        json: bool,
    },
    /// One MoE layer's dispatch + combine round trip over loopback (4 no-compute shards), next
    /// to a plain TCP echo of the same bytes.
    Dispatch {
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
        /// Wire dtype of the rows: f32, bf16 or fp8.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Measured round trips per batch size.
        #[arg(long, default_value_t = 40)]
        iterations: usize,
        /// Batch sizes (tokens) to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64, 128, 256])]
        tokens: Vec<usize>,
        /// Row bytes per dispatch message (a shard's rows are split into messages of about
        /// this size).
        #[arg(long, default_value_t = shardseek_router::dispatch::DEFAULT_MESSAGE_BYTES)]
        message_bytes: usize,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("load").required(true).multiple(true).args(["concurrency", "rate"])))]
struct BenchServeArgs {
    /// Base URL of the server (plain HTTP).
    #[arg(long, env = "SHARDSEEK_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Requests to send in all.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Requests in flight (closed loop); with --rate, a cap on requests in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Requests per second, Poisson arrivals.
    #[arg(long)]
    rate: Option<f64>,
    /// Prompt length in tokens (random token ids).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens every prompt starts with before its own input (a shared system prompt).
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: usize,
    /// Tokens to generate per request (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Model name (default: the first listed by /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Prompt ids are drawn from [0, vocab); 256 is below every preset's vocabulary.
    #[arg(long, default_value_t = 256)]
    vocab: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Give up on one request after this many seconds.
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// A JSON Schema file: every request's output follows it (constrained decoding).
    #[arg(long)]
    json_schema: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Attention,
    Expert,
}

#[derive(Args)]
struct WorkerArgs {
    #[arg(long, value_enum)]
    role: Role,
    /// Checkpoint directory (Hugging Face layout).
    #[arg(
        long,
        env = "SHARDSEEK_MODEL",
        required_unless_present = "cluster_config"
    )]
    model: Option<PathBuf>,
    /// The cluster config the operator renders (cluster.json); it sets the model, ports,
    /// shard addresses, limits and dispatch dtype, overriding those flags.
    #[arg(long, env = "SHARDSEEK_CLUSTER_CONFIG")]
    cluster_config: Option<PathBuf>,
    /// Also serve /metrics, /health and /ready on this address.
    #[arg(long, env = "SHARDSEEK_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Address to serve gRPC and HTTP (/metrics, /health, /ready) on; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0", env = "SHARDSEEK_LISTEN")]
    listen: std::net::SocketAddr,
    /// Tokens per forward step (decode tokens + prefill chunks).
    #[arg(long, default_value_t = 2048, env = "SHARDSEEK_MAX_BATCH_TOKENS")]
    max_batch_tokens: usize,
    /// Requests in the running batch.
    #[arg(long, default_value_t = 64, env = "SHARDSEEK_MAX_RUNNING_REQUESTS")]
    max_running_requests: usize,
    /// Requests allowed to wait; beyond it new requests are refused (HTTP 429).
    #[arg(long, default_value_t = 256, env = "SHARDSEEK_MAX_WAITING_REQUESTS")]
    max_waiting_requests: usize,
    /// Longest sequence, prompt + generated (default: the model's max_position_embeddings).
    #[arg(long, env = "SHARDSEEK_MAX_SEQ_LEN")]
    max_seq_len: Option<usize>,
    /// Prefix-cache block keys: sha256 (collision-resistant) or fnv1a64 (the cheaper key of
    /// earlier releases, kept for comparison). Hits are verified against the tokens either way.
    #[arg(long, default_value = "sha256", env = "SHARDSEEK_PREFIX_CACHE_HASH")]
    prefix_cache_hash: shardseek_worker::prefix::PrefixHash,
    /// Memory for the latent KV cache: bytes or a quantity (`8Gi`, `512Mi`). Default: room for
    /// one --max-seq-len sequence (at least 1 GiB), at most half of the process's memory limit.
    #[arg(long, env = "SHARDSEEK_KV_CACHE_MEMORY")]
    kv_cache_memory: Option<String>,
    /// Attention role: the output projection's dtype: `checkpoint` (as stored; BF16 in
    /// DeepSeek's FP8 checkpoints) or `fp8` (e4m3 with 128×128 block scales, quantised at load:
    /// half the bytes per decode step for it, at e4m3's precision).
    #[arg(long, default_value = "checkpoint", env = "SHARDSEEK_LM_HEAD_DTYPE")]
    lm_head_dtype: String,
    /// How GEMMs multiply activations: f32 (exact) or bf16 (x rounded to bf16, the weights'
    /// exact values, f32 sums: about twice the prefill and batched rate on CPUs with
    /// AVX512-BF16, which it needs; relative error ≤ 2⁻⁸ per product, like vLLM's and SGLang's
    /// CPU backends). Applies to GEMMs of more than 2 rows; decode GEMVs stay exact.
    #[arg(long, default_value = "f32", env = "SHARDSEEK_ACTIVATION_DTYPE")]
    activation_dtype: Activations,
    /// Where this role computes: cpu, or cuda[:N] (a build with `--features cuda` on a machine
    /// with an NVIDIA driver and GPU).
    #[arg(long, default_value = "cpu", env = "SHARDSEEK_DEVICE")]
    device: Device,
    /// Attention role on a GPU: the fraction of the device's memory for the weights plus the
    /// latent KV cache; the cache gets what is left after the weights (instead of
    /// --kv-cache-memory).
    #[arg(
        long,
        env = "SHARDSEEK_GPU_MEMORY_UTILIZATION",
        conflicts_with = "kv_cache_memory"
    )]
    gpu_memory_utilization: Option<f64>,
    /// Element type of the latent KV cache: f32 (exact), bf16, or fp8 (e4m3, per-token scale);
    /// the memory budget counts it.
    #[arg(long, default_value = "bf16", env = "SHARDSEEK_KV_CACHE_DTYPE")]
    kv_cache_dtype: String,
    /// When one --max-seq-len sequence does not fit the KV cache: `refuse` to start (saying
    /// the numbers) or `cap` the length to what fits, with a warning.
    #[arg(long, default_value = "refuse", env = "SHARDSEEK_KV_CACHE_ON_OVERFLOW")]
    kv_cache_on_overflow: String,
    /// Disable the two-micro-batch overlap of attention and remote experts.
    #[arg(long)]
    no_overlap: bool,
    /// Attention role: expert shard addresses (host:port, shard id = position); none keeps
    /// the routed experts in this process.
    #[arg(long, value_delimiter = ',', env = "SHARDSEEK_EXPERTS")]
    experts: Vec<String>,
    /// Row dtype on the dispatch wire: f32 (exact), bf16, or fp8 (e4m3 with per-128 scales).
    #[arg(long, default_value = "bf16", env = "SHARDSEEK_DISPATCH_DTYPE")]
    dispatch_dtype: String,
    /// Redundant expert slots per shard (replicas for failover); same on every process.
    #[arg(long, default_value_t = 0, env = "SHARDSEEK_REDUNDANT_SLOTS")]
    redundant_slots: usize,
    /// Attention role: how long (ms) tokens whose experts have no live copy wait for their
    /// shard's restart before they fail; the step is held meanwhile. Default: 5000 with
    /// redundant slots (the deployment asked for fault tolerance), 0 (fail at once) without.
    #[arg(long, env = "SHARDSEEK_FAILOVER_WAIT_MS")]
    failover_wait_ms: Option<u64>,
    /// Expert role: this shard's id (the StatefulSet pod ordinal in a cluster).
    #[arg(long, env = "SHARDSEEK_SHARD_ID")]
    shard: Option<usize>,
    /// Expert role: number of expert shards.
    #[arg(long, env = "SHARDSEEK_SHARDS")]
    shards: Option<usize>,
    /// Expert role: how long to wait for same-layer requests of other pods to batch with.
    #[arg(long, default_value_t = 200, env = "SHARDSEEK_BATCH_WINDOW_US")]
    batch_window_us: u64,
    /// The expert placement table in force, kept by a rebalancer (`up --rebalance-interval`):
    /// when the file exists the process starts on it instead of the initial table (version 1).
    #[arg(long, env = "SHARDSEEK_PLACEMENT_FILE")]
    placement_file: Option<PathBuf>,
}

#[derive(Args)]
struct RouterArgs {
    /// Address for HTTP and gRPC (one port).
    #[arg(long, default_value = "127.0.0.1:8000", env = "SHARDSEEK_LISTEN")]
    listen: std::net::SocketAddr,
    /// Attention pod addresses (host:port).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "cluster_config",
        env = "SHARDSEEK_ATTENTION"
    )]
    attention: Vec<String>,
    /// The cluster config the operator renders (cluster.json): model, ports, and the attention
    /// pods (explicit addresses, or the headless service resolved at start).
    #[arg(long, env = "SHARDSEEK_CLUSTER_CONFIG")]
    cluster_config: Option<PathBuf>,
    /// Model directory (for tokenizer.json, tokenizer_config.json and config.json).
    #[arg(long, env = "SHARDSEEK_MODEL")]
    model: Option<PathBuf>,
    /// Model name clients use (default: the model directory's name).
    #[arg(long, env = "SHARDSEEK_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Context limit checked before forwarding (default: max_position_embeddings).
    #[arg(long, env = "SHARDSEEK_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Options of the OpenAI API (router and `up`).
#[derive(Args, Clone)]
struct ApiArgs {
    /// A Jinja chat template file replacing the checkpoint's (tokenizer_config.json).
    #[arg(long, env = "SHARDSEEK_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
    /// Reasoning parser: deepseek-r1, or none. Default: deepseek-r1 when the chat template
    /// opens a `<think>` block.
    #[arg(long, env = "SHARDSEEK_REASONING_PARSER")]
    reasoning_parser: Option<String>,
    /// Require `Authorization: Bearer KEY` on the API.
    #[arg(long, env = "SHARDSEEK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CORS origins allowed (comma-separated; `*` for any, empty for none).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "*",
        env = "SHARDSEEK_ALLOWED_ORIGINS"
    )]
    allowed_origins: Vec<String>,
}

impl ApiArgs {
    /// The API key as the router's environment (not on a command line `ps` shows).
    fn to_env(&self) -> Vec<(String, String)> {
        self.api_key
            .iter()
            .map(|k| ("SHARDSEEK_API_KEY".to_string(), k.clone()))
            .collect()
    }

    /// The same options as router arguments (what `up` passes its router child); the API key
    /// goes through [`Self::to_env`] instead.
    fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(t) = &self.chat_template {
            v.extend(["--chat-template".into(), t.display().to_string()]);
        }
        if let Some(r) = &self.reasoning_parser {
            v.extend(["--reasoning-parser".into(), r.clone()]);
        }
        v.extend(["--allowed-origins".into(), self.allowed_origins.join(",")]);
        v
    }
}

#[derive(Args)]
struct UpArgs {
    /// Checkpoint directory; without it the `tiny` model is generated into a cache directory.
    #[arg(long, env = "SHARDSEEK_MODEL")]
    model: Option<PathBuf>,
    /// Attention pods.
    #[arg(long, default_value_t = 1)]
    attention: usize,
    /// Expert shards; 0 keeps the routed experts inside the attention pods.
    #[arg(long, default_value_t = 2)]
    expert_shards: usize,
    /// Redundant expert slots over all shards (a multiple of --expert-shards): replicas that
    /// take a dead shard's experts and share hot experts' load.
    #[arg(long, default_value_t = 0)]
    redundant_experts: usize,
    /// How long (ms) the attention pods hold tokens whose experts have no live copy while
    /// their shard restarts; default 5000 with --redundant-experts, 0 (fail at once) without.
    #[arg(long)]
    failover_wait_ms: Option<u64>,
    /// The router's public port (HTTP and gRPC); 0 picks a free one.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Row dtype on the dispatch wire: f32, bf16 or fp8.
    #[arg(long, default_value = "bf16")]
    dispatch_dtype: String,
    /// Tokens per forward step of each attention pod.
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Element type of the latent KV cache: f32 (exact), bf16, or fp8 (e4m3, per-token scale).
    #[arg(long, default_value = "bf16")]
    kv_cache_dtype: String,
    /// Online expert rebalancing (EPLB): every SECS seconds, the expert load the attention pods
    /// observed is balanced over the shards and a new placement version is published, switched
    /// between steps. Needs expert shards.
    #[arg(long, value_name = "SECS")]
    rebalance_interval: Option<u64>,
    /// Where the attention pods compute: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// The output projection's dtype in the attention pods: checkpoint or fp8.
    #[arg(long, default_value = "checkpoint")]
    lm_head_dtype: String,
    /// How the pods' and shards' GEMMs multiply activations: f32 (exact) or bf16 (x rounded to bf16, the weights'
    /// exact values, f32 sums: about twice the prefill and batched rate on CPUs with
    /// AVX512-BF16, which it needs; relative error ≤ 2⁻⁸ per product, like vLLM's and SGLang's
    /// CPU backends). Applies to GEMMs of more than 2 rows; decode GEMVs stay exact.
    #[arg(long, default_value = "f32")]
    activation_dtype: Activations,
    /// Where the expert shards compute: cpu (e.g. beside GPU attention: the hybrid layout) or
    /// cuda[:N].
    #[arg(long, default_value = "cpu")]
    experts_device: Device,
    /// Start, answer one OpenAI chat request through the router, print it, and stop.
    #[arg(long)]
    demo: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout); not needed with --url.
    #[arg(long, env = "SHARDSEEK_MODEL", required_unless_present = "url")]
    model: Option<PathBuf>,
    /// Send the request to a running router (its gRPC Gateway) instead of running in process.
    #[arg(long)]
    url: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    prompt_tokens: Option<Vec<u32>>,
    /// Prompt as text (needs tokenizer.json in the model directory).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Report the K most likely alternatives of each generated token.
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Also report each prompt token's log-prob.
    #[arg(long)]
    echo: bool,
    /// Continue past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Element type of the latent KV cache: f32 (exact), bf16, or fp8 (e4m3, per-token scale).
    /// In process only: with --url the server's pods chose theirs.
    #[arg(long, default_value = "bf16", conflicts_with = "url")]
    kv_cache_dtype: String,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// In process only: cpu or cuda[:N].
    #[arg(long, default_value = "cpu", conflicts_with = "url")]
    device: Device,
    /// In process only: the output projection's dtype, checkpoint or fp8.
    #[arg(long, default_value = "checkpoint", conflicts_with = "url")]
    lm_head_dtype: String,
    /// In process only: how GEMMs multiply activations, f32 (exact) or bf16 (needs
    /// AVX512-BF16; see `worker --help`).
    #[arg(long, default_value = "f32", conflicts_with = "url")]
    activation_dtype: Activations,
}

/// Where the kubelet reads a container's termination message (the pod spec's
/// `terminationMessagePath` default); `SHARDSEEK_TERMINATION_LOG` names another file.
const TERMINATION_LOG: &str = "/dev/termination-log";
/// The kubelet keeps at most 4096 bytes of a termination message.
const TERMINATION_MESSAGE_MAX: usize = 4096;

/// Writes why the process ends where the kubelet reads it, so `kubectl describe pod` and the
/// operator's Degraded condition show the reason. Only when the file exists (a container) or is
/// named explicitly: a local run writes nothing under /dev.
fn write_termination_message(message: &str) {
    let path = std::env::var_os("SHARDSEEK_TERMINATION_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(TERMINATION_LOG));
    if path.as_os_str().is_empty()
        || (!path.exists() && std::env::var_os("SHARDSEEK_TERMINATION_LOG").is_none())
    {
        return;
    }
    let mut end = message.len().min(TERMINATION_MESSAGE_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let _ = std::fs::write(&path, &message[..end]);
}

fn main() {
    // A panic anywhere (an engine thread included) leaves its message for the kubelet; the
    // default hook still prints it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        write_termination_message(&format!("panic: {info}"));
        default_hook(info);
    }));
    let cli = Cli::parse();
    shardseek_kernels::pool::init(cli.threads);
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Worker(a) => run_worker(a),
        Command::Router(a) => run_router(a),
        Command::Up(a) => run_up(a),
        Command::Bench(b) => run_bench(b),
        Command::Operator(args) => {
            init_tracing();
            shardseek_operator::run(args).context("operator")
        }
        Command::Model {
            cmd:
                ModelCmd::Gen {
                    preset,
                    dtype,
                    out,
                    seed,
                    set,
                },
        } => model_gen(preset, dtype, out, seed, set),
        Command::Model {
            cmd:
                ModelCmd::Pull {
                    source,
                    out,
                    include,
                },
        } => model_pull(&source, &out, &include),
        Command::Render { file, namespace } => render(&file, namespace.as_deref()),
        Command::Crd => shardseek_operator::crd::crd_yaml()
            .context("rendering the CRD")
            .map(|y| print!("{y}")),
    };
    if let Err(e) = result {
        // `{:#}` prints the whole context chain on one line: what failed and why.
        eprintln!("error: {e:#}");
        write_termination_message(&format!("{e:#}"));
        std::process::exit(1);
    }
}

fn render(file: &std::path::Path, namespace: Option<&str>) -> Result<()> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let yaml = shardseek_operator::render::render(&text, namespace)
        .with_context(|| format!("rendering {}", file.display()))?;
    print!("{yaml}");
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    if let Some(url) = &a.url {
        return runtime()?.block_on(generate_remote(url.clone(), a));
    }
    let dir = a
        .model
        .clone()
        .context("--model is required without --url")?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(
            shardseek_worker::tokenizer::Tokenizer::from_dir(&dir)
                .context("loading the tokenizer")?,
        )
    } else {
        None
    };
    let prompt = match (&a.prompt_tokens, &a.prompt) {
        (Some(t), _) => t.clone(),
        (None, Some(text)) => match &tokenizer {
            Some(t) => t.encode(text, true).context("tokenizing --prompt")?,
            None => bail!(
                "--prompt needs tokenizer.json in {}; use --prompt-tokens",
                dir.display()
            ),
        },
        (None, None) => bail!("give --prompt-tokens or --prompt"),
    };
    let lm_head: shardseek_worker::model::LmHeadDtype = a
        .lm_head_dtype
        .parse()
        .with_context(|| format!("--lm-head-dtype {}", a.lm_head_dtype))?;
    let backend = shardseek_worker::backend::for_device(a.device, a.activation_dtype)?;
    let mut model = Model::load_on(&dir, ExpertSelection::All, backend)
        .with_context(|| format!("loading {}", dir.display()))?;
    lm_head.apply(&mut model)?;
    let req = GenerateRequest {
        prompt,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
        },
        seed: a.seed,
        top_logprobs: a.logprobs,
        echo: a.echo,
        ignore_eos: a.ignore_eos,
        kv_dtype: a
            .kv_cache_dtype
            .parse()
            .with_context(|| format!("--kv-cache-dtype {}", a.kv_cache_dtype))?,
    };
    let mut out = generate(&model, &req)?;
    if let Some(t) = &tokenizer {
        out.text = Some(t.decode(&out.tokens, true).context("decoding the output")?);
    }
    print_generation(&out, a.json)
}

fn print_generation(out: &shardseek_worker::generate::GenerateOutput, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(out)?);
    } else if let Some(t) = &out.text {
        println!("{t}");
    } else {
        println!("{:?}", out.tokens);
    }
    Ok(())
}

/// `generate --url`: the same request through a router's gRPC `Gateway`, printed in the same
/// JSON as the in-process run.
async fn generate_remote(url: String, a: GenerateArgs) -> Result<()> {
    use shardseek_proto::v1::gateway_client::GatewayClient;
    use shardseek_proto::v1::{
        FinishReason as PbFinish, GenerateRequest as PbReq, TokenIds, generate_request::Prompt,
    };
    use shardseek_worker::generate::{FinishReason, GenerateOutput};
    let url = if url.contains("://") {
        url
    } else {
        format!("http://{url}")
    };
    let mut client = GatewayClient::connect(url.clone())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let prompt = match (&a.prompt_tokens, &a.prompt) {
        (Some(t), _) => Prompt::Tokens(TokenIds { ids: t.clone() }),
        (None, Some(text)) => Prompt::Text(text.clone()),
        (None, None) => bail!("give --prompt-tokens or --prompt"),
    };
    let req = PbReq {
        request_id: String::new(),
        prompt: Some(prompt),
        max_tokens: a.max_tokens as u32,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k as u32,
        seed: Some(a.seed),
        logprobs: a.logprobs as u32,
        echo: a.echo,
        stop: vec![],
        ignore_eos: a.ignore_eos,
        stop_token_ids: vec![],
        ..Default::default()
    };
    let mut stream = client.generate(req).await.context("Generate")?.into_inner();
    let mut out = GenerateOutput {
        prompt_tokens: vec![],
        tokens: vec![],
        logprobs: vec![],
        top_logprobs: vec![],
        prompt_logprobs: None,
        text: None,
        finish_reason: FinishReason::Length,
    };
    let mut text = String::new();
    while let Some(c) = stream.message().await.context("reading the stream")? {
        if !c.prompt_logprobs.is_empty() {
            out.prompt_tokens = c.prompt_logprobs.iter().map(|t| t.token).collect();
            if a.echo
                && c.prompt_logprobs
                    .iter()
                    .skip(1)
                    .any(|t| t.logprob.is_some())
            {
                out.prompt_logprobs = Some(c.prompt_logprobs.iter().map(|t| t.logprob).collect());
            }
        }
        if let Some(t) = c.token {
            out.tokens.push(t.token);
            out.logprobs.push(t.logprob.unwrap_or(f32::NAN));
            out.top_logprobs.push(
                t.top_logprobs
                    .iter()
                    .map(|x| (x.token, x.logprob))
                    .collect(),
            );
        }
        text.push_str(&c.text_delta);
        match PbFinish::try_from(c.finish_reason) {
            Ok(PbFinish::Stop) => out.finish_reason = FinishReason::Stop,
            Ok(PbFinish::Length) => out.finish_reason = FinishReason::Length,
            Ok(PbFinish::Error) => bail!("generation failed: {}", c.error),
            _ => {}
        }
    }
    if !text.is_empty() {
        out.text = Some(text);
    }
    print_generation(&out, a.json)
}

fn run_router(mut a: RouterArgs) -> Result<()> {
    init_tracing();
    let mut extra_listen = Vec::new();
    let mut attention_service = None;
    if let Some(path) = a.cluster_config.clone() {
        let cc = read_cluster_config(&path)?;
        refuse_rebalance_under_kubernetes(&path, &cc)?;
        a.model = Some(PathBuf::from(&cc.model.path));
        a.served_model_name = Some(cc.model.served_name.clone());
        a.max_model_len
            .get_or_insert(cc.attention.max_seq_len as usize);
        a.listen = any_addr(cc.router.http_port);
        extra_listen = vec![any_addr(cc.router.grpc_port), any_addr(cc.metrics_port)];
        a.attention = cc.attention.addresses.clone();
        // On Kubernetes the pods are the headless Service's DNS answer, followed while the
        // router runs (router/src/gateway.rs, `discovery_loop`).
        if a.attention.is_empty() {
            attention_service = Some(format!(
                "{}:{}",
                cc.attention.service, cc.attention.grpc_port
            ));
        }
    }
    let max_model_len = match (a.max_model_len, &a.model) {
        (Some(n), _) => n,
        (None, Some(d)) => {
            shardseek_worker::config::ModelConfig::from_dir(d)
                .with_context(|| format!("--model {}", d.display()))?
                .max_position_embeddings
        }
        (None, None) => 4096,
    };
    let served_model_name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model.as_ref().and_then(|d| d.file_name()).map_or_else(
            || "shardseek".to_string(),
            |n| n.to_string_lossy().to_string(),
        )
    });
    let cfg = shardseek_router::gateway::RouterConfig {
        listen: a.listen,
        attention: a.attention,
        attention_service,
        model_dir: a.model,
        served_model_name,
        max_model_len,
        extra_listen,
        chat_template: a.api.chat_template,
        reasoning_parser: a.api.reasoning_parser,
        api_key: a.api.api_key,
        allowed_origins: a.api.allowed_origins,
    };
    runtime()?.block_on(shardseek_router::gateway::run(cfg, shutdown_signal()))?;
    Ok(())
}

/// The cache directory `up` generates its default model into.
fn default_model_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("shardseek").join("tiny-fp8")
}

fn run_up(a: UpArgs) -> Result<()> {
    init_tracing();
    let model = match a.model.clone() {
        Some(m) => m,
        None => {
            let dir = default_model_dir();
            if !dir.join("model.safetensors.index.json").exists() {
                eprintln!("generating the tiny model into {}", dir.display());
                model_gen("tiny".into(), "fp8".into(), dir.clone(), 0, vec![])?;
            }
            dir
        }
    };
    let mcfg = shardseek_worker::config::ModelConfig::from_dir(&model)
        .with_context(|| format!("--model {}", model.display()))?;
    let rebalance = a
        .rebalance_interval
        .map(|secs| shardseek_router::local::RebalanceSettings {
            interval: std::time::Duration::from_secs(secs),
            experts: mcfg.n_routed_experts,
            groups: mcfg.n_group,
        });
    let served = model
        .file_name()
        .map_or_else(|| "shardseek".into(), |n| n.to_string_lossy().to_string());
    let cfg = shardseek_router::local::UpConfig {
        program: std::env::current_exe().context("locating the shardseek binary")?,
        model,
        attention: a.attention,
        expert_shards: a.expert_shards,
        redundant_experts: a.redundant_experts,
        port: a.port,
        attention_args: vec![
            "--dispatch-dtype".into(),
            a.dispatch_dtype.clone(),
            "--max-batch-tokens".into(),
            a.max_batch_tokens.to_string(),
            "--kv-cache-dtype".into(),
            a.kv_cache_dtype.clone(),
            "--device".into(),
            a.device.to_string(),
            "--lm-head-dtype".into(),
            a.lm_head_dtype.clone(),
            "--activation-dtype".into(),
            a.activation_dtype.name().into(),
        ]
        .into_iter()
        .chain(
            a.failover_wait_ms
                .map(|ms| ["--failover-wait-ms".to_string(), ms.to_string()])
                .into_iter()
                .flatten(),
        )
        .collect(),
        expert_args: vec![
            "--device".into(),
            a.experts_device.to_string(),
            "--activation-dtype".into(),
            a.activation_dtype.name().into(),
        ],
        router_args: a.api.to_args(),
        router_env: a.api.to_env(),
        served_model_name: served.clone(),
        // The children's stderr is a pipe to this process: they log in this terminal's format.
        env: vec![("SHARDSEEK_LOG_FORMAT".into(), log_format().into())],
        rebalance,
    };
    runtime()?.block_on(async move {
        let cluster = shardseek_router::local::LocalCluster::start(&cfg).await?;
        println!(
            "shardseek up: {served} on http://{} (OpenAI API at /v1, gRPC Gateway, /metrics) with {} attention pod(s) and {} expert shard(s)",
            cluster.addr, a.attention, a.expert_shards
        );
        println!(
            "shardseek supervisor: metrics on http://{}/metrics",
            cluster.metrics_addr
        );
        if a.demo {
            let result = demo_request(&cluster.addr, &served).await;
            cluster.stop().await;
            return result;
        }
        let reason = cluster.run().await?;
        eprintln!("shardseek up: stopped ({reason:?})");
        Ok(())
    })
}

/// One OpenAI chat completion through the router, printed: the demo of `up --demo`.
async fn demo_request(addr: &str, model: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "max_tokens": 24,
        "temperature": 0
    })
    .to_string();
    println!("POST /v1/chat/completions {body}");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .context("connecting to the router")?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let (head, payload) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.lines().next().unwrap_or_default();
    println!("{status}");
    println!("{payload}");
    if !status.contains(" 200 ") {
        bail!("the demo request failed: {status}");
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The log format: `SHARDSEEK_LOG_FORMAT` (`json` or `text`; the operator sets `json` in pods),
/// else JSON when stderr is not a terminal, human-readable when it is (DESIGN.md §7).
fn log_format() -> &'static str {
    use std::io::IsTerminal as _;
    match std::env::var("SHARDSEEK_LOG_FORMAT").as_deref() {
        Ok("json") => "json",
        Ok("text") => "text",
        _ if std::io::stderr().is_terminal() => "text",
        _ => "json",
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log_format() == "text" {
        builder.init();
    } else {
        builder.json().init();
    }
}

/// A worker or router does not rebalance: under Kubernetes the operator runs the rebalancer
/// (`spec.experts.rebalanceIntervalSeconds` of the DeepSeekDeployment) and renders no interval
/// into the cluster config, so a config that carries one was not written by the operator and
/// would be served with an interval nobody acts on: refused.
fn refuse_rebalance_under_kubernetes(
    path: &std::path::Path,
    cc: &shardseek_proto::cluster_config::ClusterConfig,
) -> Result<()> {
    if let Some(secs) = cc.experts.rebalance_interval_seconds {
        bail!(
            "--cluster-config {}: experts.rebalanceIntervalSeconds is {secs}, but workers and \
             routers do not rebalance: under Kubernetes the operator does (set \
             spec.experts.rebalanceIntervalSeconds of the DeepSeekDeployment), and under \
             `shardseek up` the supervisor does (--rebalance-interval); remove the field",
            path.display()
        );
    }
    Ok(())
}

/// Reads the operator's cluster config.
fn read_cluster_config(
    path: &std::path::Path,
) -> Result<shardseek_proto::cluster_config::ClusterConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--cluster-config {}", path.display()))?;
    shardseek_proto::cluster_config::ClusterConfig::from_json(&text)
        .with_context(|| format!("--cluster-config {}", path.display()))
}

/// Inside a pod: the pod's IP (`SHARDSEEK_POD_IP`, from the downward API) when given, else
/// every interface.
fn any_addr(port: u16) -> std::net::SocketAddr {
    let ip = std::env::var(shardseek_proto::cluster_config::ENV_POD_IP)
        .ok()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    std::net::SocketAddr::new(ip, port)
}

fn run_worker(mut a: WorkerArgs) -> Result<()> {
    init_tracing();
    if let Some(path) = a.cluster_config.clone() {
        use shardseek_proto::cluster_config::DispatchDtype;
        let cc = read_cluster_config(&path)?;
        refuse_rebalance_under_kubernetes(&path, &cc)?;
        a.model = Some(PathBuf::from(&cc.model.path));
        a.metrics_listen = Some(any_addr(cc.metrics_port));
        a.max_batch_tokens = cc.attention.max_batch_tokens as usize;
        a.max_seq_len = Some(cc.attention.max_seq_len as usize);
        a.kv_cache_dtype = cc.attention.kv_cache.dtype.as_str().into();
        a.kv_cache_memory = cc.attention.kv_cache.memory_bytes.map(|b| b.to_string());
        a.kv_cache_on_overflow = cc.attention.kv_cache.on_overflow.as_str().into();
        a.gpu_memory_utilization = cc.attention.kv_cache.gpu_memory_utilization;
        a.device = match a.role {
            Role::Attention => cc.attention.device,
            Role::Expert => cc.experts.device,
        };
        let act = match a.role {
            Role::Attention => cc.attention.activation_dtype,
            Role::Expert => cc.experts.activation_dtype,
        };
        a.activation_dtype = act
            .as_str()
            .parse()
            .with_context(|| format!("activationDtype {}", act.as_str()))?;
        a.dispatch_dtype = match cc.dispatch_dtype {
            DispatchDtype::F32 => "f32",
            DispatchDtype::Bf16 => "bf16",
            DispatchDtype::Fp8 => "fp8",
        }
        .into();
        // The config counts redundant slots over all shards; the placement takes them per shard.
        a.redundant_slots = (cc.experts.redundant_slots / cc.experts.shards.max(1)) as usize;
        if let Some(ms) = cc.experts.failover_wait_ms {
            a.failover_wait_ms = Some(ms.into());
        }
        a.shards = Some(cc.experts.shards as usize);
        match a.role {
            Role::Attention => {
                a.listen = any_addr(cc.attention.grpc_port);
                a.experts = cc.experts.addresses.clone();
            }
            Role::Expert => a.listen = any_addr(cc.experts.grpc_port),
        }
    }
    let model_dir = a
        .model
        .clone()
        .context("--model or --cluster-config is required")?;
    use shardseek_worker::engine::EngineConfig;
    use shardseek_worker::model::Overlap;
    let cfg = shardseek_worker::config::ModelConfig::from_dir(&model_dir)
        .with_context(|| format!("--model {}", model_dir.display()))?;
    let max_seq_len = a.max_seq_len.unwrap_or(cfg.max_position_embeddings);
    let kv_dtype: shardseek_worker::kv::KvDtype = a
        .kv_cache_dtype
        .parse()
        .with_context(|| format!("--kv-cache-dtype {}", a.kv_cache_dtype))?;
    let kv = if a.role == Role::Attention {
        size_kv_cache(&a, &cfg, max_seq_len)?
    } else {
        // Expert shards hold no KV cache.
        shardseek_worker::kv_sizing::KvSizing {
            blocks: 1,
            block_bytes: 0,
            max_seq_len,
            capped_from: None,
        }
    };
    let engine = EngineConfig {
        max_batch_tokens: a.max_batch_tokens,
        max_running_requests: a.max_running_requests,
        max_waiting_requests: a.max_waiting_requests,
        max_seq_len: kv.max_seq_len,
        kv_blocks: kv.blocks,
        prefix_key: a.prefix_cache_hash.key_fn(),
        kv_dtype,
    };
    match a.role {
        Role::Attention => {
            let wire_dtype: shardseek_router::WireDtype = a
                .dispatch_dtype
                .parse()
                .with_context(|| format!("--dispatch-dtype {}", a.dispatch_dtype))?;
            let acfg = shardseek_worker::serve::AttentionConfig {
                model: model_dir.clone(),
                listen: a.listen,
                engine,
                overlap: Overlap {
                    enabled: !a.no_overlap,
                    ..Overlap::default()
                },
                experts: a.experts,
                redundant_slots: a.redundant_slots,
                failover_wait: a.failover_wait_ms.map(std::time::Duration::from_millis),
                wire_dtype,
                metrics_listen: a.metrics_listen,
                placement_file: a.placement_file,
                device: a.device,
                lm_head_dtype: a
                    .lm_head_dtype
                    .parse()
                    .with_context(|| format!("--lm-head-dtype {}", a.lm_head_dtype))?,
                activations: a.activation_dtype,
            };
            runtime()?.block_on(shardseek_worker::serve::run_attention(
                acfg,
                shutdown_signal(),
            ))?;
        }
        Role::Expert => {
            let (Some(shard), Some(shards)) = (a.shard, a.shards) else {
                bail!("--role expert needs --shard (or SHARDSEEK_SHARD_ID) and --shards");
            };
            let ecfg = shardseek_worker::serve::ExpertRoleConfig {
                model: model_dir.clone(),
                listen: a.listen,
                shard,
                shards,
                redundant_slots: a.redundant_slots,
                batch_window: std::time::Duration::from_micros(a.batch_window_us),
                metrics_listen: a.metrics_listen,
                placement_file: a.placement_file,
                device: a.device,
                activations: a.activation_dtype,
            };
            runtime()?.block_on(shardseek_worker::serve::run_expert(ecfg, shutdown_signal()))?;
        }
    }
    Ok(())
}

/// The attention pod's KV cache from its flags (worker/src/kv_sizing.rs): checks that one
/// max-length sequence fits, caps or refuses as asked.
fn size_kv_cache(
    a: &WorkerArgs,
    cfg: &shardseek_worker::config::ModelConfig,
    max_seq_len: usize,
) -> Result<shardseek_worker::kv_sizing::KvSizing> {
    use shardseek_worker::kv_sizing;
    let dtype: shardseek_worker::kv::KvDtype = a
        .kv_cache_dtype
        .parse()
        .with_context(|| format!("--kv-cache-dtype {}", a.kv_cache_dtype))?;
    let on_overflow: kv_sizing::OnOverflow = a
        .kv_cache_on_overflow
        .parse()
        .map_err(|e| anyhow::anyhow!("--kv-cache-on-overflow {e}"))?;
    let block_bytes = kv_sizing::block_bytes(cfg, dtype);
    let budget = match (&a.kv_cache_memory, a.gpu_memory_utilization) {
        (Some(text), _) => {
            kv_sizing::parse_bytes(text).map_err(|e| anyhow::anyhow!("--kv-cache-memory {e}"))?
        }
        (None, Some(util)) => gpu_kv_budget(a, util)?,
        (None, None) => kv_sizing::auto_budget(block_bytes, max_seq_len, kv_sizing::memory_limit()),
    };
    let kv = kv_sizing::size(block_bytes, budget, max_seq_len, on_overflow)?;
    if let Some(asked) = kv.capped_from {
        tracing::warn!(
            max_seq_len = asked,
            capped_to = kv.max_seq_len,
            kv_cache_bytes = budget,
            "one max-length sequence does not fit the KV cache; capping the length"
        );
    }
    tracing::info!(
        kv_cache_bytes = budget,
        blocks = kv.blocks,
        dtype = %a.kv_cache_dtype,
        max_seq_len = kv.max_seq_len,
        "KV cache sized"
    );
    Ok(kv)
}

/// The KV cache budget under `--gpu-memory-utilization`: that fraction of the device's memory,
/// less the weights this pod uploads (every tensor of the checkpoint except, with expert shards,
/// the routed experts).
fn gpu_kv_budget(a: &WorkerArgs, util: f64) -> Result<u64> {
    let Device::Cuda(n) = a.device else {
        bail!("--gpu-memory-utilization {util}: applies only with --device cuda[:N]");
    };
    if !(util > 0.0 && util <= 1.0) {
        bail!("--gpu-memory-utilization {util}: must be in (0, 1]");
    }
    let total = shardseek_worker::backend::device_memory(a.device)
        .with_context(|| format!("--device cuda:{n}"))?;
    let dir = a.model.as_ref().context("--model is required")?;
    let weights =
        shardseek_worker::weights::Store::open(dir)?.resident_bytes(!a.experts.is_empty());
    let usable = (total as f64 * util) as u64;
    let budget = usable.checked_sub(weights as u64).with_context(|| {
        format!(
            "--gpu-memory-utilization {util}: {usable} bytes of cuda:{n} do not hold the {weights} bytes of weights"
        )
    })?;
    tracing::info!(
        device_bytes = total,
        weight_bytes = weights,
        kv_cache_bytes = budget,
        "KV cache sized from --gpu-memory-utilization"
    );
    Ok(budget)
}

fn run_bench(b: BenchCommand) -> Result<()> {
    match b {
        BenchCommand::Serve(a) => return run_bench_serve(a),
        BenchCommand::Model {
            model,
            prompt_len,
            decode,
            batch,
            kv_cache_dtype,
            device,
            lm_head_dtype,
            activation_dtype,
            json,
        } => {
            let lm_head: shardseek_worker::model::LmHeadDtype = lm_head_dtype
                .parse()
                .with_context(|| format!("--lm-head-dtype {lm_head_dtype}"))?;
            let kv: shardseek_worker::kv::KvDtype = kv_cache_dtype
                .parse()
                .with_context(|| format!("--kv-cache-dtype {kv_cache_dtype}"))?;
            let backend = shardseek_worker::backend::for_device(device, activation_dtype)?;
            let r = shardseek_worker::speed::measure(
                &model, prompt_len, decode, &batch, kv, backend, lm_head,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: {}, {} KV cache, lm_head {}; load {:.1}s (peak RSS {:.0} MB of {:.0} MB files); prompt {} tokens, decode {} tokens per sequence",
                    model.display(),
                    r.backend,
                    r.kv_cache_dtype,
                    r.lm_head_dtype,
                    r.load_seconds,
                    r.load_peak_rss_bytes as f64 / 1e6,
                    r.checkpoint_bytes as f64 / 1e6,
                    r.prompt_tokens,
                    r.decode_tokens,
                );
                println!("batch  prefill tok/s  decode tok/s  step p50 ms  step p90 ms");
                for b in &r.batches {
                    println!(
                        "{:>5}  {:>13.1}  {:>12.2}  {:>11.1}  {:>11.1}",
                        b.batch,
                        b.prefill_tokens_per_s,
                        b.decode_tokens_per_s,
                        b.decode_ms_p50,
                        b.decode_ms_p90
                    );
                }
                println!("peak RSS {:.0} MB", r.peak_rss_bytes as f64 / 1e6);
            }
        }
        BenchCommand::Dispatch {
            json,
            dtype,
            iterations,
            tokens,
            message_bytes,
        } => {
            use shardseek_worker::expert::bench;
            let config = bench::DispatchBenchConfig {
                iterations,
                batches: tokens,
                message_bytes,
                ..bench::DispatchBenchConfig::default()
            }
            .with_dtype(&dtype)?;
            let report = bench::run(&config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
        BenchCommand::Kernels {
            device: Device::Cuda(_),
            only,
            ..
        } if !only.is_empty() => {
            bail!("bench kernels --device cuda measures every row; drop --only")
        }
        BenchCommand::Kernels {
            json: false,
            device: Device::Cuda(n),
            ..
        } => bench_cuda_kernels(n as usize)?,
        BenchCommand::Kernels {
            json: true,
            device: Device::Cuda(_),
            ..
        } => bail!("bench kernels --device cuda prints a table only; drop --json"),
        BenchCommand::Kernels { json, only, .. } => {
            let only = shardseek_kernels::bench::Only(only);
            let report = shardseek_kernels::bench::run(&only, |line| {
                if !json {
                    eprintln!("{line}");
                }
            })?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.table());
            }
        }
    }
    Ok(())
}

/// `bench kernels --device cuda[:N]`.
#[cfg(feature = "cuda")]
fn bench_cuda_kernels(ordinal: usize) -> Result<()> {
    let dev = shardseek_kernels::cuda::CudaBackend::new(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}"))?;
    let report = shardseek_kernels::cuda::bench::run(&dev, |line| eprintln!("{line}"))?;
    print!("{}", report.table());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda_kernels(ordinal: usize) -> Result<()> {
    bail!(
        "--device cuda:{ordinal}: this binary was built without CUDA support (cargo build --features cuda)"
    )
}

fn run_bench_serve(a: BenchServeArgs) -> Result<()> {
    use shardseek_router::openai::bench::{BenchConfig, run_blocking};
    let report = run_blocking(BenchConfig {
        url: a.url,
        requests: a.requests,
        concurrency: a.concurrency,
        rate: a.rate,
        input_len: a.input_len,
        shared_prefix_len: a.shared_prefix_len,
        output_len: a.output_len,
        model: a.model,
        vocab: a.vocab,
        seed: a.seed,
        request_timeout: std::time::Duration::from_secs(a.request_timeout),
        json_schema: match &a.json_schema {
            Some(p) => Some(
                serde_json::from_str(
                    &std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("{} is not JSON", p.display()))?,
            ),
            None => None,
        },
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    if report.completed == 0 {
        bail!("no request completed");
    }
    Ok(())
}

/// Peak resident set size of this process, from /proc (Linux); None elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn model_pull(source: &str, out: &std::path::Path, include: &[String]) -> Result<()> {
    init_tracing();
    let src = shardseek_worker::pull::HubSource::parse(source)?;
    let cfg = shardseek_worker::pull::PullConfig::from_env();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = rt
        .block_on(shardseek_worker::pull::pull(&src, out, &cfg, include))
        .with_context(|| format!("pulling {src} from {} into {}", cfg.endpoint, out.display()))?;
    println!(
        "{src} at commit {}: {} downloaded ({} resumed, {:.1} MB received), {} already present",
        report.commit,
        report.downloaded,
        report.resumed,
        report.bytes_received as f64 / 1e6,
        report.skipped,
    );
    Ok(())
}

fn model_gen(
    preset: String,
    dtype: String,
    out: PathBuf,
    seed: u64,
    set: Vec<String>,
) -> anyhow::Result<()> {
    let mut opts = modelgen::GenOptions::new(&preset, dtype.parse()?, seed, out);
    for s in &set {
        opts = opts.set(s)?;
    }
    let report = modelgen::generate(&opts)
        .with_context(|| format!("generating preset {preset} into {}", opts.out.display()))?;
    println!(
        "wrote {} ({} shards, {} tensors, {:.1} MB of weights) in {:.2}s, peak RSS {}",
        report.out.display(),
        report.shards,
        report.tensors,
        report.total_size as f64 / 1e6,
        report.elapsed.as_secs_f64(),
        peak_rss_bytes().map_or("unknown".to_string(), |b| format!(
            "{:.1} MB",
            b as f64 / 1e6
        )),
    );
    Ok(())
}
