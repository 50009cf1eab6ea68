//! `POST /v1/chat/completions`: messages through the model's chat template, assistant text out.

use super::AppState;
use super::backend::TokenRequest;
use super::backend::{ConstraintKind, TemplateOptions};
use super::completions::{now_secs, stream_usage};
use super::error::ApiError;
use super::generate::{
    self, ChoiceEvent, ChoiceSpec, ChunkFormat, TokenOut, UsageTotal, random_u64,
};
use super::json::read_json;
use super::metrics::RequestStatus;
use super::ops::tools_value;
use super::reasoning::{ReasoningSplitter, prompt_opens_thinking};
use super::tools::{self, MarkerIds, ToolCall, ToolParser, call_grammar};
use super::types::{ChatRequest, ToolChoice, constraint_of};
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

/// How a chat reply is taken apart: reasoning, content, tool calls.
#[derive(Clone, Debug)]
struct ReplyShape {
    /// The reasoning parser runs; `in_thinking`: the prompt opened the thinking block.
    reasoning: Option<bool>,
    /// The tool-call parser runs.
    tools: bool,
}

/// One choice's parsers, fed its text as it streams.
struct ReplyParser {
    reasoning: Option<ReasoningSplitter>,
    tools: Option<ToolParser>,
    calls: usize,
}

/// What a piece of text became.
#[derive(Default)]
struct Pieces {
    reasoning: String,
    content: String,
    calls: Vec<ToolCall>,
}

impl ReplyParser {
    fn new(shape: &ReplyShape) -> Self {
        Self {
            reasoning: shape.reasoning.map(ReasoningSplitter::new),
            tools: shape.tools.then(ToolParser::default),
            calls: 0,
        }
    }

    fn push(&mut self, text: &str, end: bool) -> Pieces {
        let mut out = Pieces::default();
        let content = match &mut self.reasoning {
            Some(r) => {
                let mut s = r.push(text);
                if end {
                    let f = r.finish();
                    s.reasoning += &f.reasoning;
                    s.content += &f.content;
                }
                out.reasoning = s.reasoning;
                s.content
            }
            None => text.to_string(),
        };
        match &mut self.tools {
            Some(t) => {
                let mut p = t.push(&content);
                if end {
                    p.content += &t.finish().content;
                }
                out.content = p.content;
                out.calls = p.calls;
            }
            None => out.content = content,
        }
        self.calls += out.calls.len();
        out
    }
}

fn call_id() -> String {
    format!("call_{:016x}", random_u64())
}

async fn run(st: &AppState, req: Request, started: Instant) -> Result<Reply, ApiError> {
    let body: ChatRequest = read_json(req).await?;
    st.check_model(body.model.as_deref())?;
    let sampling = body.sampling(&st.defaults)?;
    let logprobs = body.logprobs()?;
    let tool_choice = body.tool_choice()?;
    let messages = body.messages()?;
    let stream = body.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, body.stream_options.as_ref())?;
    let codec = st.codec.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this server has no tokenizer or chat template: use /v1/completions with token ids",
        )
    })?;
    let tools = body.tools.as_deref().unwrap_or_default();
    let opts = TemplateOptions {
        add_generation_prompt: body.add_generation_prompt.unwrap_or(true),
        tools: (!tools.is_empty()).then(|| tools_value(tools)),
        kwargs: body.chat_template_kwargs.clone().unwrap_or_default(),
    };
    let text = codec
        .apply_chat_template(&messages, &opts)
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
    let in_thinking = st.reasoning && prompt_opens_thinking(&text);
    let shape = ReplyShape {
        reasoning: st.reasoning.then_some(in_thinking),
        tools: tool_choice != ToolChoice::None,
    };
    // A reasoning model thinks freely; a constraint applies to the answer after `</think>`.
    let start_after = if in_thinking {
        codec.token_id("</think>")
    } else {
        None
    };
    let mut constraint = sampling.constraint.clone();
    if matches!(tool_choice, ToolChoice::Required | ToolChoice::Named(_)) {
        if constraint.is_some() {
            return Err(ApiError::invalid(
                "tool_choice",
                "a forced tool call cannot be combined with response_format or structured_outputs",
            ));
        }
        let id = |t: &str| {
            codec.token_id(t).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    format!("the tokenizer has no {t} token: forced tool calls need DeepSeek's tool-call tokens"),
                )
            })
        };
        let ids = MarkerIds {
            calls_begin: id(tools::CALLS_BEGIN)?,
            calls_end: id(tools::CALLS_END)?,
            call_begin: id(tools::CALL_BEGIN)?,
            call_end: id(tools::CALL_END)?,
            sep: id(tools::SEP)?,
        };
        let only = match &tool_choice {
            ToolChoice::Named(n) => Some(n.as_str()),
            _ => None,
        };
        let parallel = body.parallel_tool_calls.unwrap_or(true) && only.is_none();
        constraint = Some(ConstraintKind::Lark(call_grammar(
            tools, only, parallel, ids,
        )));
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
                token_logprob: logprobs.is_some(),
                echo: false,
                ignore_eos: sampling.ignore_eos,
                stop_token_ids: sampling.stop_token_ids.clone(),
                logits: sampling.logits.clone(),
                constraint: constraint_of(constraint.clone(), start_after),
                cache_salt: sampling.cache_salt.clone(),
            },
            stop: sampling.stop.clone(),
            logprobs: logprobs.is_some(),
            prompt_only: false,
            // The tool parser reads DeepSeek's markers, which are special tokens.
            skip_special_tokens: sampling.skip_special_tokens && !shape.tools,
            include_stop: sampling.include_stop_str_in_output,
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
                parsers: (0..n).map(|_| ReplyParser::new(&shape)).collect(),
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
            let mut p = ReplyParser::new(&shape);
            let parts = p.push(&c.text, true);
            let mut message = json!({ "role": "assistant", "content": parts.content });
            if shape.reasoning.is_some() {
                message["reasoning_content"] = if parts.reasoning.is_empty() {
                    Value::Null
                } else {
                    Value::String(parts.reasoning)
                };
            }
            let mut reason = c.reason.map(|r| r.as_str());
            if !parts.calls.is_empty() {
                if message["content"] == "" {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] =
                    Value::Array(parts.calls.iter().map(|c| c.json(&call_id())).collect());
                if reason == Some("stop") {
                    reason = Some("tool_calls");
                }
            }
            json!({
                "index": index,
                "message": message,
                "logprobs": lp,
                "finish_reason": reason,
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
    /// Per choice: reasoning and tool-call parsers.
    parsers: Vec<ReplyParser>,
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

impl Chunks {
    /// The delta chunks of parsed text: reasoning, content, then each completed call.
    fn deltas(&mut self, index: usize, p: Pieces, logprobs: Option<Value>, out: &mut Vec<Value>) {
        let mut lp = logprobs;
        if !p.reasoning.is_empty() {
            out.push(self.chunk(
                index,
                json!({ "reasoning_content": p.reasoning }),
                lp.take(),
                None,
            ));
        }
        if !p.content.is_empty() {
            out.push(self.chunk(index, json!({ "content": p.content }), lp.take(), None));
        }
        let first = self.parsers[index].calls - p.calls.len();
        for (k, call) in p.calls.iter().enumerate() {
            let mut c = call.json(&call_id());
            c["index"] = json!(first + k);
            out.push(self.chunk(index, json!({ "tool_calls": [c] }), lp.take(), None));
        }
        if lp.is_some() {
            out.push(self.chunk(index, json!({ "content": "" }), lp, None));
        }
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
                let parser = &mut self.parsers[*index];
                if parser.reasoning.is_none() && parser.tools.is_none() {
                    // No parser: one chunk per token, as before.
                    out.push(self.chunk(*index, json!({ "content": text }), lp, None));
                } else {
                    let p = parser.push(text, false);
                    self.deltas(*index, p, lp, &mut out);
                }
            }
            ChoiceEvent::Done {
                index,
                text,
                reason,
                ..
            } => {
                out.extend(self.open(*index));
                let p = self.parsers[*index].push(text, true);
                self.deltas(*index, p, None, &mut out);
                let reason = if self.parsers[*index].calls > 0 && reason.as_str() == "stop" {
                    "tool_calls"
                } else {
                    reason.as_str()
                };
                out.push(self.chunk(*index, json!({}), None, Some(reason)));
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
