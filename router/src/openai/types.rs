//! Request bodies of the API and their validation. Every field OpenAI documents for these
//! endpoints is accepted; the ones this server cannot honour are refused by name when set to
//! anything but their neutral value, rather than silently ignored. Unknown fields are refused.

use super::error::ApiError;
use serde::Deserialize;

/// Most choices (prompts × n) in one request: each is a separate generation in the batch.
pub const MAX_CHOICES: usize = 128;
/// Most alternatives per token, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings; OpenAI allows 4, vLLM any number; 16 keeps matching cheap.
pub const MAX_STOP_STRINGS: usize = 16;
/// `max_tokens` of a completion when the request does not say (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// `prompt` of /v1/completions.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Accepted for compatibility; usage is only sent in the final chunk.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// Body of `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API (vLLM's extension); 0 or -1 disable it.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u64>,
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Extension: keep generating past end-of-sequence (benchmarks want exact output lengths).
    pub ignore_eos: Option<bool>,
    /// Extension: token ids that end generation besides the model's EOS.
    pub stop_token_ids: Option<Vec<u32>>,
    pub best_of: Option<u64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    /// vLLM's prefix-cache isolation: only requests with the same salt share cached KV.
    pub cache_salt: Option<String>,
}

/// `content` of a chat message: a string or a list of parts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub user: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    pub store: Option<bool>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// vLLM's prefix-cache isolation: only requests with the same salt share cached KV.
    pub cache_salt: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

/// Sampling and stopping, validated; shared by both endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub cache_salt: Option<String>,
}

/// The sampling fields as both request types carry them.
pub struct SamplingFields<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub stop: Option<&'a Stop>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<&'a Vec<u32>>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<&'a serde_json::Map<String, serde_json::Value>>,
    pub cache_salt: Option<&'a String>,
}

impl SamplingFields<'_> {
    pub fn validate(&self) -> Result<Sampling, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            k => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1, 0 (disabled) or positive, got {k}"),
                ));
            }
        };
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES as u64 {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop sequences are allowed, got {}",
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop sequences must not be empty",
            ));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(
                        name,
                        format!("{name} must be between -2 and 2, got {v}"),
                    ));
                }
                if v != 0.0 {
                    return Err(ApiError::invalid(
                        name,
                        format!("{name} is not supported by this server (only 0)"),
                    ));
                }
            }
        }
        if self.logit_bias.is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
        if self.cache_salt.is_some_and(|s| s.is_empty()) {
            return Err(ApiError::invalid(
                "cache_salt",
                "cache_salt must be a non-empty string when given",
            ));
        }
        Ok(Sampling {
            temperature: temperature as f32,
            // Validated on f64: a positive top_p too small for f32 is still positive.
            top_p: (top_p as f32).max(f32::MIN_POSITIVE),
            top_k,
            // Negative seeds are valid in OpenAI's API; their bits are as good a seed as any.
            seed: self.seed.map(|s| s as u64),
            n: n as usize,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stop_token_ids: self.stop_token_ids.cloned().unwrap_or_default(),
            cache_salt: self.cache_salt.cloned(),
        })
    }
}

impl CompletionRequest {
    pub fn sampling(&self) -> Result<Sampling, ApiError> {
        if let Some(b) = self.best_of
            && b != self.n.unwrap_or(1)
        {
            return Err(ApiError::invalid(
                "best_of",
                "best_of other than n is not supported by this server",
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix",
                "suffix is not supported by this server",
            ));
        }
        SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            n: self.n,
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.as_ref(),
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.as_ref(),
            cache_salt: self.cache_salt.as_ref(),
        }
        .validate()
    }

    /// `logprobs`: how many alternatives, None when not asked.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(k) if k as usize <= MAX_TOP_LOGPROBS => Ok(Some(k as usize)),
            Some(k) => Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            )),
        }
    }
}

impl ChatRequest {
    pub fn sampling(&self) -> Result<Sampling, ApiError> {
        if let Some(f) = &self.response_format
            && f.kind != "text"
        {
            return Err(ApiError::invalid(
                "response_format",
                format!(
                    "response_format {:?} is not supported by this server (only \"text\")",
                    f.kind
                ),
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid(
                "tools",
                "tools are not supported by this server",
            ));
        }
        if self
            .tool_choice
            .as_ref()
            .is_some_and(|c| c != "none" && !c.is_null())
        {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice is not supported by this server (only \"none\")",
            ));
        }
        SamplingFields {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            n: self.n,
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.as_ref(),
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.as_ref(),
            cache_salt: self.cache_salt.as_ref(),
        }
        .validate()
    }

    /// `logprobs` + `top_logprobs`: alternatives per token, None when log-probs are not asked.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if top as usize > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}"),
            ));
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as usize)),
            _ if self.top_logprobs.is_some_and(|t| t > 0) => Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            )),
            _ => Ok(None),
        }
    }

    /// `max_completion_tokens`, or its deprecated name `max_tokens`.
    pub fn max_tokens(&self) -> (Option<u64>, &'static str) {
        match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        }
    }

    /// The messages as the chat template takes them.
    pub fn messages(&self) -> Result<Vec<super::backend::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(
                    m.role.as_str(),
                    "system" | "developer" | "user" | "assistant"
                ) {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "unsupported role {:?}: expected system, developer, user or assistant",
                            m.role
                        ),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        format!("messages[{i}].content[{j}]"),
                                        "only content parts of type \"text\" with a text are supported",
                                    ));
                                }
                            }
                        }
                        s
                    }
                };
                Ok(super::backend::ChatMessage {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}
