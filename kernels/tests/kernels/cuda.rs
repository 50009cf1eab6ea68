//! The CUDA backend: a typed error without the feature or a device; with both, every kernel is
//! compared with the CPU reference on random inputs at odd shapes. Without a GPU the tests are
//! skipped with a message, unless `SHARDSEEK_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`),
//! which turns a missing device into a failure.
//!
//! Bounds (relative L2 error against the CPU, f64-accumulated reference):
//! - f32 activations (GEMV, f32 tiles, grouped FFN, MLA over f32/bf16/fp8 caches, norms): 1e-5,
//!   the same values summed in another order;
//! - tensor-core MLA over a bf16 cache: 1e-2 ([`MMA_BOUND`]); queries and softmax
//!   probabilities are rounded to bf16 (2^-9 relative each) before the products, as FlashMLA does;
//! - FP8-activation tensor-core GEMM: 1e-4 against a reference that quantises the activations
//!   the same way (per row, per 128 columns, amax / 448), and 0.06 against unquantised f32
//!   activations (e4m3 keeps 3 mantissa bits: 2^-4 relative per value, averaging down in sums).

use shardseek_kernels::Error;
use shardseek_kernels::cuda::CudaBackend;

#[cfg(not(feature = "cuda"))]
#[test]
fn without_feature_backend_is_a_typed_error() {
    match CudaBackend::new(0) {
        Err(Error::CudaUnavailable(why)) => assert!(why.contains("--features cuda"), "{why}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a build without the feature opened a device"),
    }
}

/// The device, or `None` (test skipped) when this machine has none and none is required.
#[cfg(feature = "cuda")]
fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(g) => Some(g),
        Err(Error::CudaUnavailable(why)) => {
            assert!(
                std::env::var("SHARDSEEK_REQUIRE_CUDA").as_deref() != Ok("1"),
                "SHARDSEEK_REQUIRE_CUDA=1 but no device: {why}"
            );
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("CUDA device present but backend failed: {e}"),
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::super::common::*;
    use super::gpu;
    use shardseek_kernels::cuda::{Epilogue, GemmAlgo};
    use shardseek_kernels::fp8::{E4M3_TABLE, f32_to_e4m3};
    use shardseek_kernels::gate::{GateParams, noaux_tc};
    use shardseek_kernels::mla::{self, CacheData, LatentCache, SeqPages, quantize_token_fp8};
    use shardseek_kernels::moe::{self, Combine, ExpertWeights, Group};
    use shardseek_kernels::rope::Rope;
    use shardseek_kernels::sampling::{Rng, argmax};
    use shardseek_kernels::{gemm, norm, softmax};

    /// Tensor-core MLA: bf16 queries and probabilities (see the module's bounds).
    const MMA_BOUND: f64 = 1e-2;

    /// Prints the measured error next to its bound (gpu-check.sh's log shows every comparison).
    fn check(what: &str, err: f64, bound: f64) {
        eprintln!("cuda vs cpu: {what}: rel err {err:.2e} (bound {bound:.0e})");
        assert!(err < bound, "{what}: rel err {err:e} over {bound:e}");
    }

    #[test]
    fn elementwise_ops_match_cpu() {
        let Some(g) = gpu() else { return };
        let mut rng = Rng::new(1);
        for d in [300, 7, 1025] {
            let x = randv(&mut rng, 3 * d);
            let w = randv(&mut rng, d);
            let mut want = x.clone();
            norm::rms_norm_inplace(&mut want, &w, 1e-6).unwrap();
            check(
                &format!("rms_norm d={d}"),
                rel_err(&g.rms_norm(&x, &w, 1e-6).unwrap(), &want),
                1e-5,
            );
        }
        let x = randv(&mut rng, 3 * 301);
        let u = randv(&mut rng, x.len());
        let mut want = x.clone();
        gemm::silu_mul_inplace(&mut want, &u);
        check(
            "silu_mul",
            rel_err(&g.silu_mul(&x, &u).unwrap(), &want),
            1e-5,
        );
        let rope = Rope::new(64, 10000.0, None);
        let mut q = randv(&mut rng, 2 * 3 * 64);
        let mut want = q.clone();
        for t in 0..2 {
            for h in 0..3 {
                rope.apply(&mut want[(t * 3 + h) * 64..(t * 3 + h + 1) * 64], 5 + t);
            }
        }
        g.rope(&mut q, &[5, 6], 3, &rope).unwrap();
        check("rope", rel_err(&q, &want), 1e-5);
        let logits = randv(&mut rng, 2 * 1001);
        let mut want = logits[..1001].to_vec();
        softmax::softmax_inplace(&mut want);
        let got = g.softmax_rows(&logits, 1001, false).unwrap();
        check("softmax", rel_err(&got[..1001], &want), 1e-5);
        let am = g.argmax_rows(&logits, 1001).unwrap();
        assert_eq!(am[1], argmax(&logits[1001..]));
    }

    /// Every weight dtype, GEMV (≤ 16 rows) and f32 tiles, odd and 16-aligned K.
    #[test]
    fn gemm_matches_cpu_at_odd_shapes() {
        let Some(g) = gpu() else { return };
        let mut rng = Rng::new(2);
        for kind in KINDS {
            for (m, n, k) in [
                (1, 130, 300),
                (1, 129, 256),
                (3, 77, 129),
                (8, 200, 2048),
                (9, 65, 384),
                (16, 33, 1000),
                (17, 200, 385),
                (70, 90, 256),
            ] {
                let w = OwnedWeight::random(&mut rng, n, k, kind);
                let x = randv(&mut rng, m * k);
                let want = gemm::reference::matmul(&x, m, &w.view());
                let got = g.matmul(&x, m, &w.view(), GemmAlgo::Exact).unwrap();
                check(
                    &format!("gemm {kind:?} m={m} n={n} k={k}"),
                    rel_err(&got, &want),
                    1e-5,
                );
            }
        }
    }

    /// Strided operands (per-head projections) and the accumulating epilogue with row scales.
    #[test]
    fn gemm_strides_and_accumulate_match_cpu() {
        let Some(g) = gpu() else { return };
        let mut rng = Rng::new(3);
        for (m, n, k, algo) in [
            (5, 96, 128, GemmAlgo::Exact),
            (40, 96, 128, GemmAlgo::Exact),
            (40, 130, 256, GemmAlgo::Fp8Activations),
        ] {
            let w = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
            let (ldx, x_off, ldy, y_off) = (k + 37, 11, n + 5, 3);
            let xs = randv(&mut rng, x_off + m * ldx);
            let ys = randv(&mut rng, y_off + m * ldy);
            let rs = randv(&mut rng, m);
            let x: Vec<f32> = (0..m)
                .flat_map(|r| xs[x_off + r * ldx..x_off + r * ldx + k].to_vec())
                .collect();
            let xw = if algo == GemmAlgo::Fp8Activations {
                quantised(&x, k)
            } else {
                x.clone()
            };
            let prod = gemm::reference::matmul(&xw, m, &w.view());
            let mut want = ys.clone();
            for r in 0..m {
                for c in 0..n {
                    want[y_off + r * ldy + c] += rs[r] * prod[r * n + c];
                }
            }
            let dw = g.upload(&w.view()).unwrap();
            let dx = g.htod(&xs).unwrap();
            let mut dy = g.htod(&ys).unwrap();
            let drs = g.htod(&rs).unwrap();
            g.gemm(
                &dx,
                x_off,
                ldx,
                m,
                &dw,
                &mut dy,
                y_off,
                ldy,
                Epilogue::Accumulate(Some(&drs)),
                algo,
            )
            .unwrap();
            let mut got = vec![0f32; ys.len()];
            g.dtoh(&dy, &mut got).unwrap();
            let bound = if algo == GemmAlgo::Exact { 1e-5 } else { 1e-4 };
            check(
                &format!("gemm strided accumulate {algo:?} m={m}"),
                rel_err(&got, &want),
                bound,
            );
        }
    }

    /// x with every (row, 128-column block) quantised to e4m3 at amax / 448 and dequantised:
    /// what the tensor-core GEMM multiplies.
    fn quantised(x: &[f32], k: usize) -> Vec<f32> {
        let mut out = x.to_vec();
        for row in out.chunks_mut(k) {
            for blk in row.chunks_mut(128) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let s = if amax > 0.0 { amax / 448.0 } else { 1.0 };
                for v in blk.iter_mut() {
                    *v = E4M3_TABLE[f32_to_e4m3(*v / s) as usize] * s;
                }
            }
        }
        out
    }

    #[test]
    fn fp8_tensor_core_gemm_matches_quantised_reference() {
        let Some(g) = gpu() else { return };
        if !g.has_fp8_mma() {
            eprintln!("skipped: no FP8 mma on {:?}", g.compute_capability());
            return;
        }
        let mut rng = Rng::new(4);
        for (m, n, k) in [
            (17, 77, 129),
            (130, 200, 256),
            (257, 300, 385),
            (64, 128, 1024),
        ] {
            let w = OwnedWeight::random(&mut rng, n, k, Kind::Fp8);
            let x = randv(&mut rng, m * k);
            let got = g
                .matmul(&x, m, &w.view(), GemmAlgo::Fp8Activations)
                .unwrap();
            let want_q = gemm::reference::matmul(&quantised(&x, k), m, &w.view());
            check(
                &format!("fp8 mma m={m} n={n} k={k} vs quantised"),
                rel_err(&got, &want_q),
                1e-4,
            );
            let want = gemm::reference::matmul(&x, m, &w.view());
            check(
                &format!("fp8 mma m={m} n={n} k={k} vs f32 activations"),
                rel_err(&got, &want),
                0.06,
            );
        }
    }

    #[test]
    fn grouped_ffn_matches_cpu() {
        let Some(g) = gpu() else { return };
        let mut rng = Rng::new(5);
        for kind in [Kind::Fp8, Kind::Bf16] {
            let (hidden, inter) = (200, 136);
            let ws: Vec<OwnedWeight> = (0..9)
                .map(|i| {
                    let (r, c) = if i % 3 == 2 {
                        (hidden, inter)
                    } else {
                        (inter, hidden)
                    };
                    OwnedWeight::random(&mut rng, r, c, kind)
                })
                .collect();
            let experts: Vec<ExpertWeights> = ws
                .chunks(3)
                .map(|c| ExpertWeights {
                    gate: c[0].view(),
                    up: c[1].view(),
                    down: c[2].view(),
                })
                .collect();
            let groups = [
                Group {
                    expert: 1,
                    rows: 0..3,
                },
                Group {
                    expert: 2,
                    rows: 3..3,
                },
                Group {
                    expert: 0,
                    rows: 3..40,
                },
                Group {
                    expert: 2,
                    rows: 41..42,
                },
            ];
            let x = randv(&mut rng, 43 * hidden);
            let rw = randv(&mut rng, 43);
            for combine in [Combine::Store, Combine::Accumulate] {
                let y0 = randv(&mut rng, x.len());
                let mut want = y0.clone();
                moe::reference::grouped_ffn(
                    &x,
                    hidden,
                    &groups,
                    &experts,
                    Some(&rw),
                    combine,
                    &mut want,
                );
                let mut y = y0.clone();
                g.grouped_ffn(&x, hidden, &groups, &experts, Some(&rw), combine, &mut y)
                    .unwrap();
                check(
                    &format!("grouped ffn {kind:?} {combine:?}"),
                    rel_err(&y, &want),
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn mla_matches_cpu_for_every_cache_dtype() {
        let Some(g) = gpu() else { return };
        let mut rng = Rng::new(6);
        let (r, p, heads) = (64, 16, 5);
        let lens = [1usize, 63, 64, 65, 1000];
        let blocks: usize = lens.iter().map(|l| l.div_ceil(64)).sum::<usize>() + 1;
        let vals = randv(&mut rng, blocks * 64 * (r + p));
        let bf: Vec<u16> = vals
            .iter()
            .map(|v| shardseek_kernels::fp8::f32_to_bf16(*v))
            .collect();
        let mut codes = vec![0u8; vals.len()];
        let scales: Vec<f32> = vals
            .chunks(r + p)
            .zip(codes.chunks_mut(r + p))
            .map(|(v, c)| quantize_token_fp8(v, c))
            .collect();
        // Pages in a scrambled order (the last block is never used).
        let mut next = blocks as u32 - 1;
        let tabs: Vec<Vec<u32>> = lens
            .iter()
            .map(|l| {
                (0..l.div_ceil(64))
                    .map(|_| {
                        next -= 1;
                        next
                    })
                    .collect()
            })
            .collect();
        let seqs: Vec<SeqPages> = tabs
            .iter()
            .zip(lens)
            .map(|(t, len)| SeqPages { pages: t, len })
            .collect();
        let qa = randv(&mut rng, lens.len() * heads * r);
        let qp = randv(&mut rng, lens.len() * heads * p);
        for (name, data) in [
            ("f32", CacheData::F32(&vals)),
            ("bf16", CacheData::Bf16(&bf)),
            (
                "fp8",
                CacheData::Fp8 {
                    q: &codes,
                    scale: &scales,
                },
            ),
        ] {
            let cache = LatentCache::new(data, r, p).unwrap();
            let mut want = vec![0f32; qa.len()];
            mla::mla_decode(&cache, &seqs, heads, &qa, &qp, 0.3, &mut want).unwrap();
            let got = g
                .mla_decode(false, &cache, &seqs, heads, &qa, &qp, 0.3)
                .unwrap();
            check(
                &format!("mla decode {name} cache (f32 kernel)"),
                rel_err(&got, &want),
                1e-5,
            );
            if name == "bf16" {
                let got = g
                    .mla_decode(true, &cache, &seqs, heads, &qa, &qp, 0.3)
                    .unwrap();
                check(
                    "mla decode bf16 cache (tensor cores)",
                    rel_err(&got, &want),
                    MMA_BOUND,
                );
            }
        }
        // A prefill chunk: rows share one page-table row (stride 0), each causal up to itself.
        let cache = LatentCache::new(CacheData::F32(&vals), r, p).unwrap();
        let (start, chunk) = (900, 100);
        let seq = &seqs[4];
        let qa = randv(&mut rng, chunk * heads * r);
        let qp = randv(&mut rng, chunk * heads * p);
        let mut want = vec![0f32; qa.len()];
        mla::mla_prefill(&cache, seq, start, heads, &qa, &qp, 0.3, &mut want).unwrap();
        let mut dev = g.new_cache(&cache).unwrap();
        g.cache_write(&mut dev, &cache, seq.pages, 0, seq.len)
            .unwrap();
        let (table, _, _) = g.seq_tables(std::slice::from_ref(seq), dev.blocks).unwrap();
        let lens: Vec<i32> = (0..chunk).map(|i| (start + i + 1) as i32).collect();
        let dl = g.htod(&lens).unwrap();
        let (dqa, dqp) = (g.htod(&qa).unwrap(), g.htod(&qp).unwrap());
        let mut out = g.zeros::<f32>(qa.len()).unwrap();
        g.mla_attend(
            &dev, &table, 0, &dl, chunk, heads, &dqa, &dqp, 0.3, &mut out,
        )
        .unwrap();
        let mut got = vec![0f32; qa.len()];
        g.dtoh(&out, &mut got).unwrap();
        check("mla prefill chunk (causal)", rel_err(&got, &want), 1e-5);
    }

    #[test]
    fn gate_matches_cpu() {
        let Some(g) = gpu() else { return };
        let mut rng = Rng::new(7);
        let params = GateParams {
            n_group: 8,
            topk_group: 4,
            top_k: 8,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        };
        let logits = randv(&mut rng, 3 * 256);
        let bias = randv(&mut rng, 256);
        let got = g.noaux_tc(&logits, &bias, &params).unwrap();
        for (t, r) in got.iter().enumerate() {
            let want = noaux_tc(&logits[t * 256..(t + 1) * 256], &bias, &params);
            assert_eq!(r.experts, want.experts);
            check("noaux_tc weights", rel_err(&r.weights, &want.weights), 1e-5);
        }
    }

    #[test]
    fn ceilings_are_measured() {
        let Some(g) = gpu() else { return };
        let bw = g.copy_gbps(256 << 20).unwrap();
        let fma = g.peak_tflops(false).unwrap();
        eprintln!("device copy {bw:.0} GB/s, f32 FMA {fma:.1} TFLOP/s");
        assert!(bw.is_finite() && bw > 0.0 && fma.is_finite() && fma > 0.0);
        if g.has_fp8_mma() {
            let fp8 = g.peak_tflops(true).unwrap();
            eprintln!("fp8 mma {fp8:.0} TFLOP/s");
            assert!(fp8.is_finite() && fp8 > fma);
        }
    }
}
