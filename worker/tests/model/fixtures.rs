//! The engine against `testdata/fixtures/`: what Hugging Face transformers computes in f64.

use serde_json::Value;
use shardseek_kernels::sampling::SamplingParams;
use shardseek_worker::generate::{GenerateRequest, generate};
use shardseek_worker::kv::KvDtype;
use shardseek_worker::model::{ExpertSelection, Model};
use std::path::PathBuf;

/// f32 activations against an f64 reference: the fixtures' README calls 2e-3 generous.
const TOL: f64 = 2e-3;

/// `testdata/fixtures/NAME`, or `$SHARDSEEK_FIXTURES/NAME` where the tests run away from the
/// source tree (the prebuilt binaries of `scripts/gpu-check.sh`).
pub fn fixture_dir(name: &str) -> PathBuf {
    match std::env::var_os("SHARDSEEK_FIXTURES") {
        Some(d) => PathBuf::from(d).join(name),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/fixtures")
            .join(name),
    }
}

fn check_fixture(name: &str) {
    let model = Model::load(&fixture_dir(name), ExpertSelection::All).expect("load fixture");
    check_fixture_model(name, &model);
}

/// Greedy steps, log-probs, top-5 and echoed prompt log-probs of `model` (loaded from fixture
/// `name` on any backend) against the fixture's `expected.json`, within [`TOL`].
pub fn check_fixture_model(name: &str, model: &Model) {
    let dir = fixture_dir(name);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut compared = 0;
    let mut worst = 0f64;
    for (ci, case) in cases.iter().enumerate() {
        let prompt: Vec<u32> = case["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let steps = case["steps"].as_array().unwrap();
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: steps.len(),
            sampling: SamplingParams::default(),
            seed: 0,
            top_logprobs: 5,
            echo: true,
            ignore_eos: true,
            kv_dtype: KvDtype::F32,
        };
        let out = generate(model, &req).expect("generate");
        let echo = case["echo_logprobs"].as_array().unwrap();
        let ours = out.prompt_logprobs.as_ref().unwrap();
        assert!(echo[0].is_null() && ours[0].is_none());
        for (i, (e, o)) in echo.iter().zip(ours).enumerate().skip(1) {
            let (e, o) = (e.as_f64().unwrap(), o.unwrap() as f64);
            worst = worst.max((e - o).abs());
            assert!(
                (e - o).abs() < TOL,
                "{name} case {ci} echo {i}: ours {o} reference {e}"
            );
            compared += 1;
        }
        for (si, st) in steps.iter().enumerate() {
            let tok = st["token"].as_u64().unwrap() as u32;
            let lp = st["logprob"].as_f64().unwrap();
            let margin = st["margin"].as_f64().unwrap();
            if out.tokens[si] != tok {
                assert!(
                    margin < TOL,
                    "{name} case {ci} step {si}: token {} vs reference {tok} (margin {margin})",
                    out.tokens[si]
                );
                break;
            }
            let o = out.logprobs[si] as f64;
            worst = worst.max((o - lp).abs());
            assert!(
                (o - lp).abs() < TOL,
                "{name} case {ci} step {si}: logprob {o} vs {lp}"
            );
            for (pair, ours) in st["top5"]
                .as_array()
                .unwrap()
                .iter()
                .zip(&out.top_logprobs[si])
            {
                let rl = pair[1].as_f64().unwrap();
                if pair[0].as_u64().unwrap() as u32 == ours.0 {
                    assert!((ours.1 as f64 - rl).abs() < TOL);
                }
            }
            compared += 1;
        }
    }
    assert!(compared > 20, "{name}: only {compared} values compared");
    eprintln!(
        "{name} on {}: {compared} log-probs compared, largest |difference| {worst:.2e} (tolerance {TOL:e})",
        model.backend().name()
    );
}

#[test]
fn open_bf16_matches_reference() {
    check_fixture("open-bf16");
}

#[test]
fn open_fp8_matches_reference() {
    check_fixture("open-fp8");
}
