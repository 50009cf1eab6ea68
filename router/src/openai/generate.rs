//! From backend token streams to text choices: starts the n generations of a request, decodes
//! their tokens incrementally, applies stop strings (dropping the backend stream on a match, which
//! aborts the request), and feeds either a collector (JSON reply) or an SSE stream.

use super::AppState;
use super::backend::{
    BackendError, FinishReason, TextCodec, TokenEvent, TokenRequest, TokenStream,
};
use super::error::ApiError;
use super::metrics::{Metrics, RequestGuard, RequestStatus};
use super::text::{IncrementalDecoder, StopMatcher};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::Value;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Log-probs below this are reported as this: JSON has no -inf, and clients parse floats.
const MIN_LOGPROB: f32 = -9999.0;

/// One generation of a request: choice `index` of the reply.
pub struct ChoiceSpec {
    pub index: usize,
    pub request: TokenRequest,
    pub stop: Vec<String>,
    /// Report each token's text and log-prob (and `request.top_logprobs` alternatives).
    pub logprobs: bool,
    /// Only the prompt's log-probs are wanted (`max_tokens: 0` with echo): the choice ends, and
    /// the backend request is aborted, as soon as they arrive.
    pub prompt_only: bool,
    /// Drop special tokens from the text (`skip_special_tokens`; chat keeps them while a tool
    /// parser needs its markers).
    pub skip_special_tokens: bool,
    /// `include_stop_str_in_output`.
    pub include_stop: bool,
}

/// A generated token as the reply reports it.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Token counts of one choice.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// What the choices of a request produce, interleaved.
#[derive(Debug)]
pub enum ChoiceEvent {
    /// The prompt tokens' log-probs (echo).
    Prompt {
        index: usize,
        logprobs: Vec<Option<f32>>,
    },
    /// One token: the text it released (may be empty) and, with logprobs, the token itself.
    Delta {
        index: usize,
        text: String,
        token: Option<TokenOut>,
    },
    /// The end of a choice, with the last text held back until then.
    Done {
        index: usize,
        text: String,
        reason: FinishReason,
        usage: Usage,
    },
    /// The request failed after it started.
    Failed(ApiError),
}

/// A random 64-bit value for ids and default seeds (std's per-process random keys, varied by a counter).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// The text of one token in log-prob reports.
pub fn token_text(codec: Option<&Arc<dyn TextCodec>>, id: u32) -> Result<String, ApiError> {
    match codec {
        Some(c) => c.decode(&[id], false).map_err(decode_error),
        // vLLM's convention when there is no tokenizer.
        None => Ok(format!("token_id:{id}")),
    }
}

fn decode_error(e: String) -> ApiError {
    ApiError::from(BackendError::Internal(format!(
        "detokenisation failed: {e}"
    )))
}

/// Starts every choice; a refusal of any (queue full, invalid) fails the whole request, and the
/// ones already started are aborted by dropping their streams.
pub async fn start(
    state: &AppState,
    specs: Vec<ChoiceSpec>,
    started: Instant,
) -> Result<BoxStream<'static, ChoiceEvent>, ApiError> {
    // n samples of one prompt: the first starts alone and the others once it produced its first
    // event. By then its prompt is prefilled and its full KV blocks are in the pod's prefix
    // cache, so the others reuse them: the prompt is prefilled once, not n times (only its last
    // partial block is recomputed per sample).
    let shared = specs.len() > 1
        && !specs[0].request.echo
        && specs
            .windows(2)
            .all(|w| w[0].request.prompt == w[1].request.prompt);
    let streams: Vec<TokenStream> = if shared {
        let mut first = state.backend.generate(specs[0].request.clone()).await?;
        let head = first.next().await;
        if let Some(Err(e)) = &head {
            return Err(e.clone().into());
        }
        let rest = futures::future::try_join_all(
            specs[1..]
                .iter()
                .map(|s| state.backend.generate(s.request.clone())),
        )
        .await?;
        std::iter::once(stream::iter(head).chain(first).boxed())
            .chain(rest)
            .collect()
    } else {
        futures::future::try_join_all(
            specs
                .iter()
                .map(|s| state.backend.generate(s.request.clone())),
        )
        .await?
    };
    let choices = specs.into_iter().zip(streams).map(|(spec, stream)| {
        state
            .metrics
            .prompt_tokens
            .inc_by(spec.request.prompt.len() as u64);
        // With special tokens kept, the ids that end generation still never become text.
        let mut ends = state
            .codec
            .as_ref()
            .map(|c| c.eos_token_ids())
            .unwrap_or_default();
        ends.extend(&spec.request.stop_token_ids);
        let choice = Choice {
            index: spec.index,
            stream: Some(stream),
            codec: state.codec.clone(),
            decoder: IncrementalDecoder::new(spec.skip_special_tokens),
            skip_special: spec.skip_special_tokens,
            ends,
            stop: StopMatcher::new(spec.stop).including_stop(spec.include_stop),
            logprobs: spec.logprobs,
            prompt_only: spec.prompt_only,
            prompt_tokens: spec.request.prompt.len(),
            generated: 0,
            metrics: state.metrics.clone(),
            started,
            last_token: None,
        };
        stream::unfold(choice, |mut c| async move {
            let events = c.next_events().await?;
            Some((stream::iter(events), c))
        })
        .flatten()
        .boxed()
    });
    Ok(stream::select_all(choices).boxed())
}

struct Choice {
    index: usize,
    /// None once the choice ended; dropping it aborts the backend request.
    stream: Option<TokenStream>,
    codec: Option<Arc<dyn TextCodec>>,
    decoder: IncrementalDecoder,
    skip_special: bool,
    ends: Vec<u32>,
    stop: StopMatcher,
    logprobs: bool,
    prompt_only: bool,
    prompt_tokens: usize,
    generated: usize,
    metrics: Metrics,
    started: Instant,
    last_token: Option<Instant>,
}

impl Choice {
    async fn next_events(&mut self) -> Option<Vec<ChoiceEvent>> {
        let stream = self.stream.as_mut()?;
        let event = stream.next().await;
        let out = match event {
            None => Err(BackendError::Internal(
                "the backend ended the stream before the request finished".into(),
            )
            .into()),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(ev)) => self.on_event(ev),
        };
        match out {
            Ok(events) => {
                if events.iter().any(|e| matches!(e, ChoiceEvent::Done { .. })) {
                    self.stream = None;
                }
                Some(events)
            }
            Err(e) => {
                self.stream = None;
                Some(vec![ChoiceEvent::Failed(e)])
            }
        }
    }

    fn decode(&mut self, id: u32) -> Result<String, ApiError> {
        if !self.skip_special && self.ends.contains(&id) {
            return Ok(String::new());
        }
        match &self.codec {
            Some(c) => self.decoder.push(c.as_ref(), id).map_err(decode_error),
            None => Ok(String::new()),
        }
    }

    fn on_event(&mut self, ev: TokenEvent) -> Result<Vec<ChoiceEvent>, ApiError> {
        let index = self.index;
        match ev {
            TokenEvent::PromptLogprobs(logprobs) => {
                let mut events = vec![ChoiceEvent::Prompt {
                    index,
                    logprobs: logprobs
                        .into_iter()
                        .map(|l| l.map(|l| l.max(MIN_LOGPROB)))
                        .collect(),
                }];
                if self.prompt_only {
                    events.push(ChoiceEvent::Done {
                        index,
                        text: String::new(),
                        reason: FinishReason::Length,
                        usage: Usage {
                            prompt_tokens: self.prompt_tokens,
                            completion_tokens: 0,
                            cached_tokens: 0,
                        },
                    });
                }
                Ok(events)
            }
            TokenEvent::Token { id, logprob, top } => {
                let now = Instant::now();
                match self.last_token {
                    None => self
                        .metrics
                        .time_to_first_token
                        .observe((now - self.started).as_secs_f64()),
                    Some(t) => self
                        .metrics
                        .inter_token_latency
                        .observe((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
                self.metrics.generation_tokens.inc();
                self.generated += 1;
                let token = if self.logprobs {
                    let codec = self.codec.as_ref();
                    Some(TokenOut {
                        text: token_text(codec, id)?,
                        logprob: logprob.max(MIN_LOGPROB),
                        top: top
                            .into_iter()
                            .map(|(t, l)| Ok((token_text(codec, t)?, l.max(MIN_LOGPROB))))
                            .collect::<Result<_, ApiError>>()?,
                    })
                } else {
                    None
                };
                let piece = self.decode(id)?;
                let released = self.stop.push(&piece);
                let mut events = vec![ChoiceEvent::Delta {
                    index,
                    text: released.text,
                    token,
                }];
                if released.stopped {
                    // Our own counts: the backend stream is dropped (aborted) without a Finished.
                    events.push(ChoiceEvent::Done {
                        index,
                        text: String::new(),
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens: self.prompt_tokens,
                            completion_tokens: self.generated,
                            cached_tokens: 0,
                        },
                    });
                }
                Ok(events)
            }
            TokenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let tail = match &self.codec {
                    Some(c) => self.decoder.flush(c.as_ref()).map_err(decode_error)?,
                    None => String::new(),
                };
                let released = self.stop.push(&tail);
                let (text, reason) = if released.stopped {
                    (released.text, FinishReason::Stop)
                } else {
                    (released.text + &self.stop.flush(), reason)
                };
                Ok(vec![ChoiceEvent::Done {
                    index,
                    text,
                    reason,
                    usage: Usage {
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    },
                }])
            }
        }
    }
}

/// A finished choice, for non-streaming replies.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    /// Each generated token (with logprobs) and the character offset of the text before it.
    pub tokens: Vec<(TokenOut, usize)>,
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    pub reason: Option<FinishReason>,
    pub usage: Usage,
}

/// Runs every choice to its end.
pub async fn collect(
    mut events: BoxStream<'static, ChoiceEvent>,
    count: usize,
) -> Result<Vec<Collected>, ApiError> {
    let mut out: Vec<Collected> = (0..count).map(|_| Collected::default()).collect();
    while let Some(ev) = events.next().await {
        match ev {
            ChoiceEvent::Prompt { index, logprobs } => out[index].prompt_logprobs = Some(logprobs),
            ChoiceEvent::Delta { index, text, token } => {
                let c = &mut out[index];
                if let Some(t) = token {
                    c.tokens.push((t, c.text.chars().count()));
                }
                c.text.push_str(&text);
            }
            ChoiceEvent::Done {
                index,
                text,
                reason,
                usage,
            } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                c.reason = Some(reason);
                c.usage = usage;
            }
            ChoiceEvent::Failed(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Total usage of a request: the prompt of each of its prompts once (n samples share it), the
/// completion tokens of every choice, and per prompt the most cached tokens any of its samples
/// had (the later samples of a prompt reuse the first one's KV blocks).
#[derive(Clone, Debug, Default)]
pub struct UsageTotal {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Per prompt (choice index / n): cached prompt tokens.
    cached: Vec<usize>,
}

impl UsageTotal {
    /// Adds choice `index` of a request with `n` samples per prompt.
    pub fn add(&mut self, index: usize, n: usize, u: &Usage) {
        if index.is_multiple_of(n) {
            self.prompt_tokens += u.prompt_tokens;
        }
        let p = index / n.max(1);
        if self.cached.len() <= p {
            self.cached.resize(p + 1, 0);
        }
        self.cached[p] = self.cached[p].max(u.cached_tokens);
        self.completion_tokens += u.completion_tokens;
    }

    /// Prompt tokens served from the prefix cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached.iter().sum()
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens() },
        })
    }
}

/// The wire format of one endpoint's stream chunks.
pub trait ChunkFormat: Send + 'static {
    /// The chunks (JSON objects) one event becomes.
    fn chunks(&mut self, ev: &ChoiceEvent) -> Vec<Value>;
    /// The final chunk carrying the usage (`stream_options.include_usage`).
    fn usage_chunk(&self, usage: &UsageTotal) -> Value;
}

/// Streams the choices as Server-Sent Events: `data: {chunk}` …, then `data: [DONE]`. A failure
/// after the stream started is sent as `data: {"error": …}` before `[DONE]`. The request guard
/// lives in the stream: if the client goes away, the stream (and with it every backend stream)
/// is dropped and the request counts as cancelled.
pub fn sse<F: ChunkFormat>(
    events: BoxStream<'static, ChoiceEvent>,
    format: F,
    guard: RequestGuard,
    n: usize,
    include_usage: bool,
) -> Response {
    let state = SseState {
        events,
        format,
        guard,
        n,
        include_usage,
        usage: UsageTotal::default(),
        phase: Phase::Running,
    };
    let body = stream::unfold(state, |mut st| async move {
        let out = st.step().await?;
        Some((stream::iter(out.into_iter().map(Ok::<_, Infallible>)), st))
    })
    .flatten();
    // A comment line every 15 s while nothing else is sent (a long prefill queued on a CPU pod)
    // keeps proxies and load balancers from closing an idle stream.
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// Idle time after which an SSE comment is sent.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

enum Phase {
    Running,
    Closing,
    Closed,
}

struct SseState<F> {
    events: BoxStream<'static, ChoiceEvent>,
    format: F,
    guard: RequestGuard,
    n: usize,
    include_usage: bool,
    usage: UsageTotal,
    phase: Phase,
}

impl<F: ChunkFormat> SseState<F> {
    async fn step(&mut self) -> Option<Vec<Event>> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Closed => return None,
            Phase::Closing => {
                self.guard.finish(RequestStatus::Success);
                if self.include_usage {
                    out.push(data(&self.format.usage_chunk(&self.usage)));
                }
                out.push(Event::default().data("[DONE]"));
                self.phase = Phase::Closed;
            }
            Phase::Running => match self.events.next().await {
                None => self.phase = Phase::Closing,
                Some(ChoiceEvent::Failed(e)) => {
                    self.guard.finish(RequestStatus::of_status(e.status));
                    out.push(data(&e.body()));
                    out.push(Event::default().data("[DONE]"));
                    self.phase = Phase::Closed;
                }
                Some(ev) => {
                    if let ChoiceEvent::Done { index, usage, .. } = &ev {
                        self.usage.add(*index, self.n, usage);
                    }
                    out.extend(self.format.chunks(&ev).iter().map(data));
                }
            },
        }
        Some(out)
    }
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}
