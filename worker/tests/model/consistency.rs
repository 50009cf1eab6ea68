//! The fast path against the f64 reference, and the engine against itself: cached decode vs
//! recompute, batched vs alone, seeded sampling.

use crate::reference::{RefModel, log_softmax64};
use shardseek_kernels::gate::Routing;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_kernels::softmax::log_softmax;
use shardseek_worker::config::ModelConfig;
use shardseek_worker::experts::{LocalExperts, PendingExperts, RoutedExperts};
use shardseek_worker::generate::{GenerateRequest, generate};
use shardseek_worker::kv::KvDtype;
use shardseek_worker::kv::SeqCache;
use shardseek_worker::model::{ExpertSelection, Model, Overlap, SeqInput};
use shardseek_worker::weights::Store;
use std::path::Path;
use std::sync::Arc;

/// f32 engine vs f64 reference, on log-probs (the quantity users see).
pub const LOGPROB_TOL: f64 = 2e-3;

/// Runs `tokens` through the engine from scratch and compares every position's log-probs
/// with the f64 reference.
pub fn engine_matches_reference(dir: &Path, tokens: &[u32]) {
    let model = Model::load(dir, ExpertSelection::All).unwrap();
    let mut pool = model.new_pool(1024);
    let mut cache = SeqCache::default();
    let lg = model
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens,
                cache: &mut cache,
                all_logits: true,
            }],
        )
        .unwrap()
        .remove(0);
    let reference = RefModel::load(dir).logits(tokens);
    let v = model.cfg.vocab_size;
    let mut worst = 0f64;
    for (t, r) in reference.iter().enumerate() {
        let ours = log_softmax(&lg[t * v..(t + 1) * v]);
        let theirs = log_softmax64(r);
        for (a, b) in ours.iter().zip(&theirs) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    assert!(
        worst < LOGPROB_TOL,
        "{}: max log-prob difference {worst}",
        dir.display()
    );
}

/// Prefill in one go, in chunks, and token by token give the same logits.
pub fn cache_equals_recompute(dir: &Path, tokens: &[u32]) {
    let model = Model::load(dir, ExpertSelection::All).unwrap();
    let mut pool = model.new_pool(1024);
    let v = model.cfg.vocab_size;
    let mut c1 = SeqCache::default();
    let full = model
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens,
                cache: &mut c1,
                all_logits: true,
            }],
        )
        .unwrap()
        .remove(0);
    let mut c2 = SeqCache::default();
    let split = tokens.len() / 2;
    let mut stepped = model
        .forward(
            &mut pool,
            &mut [SeqInput {
                tokens: &tokens[..split],
                cache: &mut c2,
                all_logits: true,
            }],
        )
        .unwrap()
        .remove(0);
    for t in split..tokens.len() {
        let l = model
            .forward(
                &mut pool,
                &mut [SeqInput {
                    tokens: &tokens[t..t + 1],
                    cache: &mut c2,
                    all_logits: false,
                }],
            )
            .unwrap()
            .remove(0);
        stepped.extend(l);
    }
    assert_eq!(c2.len(), tokens.len());
    let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in full.iter().zip(&stepped).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * scale.max(1.0),
            "position {} logit {}: {a} vs {b}",
            i / v,
            i % v
        );
    }
}

/// Several sequences in one forward step equal each run alone.
pub fn batch_equals_alone(dir: &Path) {
    let model = Model::load(dir, ExpertSelection::All).unwrap();
    let seqs: Vec<Vec<u32>> = vec![
        vec![5, 9, 13, 2, 7],
        vec![3],
        vec![11, 4, 4, 8, 1, 6, 20, 30],
    ];
    let mut pool = model.new_pool(64 * 8);
    let mut caches: Vec<SeqCache> = seqs.iter().map(|_| SeqCache::default()).collect();
    let mut batch: Vec<SeqInput> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|(s, c)| SeqInput {
            tokens: s,
            cache: c,
            all_logits: false,
        })
        .collect();
    let together = model.forward(&mut pool, &mut batch).unwrap();
    for (s, t) in seqs.iter().zip(&together) {
        let mut c = SeqCache::default();
        let alone = model
            .forward(
                &mut pool,
                &mut [SeqInput {
                    tokens: s,
                    cache: &mut c,
                    all_logits: false,
                }],
            )
            .unwrap()
            .remove(0);
        for (a, b) in alone.iter().zip(t) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}

fn seeded(dir: &Path) {
    let model = Model::load(dir, ExpertSelection::All).unwrap();
    let req = |seed| GenerateRequest {
        prompt: vec![10, 20, 30],
        max_tokens: 12,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
        },
        seed,
        top_logprobs: 0,
        echo: false,
        ignore_eos: true,
        kv_dtype: KvDtype::F32,
    };
    let a = generate(&model, &req(7)).unwrap();
    let b = generate(&model, &req(7)).unwrap();
    assert_eq!(a, b, "same seed, same tokens");
    let others: Vec<_> = (8..12)
        .map(|s| generate(&model, &req(s)).unwrap().tokens)
        .collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "different seeds never differ: sampling ignores the seed"
    );
}

#[test]
fn fixtures_engine_vs_f64_reference() {
    for name in ["open-bf16", "open-fp8"] {
        engine_matches_reference(
            &crate::fixtures::fixture_dir(name),
            &[3, 17, 255, 42, 8, 99, 100, 7, 1, 64],
        );
    }
}

#[test]
fn fixtures_cache_and_batch() {
    for name in ["open-bf16", "open-fp8"] {
        let d = crate::fixtures::fixture_dir(name);
        cache_equals_recompute(&d, &[3, 17, 255, 42, 8, 99, 100, 7, 1, 64, 65, 66]);
        batch_equals_alone(&d);
        seeded(&d);
    }
}

/// Experts computed on another thread and reported as remote, so the model splits batches into
/// two micro-batches and overlaps them (what an attention pod does with expert shards).
struct ThreadedExperts(Arc<LocalExperts>);

impl RoutedExperts for ThreadedExperts {
    fn start(
        &self,
        layer: usize,
        rows: &[f32],
        routing: &[Routing],
    ) -> shardseek_worker::Result<PendingExperts> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (inner, rows, routing) = (self.0.clone(), rows.to_vec(), routing.to_vec());
        std::thread::spawn(move || {
            let _ = tx.send(inner.forward(layer, &rows, &routing));
        });
        Ok(PendingExperts::Waiting(rx))
    }
    fn is_remote(&self) -> bool {
        true
    }
}

#[test]
fn micro_batch_overlap_equals_plain() {
    for name in ["open-bf16", "open-fp8"] {
        let dir = crate::fixtures::fixture_dir(name);
        let plain = Model::load(&dir, ExpertSelection::All).unwrap();
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        let all: Vec<usize> = (0..cfg.n_routed_experts).collect();
        let local = Arc::new(LocalExperts::load(&cfg, store.clone(), &all).unwrap());
        let mut overlapped =
            Model::from_store(cfg, store, Arc::new(ThreadedExperts(local))).unwrap();
        overlapped.set_overlap(Overlap {
            enabled: true,
            min_tokens: 2,
        });
        let seqs: Vec<Vec<u32>> = vec![
            vec![5, 9, 13, 2, 7],
            vec![3, 4],
            vec![11, 4, 4, 8, 1, 6, 20, 30],
            vec![9],
        ];
        let run = |m: &Model| {
            let mut pool = m.new_pool(64 * 8);
            let mut caches: Vec<SeqCache> = seqs.iter().map(|_| SeqCache::default()).collect();
            let mut out = Vec::new();
            // Prefill step, then two decode steps, all batched.
            let mut batch: Vec<SeqInput> = seqs
                .iter()
                .zip(caches.iter_mut())
                .map(|(s, c)| SeqInput {
                    tokens: s,
                    cache: c,
                    all_logits: false,
                })
                .collect();
            out.extend(m.forward(&mut pool, &mut batch).unwrap());
            for step in 0..2u32 {
                let next: Vec<[u32; 1]> = (0..seqs.len()).map(|i| [40 + step + i as u32]).collect();
                let mut batch: Vec<SeqInput> = next
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(t, c)| SeqInput {
                        tokens: t,
                        cache: c,
                        all_logits: false,
                    })
                    .collect();
                out.extend(m.forward(&mut pool, &mut batch).unwrap());
            }
            out
        };
        let (a, b) = (run(&plain), run(&overlapped));
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{name}: {x} vs {y}"
            );
        }
    }
}
