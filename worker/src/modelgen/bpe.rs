//! The generated tokenizer: a byte-level BPE (GPT-2 byte alphabet and pre-tokenizer, as
//! DeepSeek-V3's tokenizer is) whose merges are learned from a small embedded English text, with
//! DeepSeek-V3's special tokens, written as a Hugging Face `tokenizer.json` that the Rust and
//! Python `tokenizers` libraries load, plus `tokenizer_config.json` with a chat template in the
//! style of DeepSeek-V3's.
//!
//! Ids: 0 BOS, 1 EOS, 2 PAD (as in DeepSeek-V3), then the 256 byte tokens, then merges, then the
//! chat/tool special tokens at the end. The vocabulary has exactly `vocab_size` entries. When the
//! embedded text runs out of pairs to merge (large vocabularies), the remaining ids are filled
//! with merges of two learned tokens chosen by a fixed-seed PRNG: valid BPE entries that decode
//! to readable text, so a random model's output still reads as words.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use super::GenError;
use super::rng::Rng;

/// The text merges are learned from.
const CORPUS: &str = include_str!("corpus.txt");

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const PAD: &str = "<｜▁pad▁｜>";
/// Special tokens placed at the end of the vocabulary: (content, special). `<think>` tags are
/// ordinary text in DeepSeek's tokenizers (they must survive `skip_special_tokens`).
const TAIL_SPECIALS: &[(&str, bool)] = &[
    ("<｜User｜>", true),
    ("<｜Assistant｜>", true),
    ("<think>", false),
    ("</think>", false),
    ("<｜tool▁calls▁begin｜>", true),
    ("<｜tool▁calls▁end｜>", true),
    ("<｜tool▁call▁begin｜>", true),
    ("<｜tool▁call▁end｜>", true),
    ("<｜tool▁outputs▁begin｜>", true),
    ("<｜tool▁outputs▁end｜>", true),
    ("<｜tool▁output▁begin｜>", true),
    ("<｜tool▁output▁end｜>", true),
    ("<｜tool▁sep｜>", true),
];
const HEAD_SPECIALS: &[&str] = &[BOS, EOS, PAD];
/// Smallest vocabulary: specials + 256 bytes.
pub const MIN_VOCAB: usize = HEAD_SPECIALS.len() + 256 + TAIL_SPECIALS.len();
/// Fixed: the tokenizer depends only on the vocabulary size, not on the weight seed.
const FILL_SEED: u64 = 0x70b0_cafe;

/// GPT-2's reversible byte → printable char map (what the ByteLevel pre-tokenizer emits).
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{fffd}');
            n += 1;
            c
        };
    }
    out
}

/// The learned vocabulary and merges.
pub struct Bpe {
    /// Token strings (byte-level alphabet), id = position + HEAD_SPECIALS.len().
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

/// Pre-tokenizes the corpus exactly as the runtime tokenizer will, and counts the words.
fn corpus_words() -> Result<Vec<(Vec<String>, u64)>, GenError> {
    let bl = ByteLevel::new(false, true, true);
    let mut pts = PreTokenizedString::from(CORPUS);
    bl.pre_tokenize(&mut pts)
        .map_err(|e| GenError::Tokenizer(format!("pre-tokenizing the corpus: {e}")))?;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for (s, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(s.to_string()).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, u64)> = counts
        .into_iter()
        .map(|(w, c)| (w.chars().map(String::from).collect(), c))
        .collect();
    words.sort();
    Ok(words)
}

/// Learns `n_tokens` tokens beyond the 256 bytes.
pub fn learn(n_tokens: usize) -> Result<Bpe, GenError> {
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();
    let mut learned: Vec<String> = Vec::new();
    let mut words = corpus_words()?;
    let target = 256 + n_tokens;
    while tokens.len() < target {
        let mut pairs: HashMap<(&str, &str), u64> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += c;
            }
        }
        // Most frequent first; ties by the pair itself so the result is deterministic.
        let Some(((a, b), _)) = pairs
            .into_iter()
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then_with(|| pb.cmp(pa)))
        else {
            break;
        };
        let (a, b) = (a.to_string(), b.to_string());
        let joined = format!("{a}{b}");
        for (w, _) in &mut words {
            let mut i = 0;
            let mut out = Vec::with_capacity(w.len());
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(joined.clone());
                    i += 2;
                } else {
                    out.push(std::mem::take(&mut w[i]));
                    i += 1;
                }
            }
            *w = out;
        }
        merges.push((a, b));
        // Two different pairs can spell the same token; the vocabulary holds it once.
        if known.insert(joined.clone()) {
            tokens.push(joined.clone());
            learned.push(joined);
        }
    }
    // The text is exhausted: fill with joins of learned tokens (see the module comment).
    if tokens.len() < target {
        if learned.len() < 2 {
            return Err(GenError::Tokenizer(
                "the embedded corpus yields too few merges".into(),
            ));
        }
        let mut rng = Rng::new(FILL_SEED);
        let mut attempts = 0usize;
        while tokens.len() < target {
            attempts += 1;
            if attempts > 100 * target {
                return Err(GenError::Tokenizer(format!(
                    "could not fill a vocabulary of {target} byte-level tokens"
                )));
            }
            let a = &learned[rng.below(learned.len())];
            let b = &learned[rng.below(learned.len())];
            let joined = format!("{a}{b}");
            if known.insert(joined.clone()) {
                merges.push((a.clone(), b.clone()));
                tokens.push(joined);
            }
        }
    }
    Ok(Bpe { tokens, merges })
}

fn added(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special
    })
}

/// `tokenizer.json` for a vocabulary of exactly `vocab_size` ids.
pub fn tokenizer_json(vocab_size: usize) -> Result<Value, GenError> {
    if vocab_size < MIN_VOCAB {
        return Err(GenError::Tokenizer(format!(
            "vocab_size {vocab_size} is below the minimum {MIN_VOCAB}"
        )));
    }
    let bpe = learn(vocab_size - MIN_VOCAB)?;
    let mut vocab = Map::new();
    let mut added_tokens = Vec::new();
    for (id, s) in HEAD_SPECIALS.iter().enumerate() {
        vocab.insert((*s).to_string(), json!(id));
        added_tokens.push(added(id, s, true));
    }
    let base = HEAD_SPECIALS.len();
    for (i, t) in bpe.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(base + i));
    }
    let tail = base + bpe.tokens.len();
    for (i, (s, special)) in TAIL_SPECIALS.iter().enumerate() {
        vocab.insert((*s).to_string(), json!(tail + i));
        added_tokens.push(added(tail + i, s, *special));
    }
    if vocab.len() != vocab_size {
        return Err(GenError::Internal(format!(
            "built {} vocabulary entries for vocab_size {vocab_size}",
            vocab.len()
        )));
    }
    let merges: Vec<Value> = bpe.merges.iter().map(|(a, b)| json!([a, b])).collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {
                BOS: {"id": BOS, "ids": [0], "tokens": [BOS]}
            }
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    }))
}

/// The chat template, in the shape of DeepSeek-V3's: system prompts joined up front after BOS,
/// `<｜User｜>`/`<｜Assistant｜>` turns, an assistant turn closed by EOS, reasoning before
/// `</think>` dropped from past turns, tool calls and tool outputs in DeepSeek's tokens, and
/// `<｜Assistant｜>` at the end when `add_generation_prompt` is set. Beyond DeepSeek-V3's own:
/// `tools` are described in the system prompt with the call format (as vLLM's DeepSeek-V3 tool
/// template does), and `thinking: true` (V3.1's switch, via `chat_template_kwargs`) opens a
/// `<think>` block after the generation prompt, so every API feature runs on a generated model.
pub const CHAT_TEMPLATE: &str = r#"{%- if add_generation_prompt is not defined -%}
    {%- set add_generation_prompt = false -%}
{%- endif -%}
{%- if thinking is not defined -%}
    {%- set thinking = false -%}
{%- endif -%}
{%- set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false, is_output_first=true) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if ns.is_first_sp -%}
            {%- set ns.system_prompt = ns.system_prompt + message['content'] -%}
            {%- set ns.is_first_sp = false -%}
        {%- else -%}
            {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if tools -%}
    {%- if ns.system_prompt -%}
        {%- set ns.system_prompt = ns.system_prompt + '\n\n' -%}
    {%- endif -%}
    {%- set ns.system_prompt = ns.system_prompt + '## Tools\nYou have access to the following tools:\n' -%}
    {%- for tool in tools -%}
        {%- set ns.system_prompt = ns.system_prompt + '\n### ' + tool['function']['name'] + '\nDescription: ' + (tool['function']['description'] or '') + '\n\nParameters: ' + (tool['function']['parameters'] | tojson) + '\n' -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + '\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\n{"arg": "value"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' -%}
{%- endif -%}
{{- bos_token }}{{ ns.system_prompt -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {%- if ns.is_tool -%}
            {{- '<｜tool▁outputs▁end｜>' -}}
            {%- set ns.is_tool = false -%}
        {%- endif -%}
        {{- '<｜User｜>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- if ns.is_tool -%}
            {{- '<｜tool▁outputs▁end｜>' -}}
            {%- set ns.is_tool = false -%}
        {%- endif -%}
        {%- set content = message['content'] if message['content'] is defined and message['content'] is not none else '' -%}
        {%- if '</think>' in content -%}
            {%- set content = content.split('</think>')[-1].strip() -%}
        {%- endif -%}
        {{- '<｜Assistant｜>' + content -}}
        {%- if message.get('tool_calls') -%}
            {{- '<｜tool▁calls▁begin｜>' -}}
            {%- for tool in message['tool_calls'] -%}
                {%- set args = tool['function']['arguments'] -%}
                {%- if args is not string -%}
                    {%- set args = args | tojson -%}
                {%- endif -%}
                {%- if not loop.first -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<｜tool▁call▁begin｜>' + tool.get('type', 'function') + '<｜tool▁sep｜>' + tool['function']['name'] + '\n```json\n' + args + '\n```<｜tool▁call▁end｜>' -}}
            {%- endfor -%}
            {{- '<｜tool▁calls▁end｜>' -}}
        {%- endif -%}
        {{- '<｜end▁of▁sentence｜>' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if not ns.is_tool -%}
            {{- '<｜tool▁outputs▁begin｜>' -}}
            {%- set ns.is_tool = true -%}
            {%- set ns.is_output_first = true -%}
        {%- endif -%}
        {%- if not ns.is_output_first -%}
            {{- '\n' -}}
        {%- endif -%}
        {{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}
        {%- set ns.is_output_first = false -%}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('unsupported chat role: ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if ns.is_tool -%}
    {{- '<｜tool▁outputs▁end｜>' -}}
{%- endif -%}
{%- if add_generation_prompt -%}
    {{- '<｜Assistant｜>' -}}
    {%- if thinking -%}
        {{- '<think>' -}}
    {%- endif -%}
{%- endif -%}"#;

/// `tokenizer_config.json` (transformers' fast-tokenizer config).
pub fn tokenizer_config_json(model_max_length: u64) -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": null,
        "clean_up_tokenization_spaces": false,
        "legacy": true,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let c = byte_chars();
        let set: HashSet<char> = c.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(c[b' ' as usize], 'Ġ');
        assert_eq!(c[b'a' as usize], 'a');
    }

    #[test]
    fn learns_real_merges_then_fills() {
        let b = learn(700).expect("learn");
        assert_eq!(b.tokens.len(), 956);
        assert!(b.tokens.iter().any(|t| t == "Ġthe"), "common word merged");
        let big = learn(5000).expect("learn");
        assert_eq!(big.tokens.len(), 5256);
        let uniq: HashSet<&String> = big.tokens.iter().collect();
        assert_eq!(uniq.len(), big.tokens.len());
    }
}
