//! The bf16 and fp8 latent caches against the exact f32 cache on the same model, and the FP8
//! lm_head (`--lm-head-dtype fp8`) against the checkpoint's BF16 one.
//!
//! Stated tolerances, per cache dtype, on the prompt log-probs of a 150-token prompt (echo)
//! and on 12 greedy tokens:
//! - **bf16**: median |Δ log-prob| ≤ 0.03 nats and ≥ 95% of positions within 0.1 nats; greedy
//!   tokens equal unless the f32 run's best two are within 0.2 nats (a near-tie).
//! - **fp8** (e4m3, one scale per token): median ≤ 0.4 nats, ≥ 80% of positions within 1 nat;
//!   greedy tokens equal unless the f32 margin is within 2 nats.
//!
//! - **lm_head fp8** (e4m3, 128×128 block scales, like the checkpoint's other projections):
//!   the fp8 cache's bound class (median ≤ 0.4 nats, ≥ 80% within 1 nat, ties within 2 nats).
//! - **bf16 activations** (`--activation-dtype bf16`: every GEMM's x rounded to bf16, f32
//!   cache): the bf16 cache's bound class (median ≤ 0.03 nats, ≥ 95% within 0.1, ties within
//!   0.2 nats).
//!
//! Why percentiles and not a maximum: a few positions move by whole nats because a tiny
//! change of the hidden state flips a top-k expert choice of the router (a discontinuity of
//! the model, not of the cache), which random fixture weights make common.

use crate::fixtures::fixture_dir;
use shardseek_kernels::cpu::Isa;
use shardseek_kernels::gemm::Activations;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_worker::backend::CpuBackend;
use shardseek_worker::generate::{GenerateOutput, GenerateRequest, generate};
use shardseek_worker::kv::KvDtype;
use shardseek_worker::model::{ExpertSelection, Model};
use std::sync::Arc;

struct Bound {
    median: f32,
    within: f32,
    fraction: f32,
    tie: f32,
}

const BF16: Bound = Bound {
    median: 0.03,
    within: 0.1,
    fraction: 0.95,
    tie: 0.2,
};
const FP8: Bound = Bound {
    median: 0.4,
    within: 1.0,
    fraction: 0.8,
    tie: 2.0,
};

fn run(model: &Model, prompt: &[u32], kv_dtype: KvDtype) -> GenerateOutput {
    generate(
        model,
        &GenerateRequest {
            prompt: prompt.to_vec(),
            max_tokens: 12,
            sampling: SamplingParams::default(),
            seed: 0,
            top_logprobs: 2,
            echo: true,
            ignore_eos: true,
            kv_dtype,
        },
    )
    .unwrap()
}

/// Checks `got` against `exact`; returns the median |Δ log-prob| of the prompt.
fn compare(exact: &GenerateOutput, got: &GenerateOutput, b: &Bound, what: &str) -> f32 {
    let (e, g) = (
        exact.prompt_logprobs.as_ref().unwrap(),
        got.prompt_logprobs.as_ref().unwrap(),
    );
    let mut d: Vec<f32> = e
        .iter()
        .zip(g)
        .skip(1)
        .map(|(a, b)| (a.unwrap() - b.unwrap()).abs())
        .collect();
    d.sort_by(f32::total_cmp);
    let median = d[d.len() / 2];
    let inside = d.iter().filter(|&&x| x <= b.within).count() as f32 / d.len() as f32;
    assert!(
        median <= b.median,
        "{what}: median |Δ| {median} > {}",
        b.median
    );
    assert!(
        inside >= b.fraction,
        "{what}: only {inside} of positions within {}",
        b.within
    );
    for (i, (&te, &tg)) in exact.tokens.iter().zip(&got.tokens).enumerate() {
        if te != tg {
            let top = &exact.top_logprobs[i];
            let gap = top[0].1 - top[1].1;
            assert!(
                gap <= b.tie,
                "{what}: token {i} differs ({te} vs {tg}) though the f32 margin is {gap}"
            );
            break; // the sequences differ from here on
        }
    }
    median
}

#[test]
fn bf16_and_fp8_caches_track_the_f32_cache() {
    let prompt: Vec<u32> = (0..150).map(|i| (i * 37 % 380 + 3) as u32).collect();
    for name in ["open-bf16", "open-fp8"] {
        let model = Model::load(&fixture_dir(name), ExpertSelection::All).unwrap();
        let exact = run(&model, &prompt, KvDtype::F32);
        let mb = compare(&exact, &run(&model, &prompt, KvDtype::Bf16), &BF16, "bf16");
        let mf = compare(&exact, &run(&model, &prompt, KvDtype::Fp8), &FP8, "fp8");
        eprintln!("{name}: median |Δ log-prob| bf16 {mb:.2e}, fp8 {mf:.2e}");
        assert!(
            mb > 0.0,
            "the bf16 cache was not used (results identical to f32)"
        );
    }
}

#[test]
fn fp8_lm_head_tracks_the_checkpoint_lm_head() {
    let prompt: Vec<u32> = (0..150).map(|i| (i * 37 % 380 + 3) as u32).collect();
    for name in ["open-bf16", "open-fp8"] {
        let mut model = Model::load(&fixture_dir(name), ExpertSelection::All).unwrap();
        let exact = run(&model, &prompt, KvDtype::F32);
        model.quantize_lm_head_fp8().unwrap();
        let got = run(&model, &prompt, KvDtype::F32);
        let m = compare(&exact, &got, &FP8, "lm_head fp8");
        eprintln!("{name}: lm_head fp8: median |Δ log-prob| {m:.2e}");
        assert!(m > 0.0, "the FP8 lm_head was not used (results identical)");
    }
}

#[test]
fn bf16_activations_track_f32_activations() {
    if !Isa::Avx512Bf16.available() {
        eprintln!("skipped: bf16 activations need AVX512-BF16");
        return;
    }
    let prompt: Vec<u32> = (0..150).map(|i| (i * 37 % 380 + 3) as u32).collect();
    for name in ["open-bf16", "open-fp8"] {
        let dir = fixture_dir(name);
        let model = Model::load(&dir, ExpertSelection::All).unwrap();
        let exact = run(&model, &prompt, KvDtype::F32);
        let backend = Arc::new(CpuBackend::with_activations(Activations::Bf16).unwrap());
        let fast = Model::load_on(&dir, ExpertSelection::All, backend).unwrap();
        let m = compare(
            &exact,
            &run(&fast, &prompt, KvDtype::F32),
            &BF16,
            "bf16 activations",
        );
        eprintln!("{name}: bf16 activations: median |Δ log-prob| {m:.2e}");
        assert!(
            m > 0.0,
            "bf16 activations were not used (results identical)"
        );
    }
}
