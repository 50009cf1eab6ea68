//! The logits-processing stages of the engine's sampler ([`super::sampler::LogitsProcessor`]):
//! what runs on one sequence's row of logits after the forward pass and before a token is
//! selected. In order (vLLM's order): grammar mask ([`GrammarMask`]), then [`LogitsStage`]:
//! `min_tokens` (end-of-sequence and stop ids barred), repetition / frequency / presence
//! penalties, `logit_bias`, `min_p`.
//!
//! Everything here is per sequence and cheap next to the forward pass (O(vocab) at most), except
//! the grammar mask, which [`super::grammar`] computes while the forward pass runs; the
//! scheduler puts the finished mask in the sequence's [`MaskSlot`] and the processor applies it.

use super::sampler::{LogitsProcessor, SeqContext};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use toktrie::SimpleVob;

/// What a request asks of the stage: the router's parameter type, so the two crates cannot
/// drift apart (its neutral value leaves the row untouched).
pub use shardseek_router::openai::backend::LogitsFields as LogitsParams;

/// Per-sequence memory of the stage: how often each token was generated, and which tokens the
/// prompt holds (for the repetition penalty).
#[derive(Debug, Default)]
pub struct LogitsState {
    counts: HashMap<u32, u32>,
    prompt: Vec<u32>,
    generated: usize,
}

impl LogitsState {
    /// State for a prompt; the prompt's distinct tokens are kept only when the repetition
    /// penalty needs them.
    pub fn new(params: &LogitsParams, prompt: &[u32]) -> Self {
        let mut p = Vec::new();
        if params.repetition_penalty != 1.0 {
            p = prompt.to_vec();
            p.sort_unstable();
            p.dedup();
        }
        Self {
            counts: HashMap::new(),
            prompt: p,
            generated: 0,
        }
    }

    /// Records a generated token.
    pub fn push(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
        self.generated += 1;
    }

    pub fn generated(&self) -> usize {
        self.generated
    }
}

/// Where the scheduler leaves a sequence's next grammar mask for its [`GrammarMask`].
#[derive(Clone, Debug, Default)]
pub struct MaskSlot(Arc<Mutex<Option<SimpleVob>>>);

impl MaskSlot {
    /// Sets the mask for the next selection (None: unconstrained this step).
    pub fn put(&self, mask: Option<SimpleVob>) {
        if let Ok(mut m) = self.0.lock() {
            *m = mask;
        }
    }

    fn take(&self) -> Option<SimpleVob> {
        self.0.lock().ok().and_then(|mut m| m.take())
    }
}

/// Bars the tokens a grammar does not allow (its mask was computed during the forward pass).
pub struct GrammarMask {
    slot: MaskSlot,
}

impl GrammarMask {
    pub fn new(slot: MaskSlot) -> Self {
        Self { slot }
    }
}

impl LogitsProcessor for GrammarMask {
    fn process(&mut self, _ctx: &SeqContext<'_>, logits: &mut [f32]) {
        if let Some(m) = self.slot.take() {
            apply_mask(logits, &m);
        }
    }
}

fn apply_mask(row: &mut [f32], m: &SimpleVob) {
    for (i, l) in row.iter_mut().enumerate() {
        if !m.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `min_tokens`, penalties, `logit_bias` and `min_p` as one processor of a sequence.
pub struct LogitsStage {
    params: LogitsParams,
    /// Ids that end generation (EOS and the request's stop ids), barred before `min_tokens`.
    ends: Vec<u32>,
    temperature: f32,
    state: LogitsState,
}

impl LogitsStage {
    pub fn new(params: LogitsParams, ends: Vec<u32>, temperature: f32, prompt: &[u32]) -> Self {
        let state = LogitsState::new(&params, prompt);
        Self {
            params,
            ends,
            temperature,
            state,
        }
    }
}

impl LogitsProcessor for LogitsStage {
    fn process(&mut self, ctx: &SeqContext<'_>, logits: &mut [f32]) {
        // The history only grows; count what was generated since the last call.
        for &t in ctx
            .generated
            .get(self.state.generated..)
            .unwrap_or_default()
        {
            self.state.push(t);
        }
        apply(
            logits,
            &self.params,
            &self.state,
            &self.ends,
            None,
            self.temperature,
        );
    }
}

/// Applies the stage to `row` in place. `ends` are the ids that end generation (EOS and the
/// request's stop ids); `temperature` is the one selection will use (min_p depends on it).
pub fn apply(
    row: &mut [f32],
    params: &LogitsParams,
    state: &LogitsState,
    ends: &[u32],
    mask: Option<&SimpleVob>,
    temperature: f32,
) {
    if let Some(m) = mask {
        apply_mask(row, m);
    }
    if state.generated < params.min_tokens {
        for &e in ends {
            if let Some(l) = row.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let rp = params.repetition_penalty;
    if rp != 1.0 {
        let seen = state
            .prompt
            .iter()
            .copied()
            .chain(state.counts.keys().copied());
        for t in seen {
            if let Some(l) = row.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        for (&t, &c) in &state.counts {
            if let Some(l) = row.get_mut(t as usize) {
                *l -= params.frequency_penalty * c as f32 + params.presence_penalty;
            }
        }
    }
    for &(t, b) in &params.logit_bias {
        if let Some(l) = row.get_mut(t as usize) {
            *l += b;
        }
    }
    if params.min_p > 0.0 && temperature > 0.0 {
        // p_i / p_max = exp((l_i - l_max) / T) < min_p  ⇔  l_i < l_max + T·ln(min_p)
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max.is_finite() {
            let cut = max + temperature * params.min_p.ln();
            for l in row.iter_mut() {
                if *l < cut {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LogitsParams {
        LogitsParams::default()
    }

    #[test]
    fn neutral_parameters_change_nothing() {
        let p = params();
        assert!(p.is_neutral());
        let mut row = vec![1.0, -2.0, 3.0];
        let st = LogitsState::new(&p, &[0, 1]);
        apply(&mut row, &p, &st, &[2], None, 1.0);
        assert_eq!(row, vec![1.0, -2.0, 3.0]);
    }

    #[test]
    fn penalties_follow_openai_and_hf_definitions() {
        let p = LogitsParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params()
        };
        let mut st = LogitsState::new(&p, &[]);
        st.push(0);
        st.push(0);
        st.push(2);
        let mut row = vec![1.0, 1.0, 1.0];
        apply(&mut row, &p, &st, &[], None, 1.0);
        assert_eq!(row, vec![1.0 - 0.5 - 0.5, 1.0, 1.0 - 0.25 - 0.5]);

        let p = LogitsParams {
            repetition_penalty: 2.0,
            ..params()
        };
        let mut st = LogitsState::new(&p, &[1]);
        st.push(2);
        let mut row = vec![4.0, 4.0, -4.0];
        apply(&mut row, &p, &st, &[], None, 1.0);
        assert_eq!(row, vec![4.0, 2.0, -8.0]);
    }

    #[test]
    fn bias_min_tokens_and_min_p() {
        let p = LogitsParams {
            logit_bias: vec![(1, 10.0)],
            min_tokens: 1,
            ..params()
        };
        let mut st = LogitsState::new(&p, &[]);
        let mut row = vec![0.0, 0.0, 5.0];
        apply(&mut row, &p, &st, &[2], None, 1.0);
        assert_eq!(row, vec![0.0, 10.0, f32::NEG_INFINITY]);
        st.push(1);
        let mut row = vec![0.0, 0.0, 5.0];
        apply(&mut row, &p, &st, &[2], None, 1.0);
        assert_eq!(row[2], 5.0);

        let p = LogitsParams {
            min_p: 0.5,
            ..params()
        };
        let st = LogitsState::new(&p, &[]);
        // probabilities ∝ e^0, e^-1, e^-0.5: p/p_max = 1, 0.37, 0.61
        let mut row = vec![0.0, -1.0, -0.5];
        apply(&mut row, &p, &st, &[], None, 1.0);
        assert_eq!(row, vec![0.0, f32::NEG_INFINITY, -0.5]);
    }

    #[test]
    fn mask_bars_disallowed_tokens() {
        let p = params();
        let st = LogitsState::new(&p, &[]);
        let mut m = SimpleVob::alloc(3);
        m.allow_token(1);
        let mut row = vec![3.0, 1.0, 2.0];
        apply(&mut row, &p, &st, &[], Some(&m), 1.0);
        assert_eq!(row, vec![f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn processors_follow_the_history_and_the_slot() {
        let p = LogitsParams {
            frequency_penalty: 1.0,
            ..params()
        };
        let mut stage = LogitsStage::new(p, vec![], 1.0, &[]);
        let mut row = vec![0.0, 0.0];
        let ctx = SeqContext {
            prompt: &[],
            generated: &[1, 1],
        };
        stage.process(&ctx, &mut row);
        assert_eq!(row, vec![0.0, -2.0]);
        let ctx = SeqContext {
            prompt: &[],
            generated: &[1, 1, 0],
        };
        let mut row = vec![0.0, 0.0];
        stage.process(&ctx, &mut row);
        assert_eq!(row, vec![-1.0, -2.0]);

        let slot = MaskSlot::default();
        let mut g = GrammarMask::new(slot.clone());
        let mut m = SimpleVob::alloc(2);
        m.allow_token(0);
        slot.put(Some(m));
        let mut row = vec![1.0, 2.0];
        g.process(&ctx, &mut row);
        assert_eq!(row, vec![1.0, f32::NEG_INFINITY]);
        // A mask is used once.
        let mut row = vec![1.0, 2.0];
        g.process(&ctx, &mut row);
        assert_eq!(row, vec![1.0, 2.0]);
    }

    #[test]
    fn validation_names_the_field() {
        let p = LogitsParams {
            logit_bias: vec![(9, 1.0)],
            ..params()
        };
        assert!(p.validate(5).unwrap_err().contains("logit_bias"));
        let p = LogitsParams {
            min_p: 2.0,
            ..params()
        };
        assert!(p.validate(5).unwrap_err().contains("min_p"));
    }
}
