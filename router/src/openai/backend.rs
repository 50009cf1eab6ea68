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
    /// Compute each generated token's log-prob (a pass over the vocabulary per token; without
    /// it and without `top_logprobs`, [`TokenEvent::Token`]'s log-prob is NaN).
    pub token_logprob: bool,
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

/// The logits-processing parameters of a request (the engine's logits stage reads them as they
/// are); the neutral value of every field leaves the row untouched.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitsFields {
    /// OpenAI's `presence_penalty`: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// vLLM/HF `repetition_penalty` (1 = off): positive logits of tokens seen in the prompt or
    /// output are divided by it, negative ones multiplied.
    pub repetition_penalty: f32,
    /// Added to the logit of each token id.
    pub logit_bias: Vec<(u32, f32)>,
    /// End-of-sequence and stop token ids are barred until this many tokens were generated.
    pub min_tokens: usize,
    /// Tokens whose probability is below `min_p` × the top probability are dropped (0 = off).
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

impl LogitsFields {
    /// Whether the stage changes anything for these parameters (fast path: no copy of the row).
    pub fn is_neutral(&self) -> bool {
        self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.logit_bias.is_empty()
            && self.min_tokens == 0
            && self.min_p == 0.0
    }

    /// Checks ranges the wire cannot express; the router validates the same way first.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name}: {v} must be between -2 and 2"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty: {} must be > 0",
                self.repetition_penalty
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p: {} must be in [0, 1]", self.min_p));
        }
        if let Some((t, _)) = self.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            return Err(format!(
                "logit_bias: token id {t} is out of range (vocab_size {vocab})"
            ));
        }
        if let Some((_, b)) = self.logit_bias.iter().find(|(_, b)| !b.is_finite()) {
            return Err(format!("logit_bias: {b} is not a finite number"));
        }
        Ok(())
    }
}

/// What a request is constrained to.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintKind {
    /// A JSON Schema (its JSON text); `{"type": "object"}` is `response_format: json_object`.
    JsonSchema(String),
    /// A regular expression over the generated text.
    Regex(String),
    /// A Lark grammar in llguidance's dialect (special tokens as `<[id]>`).
    Lark(String),
}

/// A constraint and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    pub kind: ConstraintKind,
    /// Unconstrained until this token was generated (a reasoning model's `</think>`: the answer
    /// is constrained, the reasoning before it is not), then constrained.
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
