//! Block-scaled GEMM against the f64 reference: every instruction-set path, decode and prefill
//! shapes, every weight dtype, unaligned weight bytes, and the fused epilogues.
//! Bounds ([`assert_close`]): the f32 paths ‖y − ref‖ ≤ 1e-5·‖ref‖; the bf16 path of FP8
//! weights on `Isa::Avx512Bf16` |y_j − ref_j| ≤ 2⁻¹⁵·Σ_c |x_c·W_jc| per element.

use super::common::*;
use shardseek_kernels::cpu::{Isa, isa};
use shardseek_kernels::gemm::{self, Epilogue, reference};
use shardseek_kernels::sampling::Rng;
use shardseek_kernels::{Weight, WeightData};

const TOL: f64 = 1e-5;

/// Per-element bound of the bf16 path, relative to Σ_c |x_c·W_jc|: x is split into bf16
/// hi + lo with |x − hi − lo| ≤ 2⁻¹⁶|x| (bf16 keeps 8 significant bits, so each rounding is
/// within 2⁻⁸ of its input); e4m3 weights are exact in bf16 and the bf16 products exact in
/// f32, so the split contributes at most 2⁻¹⁶·Σ|x·W|; the other half of 2⁻¹⁵ covers the f32
/// accumulation.
const BF16_PATH_TOL: f64 = 1.0 / 32768.0;
/// ‖y − ref‖/‖ref‖ bound of the bf16 path where a nonlinearity follows the product (SiLU·mul):
/// random data keep the per-element bound's Σ|x·W| within 4× |ref| on average (k ≤ 300 here),
/// so 4·2⁻¹⁵ ≈ 1.2e-4.
const BF16_L2_TOL: f64 = 4.0 / 32768.0;

fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

/// Whether `isa` runs `w` on the bf16 path.
fn bf16_path(isa: Isa, w: &Weight) -> bool {
    isa == Isa::Avx512Bf16 && matches!(w.data, WeightData::Fp8E4m3 { .. })
}

/// Asserts y (`[m, n]`) is within the bound of the path that computed it (module doc);
/// `scale` multiplies row i of the exact product in `want` (1 for a plain matmul).
fn assert_close(isa: Isa, x: &[f32], m: usize, w: &Weight, y: &[f32], want: &[f32], what: &str) {
    if !bf16_path(isa, w) {
        let e = rel_err(y, want);
        assert!(e < TOL, "{isa:?} {what}: {e}");
        return;
    }
    let (n, k) = (w.rows, w.cols);
    for j in 0..n {
        let row: Vec<f64> = (0..k).map(|c| w.get(j, c) as f64).collect();
        for i in 0..m {
            let mag: f64 = (0..k).map(|c| (x[i * k + c] as f64 * row[c]).abs()).sum();
            let d = (y[i * n + j] as f64 - want[i * n + j] as f64).abs();
            assert!(
                d <= BF16_PATH_TOL * mag + 1e-30,
                "{isa:?} {what}: row {i} col {j}: |Δ| {d:e} > 2^-15 · {mag:e}"
            );
        }
    }
}

#[test]
fn matmul_matches_reference_all_dtypes_and_shapes() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for &(m, n, k) in &[(1, 130, 300), (3, 77, 129), (17, 200, 385), (40, 33, 260)] {
            for kind in KINDS {
                let w = OwnedWeight::random(&mut rng, n, k, kind);
                let x = randv(&mut rng, m * k);
                let want = reference::matmul(&x, m, &w.view());
                for isa in isas() {
                    let mut y = vec![f32::NAN; m * n];
                    gemm::matmul_with(isa, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
                    let what = format!("{kind:?} m={m} n={n} k={k}");
                    assert_close(isa, &x, m, &w.view(), &y, &want, &what);
                }
            }
        }
    }
}

#[test]
fn unaligned_weight_bytes() {
    let mut rng = Rng::new(5);
    let (m, n, k) = (3, 50, 257);
    for kind in [Kind::Bf16, Kind::F32, Kind::Fp8] {
        let w = OwnedWeight::random(&mut rng, n, k, kind);
        let (buf, off) = misalign(&w.bytes);
        let bytes = &buf[off..];
        let data = match kind {
            Kind::Fp8 => WeightData::Fp8E4m3 {
                q: bytes,
                scale_inv: &w.scales,
            },
            Kind::Bf16 => WeightData::Bf16(bytes),
            _ => WeightData::F32(bytes),
        };
        let wv = Weight::new(n, k, data).unwrap();
        let x = randv(&mut rng, m * k);
        let want = reference::matmul(&x, m, &w.view());
        for mm in [m, 20] {
            let x = &randv(&mut rng, mm * k);
            let want2 = reference::matmul(x, mm, &wv);
            let mut y = vec![0f32; mm * n];
            gemm::matmul(x, mm, &wv, &mut y).unwrap();
            assert_close(isa(), x, mm, &wv, &y, &want2, &format!("{kind:?} m={mm}"));
        }
        let mut y = vec![0f32; m * n];
        gemm::matmul(&x, m, &wv, &mut y).unwrap();
        assert_close(isa(), &x, m, &wv, &y, &want, &format!("{kind:?}"));
    }
}

#[test]
fn accumulate_and_silu_mul_epilogues() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        for &(m, n, k) in &[(1, 96, 200), (3, 130, 128), (17, 40, 300)] {
            let g = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
            let u = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
            let x = randv(&mut rng, m * k);
            let s = randv(&mut rng, m);
            let y0 = randv(&mut rng, m * n);
            let r = reference::matmul(&x, m, &g.view());
            let want: Vec<f32> = (0..m * n).map(|i| y0[i] + s[i / n] * r[i]).collect();
            let want_sm = reference::silu_mul(&x, m, &g.view(), &u.view());
            for isa in isas() {
                let mut y = y0.clone();
                let ep = Epilogue::Accumulate {
                    row_scale: Some(&s),
                };
                gemm::matmul_with(isa, &x, m, &g.view(), ep, &mut y).unwrap();
                if bf16_path(isa, &g.view()) {
                    // Undo the epilogue, then hold the product to the path's bound.
                    let got: Vec<f32> = (0..m * n).map(|i| (y[i] - y0[i]) / s[i / n]).collect();
                    assert_close(isa, &x, m, &g.view(), &got, &r, &format!("acc m={m}"));
                } else {
                    assert!(rel_err(&y, &want) < TOL, "{isa:?} acc m={m}");
                }
                let mut y = vec![0f32; m * n];
                gemm::silu_mul_with(isa, &x, m, &g.view(), &u.view(), &mut y).unwrap();
                let bound = if bf16_path(isa, &g.view()) {
                    BF16_L2_TOL
                } else {
                    TOL
                };
                let e = rel_err(&y, &want_sm);
                assert!(e < bound, "{isa:?} silu m={m}: {e}");
            }
        }
    }
}

#[test]
fn shape_errors_are_reported() {
    let w = OwnedWeight::random(&mut Rng::new(1), 4, 8, Kind::F32);
    let mut y = vec![0f32; 4];
    assert!(gemm::matmul(&[0.0; 7], 1, &w.view(), &mut y).is_err());
    assert!(gemm::matmul(&[0.0; 8], 1, &w.view(), &mut [0.0; 3]).is_err());
}

/// The decode (streaming) GEMV of every path this CPU runs — the AVX-512 FP8 path included —
/// at odd shapes: columns that end mid-vector and mid-block, 1–5 rows of x (groups of 4 and
/// their remainders), a column range that does not start at row 0.
#[test]
fn decode_gemv_every_path_odd_shapes() {
    let mut rng = Rng::new(77);
    for &k in &[1, 31, 33, 128, 129, 200, 7 * 128 + 45] {
        for &n in &[1, 19, 130] {
            for kind in KINDS {
                let w = OwnedWeight::random(&mut rng, n, k, kind);
                for m in 1..=5 {
                    let x = randv(&mut rng, m * k);
                    let want = reference::matmul(&x, m, &w.view());
                    for isa in isas() {
                        let mut y = vec![f32::NAN; m * n];
                        gemm::matmul_with(isa, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
                        let what = format!("{kind:?} m={m} n={n} k={k}");
                        assert_close(isa, &x, m, &w.view(), &y, &want, &what);
                    }
                }
            }
        }
    }
    assert!(
        isas().len() >= 2,
        "at least the portable path and one vector path are tested"
    );
}

/// Enough rows × columns of x that the bf16 path cuts x into L2-sized blocks (more than
/// 256 KiB prepared: columns in 512-wide blocks, rows in blocks of 64), with a partial last
/// block of each.
#[test]
fn blocked_fp8_gemm_matches_reference() {
    let mut rng = Rng::new(11);
    let (m, n, k) = (70, 37, 1100);
    let w = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
    let x = randv(&mut rng, m * k);
    let want = reference::matmul(&x, m, &w.view());
    for isa in isas() {
        let mut y = vec![f32::NAN; m * n];
        gemm::matmul_with(isa, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
        assert_close(isa, &x, m, &w.view(), &y, &want, "blocked");
    }
}

/// The bf16 path converts every finite e4m3 code exactly, in the lane order of its prepared x:
/// a one-hot x picks each code of a 256-column row (all codes, both signs) and must give
/// exactly code value × scale; and 1..4 rows of x against 1..5 weight rows cover every tile.
#[test]
fn fp8_codes_exact_through_every_path() {
    let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7f != 0x7f).collect();
    let k = codes.len();
    let scale = 3.0f32;
    let scales = vec![scale; k.div_ceil(128)];
    let w = Weight::new(
        1,
        k,
        WeightData::Fp8E4m3 {
            q: &codes,
            scale_inv: &scales,
        },
    )
    .unwrap();
    for isa in isas() {
        for (j, &c) in codes.iter().enumerate() {
            let mut x = vec![0f32; k];
            x[j] = 1.0;
            let mut y = [f32::NAN];
            gemm::matmul_with(isa, &x, 1, &w, Epilogue::Store, &mut y).unwrap();
            let want = shardseek_kernels::fp8::e4m3_to_f32(c) * scale;
            assert_eq!(y[0], want, "{isa:?} code {c:#x} at column {j}");
        }
    }
}
