//! Request bodies of the API and their validation, in one place.
//!
//! [`SamplingRequest`] holds every generation parameter the endpoints share (OpenAI's and vLLM's
//! names); chat and completions flatten it into their bodies and the gRPC `Gateway` builds one
//! from its protobuf, so there is one struct and one [`SamplingRequest::validate`].
//!
//! Fields, as vLLM treats them:
//! - implemented ones are honoured;
//! - documented OpenAI/vLLM fields this server does not implement (beam search, `bad_words`, …)
//!   are accepted at their neutral value and refused by name otherwise — never accepted and
//!   silently ignored;
//! - informational fields (`user`, `metadata`, `store`, …) are accepted and do not change the
//!   output;
//! - anything else is an unknown field: accepted, ignored, and logged.

use super::backend::{Constraint, ConstraintKind, LogitsFields};
use super::error::ApiError;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Most choices (prompts × n) in one request: each is a separate generation in the batch.
pub const MAX_CHOICES: usize = 128;
/// Most alternatives per token, as OpenAI allows.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop strings; OpenAI allows 4, vLLM any number; 16 keeps matching cheap.
pub const MAX_STOP_STRINGS: usize = 16;
/// `max_tokens` of a completion when the request does not say (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;
/// Most `logit_bias` entries (OpenAI allows 300 tokens; vLLM any). Each costs one add per step.
pub const MAX_LOGIT_BIAS: usize = 1024;

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
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Accepted for compatibility; usage is only sent in the final chunk.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// `response_format` (OpenAI): text, json_object, or json_schema.
#[derive(Clone, Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs` (and its older `guided_*` fields): one of these.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub grammar: Option<String>,
    pub choice: Option<Vec<String>>,
    pub json_object: Option<bool>,
}

/// The generation parameters shared by every endpoint (flattened into the request bodies).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingRequest {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's extension; 0 or -1 disable it.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub stop: Option<Stop>,
    /// Extension: token ids that end generation besides the model's EOS.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Extension: keep generating past end-of-sequence (benchmarks want exact output lengths).
    pub ignore_eos: Option<bool>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<Map<String, Value>>,
    pub min_tokens: Option<u64>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputs>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_grammar: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's prefix-cache isolation: only requests with the same salt share cached KV.
    pub cache_salt: Option<String>,
}

/// Defaults of the checkpoint (`generation_config.json`), used where a request is silent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json` of a checkpoint directory; a missing file means no
    /// defaults, a malformed one is an error naming it.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, String> {
        let p = dir.join("generation_config.json");
        if !p.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self {
            temperature: v.get("temperature").and_then(Value::as_f64),
            top_p: v.get("top_p").and_then(Value::as_f64),
            top_k: v.get("top_k").and_then(Value::as_i64),
            min_p: v.get("min_p").and_then(Value::as_f64),
            repetition_penalty: v.get("repetition_penalty").and_then(Value::as_f64),
        })
    }
}

/// Sampling and stopping, validated; what the endpoints hand to the backend.
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
    pub logits: LogitsFields,
    pub skip_special_tokens: bool,
    pub include_stop_str_in_output: bool,
    /// The structured-output constraint asked for (tool-choice constraints are added by chat).
    pub constraint: Option<ConstraintKind>,
    pub cache_salt: Option<String>,
}

fn range(name: &str, v: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::invalid(
            name,
            format!("{name} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

/// `guided_choice` / `structured_outputs.choice`: a regex matching exactly one of the strings.
fn choice_regex(choices: &[String], param: &str) -> Result<String, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid(param, "choice must not be empty"));
    }
    let alts: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
    Ok(format!("({})", alts.join("|")))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The constraints of vLLM's `structured_outputs` / `guided_*` fields.
fn guided(
    param: &'static str,
    json: &Option<Value>,
    regex: &Option<String>,
    grammar: &Option<String>,
    choice: &Option<Vec<String>>,
) -> Result<Vec<(&'static str, ConstraintKind)>, ApiError> {
    let mut found = Vec::new();
    if let Some(j) = json {
        let schema = match j {
            Value::String(s) => serde_json::from_str(s).map_err(|e| {
                ApiError::invalid(param, format!("the JSON schema is not JSON: {e}"))
            })?,
            v => v.clone(),
        };
        found.push((param, ConstraintKind::JsonSchema(schema.to_string())));
    }
    if let Some(r) = regex {
        found.push((param, ConstraintKind::Regex(r.clone())));
    }
    if let Some(g) = grammar {
        found.push((param, ConstraintKind::Lark(g.clone())));
    }
    if let Some(c) = choice {
        found.push((param, ConstraintKind::Regex(choice_regex(c, param)?)));
    }
    Ok(found)
}

impl SamplingRequest {
    /// Validates every field (400 naming the first bad one), filling gaps from `defaults`.
    pub fn validate(&self, defaults: &GenerationDefaults) -> Result<Sampling, ApiError> {
        let temperature = range(
            "temperature",
            self.temperature.or(defaults.temperature).unwrap_or(1.0),
            0.0,
            2.0,
        )?;
        let top_p = self.top_p.or(defaults.top_p).unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k.or(defaults.top_k).unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            k => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1, 0 (disabled) or positive, got {k}"),
                ));
            }
        };
        let min_p = range(
            "min_p",
            self.min_p.or(defaults.min_p).unwrap_or(0.0),
            0.0,
            1.0,
        )?;
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES as u64 {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
        let stop = match &self.stop {
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
        let presence = range(
            "presence_penalty",
            self.presence_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
        )?;
        let frequency = range(
            "frequency_penalty",
            self.frequency_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
        )?;
        let repetition = self
            .repetition_penalty
            .or(defaults.repetition_penalty)
            .unwrap_or(1.0);
        if !(repetition > 0.0 && repetition.is_finite()) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {repetition}"),
            ));
        }
        let mut logit_bias = Vec::new();
        if let Some(m) = &self.logit_bias {
            if m.len() > MAX_LOGIT_BIAS {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("at most {MAX_LOGIT_BIAS} entries are allowed"),
                ));
            }
            for (k, v) in m {
                let id: u32 = k.parse().map_err(|_| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias keys must be token ids, got {k:?}"),
                    )
                })?;
                let b = v.as_f64().ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("logit_bias[{k}] must be a number, got {v}"),
                    )
                })?;
                range("logit_bias", b, -100.0, 100.0)?;
                logit_bias.push((id, b as f32));
            }
            logit_bias.sort_by_key(|&(t, _)| t);
        }
        let min_tokens = usize::try_from(self.min_tokens.unwrap_or(0)).unwrap_or(usize::MAX);
        let constraint = self.constraint()?;
        if self.cache_salt.as_deref().is_some_and(str::is_empty) {
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
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            logits: LogitsFields {
                presence_penalty: presence as f32,
                frequency_penalty: frequency as f32,
                repetition_penalty: repetition as f32,
                logit_bias,
                min_tokens,
                min_p: min_p as f32,
            },
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
            constraint,
            cache_salt: self.cache_salt.clone(),
        })
    }

    /// The one structured-output constraint of the request (two at once are a 400).
    fn constraint(&self) -> Result<Option<ConstraintKind>, ApiError> {
        let mut found: Vec<(&str, ConstraintKind)> = Vec::new();
        if let Some(f) = &self.response_format {
            match f.kind.as_str() {
                "text" => {}
                "json_object" => found.push((
                    "response_format",
                    ConstraintKind::JsonSchema(r#"{"type":"object"}"#.into()),
                )),
                "json_schema" => {
                    let schema = f
                        .json_schema
                        .as_ref()
                        .and_then(|s| s.schema.clone())
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "response_format.json_schema.schema",
                                "response_format json_schema needs json_schema.schema",
                            )
                        })?;
                    if !schema.is_object() && !schema.is_boolean() {
                        return Err(ApiError::invalid(
                            "response_format.json_schema.schema",
                            "the schema must be a JSON object",
                        ));
                    }
                    found.push((
                        "response_format",
                        ConstraintKind::JsonSchema(schema.to_string()),
                    ));
                }
                other => {
                    return Err(ApiError::invalid(
                        "response_format.type",
                        format!(
                            "response_format type must be text, json_object or json_schema, got {other:?}"
                        ),
                    ));
                }
            }
        }
        if let Some(so) = &self.structured_outputs {
            found.extend(guided(
                "structured_outputs",
                &so.json,
                &so.regex,
                &so.grammar,
                &so.choice,
            )?);
            if so.json_object == Some(true) {
                found.push((
                    "structured_outputs",
                    ConstraintKind::JsonSchema(r#"{"type":"object"}"#.into()),
                ));
            }
        }
        found.extend(guided(
            "guided_json",
            &self.guided_json,
            &self.guided_regex,
            &self.guided_grammar,
            &self.guided_choice,
        )?);
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|f| f.1)),
            _ => Err(ApiError::invalid(
                found[1].0,
                "only one structured-output constraint may be given (response_format, structured_outputs or guided_*)",
            )),
        }
    }
}

/// Known fields that do not change the output: accepted, ignored without a log line.
const INFORMATIONAL: &[&str] = &[
    "user",
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "request_id",
    "guided_decoding_backend",
    "structured_outputs_backend",
    "return_token_ids",
];

/// Known OpenAI/vLLM fields this server does not implement, and the values that mean "off".
/// `null` is always accepted.
fn neutral(field: &str, v: &Value) -> Option<bool> {
    let is = |x: Value| v == &x;
    let empty = || {
        v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty())
    };
    Some(match field {
        "use_beam_search"
        | "return_tokens_as_token_ids"
        | "continue_final_message"
        | "echo"
        | "parallel_tool_calls_strict" => is(Value::Bool(false)),
        "length_penalty" => v.as_f64() == Some(1.0),
        "best_of" => v.as_u64() == Some(1),
        "spaces_between_special_tokens" => is(Value::Bool(true)),
        "priority" => v.as_i64() == Some(0),
        "allowed_token_ids"
        | "bad_words"
        | "logits_processors"
        | "functions"
        | "documents"
        | "mm_processor_kwargs"
        | "vllm_xargs"
        | "kv_transfer_params"
        | "prediction"
        | "audio"
        | "web_search_options" => empty(),
        "modalities" => is(serde_json::json!(["text"])),
        "function_call" => v.as_str().is_some_and(|s| s == "none" || s == "auto"),
        "truncate_prompt_tokens"
        | "prompt_logprobs"
        | "reasoning_effort"
        | "chat_template"
        | "guided_whitespace_pattern"
        | "suffix" => v.as_str().is_some_and(str::is_empty),
        _ => return None,
    })
}

/// Checks the fields no typed struct took: known-but-unimplemented ones must be neutral,
/// informational ones pass, unknown ones are logged and ignored (as vLLM does).
pub fn check_extra_fields(extra: &Map<String, Value>, endpoint: &str) -> Result<(), ApiError> {
    let mut unknown = Vec::new();
    for (k, v) in extra {
        if v.is_null() || INFORMATIONAL.contains(&k.as_str()) {
            continue;
        }
        match neutral(k, v) {
            Some(true) => {}
            Some(false) => {
                return Err(ApiError::invalid(
                    k.clone(),
                    format!("{k} = {v} is not supported by this server (only its default)"),
                ));
            }
            None => unknown.push(k.as_str()),
        }
    }
    if !unknown.is_empty() {
        tracing::info!(endpoint, fields = ?unknown, "ignoring unknown request fields");
    }
    Ok(())
}

/// Body of `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u64>,
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub best_of: Option<u64>,
    #[serde(flatten)]
    pub sampling: SamplingRequest,
    /// Everything else (see [`check_extra_fields`]).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `content` of a chat message: a string or a list of parts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A tool call in an assistant message (history) or a reply.
#[derive(Clone, Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    /// A JSON string as OpenAI sends it; an object is accepted and serialised.
    pub arguments: Value,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    pub tool_call_id: Option<String>,
    /// vLLM's field for an assistant turn's reasoning (templates that replay it read it).
    pub reasoning_content: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A tool the model may call.
#[derive(Clone, Debug, Deserialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Vec<ToolIn>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub sampling: SamplingRequest,
    /// Everything else (see [`check_extra_fields`]).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CompletionRequest {
    pub fn sampling(&self, defaults: &GenerationDefaults) -> Result<Sampling, ApiError> {
        check_extra_fields(&self.extra, "completions")?;
        if let Some(b) = self.best_of
            && b != self.sampling.n.unwrap_or(1)
        {
            return Err(ApiError::invalid(
                "best_of",
                "best_of other than n is not supported by this server",
            ));
        }
        // response_format belongs to chat in OpenAI's API; vLLM honours it here too.
        self.sampling.validate(defaults)
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

/// What `tool_choice` asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// No tools offered, or `none`: the model answers in text and no parser runs.
    None,
    /// The model may call tools; calls are parsed from its output.
    Auto,
    /// The model must call at least one of the tools (enforced by a grammar).
    Required,
    /// The model must call this function (enforced by a grammar).
    Named(String),
}

impl ChatRequest {
    pub fn sampling(&self, defaults: &GenerationDefaults) -> Result<Sampling, ApiError> {
        check_extra_fields(&self.extra, "chat.completions")?;
        self.sampling.validate(defaults)
    }

    /// Validates `tools` and `tool_choice`.
    pub fn tool_choice(&self) -> Result<ToolChoice, ApiError> {
        let tools = self.tools.as_deref().unwrap_or_default();
        for (i, t) in tools.iter().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("tool type must be \"function\", got {:?}", t.kind),
                ));
            }
            if t.function.name.is_empty() {
                return Err(ApiError::invalid(
                    format!("tools[{i}].function.name"),
                    "function names must not be empty",
                ));
            }
            if let Some(p) = &t.function.parameters
                && !p.is_object()
            {
                return Err(ApiError::invalid(
                    format!("tools[{i}].function.parameters"),
                    "parameters must be a JSON Schema object",
                ));
            }
        }
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => {
                if tools.is_empty() {
                    ToolChoice::None
                } else {
                    ToolChoice::Auto
                }
            }
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                            "tool_choice must be none, auto, required or a named function, got {other:?}"
                        ),
                    ));
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "tool_choice",
                            "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                ToolChoice::Named(name.to_string())
            }
        };
        match &choice {
            ToolChoice::Required if tools.is_empty() => Err(ApiError::invalid(
                "tool_choice",
                "tool_choice \"required\" needs tools",
            )),
            ToolChoice::Named(n) if !tools.iter().any(|t| &t.function.name == n) => {
                Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names {n:?}, which is not among the tools"),
                ))
            }
            _ => Ok(choice),
        }
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

    /// The messages as the chat template takes them (OpenAI's shape: `content` a string or
    /// null, `tool_calls` with string `arguments`, `tool_call_id`, `name`).
    pub fn messages(&self) -> Result<Vec<Value>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !matches!(
                    m.role.as_str(),
                    "system" | "developer" | "user" | "assistant" | "tool"
                ) {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "unsupported role {:?}: expected system, developer, user, assistant or tool",
                            m.role
                        ),
                    ));
                }
                let content = match &m.content {
                    None => Value::Null,
                    Some(Content::Text(t)) => Value::String(t.clone()),
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
                        Value::String(s)
                    }
                };
                // DeepSeek's templates concatenate content: a user, system or tool turn
                // without content renders as empty text.
                let content = match (&content, m.role.as_str()) {
                    (Value::Null, "assistant") => Value::Null,
                    (Value::Null, _) => Value::String(String::new()),
                    _ => content,
                };
                if m.role == "tool" && m.tool_call_id.is_none() {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].tool_call_id"),
                        "a tool message needs tool_call_id",
                    ));
                }
                // Templates read "developer" as the system prompt it replaces.
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                let mut out = Map::new();
                out.insert("role".into(), Value::String(role.into()));
                out.insert("content".into(), content);
                if let Some(n) = &m.name {
                    out.insert("name".into(), Value::String(n.clone()));
                }
                if let Some(id) = &m.tool_call_id {
                    out.insert("tool_call_id".into(), Value::String(id.clone()));
                }
                if let Some(r) = &m.reasoning_content {
                    out.insert("reasoning_content".into(), Value::String(r.clone()));
                }
                if let Some(calls) = &m.tool_calls {
                    if m.role != "assistant" {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].tool_calls"),
                            "only assistant messages carry tool_calls",
                        ));
                    }
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|c| {
                            let args = match &c.function.arguments {
                                Value::String(s) => s.clone(),
                                v => v.to_string(),
                            };
                            serde_json::json!({
                                "id": c.id,
                                "type": c.kind.clone().unwrap_or_else(|| "function".into()),
                                "function": {"name": c.function.name, "arguments": args},
                            })
                        })
                        .collect();
                    out.insert("tool_calls".into(), Value::Array(calls));
                }
                Ok(Value::Object(out))
            })
            .collect()
    }
}

/// Builds the constraint a request's sampling asks for, starting after `start_after`.
pub fn constraint_of(kind: Option<ConstraintKind>, start_after: Option<u32>) -> Option<Constraint> {
    kind.map(|kind| Constraint { kind, start_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn unknown_fields_pass_and_unsupported_ones_must_be_neutral() {
        let r = parse(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}],
            "some_future_field": 3, "user": "u", "use_beam_search": false, "bad_words": [],
        }));
        assert!(r.sampling(&GenerationDefaults::default()).is_ok());
        let r = parse(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}], "use_beam_search": true,
        }));
        let e = r.sampling(&GenerationDefaults::default()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("use_beam_search"));
    }

    #[test]
    fn defaults_fill_gaps_and_requests_win() {
        let d = GenerationDefaults {
            temperature: Some(0.6),
            top_p: Some(0.95),
            ..Default::default()
        };
        let r = parse(serde_json::json!({"messages": [{"role": "user", "content": "x"}]}));
        let s = r.sampling(&d).unwrap();
        assert_eq!((s.temperature, s.top_p), (0.6, 0.95));
        let r = parse(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}], "temperature": 0}),
        );
        assert_eq!(r.sampling(&d).unwrap().temperature, 0.0);
    }

    #[test]
    fn one_constraint_at_most() {
        let r = parse(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"}, "guided_regex": "a+",
        }));
        assert!(r.sampling(&GenerationDefaults::default()).is_err());
        let r = parse(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}], "guided_choice": ["a.b", "c"],
        }));
        let s = r.sampling(&GenerationDefaults::default()).unwrap();
        assert_eq!(
            s.constraint,
            Some(ConstraintKind::Regex("(a\\.b|c)".into()))
        );
    }

    #[test]
    fn tool_choice_is_validated_against_tools() {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let r = parse(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}], "tools": tools}),
        );
        assert_eq!(r.tool_choice().unwrap(), ToolChoice::Auto);
        let r = parse(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}], "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "g"}}}),
        );
        assert!(r.tool_choice().is_err());
        let r = parse(
            serde_json::json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
        );
        assert!(r.tool_choice().is_err());
    }
}
