//! Non-streaming /v1/completions.

use crate::client::post;
use crate::fake::{EOS, MODEL, serve, serve_with};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

fn text(v: &Value, i: usize) -> &str {
    v["choices"][i]["text"].as_str().unwrap()
}

fn usage(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn text_prompt_with_usage() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(text(&v, 0), "hel");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["index"], 0);
    assert!(v["choices"][0]["logprobs"].is_null());
    assert_eq!(usage(&v), (5, 3, 8));
    // What reached the backend.
    let req = s.backend.requests.lock().unwrap()[0].clone();
    assert_eq!(
        req.prompt,
        b"hello".iter().map(|&b| u32::from(b)).collect::<Vec<_>>()
    );
    assert_eq!(req.max_tokens, 3);
    assert!(!req.echo && !req.ignore_eos);
}

#[tokio::test]
async fn model_may_be_omitted_and_defaults_apply() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abcdefghijklmnopqrstuvwxyz"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // OpenAI's default max_tokens is 16.
    assert_eq!(usage(&v), (26, 16, 42));
    let req = s.backend.requests.lock().unwrap()[0].clone();
    assert_eq!(req.temperature, 1.0);
    assert_eq!(req.top_p, 1.0);
}

#[tokio::test]
async fn eos_ends_with_stop_and_counts_the_token() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": MODEL, "prompt": [104, 105, EOS], "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v, 0), "hi");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(usage(&v), (3, 3, 6));
}

#[tokio::test]
async fn ignore_eos_and_stop_token_ids_reach_the_backend() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    let (_, v) = post(
        &url,
        &json!({"prompt": [104, EOS], "max_tokens": 4, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(text(&v, 0), "hh");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(usage(&v), (2, 4, 6));
    let (_, v) = post(
        &url,
        &json!({"prompt": "abc", "max_tokens": 9, "temperature": 0, "stop_token_ids": [99]}),
    )
    .await;
    assert_eq!(text(&v, 0), "abc");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn list_of_prompts_times_n() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": ["ab", "cde"], "n": 2, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(
        [text(&v, 0), text(&v, 1), text(&v, 2), text(&v, 3)],
        ["aba", "aba", "cde", "cde"]
    );
    // Each prompt counted once; completions of all four choices.
    assert_eq!(usage(&v), (5, 12, 17));
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": [[104, 105], [106]], "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!([text(&v, 0), text(&v, 1)], ["hi", "jj"]);
}

#[tokio::test]
async fn stop_string_truncates_and_aborts() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abcdefgh", "max_tokens": 8, "temperature": 0, "stop": ["zz", "cd"]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v, 0), "ab");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // a, b, c, d were generated; d completed the match.
    assert_eq!(usage(&v), (8, 4, 12));
    crate::fake::eventually("the backend stream to be dropped", || {
        s.backend.aborted.load(Ordering::SeqCst) == 1
    })
    .await;
    // A single string works too, and a stop that never matches changes nothing.
    let (_, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abcdefgh", "max_tokens": 8, "temperature": 0, "stop": "e"}),
    )
    .await;
    assert_eq!(text(&v, 0), "abcd");
    let (_, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abcdefgh", "max_tokens": 8, "temperature": 0, "stop": "xyz"}),
    )
    .await;
    assert_eq!(text(&v, 0), "abcdefgh");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn echo_with_logprobs_reports_prompt_logprobs_first() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": [104, 105, 33], "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 2}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v, 0), "hi!hi");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["h", "i", "!", "h", "i"]));
    assert_eq!(
        lp["token_logprobs"],
        json!([null, -0.75, -1.0, -0.125, -0.25])
    );
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3, 4]));
    let top = lp["top_logprobs"].as_array().unwrap();
    assert!(top[0].is_null());
    assert_eq!(top[1], json!({"i": -0.75}));
    assert_eq!(top[3].as_object().unwrap().len(), 2);
    assert_eq!(top[3]["h"], json!(-0.125));
    assert_eq!(usage(&v), (3, 2, 5));
    let req = s.backend.requests.lock().unwrap()[0].clone();
    assert!(req.echo);
    assert_eq!(req.top_logprobs, 2);
}

#[tokio::test]
async fn echo_with_zero_max_tokens_scores_the_prompt() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abcd", "max_tokens": 0, "echo": true, "logprobs": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v, 0), "abcd");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert!(lp["token_logprobs"][0].is_null());
    assert_eq!(usage(&v), (4, 0, 4));
    // Backends generate at least one token: the request is cut after the prompt's log-probs.
    assert_eq!(s.backend.requests.lock().unwrap()[0].max_tokens, 1);
    crate::fake::eventually("the abort", || {
        s.backend.aborted.load(Ordering::SeqCst) == 1
    })
    .await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "abcd", "max_tokens": 0, "echo": true}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v, 0), "abcd");
    assert!(v["choices"][0]["logprobs"].is_null());
    assert_eq!(usage(&v), (4, 0, 4));
}

#[tokio::test]
async fn echo_without_logprobs_only_prepends_text() {
    let s = serve().await;
    let (_, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "xy", "max_tokens": 3, "temperature": 0, "echo": true}),
    )
    .await;
    assert_eq!(text(&v, 0), "xyxyx");
    assert!(v["choices"][0]["logprobs"].is_null());
    // No prompt log-probs computed for nothing.
    assert!(!s.backend.requests.lock().unwrap()[0].echo);
}

#[tokio::test]
async fn logprobs_without_echo() {
    let s = serve().await;
    let (_, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "ab", "max_tokens": 3, "temperature": 0, "logprobs": 1}),
    )
    .await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b", "a"]));
    assert_eq!(lp["token_logprobs"], json!([-0.125, -0.25, -0.375]));
    assert_eq!(lp["text_offset"], json!([0, 1, 2]));
    assert_eq!(lp["top_logprobs"][2], json!({"a": -0.375}));
}

#[tokio::test]
async fn seeds_make_sampling_reproducible() {
    let s = serve().await;
    let url = format!("{}/v1/completions", s.url);
    let body = json!({"prompt": "abcdefg", "max_tokens": 4, "temperature": 0.8, "seed": 3, "n": 2});
    let (_, a) = post(&url, &body).await;
    let (_, b) = post(&url, &body).await;
    assert_eq!(a["choices"], b["choices"]);
    // n samples get distinct seeds: seed, seed + 1.
    assert_eq!([text(&a, 0), text(&a, 1)], ["defg", "efga"]);
    let seeds: Vec<u64> = s
        .backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.seed)
        .collect();
    assert_eq!(seeds, [3, 4, 3, 4]);
}

#[tokio::test]
async fn multibyte_text_round_trips() {
    let s = serve().await;
    let (_, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "é€😀", "max_tokens": 9, "temperature": 0}),
    )
    .await;
    assert_eq!(text(&v, 0), "é€😀");
    // A generation cut inside a character ends with U+FFFD rather than losing the bytes.
    let (_, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "é€", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(text(&v, 0), "é\u{FFFD}");
}

#[tokio::test]
async fn without_a_codec_prompts_are_token_ids() {
    let s = serve_with(false).await;
    let url = format!("{}/v1/completions", s.url);
    let (st, v) = post(
        &url,
        &json!({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "logprobs": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v, 0), "");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"],
        json!(["token_id:1", "token_id:2"])
    );
    assert_eq!(usage(&v), (3, 2, 5));
    let (st, v) = post(&url, &json!({"prompt": "text"})).await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "prompt");
    let (st, v) = post(&url, &json!({"prompt": [1], "stop": "x"})).await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "stop");
}

#[tokio::test]
async fn cache_salt_reaches_the_backend_on_both_endpoints() {
    let s = serve().await;
    let (st, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "hello", "max_tokens": 1, "cache_salt": "tenant-a"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                "cache_salt": "tenant-b"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"prompt": "hello", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200);
    let salts: Vec<Option<String>> = s
        .backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.cache_salt.clone())
        .collect();
    assert_eq!(
        salts,
        [Some("tenant-a".into()), Some("tenant-b".into()), None]
    );
}
