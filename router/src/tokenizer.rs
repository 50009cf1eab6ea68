//! Text ↔ token ids for a checkpoint directory: `tokenizer.json` (Hugging Face `tokenizers`),
//! `tokenizer_config.json` (BOS/EOS and the Jinja chat template), rendered with minijinja the
//! way transformers renders it (trim/lstrip blocks, Python string/dict methods such as `strip`,
//! `split`, `get`, `raise_exception`, `namespace`, loop controls).
//!
//! The router tokenizes with this; the worker's `generate --prompt` and the streaming paths
//! detokenize with [`IncrementalDecoder`], which only ever emits complete UTF-8 text.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// Errors of tokenization and chat templating.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("token id {id} is outside the vocabulary of {vocab} ids")]
    UnknownId { id: u32, vocab: usize },
    #[error("the tokenizer has no {0} token")]
    MissingToken(&'static str),
    #[error("the tokenizer has no chat template (tokenizer_config.json `chat_template`)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// One chat message in the OpenAI shape (`role`, `content`); anything serialisable with the same
/// fields (e.g. a `serde_json::Value` with `tool_calls`) works with
/// [`Tokenizer::apply_chat_template`] as well.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A loaded tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids, added tokens included, counted once at load: `tokenizers` answers
    /// `get_vocab_size` by building a copy of the whole vocabulary map, and `decode` checks ids
    /// against it for every streamed token (measured: ~10 ms of router CPU per token on a
    /// 32k vocabulary, taken from the model's cores).
    vocab_size: usize,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    /// EOS ids: the tokenizer's EOS plus `config.json`'s `eos_token_id` (int or list) if present.
    eos_ids: Vec<u32>,
    env: Option<Environment<'static>>,
    /// The chat template's text (for `--chat-template` overrides and parser auto-detection).
    template_source: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("chat_template", &self.env.is_some())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// transformers' `raise_exception(msg)` for templates.
fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn template_env(source: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // transformers renders chat templates with trim_blocks and lstrip_blocks.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_filter("tojson", py_tojson);
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=indent)` — Python's
/// separators (`", "`, `": "`), no HTML escaping (minijinja's own `tojson` escapes `<`, `>`,
/// `&` and `'`, which would make prompts differ from transformers'). Object keys come out in
/// the order of the value (sorted, for values parsed from JSON).
fn py_tojson(
    value: minijinja::Value,
    indent: Option<usize>,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&v, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A chat template may be one string or a list of named templates (`default` is used).
fn pick_template(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list.iter().find_map(|t| {
            (t.get("name")?.as_str()? == "default")
                .then(|| t.get("template")?.as_str().map(str::to_string))
                .flatten()
        }),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and `config.json` from a
    /// checkpoint directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(TokenizerError::Io {
                path: tok_path,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| TokenizerError::Load {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            Value::Null
        };
        let resolve = |key: &str| -> Result<Option<(String, u32)>> {
            match token_text(cfg.get(key)) {
                None => Ok(None),
                Some(t) => match inner.token_to_id(&t) {
                    Some(id) => Ok(Some((t, id))),
                    None => Err(TokenizerError::Config {
                        path: cfg_path.clone(),
                        what: format!("{key} {t:?} is not in the vocabulary"),
                    }),
                },
            }
        };
        let bos = resolve("bos_token")?;
        let eos = resolve("eos_token")?;
        let mut eos_ids: Vec<u32> = eos.iter().map(|(_, id)| *id).collect();
        let model_cfg = dir.join("config.json");
        if model_cfg.exists() {
            let c = read_json(&model_cfg)?;
            let extra: Vec<u32> = match c.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().into_iter().map(|v| v as u32).collect(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as u32)
                    .collect(),
                _ => Vec::new(),
            };
            for id in extra {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let env = match pick_template(cfg.get("chat_template")) {
            Some(src) => Some(template_env(src).map_err(|e| TokenizerError::Config {
                path: cfg_path.clone(),
                what: format!("chat_template does not parse: {e}"),
            })?),
            None => None,
        };
        let template_source = pick_template(cfg.get("chat_template"));
        Ok(Self {
            vocab_size: inner.get_vocab_size(true),
            inner,
            bos,
            eos,
            eos_ids,
            env,
            template_source,
        })
    }

    /// Replaces the checkpoint's chat template (`--chat-template FILE`).
    pub fn set_chat_template(&mut self, source: String) -> Result<()> {
        let env = template_env(source.clone()).map_err(|e| {
            TokenizerError::Template(format!("the chat template does not parse: {e}"))
        })?;
        self.env = Some(env);
        self.template_source = Some(source);
        Ok(())
    }

    /// The chat template's text, if there is one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.template_source.as_deref()
    }

    /// Number of ids, added tokens included (the model's `vocab_size` for generated models).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }

    /// Ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. by the chat template) are
    /// recognised. With `add_bos`, BOS is prepended unless the text already starts with it (a
    /// rendered chat template does), so a prompt never carries two.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        if add_bos {
            let bos = self
                .bos_token_id()
                .ok_or(TokenizerError::MissingToken("BOS"))?;
            if ids.first() != Some(&bos) {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                return Ok(out);
            }
        }
        Ok(ids.to_vec())
    }

    /// Text of `ids`; ids outside the vocabulary are an error, not silently dropped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::UnknownId { id, vocab });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Renders the chat template over `messages` (OpenAI-shaped), as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &Value::Null)
    }

    /// As [`Self::apply_chat_template`], with extra template variables (an object, e.g. `tools`).
    pub fn apply_chat_template_with<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        extra: &Value,
    ) -> Result<String> {
        let env = self.env.as_ref().ok_or(TokenizerError::NoChatTemplate)?;
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        if let Value::Object(m) = extra {
            ctx.extend(m.clone());
        }
        let mut messages = serde_json::to_value(messages)
            .map_err(|e| TokenizerError::Template(format!("messages: {e}")))?;
        // As transformers does before rendering: keys whose value is None are dropped
        // (`content: null` of a tool-call turn becomes an undefined `content`).
        if let Value::Array(list) = &mut messages {
            for m in list {
                if let Value::Object(o) = m {
                    o.retain(|_, v| !v.is_null());
                }
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert(
            "bos_token".into(),
            self.bos.as_ref().map_or("", |b| b.0.as_str()).into(),
        );
        ctx.insert(
            "eos_token".into(),
            self.eos.as_ref().map_or("", |e| e.0.as_str()).into(),
        );
        tmpl.render(minijinja::value::Serde(&ctx)).map_err(|e| {
            // Report the message a template raised, not just "invalid operation".
            let mut msg = e.to_string();
            if let Some(d) = e.detail()
                && !msg.contains(d)
            {
                msg = format!("{msg}: {d}");
            }
            TokenizerError::Template(msg)
        })
    }
}

/// Turns a stream of token ids into text deltas that are always complete UTF-8.
///
/// A byte-level BPE token can hold part of a multi-byte character; decoding it alone yields
/// U+FFFD. Like vLLM/TGI, this decodes a short window of recent ids twice (with and without the new
/// ones) and emits the difference only once it no longer ends in a partial character.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Self::default()
        }
    }

    fn delta(&self, tok: &Tokenizer, allow_partial: bool) -> Result<Option<String>> {
        let prefix = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() <= prefix.len() || (!allow_partial && full.ends_with('\u{fffd}')) {
            return Ok(None);
        }
        let delta = match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // The decoder rewrote the shared part (should not happen for byte-level BPE): emit
            // what follows the common prefix at a character boundary.
            None => {
                let common = full
                    .char_indices()
                    .zip(prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, c), _)| i + c.len_utf8());
                full[common..].to_string()
            }
        };
        Ok(Some(delta))
    }

    /// Adds one id; returns new text when a complete piece is available.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let out = self.delta(tok, false)?;
        if out.is_some() {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(out)
    }

    /// Flushes what is left at the end of a stream (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let out = self.delta(tok, true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(out)
    }

    /// All ids seen so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
