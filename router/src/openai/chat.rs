//! `POST /v1/chat/completions`: messages through the model's chat template, assistant text out.

use super::AppState;
use super::backend::TokenRequest;
use super::completions::{now_secs, stream_usage};
use super::error::ApiError;
use super::generate::{
    self, ChoiceEvent, ChoiceSpec, ChunkFormat, TokenOut, UsageTotal, random_u64,
};
use super::json::read_json;
use super::metrics::RequestStatus;
use super::types::ChatRequest;
use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::time::Instant;

pub async fn handler(State(st): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let mut guard = st.metrics.start_request(started);
    match run(&st, req, started).await {
        Ok(Reply::Json(v)) => {
            guard.finish(RequestStatus::Success);
            Json(v).into_response()
        }
        Ok(Reply::Stream {
            events,
            format,
            n,
            include_usage,
        }) => generate::sse(events, format, guard, n, include_usage),
        Err(e) => {
            guard.finish(RequestStatus::of_status(e.status));
            e.into_response()
        }
    }
}

enum Reply {
    Json(Value),
    Stream {
        events: futures::stream::BoxStream<'static, ChoiceEvent>,
        format: Chunks,
        n: usize,
        include_usage: bool,
    },
}

async fn run(st: &AppState, req: Request, started: Instant) -> Result<Reply, ApiError> {
    let body: ChatRequest = read_json(req).await?;
    st.check_model(body.model.as_deref())?;
    let sampling = body.sampling()?;
    let logprobs = body.logprobs()?;
    let messages = body.messages()?;
    let stream = body.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, body.stream_options.as_ref())?;
    let codec = st.codec.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this server has no tokenizer or chat template: use /v1/completions with token ids",
        )
    })?;
    let text = codec
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?;
    // The template writes the special tokens (BOS) itself.
    let prompt = codec
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", format!("could not tokenize: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the rendered prompt is empty",
        ));
    }
    let max_tokens = match body.max_tokens() {
        (Some(0), name) => {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be at least 1"),
            ));
        }
        (Some(m), name) => {
            let m = usize::try_from(m).unwrap_or(usize::MAX);
            st.check_context(prompt.len(), m, name)?;
            m
        }
        (None, _) => {
            // As vLLM: by default the answer may fill the rest of the context.
            st.check_context(prompt.len(), 1, "messages")?;
            st.max_model_len - prompt.len()
        }
    };

    let n = sampling.n;
    let specs = (0..n)
        .map(|j| ChoiceSpec {
            index: j,
            request: TokenRequest {
                prompt: prompt.clone(),
                max_tokens,
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k,
                seed: sampling
                    .seed
                    .map(|s| s.wrapping_add(j as u64))
                    .unwrap_or_else(random_u64),
                top_logprobs: logprobs.unwrap_or(0),
                echo: false,
                ignore_eos: sampling.ignore_eos,
                stop_token_ids: sampling.stop_token_ids.clone(),
                cache_salt: sampling.cache_salt.clone(),
            },
            stop: sampling.stop.clone(),
            logprobs: logprobs.is_some(),
            prompt_only: false,
        })
        .collect();
    let events = generate::start(st, specs, started).await?;
    let id = format!("chatcmpl-{:016x}", random_u64());
    let created = now_secs();
    if stream {
        return Ok(Reply::Stream {
            events,
            format: Chunks {
                id,
                created,
                model: st.served_model_name.clone(),
                opened: vec![false; n],
                include_usage,
            },
            n,
            include_usage,
        });
    }
    let collected = generate::collect(events, n).await?;
    let mut usage = UsageTotal::default();
    let choices: Vec<Value> = collected
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            usage.add(index, n, &c.usage);
            let lp = logprobs.map(|_| {
                json!({
                    "content": c.tokens.iter().map(|(t, _)| entry(t)).collect::<Vec<_>>(),
                    "refusal": null,
                })
            });
            json!({
                "index": index,
                "message": { "role": "assistant", "content": c.text },
                "logprobs": lp,
                "finish_reason": c.reason.map(|r| r.as_str()),
            })
        })
        .collect();
    Ok(Reply::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": st.served_model_name,
        "choices": choices,
        "usage": usage.json(),
    })))
}

/// A token in the chat `logprobs.content` format.
fn entry(t: &TokenOut) -> Value {
    json!({
        "token": t.text,
        "logprob": t.logprob,
        "bytes": t.text.as_bytes(),
        "top_logprobs": t.top.iter().map(|(text, lp)| json!({
            "token": text,
            "logprob": lp,
            "bytes": text.as_bytes(),
        })).collect::<Vec<_>>(),
    })
}

/// Stream chunks of /v1/chat/completions.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    /// Per choice: whether its opening chunk (`role: assistant`) was sent.
    opened: Vec<bool>,
    include_usage: bool,
}

impl Chunks {
    fn chunk(
        &self,
        index: usize,
        delta: Value,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn open(&mut self, index: usize) -> Option<Value> {
        if std::mem::replace(&mut self.opened[index], true) {
            return None;
        }
        Some(self.chunk(
            index,
            json!({ "role": "assistant", "content": "" }),
            None,
            None,
        ))
    }
}

impl ChunkFormat for Chunks {
    fn chunks(&mut self, ev: &ChoiceEvent) -> Vec<Value> {
        let mut out = Vec::new();
        match ev {
            ChoiceEvent::Prompt { .. } | ChoiceEvent::Failed(_) => {}
            ChoiceEvent::Delta { index, text, token } => {
                out.extend(self.open(*index));
                let lp = token
                    .as_ref()
                    .map(|t| json!({ "content": [entry(t)], "refusal": null }));
                out.push(self.chunk(*index, json!({ "content": text }), lp, None));
            }
            ChoiceEvent::Done {
                index,
                text,
                reason,
                ..
            } => {
                out.extend(self.open(*index));
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                out.push(self.chunk(*index, delta, None, Some(reason.as_str())));
            }
        }
        out
    }

    fn usage_chunk(&self, usage: &UsageTotal) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.json(),
        })
    }
}
