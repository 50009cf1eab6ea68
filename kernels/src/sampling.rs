//! Token sampling primitives: the seeded generator (a request with a seed is reproducible),
//! argmax, the parameters, and the full-sort [`reference::sample`] the engine's sampler is
//! tested against.

/// SplitMix64: small, fast, and good enough for sampling; seeded per request.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// How to pick the next token. `temperature == 0` is greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The plain reference sampler: sorts the whole vocabulary. Serving uses the engine's
/// sampler (partial selection, same draw rule); tests compare the two.
pub mod reference {
    use super::*;

    /// Samples one token id from `logits`.
    pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> usize {
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|c| (((c.1 - max) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for q in probs.iter_mut() {
            *q /= total;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let total: f64 = probs.iter().sum();
            for q in probs.iter_mut() {
                *q /= total;
            }
        }
        let u = rng.next_f64();
        let mut acc = 0.0;
        for (c, q) in cand.iter().zip(&probs) {
            acc += q;
            if u < acc {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}
