//! MLA decode and prefill over a paged latent cache against the f64 reference.
//! Bound 1e-5 relative to ‖ref‖ (the bf16 and fp8 caches are read exactly by both sides), and
//! 2e-5 for the expanded prefill, whose K/V decompression adds one more f32 GEMM (depth
//! kv_lora_rank) before the attention.

use super::common::*;
use shardseek_kernels::cpu::Isa;
use shardseek_kernels::mla::{self, CacheData, LatentCache, MLA_BLOCK, SeqPages};
use shardseek_kernels::sampling::Rng;
use shardseek_kernels::{Weight, WeightData};

const R: usize = 64;
const P: usize = 16;

/// Page tables for `lens`, pages handed out in a scrambled order from one pool.
fn tables(rng: &mut Rng, lens: &[usize]) -> (Vec<Vec<u32>>, usize) {
    let total: usize = lens.iter().map(|l| l.div_ceil(MLA_BLOCK)).sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..total as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut next = ids.into_iter();
    let t = lens
        .iter()
        .map(|l| {
            (0..l.div_ceil(MLA_BLOCK))
                .map(|_| next.next().unwrap())
                .collect()
        })
        .collect();
    (t, total)
}

fn isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

#[test]
fn decode_matches_reference() {
    let lens = [1, 63, 64, 65, 1000];
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        let (tabs, blocks) = tables(&mut rng, &lens);
        let vals = randv(&mut rng, blocks * MLA_BLOCK * (R + P));
        let bf: Vec<u16> = vals
            .iter()
            .map(|&v| shardseek_kernels::fp8::f32_to_bf16(v))
            .collect();
        let e = R + P;
        let mut q8 = vec![0u8; vals.len()];
        let scales: Vec<f32> = vals
            .chunks(e)
            .zip(q8.chunks_mut(e))
            .map(|(v, c)| mla::quantize_token_fp8(v, c))
            .collect();
        for heads in [5, 20] {
            let b = lens.len();
            let qa = randv(&mut rng, b * heads * R);
            let qp = randv(&mut rng, b * heads * P);
            let scale = 1.0 / ((R + P) as f32).sqrt() * 3.0;
            let fp8 = CacheData::Fp8 {
                q: &q8,
                scale: &scales,
            };
            for data in [CacheData::F32(&vals), CacheData::Bf16(&bf), fp8] {
                let cache = LatentCache::new(data, R, P).unwrap();
                let seqs: Vec<SeqPages> = tabs
                    .iter()
                    .zip(lens)
                    .map(|(t, len)| SeqPages { pages: t, len })
                    .collect();
                let want = mla::reference::mla_decode(&cache, &seqs, heads, &qa, &qp, scale);
                for isa in isas() {
                    let mut out = vec![f32::NAN; b * heads * R];
                    mla::mla_decode_with(isa, &cache, &seqs, heads, &qa, &qp, scale, &mut out)
                        .unwrap();
                    let e = rel_err(&out, &want);
                    assert!(
                        e < 1e-5,
                        "{isa:?} heads {heads} {kind} cache: {e}",
                        kind = match data {
                            CacheData::F32(_) => "f32",
                            CacheData::Bf16(_) => "bf16",
                            CacheData::Fp8 { .. } => "fp8",
                        }
                    );
                }
            }
        }
    }
}

#[test]
fn prefill_matches_reference() {
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        // (prefix already cached, chunk of new tokens)
        for &(start, chunk) in &[(0, 1), (0, 65), (63, 3), (64, 17), (900, 100)] {
            let len = start + chunk;
            let (tabs, blocks) = tables(&mut rng, &[len]);
            let vals = randv(&mut rng, blocks * MLA_BLOCK * (R + P));
            let cache = LatentCache::new(CacheData::F32(&vals), R, P).unwrap();
            let seq = SeqPages {
                pages: &tabs[0],
                len,
            };
            let heads = 3;
            let qa = randv(&mut rng, chunk * heads * R);
            let qp = randv(&mut rng, chunk * heads * P);
            let want = mla::reference::mla_prefill(&cache, &seq, start, heads, &qa, &qp, 0.2);
            for isa in isas() {
                let mut out = vec![0f32; qa.len()];
                mla::mla_prefill_with(isa, &cache, &seq, start, heads, &qa, &qp, 0.2, &mut out)
                    .unwrap();
                let e = rel_err(&out, &want);
                assert!(e < 1e-5, "{isa:?} start {start} chunk {chunk}: {e}");
            }
        }
    }
}

/// A latent cache of `blocks` random blocks in each dtype: f32 values, their bf16 bits, and
/// fp8 codes with per-token scales.
fn caches(rng: &mut Rng, blocks: usize) -> (Vec<f32>, Vec<u16>, Vec<u8>, Vec<f32>) {
    let e = R + P;
    let vals = randv(rng, blocks * MLA_BLOCK * e);
    let bf: Vec<u16> = vals
        .iter()
        .map(|&v| shardseek_kernels::fp8::f32_to_bf16(v))
        .collect();
    let mut q8 = vec![0u8; vals.len()];
    let scales: Vec<f32> = vals
        .chunks(e)
        .zip(q8.chunks_mut(e))
        .map(|(v, c)| mla::quantize_token_fp8(v, c))
        .collect();
    (vals, bf, q8, scales)
}

#[test]
fn prefill_expanded_matches_reference() {
    // Odd head dims: v = 20 is not a multiple of the 16-wide tile, nope = 24.
    let (nope, v) = (24, 20);
    for &seed in &SEEDS {
        let mut rng = Rng::new(seed);
        // (prefix already cached, chunk of new tokens, heads)
        for &(start, chunk, heads) in &[
            (0, 1, 3),
            (0, 65, 3),
            (63, 3, 2),
            (64, 17, 5),
            (5, 130, 3),
            (300, 100, 2),
        ] {
            let len = start + chunk;
            let (tabs, blocks) = tables(&mut rng, &[len]);
            let (vals, bf, q8, scales) = caches(&mut rng, blocks);
            let seq = SeqPages {
                pages: &tabs[0],
                len,
            };
            let q = randv(&mut rng, chunk * heads * (nope + P));
            let rows = heads * (nope + v);
            for kind in [Kind::F32, Kind::Fp8] {
                let w = OwnedWeight::random(&mut rng, rows, R, kind);
                let fp8 = CacheData::Fp8 {
                    q: &q8,
                    scale: &scales,
                };
                for data in [CacheData::F32(&vals), CacheData::Bf16(&bf), fp8] {
                    let cache = LatentCache::new(data, R, P).unwrap();
                    let want = mla::reference::mla_prefill_expanded(
                        &cache,
                        &seq,
                        start,
                        heads,
                        &q,
                        &w.view(),
                        nope,
                        0.3,
                    );
                    for isa in isas() {
                        let mut out = vec![f32::NAN; chunk * heads * v];
                        mla::mla_prefill_expanded_with(
                            isa,
                            &cache,
                            &seq,
                            start,
                            heads,
                            &q,
                            &w.view(),
                            nope,
                            0.3,
                            &mut out,
                        )
                        .unwrap();
                        let e = rel_err(&out, &want);
                        assert!(
                            e < 2e-5,
                            "{isa:?} {kind:?} start {start} chunk {chunk} heads {heads}: {e}"
                        );
                    }
                }
            }
        }
    }
}

/// A context decompressed in several segments (64 or 128 tokens at a time) gives the
/// one-segment result: the online softmax carries across segments.
#[test]
fn prefill_expanded_segments_match_reference() {
    let (nope, v, heads) = (24, 20, 3);
    let mut rng = Rng::new(5);
    for &(start, chunk) in &[(0, 200), (130, 70), (300, 5)] {
        let len = start + chunk;
        let (tabs, blocks) = tables(&mut rng, &[len]);
        let (vals, bf, ..) = caches(&mut rng, blocks);
        let seq = SeqPages {
            pages: &tabs[0],
            len,
        };
        let q = randv(&mut rng, chunk * heads * (nope + P));
        let w = OwnedWeight::random(&mut rng, heads * (nope + v), R, Kind::Fp8);
        for data in [CacheData::F32(&vals), CacheData::Bf16(&bf)] {
            let cache = LatentCache::new(data, R, P).unwrap();
            let want = mla::reference::mla_prefill_expanded(
                &cache,
                &seq,
                start,
                heads,
                &q,
                &w.view(),
                nope,
                0.3,
            );
            for isa in isas() {
                for segment in [MLA_BLOCK, 2 * MLA_BLOCK] {
                    let mut out = vec![f32::NAN; chunk * heads * v];
                    mla::mla_prefill_expanded_segmented(
                        isa,
                        &cache,
                        &seq,
                        start,
                        heads,
                        &q,
                        &w.view(),
                        nope,
                        0.3,
                        segment,
                        &mut out,
                    )
                    .unwrap();
                    let e = rel_err(&out, &want);
                    assert!(
                        e < 2e-5,
                        "{isa:?} start {start} chunk {chunk} segment {segment}: {e}"
                    );
                }
            }
        }
        let cache = LatentCache::new(CacheData::F32(&vals), R, P).unwrap();
        let mut out = vec![0f32; chunk * heads * v];
        let bad = mla::mla_prefill_expanded_segmented(
            Isa::Portable,
            &cache,
            &seq,
            start,
            heads,
            &q,
            &w.view(),
            nope,
            0.3,
            100,
            &mut out,
        );
        assert!(
            bad.is_err(),
            "a segment that is not whole blocks is refused"
        );
    }
}

/// The expanded and absorbed forms are the same attention: splitting kv_b per head into
/// W_UK/W_UV and running the absorbed kernel gives the expanded kernel's output.
#[test]
fn prefill_forms_agree() {
    let (nope, v, heads) = (32, 16, 4);
    let mut rng = Rng::new(11);
    let (start, chunk) = (70, 40);
    let len = start + chunk;
    let (tabs, blocks) = tables(&mut rng, &[len]);
    let (vals, ..) = caches(&mut rng, blocks);
    let cache = LatentCache::new(CacheData::F32(&vals), R, P).unwrap();
    let seq = SeqPages {
        pages: &tabs[0],
        len,
    };
    let q = randv(&mut rng, chunk * heads * (nope + P));
    let kv_b = randv(&mut rng, heads * (nope + v) * R);
    let kv_b_bytes: Vec<u8> = kv_b.iter().flat_map(|x| x.to_le_bytes()).collect();
    let w = Weight::new(heads * (nope + v), R, WeightData::F32(&kv_b_bytes)).unwrap();
    let mut expanded = vec![0f32; chunk * heads * v];
    mla::mla_prefill_expanded(
        &cache,
        &seq,
        start,
        heads,
        &q,
        &w,
        nope,
        0.25,
        &mut expanded,
    )
    .unwrap();
    // Absorbed: q̃ = W_UKᵀ q_nope, attention over latents, then W_UV.
    let (dq, hv) = (nope + P, nope + v);
    let mut q_abs = vec![0f32; chunk * heads * R];
    let mut q_pe = vec![0f32; chunk * heads * P];
    for row in 0..chunk * heads {
        let h = row % heads;
        let qr = &q[row * dq..(row + 1) * dq];
        for k in 0..R {
            q_abs[row * R + k] = (0..nope).map(|d| kv_b[(h * hv + d) * R + k] * qr[d]).sum();
        }
        q_pe[row * P..(row + 1) * P].copy_from_slice(&qr[nope..]);
    }
    let mut ctx = vec![0f32; chunk * heads * R];
    mla::mla_prefill(&cache, &seq, start, heads, &q_abs, &q_pe, 0.25, &mut ctx).unwrap();
    let mut absorbed = vec![0f32; chunk * heads * v];
    for row in 0..chunk * heads {
        let h = row % heads;
        for d in 0..v {
            absorbed[row * v + d] = (0..R)
                .map(|k| kv_b[(h * hv + nope + d) * R + k] * ctx[row * R + k])
                .sum();
        }
    }
    let e = rel_err(&expanded, &absorbed);
    assert!(e < 2e-5, "expanded vs absorbed: {e}");
}

#[test]
fn expanded_rule_prefers_expanded_without_prefix() {
    // Medium shapes: r 512, 16 heads, 128 + 64 / 128.
    let rule = |chunk, start| mla::prefer_expanded(chunk, start, 16, 512, 128, 64, 128);
    for chunk in [2, 16, 512, 4096] {
        assert!(rule(chunk, 0), "chunk {chunk} without prefix");
    }
    assert!(!rule(1, 100_000), "one token after a long prefix");
    // Rows of the measured table in `prefer_expanded`'s documentation.
    for (start, chunk) in [(64, 64), (256, 128), (2048, 300), (4096, 512)] {
        assert!(rule(chunk, start), "prefix {start} chunk {chunk}");
    }
    for (start, chunk) in [(128, 32), (1024, 64), (2048, 8), (4096, 64)] {
        assert!(!rule(chunk, start), "prefix {start} chunk {chunk}");
    }
}

#[test]
fn bad_page_tables_are_errors() {
    let vals = vec![0f32; 2 * MLA_BLOCK * (R + P)];
    let cache = LatentCache::new(CacheData::F32(&vals), R, P).unwrap();
    let q = vec![0f32; R];
    let qp = vec![0f32; P];
    let mut out = vec![0f32; R];
    let short = [SeqPages {
        pages: &[0],
        len: 65,
    }];
    assert!(mla::mla_decode(&cache, &short, 1, &q, &qp, 1.0, &mut out).is_err());
    let oob = [SeqPages {
        pages: &[5],
        len: 3,
    }];
    assert!(mla::mla_decode(&cache, &oob, 1, &q, &qp, 1.0, &mut out).is_err());
    let empty = [SeqPages {
        pages: &[0],
        len: 0,
    }];
    assert!(mla::mla_decode(&cache, &empty, 1, &q, &qp, 1.0, &mut out).is_err());
    assert!(LatentCache::new(CacheData::F32(&vals), 60, 20).is_err());
}
