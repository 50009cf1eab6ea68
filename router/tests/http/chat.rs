//! Non-streaming /v1/chat/completions.

use crate::client::post;
use crate::fake::{MAX_MODEL_LEN, MODEL, serve, serve_with};
use serde_json::{Value, json};

fn content(v: &Value, i: usize) -> &str {
    v["choices"][i]["message"]["content"].as_str().unwrap()
}

const PROMPT_LEN: u64 = 18; // "user:hi\nassistant:"

#[tokio::test]
async fn chat_completion_with_usage() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(content(&v, 0), "user");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT_LEN);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["usage"]["total_tokens"], PROMPT_LEN + 4);
    // The template's text, encoded without extra special tokens.
    let req = s.backend.requests.lock().unwrap()[0].clone();
    let expected: Vec<u32> = "user:hi\nassistant:".bytes().map(u32::from).collect();
    assert_eq!(req.prompt, expected);
}

#[tokio::test]
async fn max_completion_tokens_wins_and_default_fills_the_context() {
    let s = serve().await;
    let url = format!("{}/v1/chat/completions", s.url);
    let msgs = json!([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]);
    let (_, v) = post(
        &url,
        &json!({"messages": msgs, "max_tokens": 9, "max_completion_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    let (st, v) = post(&url, &json!({"messages": msgs, "temperature": 0})).await;
    assert_eq!(st, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(prompt, "system:s\nuser:hi\nassistant:".len() as u64);
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        MAX_MODEL_LEN as u64 - prompt
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn chat_logprobs_format() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "hé"}], "max_tokens": 3, "temperature": 0,
                "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), 3);
    assert_eq!(lp[0]["token"], "u");
    assert_eq!(lp[0]["logprob"], -0.125);
    assert_eq!(lp[0]["bytes"], json!([117]));
    let top = lp[1]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["token"], "s");
    assert!(top[0]["bytes"].is_array());
    // Without logprobs the field is null.
    let (_, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    )
    .await;
    assert!(v["choices"][0]["logprobs"].is_null());
}

#[tokio::test]
async fn chat_stop_and_n() {
    let s = serve().await;
    let (_, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0,
                "stop": [":"], "n": 3}),
    )
    .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], "user");
        assert_eq!(c["finish_reason"], "stop");
    }
    assert_eq!(v["usage"]["prompt_tokens"], PROMPT_LEN);
    assert_eq!(v["usage"]["completion_tokens"], 15);
}

#[tokio::test]
async fn chat_refusals() {
    let s = serve().await;
    let url = format!("{}/v1/chat/completions", s.url);
    let cases = [
        (
            json!({"messages": [{"role": "assistant", "content": "{% bad"}]}),
            "messages",
        ),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 60}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}),
            "presence_penalty",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "use_beam_search": true}),
            "use_beam_search",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
    ];
    for (body, param) in cases {
        let (st, v) = post(&url, &body).await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{body} -> {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // Neutral values of unsupported fields, and unknown fields, are fine.
    let (st, v) = post(
        &url,
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "presence_penalty": 0,
                "frequency_penalty": 0, "logit_bias": {}, "tools": [], "response_format": {"type": "text"},
                "user": "u", "store": false, "tool_choice": "none", "use_beam_search": false,
                "some_future_field": {"a": 1}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let s = serve_with(false).await;
    let (st, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "messages");
}

/// n samples of one prompt: the others start once the first produced its first token (its
/// prompt prefilled and in the prefix cache), so the prompt is prefilled once.
#[tokio::test]
async fn n_samples_start_after_the_first_is_prefilled() {
    use std::sync::atomic::Ordering;
    let s = serve().await;
    *s.backend.token_delay.lock().unwrap() = std::time::Duration::from_millis(300);
    let url = format!("{}/v1/chat/completions", s.url);
    let req = tokio::spawn(async move {
        post(
            &url,
            &json!({"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 2, "temperature": 0}),
        )
        .await
    });
    crate::fake::eventually("the first sample started", || {
        s.backend.started.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert_eq!(
        s.backend.started.load(Ordering::SeqCst),
        1,
        "the other samples wait for the first one's prefill"
    );
    let (st, v) = req.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(s.backend.started.load(Ordering::SeqCst), 3);
}
