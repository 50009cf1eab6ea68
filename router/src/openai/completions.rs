//! `POST /v1/completions`: the legacy text-completion endpoint (prompt in, text out).

use super::AppState;
use super::backend::TokenRequest;
use super::error::ApiError;
use super::generate::{
    self, ChoiceEvent, ChoiceSpec, ChunkFormat, TokenOut, UsageTotal, random_u64, token_text,
};
use super::json::read_json;
use super::metrics::RequestStatus;
use super::types::{CompletionRequest, DEFAULT_COMPLETION_MAX_TOKENS, MAX_CHOICES, Prompt};
use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
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

/// One prompt of the request: its ids and, with echo, its text and per-token texts.
struct PromptIn {
    ids: Vec<u32>,
    echo_text: String,
    token_texts: Vec<String>,
}

async fn run(st: &AppState, req: Request, started: Instant) -> Result<Reply, ApiError> {
    let body: CompletionRequest = read_json(req).await?;
    st.check_model(body.model.as_deref())?;
    let sampling = body.sampling(&st.defaults)?;
    let logprobs = body.logprobs()?;
    let echo = body.echo.unwrap_or(false);
    let stream = body.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, body.stream_options.as_ref())?;
    let max_tokens = match body.max_tokens {
        None => DEFAULT_COMPLETION_MAX_TOKENS,
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
    };
    if max_tokens == 0 && !echo {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1 (0 is allowed only with echo)",
        ));
    }
    if !sampling.stop.is_empty() && st.codec.is_none() {
        return Err(ApiError::invalid(
            "stop",
            "stop strings need a tokenizer, and this server has none; use stop_token_ids",
        ));
    }
    let codec = st.codec.as_ref();
    let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
        let c = codec.ok_or_else(|| {
            ApiError::invalid(
                "prompt",
                "this server has no tokenizer: send the prompt as token ids",
            )
        })?;
        c.encode(text, true)
            .map_err(|e| ApiError::invalid("prompt", format!("could not tokenize the prompt: {e}")))
    };
    let raw: Vec<(Vec<u32>, Option<String>)> = match &body.prompt {
        Prompt::Text(t) => vec![(encode(t)?, Some(t.clone()))],
        Prompt::Texts(ts) => ts
            .iter()
            .map(|t| Ok((encode(t)?, Some(t.clone()))))
            .collect::<Result<_, ApiError>>()?,
        Prompt::Tokens(ids) => vec![(ids.clone(), None)],
        Prompt::TokenLists(l) => l.iter().map(|ids| (ids.clone(), None)).collect(),
    };
    if raw.is_empty() {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    if raw.len() * sampling.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n = {} choices exceeds the limit of {MAX_CHOICES}",
                raw.len(),
                raw.len() * sampling.n
            ),
        ));
    }
    let mut prompts = Vec::with_capacity(raw.len());
    for (ids, text) in raw {
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        st.check_context(ids.len(), max_tokens, "max_tokens")?;
        let (echo_text, token_texts) = if echo {
            let text = match (text, codec) {
                (Some(t), _) => t,
                (None, Some(c)) => c.decode(&ids, false).map_err(|e| {
                    ApiError::invalid("prompt", format!("could not decode the prompt: {e}"))
                })?,
                (None, None) => String::new(),
            };
            let texts = if logprobs.is_some() {
                ids.iter()
                    .map(|&id| token_text(codec, id))
                    .collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            (text, texts)
        } else {
            (String::new(), Vec::new())
        };
        prompts.push(PromptIn {
            ids,
            echo_text,
            token_texts,
        });
    }

    let n = sampling.n;
    let mut specs = Vec::with_capacity(prompts.len() * n);
    for (pi, p) in prompts.iter().enumerate() {
        for j in 0..n {
            specs.push(ChoiceSpec {
                index: pi * n + j,
                request: TokenRequest {
                    prompt: p.ids.clone(),
                    max_tokens: max_tokens.max(1),
                    temperature: sampling.temperature,
                    top_p: sampling.top_p,
                    top_k: sampling.top_k,
                    seed: sampling
                        .seed
                        .map(|s| s.wrapping_add(j as u64))
                        .unwrap_or_else(random_u64),
                    top_logprobs: logprobs.unwrap_or(0),
                    token_logprob: logprobs.is_some(),
                    // The backend computes prompt log-probs only when they will be reported, or
                    // to mark the end of a prompt-only request.
                    echo: echo && (logprobs.is_some() || max_tokens == 0),
                    ignore_eos: sampling.ignore_eos,
                    stop_token_ids: sampling.stop_token_ids.clone(),
                    logits: sampling.logits.clone(),
                    constraint: super::types::constraint_of(sampling.constraint.clone(), None),
                    cache_salt: sampling.cache_salt.clone(),
                },
                stop: sampling.stop.clone(),
                logprobs: logprobs.is_some(),
                prompt_only: max_tokens == 0,
                skip_special_tokens: sampling.skip_special_tokens,
                include_stop: sampling.include_stop_str_in_output,
            });
        }
    }
    let count = specs.len();
    let events = generate::start(st, specs, started).await?;
    let id = format!("cmpl-{:016x}", random_u64());
    let created = now_secs();
    if stream {
        return Ok(Reply::Stream {
            events,
            format: Chunks {
                id,
                created,
                model: st.served_model_name.clone(),
                prompts,
                n,
                logprobs: logprobs.is_some(),
                echo,
                offsets: vec![None; count],
                include_usage,
            },
            n,
            include_usage,
        });
    }
    let collected = generate::collect(events, count).await?;
    let mut usage = UsageTotal::default();
    let mut choices = Vec::with_capacity(count);
    for (index, c) in collected.into_iter().enumerate() {
        usage.add(index, n, &c.usage);
        let p = &prompts[index / n];
        let lp = logprobs.map(|_| {
            let mut entries = if echo {
                prompt_entries(p, c.prompt_logprobs.as_deref())
            } else {
                Vec::new()
            };
            let base = p.echo_text.chars().count();
            entries.extend(c.tokens.iter().map(|(t, off)| gen_entry(t, base + off)));
            legacy_logprobs(&entries)
        });
        choices.push(json!({
            "index": index,
            "text": format!("{}{}", p.echo_text, c.text),
            "logprobs": lp,
            "finish_reason": c.reason.map(|r| r.as_str()),
        }));
    }
    Ok(Reply::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": st.served_model_name,
        "choices": choices,
        "usage": usage.json(),
    })))
}

/// `stream_options.include_usage`; stream_options without stream is an error, as in OpenAI's API.
pub fn stream_usage(
    stream: bool,
    opts: Option<&super::types::StreamOptions>,
) -> Result<bool, ApiError> {
    match opts {
        None => Ok(false),
        Some(_) if !stream => Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        )),
        Some(o) => Ok(o.include_usage.unwrap_or(false)),
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One token of the legacy `logprobs` object: text, log-prob, alternatives, character offset.
struct Entry {
    text: String,
    logprob: Option<f32>,
    top: Option<Map<String, Value>>,
    offset: usize,
}

/// The echoed prompt's tokens: the first has no log-prob (nothing precedes it).
fn prompt_entries(p: &PromptIn, logprobs: Option<&[Option<f32>]>) -> Vec<Entry> {
    let mut offset = 0;
    p.token_texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let lp = logprobs.and_then(|l| l.get(i).copied().flatten());
            let e = Entry {
                text: text.clone(),
                logprob: lp,
                top: lp.map(|lp| {
                    let mut m = Map::new();
                    m.insert(text.clone(), json!(lp));
                    m
                }),
                offset,
            };
            offset += text.chars().count();
            e
        })
        .collect()
}

fn gen_entry(t: &TokenOut, offset: usize) -> Entry {
    let mut top = Map::new();
    for (text, lp) in &t.top {
        top.entry(text.clone()).or_insert(json!(lp));
    }
    top.entry(t.text.clone()).or_insert(json!(t.logprob));
    Entry {
        text: t.text.clone(),
        logprob: Some(t.logprob),
        top: Some(top),
        offset,
    }
}

fn legacy_logprobs(entries: &[Entry]) -> Value {
    json!({
        "tokens": entries.iter().map(|e| e.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| e.top.clone()).collect::<Vec<_>>(),
        "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
    })
}

/// Stream chunks of /v1/completions.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    prompts: Vec<PromptIn>,
    n: usize,
    logprobs: bool,
    echo: bool,
    /// Per choice: characters sent so far (None before its first chunk).
    offsets: Vec<Option<usize>>,
    include_usage: bool,
}

impl Chunks {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The echo chunk that opens choice `index` (its prompt, with log-probs when asked).
    fn open(&mut self, index: usize, prompt_logprobs: Option<&[Option<f32>]>) -> Option<Value> {
        if self.offsets[index].is_some() {
            return None;
        }
        let p = &self.prompts[index / self.n];
        self.offsets[index] = Some(p.echo_text.chars().count());
        if !self.echo {
            return None;
        }
        let lp = self
            .logprobs
            .then(|| legacy_logprobs(&prompt_entries(p, prompt_logprobs)));
        Some(self.chunk(index, p.echo_text.clone(), lp, None))
    }
}

impl ChunkFormat for Chunks {
    fn chunks(&mut self, ev: &ChoiceEvent) -> Vec<Value> {
        let mut out = Vec::new();
        match ev {
            ChoiceEvent::Prompt { index, logprobs } => {
                out.extend(self.open(*index, Some(logprobs)))
            }
            ChoiceEvent::Delta { index, text, token } => {
                out.extend(self.open(*index, None));
                let offset = self.offsets[*index].unwrap_or(0);
                let lp = token
                    .as_ref()
                    .map(|t| legacy_logprobs(&[gen_entry(t, offset)]));
                self.offsets[*index] = Some(offset + text.chars().count());
                out.push(self.chunk(*index, text.clone(), lp, None));
            }
            ChoiceEvent::Done {
                index,
                text,
                reason,
                ..
            } => {
                out.extend(self.open(*index, None));
                out.push(self.chunk(*index, text.clone(), None, Some(reason.as_str())));
            }
            ChoiceEvent::Failed(_) => {}
        }
        out
    }

    fn usage_chunk(&self, usage: &UsageTotal) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.json(),
        })
    }
}
