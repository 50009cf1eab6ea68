//! The continuous-batching engine: batched results equal one-at-a-time results, cancellation
//! returns every block, a flood is refused at once, and prefix-cache hits skip prefill.

use crate::fixtures::fixture_dir;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_worker::engine::{Engine, EngineConfig, EngineRequest, Event, SubmitError};
use shardseek_worker::generate::{GenerateRequest, generate};
use shardseek_worker::kv::KvDtype;
use shardseek_worker::metrics::WorkerMetrics;
use shardseek_worker::model::{ExpertSelection, Model};
use shardseek_worker::prefix::BlockKey;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn model() -> Arc<Model> {
    Arc::new(Model::load(&fixture_dir("open-fp8"), ExpertSelection::All).unwrap())
}

fn req(prompt: Vec<u32>, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        seed: 0,
        top_logprobs: 0,
        token_logprob: true,
        echo: false,
        ignore_eos: true,
        stop_token_ids: vec![],
        logits: Default::default(),
        constraint: None,
        cache_salt: None,
    }
}

/// Tokens, their log-probs, echo log-probs, and prompt tokens served from the prefix cache.
type Collected = (Vec<u32>, Vec<f32>, Option<Vec<Option<f32>>>, usize);

fn collect(h: &mut shardseek_worker::engine::RequestHandle) -> Collected {
    let (mut toks, mut lps, mut plp, mut cached) = (Vec::new(), Vec::new(), None, 0);
    while let Some(ev) = h.blocking_next() {
        match ev {
            Event::Token { id, logprob, .. } => {
                toks.push(id);
                lps.push(logprob.expect("the request asked for token log-probs"));
            }
            Event::PromptLogprobs(p) => plp = Some(p),
            Event::Finished { cached_tokens, .. } => {
                cached = cached_tokens;
                break;
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    (toks, lps, plp, cached)
}

fn prompt_of(i: usize) -> Vec<u32> {
    let len = 1 + (i * 37) % 150;
    (0..len)
        .map(|k| ((i * 131 + k * 17) % 500) as u32 + 2)
        .collect()
}

#[test]
fn concurrent_requests_equal_one_at_a_time() {
    let m = model();
    // Small step budget and pool: forces chunked prefill, mixing, and preemption.
    let cfg = EngineConfig {
        max_batch_tokens: 96,
        max_running_requests: 16,
        max_waiting_requests: 128,
        max_seq_len: 512,
        kv_blocks: 12,
        kv_dtype: KvDtype::F32,
        ..Default::default()
    };
    let engine = Engine::start(m.clone(), cfg);
    let n = 64;
    let mut handles: Vec<_> = (0..n)
        .map(|i| engine.submit(req(prompt_of(i), 3 + i % 9)).unwrap())
        .collect();
    let results: Vec<_> = handles.iter_mut().map(collect).collect();
    for (i, (toks, lps, _, _)) in results.iter().enumerate() {
        let alone = generate(
            &m,
            &GenerateRequest {
                prompt: prompt_of(i),
                max_tokens: 3 + i % 9,
                sampling: SamplingParams::default(),
                seed: 0,
                top_logprobs: 0,
                echo: false,
                ignore_eos: true,
                kv_dtype: KvDtype::F32,
            },
        )
        .unwrap();
        assert_eq!(toks, &alone.tokens, "request {i}");
        for (a, b) in lps.iter().zip(&alone.logprobs) {
            assert!((a - b).abs() < 1e-4, "request {i}: {a} vs {b}");
        }
    }
    assert!(
        engine.stats.preemptions_total.load(Ordering::Relaxed) > 0,
        "the small pool should have forced preemption"
    );
    assert_eq!(engine.stats.kv_blocks_available.load(Ordering::Relaxed), 12);
}

#[test]
fn echo_through_the_engine_matches_generate() {
    let m = model();
    let engine = Engine::start(
        m.clone(),
        EngineConfig {
            max_batch_tokens: 40,
            kv_dtype: KvDtype::F32,
            ..Default::default()
        },
    );
    let prompt: Vec<u32> = (0..100).map(|k| (k * 7 % 500) as u32).collect();
    let mut h = engine
        .submit(EngineRequest {
            echo: true,
            ..req(prompt.clone(), 4)
        })
        .unwrap();
    let (toks, _, plp, _) = collect(&mut h);
    let alone = generate(
        &m,
        &GenerateRequest {
            prompt,
            max_tokens: 4,
            sampling: SamplingParams::default(),
            seed: 0,
            top_logprobs: 0,
            echo: true,
            ignore_eos: true,
            kv_dtype: KvDtype::F32,
        },
    )
    .unwrap();
    assert_eq!(toks, alone.tokens);
    let (ours, theirs) = (plp.unwrap(), alone.prompt_logprobs.unwrap());
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs).skip(1) {
        assert!((a.unwrap() - b.unwrap()).abs() < 1e-4);
    }
}

#[test]
fn cancelling_returns_every_block() {
    let m = model();
    let engine = Engine::start(
        m,
        EngineConfig {
            kv_blocks: 256,
            max_running_requests: 128,
            max_waiting_requests: 256,
            ..Default::default()
        },
    );
    let start = engine.stats.kv_blocks_available.load(Ordering::Relaxed);
    let mut handles: Vec<_> = (0..100)
        .map(|i| engine.submit(req(prompt_of(i), 200)).unwrap())
        .collect();
    // Let every request produce at least one token, then drop them mid-stream.
    for h in handles.iter_mut() {
        match h.blocking_next() {
            Some(Event::Token { .. }) => {}
            other => panic!("expected a token, got {other:?}"),
        }
    }
    drop(handles);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats.running.load(Ordering::Relaxed)
        + engine.stats.waiting.load(Ordering::Relaxed)
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "aborted requests still scheduled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        engine.stats.kv_blocks_available.load(Ordering::Relaxed),
        start
    );
}

#[test]
fn flood_beyond_the_queue_is_refused_at_once() {
    let m = model();
    let engine = Engine::start(
        m,
        EngineConfig {
            max_running_requests: 2,
            max_waiting_requests: 4,
            max_batch_tokens: 32,
            ..Default::default()
        },
    );
    let mut admitted = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        let t = Instant::now();
        match engine.submit(req(prompt_of(i), 20)) {
            Ok(h) => admitted.push(h),
            Err(SubmitError::QueueFull(4)) => {
                refused += 1;
                assert!(
                    t.elapsed() < Duration::from_millis(50),
                    "refusal must not wait"
                );
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused > 0, "nothing refused");
    for h in admitted.iter_mut() {
        let (toks, _, _, _) = collect(h);
        assert_eq!(toks.len(), 20);
    }
    let Err(e) = engine.submit(req(vec![1; 4000], 200)) else {
        panic!("over-long request accepted")
    };
    assert!(
        e.to_string().contains("4000") && e.to_string().contains("200"),
        "{e}"
    );
}

#[test]
fn prefix_cache_hits_skip_prefill() {
    let m = model();
    let engine = Engine::start(m, EngineConfig::default());
    let system: Vec<u32> = (0..140).map(|k| (k * 11 % 500) as u32).collect();
    let mut a = system.clone();
    a.extend([7, 8, 9]);
    let mut b = system.clone();
    b.extend([10, 11]);
    let (ta, _, _, ca) = collect(&mut engine.submit(req(a.clone(), 5)).unwrap());
    assert_eq!(ca, 0);
    let before = engine.stats.prompt_tokens_total.load(Ordering::Relaxed);
    let (_, _, _, cb) = collect(&mut engine.submit(req(b, 5)).unwrap());
    assert_eq!(
        cb, 128,
        "two full blocks of the shared prefix come from the cache"
    );
    assert_eq!(
        engine.stats.prompt_tokens_total.load(Ordering::Relaxed) - before,
        142 - 128,
        "only the rest is prefilled"
    );
    assert!(engine.stats.prefix_cache_hit_blocks.load(Ordering::Relaxed) >= 2);
    // Same prompt again: cached blocks give the same tokens as the first run.
    let (ta2, _, _, _) = collect(&mut engine.submit(req(a, 5)).unwrap());
    assert_eq!(ta, ta2);
}

/// A deliberately weak block key: every block of 64 tokens gets the same key, so any two
/// prompts collide. Verification must turn each collision into a miss.
fn colliding_key(_: &BlockKey, _: &[u32]) -> BlockKey {
    [0x5a; 32]
}

#[test]
fn colliding_keys_never_serve_another_prompts_kv() {
    let m = model();
    let engine = Engine::start(
        m.clone(),
        EngineConfig {
            prefix_key: colliding_key,
            ..Default::default()
        },
    );
    let first: Vec<u32> = (0..140).map(|k| (k * 11 % 500) as u32 + 2).collect();
    // Different from the first token on: its blocks' keys collide with the first prompt's.
    let second: Vec<u32> = (0..140).map(|k| (k * 7 % 480) as u32 + 3).collect();
    // Shares the first block only; its second block's key collides with the first prompt's.
    let mut third = first[..64].to_vec();
    third.extend((0..76).map(|k| (k * 13 % 470) as u32 + 5));
    collect(&mut engine.submit(req(first, 6)).unwrap());
    let (t2, lp2, _, c2) = collect(&mut engine.submit(req(second.clone(), 6)).unwrap());
    assert_eq!(
        c2, 0,
        "a colliding key must not reuse another prompt's blocks"
    );
    let (t3, lp3, _, c3) = collect(&mut engine.submit(req(third.clone(), 6)).unwrap());
    assert_eq!(c3, 64, "only the truly shared first block is reused");
    assert!(
        engine
            .stats
            .prefix_cache_rejected_blocks
            .load(Ordering::Relaxed)
            >= 2
    );
    // Each output equals a cold run: a fresh engine with nothing cached.
    for (prompt, toks, lps) in [(second, t2, lp2), (third, t3, lp3)] {
        let cold = Engine::start(m.clone(), EngineConfig::default());
        let (tc, lpc, _, cc) = collect(&mut cold.submit(req(prompt, 6)).unwrap());
        assert_eq!(cc, 0);
        assert_eq!(toks, tc);
        for (a, b) in lps.iter().zip(&lpc) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

/// The value of a counter in Prometheus text.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

#[test]
fn cache_salt_separates_tenants_and_the_same_salt_shares() {
    let engine = Engine::start(model(), EngineConfig::default());
    let metrics = WorkerMetrics::new();
    let hits = || {
        counter(
            &metrics.render(Some(&engine.stats)),
            "shardseek_prefix_cache_hits_total",
        )
    };
    let prompt: Vec<u32> = (0..200).map(|k| (k * 11 % 500) as u32 + 2).collect();
    let salted = |salt: &str| EngineRequest {
        cache_salt: Some(salt.into()),
        ..req(prompt.clone(), 3)
    };
    let (ta, _, _, ca) = collect(&mut engine.submit(salted("tenant-a")).unwrap());
    assert_eq!(ca, 0);
    assert_eq!(hits(), 0.0);
    let (tb, _, _, cb) = collect(&mut engine.submit(salted("tenant-b")).unwrap());
    assert_eq!(cb, 0, "another salt shares nothing");
    let (tn, _, _, cn) = collect(&mut engine.submit(req(prompt.clone(), 3)).unwrap());
    assert_eq!(cn, 0, "no salt shares nothing with a salted request");
    assert_eq!(hits(), 0.0);
    let (ta2, _, _, ca2) = collect(&mut engine.submit(salted("tenant-a")).unwrap());
    assert_eq!(ca2, 192, "the same salt shares its three full blocks");
    assert_eq!(hits(), 3.0);
    assert_eq!(ta, tb);
    assert_eq!(ta, tn);
    assert_eq!(ta, ta2);
}

/// Routed experts that, once, report the first row of the first two-row batch as lost (what an
/// expert shard dying under that token looks like to the model), computing every row anyway.
struct LoseFirstOfTwo {
    inner: Arc<shardseek_worker::experts::LocalExperts>,
    fired: std::sync::atomic::AtomicBool,
}

impl shardseek_worker::experts::RoutedExperts for LoseFirstOfTwo {
    fn start(
        &self,
        layer: usize,
        rows: &[f32],
        routing: &[shardseek_kernels::gate::Routing],
    ) -> shardseek_worker::Result<shardseek_worker::experts::PendingExperts> {
        use shardseek_worker::experts::{PendingExperts, RowFailure};
        let out = self.inner.forward(layer, rows, routing)?;
        if routing.len() == 2 && !self.fired.swap(true, Ordering::SeqCst) {
            let (tx, rx) = std::sync::mpsc::channel();
            let lost = RowFailure {
                layer,
                rows: vec![0],
                error: format!(
                    "expert shard 9 (127.0.0.1:1), layer {layer}: the shard closed the stream"
                ),
            };
            tx.send(Ok((out, vec![lost]))).unwrap();
            return Ok(PendingExperts::Partial(rx));
        }
        Ok(PendingExperts::Ready(out))
    }
}

/// A shard failure under one sequence of a batch ends that sequence with the error naming the
/// shard and frees its blocks; the other sequence of the same steps goes on to the tokens it
/// gets alone.
#[test]
fn a_failed_expert_shard_ends_only_the_sequences_routed_to_it() {
    use shardseek_worker::config::ModelConfig;
    use shardseek_worker::experts::LocalExperts;
    use shardseek_worker::weights::Store;
    let dir = fixture_dir("open-fp8");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let all: Vec<usize> = (0..cfg.n_routed_experts).collect();
    let local = Arc::new(LocalExperts::load(&cfg, Store::open(&dir).unwrap(), &all).unwrap());
    let mut m = Model::load(&dir, ExpertSelection::All).unwrap();
    m.set_experts(Arc::new(LoseFirstOfTwo {
        inner: local,
        fired: Default::default(),
    }));
    let engine = Engine::start(
        Arc::new(m),
        EngineConfig {
            kv_blocks: 16,
            max_seq_len: 512,
            kv_dtype: KvDtype::F32,
            ..Default::default()
        },
    );
    // A is older, so it is row 0 once both decode (one row each).
    let mut a = engine.submit(req(vec![5, 6, 7], 20)).unwrap();
    let mut b = engine.submit(req(vec![9, 10, 11, 12], 20)).unwrap();
    let err = loop {
        match a.blocking_next() {
            Some(Event::Error(e)) => break e,
            Some(Event::Finished { .. }) | None => panic!("request A should have failed"),
            Some(_) => {}
        }
    };
    assert!(
        err.contains("expert shard 9"),
        "the error names the shard: {err}"
    );
    let (toks, lps, _, _) = collect(&mut b);
    let alone = generate(
        &model(),
        &GenerateRequest {
            prompt: vec![9, 10, 11, 12],
            max_tokens: 20,
            sampling: SamplingParams::default(),
            seed: 0,
            top_logprobs: 0,
            echo: false,
            ignore_eos: true,
            kv_dtype: KvDtype::F32,
        },
    )
    .unwrap();
    assert_eq!(toks, alone.tokens, "B goes on as if alone");
    for (x, y) in lps.iter().zip(&alone.logprobs) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats.kv_blocks_available.load(Ordering::Relaxed) != 16 {
        assert!(Instant::now() < deadline, "blocks not returned");
        std::thread::sleep(Duration::from_millis(10));
    }
}
