//! The two seams of the HTTP layer: [`Backend`] generates token ids, [`TextCodec`] turns text into
//! token ids and back. The HTTP code knows nothing of models (STYLE.md rule 12): in cluster mode
//! the backend is the gRPC client of the attention pods, in process it is the engine itself, and
//! in tests it is a fake.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// One generation as the backend sees it: token ids in, token ids out.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRequest {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most; at least 1 (a prompt-only request, `max_tokens: 0` with echo,
    /// is sent as 1 and cut by the HTTP layer after the prompt log-probs).
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: u64,
    /// Alternatives to report with each generated token.
    pub top_logprobs: usize,
    /// Compute each prompt token's log-prob ([`TokenEvent::PromptLogprobs`] comes first).
    pub echo: bool,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Extra token ids that end generation, besides the model's EOS.
    pub stop_token_ids: Vec<u32>,
    /// Prefix-cache isolation: only requests with the same salt share cached KV blocks.
    pub cache_salt: Option<String>,
    /// Penalties, bias, min_tokens, min_p (the engine's stage before selection).
    pub logits: LogitsFields,
    /// A grammar the output must follow.
    pub constraint: Option<Constraint>,
}

/// The logits-processing parameters of a request; the default is neutral (nothing changes).
#[derive(Clone, Debug, PartialEq)]
pub struct LogitsFields {
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 is off.
    pub repetition_penalty: f32,
    /// (token id, bias), sorted by id.
    pub logit_bias: Vec<(u32, f32)>,
    pub min_tokens: usize,
    pub min_p: f32,
}

impl Default for LogitsFields {
    fn default() -> Self {
        Self {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            min_p: 0.0,
        }
    }
}

/// What constrained decoding enforces.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintKind {
    /// JSON Schema text.
    JsonSchema(String),
    Regex(String),
    /// Lark grammar, llguidance dialect (special tokens as `<[id]>`).
    Lark(String),
}

/// A constraint and the token after which it applies (None: from the first token).
#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    pub kind: ConstraintKind,
    pub start_after: Option<u32>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence or stop token (or, decided by the HTTP layer, a stop string).
    Stop,
    /// `max_tokens` or the context limit was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a generation's stream carries, in order: `PromptLogprobs` (only with `echo`), then one
/// `Token` per generated token, then `Finished`.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenEvent {
    /// Log-prob of each prompt token given the ones before it; the first is `None`.
    PromptLogprobs(Vec<Option<f32>>),
    Token {
        id: u32,
        logprob: f32,
        /// The `top_logprobs` most likely tokens at this step, most likely first.
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: usize,
    },
}

/// Why the backend refused or failed a request; each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The waiting queue is full: 429, the client should retry later.
    #[error("{0}")]
    QueueFull(String),
    /// The request cannot be served as given (token id out of range, too long, …): 400.
    #[error("{0}")]
    Invalid(String),
    /// No pod can take requests right now (starting, all unhealthy): 503.
    #[error("{0}")]
    Unavailable(String),
    /// The backend failed while serving a valid request: 500.
    #[error("{0}")]
    Internal(String),
}

/// A stream of one generation's events; dropping it before `Finished` aborts the request.
pub type TokenStream = BoxStream<'static, Result<TokenEvent, BackendError>>;

/// Generates token ids. Implemented by the attention-pod client (cluster) and the engine (in process).
pub trait Backend: Send + Sync + 'static {
    /// Starts a request. Refusals (queue full, invalid) come back from the future; the stream
    /// then ends after `Finished` or after an error. Dropping the stream must abort the request
    /// and free its batch slot and KV blocks.
    fn generate(&self, req: TokenRequest) -> BoxFuture<'static, Result<TokenStream, BackendError>>;

    /// Whether requests can be served now (the `/ready` probe).
    fn ready(&self) -> bool;
}

/// How to render a chat template, besides the messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateOptions {
    pub add_generation_prompt: bool,
    /// `tools` as OpenAI sends them (templates that describe tools read this).
    pub tools: Option<serde_json::Value>,
    /// `chat_template_kwargs`: extra template variables (e.g. `thinking: true` for V3.1).
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// Text side of the model: tokenizer and chat template. Optional: without one, the server takes
/// token-id prompts only.
pub trait TextCodec: Send + Sync + 'static {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
    /// Decodes ids; bytes of an incomplete UTF-8 sequence come out as U+FFFD (the incremental
    /// detokeniser relies on that to wait for the rest of a character).
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String>;
    /// Renders the messages (OpenAI-shaped JSON objects) with the model's chat template.
    fn apply_chat_template(
        &self,
        messages: &[serde_json::Value],
        opts: &TemplateOptions,
    ) -> Result<String, String>;
    /// The id of the single token spelled `token` (special tokens such as `</think>`).
    fn token_id(&self, _token: &str) -> Option<u32> {
        None
    }
    /// Ids that end generation (their text is never part of a reply).
    fn eos_token_ids(&self) -> Vec<u32> {
        Vec::new()
    }
    /// The chat template's source, when there is one (reasoning-parser auto-detection).
    fn chat_template_source(&self) -> Option<String> {
        None
    }
}
