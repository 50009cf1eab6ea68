//! `shardseek bench model`: prefill and decode speed of one process on a checkpoint at several
//! batch sizes, with the peak resident memory (what a user sizing a machine asks first).
//!
//! For each batch size B: B different prompts of `prompt_len` tokens are prefilled in one
//! step (prefill tok/s = B·prompt_len / step time), then `decode` steps each add one token to
//! every sequence (decode tok/s = B·decode / time), sampled greedily by the engine's sampler.
//! Each batch size starts from an empty cache of the chosen dtype.

use crate::engine::sampler::{Sampler, SeqContext, SeqParams, SeqSampler};
use crate::error::{Error, Result};
use crate::kv::{KvDtype, SeqCache};
use crate::model::{ExpertSelection, ForwardScratch, Model, SeqInput};
use serde::Serialize;
use shardseek_kernels::sampling::SamplingParams;
use std::path::Path;
use std::time::Instant;

/// Figures of one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct BatchSpeed {
    pub batch: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Decode step latency percentiles, milliseconds (one step = one token per sequence).
    pub decode_ms_p50: f64,
    pub decode_ms_p90: f64,
}

/// Measured figures.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSpeed {
    pub load_seconds: f64,
    /// Peak RSS right after loading (weights are mapped, so this counts touched pages).
    pub load_peak_rss_bytes: u64,
    pub checkpoint_bytes: u64,
    pub backend: String,
    pub kv_cache_dtype: String,
    /// `checkpoint` or `fp8` (`--lm-head-dtype`).
    pub lm_head_dtype: String,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub batches: Vec<BatchSpeed>,
    /// Peak RSS at the end of the run.
    pub peak_rss_bytes: u64,
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 elsewhere.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Loads `dir`, then for each batch size prefills `prompt_len` tokens per sequence and decodes
/// `decode` tokens per sequence greedily.
pub fn measure(
    dir: &Path,
    prompt_len: usize,
    decode: usize,
    batches: &[usize],
    kv_dtype: KvDtype,
    backend: std::sync::Arc<dyn crate::backend::Backend>,
    lm_head: crate::model::LmHeadDtype,
) -> Result<ModelSpeed> {
    if prompt_len == 0 || batches.contains(&0) {
        return Err(Error::Input(
            "bench model needs a prompt of at least one token and batch sizes ≥ 1".into(),
        ));
    }
    // The allocator settings of an attention pod, so that a step here costs what it costs
    // there (the serving comparison `bench serve` against this is only fair that way).
    crate::expert::tune_allocator();
    let t0 = Instant::now();
    let mut model = Model::load_on(dir, ExpertSelection::All, backend)?;
    lm_head.apply(&mut model)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let load_peak_rss_bytes = peak_rss_bytes();
    let mut out = Vec::with_capacity(batches.len());
    for &b in batches {
        out.push(measure_batch(&model, prompt_len, decode, b, kv_dtype)?);
    }
    Ok(ModelSpeed {
        load_seconds,
        load_peak_rss_bytes,
        checkpoint_bytes: model.store.file_bytes() as u64,
        backend: model.backend().name(),
        kv_cache_dtype: kv_dtype.name().into(),
        lm_head_dtype: lm_head.name().into(),
        prompt_tokens: prompt_len,
        decode_tokens: decode,
        batches: out,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn measure_batch(
    model: &Model,
    prompt_len: usize,
    decode: usize,
    b: usize,
    kv_dtype: KvDtype,
) -> Result<BatchSpeed> {
    let v = model.cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..b as u32)
        .map(|s| {
            (0..prompt_len as u32)
                .map(|i| (i * 7919 + s * 104_729 + 13) % v)
                .collect()
        })
        .collect();
    // Every sequence rounds up to whole blocks.
    let per_seq = (prompt_len + decode + 1).div_ceil(crate::kv::BLOCK_TOKENS);
    let mut pool = model.new_pool_with(b * per_seq * crate::kv::BLOCK_TOKENS, kv_dtype);
    let mut caches = vec![SeqCache::default(); b];
    let mut samplers: Vec<SeqSampler> = (0..b)
        .map(|_| {
            SeqSampler::new(SeqParams {
                sampling: SamplingParams::default(),
                seed: 0,
                top_logprobs: 0,
                token_logprob: false,
            })
        })
        .collect();
    let mut sampler = Sampler::new();
    let mut next = vec![0u32; b];
    // The engine's hot path: buffers kept from step to step.
    let mut scratch = ForwardScratch::default();
    let mut step = |pool: &mut _, caches: &mut [SeqCache], toks: &[&[u32]], next: &mut [u32]| {
        let mut inputs: Vec<SeqInput> = caches
            .iter_mut()
            .zip(toks)
            .map(|(cache, t)| SeqInput {
                tokens: t,
                cache,
                all_logits: false,
            })
            .collect();
        model.forward_into(pool, &mut inputs, &mut scratch)?;
        for (k, (s, n)) in samplers.iter_mut().zip(next).enumerate() {
            let ctx = SeqContext {
                prompt: &[],
                generated: &[],
            };
            *n = sampler.sample(s, &ctx, scratch.logits_mut(k)).token;
        }
        Ok::<(), Error>(())
    };
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let t1 = Instant::now();
    step(&mut pool, &mut caches, &refs, &mut next)?;
    let prefill = t1.elapsed().as_secs_f64();
    let mut steps = Vec::with_capacity(decode);
    let t2 = Instant::now();
    for _ in 0..decode {
        let s = Instant::now();
        let cur = next.clone();
        let toks: Vec<&[u32]> = cur.chunks(1).collect();
        step(&mut pool, &mut caches, &toks, &mut next)?;
        steps.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let decode_s = t2.elapsed().as_secs_f64();
    steps.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        steps
            .get(((steps.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(BatchSpeed {
        batch: b,
        prefill_tokens_per_s: (b * prompt_len) as f64 / prefill.max(1e-9),
        decode_tokens_per_s: (b * decode) as f64 / decode_s.max(1e-9),
        decode_ms_p50: pct(0.5),
        decode_ms_p90: pct(0.9),
    })
}
