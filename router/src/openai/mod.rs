//! The OpenAI-compatible HTTP API (DESIGN.md §2, §7, §8): `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions`, `/health`, `/ready`, `/metrics`, `/openapi.json`.
//!
//! It knows nothing of models (STYLE.md rule 12): prompts become token ids through a
//! [`TextCodec`] and token ids come from a [`Backend`]: the gRPC client of the attention pods in
//! a cluster, the engine itself in process, a fake in tests. Errors are OpenAI-shaped JSON with
//! the status that tells a client what to do: 400 to fix the request (naming the parameter), 404
//! for an unknown model, 429/503 to retry later; never a 500 for bad input.
//!
//! Decisions where OpenAI's API is silent or this server differs:
//! - Unknown request fields are accepted, ignored and logged, as vLLM does; documented
//!   OpenAI/vLLM fields this server does not implement (beam search, `bad_words`, `suffix`,
//!   `best_of` ≠ n, …) are refused by name unless set to their neutral value (see [`types`]).
//! - Extensions, as vLLM names them: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
//!   `ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`,
//!   `structured_outputs` / `guided_*`, `chat_template_kwargs`; `/tokenize`, `/detokenize`.
//! - `--api-key`: every `/v1/*` and `/tokenize`/`/detokenize` call needs `Authorization: Bearer
//!   KEY` (401 otherwise, OpenAI's body); `/health`, `/ready`, `/metrics` stay open for probes.
//! - `X-Request-Id` is taken from the request (or made up), returned on the response, and
//!   carried into the log lines and the attention pod's request id.
//! - `n` samples of one prompt with a `seed` use seeds `seed`, `seed + 1`, …; usage counts the
//!   prompt once per prompt and the completion tokens of every choice.
//! - Stop strings are matched on the detokenised text; the text ends right before the match, the
//!   token that completed it counts in `completion_tokens`, and the backend request is aborted.
//! - `max_tokens: 0` is accepted on /v1/completions with `echo` (prompt log-probs only, for
//!   scoring). Chat without `max_tokens` may fill the rest of the context.
//! - Without a tokenizer, prompts must be token ids, and tokens are reported as `token_id:N`.

pub mod backend;
pub mod bench;
mod chat;
mod completions;
pub mod error;
mod generate;
pub mod json;
pub mod metrics;
mod ops;
pub mod reasoning;
pub mod text;
pub mod tools;
pub mod types;

pub use backend::{
    Backend, BackendError, FinishReason, TemplateOptions, TextCodec, TokenEvent, TokenRequest,
    TokenStream,
};
pub use error::ApiError;
pub use metrics::Metrics;
pub use ops::current_request_id;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::sync::Arc;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    /// Tokenizer and chat template; None serves token-id prompts only.
    pub codec: Option<Arc<dyn TextCodec>>,
    /// The one model name this server answers to (`model` of requests, `/v1/models`).
    pub served_model_name: String,
    /// Longest prompt + completion, in tokens.
    pub max_model_len: usize,
    pub metrics: Metrics,
    /// Unix time the server started (`created` of the model object).
    pub created: u64,
    /// The checkpoint's `generation_config.json` defaults.
    pub defaults: types::GenerationDefaults,
    /// Split `<think>` reasoning into `reasoning_content` (the DeepSeek-R1 parser).
    pub reasoning: bool,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// CORS origins (`*` for any); empty: no CORS headers.
    pub allowed_origins: Vec<String>,
}

impl AppState {
    pub fn new(
        backend: Arc<dyn Backend>,
        codec: Option<Arc<dyn TextCodec>>,
        served_model_name: impl Into<String>,
        max_model_len: usize,
        metrics: Metrics,
    ) -> Self {
        Self {
            backend,
            codec,
            served_model_name: served_model_name.into(),
            max_model_len,
            metrics,
            created: completions::now_secs(),
            defaults: types::GenerationDefaults::default(),
            reasoning: false,
            api_key: None,
            allowed_origins: vec!["*".into()],
        }
    }

    /// 404 unless `model` is absent or the served name.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.served_model_name => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }

    /// 400 naming both numbers when prompt + max_tokens does not fit the context.
    pub fn check_context(
        &self,
        prompt_tokens: usize,
        max_tokens: usize,
        param: &str,
    ) -> Result<(), ApiError> {
        if prompt_tokens.saturating_add(max_tokens) > self.max_model_len {
            return Err(ApiError::invalid(
                param,
                format!(
                    "prompt ({prompt_tokens} tokens) + {param} ({max_tokens}) exceeds the context limit of {} tokens",
                    self.max_model_len
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(())
    }
}

/// The API's routes over `state`. Unknown paths and methods get OpenAI-shaped 404/405 bodies.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/chat/completions", post(chat::handler))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/tokenize", post(ops::tokenize))
        .route("/detokenize", post(ops::detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::front_door,
        ))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves (in-flight requests then finish).
///
/// Sets TCP_NODELAY on every connection: a token stream writes many small chunks, and Nagle's
/// algorithm with the peer's delayed ACKs would hold each one back by up to 40 ms.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`] for an app that merges [`router`] with other routes (the gateway's gRPC).
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn model_object(st: &AppState) -> serde_json::Value {
    json!({
        "id": st.served_model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "shardseek",
        "max_model_len": st.max_model_len,
    })
}

async fn models(State(st): State<AppState>) -> Response {
    axum::Json(json!({ "object": "list", "data": [model_object(&st)] })).into_response()
}

async fn model(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    match st.check_model(Some(&name)) {
        Ok(()) => axum::Json(model_object(&st)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Liveness: the process is up and serving HTTP.
async fn health() -> Response {
    (StatusCode::OK, "ok").into_response()
}

/// Readiness: the backend can take requests (a pod is up, the model is loaded).
async fn ready(State(st): State<AppState>) -> Response {
    if st.backend.ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the backend is not ready").into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    match st.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The OpenAPI 3 document of this API (hand-written; request schemas list the implemented
/// fields and allow others, which the server logs and ignores).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
    .into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
    .into_response()
}
