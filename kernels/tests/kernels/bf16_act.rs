//! bf16 activations (`Activations::Bf16`) against the f64 reference.
//!
//! What the path computes is exactly y = bf16(x)·Wᵀ in f32: x rounded to bf16 (nearest even),
//! the weights' stored values (exact in bf16: FP8 codes, BF16), products exact in f32, f32
//! sums, the FP8 block scale applied per 128 columns. So the first bound is the f32 paths'
//! own, 1e-5·‖ref‖, against the reference fed the rounded x. Against the exact reference the
//! rounding of x (relative ≤ 2⁻⁸ per product) is the whole difference: the second bound is
//! 2⁻⁸·‖ref‖ for one GEMM and 2⁻⁷ for the expert FFN (two rounded inputs, x and h). Every
//! row count is covered: the bf16 tiles (x in one bf16 part) up to `PAIRS_MIN_M` rows, the
//! packed pair tiles beyond.

use super::common::*;
use shardseek_kernels::cpu::Isa;
use shardseek_kernels::fp8::{bf16_to_f32, f32_to_bf16};
use shardseek_kernels::gemm::{self, Activations, Compute, Epilogue, PAIRS_MIN_M, reference};
use shardseek_kernels::moe::{self, Combine};
use shardseek_kernels::sampling::Rng;

const TOL: f64 = 1e-5;
const ONE_ROUNDING: f64 = 1.0 / 256.0;

fn bf16_compute() -> Option<Compute> {
    if !Isa::Avx512Bf16.available() {
        eprintln!("skipped: this CPU has no AVX512-BF16, the only path of bf16 activations");
        return None;
    }
    Some(Compute::new(Isa::Avx512Bf16, Activations::Bf16).unwrap())
}

fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect()
}

#[test]
fn bf16_activations_refused_without_the_instructions() {
    for isa in [Isa::Avx512, Isa::Avx2Fma, Isa::Portable] {
        let e = Compute::new(isa, Activations::Bf16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("AVX512-BF16"), "{e}");
        assert!(Compute::new(isa, Activations::F32).is_ok());
    }
    assert_eq!("bf16".parse::<Activations>().unwrap(), Activations::Bf16);
    assert!(
        "fp16"
            .parse::<Activations>()
            .unwrap_err()
            .to_string()
            .contains("f32 or bf16")
    );
}

/// Odd shapes around every edge of the pair tiles: rows of x around the 6-row panel and
/// PAIRS_MIN_M, odd k (a half-empty last pair), k past one 256-column block and a 128-column
/// scale block, weight rows crossing a 128-row scale block mid-tile, and the last tile 16 < nr < 32.
#[test]
fn matmul_is_exactly_rounded_x_times_w() {
    let Some(c) = bf16_compute() else { return };
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for &(m, n, k) in &[
            (1, 130, 300),
            (PAIRS_MIN_M + 1, 77, 129),
            (7, 200, 385),
            (13, 144, 260),
            (40, 33, 131),
            (50, 500, 300),
            (97, 170, 513),
            // 48-column tasks on two threads: the tile at 240..272 crosses row block 2.
            (40, 384, 300),
        ] {
            for kind in KINDS {
                let w = OwnedWeight::random(&mut rng, n, k, kind);
                let x = randv(&mut rng, m * k);
                let exact = reference::matmul(&x, m, &w.view());
                // F16 and F32 weights are not served by the pair tiles: they stay exact.
                let want = match kind {
                    Kind::Fp8 | Kind::Bf16 => reference::matmul(&rounded(&x), m, &w.view()),
                    Kind::F16 | Kind::F32 => exact.clone(),
                };
                let mut y = vec![f32::NAN; m * n];
                gemm::matmul_with(c, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
                let e = rel_err(&y, &want);
                assert!(e < TOL, "{kind:?} m={m} n={n} k={k}: {e} against rounded x");
                let e = rel_err(&y, &exact);
                assert!(
                    e < ONE_ROUNDING,
                    "{kind:?} m={m} n={n} k={k}: {e} against exact"
                );
                if matches!(kind, Kind::Fp8 | Kind::Bf16) {
                    assert!(e > 1e-6, "{kind:?} m={m}: x was not rounded ({e})");
                }
            }
        }
    }
}

#[test]
fn accumulate_and_silu_mul_with_bf16_activations() {
    let Some(c) = bf16_compute() else { return };
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for &(m, n, k) in &[(5, 96, 200), (17, 130, 257), (70, 40, 300)] {
            let g = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
            let u = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
            let x = randv(&mut rng, m * k);
            let xr = rounded(&x);
            let s = randv(&mut rng, m);
            let y0 = randv(&mut rng, m * n);
            let r = reference::matmul(&xr, m, &g.view());
            let want: Vec<f32> = (0..m * n).map(|i| y0[i] + s[i / n] * r[i]).collect();
            let want_sm = reference::silu_mul(&xr, m, &g.view(), &u.view());
            let mut y = y0.clone();
            let ep = Epilogue::Accumulate {
                row_scale: Some(&s),
            };
            gemm::matmul_with(c, &x, m, &g.view(), ep, &mut y).unwrap();
            assert!(rel_err(&y, &want) < TOL, "acc m={m}");
            let mut y = vec![0f32; m * n];
            gemm::silu_mul_with(c, &x, m, &g.view(), &u.view(), &mut y).unwrap();
            assert!(rel_err(&y, &want_sm) < TOL, "silu m={m}");
        }
    }
}

/// Every row count from 1 past the switch to the pair tiles, both tile kinds.
#[test]
fn every_row_count_rounds_x() {
    let Some(c) = bf16_compute() else { return };
    let mut rng = Rng::new(11);
    for m in 1..=PAIRS_MIN_M + 7 {
        for kind in [Kind::Fp8, Kind::Bf16] {
            let w = OwnedWeight::random(&mut rng, 70, 300, kind);
            let x = randv(&mut rng, m * 300);
            let want = reference::matmul(&rounded(&x), m, &w.view());
            let mut y = vec![0f32; m * 70];
            gemm::matmul_with(c, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
            assert!(rel_err(&y, &want) < TOL, "{kind:?} m={m}");
        }
    }
}

#[test]
fn grouped_ffn_with_bf16_activations() {
    let Some(c) = bf16_compute() else { return };
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        let (hidden, inter) = (200, 136);
        let owned = random_experts(&mut rng, 4, hidden, inter, 2);
        let experts = expert_views(&owned);
        let sizes = [(3, 1), (0, 40), (2, 9), (1, 2)];
        let (groups, r) = groups_of(&sizes);
        let x = randv(&mut rng, r * hidden);
        let w = randv(&mut rng, r);
        let mut want = vec![0f32; r * hidden];
        moe::reference::grouped_ffn(
            &x,
            hidden,
            &groups,
            &experts,
            Some(&w),
            Combine::Store,
            &mut want,
        );
        let mut y = vec![0f32; r * hidden];
        moe::grouped_ffn_with(
            c,
            &x,
            hidden,
            &groups,
            &experts,
            Some(&w),
            Combine::Store,
            &mut y,
        )
        .unwrap();
        for g in &groups {
            let rows = g.rows.start * hidden..g.rows.end * hidden;
            let e = rel_err(&y[rows.clone()], &want[rows]);
            assert!(
                e < 2.0 * ONE_ROUNDING && e > 1e-6,
                "{} rows: {e}",
                g.rows.len()
            );
        }
    }
}
