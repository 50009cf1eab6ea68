//! RMSNorm, RoPE (with YaRN), the noaux_tc gate, softmax and sampling against independent
//! f64 references on random inputs.

use super::common::*;
use shardseek_kernels::gate::{GateParams, GateScratch, Routing, noaux_tc, noaux_tc_into};
use shardseek_kernels::norm::{self, rms_norm_inplace};
use shardseek_kernels::rope::{Rope, Yarn, yarn_get_mscale};
use shardseek_kernels::sampling::reference::sample;
use shardseek_kernels::sampling::{Rng, SamplingParams, argmax};
use shardseek_kernels::softmax::{log_softmax, softmax_inplace};

#[test]
fn rms_norm_matches_reference() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for &(rows, d) in &[(1, 7), (3, 129), (17, 2048)] {
            let x = randv(&mut rng, rows * d);
            let w = randv(&mut rng, d);
            let mut y = x.clone();
            rms_norm_inplace(&mut y, &w, 1e-6).unwrap();
            let want: Vec<f32> = x
                .chunks(d)
                .flat_map(|r| norm::reference::rms_norm(r, &w, 1e-6))
                .collect();
            assert!(rel_err(&y, &want) < 1e-5);
        }
    }
    assert!(rms_norm_inplace(&mut [0.0; 5], &[1.0; 2], 1e-6).is_err());
}

/// YaRN inverse frequencies from the formula in f64 (transformers' _compute_yarn_parameters).
fn yarn_inv_freq(dim: usize, base: f64, y: &Yarn) -> Vec<f64> {
    let corr = |rot: f64| {
        dim as f64
            * (y.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let low = corr(y.beta_fast).floor().max(0.0);
    let high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
    (0..dim / 2)
        .map(|i| {
            let pf = base.powf(2.0 * i as f64 / dim as f64);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extra = 1.0 - ramp;
            (1.0 / (y.factor * pf)) * (1.0 - extra) + (1.0 / pf) * extra
        })
        .collect()
}

#[test]
fn rope_yarn_matches_reference() {
    let y = Yarn {
        factor: 40.0,
        original_max_position_embeddings: 4096,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: Some(1.0),
        mscale_all_dim: Some(1.0),
        attention_factor: None,
        truncate: true,
    };
    let rope = Rope::new(64, 10000.0, Some(&y));
    let want = yarn_inv_freq(64, 10000.0, &y);
    for (a, b) in rope.inv_freq.iter().zip(&want) {
        assert!((*a as f64 - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    }
    assert_eq!(rope.attention_factor, 1.0);
    assert!((yarn_get_mscale(40.0, 1.0) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
    let mut rng = Rng::new(9);
    for pos in [0usize, 1, 63, 64, 65, 1000, 163_839] {
        let x = randv(&mut rng, 64);
        let mut got = x.clone();
        rope.apply(&mut got, pos);
        let mut exp = Vec::new();
        for (i, pair) in x.chunks(2).enumerate() {
            // The angle is the f32 product θᵢ·pos, as in the reference implementations
            // (torch computes inv_freq ⊗ positions in float32); sin/cos then in f64.
            let ang = (pos as f32 * rope.inv_freq[i]) as f64;
            let (s, c) = ang.sin_cos();
            let (a, b) = (pair[0] as f64, pair[1] as f64);
            exp.push((a * c - b * s) as f32);
            exp.push((b * c + a * s) as f32);
        }
        assert!(rel_err(&got, &exp) < 1e-5, "pos {pos}");
    }
}

/// Rotating every head of a row at once gives each head exactly what rotating it alone gives,
/// and leaves the values outside the rotated range alone (odd head count, stride and offset).
#[test]
fn rope_apply_heads_equals_per_head_apply() {
    let rope = Rope::new(16, 10000.0, None);
    let (heads, stride, off) = (5, 27, 9);
    let mut rng = Rng::new(3);
    for pos in [0usize, 7, 4097] {
        let x = randv(&mut rng, heads * stride);
        let mut want = x.clone();
        for h in 0..heads {
            rope.apply(&mut want[h * stride + off..h * stride + off + 16], pos);
        }
        let mut got = x.clone();
        rope.apply_heads(&mut got, heads, stride, off, pos);
        assert_eq!(got, want, "pos {pos}");
    }
}

/// The router from its definition, in f64 and with plain loops.
fn gate_reference(logits: &[f32], bias: &[f32], p: &GateParams) -> (Vec<usize>, Vec<f64>) {
    let e = logits.len();
    let s: Vec<f64> = logits
        .iter()
        .map(|&l| 1.0 / (1.0 + (-(l as f64)).exp()))
        .collect();
    let c: Vec<f64> = s.iter().zip(bias).map(|(s, &b)| s + b as f64).collect();
    let per = e / p.n_group;
    let gscore: Vec<f64> = (0..p.n_group)
        .map(|g| {
            let mut v = c[g * per..(g + 1) * per].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            v.iter().take(2).sum()
        })
        .collect();
    let mut keep = vec![false; p.n_group];
    for _ in 0..p.topk_group {
        let best = (0..p.n_group)
            .filter(|&g| !keep[g])
            .fold(None, |b: Option<usize>, g| match b {
                Some(x) if gscore[x] >= gscore[g] => Some(x),
                _ => Some(g),
            })
            .unwrap();
        keep[best] = true;
    }
    let mut masked: Vec<f64> = (0..e)
        .map(|i| if keep[i / per] { c[i] } else { 0.0 })
        .collect();
    let mut experts = Vec::new();
    for _ in 0..p.top_k {
        let mut best = 0;
        for i in 1..e {
            if masked[i] > masked[best] {
                best = i;
            }
        }
        experts.push(best);
        masked[best] = f64::NEG_INFINITY;
    }
    let sum: f64 = experts.iter().map(|&i| s[i]).sum();
    let w = experts
        .iter()
        .map(|&i| {
            let v = if p.norm_topk_prob {
                s[i] / (sum + 1e-20)
            } else {
                s[i]
            };
            v * p.routed_scaling_factor as f64
        })
        .collect();
    (experts, w)
}

#[test]
fn gate_matches_reference() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for (e, n_group, topk_group, top_k, norm) in [
            (256, 8, 4, 8, true),
            (64, 4, 2, 6, false),
            (16, 1, 1, 2, true),
        ] {
            let p = GateParams {
                n_group,
                topk_group,
                top_k,
                norm_topk_prob: norm,
                routed_scaling_factor: 2.5,
            };
            for _ in 0..20 {
                let logits: Vec<f32> = randv(&mut rng, e).iter().map(|v| v * 4.0).collect();
                let bias: Vec<f32> = randv(&mut rng, e).iter().map(|v| v * 0.1).collect();
                let r = noaux_tc(&logits, &bias, &p);
                let (want_e, want_w) = gate_reference(&logits, &bias, &p);
                assert_eq!(r.experts, want_e);
                for (a, b) in r.weights.iter().zip(&want_w) {
                    assert!((*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0));
                }
            }
        }
    }
}

/// One scratch and one output reused across expert counts (as the model's routing buffers
/// are) give what fresh ones give, and ties (many equal logits) go to the lowest index, as
/// the reference's (and a stable sort's) order does.
#[test]
fn gate_into_reuses_buffers_and_breaks_ties_by_index() {
    let mut sc = GateScratch::default();
    let mut out = Routing {
        experts: Vec::new(),
        weights: Vec::new(),
    };
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for (e, n_group, topk_group, top_k) in [(64, 4, 2, 6), (256, 8, 4, 8), (16, 1, 1, 2)] {
            let p = GateParams {
                n_group,
                topk_group,
                top_k,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
            };
            for _ in 0..20 {
                // Three distinct values only (0, 1, 2: their sigmoids' pair sums are distinct,
                // so a tie is a tie in f32 and f64 alike): most experts and groups tie.
                let logits: Vec<f32> = randv(&mut rng, e)
                    .iter()
                    .map(|v| (v + 1.0).round())
                    .collect();
                let bias = vec![0f32; e];
                noaux_tc_into(&logits, &bias, &p, &mut sc, &mut out);
                let (want_e, want_w) = gate_reference(&logits, &bias, &p);
                assert_eq!(out.experts, want_e, "logits {logits:?}");
                for (a, b) in out.weights.iter().zip(&want_w) {
                    assert!((*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0));
                }
                assert_eq!(out, noaux_tc(&logits, &bias, &p));
            }
        }
    }
}

#[test]
fn softmax_matches_reference() {
    let mut rng = Rng::new(4);
    for n in [1usize, 3, 17, 1000, 129_280] {
        let x: Vec<f32> = randv(&mut rng, n).iter().map(|v| v * 30.0).collect();
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| ((v as f64 - m).exp() / z) as f32)
            .collect();
        let want_log: Vec<f32> = x.iter().map(|&v| (v as f64 - m - z.ln()) as f32).collect();
        let mut y = x.clone();
        softmax_inplace(&mut y);
        assert!(rel_err(&y, &want) < 1e-5, "n {n}");
        assert!(rel_err(&log_softmax(&x), &want_log) < 1e-5, "n {n}");
    }
}

#[test]
fn sampling_is_seeded_and_respects_filters() {
    let logits = [1.0f32, 3.0, 2.0, 0.5, 2.9];
    assert_eq!(argmax(&logits), 1);
    let greedy = SamplingParams::default();
    assert_eq!(sample(&logits, &greedy, &mut Rng::new(1)), 1);
    let p = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let draw = |seed| {
        let mut r = Rng::new(seed);
        (0..50)
            .map(|_| sample(&logits, &p, &mut r))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
    // top-k 2 only ever yields the two largest.
    let pk = SamplingParams {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
    };
    let mut r = Rng::new(5);
    for _ in 0..500 {
        let t = sample(&logits, &pk, &mut r);
        assert!(t == 1 || t == 4);
    }
    // top-p 0.5: the smallest prefix reaching 0.5 is {1, 4}.
    let pp = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.5,
    };
    for _ in 0..500 {
        let t = sample(&logits, &pp, &mut r);
        assert!(t == 1 || t == 4);
    }
    // Frequencies follow the softmax at temperature 1 (20k draws: σ ≤ 0.0036 per token).
    let mut want = logits.to_vec();
    softmax_inplace(&mut want);
    let mut counts = [0usize; 5];
    for _ in 0..20_000 {
        counts[sample(&logits, &p, &mut r)] += 1;
    }
    for (c, w) in counts.iter().zip(&want) {
        assert!(
            (*c as f32 / 20_000.0 - w).abs() < 0.02,
            "{counts:?} vs {want:?}"
        );
    }
}
