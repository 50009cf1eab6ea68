//! Block-scaled GEMM against the f64 reference: every instruction-set path, decode and prefill
//! shapes, every weight dtype, unaligned weight bytes, and the fused epilogues.
//! Bound: f32 accumulate ⇒ ‖y − ref‖ ≤ 1e-5·‖ref‖ — the bf16 path of FP8 weights on
//! `Isa::Avx512Bf16` included: x is split into three bf16 parts (x = hi + mid + lo within
//! 2⁻²⁴|x|, f32's own rounding), e4m3 weights are exact in bf16, the bf16 products exact in
//! f32, and the sums are f32.

use super::common::*;
use shardseek_kernels::cpu::Isa;
use shardseek_kernels::gemm::{self, Epilogue, reference};
use shardseek_kernels::sampling::Rng;
use shardseek_kernels::{Weight, WeightData};

const TOL: f64 = 1e-5;

fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

#[test]
fn matmul_matches_reference_all_dtypes_and_shapes() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        // (50, 500, 300): column tasks whose last wide tile is 16 < nr < 32 wide.
        for &(m, n, k) in &[
            (1, 130, 300),
            (3, 77, 129),
            (17, 200, 385),
            (40, 33, 260),
            (50, 500, 300),
        ] {
            for kind in KINDS {
                let w = OwnedWeight::random(&mut rng, n, k, kind);
                let x = randv(&mut rng, m * k);
                let want = reference::matmul(&x, m, &w.view());
                for isa in isas() {
                    let mut y = vec![f32::NAN; m * n];
                    gemm::matmul_with(isa, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
                    let e = rel_err(&y, &want);
                    assert!(e < TOL, "{isa:?} {kind:?} m={m} n={n} k={k}: {e}");
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
            assert!(rel_err(&y, &want2) < TOL);
        }
        let mut y = vec![0f32; m * n];
        gemm::matmul(&x, m, &wv, &mut y).unwrap();
        assert!(rel_err(&y, &want) < TOL, "{kind:?}");
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
                assert!(rel_err(&y, &want) < TOL, "{isa:?} acc m={m}");
                let mut y = vec![0f32; m * n];
                gemm::silu_mul_with(isa, &x, m, &g.view(), &u.view(), &mut y).unwrap();
                assert!(rel_err(&y, &want_sm) < TOL, "{isa:?} silu m={m}");
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
/// their remainders; from 3 rows on the AVX-512 levels run the dot tiles), a column range that
/// does not start at row 0.
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
                        let e = rel_err(&y, &want);
                        assert!(e < TOL, "{isa:?} {kind:?} m={m} n={n} k={k}: {e}");
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

/// Enough rows × columns of x that the bf16 tiles (FP8 and BF16 weights) cut x into L2-sized
/// column blocks (more than 256 KiB prepared: 512-wide blocks), with a partial last block: 2
/// rows (the most the bf16 tiles take on `Isa::Avx512Bf16`) of more than 21 845 columns; and
/// 60 and 70 rows (the dot tiles and the packed path on the AVX-512 levels).
#[test]
fn blocked_fp8_and_bf16_gemm_matches_reference() {
    let mut rng = Rng::new(11);
    for (m, k, kind) in [
        (2, 22_001, Kind::Fp8),
        (2, 22_001, Kind::Bf16),
        (60, 1100, Kind::Fp8),
        (60, 1100, Kind::Bf16),
        (70, 1100, Kind::Fp8),
    ] {
        let n = 37;
        let w = OwnedWeight::random(&mut rng, n, k, kind);
        let x = randv(&mut rng, m * k);
        let want = reference::matmul(&x, m, &w.view());
        for isa in isas() {
            let mut y = vec![f32::NAN; m * n];
            gemm::matmul_with(isa, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
            let e = rel_err(&y, &want);
            assert!(e < TOL, "{isa:?} {kind:?} blocked: {e}");
        }
    }
}

/// The bf16 path converts every finite e4m3 code exactly, in the lane order of its prepared x:
/// a one-hot x picks each code of a 256-column row (all codes, both signs) and must give
/// exactly code value × scale, through the GEMV (one row) and the dot tiles (eight rows); and
/// 1..4 rows of x against 1..5 weight rows cover every tile.
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
    // One row (the GEMVs) and eight (the dot tiles of the AVX-512 levels, the other rows zero).
    for isa in isas() {
        for m in [1, 8] {
            for (j, &c) in codes.iter().enumerate() {
                let mut x = vec![0f32; m * k];
                x[j] = 1.0;
                let mut y = vec![f32::NAN; m];
                gemm::matmul_with(isa, &x, m, &w, Epilogue::Store, &mut y).unwrap();
                let want = shardseek_kernels::fp8::e4m3_to_f32(c) * scale;
                assert_eq!(y[0], want, "{isa:?} m={m} code {c:#x} at column {j}");
                assert!(y[1..].iter().all(|&v| v == 0.0), "{isa:?} m={m}");
            }
        }
    }
}

/// The f32 dot-product tiles of the AVX-512 levels (FP8 and BF16 weights, 3–64 rows of x): every
/// x group size (3–10 rows: 3–10 rows make one group, 11–20, 32
/// and 64 rows split into groups of 5–10), more columns than one pass takes (512–2048) with a
/// partial last step, weight rows that cross a 128-row scale block and end in an odd row; other
/// paths take the same shapes.
#[test]
fn dot_tiles_every_group_size_and_multi_pass() {
    let mut rng = Rng::new(19);
    let (n, k) = (133, 2 * 2048 + 77);
    for kind in [Kind::Fp8, Kind::Bf16] {
        let w = OwnedWeight::random(&mut rng, n, k, kind);
        for m in (3..=20).chain([32, 64]) {
            let x = randv(&mut rng, m * k);
            let want = reference::matmul(&x, m, &w.view());
            for isa in isas() {
                let mut y = vec![f32::NAN; m * n];
                gemm::matmul_with(isa, &x, m, &w.view(), Epilogue::Store, &mut y).unwrap();
                let e = rel_err(&y, &want);
                assert!(e < TOL, "{isa:?} {kind:?} m={m}: {e}");
            }
        }
    }
}
