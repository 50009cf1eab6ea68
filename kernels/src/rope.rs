//! Rotary position embedding, interleaved (pairwise) form, with YaRN frequency scaling.
//!
//! DeepSeek-V3 rotates the pairs (x[2i], x[2i+1]) by angle pos·θᵢ. Hugging Face's
//! `apply_rotary_pos_emb_interleave` de-interleaves first and rotates halves; that is the same
//! rotation with the output permuted, and since q and k get the same permutation, their dot
//! products — all attention ever uses — are identical. We keep the pairwise layout.
//!
//! YaRN follows transformers' `_compute_yarn_parameters`: frequencies blend interpolation and
//! extrapolation with a linear ramp between the correction dims of `beta_fast`/`beta_slow`, and
//! cos/sin are multiplied by `attention_factor` (mscale(factor, mscale)/mscale(factor, mscale_all_dim)).

/// YaRN parameters as in `rope_scaling` of config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Explicit `attention_factor` overrides the mscale ratio.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dims (transformers' default `truncate: true`).
    pub truncate: bool,
}

/// YaRN's magnitude correction: 0.1 · m · ln(s) + 1 for s > 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Precomputed inverse frequencies of one rotary dimension.
#[derive(Clone, Debug)]
pub struct Rope {
    /// θᵢ for i in 0..dim/2, rounded to f32 as the reference computes them.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (1 without YaRN).
    pub attention_factor: f32,
}

impl Rope {
    pub fn new(dim: usize, base: f64, yarn: Option<&Yarn>) -> Self {
        let half = dim / 2;
        // pos_freqs = base^(2i/dim), computed in f32 as torch does.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        let Some(y) = yarn else {
            return Self {
                inv_freq: pos_freqs.iter().map(|p| 1.0 / p).collect(),
                attention_factor: 1.0,
            };
        };
        let factor = y.factor;
        let attention_factor = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                yarn_get_mscale(factor, m) / yarn_get_mscale(factor, ma)
            }
            _ => yarn_get_mscale(factor, 1.0),
        };
        let corr = |rot: f64| {
            (dim as f64
                * (y.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI))
                    .ln())
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (corr(y.beta_fast), corr(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let inv_freq = (0..half)
            .map(|i| {
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extra_factor = 1.0 - ramp;
                let extra = 1.0 / pos_freqs[i];
                let inter = 1.0 / (factor as f32 * pos_freqs[i]);
                inter * (1.0 - extra_factor) + extra * extra_factor
            })
            .collect();
        Self {
            inv_freq,
            attention_factor: attention_factor as f32,
        }
    }

    /// Rotates one vector of `2·inv_freq.len()` values at position `pos`, in place.
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let p = pos as f32;
        for (i, pair) in x.chunks_exact_mut(2).enumerate() {
            let ang = (self.inv_freq[i] * p) as f64;
            let (s, c) = ang.sin_cos();
            let (c, s) = (
                c as f32 * self.attention_factor,
                s as f32 * self.attention_factor,
            );
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = b * c + a * s;
        }
    }

    /// [`Rope::apply`] to the vectors at `off..off + 2·inv_freq.len()` of each of the `heads`
    /// rows of `stride` values in `x`, all at position `pos`: each angle's sine and cosine are
    /// computed once for every head (they were a visible share of a decode step when computed
    /// per head), and every head gets exactly the values [`Rope::apply`] would give it.
    pub fn apply_heads(&self, x: &mut [f32], heads: usize, stride: usize, off: usize, pos: usize) {
        let p = pos as f32;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let (s, c) = ((f * p) as f64).sin_cos();
            let (c, s) = (
                c as f32 * self.attention_factor,
                s as f32 * self.attention_factor,
            );
            for h in 0..heads {
                let j = h * stride + off + 2 * i;
                let (a, b) = (x[j], x[j + 1]);
                x[j] = a * c - b * s;
                x[j + 1] = b * c + a * s;
            }
        }
    }
}
