//! DeepSeek-V3's `noaux_tc` router: sigmoid scores, `e_score_correction_bias` added for the
//! choice only, group-limited top-k, weights renormalised and scaled.
//!
//! Follows transformers' `DeepseekV3TopkRouter` exactly, including its detail that experts of
//! discarded groups get a choice score of 0.0 (not −∞).

/// Router hyper-parameters from config.json.
#[derive(Clone, Debug)]
pub struct GateParams {
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Chosen experts of one token with their combine weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// Routes one token given its router logits (one per expert) and the correction bias.
pub fn noaux_tc(logits: &[f32], bias: &[f32], p: &GateParams) -> Routing {
    let mut out = Routing {
        experts: Vec::with_capacity(p.top_k),
        weights: Vec::with_capacity(p.top_k),
    };
    noaux_tc_into(logits, bias, p, &mut GateScratch::default(), &mut out);
    out
}

/// Working memory of [`noaux_tc_into`], kept by the caller so routing allocates nothing once
/// it has seen the expert count.
#[derive(Clone, Debug, Default)]
pub struct GateScratch {
    scores: Vec<f32>,
    choice: Vec<f32>,
    groups: Vec<(usize, f32)>,
    keep: Vec<bool>,
    cand: Vec<(usize, f32)>,
}

/// [`noaux_tc`] into `out` (its vectors are cleared and refilled), with the caller's scratch.
/// Every sort is by a total order (score, then index), so the unstable, allocation-free sorts
/// pick exactly what a stable sort would.
pub fn noaux_tc_into(
    logits: &[f32],
    bias: &[f32],
    p: &GateParams,
    sc: &mut GateScratch,
    out: &mut Routing,
) {
    let e = logits.len();
    sc.scores.clear();
    sc.scores
        .extend(logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())));
    sc.choice.clear();
    sc.choice
        .extend(sc.scores.iter().zip(bias).map(|(s, b)| s + b));
    let per_group = e / p.n_group.max(1);
    // Group score: sum of the group's two best choice scores.
    sc.groups.clear();
    for g in 0..p.n_group {
        // The two largest under `total_cmp`, as the first two of a descending sort.
        let (mut first, mut second): (Option<f32>, Option<f32>) = (None, None);
        for &c in &sc.choice[g * per_group..(g + 1) * per_group] {
            if first.is_none_or(|f| c.total_cmp(&f).is_gt()) {
                second = first;
                first = Some(c);
            } else if second.is_none_or(|s| c.total_cmp(&s).is_gt()) {
                second = Some(c);
            }
        }
        let score: f32 = first.into_iter().chain(second).sum();
        sc.groups.push((g, score));
    }
    sc.groups
        .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    sc.keep.clear();
    sc.keep.resize(p.n_group, false);
    for &(g, _) in sc.groups.iter().take(p.topk_group) {
        sc.keep[g] = true;
    }
    sc.cand.clear();
    sc.cand.extend((0..e).map(|i| {
        (
            i,
            if sc.keep[i / per_group.max(1)] {
                sc.choice[i]
            } else {
                0.0
            },
        )
    }));
    sc.cand
        .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.experts.clear();
    out.experts
        .extend(sc.cand.iter().take(p.top_k).map(|c| c.0));
    out.weights.clear();
    out.weights
        .extend(out.experts.iter().map(|&i| sc.scores[i]));
    if p.norm_topk_prob {
        let denom: f32 = out.weights.iter().sum::<f32>() + 1e-20;
        for w in out.weights.iter_mut() {
            *w /= denom;
        }
    }
    for w in out.weights.iter_mut() {
        *w *= p.routed_scaling_factor;
    }
}
