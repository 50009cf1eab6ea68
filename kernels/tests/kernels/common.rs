//! Random inputs and error measures shared by the tests.

use shardseek_kernels::fp8::{f32_to_bf16, f32_to_e4m3};
use shardseek_kernels::sampling::Rng;
use shardseek_kernels::weight::FP8_BLOCK;
use shardseek_kernels::{Weight, WeightData};

pub const SEEDS: [u64; 3] = [1, 7, 2024];

/// Uniform in [-1, 1).
pub fn randv(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

/// ‖a − b‖ / ‖b‖ (b the reference).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Owned bytes of a weight in every stored dtype.
pub struct OwnedWeight {
    pub rows: usize,
    pub cols: usize,
    pub bytes: Vec<u8>,
    pub scales: Vec<f32>,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Fp8,
    Bf16,
    F16,
    F32,
}

pub const KINDS: [Kind; 4] = [Kind::Fp8, Kind::Bf16, Kind::F16, Kind::F32];

impl OwnedWeight {
    /// Random weight; FP8 codes are those of random values in [-448, 448] (never NaN),
    /// scales random in [1e-3, 2e-3] so dequantised values are O(1).
    pub fn random(rng: &mut Rng, rows: usize, cols: usize, kind: Kind) -> Self {
        let vals = randv(rng, rows * cols);
        let mut scales = Vec::new();
        let bytes = match kind {
            Kind::Fp8 => {
                scales = (0..rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK))
                    .map(|_| (1e-3 + 1e-3 * rng.next_f64()) as f32)
                    .collect();
                vals.iter().map(|v| f32_to_e4m3(v * 448.0)).collect()
            }
            Kind::Bf16 => vals
                .iter()
                .flat_map(|v| f32_to_bf16(*v).to_le_bytes())
                .collect(),
            Kind::F16 => vals
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            Kind::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        Self {
            rows,
            cols,
            bytes,
            scales,
            kind,
        }
    }

    /// A view whose bytes start at an odd address, as an mmapped tensor may.
    pub fn view(&self) -> Weight<'_> {
        let data = match self.kind {
            Kind::Fp8 => WeightData::Fp8E4m3 {
                q: &self.bytes,
                scale_inv: &self.scales,
            },
            Kind::Bf16 => WeightData::Bf16(&self.bytes),
            Kind::F16 => WeightData::F16(&self.bytes),
            Kind::F32 => WeightData::F32(&self.bytes),
        };
        Weight::new(self.rows, self.cols, data).expect("consistent shape")
    }
}

/// Copies `v` to an allocation at an odd byte offset so kernels see unaligned weights.
pub fn misalign(v: &[u8]) -> (Vec<u8>, usize) {
    let mut b = vec![0u8; v.len() + 1];
    b[1..].copy_from_slice(v);
    (b, 1)
}

/// `n` random experts (gate, up: `[inter, hidden]`; down: `[hidden, inter]`), FP8 except
/// expert `bf16_at`, which is BF16.
pub fn random_experts(
    rng: &mut Rng,
    n: usize,
    hidden: usize,
    inter: usize,
    bf16_at: usize,
) -> Vec<[OwnedWeight; 3]> {
    (0..n)
        .map(|e| {
            let kind = if e == bf16_at { Kind::Bf16 } else { Kind::Fp8 };
            [
                OwnedWeight::random(rng, inter, hidden, kind),
                OwnedWeight::random(rng, inter, hidden, kind),
                OwnedWeight::random(rng, hidden, inter, kind),
            ]
        })
        .collect()
}

/// The kernels' view of [`random_experts`].
pub fn expert_views(owned: &[[OwnedWeight; 3]]) -> Vec<shardseek_kernels::moe::ExpertWeights<'_>> {
    owned
        .iter()
        .map(|[g, u, d]| shardseek_kernels::moe::ExpertWeights {
            gate: g.view(),
            up: u.view(),
            down: d.view(),
        })
        .collect()
}

/// Consecutive row groups of the given (expert, rows) sizes, and the rows they cover.
pub fn groups_of(sizes: &[(usize, usize)]) -> (Vec<shardseek_kernels::moe::Group>, usize) {
    let mut groups = Vec::new();
    let mut r = 0;
    for &(e, n) in sizes {
        groups.push(shardseek_kernels::moe::Group {
            expert: e,
            rows: r..r + n,
        });
        r += n;
    }
    (groups, r)
}
