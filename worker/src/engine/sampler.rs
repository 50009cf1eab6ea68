//! The one sampler of the engine: turns a step's logits into one token per sequence.
//!
//! Stages, per sequence, in order:
//! 1. **logits processors** ([`LogitsProcessor`]): anything that edits logits before selection
//!    (penalties, logit bias, min-tokens, grammar masks). They run in the order they were added
//!    to the sequence's [`SeqSampler`], on the sequence's own row, with its token history.
//! 2. **selection**: greedy is a single argmax pass. Temperature sampling with top-k and/or
//!    top-p never sorts the vocabulary: the candidates are found by partial selection
//!    (`select_nth_unstable`) over a prefix that grows ×4 until it holds the top-p mass and the
//!    drawn point, and only that prefix is sorted. With DeepSeek's 129k vocabulary and a peaked
//!    distribution this touches a few hundred entries after one O(V) pass.
//! 3. **log-probs**: the chosen token's log-prob costs one log-sum-exp pass; the top
//!    alternatives are computed only when the request asked for them (`top_logprobs > 0`).
//!
//! Selection draws exactly one uniform number per sampled token from the sequence's own
//! seeded [`Rng`] and walks candidates best first (ties by lower id), the same rule as the
//! plain reference [`shardseek_kernels::sampling::reference::sample`]; the same seed gives the same tokens.
//!
//! A [`Sampler`] owns scratch buffers that grow to the vocabulary once and are reused for
//! every row of every step, so sampling allocates nothing on the hot path (apart from the
//! `top` list a request asked for).

use shardseek_kernels::sampling::{Rng, SamplingParams, argmax};

/// Per-sequence sampling parameters (what a request asks for).
#[derive(Clone, Debug, PartialEq)]
pub struct SeqParams {
    pub sampling: SamplingParams,
    pub seed: u64,
    /// How many top alternatives to report per token (0: none, and none are computed).
    pub top_logprobs: usize,
    /// Whether to compute the chosen token's log-prob: a log-sum-exp pass over the whole
    /// vocabulary per token, which greedy decoding otherwise never needs.
    pub token_logprob: bool,
}

/// What a logits processor may look at besides the logits.
#[derive(Clone, Copy, Debug)]
pub struct SeqContext<'a> {
    /// The prompt tokens.
    pub prompt: &'a [u32],
    /// Tokens generated so far (not counting the one being sampled).
    pub generated: &'a [u32],
}

/// A stage that edits one sequence's logits before selection (penalties, logit bias,
/// min-tokens, grammar masks, …). Setting a logit to `f32::NEG_INFINITY` forbids the token.
pub trait LogitsProcessor: Send {
    fn process(&mut self, ctx: &SeqContext<'_>, logits: &mut [f32]);
}

/// One sequence's sampling state: its parameters, its generator and its processors.
pub struct SeqSampler {
    pub params: SeqParams,
    rng: Rng,
    processors: Vec<Box<dyn LogitsProcessor>>,
}

impl SeqSampler {
    pub fn new(params: SeqParams) -> Self {
        Self {
            rng: Rng::new(params.seed),
            params,
            processors: Vec::new(),
        }
    }

    /// Adds a stage that runs before selection, after the ones already added.
    pub fn push_processor(&mut self, p: Box<dyn LogitsProcessor>) {
        self.processors.push(p);
    }

    /// Starts over from the seed (a preempted sequence recomputes its tokens; its draws do
    /// not restart, so this is only for callers that replay a request from scratch).
    pub fn reseed(&mut self) {
        self.rng = Rng::new(self.params.seed);
    }
}

/// The sampled token of one row.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log softmax(logits)[token] over the processed logits at temperature 1; None unless
    /// asked for (by `token_logprob` or `top_logprobs`).
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, best first (empty unless asked for).
    pub top: Vec<(u32, f32)>,
}

/// Reusable scratch for selection; one per engine thread.
#[derive(Default)]
pub struct Sampler {
    idx: Vec<u32>,
    cum: Vec<f64>,
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples one token from `logits` (edited in place by the sequence's processors).
    pub fn sample(
        &mut self,
        seq: &mut SeqSampler,
        ctx: &SeqContext<'_>,
        logits: &mut [f32],
    ) -> Sampled {
        for p in &mut seq.processors {
            p.process(ctx, logits);
        }
        // The log-sum-exp pass only when a log-prob is reported; selection needs just the max
        // (and greedy not even that).
        let want_lp = seq.params.token_logprob || seq.params.top_logprobs > 0;
        let (max, lse) = if want_lp {
            log_sum_exp(logits)
        } else {
            (max_of(logits), f32::NAN)
        };
        let token = self.select(logits, max, &seq.params.sampling, &mut seq.rng);
        let top = if seq.params.top_logprobs > 0 {
            self.top_logprobs(logits, lse, seq.params.top_logprobs)
        } else {
            Vec::new()
        };
        Sampled {
            token,
            logprob: want_lp.then(|| logits[token as usize] - lse),
            top,
        }
    }

    /// Samples one token per row of `logits` (`[seqs.len(), vocab]`); row i belongs to
    /// `seqs[i]`.
    pub fn sample_batch(
        &mut self,
        seqs: &mut [(&mut SeqSampler, SeqContext<'_>)],
        logits: &mut [f32],
        out: &mut Vec<Sampled>,
    ) {
        out.clear();
        if seqs.is_empty() {
            return;
        }
        let v = logits.len() / seqs.len();
        for ((seq, ctx), row) in seqs.iter_mut().zip(logits.chunks_exact_mut(v)) {
            out.push(self.sample(seq, ctx, row));
        }
    }

    /// log softmax(logits)[token], for prompt log-probs.
    pub fn token_logprob(logits: &[f32], token: u32) -> f32 {
        logits[token as usize] - log_sum_exp(logits).1
    }

    /// Selection only: argmax for greedy, else temperature / top-k / top-p by partial
    /// selection.
    fn select(&mut self, logits: &[f32], max: f32, p: &SamplingParams, rng: &mut Rng) -> u32 {
        let v = logits.len();
        if p.temperature <= 0.0 || p.top_k == 1 || v <= 1 {
            return argmax(logits) as u32;
        }
        let inv_t = 1.0 / p.temperature;
        let weight = |i: u32| (((logits[i as usize] - max) * inv_t) as f64).exp();
        // Total mass of the candidate set: the whole vocabulary, or the top-k.
        let limit = if p.top_k > 0 { p.top_k.min(v) } else { v };
        self.idx.clear();
        self.idx.extend(0..v as u32);
        let better = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let total: f64 = if limit < v {
            self.idx.select_nth_unstable_by(limit - 1, better);
            self.idx.truncate(limit);
            self.idx.iter().map(|&i| weight(i)).sum()
        } else {
            logits
                .iter()
                .map(|&l| (((l - max) * inv_t) as f64).exp())
                .sum()
        };
        let u = rng.next_f64();
        let top_p = p.top_p as f64;
        // Grow the sorted prefix until it holds the top-p cut (or the whole set) and the point
        // u lands on; the answer then depends on that prefix only.
        let n = self.idx.len();
        let mut k = n.min(64);
        loop {
            if k < n {
                self.idx.select_nth_unstable_by(k - 1, better);
            }
            self.idx[..k].sort_unstable_by(better);
            self.cum.clear();
            let mut acc = 0.0;
            for &i in &self.idx[..k] {
                acc += weight(i) / total;
                self.cum.push(acc);
            }
            let full = k == n;
            // Kept set: the smallest prefix reaching top_p, or the whole candidate set.
            let (kept, kept_mass) = if top_p < 1.0 {
                match self.cum.iter().position(|&c| c >= top_p) {
                    Some(j) => (j + 1, self.cum[j]),
                    None if full => (k, acc),
                    None => {
                        k = (k * 4).min(n);
                        continue;
                    }
                }
            } else {
                (k, 1.0)
            };
            let target = u * kept_mass;
            if let Some(j) = self.cum[..kept].iter().position(|&c| target < c) {
                return self.idx[j];
            }
            if kept < k || full {
                // Rounding left the point past the last kept candidate: take that one.
                return self.idx[kept - 1];
            }
            k = (k * 4).min(n);
        }
    }

    /// The `n` largest logits as (id, log-prob), best first (ties by lower id).
    fn top_logprobs(&mut self, logits: &[f32], lse: f32, n: usize) -> Vec<(u32, f32)> {
        let v = logits.len();
        let n = n.min(v);
        self.idx.clear();
        self.idx.extend(0..v as u32);
        let better = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if n < v {
            self.idx.select_nth_unstable_by(n - 1, better);
        }
        self.idx[..n].sort_unstable_by(better);
        self.idx[..n]
            .iter()
            .map(|&i| (i, logits[i as usize] - lse))
            .collect()
    }
}

/// The largest value of a row (−∞ for an empty or all −∞ row).
fn max_of(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// (max, log Σ exp) of a row, in one pass after the max.
fn log_sum_exp(x: &[f32]) -> (f32, f32) {
    let max = max_of(x);
    if max == f32::NEG_INFINITY {
        return (max, max);
    }
    let s: f64 = x.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (max, max + s.ln() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardseek_kernels::sampling::reference::sample as reference_sample;
    use shardseek_kernels::softmax::log_softmax;

    fn logits(seed: u64, v: usize, spread: f32) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..v)
            .map(|_| (r.next_f64() as f32 - 0.5) * spread)
            .collect()
    }

    fn seq(sampling: SamplingParams, seed: u64, top: usize) -> SeqSampler {
        SeqSampler::new(SeqParams {
            sampling,
            seed,
            top_logprobs: top,
            token_logprob: true,
        })
    }

    const NO_CTX: SeqContext<'static> = SeqContext {
        prompt: &[],
        generated: &[],
    };

    #[test]
    fn same_tokens_as_the_full_sort_reference() {
        let mut s = Sampler::new();
        let cases = [
            (1.0, 0, 1.0),
            (0.7, 0, 0.9),
            (1.3, 50, 0.95),
            (1.0, 7, 1.0),
            (0.5, 0, 0.3),
            (2.0, 1000, 0.99),
        ];
        for (ci, &(temperature, top_k, top_p)) in cases.iter().enumerate() {
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
            };
            for (v, spread) in [(1, 1.0), (3, 4.0), (257, 8.0), (5003, 30.0), (5003, 2.0)] {
                let lg = logits(ci as u64 * 31 + v as u64, v, spread);
                let mut a = seq(p.clone(), 11, 0);
                let mut rb = Rng::new(11);
                for _ in 0..40 {
                    let mut row = lg.clone();
                    let got = s.sample(&mut a, &NO_CTX, &mut row).token;
                    let want = reference_sample(&lg, &p, &mut rb) as u32;
                    assert_eq!(got, want, "case {ci} v {v}");
                }
            }
        }
    }

    #[test]
    fn greedy_is_argmax_and_logprobs_match_log_softmax() {
        let mut s = Sampler::new();
        let lg = logits(3, 1001, 10.0);
        let lp = log_softmax(&lg);
        let mut q = seq(SamplingParams::default(), 0, 5);
        let mut row = lg.clone();
        let got = s.sample(&mut q, &NO_CTX, &mut row);
        assert_eq!(got.token as usize, argmax(&lg));
        assert!((got.logprob.unwrap() - lp[got.token as usize]).abs() < 1e-5);
        let mut order: Vec<usize> = (0..lg.len()).collect();
        order.sort_by(|&a, &b| lg[b].total_cmp(&lg[a]));
        assert_eq!(got.top.len(), 5);
        for (k, &(t, l)) in got.top.iter().enumerate() {
            assert_eq!(t as usize, order[k]);
            assert!((l - lp[order[k]]).abs() < 1e-5);
        }
        // Not asked for: not computed.
        let mut q = seq(SamplingParams::default(), 0, 0);
        assert!(s.sample(&mut q, &NO_CTX, &mut lg.clone()).top.is_empty());
        // No log-prob asked for at all: none is computed, and the token is the same, greedy or
        // sampled.
        for p in [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.7,
                top_k: 0,
                top_p: 0.9,
            },
        ] {
            let mut with = seq(p.clone(), 5, 0);
            let mut without = seq(p, 5, 0);
            without.params.token_logprob = false;
            for _ in 0..20 {
                let a = s.sample(&mut with, &NO_CTX, &mut lg.clone());
                let b = s.sample(&mut without, &NO_CTX, &mut lg.clone());
                assert_eq!(a.token, b.token);
                assert!(a.logprob.is_some());
                assert_eq!(b.logprob, None);
            }
        }
    }

    struct Ban(u32);
    impl LogitsProcessor for Ban {
        fn process(&mut self, ctx: &SeqContext<'_>, logits: &mut [f32]) {
            if ctx.generated.len() < 2 {
                logits[self.0 as usize] = f32::NEG_INFINITY;
            }
        }
    }

    #[test]
    fn processors_run_before_selection_with_the_history() {
        let mut s = Sampler::new();
        let lg = logits(5, 300, 6.0);
        let best = argmax(&lg) as u32;
        let mut q = seq(SamplingParams::default(), 0, 0);
        q.push_processor(Box::new(Ban(best)));
        let gen0: [u32; 0] = [];
        let ctx = SeqContext {
            prompt: &[1, 2],
            generated: &gen0,
        };
        let first = s.sample(&mut q, &ctx, &mut lg.clone());
        assert_ne!(first.token, best, "banned token chosen");
        let ctx = SeqContext {
            prompt: &[1, 2],
            generated: &[4, 5],
        };
        assert_eq!(s.sample(&mut q, &ctx, &mut lg.clone()).token, best);
    }

    #[test]
    fn batch_rows_use_their_own_state() {
        let mut s = Sampler::new();
        let v = 97;
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let mut a = seq(p.clone(), 1, 0);
        let mut b = seq(SamplingParams::default(), 2, 0);
        let mut lg = logits(9, v, 5.0);
        lg.extend(logits(10, v, 5.0));
        let mut out = Vec::new();
        let mut rows = lg.clone();
        s.sample_batch(
            &mut [(&mut a, NO_CTX), (&mut b, NO_CTX)],
            &mut rows,
            &mut out,
        );
        let mut ra = Rng::new(1);
        assert_eq!(
            out[0].token as usize,
            reference_sample(&lg[..v], &p, &mut ra)
        );
        assert_eq!(out[1].token as usize, argmax(&lg[v..]));
    }
}
