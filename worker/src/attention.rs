//! The attention pod's gRPC service (`shardseek.v1.Attention`): turns `Generate` calls into
//! engine requests and engine events into `GenerateChunk`s. Wire formats stop here; the engine
//! below knows nothing of gRPC (STYLE.md rule 12).
//!
//! Text: prompts normally arrive as token ids (the router tokenizes). Token text and
//! `text_delta` are left empty; the router, which holds the tokenizer, fills them in.

use crate::engine::grammar::{Constraint, ConstraintKind};
use crate::engine::logits::LogitsParams;
use crate::engine::{Engine, EngineRequest, Event, SubmitError};
use crate::generate::FinishReason as EngineFinish;
use futures::Stream;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_proto::v1::attention_server::Attention;
use shardseek_proto::v1::{
    AbortReply, AbortRequest, FinishReason, GenerateChunk, GenerateRequest, HealthReply,
    HealthRequest, ModelFingerprint, StatsReply, StatsRequest, TokenLogprob, TopLogprob, Usage,
    generate_request,
};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

/// Largest number of top alternatives per token a client may ask for (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// The `Attention` service over one engine.
pub struct AttentionService {
    engine: Arc<Engine>,
    fingerprint: ModelFingerprint,
    /// Router request id → engine id, for `Abort`.
    live: Arc<Mutex<HashMap<String, u64>>>,
}

impl AttentionService {
    pub fn new(engine: Arc<Engine>, fingerprint: ModelFingerprint) -> Self {
        Self {
            engine,
            fingerprint,
            live: Arc::default(),
        }
    }
}

/// Maps a wire request to an engine request, or says which field is wrong.
pub fn engine_request(r: &GenerateRequest) -> Result<EngineRequest, Status> {
    let prompt = match &r.prompt {
        Some(generate_request::Prompt::Tokens(t)) => t.ids.clone(),
        Some(generate_request::Prompt::Text(_)) => {
            return Err(Status::invalid_argument(
                "prompt: attention pods take token ids; send text to the router, which tokenizes",
            ));
        }
        None => return Err(Status::invalid_argument("prompt: missing")),
    };
    if !(r.temperature >= 0.0 && r.temperature.is_finite()) {
        return Err(Status::invalid_argument(format!(
            "temperature: {} must be >= 0",
            r.temperature
        )));
    }
    let top_p = if r.top_p == 0.0 { 1.0 } else { r.top_p };
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "top_p: {} must be in (0, 1]",
            r.top_p
        )));
    }
    if r.logprobs > MAX_TOP_LOGPROBS {
        return Err(Status::invalid_argument(format!(
            "logprobs: {} exceeds {MAX_TOP_LOGPROBS}",
            r.logprobs
        )));
    }
    if r.max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens: must be >= 1"));
    }
    let mut logit_bias: Vec<(u32, f32)> = r.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
    logit_bias.sort_by_key(|&(t, _)| t);
    let logits = LogitsParams {
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        repetition_penalty: if r.repetition_penalty == 0.0 {
            1.0
        } else {
            r.repetition_penalty
        },
        logit_bias,
        min_tokens: r.min_tokens as usize,
        min_p: r.min_p,
    };
    let constraint = match &r.constraint {
        None => None,
        Some(c) => {
            use shardseek_proto::v1::constraint::Kind;
            let kind = match &c.kind {
                Some(Kind::JsonSchema(s)) => ConstraintKind::JsonSchema(s.clone()),
                Some(Kind::Regex(s)) => ConstraintKind::Regex(s.clone()),
                Some(Kind::Lark(s)) => ConstraintKind::Lark(s.clone()),
                None => return Err(Status::invalid_argument("constraint: no kind given")),
            };
            Some(Constraint {
                kind,
                start_after: c.start_after,
            })
        }
    };
    if r.cache_salt.as_deref() == Some("") {
        return Err(Status::invalid_argument(
            "cache_salt: must be a non-empty string when given",
        ));
    }
    Ok(EngineRequest {
        prompt,
        max_tokens: r.max_tokens as usize,
        sampling: SamplingParams {
            temperature: r.temperature,
            top_k: r.top_k as usize,
            top_p,
        },
        seed: r.seed.unwrap_or(0),
        top_logprobs: r.logprobs as usize,
        token_logprob: r.token_logprob.unwrap_or(true),
        echo: r.echo,
        ignore_eos: r.ignore_eos,
        stop_token_ids: r.stop_token_ids.clone(),
        logits,
        constraint,
        cache_salt: r.cache_salt.clone(),
    })
}

fn token(id: u32, logprob: Option<f32>, top: &[(u32, f32)]) -> TokenLogprob {
    TokenLogprob {
        token: id,
        text: String::new(),
        logprob,
        top_logprobs: top
            .iter()
            .map(|&(t, lp)| TopLogprob {
                token: t,
                logprob: lp,
                text: String::new(),
            })
            .collect(),
    }
}

/// Removes the request id from the live table when the stream ends or is dropped.
struct LiveGuard {
    live: Arc<Mutex<HashMap<String, u64>>>,
    key: String,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(&self.key);
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Attention for AttentionService {
    type GenerateStream = ChunkStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        let ereq = engine_request(&r)?;
        let prompt_ids = ereq.prompt.clone();
        let handle = self.engine.submit(ereq).map_err(|e| match e {
            SubmitError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
            SubmitError::Invalid(m) => Status::invalid_argument(m),
            SubmitError::Stopped => Status::unavailable(e.to_string()),
        })?;
        let rid = r.request_id.clone();
        if let Ok(mut m) = self.live.lock() {
            m.insert(rid.clone(), handle.id);
        }
        let guard = LiveGuard {
            live: self.live.clone(),
            key: rid.clone(),
        };
        // The handle lives inside the stream: when tonic drops the stream (client gone), the
        // handle's Drop aborts the request in the engine.
        let stream = futures::stream::unfold(Some((handle, guard)), move |state| {
            let rid = rid.clone();
            let prompt_ids = prompt_ids.clone();
            async move {
                let (mut handle, guard) = state?;
                let ev = handle.next().await;
                let chunk = match ev {
                    Some(Event::PromptLogprobs(lps)) => GenerateChunk {
                        request_id: rid,
                        prompt_logprobs: prompt_ids
                            .iter()
                            .zip(&lps)
                            .map(|(&t, &lp)| token(t, lp, &[]))
                            .collect(),
                        ..Default::default()
                    },
                    Some(Event::Token { id, logprob, top }) => GenerateChunk {
                        request_id: rid,
                        token: Some(token(id, logprob, &top)),
                        ..Default::default()
                    },
                    Some(Event::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    }) => {
                        let chunk = GenerateChunk {
                            request_id: rid,
                            finish_reason: match reason {
                                EngineFinish::Stop => FinishReason::Stop as i32,
                                EngineFinish::Length => FinishReason::Length as i32,
                            },
                            usage: Some(Usage {
                                prompt_tokens: prompt_tokens as u32,
                                completion_tokens: completion_tokens as u32,
                                cached_tokens: cached_tokens as u32,
                            }),
                            ..Default::default()
                        };
                        return Some((Ok(chunk), None));
                    }
                    Some(Event::Error(e)) => return Some((Err(Status::unavailable(e)), None)),
                    None => return None,
                };
                Some((Ok(chunk), Some((handle, guard))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        let s = &self.engine.stats;
        Ok(Response::new(StatsReply {
            requests_running: s.running.load(Ordering::Relaxed) as u32,
            requests_waiting: s.waiting.load(Ordering::Relaxed) as u32,
            outstanding_tokens: s.outstanding_tokens.load(Ordering::Relaxed) as u64,
            kv_cache_usage: s.kv_usage() as f32,
            max_batch_tokens: self.engine.config().max_batch_tokens as u32,
            model: Some(self.fingerprint.clone()),
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        Ok(Response::new(HealthReply {
            serving: true,
            status: "serving".into(),
        }))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortReply>, Status> {
        let id = self
            .live
            .lock()
            .ok()
            .and_then(|m| m.get(&request.get_ref().request_id).copied());
        if let Some(id) = id {
            self.engine.abort(id);
        }
        Ok(Response::new(AbortReply {
            found: id.is_some(),
        }))
    }
}
