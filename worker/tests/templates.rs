//! Chat templates render byte-identically to Python transformers' `apply_chat_template`: the
//! real DeepSeek-V3, R1 and V3.1 templates (testdata/chat_templates, see its README for where
//! each text comes from) and the template `model gen` writes, over conversations with system
//! prompts, history, reasoning, tool calls, tool results, tools and V3.1's `thinking` switch.
//! Needs python3 with transformers (`.ci/requirements.txt`); skipped without it unless
//! SHARDSEEK_REQUIRE_PYTHON is set (CI).

use serde_json::{Value, json};
use shardseek_worker::modelgen;
use shardseek_worker::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn templates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/chat_templates")
}

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import transformers, jinja2"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("SHARDSEEK_REQUIRE_PYTHON").is_err(),
            "python3 with transformers is required (SHARDSEEK_REQUIRE_PYTHON is set)"
        );
        eprintln!("SKIPPED: python3 with `transformers` is not installed");
    }
    ok
}

/// A generated tokenizer (DeepSeek's special tokens) in a temporary directory.
fn tokenizer_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let tj = modelgen::bpe::tokenizer_json(1024).expect("tokenizer json");
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).expect("write");
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        modelgen::bpe::tokenizer_config_json(4096).to_string(),
    )
    .expect("write");
    dir
}

/// Conversations every template must render alike. Object keys are in sorted order: the
/// server's values come from parsed JSON, whose maps are sorted, and `tojson` keeps order.
fn cases() -> Vec<Value> {
    let weather_call = json!({"id": "call_1", "type": "function",
        "function": {"arguments": "{\"city\": \"Paris\"}", "name": "get_weather"}});
    let tools = json!([{"function": {"description": "Weather of a city", "name": "get_weather",
        "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}},
        "type": "function"}]);
    vec![
        json!({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": true}),
        json!({"messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>hmm</think>Hello!"},
            {"role": "user", "content": "1+1?"}], "add_generation_prompt": true}),
        json!({"messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}], "add_generation_prompt": false}),
        json!({"messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [weather_call,
                {"id": "call_2", "type": "function",
                 "function": {"arguments": "{\"city\": \"Rome\"}", "name": "get_weather"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
            {"role": "tool", "content": "rain", "tool_call_id": "call_2"},
            {"role": "assistant", "content": "Sunny in Paris, rain in Rome."},
            {"role": "user", "content": "Thanks"}],
            "add_generation_prompt": true, "tools": tools}),
        json!({"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [weather_call]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
            "add_generation_prompt": true}),
        json!({"messages": [{"role": "user", "content": "Think: 2+2?"}],
            "add_generation_prompt": true, "kwargs": {"thinking": true}}),
        json!({"messages": [{"role": "user", "content": "Quick: 2+2?"}],
            "add_generation_prompt": true, "kwargs": {"thinking": false}}),
    ]
}

const PY: &str = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
req = json.load(sys.stdin)
out = []
for src in req["templates"]:
    row = []
    for c in req["cases"]:
        kw = dict(c.get("kwargs", {}))
        if c.get("tools") is not None:
            kw["tools"] = c["tools"]
        try:
            row.append(tok.apply_chat_template(c["messages"], chat_template=src, tokenize=False,
                       add_generation_prompt=c["add_generation_prompt"], **kw))
        except Exception as e:
            row.append({"error": str(e)})
    out.append(row)
print(json.dumps(out))
"#;

fn python_render(dir: &Path, templates: &[String], cases: &[Value]) -> Vec<Vec<Value>> {
    let mut child = Command::new("python3")
        .args(["-c", PY])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(
                json!({"templates": templates, "cases": cases})
                    .to_string()
                    .as_bytes(),
            )
            .expect("write");
    }
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python output")
}

#[test]
fn templates_match_transformers_byte_for_byte() {
    if !python_ready() {
        return;
    }
    let dir = tokenizer_dir();
    let mut names = vec!["generated".to_string()];
    let mut sources = vec![modelgen::bpe::CHAT_TEMPLATE.to_string()];
    for name in [
        "deepseek-v3.jinja",
        "deepseek-r1.jinja",
        "deepseek-v3.1.jinja",
    ] {
        names.push(name.into());
        sources.push(std::fs::read_to_string(templates_dir().join(name)).expect("template"));
    }
    let cases = cases();
    let py = python_render(dir.path(), &sources, &cases);
    let mut compared = 0;
    for ((name, src), py_row) in names.iter().zip(&sources).zip(&py) {
        let mut tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
        tok.set_chat_template(src.clone()).expect("template parses");
        for (case, want) in cases.iter().zip(py_row) {
            let mut extra = case
                .get("kwargs")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if let Some(t) = case.get("tools") {
                extra.insert("tools".into(), t.clone());
            }
            let got = tok.apply_chat_template_with(
                case["messages"].as_array().expect("messages"),
                case["add_generation_prompt"].as_bool().unwrap_or(false),
                &Value::Object(extra),
            );
            match (want, got) {
                (Value::String(w), Ok(g)) => {
                    assert_eq!(&g, w, "template {name}, case {case}");
                    compared += 1;
                }
                // A template that cannot render a conversation must fail in both.
                (Value::Object(_), Err(_)) => {}
                (w, g) => panic!("template {name}, case {case}: python {w}, rust {g:?}"),
            }
        }
    }
    // Every template rendered most cases (the comparison is not vacuous).
    assert!(
        compared >= 4 * cases.len() - 4,
        "only {compared} renders compared"
    );
}

/// The generated template offers everything the API needs: tools in the system prompt,
/// DeepSeek's tool-call tokens, and a `<think>` block when thinking is on.
#[test]
fn generated_template_has_tools_and_thinking() {
    let dir = tokenizer_dir();
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let case = &cases()[3];
    let s = tok
        .apply_chat_template_with(
            case["messages"].as_array().expect("messages"),
            true,
            &json!({"tools": case["tools"]}),
        )
        .expect("render");
    assert!(
        s.contains("### get_weather\nDescription: Weather of a city"),
        "{s}"
    );
    assert!(
        s.contains("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"),
        "{s}"
    );
    let msgs = [json!({"role": "user", "content": "x"})];
    let on = tok
        .apply_chat_template_with(&msgs, true, &json!({"thinking": true}))
        .expect("render");
    assert!(on.ends_with("<｜Assistant｜><think>"), "{on}");
    let off = tok
        .apply_chat_template_with(&msgs, true, &json!({}))
        .expect("render");
    assert!(off.ends_with("<｜Assistant｜>"), "{off}");
}
