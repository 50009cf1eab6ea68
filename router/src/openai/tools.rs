//! Tool calls in DeepSeek-V3's format: the parser that turns a reply into OpenAI `tool_calls`
//! (streaming too), and the grammar that forces a call for `tool_choice: "required"` or a named
//! function. The format, as DeepSeek-V3's chat template writes it:
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! {"arg": 1}
//! ```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>…<｜tool▁call▁end｜><｜tool▁calls▁end｜>
//! ```
//!
//! DeepSeek-V3.1 writes a call as `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`;
//! the parser reads both. Text before `<｜tool▁calls▁begin｜>` is `content`. These markers are special tokens, so the
//! chat endpoint decodes replies with special tokens kept whenever tools are offered.

use super::types::ToolIn;
use serde_json::{Value, json};

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";
const ARGS_OPEN: &str = "\n```json\n";
const ARGS_CLOSE: &str = "\n```";

/// One parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments' JSON text, as the model wrote it.
    pub arguments: String,
}

impl ToolCall {
    /// The OpenAI `tool_calls[]` entry (`id` made unique by the caller's counter).
    pub fn json(&self, id: &str) -> Value {
        json!({
            "id": id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// Parses one `<｜tool▁call▁begin｜>…<｜tool▁call▁end｜>` body (between the markers): V3's
/// `function<｜tool▁sep｜>NAME\n```json\nARGS\n```` or V3.1's `NAME<｜tool▁sep｜>ARGS`.
fn parse_call(body: &str) -> Option<ToolCall> {
    let (head, rest) = body.split_once(SEP)?;
    let (name, args) = match rest.split_once(ARGS_OPEN) {
        Some((name, args)) => (name, args.strip_suffix(ARGS_CLOSE).unwrap_or(args)),
        None => (head, rest),
    };
    if name.trim().is_empty() {
        return None;
    }
    Some(ToolCall {
        name: name.trim().to_string(),
        arguments: args.trim().to_string(),
    })
}

/// Streams a reply's content and its tool calls apart.
#[derive(Clone, Debug, Default)]
pub struct ToolParser {
    /// Text not yet released (maybe the start of a marker, or a call in progress).
    pending: String,
    /// Inside `<｜tool▁calls▁begin｜>`.
    in_calls: bool,
    /// Calls completed so far.
    pub calls: Vec<ToolCall>,
}

/// What one [`ToolParser::push`] releases.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    pub content: String,
    /// Calls completed by this piece of text.
    pub calls: Vec<ToolCall>,
}

fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&k| {
            tag.is_char_boundary(k) && s.is_char_boundary(s.len() - k) && s.ends_with(&tag[..k])
        })
        .unwrap_or(0)
}

impl ToolParser {
    pub fn push(&mut self, text: &str) -> Parsed {
        self.pending.push_str(text);
        let mut out = Parsed::default();
        if !self.in_calls {
            if let Some(pos) = self.pending.find(CALLS_BEGIN) {
                out.content.push_str(&self.pending[..pos]);
                self.pending.drain(..pos + CALLS_BEGIN.len());
                self.in_calls = true;
            } else {
                let hold = partial_suffix(&self.pending, CALLS_BEGIN);
                let cut = self.pending.len() - hold;
                out.content.push_str(&self.pending[..cut]);
                self.pending.drain(..cut);
                return out;
            }
        }
        // Complete calls in `pending`.
        while let Some(end) = self.pending.find(CALL_END) {
            let seg = self.pending[..end].to_string();
            self.pending.drain(..end + CALL_END.len());
            if let Some(body) = seg.split_once(CALL_BEGIN).map(|(_, b)| b)
                && let Some(call) = parse_call(body)
            {
                out.calls.push(call.clone());
                self.calls.push(call);
            }
        }
        out
    }

    /// The end of the reply: text that never formed a call comes back as content, as vLLM
    /// returns an unparseable reply as text.
    pub fn finish(&mut self) -> Parsed {
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.trim_start_matches('\n');
        let rest = rest.strip_prefix(CALLS_END).unwrap_or(rest);
        let rest = rest.trim();
        let content = if rest.is_empty() {
            String::new()
        } else if self.in_calls {
            format!("{CALLS_BEGIN}{rest}")
        } else {
            rest.to_string()
        };
        Parsed {
            content,
            calls: Vec::new(),
        }
    }
}

/// Parses a whole reply: (content, calls).
pub fn parse(text: &str) -> (String, Vec<ToolCall>) {
    let mut p = ToolParser::default();
    let a = p.push(text);
    let b = p.finish();
    (a.content + &b.content, p.calls)
}

/// Token ids of the markers, as the grammar names them.
#[derive(Clone, Copy, Debug)]
pub struct MarkerIds {
    pub calls_begin: u32,
    pub calls_end: u32,
    pub call_begin: u32,
    pub call_end: u32,
    pub sep: u32,
}

/// A Lark grammar (llguidance dialect) for the calls `tool_choice` forces: one call of `only`
/// when named, otherwise one call (or several with `parallel`) of any of `tools`, each with
/// arguments valid under its `parameters` schema.
pub fn call_grammar(
    tools: &[ToolIn],
    only: Option<&str>,
    parallel: bool,
    ids: MarkerIds,
) -> String {
    let mut g = String::new();
    let calls = if parallel {
        "call (\"\\n\" call)*"
    } else {
        "call"
    };
    g.push_str(&format!(
        "start: <[{}]> {calls} <[{}]>\n",
        ids.calls_begin, ids.calls_end
    ));
    let chosen: Vec<(usize, &ToolIn)> = tools
        .iter()
        .enumerate()
        .filter(|(_, t)| only.is_none_or(|n| t.function.name == n))
        .collect();
    let alts: Vec<String> = chosen.iter().map(|(i, _)| format!("f{i}")).collect();
    g.push_str(&format!(
        "call: <[{}]> \"function\" <[{}]> ({})\n",
        ids.call_begin,
        ids.sep,
        alts.join(" | ")
    ));
    for (i, t) in chosen {
        let schema = t
            .function
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object"}));
        // Compact JSON: no whitespace padding the arguments out to max_tokens.
        let mut schema = schema;
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert(json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }));
        }
        let name = serde_json::to_string(&t.function.name).unwrap_or_default();
        g.push_str(&format!(
            "f{i}: {name} \"\\n```json\\n\" a{i} \"\\n```\" <[{}]>\n",
            ids.call_end
        ));
        g.push_str(&format!("a{i}: %json {schema}\n"));
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> String {
        format!(
            "Sure.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{CALL_END}\n{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 1}}\n```{CALL_END}{CALLS_END}"
        )
    }

    #[test]
    fn parses_the_deepseek_format() {
        let (content, calls) = parse(&reply());
        assert_eq!(content, "Sure.");
        assert_eq!(
            calls,
            vec![
                ToolCall {
                    name: "get_weather".into(),
                    arguments: "{\"city\": \"Paris\"}".into()
                },
                ToolCall {
                    name: "add".into(),
                    arguments: "{\"a\": 1}".into()
                },
            ]
        );
    }

    #[test]
    fn streaming_gives_the_same_result_for_any_chunking() {
        let text = reply();
        let chars: Vec<char> = text.chars().collect();
        for step in [1, 2, 3, 7] {
            let mut p = ToolParser::default();
            let (mut content, mut calls) = (String::new(), Vec::new());
            for chunk in chars.chunks(step) {
                let s: String = chunk.iter().collect();
                let o = p.push(&s);
                assert!(
                    !o.content.contains('｜'),
                    "a marker leaked: {:?}",
                    o.content
                );
                content += &o.content;
                calls.extend(o.calls);
            }
            content += &p.finish().content;
            assert_eq!(content, "Sure.");
            assert_eq!(calls.len(), 2);
        }
    }

    #[test]
    fn parses_deepseek_v31_calls_without_a_fence() {
        let text = format!(
            "{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{\"city\": \"Oslo\"}}{CALL_END}{CALLS_END}"
        );
        let (content, calls) = parse(&text);
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: "{\"city\": \"Oslo\"}".into()
            }]
        );
    }

    #[test]
    fn plain_text_and_broken_calls_stay_content() {
        assert_eq!(parse("just text"), ("just text".into(), vec![]));
        let broken = format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{");
        let (content, calls) = parse(&broken);
        assert!(calls.is_empty());
        assert!(content.contains("function"));
    }

    #[test]
    fn grammar_names_each_tool() {
        let tools: Vec<ToolIn> = serde_json::from_value(json!([
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "b"}},
        ]))
        .unwrap();
        let ids = MarkerIds {
            calls_begin: 1,
            calls_end: 2,
            call_begin: 3,
            call_end: 4,
            sep: 5,
        };
        let g = call_grammar(&tools, Some("b"), false, ids);
        assert!(g.contains("f1: \"b\""), "{g}");
        assert!(!g.contains("f0:"), "{g}");
        let g = call_grammar(&tools, None, true, ids);
        assert!(
            g.contains("(f0 | f1)") && g.contains("call (\"\\n\" call)*"),
            "{g}"
        );
    }
}
