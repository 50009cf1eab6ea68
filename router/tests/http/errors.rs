//! Every 4xx path of /v1/completions: OpenAI-shaped bodies, the right status, the parameter named.

use crate::client::{get, post, post_raw};
use crate::fake::{MODEL, serve};
use serde_json::{Value, json};
use shardseek_router::openai::BackendError;
use std::sync::atomic::Ordering;

fn assert_shape(v: &Value) {
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an error body: {v}"));
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.contains_key("param") && e.contains_key("code"), "{v}");
}

#[tokio::test]
async fn bad_parameters_are_400_naming_them() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    let cases = [
        (
            json!({"prompt": "x", "use_beam_search": true}),
            Some("use_beam_search"),
        ),
        (
            json!({"prompt": "x", "max_tokens": "ten"}),
            Some("max_tokens"),
        ),
        (json!({"prompt": "x", "max_tokens": -1}), Some("max_tokens")),
        (json!({"prompt": "x", "max_tokens": 0}), Some("max_tokens")),
        (json!({"max_tokens": 3}), Some("prompt")),
        (json!({"prompt": 5}), Some("prompt")),
        (json!({"prompt": [1, "a"]}), Some("prompt")),
        (json!({"prompt": ""}), Some("prompt")),
        (json!({"prompt": []}), Some("prompt")),
        (json!({"prompt": [[]]}), Some("prompt")),
        (
            json!({"prompt": "x", "temperature": 2.5}),
            Some("temperature"),
        ),
        (
            json!({"prompt": "x", "temperature": "hot"}),
            Some("temperature"),
        ),
        (json!({"prompt": "x", "top_p": 0}), Some("top_p")),
        (json!({"prompt": "x", "top_p": 1.5}), Some("top_p")),
        (json!({"prompt": "x", "top_k": -2}), Some("top_k")),
        (json!({"prompt": "x", "n": 0}), Some("n")),
        (json!({"prompt": "x", "n": 129}), Some("n")),
        (json!({"prompt": ["a", "b"], "n": 100}), Some("n")),
        (json!({"prompt": "x", "logprobs": 21}), Some("logprobs")),
        (json!({"prompt": "x", "stop": ""}), Some("stop")),
        (json!({"prompt": "x", "stop": 3}), Some("stop")),
        (json!({"prompt": "x", "stop": vec!["s"; 17]}), Some("stop")),
        (json!({"prompt": "x", "echo": "yes"}), Some("echo")),
        (
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
            Some("stream_options"),
        ),
        (
            json!({"prompt": "x", "frequency_penalty": 9}),
            Some("frequency_penalty"),
        ),
        (
            json!({"prompt": "x", "logit_bias": {"one": 5}}),
            Some("logit_bias"),
        ),
        (json!({"prompt": "x", "best_of": 3}), Some("best_of")),
        (json!({"prompt": "x", "suffix": "s"}), Some("suffix")),
        (json!({"prompt": "x", "seed": 1.5}), Some("seed")),
        (json!({"prompt": "x", "cache_salt": ""}), Some("cache_salt")),
        (json!({"prompt": [1, 299, 300]}), None),
        (json!([1, 2]), None),
    ];
    for (body, param) in cases {
        let (st, v) = post(&url, &body).await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_shape(&v);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"].as_str(), param, "{body} -> {v}");
    }
    // Out-of-range ids are the backend's judgement, passed on.
    let (_, v) = post(&url, &json!({"prompt": [1, 300]})).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("300"));
    // Counted as invalid, never as errors.
    assert!(
        s.state
            .metrics
            .requests
            .with_label_values(&["invalid"])
            .get()
            >= 30
    );
    assert_eq!(
        s.state.metrics.requests.with_label_values(&["error"]).get(),
        0
    );
    assert_eq!(s.backend.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    for body in ["", "{", "not json", "{\"prompt\": \"x\"} trailing", "\u{0}"] {
        let (st, bytes) = post_raw(&url, body.to_string()).await;
        assert_eq!(st, 400, "{body:?}");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_shape(&v);
    }
    let huge = vec![b' '; 17 << 20];
    let (st, bytes) = post_raw(&url, huge).await;
    assert_eq!(st, 413);
    assert_shape(&serde_json::from_slice(&bytes).unwrap());
}

#[tokio::test]
async fn context_limit_names_both_numbers() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "x".repeat(60), "max_tokens": 10}),
    )
    .await;
    assert_eq!(st, 400);
    assert_shape(&v);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("60 tokens") && msg.contains("(10)") && msg.contains("64 tokens"),
        "{msg}"
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "max_tokens");
}

#[tokio::test]
async fn unknown_model_is_404() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": "gpt-9", "prompt": "x"}),
    )
    .await;
    assert_eq!(st, 404);
    assert_shape(&v);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
    let (st, _, body) = get(&format!("{}/v1/models/gpt-9", s.url)).await;
    assert_eq!(st, 404);
    assert_shape(&serde_json::from_str(&body).unwrap());
    let (st, _, body) = get(&format!("{}/v1/models/{MODEL}", s.url)).await;
    assert_eq!(st, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["id"], MODEL);
}

#[tokio::test]
async fn backend_refusals_are_429_and_503() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    *s.backend.refuse.lock().unwrap() = Some(BackendError::QueueFull("queue full (256)".into()));
    let (st, v) = post(&url, &json!({"prompt": "x"})).await;
    assert_eq!(st, 429);
    assert_shape(&v);
    assert_eq!(v["error"]["type"], "rate_limit_error");
    *s.backend.refuse.lock().unwrap() = Some(BackendError::Unavailable("no attention pod".into()));
    let (st, v) = post(&url, &json!({"prompt": "x", "stream": true})).await;
    assert_eq!(st, 503);
    assert_eq!(v["error"]["message"], "no attention pod");
    assert_eq!(
        s.state
            .metrics
            .requests
            .with_label_values(&["rejected"])
            .get(),
        2
    );
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let s = serve().await;
    let (st, _, body) = get(&format!("{}/v1/nothing", s.url)).await;
    assert_eq!(st, 404);
    assert_shape(&serde_json::from_str(&body).unwrap());
    let (st, _, body) = get(&format!("{}/v1/completions", s.url)).await;
    assert_eq!(st, 405);
    assert_shape(&serde_json::from_str(&body).unwrap());
}
