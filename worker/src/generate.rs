//! One request, start to finish, on a loaded model: prefill, then decode step by step with
//! sampling, recording log-probs. This is what `shardseek generate` runs in process; it drives
//! the engine's scheduling loop ([`crate::engine::run_blocking`]), so the in-process and the
//! served paths share one generation loop.

use crate::engine::{EngineConfig, EngineRequest, Event, run_blocking};
use crate::error::{Error, Result};
use crate::kv::{BLOCK_TOKENS, KvDtype};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use shardseek_kernels::sampling::SamplingParams;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// How many top alternatives to report per generated token (0: none).
    pub top_logprobs: usize,
    /// Also compute each prompt token's log-prob given the ones before it.
    pub echo: bool,
    /// Keep going past an end-of-sequence token (reference comparisons).
    pub ignore_eos: bool,
    /// Element type of the latent cache (f32 is exact; bf16 is the serving default).
    pub kv_dtype: KvDtype,
}

/// Why generation stopped: the one enum the engine, the HTTP API and `generate --json` share
/// (the wire has its protobuf twin).
pub use shardseek_router::openai::FinishReason;

/// The result, in the JSON shape `shardseek generate --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub text: Option<String>,
    pub finish_reason: FinishReason,
}

/// Checks a request against the model's limits.
pub fn validate(model: &Model, req: &GenerateRequest) -> Result<()> {
    let cfg = &model.cfg;
    if req.prompt.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(Error::Input(format!(
            "prompt token id {t} is out of range (vocab_size {})",
            cfg.vocab_size
        )));
    }
    if !(req.sampling.temperature >= 0.0 && req.sampling.temperature.is_finite()) {
        return Err(Error::Input(format!(
            "temperature {} must be a finite number >= 0",
            req.sampling.temperature
        )));
    }
    if !(req.sampling.top_p > 0.0 && req.sampling.top_p <= 1.0) {
        return Err(Error::Input(format!(
            "top_p {} must be in (0, 1]",
            req.sampling.top_p
        )));
    }
    Ok(())
}

/// Runs a request to completion through the engine's scheduling loop on this thread (one
/// generation loop for `generate` and the engine): the whole prompt in one step, then one
/// token per step.
pub fn generate(model: &Model, req: &GenerateRequest) -> Result<GenerateOutput> {
    validate(model, req)?;
    let total = req.prompt.len() + req.max_tokens;
    let cfg = EngineConfig {
        max_batch_tokens: req.prompt.len().max(1),
        max_running_requests: 1,
        max_waiting_requests: 1,
        max_seq_len: total,
        kv_blocks: total.div_ceil(BLOCK_TOKENS).max(1),
        kv_dtype: req.kv_dtype,
        ..EngineConfig::default()
    };
    let ereq = EngineRequest {
        prompt: req.prompt.clone(),
        max_tokens: req.max_tokens,
        sampling: req.sampling.clone(),
        seed: req.seed,
        top_logprobs: req.top_logprobs,
        token_logprob: true,
        echo: req.echo,
        ignore_eos: req.ignore_eos,
        stop_token_ids: Vec::new(),
        cache_salt: None,
        logits: Default::default(),
        constraint: None,
    };
    let events = run_blocking(model, cfg, vec![ereq])
        .pop()
        .unwrap_or_default();
    let mut out = GenerateOutput {
        prompt_tokens: req.prompt.clone(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        prompt_logprobs: None,
        text: None,
        finish_reason: FinishReason::Length,
    };
    let mut finished = false;
    for ev in events {
        match ev {
            Event::PromptLogprobs(pl) => out.prompt_logprobs = Some(pl),
            Event::Token { id, logprob, top } => {
                out.tokens.push(id);
                out.logprobs.push(logprob.unwrap_or(f32::NAN));
                out.top_logprobs.push(top);
            }
            Event::Finished { reason, .. } => {
                out.finish_reason = reason;
                finished = true;
            }
            Event::Error(e) => return Err(Error::Generation(e)),
        }
    }
    if !finished {
        return Err(Error::Generation(
            "the request ended without finishing".into(),
        ));
    }
    Ok(out)
}
