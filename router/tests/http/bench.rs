//! `shardseek bench serve`'s load generator against the fake server.

use crate::fake::{MODEL, serve};
use shardseek_router::openai::BackendError;
use shardseek_router::openai::bench::{BenchConfig, run};
use std::time::Duration;

fn config(url: &str) -> BenchConfig {
    BenchConfig {
        url: url.to_string(),
        requests: 8,
        concurrency: Some(3),
        rate: None,
        input_len: 8,
        shared_prefix_len: 0,
        output_len: 5,
        model: None,
        vocab: 200,
        seed: 7,
        request_timeout: Duration::from_secs(20),
        json_schema: None,
    }
}

// Several threads, so that the client reads each chunk as it comes rather than after the server
// task wrote a few (which would make their gaps look like zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_measures_everything() {
    let s = serve().await;
    *s.backend.token_delay.lock().unwrap() = Duration::from_millis(10);
    let r = run(config(&s.url)).await.unwrap();
    assert_eq!(r.model, MODEL);
    assert_eq!((r.completed, r.failed), (8, 0), "{:?}", r.errors);
    assert_eq!(r.total_output_tokens, 40);
    assert_eq!(r.total_input_tokens, 64);
    assert!(r.ttft.p50_ms > 0.0 && r.ttft.p50_ms <= r.ttft.p99_ms);
    assert!(r.itl.p50_ms >= 5.0, "{:?}", r.itl);
    assert!(r.tpot.p50_ms >= 5.0, "{:?}", r.tpot);
    assert!(r.e2e.p50_ms >= r.ttft.p50_ms);
    assert!(r.tpot.mean_ms > 0.0);
    assert!(r.output_token_throughput > 0.0 && r.request_throughput > 0.0);
    assert_eq!(r.metrics_delta["shardseek_generation_tokens_total"], 40.0);
    assert_eq!(r.metrics_delta["shardseek_prompt_tokens_total"], 64.0);
    assert_eq!(
        r.metrics_delta["shardseek_requests_total{status=\"success\"}"],
        8.0
    );
    // Every request asked for exact lengths.
    for req in s.backend.requests.lock().unwrap().iter() {
        assert!(req.ignore_eos);
        assert_eq!((req.prompt.len(), req.max_tokens), (8, 5));
        assert!(req.prompt.iter().all(|&t| t < 200));
    }
    let text = r.to_string();
    assert!(text.contains("TTFT") && text.contains("shardseek_generation_tokens_total 40"));
    serde_json::to_value(&r).unwrap();
}

#[tokio::test]
async fn shared_prefix_starts_every_prompt() {
    let s = serve().await;
    let mut cfg = config(&s.url);
    cfg.shared_prefix_len = 12;
    let r = run(cfg).await.unwrap();
    assert_eq!((r.completed, r.failed), (8, 0), "{:?}", r.errors);
    let reqs = s.backend.requests.lock().unwrap();
    let first = &reqs[0].prompt;
    assert_eq!(first.len(), 20);
    for req in reqs.iter() {
        assert_eq!(req.prompt[..12], first[..12], "the prefix is shared");
    }
    assert!(
        reqs.iter().any(|r| r.prompt[12..] != first[12..]),
        "the rest is each request's own"
    );
}

#[tokio::test]
async fn poisson_rate() {
    let s = serve().await;
    let mut cfg = config(&s.url);
    cfg.concurrency = None;
    cfg.rate = Some(400.0);
    cfg.requests = 6;
    let r = run(cfg).await.unwrap();
    assert_eq!((r.completed, r.failed), (6, 0), "{:?}", r.errors);
}

#[tokio::test]
async fn refusals_are_counted_as_failures() {
    let s = serve().await;
    *s.backend.refuse.lock().unwrap() = Some(BackendError::QueueFull("full".into()));
    let r = run(config(&s.url)).await.unwrap();
    assert_eq!((r.completed, r.failed), (0, 8));
    assert!(r.errors[0].contains("429"), "{:?}", r.errors);
    assert_eq!(
        r.metrics_delta["shardseek_requests_total{status=\"rejected\"}"],
        8.0
    );
}

#[tokio::test]
async fn bad_configurations_are_refused() {
    let mut cfg = config("https://example.com");
    assert!(run(cfg.clone()).await.is_err());
    cfg.url = "http://127.0.0.1:1".into();
    cfg.concurrency = None;
    assert!(run(cfg).await.is_err());
}
