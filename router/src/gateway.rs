//! The gateway (DESIGN.md §2 steps 1 and 7): the public port of a cluster. It tokenizes,
//! picks an attention pod (fewest outstanding tokens among the healthy ones), forwards
//! `Attention.Generate`, and serves both the OpenAI HTTP API and the public gRPC `Gateway`
//! on one port.
//!
//! Retry: a request whose pod fails before its first event is retried once on another pod;
//! after the first token it fails (its tokens cannot be recalled). A pod that fails its health
//! check is taken out until it answers again.

use crate::openai::backend::{ConstraintKind, TemplateOptions};
use crate::openai::types::{GenerationDefaults, SamplingRequest, Stop};
use crate::openai::{
    self, AppState, Backend, BackendError, FinishReason, TextCodec, TokenEvent, TokenRequest,
    TokenStream,
};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use shardseek_proto::v1::attention_client::AttentionClient;
use shardseek_proto::v1::gateway_server::{Gateway, GatewayServer};
use shardseek_proto::v1::{
    self as pb, GenerateChunk, GenerateRequest, HealthReply, HealthRequest, TokenIds, TokenLogprob,
    Usage, generate_request,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// How often pods are health-checked, and how long a check may take.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the attention service's DNS name is resolved again (a headless Service answers
/// with one address per ready pod): a new pod gets traffic within this time, a removed one
/// stops getting new requests (health checks take a dead pod out sooner, within
/// `HEALTH_INTERVAL`). Kubernetes' DNS caches answers for 5 s (CoreDNS default TTL for
/// headless services is 5 s too), so resolving faster would see nothing newer.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Largest message between router and pods (prompts of 100k tokens fit easily).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Settings of the router process.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub listen: SocketAddr,
    /// Attention pod addresses (`host:port`).
    pub attention: Vec<String>,
    /// A `host:port` whose DNS answer lists the attention pods (the headless Service): resolved
    /// every [`DISCOVERY_INTERVAL`], pods are added and dropped as the answer changes. Its
    /// addresses join [`RouterConfig::attention`].
    pub attention_service: Option<String>,
    /// Model directory, for tokenizer.json / tokenizer_config.json (optional files).
    pub model_dir: Option<PathBuf>,
    pub served_model_name: String,
    pub max_model_len: usize,
    /// More addresses serving the same app (Kubernetes gives the gRPC API and metrics their
    /// own ports).
    pub extra_listen: Vec<SocketAddr>,
    /// A Jinja file replacing the checkpoint's chat template.
    pub chat_template: Option<PathBuf>,
    /// `deepseek-r1`, or None to choose from the template (a `<think>` in it selects it).
    pub reasoning_parser: Option<String>,
    /// Clients must send `Authorization: Bearer KEY` (None: no authentication).
    pub api_key: Option<String>,
    /// CORS origins allowed (`*` for any); empty sends no CORS headers.
    pub allowed_origins: Vec<String>,
}

struct Pod {
    addr: String,
    client: AttentionClient<Channel>,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
}

/// The attention pods and their load. The set of pods can change while the router runs
/// ([`AttentionPool::set_members`], driven by [`AttentionPool::discovery_loop`]); a request in
/// flight keeps its pod's client until it ends.
pub struct AttentionPool {
    pods: std::sync::RwLock<Vec<Arc<Pod>>>,
    /// Addresses that are always members (`--attention`); discovery adds to them.
    fixed: Vec<String>,
    next_id: AtomicU64,
}

fn connect_pod(a: &str) -> Result<Arc<Pod>, BackendError> {
    let uri = if a.contains("://") {
        a.to_string()
    } else {
        format!("http://{a}")
    };
    let ep = Endpoint::from_shared(uri)
        .map_err(|e| BackendError::Invalid(format!("attention pod address {a}: {e}")))?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2));
    let client = AttentionClient::new(ep.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Arc::new(Pod {
        addr: a.to_string(),
        client,
        outstanding: AtomicUsize::new(0),
        healthy: AtomicBool::new(true),
    }))
}

impl AttentionPool {
    /// Lazily connected clients to `addrs`; all start healthy until a check says otherwise.
    pub fn new(addrs: &[String]) -> Result<Arc<Self>, BackendError> {
        let pods = addrs
            .iter()
            .map(|a| connect_pod(a))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            pods: std::sync::RwLock::new(pods),
            fixed: addrs.to_vec(),
            next_id: AtomicU64::new(1),
        }))
    }

    fn snapshot(&self) -> Vec<Arc<Pod>> {
        self.pods.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The addresses of the current members, in order.
    pub fn members(&self) -> Vec<String> {
        self.snapshot().iter().map(|p| p.addr.clone()).collect()
    }

    /// Makes the members exactly the fixed addresses plus `discovered`: pods not listed any more
    /// get no new requests (their requests in flight go on), new ones join as healthy, and the
    /// pods that stay keep their connection and load count. Returns (added, removed).
    pub fn set_members(&self, discovered: &[String]) -> Result<(usize, usize), BackendError> {
        let mut want: Vec<String> = self.fixed.clone();
        for a in discovered {
            if !want.contains(a) {
                want.push(a.clone());
            }
        }
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        let before = pods.len();
        pods.retain(|p| want.contains(&p.addr));
        let removed = before - pods.len();
        let mut added = 0;
        for a in &want {
            if !pods.iter().any(|p| &p.addr == a) {
                pods.push(connect_pod(a)?);
                added += 1;
            }
        }
        Ok((added, removed))
    }

    /// Resolves `host_port` every `interval` forever (spawn it) and makes the addresses of each
    /// answer the members. A failed lookup keeps the members as they are: the health checks
    /// already take dead pods out, and a resolver hiccup must not empty the pool.
    pub async fn discovery_loop(self: Arc<Self>, host_port: String, interval: Duration) {
        loop {
            match tokio::net::lookup_host(host_port.as_str()).await {
                Ok(found) => {
                    let mut addrs: Vec<String> = found.map(|a| a.to_string()).collect();
                    addrs.sort();
                    addrs.dedup();
                    match self.set_members(&addrs) {
                        Ok((0, 0)) => {}
                        Ok((added, removed)) => tracing::info!(
                            service = %host_port, added, removed, members = ?self.members(),
                            "attention pods changed"
                        ),
                        Err(e) => {
                            tracing::warn!(service = %host_port, error = %e, "attention discovery")
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(service = %host_port, error = %e, "attention service did not resolve")
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    fn pick(&self, exclude: &[String]) -> Option<Arc<Pod>> {
        self.snapshot()
            .into_iter()
            .filter(|p| !exclude.contains(&p.addr) && p.healthy.load(Ordering::Relaxed))
            .min_by_key(|p| p.outstanding.load(Ordering::Relaxed))
    }

    /// Checks every pod's health forever (spawn it).
    pub async fn health_loop(self: Arc<Self>) {
        loop {
            for p in &self.snapshot() {
                let mut c = p.client.clone();
                let ok = tokio::time::timeout(HEALTH_TIMEOUT, c.health(HealthRequest {}))
                    .await
                    .map(|r| r.map(|r| r.into_inner().serving).unwrap_or(false))
                    .unwrap_or(false);
                if ok != p.healthy.swap(ok, Ordering::Relaxed) {
                    tracing::warn!(pod = %p.addr, healthy = ok, "attention pod health changed");
                }
            }
            tokio::time::sleep(HEALTH_INTERVAL).await;
        }
    }
}

/// tonic's prefix for a status it made from a failed HTTP/2 connection or stream (a reset, a
/// connection closed under the call), as opposed to a status the pod sent.
const H2_FAILURE: &str = "h2 protocol error";

fn map_status(s: &Status) -> BackendError {
    match s.code() {
        tonic::Code::InvalidArgument => BackendError::Invalid(s.message().to_string()),
        tonic::Code::ResourceExhausted => BackendError::QueueFull(s.message().to_string()),
        // Cancelled: the pod's connection went away under the call (a pod shutting down
        // refuses new streams with GOAWAY); before the first event that is retried elsewhere.
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            BackendError::Unavailable(s.message().to_string())
        }
        // The transport failed (a pod's connection reset or closed while it shut down during a
        // rollout): tonic reports that as Internal or Unknown, but it is the pod that is gone,
        // not the request that is bad, so it is retried elsewhere like Unavailable.
        tonic::Code::Internal | tonic::Code::Unknown if s.message().starts_with(H2_FAILURE) => {
            BackendError::Unavailable(s.message().to_string())
        }
        _ => BackendError::Internal(s.message().to_string()),
    }
}

fn events_of(c: GenerateChunk) -> Vec<Result<TokenEvent, BackendError>> {
    let mut out = Vec::new();
    if c.prompt_logprobs.iter().any(|t| t.logprob.is_some())
        || (!c.prompt_logprobs.is_empty() && c.prompt_logprobs.len() == 1)
    {
        out.push(Ok(TokenEvent::PromptLogprobs(
            c.prompt_logprobs.iter().map(|t| t.logprob).collect(),
        )));
    }
    if let Some(t) = c.token {
        out.push(Ok(TokenEvent::Token {
            id: t.token,
            logprob: t.logprob.unwrap_or(f32::NAN),
            top: t
                .top_logprobs
                .iter()
                .map(|x| (x.token, x.logprob))
                .collect(),
        }));
    }
    let cached = c.usage.map(|u| u.cached_tokens as usize).unwrap_or(0);
    let reason = match pb::FinishReason::try_from(c.finish_reason) {
        Ok(pb::FinishReason::Stop) => Some(FinishReason::Stop),
        Ok(pb::FinishReason::Length) => Some(FinishReason::Length),
        Ok(pb::FinishReason::Error) => {
            out.push(Err(BackendError::Internal(c.error.clone())));
            None
        }
        _ => None,
    };
    if let Some(reason) = reason {
        let u = c.usage.unwrap_or_default();
        out.push(Ok(TokenEvent::Finished {
            reason,
            prompt_tokens: u.prompt_tokens as usize,
            completion_tokens: u.completion_tokens as usize,
            cached_tokens: cached,
        }));
    }
    out
}

/// Lowers the pod's outstanding count when the request's stream is dropped.
struct Outstanding {
    pod: Arc<Pod>,
    n: usize,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.pod.outstanding.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// [`Backend`] over the attention pods' gRPC API.
pub struct GrpcBackend {
    pool: Arc<AttentionPool>,
}

impl GrpcBackend {
    pub fn new(pool: Arc<AttentionPool>) -> Self {
        Self { pool }
    }
}

impl Backend for GrpcBackend {
    fn generate(&self, req: TokenRequest) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        let pool = self.pool.clone();
        async move {
            let id = pool.next_id.fetch_add(1, Ordering::Relaxed);
            let wire = GenerateRequest {
                request_id: format!("r{id}"),
                prompt: Some(generate_request::Prompt::Tokens(TokenIds {
                    ids: req.prompt.clone(),
                })),
                max_tokens: req.max_tokens as u32,
                temperature: req.temperature,
                top_p: req.top_p,
                top_k: req.top_k as u32,
                seed: Some(req.seed),
                logprobs: req.top_logprobs as u32,
                token_logprob: Some(req.token_logprob),
                echo: req.echo,
                stop: Vec::new(),
                ignore_eos: req.ignore_eos,
                stop_token_ids: req.stop_token_ids.clone(),
                min_p: req.logits.min_p,
                presence_penalty: req.logits.presence_penalty,
                frequency_penalty: req.logits.frequency_penalty,
                repetition_penalty: req.logits.repetition_penalty,
                logit_bias: req.logits.logit_bias.iter().copied().collect(),
                min_tokens: req.logits.min_tokens as u32,
                constraint: req.constraint.as_ref().map(|c| pb::Constraint {
                    kind: Some(match &c.kind {
                        ConstraintKind::JsonSchema(s) => {
                            pb::constraint::Kind::JsonSchema(s.clone())
                        }
                        ConstraintKind::Regex(s) => pb::constraint::Kind::Regex(s.clone()),
                        ConstraintKind::Lark(s) => pb::constraint::Kind::Lark(s.clone()),
                    }),
                    start_after: c.start_after,
                }),
                skip_special_tokens: None,
                cache_salt: req.cache_salt.clone(),
            };
            let mut tried = Vec::new();
            let mut last_err = BackendError::Unavailable("no healthy attention pod".into());
            while let Some(pod) = pool.pick(&tried) {
                tried.push(pod.addr.clone());
                let n = req.prompt.len() + req.max_tokens;
                pod.outstanding.fetch_add(n, Ordering::Relaxed);
                let guard = Outstanding {
                    pod: pod.clone(),
                    n,
                };
                let mut client = pod.client.clone();
                let mut stream = match client.generate(wire.clone()).await {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        last_err = map_status(&s);
                        if matches!(last_err, BackendError::Unavailable(_)) {
                            pod.healthy.store(false, Ordering::Relaxed);
                            continue;
                        }
                        return Err(last_err);
                    }
                };
                // Retry on another pod only until the first event arrives.
                let first = match stream.message().await {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        return Err(BackendError::Internal(format!(
                            "pod {} ended the stream at once",
                            pod.addr
                        )));
                    }
                    Err(s) => {
                        last_err = map_status(&s);
                        if matches!(last_err, BackendError::Unavailable(_)) {
                            pod.healthy.store(false, Ordering::Relaxed);
                            continue;
                        }
                        return Err(last_err);
                    }
                };
                let addr = pod.addr.clone();
                let rest = stream.map(move |m| match m {
                    Ok(c) => futures::stream::iter(events_of(c)),
                    Err(s) => futures::stream::iter(vec![Err(BackendError::Unavailable(format!(
                        "attention pod {addr}: {}",
                        s.message()
                    )))]),
                });
                let all = futures::stream::iter(events_of(first))
                    .chain(rest.flatten())
                    .map(move |e| {
                        let _keep = &guard;
                        e
                    });
                return Ok(all.boxed());
            }
            Err(last_err)
        }
        .boxed()
    }

    fn ready(&self) -> bool {
        self.pool
            .snapshot()
            .iter()
            .any(|p| p.healthy.load(Ordering::Relaxed))
    }
}

/// [`TextCodec`] over the model's tokenizer files.
pub struct TokenizerCodec(pub Arc<Tokenizer>);

impl TextCodec for TokenizerCodec {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.0
            .encode(text, add_special_tokens)
            .map_err(|e| e.to_string())
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        self.0
            .decode(ids, skip_special_tokens)
            .map_err(|e| e.to_string())
    }
    fn apply_chat_template(
        &self,
        messages: &[serde_json::Value],
        opts: &TemplateOptions,
    ) -> Result<String, String> {
        let mut extra = opts.kwargs.clone();
        if let Some(t) = &opts.tools {
            extra.insert("tools".into(), t.clone());
        }
        self.0
            .apply_chat_template_with(
                messages,
                opts.add_generation_prompt,
                &serde_json::Value::Object(extra),
            )
            .map_err(|e| e.to_string())
    }
    fn token_id(&self, token: &str) -> Option<u32> {
        self.0.token_to_id(token)
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.0.eos_token_ids().to_vec()
    }
    fn chat_template_source(&self) -> Option<String> {
        self.0.chat_template_source().map(str::to_string)
    }
}

/// The public gRPC `Gateway`: the same requests as the HTTP API, token ids or text.
pub struct GatewayService {
    backend: Arc<GrpcBackend>,
    tokenizer: Option<Arc<Tokenizer>>,
    defaults: GenerationDefaults,
}

/// The gRPC request's parameters as the one request-parameter struct the HTTP API validates
/// (zero values of proto3 scalars mean "unset").
fn sampling_request(r: &GenerateRequest) -> SamplingRequest {
    let nz = |v: f32| (v != 0.0).then_some(f64::from(v));
    SamplingRequest {
        temperature: Some(f64::from(r.temperature)),
        top_p: nz(r.top_p),
        top_k: (r.top_k != 0).then_some(i64::from(r.top_k)),
        min_p: nz(r.min_p),
        seed: r.seed.map(|s| s as i64),
        stop: (!r.stop.is_empty()).then(|| Stop::Many(r.stop.clone())),
        stop_token_ids: Some(r.stop_token_ids.clone()),
        ignore_eos: Some(r.ignore_eos),
        presence_penalty: nz(r.presence_penalty),
        frequency_penalty: nz(r.frequency_penalty),
        repetition_penalty: nz(r.repetition_penalty),
        logit_bias: (!r.logit_bias.is_empty()).then(|| {
            r.logit_bias
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                .collect()
        }),
        min_tokens: (r.min_tokens != 0).then_some(u64::from(r.min_tokens)),
        skip_special_tokens: r.skip_special_tokens,
        cache_salt: r.cache_salt.clone(),
        structured_outputs: r.constraint.as_ref().map(|c| {
            let mut so = openai::types::StructuredOutputs::default();
            match &c.kind {
                Some(pb::constraint::Kind::JsonSchema(s)) => {
                    so.json = Some(serde_json::Value::String(s.clone()))
                }
                Some(pb::constraint::Kind::Regex(s)) => so.regex = Some(s.clone()),
                Some(pb::constraint::Kind::Lark(s)) => so.grammar = Some(s.clone()),
                None => {}
            }
            so
        }),
        ..SamplingRequest::default()
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type GenerateStream = ChunkStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        let prompt = match &r.prompt {
            Some(generate_request::Prompt::Tokens(t)) => t.ids.clone(),
            Some(generate_request::Prompt::Text(text)) => {
                let tok = self.tokenizer.as_ref().ok_or_else(|| {
                    Status::invalid_argument(
                        "prompt: text needs the model's tokenizer.json; send token ids",
                    )
                })?;
                tok.encode(text, true)
                    .map_err(|e| Status::invalid_argument(format!("prompt: {e}")))?
            }
            None => return Err(Status::invalid_argument("prompt: missing")),
        };
        if !r.stop.is_empty() {
            return Err(Status::invalid_argument(
                "stop: stop strings are supported on the HTTP API; use stop_token_ids here",
            ));
        }
        // The same validation as the HTTP API's, on the same struct.
        let s = sampling_request(&r).validate(&self.defaults).map_err(|e| {
            Status::invalid_argument(format!(
                "{}: {}",
                e.param.as_deref().unwrap_or("request"),
                e.message
            ))
        })?;
        let skip_special = s.skip_special_tokens;
        let req = TokenRequest {
            prompt: prompt.clone(),
            max_tokens: r.max_tokens as usize,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: s.seed.unwrap_or(0),
            top_logprobs: r.logprobs as usize,
            token_logprob: r.token_logprob.unwrap_or(true),
            echo: r.echo,
            ignore_eos: s.ignore_eos,
            stop_token_ids: s.stop_token_ids,
            logits: s.logits,
            constraint: s.constraint.map(|kind| openai::backend::Constraint {
                kind,
                start_after: r.constraint.as_ref().and_then(|c| c.start_after),
            }),
            cache_salt: r.cache_salt.clone(),
        };
        let events = self.backend.generate(req).await.map_err(|e| match e {
            BackendError::Invalid(m) => Status::invalid_argument(m),
            BackendError::QueueFull(m) => Status::resource_exhausted(m),
            BackendError::Unavailable(m) => Status::unavailable(m),
            BackendError::Internal(m) => Status::internal(m),
        })?;
        let tokenizer = self.tokenizer.clone();
        let rid = r.request_id.clone();
        // The first chunk always names the prompt's token ids (log-probs only with echo), so a
        // client that sent text learns how it was tokenized.
        let head = GenerateChunk {
            request_id: rid.clone(),
            prompt_logprobs: prompt
                .iter()
                .map(|&t| TokenLogprob {
                    token: t,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut decoder = IncrementalDecoder::new(skip_special);
        let body = events.map(move |ev| {
            let text_of = |id: u32| {
                tokenizer
                    .as_ref()
                    .and_then(|t| t.decode(&[id], false).ok())
                    .unwrap_or_default()
            };
            match ev {
                Ok(TokenEvent::PromptLogprobs(lps)) => Ok(GenerateChunk {
                    request_id: rid.clone(),
                    prompt_logprobs: prompt
                        .iter()
                        .zip(lps)
                        .map(|(&t, lp)| TokenLogprob {
                            token: t,
                            text: text_of(t),
                            logprob: lp,
                            top_logprobs: vec![],
                        })
                        .collect(),
                    ..Default::default()
                }),
                Ok(TokenEvent::Token { id, logprob, top }) => {
                    let delta = tokenizer
                        .as_ref()
                        .and_then(|t| decoder.step(t, id).ok().flatten())
                        .unwrap_or_default();
                    Ok(GenerateChunk {
                        request_id: rid.clone(),
                        token: Some(TokenLogprob {
                            token: id,
                            text: text_of(id),
                            logprob: Some(logprob),
                            top_logprobs: top
                                .into_iter()
                                .map(|(t, lp)| pb::TopLogprob {
                                    token: t,
                                    logprob: lp,
                                    text: text_of(t),
                                })
                                .collect(),
                        }),
                        text_delta: delta,
                        ..Default::default()
                    })
                }
                Ok(TokenEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                }) => {
                    let tail = tokenizer
                        .as_ref()
                        .and_then(|t| decoder.finish(t).ok().flatten())
                        .unwrap_or_default();
                    Ok(GenerateChunk {
                        request_id: rid.clone(),
                        text_delta: tail,
                        finish_reason: match reason {
                            FinishReason::Stop => pb::FinishReason::Stop as i32,
                            FinishReason::Length => pb::FinishReason::Length as i32,
                        },
                        usage: Some(Usage {
                            prompt_tokens: prompt_tokens as u32,
                            completion_tokens: completion_tokens as u32,
                            cached_tokens: cached_tokens as u32,
                        }),
                        ..Default::default()
                    })
                }
                Err(e) => Err(Status::unavailable(e.to_string())),
            }
        });
        Ok(Response::new(Box::pin(
            futures::stream::iter([Ok(head)]).chain(body),
        )))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        let serving = self.backend.ready();
        Ok(Response::new(HealthReply {
            serving,
            status: if serving {
                "serving".into()
            } else {
                "no healthy attention pod".into()
            },
        }))
    }
}

/// Runs the router until `shutdown`: OpenAI HTTP API and gRPC `Gateway` on `cfg.listen`.
/// Prints `READY <addr>` on stdout once it serves.
pub async fn run(
    cfg: RouterConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    let io = |op: &str, e: std::io::Error| crate::Error::Io {
        op: op.into(),
        source: e,
    };
    let pool =
        AttentionPool::new(&cfg.attention).map_err(|e| crate::Error::Input(e.to_string()))?;
    tokio::spawn(pool.clone().health_loop());
    if let Some(service) = cfg.attention_service.clone() {
        tokio::spawn(pool.clone().discovery_loop(service, DISCOVERY_INTERVAL));
    }
    let backend = Arc::new(GrpcBackend::new(pool));
    let mut tokenizer = match &cfg.model_dir {
        Some(d) if d.join("tokenizer.json").exists() => Some(
            Tokenizer::from_dir(d).map_err(|e| crate::Error::Input(format!("tokenizer: {e}")))?,
        ),
        _ => None,
    };
    if let Some(path) = &cfg.chat_template {
        let tok = tokenizer.as_mut().ok_or_else(|| {
            crate::Error::Input("--chat-template needs the model's tokenizer.json".into())
        })?;
        let src = std::fs::read_to_string(path).map_err(|e| crate::Error::Io {
            op: format!("reading --chat-template {}", path.display()),
            source: e,
        })?;
        tok.set_chat_template(src)
            .map_err(|e| crate::Error::Input(format!("--chat-template {}: {e}", path.display())))?;
    }
    let tokenizer = tokenizer.map(Arc::new);
    let defaults = match &cfg.model_dir {
        Some(d) => GenerationDefaults::from_dir(d).map_err(crate::Error::Input)?,
        None => GenerationDefaults::default(),
    };
    let reasoning = match cfg.reasoning_parser.as_deref() {
        Some(p) if openai::reasoning::PARSERS.contains(&p) => true,
        Some("none") => false,
        Some(p) => {
            return Err(crate::Error::Input(format!(
                "--reasoning-parser {p:?}: known parsers are {:?} (or none)",
                openai::reasoning::PARSERS
            )));
        }
        // Chosen automatically when the template opens a thinking block.
        None => tokenizer
            .as_ref()
            .and_then(|t| t.chat_template_source())
            .is_some_and(|s| s.contains("<think>")),
    };
    let codec: Option<Arc<dyn TextCodec>> = tokenizer
        .clone()
        .map(|t| Arc::new(TokenizerCodec(t)) as Arc<dyn TextCodec>);
    let metrics =
        openai::Metrics::new().map_err(|e| crate::Error::Input(format!("metrics: {e}")))?;
    let mut state = AppState::new(
        backend.clone(),
        codec,
        cfg.served_model_name.clone(),
        cfg.max_model_len,
        metrics,
    );
    state.defaults = defaults.clone();
    state.reasoning = reasoning;
    state.api_key = cfg.api_key.clone();
    state.allowed_origins = cfg.allowed_origins.clone();
    tracing::info!(reasoning_parser = reasoning, ?defaults, "router settings");
    let gateway = GatewayServer::new(GatewayService {
        backend,
        tokenizer,
        defaults,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // gRPC calls are routed by their path; everything else is the HTTP API (with its own
    // OpenAI-shaped 404 fallback).
    let app = openai::router(state).route_service("/shardseek.v1.Gateway/{*method}", gateway);
    for extra in &cfg.extra_listen {
        let l = tokio::net::TcpListener::bind(extra)
            .await
            .map_err(|e| io("bind", e))?;
        let app = app.clone();
        tokio::spawn(async move {
            let _ = openai::serve_app(l, app, std::future::pending()).await;
        });
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| io("bind", e))?;
    let addr = listener.local_addr().map_err(|e| io("local_addr", e))?;
    println!("READY {addr}");
    openai::serve_app(listener, app, shutdown)
        .await
        .map_err(|e| io("serve", e))
}

#[cfg(test)]
mod discovery_tests {
    use super::*;

    #[test]
    fn transport_failures_are_retryable_and_pod_errors_are_not() {
        for s in [
            Status::unavailable("pod draining"),
            Status::cancelled("connection closed"),
            Status::internal("h2 protocol error: http2 error"),
            Status::unknown("h2 protocol error: connection reset"),
        ] {
            assert!(
                matches!(map_status(&s), BackendError::Unavailable(_)),
                "{s:?}"
            );
        }
        assert!(matches!(
            map_status(&Status::internal("generation failed: expert shard 1")),
            BackendError::Internal(_)
        ));
        assert!(matches!(
            map_status(&Status::invalid_argument("prompt too long")),
            BackendError::Invalid(_)
        ));
    }

    #[tokio::test]
    async fn members_follow_the_discovered_addresses() {
        let pool = AttentionPool::new(&["127.0.0.1:1".to_string()]).unwrap();
        let (a, b) = ("127.0.0.2:50052".to_string(), "127.0.0.3:50052".to_string());
        assert_eq!(pool.set_members(&[a.clone(), b.clone()]).unwrap(), (2, 0));
        assert_eq!(pool.members(), ["127.0.0.1:1", a.as_str(), b.as_str()]);
        // A pod that stays keeps its connection and its load count.
        let kept = pool.pick(&["127.0.0.1:1".to_string(), b.clone()]).unwrap();
        kept.outstanding.store(7, Ordering::Relaxed);
        assert_eq!(pool.set_members(std::slice::from_ref(&a)).unwrap(), (0, 1));
        assert_eq!(pool.members(), ["127.0.0.1:1", a.as_str()]);
        let again = pool.pick(&["127.0.0.1:1".to_string()]).unwrap();
        assert!(Arc::ptr_eq(&kept, &again));
        assert_eq!(again.outstanding.load(Ordering::Relaxed), 7);
        // An empty answer drops every discovered pod, never the fixed ones.
        assert_eq!(pool.set_members(&[]).unwrap(), (0, 1));
        assert_eq!(pool.members(), ["127.0.0.1:1"]);
    }

    #[tokio::test]
    async fn discovery_resolves_the_service_name() {
        let pool = AttentionPool::new(&[]).unwrap();
        assert!(pool.members().is_empty());
        tokio::spawn(
            pool.clone()
                .discovery_loop("localhost:50052".into(), Duration::from_millis(50)),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !pool.members().iter().any(|m| m == "127.0.0.1:50052") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "localhost never joined: {:?}",
                pool.members()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
