//! Operations around the generation endpoints: the front door every request passes (request id,
//! API key, CORS), and vLLM's `/tokenize` and `/detokenize`.

use super::AppState;
use super::backend::TemplateOptions;
use super::error::ApiError;
use super::json::read_json;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::Instrument;

/// The request-id header, as vLLM and most proxies name it.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request id taken from a client; longer ones are replaced (they go into logs).
const MAX_REQUEST_ID: usize = 128;

tokio::task_local! {
    static CURRENT_REQUEST_ID: String;
}

/// The `X-Request-Id` of the request being handled on this task (the backend forwards it to the
/// attention pod, so one id follows a request through every log).
pub fn current_request_id() -> Option<String> {
    CURRENT_REQUEST_ID.try_with(Clone::clone).ok()
}

fn request_id(req: &Request) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{:016x}", super::generate::random_u64()))
}

/// Paths that need the API key (probes and metrics stay open, as in vLLM).
fn needs_key(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize"
}

fn cors_origin(st: &AppState, req: &Request) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    if st.allowed_origins.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let o = origin.to_str().ok()?;
    st.allowed_origins
        .iter()
        .any(|a| a == o)
        .then(|| origin.clone())
}

/// Request id, CORS, API key — in that order, so even a refused request carries its id and
/// a browser can read the refusal.
pub async fn front_door(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let rid = request_id(&req);
    let origin = cors_origin(&st, &req);
    let mut resp = if req.method() == Method::OPTIONS && origin.is_some() {
        // CORS preflight: answered here, before authentication (browsers send no credentials).
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            req.headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type")),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else if let Some(key) = st.api_key.as_deref()
        && needs_key(req.uri().path())
        && !authorized(&req, key)
    {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided. Send it as `Authorization: Bearer KEY`.",
        )
        .with_code("invalid_api_key")
        .into_response()
    } else {
        let span = tracing::info_span!("request", request_id = %rid, path = %req.uri().path());
        CURRENT_REQUEST_ID
            .scope(rid.clone(), next.run(req).instrument(span))
            .await
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&rid) {
        h.insert(REQUEST_ID, v);
    }
    if let Some(o) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id"),
        );
    }
    resp
}

/// Constant-time comparison of the bearer token (no early exit on the first differing byte).
fn authorized(req: &Request, key: &str) -> bool {
    let Some(got) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (got.trim().as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /tokenize` (vLLM's shape): a prompt, or chat messages through the template.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Value>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
    tools: Option<Vec<super::types::ToolIn>>,
    return_token_strs: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

pub async fn tokenize(State(st): State<AppState>, req: Request) -> Response {
    match run_tokenize(&st, req).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run_tokenize(st: &AppState, req: Request) -> Result<Value, ApiError> {
    let body: TokenizeRequest = read_json(req).await?;
    st.check_model(body.model.as_deref())?;
    super::types::check_extra_fields(&body.extra, "tokenize")?;
    let codec = st
        .codec
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this server has no tokenizer"))?;
    let tokens = match (&body.prompt, &body.messages) {
        (Some(p), None) => codec
            .encode(p, body.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid("prompt", format!("could not tokenize: {e}")))?,
        (None, Some(_)) => {
            let chat: super::types::ChatRequest =
                serde_json::from_value(json!({ "messages": body.messages }))
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            let messages = chat.messages()?;
            let opts = TemplateOptions {
                add_generation_prompt: body.add_generation_prompt.unwrap_or(true),
                tools: body.tools.as_ref().map(|t| tools_value(t)),
                kwargs: body.chat_template_kwargs.clone().unwrap_or_default(),
            };
            let text = codec.apply_chat_template(&messages, &opts).map_err(|e| {
                ApiError::invalid("messages", format!("the chat template failed: {e}"))
            })?;
            codec
                .encode(&text, body.add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::invalid("messages", format!("could not tokenize: {e}")))?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of prompt or messages",
            ));
        }
    };
    let strs = if body.return_token_strs == Some(true) {
        let s: Result<Vec<String>, String> =
            tokens.iter().map(|&t| codec.decode(&[t], false)).collect();
        Value::from(s.map_err(ApiError::bad_request)?)
    } else {
        Value::Null
    };
    Ok(json!({
        "count": tokens.len(),
        "max_model_len": st.max_model_len,
        "tokens": tokens,
        "token_strs": strs,
    }))
}

/// `tools` as the template sees them (OpenAI's shape).
pub fn tools_value(tools: &[super::types::ToolIn]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), Value::String(t.function.name.clone()));
                if let Some(d) = &t.function.description {
                    f.insert("description".into(), Value::String(d.clone()));
                }
                if let Some(p) = &t.function.parameters {
                    f.insert("parameters".into(), p.clone());
                }
                json!({"type": t.kind, "function": Value::Object(f)})
            })
            .collect(),
    )
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
    skip_special_tokens: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

pub async fn detokenize(State(st): State<AppState>, req: Request) -> Response {
    let run = async {
        let body: DetokenizeRequest = read_json(req).await?;
        st.check_model(body.model.as_deref())?;
        super::types::check_extra_fields(&body.extra, "detokenize")?;
        let codec = st
            .codec
            .as_ref()
            .ok_or_else(|| ApiError::bad_request("this server has no tokenizer"))?;
        let text = codec
            .decode(&body.tokens, body.skip_special_tokens.unwrap_or(false))
            .map_err(|e| ApiError::invalid("tokens", e))?;
        Ok::<_, ApiError>(json!({ "prompt": text }))
    };
    match run.await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
