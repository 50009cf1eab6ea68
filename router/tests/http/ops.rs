//! /health, /ready, /v1/models, /metrics, /openapi.json.

use crate::client::{get, post, post_sse};
use crate::fake::{MAX_MODEL_LEN, MODEL, serve};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn health_and_ready() {
    let s = serve().await;
    assert_eq!(get(&format!("{}/health", s.url)).await.0, 200);
    assert_eq!(get(&format!("{}/ready", s.url)).await.0, 200);
    s.backend.not_ready.store(true, Ordering::SeqCst);
    let (st, _, body) = get(&format!("{}/ready", s.url)).await;
    assert_eq!(st, 503);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_object());
    // Liveness does not depend on the backend.
    assert_eq!(get(&format!("{}/health", s.url)).await.0, 200);
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let s = serve().await;
    let (st, ctype, body) = get(&format!("{}/v1/models", s.url)).await;
    assert_eq!(st, 200);
    assert!(ctype.starts_with("application/json"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["max_model_len"], MAX_MODEL_LEN);
    assert!(data[0]["created"].as_u64().unwrap() > 1_700_000_000);
}

/// Parses the Prometheus text format strictly enough to catch a malformed exposition: every
/// sample line is `name{labels} value`, every name was declared by a `# TYPE` line.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind));
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(base), "undeclared {name}");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.insert(series.to_string(), v);
    }
    samples
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    post(&url, &json!({"prompt": "abcd", "max_tokens": 3, "n": 2})).await;
    post_sse(
        &url,
        &json!({"prompt": "xyz", "max_tokens": 2, "stream": true}),
    )
    .await;
    post(&url, &json!({"prompt": "x", "temperature": 9})).await;
    let (st, ctype, text) = get(&format!("{}/metrics", s.url)).await;
    assert_eq!(st, 200);
    assert!(ctype.starts_with("text/plain"));
    let m = parse_prometheus(&text);
    assert_eq!(m["shardseek_prompt_tokens_total"], 11.0);
    assert_eq!(m["shardseek_generation_tokens_total"], 8.0);
    assert_eq!(m["shardseek_requests_total{status=\"success\"}"], 2.0);
    assert_eq!(m["shardseek_requests_total{status=\"invalid\"}"], 1.0);
    assert_eq!(m["shardseek_requests_total{status=\"cancelled\"}"], 0.0);
    assert_eq!(m["shardseek_time_to_first_token_seconds_count"], 3.0);
    assert_eq!(m["shardseek_inter_token_latency_seconds_count"], 5.0);
    assert_eq!(m["shardseek_request_duration_seconds_count"], 3.0);
    assert!(m["shardseek_process_resident_memory_bytes"] > 1e6);
    assert!(m["shardseek_process_open_fds"] >= 3.0);
}

/// Every `$ref` in the document points at something that exists.
fn check_refs(doc: &Value, v: &Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                let path = r
                    .strip_prefix("#/")
                    .unwrap_or_else(|| panic!("external ref {r}"));
                let mut at = doc;
                for part in path.split('/') {
                    at = at.get(part).unwrap_or_else(|| panic!("dangling ref {r}"));
                }
            }
            o.values().for_each(|x| check_refs(doc, x));
        }
        Value::Array(a) => a.iter().for_each(|x| check_refs(doc, x)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_document_covers_the_api() {
    let s = serve().await;
    let (st, ctype, body) = get(&format!("{}/openapi.json", s.url)).await;
    assert_eq!(st, 200);
    assert!(ctype.starts_with("application/json"));
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    for (path, method) in [
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing");
        assert!(op["operationId"].is_string(), "{method} {path}");
        assert!(!op["responses"].as_object().unwrap().is_empty());
    }
    check_refs(&doc, &doc);
    // The request schemas list the fields the server implements; others are accepted (and
    // ignored with a log line), as vLLM does.
    let req = &doc["components"]["schemas"]["CompletionRequest"];
    assert_eq!(req["additionalProperties"], true);
    for f in [
        "prompt",
        "max_tokens",
        "stop",
        "logprobs",
        "echo",
        "stream_options",
        "ignore_eos",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "structured_outputs",
    ] {
        assert!(req["properties"][f].is_object(), "{f}");
    }
    let chat = &doc["components"]["schemas"]["ChatCompletionRequest"];
    for f in [
        "tools",
        "tool_choice",
        "response_format",
        "chat_template_kwargs",
    ] {
        assert!(chat["properties"][f].is_object(), "{f}");
    }
    for (path, method) in [("/tokenize", "post"), ("/detokenize", "post")] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
}

/// A raw request with headers; returns status, the response headers and the body.
async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, hyper::HeaderMap, Value) {
    use http_body_util::{BodyExt, Full};
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    let req = b
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = crate::client::client().request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status.as_u16(), parts.headers, v)
}

#[tokio::test]
async fn api_key_is_required_where_it_should_be() {
    let s = crate::fake::serve_configured(true, |st| st.api_key = Some("sekret".into())).await;
    let body = json!({"prompt": "hi", "max_tokens": 1});
    let url = format!("{}/v1/completions", s.url);
    let (st, _, v) = send("POST", &url, &[], Some(body.clone())).await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (st, _, _) = send(
        "POST",
        &url,
        &[("authorization", "Bearer wrong!")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(st, 401);
    let (st, _, v) = send(
        "POST",
        &url,
        &[("authorization", "Bearer sekret")],
        Some(body),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, _, _) = send(
        "POST",
        &format!("{}/tokenize", s.url),
        &[],
        Some(json!({"prompt": "a"})),
    )
    .await;
    assert_eq!(st, 401);
    // Probes and metrics stay open.
    assert_eq!(get(&format!("{}/health", s.url)).await.0, 200);
    assert_eq!(get(&format!("{}/metrics", s.url)).await.0, 200);
}

#[tokio::test]
async fn request_id_and_cors() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    let body = json!({"prompt": "hi", "max_tokens": 1});
    let (st, h, _) = send(
        "POST",
        &url,
        &[("x-request-id", "abc-123")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(h["x-request-id"], "abc-123");
    // A refused request carries its id too; a made-up id when the client sent none.
    let (st, h, _) = send("POST", &url, &[], Some(json!({"prompt": "hi", "n": 0}))).await;
    assert_eq!(st, 400);
    assert!(h["x-request-id"].to_str().unwrap().starts_with("req-"));
    let (st, h, _) = send(
        "OPTIONS",
        &url,
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ],
        None,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let (_, h, _) = send(
        "POST",
        &url,
        &[("origin", "https://app.example")],
        Some(body),
    )
    .await;
    assert_eq!(h["access-control-allow-origin"], "*");
    let s = crate::fake::serve_configured(true, |st| {
        st.allowed_origins = vec!["https://ok.example".into()]
    })
    .await;
    let url = format!("{}/v1/models", s.url);
    let (_, h, _) = send("GET", &url, &[("origin", "https://evil.example")], None).await;
    assert!(h.get("access-control-allow-origin").is_none());
    let (_, h, _) = send("GET", &url, &[("origin", "https://ok.example")], None).await;
    assert_eq!(h["access-control-allow-origin"], "https://ok.example");
}

#[tokio::test]
async fn tokenize_and_detokenize() {
    let s = serve().await;
    let (st, v) = post(&format!("{}/tokenize", s.url), &json!({"prompt": "hi"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tokens"], json!([104, 105]));
    assert_eq!(v["count"], 2);
    assert_eq!(v["max_model_len"], MAX_MODEL_LEN);
    let (st, v) = post(
        &format!("{}/tokenize", s.url),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], "user:hi\nassistant:".len());
    let (st, v) = post(
        &format!("{}/detokenize", s.url),
        &json!({"tokens": [104, 105]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["prompt"], "hi");
    let (st, v) = post(&format!("{}/tokenize", s.url), &json!({})).await;
    assert_eq!(st, 400, "{v}");
    let (st, _) = post(
        &format!("{}/tokenize", s.url),
        &json!({"prompt": "x", "model": "other"}),
    )
    .await;
    assert_eq!(st, 404);
}
