//! `shardseek bench serve`: a load generator in the manner of vLLM's `benchmark_serving`.
//!
//! It sends N streaming `/v1/completions` requests with random token-id prompts of a fixed length
//! and `max_tokens` = the output length with `ignore_eos`, either from C closed-loop clients
//! (`--concurrency`) or as a Poisson process of rate R (`--rate`, optionally capped by
//! `--concurrency`). It reports throughput, time to first token, inter-token latency (the gaps
//! between stream chunks; this server sends one chunk per token), time per output token and
//! end-to-end latency, and the deltas of the server's `shardseek_*` counters over the run, scraped
//! from `/metrics` before and after. Plain HTTP only: it targets the router's port, in-cluster
//! or on loopback.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    pub requests: usize,
    /// Requests in flight at most (closed loop when no rate is given).
    pub concurrency: Option<usize>,
    /// Requests per second, Poisson arrivals.
    pub rate: Option<f64>,
    pub input_len: usize,
    /// Tokens every prompt starts with, before its own `input_len` tokens (0: none), as
    /// vLLM's `--random-prefix-len`: a shared system prompt, for measuring the prefix cache.
    pub shared_prefix_len: usize,
    pub output_len: usize,
    /// Model name to request; None takes the first of `/v1/models`.
    pub model: Option<String>,
    /// Prompt token ids are drawn from `[0, vocab)`.
    pub vocab: u32,
    /// Seed of the prompts and the arrival times, so runs are comparable.
    pub seed: u64,
    /// Give up on one request after this long.
    pub request_timeout: Duration,
    /// A JSON Schema every request's output must follow (`response_format: json_schema`), to
    /// measure constrained decoding against the same load without it.
    pub json_schema: Option<serde_json::Value>,
}

/// Why the benchmark could not run (failed requests are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{op} {url}: {reason}")]
    Http {
        op: &'static str,
        url: String,
        reason: String,
    },
    #[error("could not start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Percentiles of one latency, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut secs: Vec<f64>) -> Self {
        if secs.is_empty() {
            return Self::default();
        }
        secs.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            // Nearest rank on the sorted sample.
            let rank = ((p / 100.0) * secs.len() as f64).ceil() as usize;
            secs[rank.clamp(1, secs.len()) - 1] * 1e3
        };
        Latency {
            mean_ms: secs.iter().sum::<f64>() / secs.len() as f64 * 1e3,
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: secs[secs.len() - 1] * 1e3,
        }
    }
}

/// The results of a run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub model: String,
    pub requests: usize,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub input_len: usize,
    pub shared_prefix_len: usize,
    pub output_len: usize,
    pub completed: usize,
    pub failed: usize,
    /// The first few distinct error messages.
    pub errors: Vec<String>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub total_token_throughput: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub ttft: Latency,
    /// Time per output token after the first: (e2e - ttft) / (output - 1), per request.
    pub tpot: Latency,
    pub itl: Latency,
    pub e2e: Latency,
    /// Change of each `shardseek_*` counter (and histogram `_count`/`_sum`) over the run.
    pub metrics_delta: BTreeMap<String, f64>,
    /// Why the deltas are missing, when `/metrics` could not be read.
    pub metrics_error: Option<String>,
}

/// Most distinct error messages kept in the report.
const MAX_ERRORS_KEPT: usize = 5;

/// Runs the benchmark on a runtime of its own (for the CLI).
pub fn run_blocking(cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?
        .block_on(run(cfg))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub async fn run(cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.requests == 0 || cfg.input_len == 0 || cfg.output_len == 0 || cfg.vocab == 0 {
        return Err(BenchError::Config(
            "requests, input length, output length and vocab must be positive".into(),
        ));
    }
    if cfg.concurrency == Some(0) {
        return Err(BenchError::Config("concurrency must be positive".into()));
    }
    match cfg.rate {
        Some(r) if !(r > 0.0 && r.is_finite()) => {
            return Err(BenchError::Config(format!(
                "rate must be positive, got {r}"
            )));
        }
        None if cfg.concurrency.is_none() => {
            return Err(BenchError::Config("give a concurrency or a rate".into()));
        }
        _ => {}
    }
    let base = cfg.url.trim_end_matches('/').to_string();
    if !base.starts_with("http://") {
        return Err(BenchError::Config(format!(
            "{base}: only http:// URLs are supported (the router's plain-HTTP port)"
        )));
    }
    let mut connector = HttpConnector::new();
    // Small writes (the request) must not wait for delayed ACKs.
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => first_model(&client, &base).await?,
    };
    let before = scrape(&client, &base).await;

    let completions = format!("{base}/v1/completions");
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(cfg.requests)));
    let make_body = {
        let model = model.clone();
        let cfg = cfg.clone();
        move |i: usize| -> Bytes {
            // The shared prefix depends on the seed only, the rest on the request too.
            let mut shared = Rng(cfg.seed ^ 0x5DEE_CE66_D1CE_5EED);
            let mut rng = Rng(cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let prompt: Vec<u32> = (0..cfg.shared_prefix_len)
                .map(|_| (shared.next() % u64::from(cfg.vocab)) as u32)
                .chain((0..cfg.input_len).map(|_| (rng.next() % u64::from(cfg.vocab)) as u32))
                .collect();
            let mut body = serde_json::json!({
                "model": model,
                "prompt": prompt,
                "max_tokens": cfg.output_len,
                "temperature": 0.0,
                "ignore_eos": true,
                "stream": true,
                "stream_options": { "include_usage": true },
            });
            if let Some(schema) = &cfg.json_schema {
                body["response_format"] = serde_json::json!({
                    "type": "json_schema",
                    "json_schema": {"name": "bench", "schema": schema},
                });
            }
            Bytes::from(body.to_string())
        }
    };

    let start = Instant::now();
    let mut tasks = Vec::new();
    match cfg.rate {
        None => {
            let c = cfg.concurrency.unwrap_or(1).min(cfg.requests);
            for _ in 0..c {
                let (client, url, next, results, make_body) = (
                    client.clone(),
                    completions.clone(),
                    next.clone(),
                    results.clone(),
                    make_body.clone(),
                );
                let (n, timeout) = (cfg.requests, cfg.request_timeout);
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let r = one(&client, &url, make_body(i), timeout).await;
                        results.lock().await.push(r);
                    }
                }));
            }
        }
        Some(rate) => {
            let limit = Arc::new(tokio::sync::Semaphore::new(
                cfg.concurrency
                    .unwrap_or(tokio::sync::Semaphore::MAX_PERMITS),
            ));
            let mut rng = Rng(cfg.seed.wrapping_add(0xA5A5));
            let mut at = Duration::ZERO;
            for i in 0..cfg.requests {
                tokio::time::sleep_until((start + at).into()).await;
                // Exponential gaps make a Poisson process of the given rate.
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                at += Duration::from_secs_f64(-(1.0 - u).ln() / rate);
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let (client, url, results, body) = (
                    client.clone(),
                    completions.clone(),
                    results.clone(),
                    make_body(i),
                );
                let timeout = cfg.request_timeout;
                tasks.push(tokio::spawn(async move {
                    let r = one(&client, &url, body, timeout).await;
                    drop(permit);
                    results.lock().await.push(r);
                }));
            }
        }
    }
    for t in tasks {
        // A panicking task would be a bug of this module; its request is simply not counted.
        let _ = t.await;
    }
    let duration = start.elapsed().as_secs_f64();
    let after = scrape(&client, &base).await;
    let results = std::mem::take(&mut *results.lock().await);

    let (metrics_delta, metrics_error) = match (before, after) {
        (Ok(b), Ok(a)) => (
            a.iter()
                .filter_map(|(k, v)| {
                    let d = v - b.get(k).copied().unwrap_or(0.0);
                    (d != 0.0).then(|| (k.clone(), d))
                })
                .collect(),
            None,
        ),
        (Err(e), _) | (_, Err(e)) => (BTreeMap::new(), Some(e.to_string())),
    };
    let ok: Vec<&Outcome> = results.iter().filter(|r| r.error.is_none()).collect();
    let mut errors: Vec<String> = Vec::new();
    for e in results.iter().filter_map(|r| r.error.as_ref()) {
        if errors.len() < MAX_ERRORS_KEPT && !errors.contains(e) {
            errors.push(e.clone());
        }
    }
    let total_out: usize = ok.iter().map(|r| r.output_tokens).sum();
    let total_in: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    Ok(BenchReport {
        url: base,
        model,
        requests: cfg.requests,
        concurrency: cfg.concurrency,
        rate: cfg.rate,
        input_len: cfg.input_len,
        shared_prefix_len: cfg.shared_prefix_len,
        output_len: cfg.output_len,
        completed: ok.len(),
        failed: results.len() - ok.len() + (cfg.requests - results.len()),
        errors,
        duration_s: duration,
        request_throughput: ok.len() as f64 / duration,
        output_token_throughput: total_out as f64 / duration,
        total_token_throughput: (total_in + total_out) as f64 / duration,
        total_input_tokens: total_in,
        total_output_tokens: total_out,
        ttft: Latency::of(ok.iter().filter_map(|r| r.ttft).collect()),
        tpot: Latency::of(
            ok.iter()
                .filter(|r| r.output_tokens > 1)
                .filter_map(|r| Some((r.e2e - r.ttft?) / (r.output_tokens - 1) as f64))
                .collect(),
        ),
        itl: Latency::of(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
        e2e: Latency::of(ok.iter().map(|r| r.e2e).collect()),
        metrics_delta,
        metrics_error,
    })
}

/// What one request measured (seconds).
#[derive(Debug, Default)]
struct Outcome {
    error: Option<String>,
    ttft: Option<f64>,
    itl: Vec<f64>,
    e2e: f64,
    prompt_tokens: usize,
    output_tokens: usize,
}

async fn one(client: &HttpClient, url: &str, body: Bytes, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome::default();
    let result =
        tokio::time::timeout(timeout, stream_one(client, url, body, start, &mut out)).await;
    out.e2e = start.elapsed().as_secs_f64();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error = Some(e),
        Err(_) => out.error = Some(format!("timed out after {timeout:?}")),
    }
    out
}

async fn stream_one(
    client: &HttpClient,
    url: &str,
    body: Bytes,
    start: Instant,
    out: &mut Outcome,
) -> Result<(), String> {
    let req = Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| chain(&e))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    let mut usage: Option<(usize, usize)> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let now = Instant::now();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(payload) = line.strip_prefix("data:") else {
                    continue;
                };
                let payload = payload.trim();
                if payload == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(payload).map_err(|e| format!("bad chunk: {e}"))?;
                if let Some(err) = v.get("error") {
                    return Err(format!("stream error: {err}"));
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    let get = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0) as usize;
                    usage = Some((get("prompt_tokens"), get("completion_tokens")));
                }
                let has_token = v
                    .get("choices")
                    .and_then(|c| c.as_array())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.get("finish_reason").is_none_or(|f| f.is_null()))
                    });
                if has_token {
                    match last {
                        None => out.ttft = Some((now - start).as_secs_f64()),
                        Some(t) => out.itl.push((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    let (p, c) = usage.ok_or("the stream carried no usage")?;
    out.prompt_tokens = p;
    out.output_tokens = c;
    Ok(())
}

/// The error and its sources on one line (hyper's own message is just "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn get(client: &HttpClient, url: &str) -> Result<Bytes, BenchError> {
    let err = |reason: String| BenchError::Http {
        op: "GET",
        url: url.to_string(),
        reason,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| err(e.to_string()))?;
    let resp = client.get(uri).await.map_err(|e| err(chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(err(format!("HTTP {status}")));
    }
    Ok(bytes)
}

async fn first_model(client: &HttpClient, base: &str) -> Result<String, BenchError> {
    let url = format!("{base}/v1/models");
    let bytes = get(client, &url).await?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| BenchError::Http {
        op: "GET",
        url: url.clone(),
        reason: e.to_string(),
    })?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or(BenchError::Http {
            op: "GET",
            url,
            reason: "no model listed".into(),
        })
}

async fn scrape(client: &HttpClient, base: &str) -> Result<BTreeMap<String, f64>, BenchError> {
    let text = get(client, &format!("{base}/metrics")).await?;
    Ok(parse_counters(&String::from_utf8_lossy(&text)))
}

/// The `shardseek_*` counters and histogram counts/sums of a Prometheus text exposition, keyed
/// by the series as written (name and labels).
pub fn parse_counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("shardseek_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let counter =
                name.ends_with("_total") || name.ends_with("_count") || name.ends_with("_sum");
            Some((series.to_string(), value.parse().ok()?)).filter(|_| counter)
        })
        .collect()
}

/// xorshift64*: small, seedable, good enough for prompt ids and arrival gaps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = match (self.concurrency, self.rate) {
            (c, Some(r)) => format!(
                "rate {r} req/s{}",
                c.map(|c| format!(", at most {c} in flight"))
                    .unwrap_or_default()
            ),
            (c, None) => format!("concurrency {}", c.unwrap_or(1)),
        };
        writeln!(
            f,
            "== shardseek bench serve: {} model {} ==",
            self.url, self.model
        )?;
        writeln!(
            f,
            "{} requests, {load}, input {} tokens{}, output {} tokens",
            self.requests,
            self.input_len,
            if self.shared_prefix_len > 0 {
                format!(" after a shared prefix of {}", self.shared_prefix_len)
            } else {
                String::new()
            },
            self.output_len
        )?;
        writeln!(f, "completed            {:>10}", self.completed)?;
        writeln!(f, "failed               {:>10}", self.failed)?;
        for e in &self.errors {
            writeln!(f, "  error: {e}")?;
        }
        writeln!(f, "duration (s)         {:>10.3}", self.duration_s)?;
        writeln!(f, "requests/s           {:>10.3}", self.request_throughput)?;
        writeln!(
            f,
            "output tokens/s      {:>10.2}",
            self.output_token_throughput
        )?;
        writeln!(
            f,
            "total tokens/s       {:>10.2}",
            self.total_token_throughput
        )?;
        writeln!(
            f,
            "input / output tokens {:>9} / {}",
            self.total_input_tokens, self.total_output_tokens
        )?;
        writeln!(
            f,
            "{:<8} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "ms", "mean", "p50", "p90", "p99", "max"
        )?;
        for (name, l) in [
            ("TTFT", &self.ttft),
            ("TPOT", &self.tpot),
            ("ITL", &self.itl),
            ("E2E", &self.e2e),
        ] {
            writeln!(
                f,
                "{name:<8} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            )?;
        }
        match &self.metrics_error {
            Some(e) => writeln!(f, "server metrics: not read ({e})")?,
            None => {
                writeln!(f, "server metrics, change over the run:")?;
                for (k, v) in &self.metrics_delta {
                    writeln!(f, "  {k} {v}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let l = Latency::of((1..=100).map(|i| i as f64 / 1e3).collect());
        assert!((l.p50_ms - 50.0).abs() < 1e-9);
        assert!((l.p90_ms - 90.0).abs() < 1e-9);
        assert!((l.p99_ms - 99.0).abs() < 1e-9);
        assert!((l.max_ms - 100.0).abs() < 1e-9);
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Latency::of(vec![]), Latency::default());
    }

    #[test]
    fn counters_are_parsed() {
        let text = "# HELP x\nshardseek_requests_total{status=\"success\"} 3\nshardseek_x_seconds_bucket{le=\"1\"} 2\nshardseek_x_seconds_sum 0.5\nother_total 9\nshardseek_gauge 4\n";
        let m = parse_counters(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m["shardseek_requests_total{status=\"success\"}"], 3.0);
        assert_eq!(m["shardseek_x_seconds_sum"], 0.5);
    }
}
