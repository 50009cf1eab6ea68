//! Multi-head latent attention over a paged latent cache, absorbed form (DESIGN.md §3).
//!
//! The cache holds, per token, the compressed latent c (`kv_lora_rank` values) followed by the
//! rotated k_pe (`rope_dim` values), in blocks of [`MLA_BLOCK`] tokens addressed through a
//! per-sequence page table. A query row is the absorbed q̃ = q_nope·W_UK (`kv_lora_rank`) and
//! the rotated q_pe; its score against token t is `scale · (q̃·c_t + q_pe·k_pe_t)` and its
//! output is `Σ_t softmax(score)_t · c_t` (`kv_lora_rank` values; the caller applies W_UV).
//!
//! All heads of a sequence read the same cache entries, so the work is done as small GEMMs per
//! page: Sᵀ = page · Qᵀ (64 tokens × heads, K = kv_lora_rank + rope_dim) and O += Pᵀ · page_c
//! (heads × kv_lora_rank, K = 64 tokens), both on the 6×16 microkernel, with an online
//! (flash-style) softmax between them so nothing grows with the context length. At
//! DeepSeek-V3 shapes this is ~240 FLOP per cache byte: compute-bound on a CPU.
//!
//! Prefill (a chunk of new tokens whose latents are already written to the cache) is the same
//! loop with one query row per (token, head) and a causal limit per row.

use crate::cpu::{self, Isa, MR, NR, Tile};
use crate::error::{Error, Result, shape};
use crate::fp8::{E4M3_TABLE, bf16_to_f32};
use crate::gemm::{Epilogue, matmul_with};
use crate::scratch;
use crate::weight::Weight;
use crate::wide::{NW, microkernel_wide};
use rayon::prelude::*;

/// Tokens per cache block (page).
pub const MLA_BLOCK: usize = 64;

/// Storage of the latent cache: `[num_blocks][MLA_BLOCK][kv_lora_rank + rope_dim]`.
#[derive(Clone, Copy, Debug)]
pub enum CacheData<'a> {
    F32(&'a [f32]),
    /// bf16 bits; converted to f32 a page at a time.
    Bf16(&'a [u16]),
    /// FP8 e4m3 codes with one f32 scale per token (`[num_blocks][MLA_BLOCK]`): value =
    /// code · scale. Half the bytes of bf16; see [`quantize_token_fp8`].
    Fp8 {
        q: &'a [u8],
        scale: &'a [f32],
    },
}

/// Quantises one cache entry to e4m3 codes with a per-token scale (amax / 448), the layout of
/// [`CacheData::Fp8`].
pub fn quantize_token_fp8(values: &[f32], codes: &mut [u8]) -> f32 {
    let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = if amax > 0.0 { amax / 448.0 } else { 1.0 };
    for (c, v) in codes.iter_mut().zip(values) {
        *c = crate::fp8::f32_to_e4m3(v / scale);
    }
    scale
}

/// A paged latent cache (one layer).
#[derive(Clone, Copy, Debug)]
pub struct LatentCache<'a> {
    pub data: CacheData<'a>,
    pub kv_lora_rank: usize,
    pub rope_dim: usize,
}

impl<'a> LatentCache<'a> {
    /// Checks the layout. `kv_lora_rank` must be a multiple of 16 (the microkernel's width;
    /// DeepSeek-V3 uses 512).
    pub fn new(data: CacheData<'a>, kv_lora_rank: usize, rope_dim: usize) -> Result<Self> {
        let len = match data {
            CacheData::F32(d) => d.len(),
            CacheData::Bf16(d) => d.len(),
            CacheData::Fp8 { q, scale } => {
                if scale.len() * (kv_lora_rank + rope_dim) != q.len() {
                    return Err(shape(
                        "LatentCache",
                        format!("{} scales for {} codes", scale.len(), q.len()),
                    ));
                }
                q.len()
            }
        };
        let block = MLA_BLOCK * (kv_lora_rank + rope_dim);
        if kv_lora_rank == 0 || !kv_lora_rank.is_multiple_of(NR) {
            return Err(Error::Unsupported {
                op: "LatentCache",
                detail: format!("kv_lora_rank {kv_lora_rank} is not a positive multiple of {NR}"),
            });
        }
        if !len.is_multiple_of(block) {
            return Err(shape(
                "LatentCache",
                format!("{len} values is not a whole number of {block}-value blocks"),
            ));
        }
        Ok(Self {
            data,
            kv_lora_rank,
            rope_dim,
        })
    }

    /// Values per token.
    pub fn entry(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }

    pub fn num_blocks(&self) -> usize {
        let len = match self.data {
            CacheData::F32(d) => d.len(),
            CacheData::Bf16(d) => d.len(),
            CacheData::Fp8 { q, .. } => q.len(),
        };
        len / (MLA_BLOCK * self.entry())
    }

    /// Token `pos` of a sequence with page table `pages`, as f32 (for references and tests).
    pub fn token(&self, pages: &[u32], pos: usize) -> Vec<f32> {
        let e = self.entry();
        let off = (pages[pos / MLA_BLOCK] as usize * MLA_BLOCK + pos % MLA_BLOCK) * e;
        match self.data {
            CacheData::F32(d) => d[off..off + e].to_vec(),
            CacheData::Bf16(d) => d[off..off + e].iter().map(|&b| bf16_to_f32(b)).collect(),
            CacheData::Fp8 { q, scale } => {
                let s = scale[off / e];
                q[off..off + e]
                    .iter()
                    .map(|&c| E4M3_TABLE[c as usize] * s)
                    .collect()
            }
        }
    }
}

/// One sequence: its page table and how many tokens it has in the cache.
#[derive(Clone, Copy, Debug)]
pub struct SeqPages<'a> {
    pub pages: &'a [u32],
    pub len: usize,
}

/// Checks a prefill chunk of `chunk` tokens from position `start` against its sequence; false
/// when the chunk is empty (nothing to do).
fn check_chunk(
    op: &'static str,
    cache: &LatentCache,
    seq: &SeqPages,
    start: usize,
    chunk: usize,
) -> Result<bool> {
    if seq.len < start + chunk {
        return Err(shape(
            op,
            format!(
                "sequence has {} tokens, chunk ends at {}",
                seq.len,
                start + chunk
            ),
        ));
    }
    if chunk == 0 {
        return Ok(false);
    }
    check_seq(op, cache, seq)?;
    Ok(true)
}

fn check_seq(op: &'static str, cache: &LatentCache, s: &SeqPages) -> Result<()> {
    if s.len == 0 {
        return Err(shape(op, "empty sequence"));
    }
    let need = s.len.div_ceil(MLA_BLOCK);
    if s.pages.len() < need {
        return Err(shape(
            op,
            format!(
                "{} tokens need {need} pages, table has {}",
                s.len,
                s.pages.len()
            ),
        ));
    }
    let nb = cache.num_blocks();
    if let Some(p) = s.pages[..need].iter().find(|&&p| p as usize >= nb) {
        return Err(shape(op, format!("page {p} of a {nb}-block cache")));
    }
    Ok(())
}

/// Decode: one query token per sequence. `q_abs` is `[batch, heads, kv_lora_rank]`, `q_pe`
/// `[batch, heads, rope_dim]`, `out` `[batch, heads, kv_lora_rank]`.
pub fn mla_decode(
    cache: &LatentCache,
    seqs: &[SeqPages],
    heads: usize,
    q_abs: &[f32],
    q_pe: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    mla_decode_with(cpu::isa(), cache, seqs, heads, q_abs, q_pe, scale, out)
}

/// [`mla_decode`] with an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode_with(
    isa: Isa,
    cache: &LatentCache,
    seqs: &[SeqPages],
    heads: usize,
    q_abs: &[f32],
    q_pe: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "mla_decode";
    let (r, p, b) = (cache.kv_lora_rank, cache.rope_dim, seqs.len());
    if q_abs.len() != b * heads * r || q_pe.len() != b * heads * p || out.len() != b * heads * r {
        return Err(shape(
            OP,
            format!(
                "q_abs {}, q_pe {}, out {} for batch {b}, heads {heads}, rank {r}+{p}",
                q_abs.len(),
                q_pe.len(),
                out.len()
            ),
        ));
    }
    for s in seqs {
        check_seq(OP, cache, s)?;
    }
    if b == 0 || heads == 0 {
        return Ok(());
    }
    // Split heads so that there are at least two tasks per thread (multiples of 16 rows).
    let threads = rayon::current_num_threads().max(1);
    let splits = (2 * threads).div_ceil(b).max(1);
    let chunk = heads.div_ceil(splits).div_ceil(NR).max(1) * NR;
    // Nested parallel iterators, not a task list: a decode step allocates nothing here.
    out.par_chunks_mut(heads * r)
        .enumerate()
        .for_each(|(si, outs)| {
            outs.par_chunks_mut(chunk * r)
                .enumerate()
                .for_each(|(ci, o)| {
                    let hn = o.len() / r;
                    let row0 = si * heads + ci * chunk;
                    let s = &seqs[si];
                    attend(
                        isa,
                        cache,
                        s.pages,
                        &q_abs[row0 * r..(row0 + hn) * r],
                        &q_pe[row0 * p..(row0 + hn) * p],
                        &|_| s.len,
                        scale,
                        o,
                    );
                })
        });
    Ok(())
}

/// Prefill: the chunk of tokens at positions `start..start+chunk` of one sequence, whose
/// latents are already in the cache (`seq.len ≥ start + chunk`); token i sees positions
/// `0..=start+i`. `q_abs` is `[chunk, heads, kv_lora_rank]`, `q_pe` `[chunk, heads, rope_dim]`,
/// `out` `[chunk, heads, kv_lora_rank]`.
#[allow(clippy::too_many_arguments)]
pub fn mla_prefill(
    cache: &LatentCache,
    seq: &SeqPages,
    start: usize,
    heads: usize,
    q_abs: &[f32],
    q_pe: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    mla_prefill_with(
        cpu::isa(),
        cache,
        seq,
        start,
        heads,
        q_abs,
        q_pe,
        scale,
        out,
    )
}

/// [`mla_prefill`] with an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn mla_prefill_with(
    isa: Isa,
    cache: &LatentCache,
    seq: &SeqPages,
    start: usize,
    heads: usize,
    q_abs: &[f32],
    q_pe: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "mla_prefill";
    let (r, p) = (cache.kv_lora_rank, cache.rope_dim);
    if heads == 0 || !q_abs.len().is_multiple_of(heads * r) {
        return Err(shape(
            OP,
            format!("q_abs {} for heads {heads}", q_abs.len()),
        ));
    }
    let chunk = q_abs.len() / (heads * r);
    if q_pe.len() != chunk * heads * p || out.len() != q_abs.len() {
        return Err(shape(
            OP,
            format!("q_pe {}, out {} for {chunk} tokens", q_pe.len(), out.len()),
        ));
    }
    if !check_chunk(OP, cache, seq, start, chunk)? {
        return Ok(());
    }
    let rows = chunk * heads;
    let threads = rayon::current_num_threads().max(1);
    let per = rows.div_ceil(4 * threads).div_ceil(NR).max(1) * NR;
    let per = per.min(8 * NR);
    out.par_chunks_mut(per * r).enumerate().for_each(|(ti, o)| {
        let row0 = ti * per;
        let hn = o.len() / r;
        attend(
            isa,
            cache,
            seq.pages,
            &q_abs[row0 * r..(row0 + hn) * r],
            &q_pe[row0 * p..(row0 + hn) * p],
            &|j| start + (row0 + j) / heads + 1,
            scale,
            o,
        );
    });
    Ok(())
}

/// Query rows (of one head) per task of the expanded prefill: four 16-row panels of Qᵀ
/// (48 KiB at qk 192), reused across every key block.
const EXP_QT: usize = 64;
/// Bytes of decompressed K_nope/V held at once by the expanded prefill: the context is
/// decompressed in segments of this size (at least one block), so a long cached prefix costs
/// no more memory than this (DeepSeek-V3: 32 KiB of K/V per token, 1024 tokens a segment).
const EXP_SEGMENT_BYTES: usize = 32 << 20;

/// Whether the expanded form ([`mla_prefill_expanded`]) is faster than the absorbed one
/// ([`mla_prefill`] plus the W_UK/W_UV projections around it) for a chunk of `chunk` tokens
/// after `start` cached ones, at rank `r`, `heads` heads of `nope`+`rope` query/key and `v`
/// value dimensions. Multiply-adds per form, each term divided by its measured rate:
///
/// - expanded: decompress the whole context, `(start+chunk)·H·(nope+v)·r` (one GEMM, rate
///   1), then attend at `nope+rope+v` per (query, key, head) (rate `EXP_ATTN_RATE`);
/// - absorbed: project the chunk's queries in and outputs out, `chunk·H·(nope+v)·r` (per-head
///   GEMMs of `chunk` rows, rate `ABS_PROJ_RATE`), then attend at `2r+rope` (rate 1).
///
/// The rates were fitted to CPU time per call (so other tenants of the machine do not skew
/// them) on the development box (Zen 5, 2 threads, AVX-512, medium shapes: r 512, 16 heads,
/// 128+64 / 128, FP8 kv_b, f32 cache), in ms expanded / absorbed:
///
/// | prefix | chunk | expanded | absorbed | rule |
/// |---|---|---|---|---|
/// | 0 | 512 | 25.5 | 43.1 | expanded |
/// | 0 | 64 | 1.9 | 3.7 | expanded |
/// | 16 | 64 | 2.3 | 3.9 | expanded |
/// | 64 | 64 | 3.3 | 4.3 | expanded |
/// | 256 | 128 | 11.8 | 12.7 | expanded |
/// | 512 | 200 | 27.1 | 29.3 | expanded |
/// | 2048 | 300 | 131.7 | 134.4 | expanded |
/// | 4096 | 512 | 332 | 446 | expanded |
/// | 128 | 32 | 3.6 | 3.0 | absorbed |
/// | 1024 | 64 | 30.8 | 15.9 | absorbed |
/// | 2048 | 8 | 66.2 | 5.1 | absorbed |
/// | 4096 | 64 | 133 | 53 | absorbed |
///
/// The rule agrees with every row: a prompt without a cached prefix always goes expanded, and
/// a short chunk after a long prefix (decode-like) stays absorbed.
pub fn prefer_expanded(
    chunk: usize,
    start: usize,
    heads: usize,
    r: usize,
    nope: usize,
    rope: usize,
    v: usize,
) -> bool {
    let (c, s, h) = (chunk as f64, start as f64, heads as f64);
    // Σ over the chunk of the keys each query sees.
    let pairs = c * s + c * (c + 1.0) / 2.0;
    let proj = h * (nope + v) as f64 * r as f64;
    let expanded = (s + c) * proj + pairs * h * (nope + rope + v) as f64 / EXP_ATTN_RATE;
    let absorbed = c * proj / ABS_PROJ_RATE + pairs * h * (2 * r + rope) as f64;
    expanded <= absorbed
}

/// Multiply-add rate of the expanded attention relative to the absorbed attention (its K is
/// 192 deep, not 576, so tile loads and the softmax weigh more); see [`prefer_expanded`].
const EXP_ATTN_RATE: f64 = 0.75;
/// Multiply-add rate of the absorbed form's per-head projections (GEMMs of `chunk` rows)
/// relative to the context-wide decompression GEMM; see [`prefer_expanded`].
const ABS_PROJ_RATE: f64 = 0.6;

/// Prefill in the expanded form (DESIGN.md §3): the chunk of tokens at positions
/// `start..start+chunk` of one sequence, whose latents are already in the cache
/// (`seq.len ≥ start + chunk`); token i sees positions `0..=start+i`.
///
/// K_nope and V of the context are decompressed from the cached latents with `kv_b`
/// (`[heads·(nope+v), kv_lora_rank]`, rows of head h: W_UK then W_UV) as one GEMM over the
/// context rows per segment, then every head attends in tiles of 64 queries × 64 keys with an
/// online softmax: q = [q_nope, q_pe], k = [k_nope, k_pe] with k_pe (in the cache) shared by
/// every head. `q` is `[chunk, heads, nope + rope_dim]` (q_pe rotated), `out`
/// `[chunk, heads, v]`: the attention output after W_UV, ready for W_o.
#[allow(clippy::too_many_arguments)]
pub fn mla_prefill_expanded(
    cache: &LatentCache,
    seq: &SeqPages,
    start: usize,
    heads: usize,
    q: &[f32],
    kv_b: &Weight,
    nope: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    mla_prefill_expanded_with(
        cpu::isa(),
        cache,
        seq,
        start,
        heads,
        q,
        kv_b,
        nope,
        scale,
        out,
    )
}

/// [`mla_prefill_expanded`] with an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn mla_prefill_expanded_with(
    isa: Isa,
    cache: &LatentCache,
    seq: &SeqPages,
    start: usize,
    heads: usize,
    q: &[f32],
    kv_b: &Weight,
    nope: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    // Context tokens whose K/V fit in the segment budget, whole blocks, at least one.
    let row_bytes = kv_b.rows.max(1) * 4;
    let seg = (EXP_SEGMENT_BYTES / row_bytes / MLA_BLOCK).max(1) * MLA_BLOCK;
    mla_prefill_expanded_segmented(
        isa, cache, seq, start, heads, q, kv_b, nope, scale, seg, out,
    )
}

/// [`mla_prefill_expanded_with`] decompressing at most `segment` context tokens at a time
/// (a positive multiple of [`MLA_BLOCK`]); the default is what fits in 32 MiB. Exposed so
/// tests can run the multi-segment path at small shapes.
#[allow(clippy::too_many_arguments)]
pub fn mla_prefill_expanded_segmented(
    isa: Isa,
    cache: &LatentCache,
    seq: &SeqPages,
    start: usize,
    heads: usize,
    q: &[f32],
    kv_b: &Weight,
    nope: usize,
    scale: f32,
    segment: usize,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "mla_prefill_expanded";
    if segment == 0 || !segment.is_multiple_of(MLA_BLOCK) {
        return Err(shape(
            OP,
            format!("segment of {segment} tokens is not a positive multiple of {MLA_BLOCK}"),
        ));
    }
    let (r, p) = (cache.kv_lora_rank, cache.rope_dim);
    if heads == 0 || kv_b.cols != r || !kv_b.rows.is_multiple_of(heads) || kv_b.rows / heads <= nope
    {
        return Err(shape(
            OP,
            format!(
                "kv_b [{}, {}] for {heads} heads, nope {nope}, rank {r}",
                kv_b.rows, kv_b.cols
            ),
        ));
    }
    let (hv, dq) = (kv_b.rows / heads, nope + p);
    let v = hv - nope;
    if !q.len().is_multiple_of(heads * dq) {
        return Err(shape(
            OP,
            format!("q {} for {heads} heads of {dq}", q.len()),
        ));
    }
    let chunk = q.len() / (heads * dq);
    if out.len() != chunk * heads * v {
        return Err(shape(
            OP,
            format!("out {} for {chunk} tokens × {heads} heads × {v}", out.len()),
        ));
    }
    if !check_chunk(OP, cache, seq, start, chunk)? {
        return Ok(());
    }
    let len = start + chunk;
    let ks = heads * hv;
    let seg = segment.min(len.div_ceil(MLA_BLOCK) * MLA_BLOCK);
    let mut lat = vec![0f32; seg * r];
    let mut kpe = vec![0f32; seg * p];
    // K/V rows are read 16 values at a time: pad so the last head's last partial panel stays
    // inside the buffer.
    let mut kv = vec![0f32; seg * ks + NW];
    // Running max and sum per (head, query); the unnormalised output accumulates in `out`.
    let mut m_run = vec![f32::NEG_INFINITY; heads * chunk];
    let mut l_run = vec![0f32; heads * chunk];
    out.fill(0.0);
    let op = SyncPtr(out.as_mut_ptr());
    for s0 in (0..len).step_by(seg) {
        let sn = seg.min(len - s0);
        gather_latents(isa, cache, seq.pages, s0, sn, &mut lat, &mut kpe);
        matmul_with(
            isa,
            &lat[..sn * r],
            sn,
            kv_b,
            Epilogue::Store,
            &mut kv[..sn * ks],
        )?;
        let seg_kv = SegmentKv {
            s0,
            sn,
            kv: &kv,
            ks,
            hv,
            kpe: &kpe,
        };
        let mut tasks = Vec::new();
        for (h, (mh, lh)) in m_run
            .chunks_mut(chunk)
            .zip(l_run.chunks_mut(chunk))
            .enumerate()
        {
            for (ti, (mt, lt)) in mh.chunks_mut(EXP_QT).zip(lh.chunks_mut(EXP_QT)).enumerate() {
                let q0 = ti * EXP_QT;
                // The tile's last query sees keys < start + q0 + len(tile).
                if s0 < start + q0 + mt.len() {
                    tasks.push((h, q0, mt, lt));
                }
            }
        }
        tasks.into_par_iter().for_each(|(h, q0, mt, lt)| {
            let tile = QueryTile {
                h,
                q0,
                heads,
                start,
                nope,
                rope: p,
                v,
            };
            // SAFETY: the task writes rows q0..q0+len of head h of `out` only; tasks differ
            // in (h, q0).
            unsafe { expanded_tile(isa, &tile, q, scale, &seg_kv, op, mt, lt) };
        });
    }
    for (qi, row) in out.chunks_exact_mut(heads * v).enumerate() {
        for (h, o) in row.chunks_exact_mut(v).enumerate() {
            let inv = 1.0 / l_run[h * chunk + qi];
            for x in o {
                *x *= inv;
            }
        }
    }
    Ok(())
}

/// A raw output pointer that tasks writing disjoint rows share.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// One segment of decompressed context: keys `s0..s0+sn`, K_nope/V rows `[sn, heads·hv]` with
/// row stride `ks` (head h at `h·hv`: nope values then v values), k_pe rows `[sn, rope]`.
struct SegmentKv<'a> {
    s0: usize,
    sn: usize,
    kv: &'a [f32],
    ks: usize,
    hv: usize,
    kpe: &'a [f32],
}

/// The queries of one expanded-prefill task: head `h`, chunk rows from `q0`.
struct QueryTile {
    h: usize,
    q0: usize,
    heads: usize,
    start: usize,
    nope: usize,
    rope: usize,
    v: usize,
}

/// Copies the latents and k_pe of tokens `t0..t0+n` of a sequence into `[n, r]` and
/// `[n, rope]` f32 rows.
fn gather_latents(
    isa: Isa,
    cache: &LatentCache,
    pages: &[u32],
    t0: usize,
    n: usize,
    lat: &mut [f32],
    kpe: &mut [f32],
) {
    let (r, p, e) = (cache.kv_lora_rank, cache.rope_dim, cache.entry());
    let mut conv = vec![0f32; e];
    for i in 0..n {
        let pos = t0 + i;
        let tok = pages[pos / MLA_BLOCK] as usize * MLA_BLOCK + pos % MLA_BLOCK;
        let off = tok * e;
        let src: &[f32] = match cache.data {
            CacheData::F32(d) => &d[off..off + e],
            CacheData::Bf16(d) => {
                cpu::convert_bf16(isa, &d[off..off + e], &mut conv);
                &conv
            }
            CacheData::Fp8 { q, scale } => {
                cpu::convert_fp8(isa, &q[off..off + e], scale[tok], &mut conv);
                &conv
            }
        };
        lat[i * r..(i + 1) * r].copy_from_slice(&src[..r]);
        kpe[i * p..(i + 1) * p].copy_from_slice(&src[r..]);
    }
}

/// Online-softmax attention of one (head, query tile) over one segment of keys, accumulating
/// the unnormalised output into `out` and the running max/sum into `m_run`/`l_run`.
///
/// # Safety
/// `out` must point at `[chunk, heads, v]` floats, and no other thread may touch rows
/// `q0..q0+m_run.len()` of head `h`.
#[allow(clippy::too_many_arguments)]
unsafe fn expanded_tile(
    isa: Isa,
    qt: &QueryTile,
    q: &[f32],
    scale: f32,
    seg: &SegmentKv,
    out: SyncPtr,
    m_run: &mut [f32],
    l_run: &mut [f32],
) {
    let (h, q0, heads, nope, p, v) = (qt.h, qt.q0, qt.heads, qt.nope, qt.rope, qt.v);
    let dq = nope + p;
    let hn = m_run.len();
    let panels = hn.div_ceil(NR);
    let hp = panels * NR;
    // Qᵀ of the tile as 16-query micro-panels [panel][dq][16], softmax scale folded in.
    let mut qp = vec![0f32; panels * dq * NR];
    for j in 0..hn {
        let src = &q[((q0 + j) * heads + h) * dq..][..dq];
        let dst = &mut qp[(j / NR) * dq * NR + j % NR..];
        for (k, &x) in src.iter().enumerate() {
            dst[k * NR] = scale * x;
        }
    }
    let limits: Vec<usize> = (0..hn).map(|j| qt.start + q0 + j + 1).collect();
    let kend = (seg.s0 + seg.sn).min(qt.start + q0 + hn);
    let mut st = vec![0f32; MLA_BLOCK * hp];
    let mut colmax = vec![0f32; hn];
    let ldo = heads * v;
    // SAFETY (whole function): rows q0..q0+hn of head h are this task's (caller).
    let o_row = |j: usize| unsafe { out.0.add((q0 + j) * ldo + h * v) };
    for t0 in (seg.s0..kend).step_by(MLA_BLOCK) {
        let tp = MLA_BLOCK.min(kend - t0);
        let kr = t0 - seg.s0;
        // Sᵀ[t][j] = k_nope_t · q_nope_j + k_pe_t · q_pe_j.
        for tb in (0..tp).step_by(MR) {
            for pn in (0..panels).step_by(2) {
                let base = Tile {
                    kc: nope,
                    a: seg.kv[(kr + tb) * seg.ks + h * seg.hv..].as_ptr(),
                    rsa: seg.ks,
                    csa: 1,
                    b: qp[pn * dq * NR..].as_ptr(),
                    rsb: NR,
                    c: st[tb * hp + pn * NR..].as_mut_ptr(),
                    ldc: hp,
                    mr: MR.min(tp - tb),
                    nr: NW.min(hp - pn * NR),
                    accumulate: false,
                };
                let rope = Tile {
                    kc: p,
                    a: seg.kpe[(kr + tb) * p..].as_ptr(),
                    rsa: p,
                    b: qp[pn * dq * NR + nope * NR..].as_ptr(),
                    accumulate: true,
                    ..base
                };
                // SAFETY: key rows kr+tb.. of the segment (mr of them), nope K values of head h
                // and p k_pe values each; Q panels pn (and pn+1 when nr > 16) are padded to 16
                // queries; a row of Sᵀ holds hp ≥ pn·16 + nr values.
                unsafe {
                    microkernel_wide(isa, &base, dq * NR);
                    microkernel_wide(isa, &rope, dq * NR);
                }
            }
        }
        softmax_block(
            isa,
            &mut st,
            hp,
            tp,
            t0,
            &limits,
            m_run,
            l_run,
            &mut colmax,
            |j, corr| {
                // SAFETY: row j of this task's output, v values.
                let o = unsafe { std::slice::from_raw_parts_mut(o_row(j), v) };
                for x in o {
                    *x *= corr;
                }
            },
        );
        // O[j] += Σ_t P[t][j] · v_t.
        for jb in (0..hn).step_by(MR) {
            for nb in (0..v).step_by(NW) {
                let t = Tile {
                    kc: tp,
                    a: st[jb..].as_ptr(),
                    rsa: 1,
                    csa: hp,
                    b: seg.kv[kr * seg.ks + h * seg.hv + nope + nb..].as_ptr(),
                    rsb: seg.ks,
                    c: unsafe { o_row(jb).add(nb) },
                    ldc: ldo,
                    mr: MR.min(hn - jb),
                    nr: NW.min(v - nb),
                    accumulate: true,
                };
                // SAFETY: P rows jb..jb+mr over tp keys; V values nb.. of head h of each key
                // (reads past v stay inside the row or the buffer's padding); output rows
                // jb..jb+mr of this task, nr ≤ v - nb columns.
                unsafe { microkernel_wide(isa, &t, NR) };
            }
        }
    }
}

/// Attention of `hn` query rows over the first `limit(j)` tokens of the sequence (row j).
#[allow(clippy::too_many_arguments)]
fn attend(
    isa: Isa,
    cache: &LatentCache,
    pages: &[u32],
    q_abs: &[f32],
    q_pe: &[f32],
    limit: &(dyn Fn(usize) -> usize + Sync),
    scale: f32,
    out: &mut [f32],
) {
    let (r, p, e) = (cache.kv_lora_rank, cache.rope_dim, cache.entry());
    let hn = out.len() / r;
    let panels = hn.div_ceil(NR);
    let hp = panels * NR;
    // Qᵀ as 16-row micro-panels [panel][e][16], softmax scale folded in. The buffers are the
    // thread's scratch: decode steps allocate nothing here once warm.
    let mut qp = scratch::take(panels * e * NR);
    for j in 0..hn {
        let (pi, jj) = (j / NR, j % NR);
        let dst = &mut qp[pi * e * NR..];
        for k in 0..r {
            dst[k * NR + jj] = scale * q_abs[j * r + k];
        }
        for k in 0..p {
            dst[(r + k) * NR + jj] = scale * q_pe[j * p + k];
        }
    }
    let mut limits = scratch::take::<usize>(hn);
    for (j, l) in limits.iter_mut().enumerate() {
        *l = limit(j);
    }
    let maxlen = limits.iter().copied().max().unwrap_or(0);
    let mut o = scratch::take(hn * r);
    let mut st = scratch::take(MLA_BLOCK * hp);
    let mut m_run = scratch::filled(hn, f32::NEG_INFINITY);
    let mut l_run = scratch::take(hn);
    let mut colmax = scratch::take(hn);
    let mut conv = scratch::take(match cache.data {
        CacheData::Bf16(_) | CacheData::Fp8 { .. } => MLA_BLOCK * e,
        CacheData::F32(_) => 0,
    });
    for (pi, t0) in (0..maxlen).step_by(MLA_BLOCK).enumerate() {
        let tp = MLA_BLOCK.min(maxlen - t0);
        let off = pages[pi] as usize * MLA_BLOCK * e;
        let page: &[f32] = match cache.data {
            CacheData::F32(d) => &d[off..off + tp * e],
            CacheData::Bf16(d) => {
                cpu::convert_bf16(isa, &d[off..off + tp * e], &mut conv[..tp * e]);
                &conv[..tp * e]
            }
            CacheData::Fp8 { q, scale } => {
                let tok0 = off / e;
                for (t, (dst, src)) in conv[..tp * e]
                    .chunks_exact_mut(e)
                    .zip(q[off..off + tp * e].chunks_exact(e))
                    .enumerate()
                {
                    cpu::convert_fp8(isa, src, scale[tok0 + t], dst);
                }
                &conv[..tp * e]
            }
        };
        // Sᵀ[t][j] = page_t · q_j (scaled), two Q panels per wide tile.
        for tb in (0..tp).step_by(MR) {
            for pn in (0..panels).step_by(2) {
                let t = Tile {
                    kc: e,
                    a: page[tb * e..].as_ptr(),
                    rsa: e,
                    csa: 1,
                    b: qp[pn * e * NR..].as_ptr(),
                    rsb: NR,
                    c: st[tb * hp + pn * NR..].as_mut_ptr(),
                    ldc: hp,
                    mr: MR.min(tp - tb),
                    nr: NW.min(hp - pn * NR),
                    accumulate: false,
                };
                // SAFETY: rows tb..tb+mr of the page; full padded Q panels pn (and pn+1 when
                // nr > 16); a row of Sᵀ is hp ≥ pn·16 + nr long.
                unsafe { microkernel_wide(isa, &t, e * NR) };
            }
        }
        softmax_block(
            isa,
            &mut st,
            hp,
            tp,
            t0,
            &limits,
            &mut m_run,
            &mut l_run,
            &mut colmax,
            |j, corr| {
                for v in &mut o[j * r..(j + 1) * r] {
                    *v *= corr;
                }
            },
        );
        // O[j] += Σ_t P[t][j] · c_t, 32 latent values per wide tile.
        for jb in (0..hn).step_by(MR) {
            for nb in (0..r).step_by(NW) {
                let t = Tile {
                    kc: tp,
                    a: st[jb..].as_ptr(),
                    rsa: 1,
                    csa: hp,
                    b: page[nb..].as_ptr(),
                    rsb: e,
                    c: o[jb * r + nb..].as_mut_ptr(),
                    ldc: r,
                    mr: MR.min(hn - jb),
                    nr: NW.min(r - nb),
                    accumulate: true,
                };
                // SAFETY: P rows jb..jb+mr over tp tokens; nr ≤ 32 latent values of each token
                // starting at nb (r is a multiple of 16, so each half read is inside the
                // token's entry); O rows jb..jb+mr.
                unsafe { microkernel_wide(isa, &t, NR) };
            }
        }
    }
    for j in 0..hn {
        let inv = 1.0 / l_run[j];
        for (d, v) in out[j * r..(j + 1) * r]
            .iter_mut()
            .zip(&o[j * r..(j + 1) * r])
        {
            *d = v * inv;
        }
    }
}

/// One key block of the online (flash-style) softmax. `st` holds Sᵀ `[tp][hp]` (key t of the
/// block starting at absolute position `t0`, query row j < `limits.len()`). Keys at or past
/// `limits[j]` are masked, the running max and sum of every row are updated, `rescale(j, c)`
/// is called to multiply row j's output accumulator by c when its max moved, and `st` is left
/// holding the unnormalised probabilities P.
///
/// Every row must see at least one key in its first block (all callers start at key 0, which
/// every query sees), so a running max is never −∞ once a later block masks a row entirely.
#[allow(clippy::too_many_arguments)]
fn softmax_block(
    isa: Isa,
    st: &mut [f32],
    hp: usize,
    tp: usize,
    t0: usize,
    limits: &[usize],
    m_run: &mut [f32],
    l_run: &mut [f32],
    colmax: &mut [f32],
    mut rescale: impl FnMut(usize, f32),
) {
    let hn = limits.len();
    for (j, &lim) in limits.iter().enumerate() {
        for t in lim.saturating_sub(t0)..tp {
            st[t * hp + j] = f32::NEG_INFINITY;
        }
    }
    colmax[..hn].copy_from_slice(&st[..hn]);
    for t in 1..tp {
        for (c, &v) in colmax[..hn].iter_mut().zip(&st[t * hp..t * hp + hn]) {
            if v > *c {
                *c = v;
            }
        }
    }
    for j in 0..hn {
        let m_new = m_run[j].max(colmax[j]);
        // Rows whose limit ends before this block keep their state.
        let corr = if m_new == f32::NEG_INFINITY {
            1.0
        } else {
            (m_run[j] - m_new).exp()
        };
        m_run[j] = m_new;
        l_run[j] *= corr;
        if corr != 1.0 {
            rescale(j, corr);
        }
    }
    for t in 0..tp {
        let row = &mut st[t * hp..t * hp + hn];
        for (v, &m) in row.iter_mut().zip(m_run.iter()) {
            *v -= m;
        }
        cpu::exp_inplace(isa, row);
        for (l, &v) in l_run.iter_mut().zip(row.iter()) {
            *l += v;
        }
    }
}

/// Plain references in f64, one (sequence, head) at a time.
pub mod reference {
    use super::*;

    /// Attention of one query row over tokens `0..len`.
    pub fn attend_row(
        cache: &LatentCache,
        pages: &[u32],
        len: usize,
        q_abs: &[f32],
        q_pe: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        let r = cache.kv_lora_rank;
        let toks: Vec<Vec<f32>> = (0..len).map(|t| cache.token(pages, t)).collect();
        let s: Vec<f64> = toks
            .iter()
            .map(|c| {
                let a: f64 = (0..r).map(|k| q_abs[k] as f64 * c[k] as f64).sum();
                let b: f64 = q_pe
                    .iter()
                    .enumerate()
                    .map(|(k, &q)| q as f64 * c[r + k] as f64)
                    .sum();
                scale as f64 * (a + b)
            })
            .collect();
        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..r)
            .map(|k| {
                (w.iter()
                    .zip(&toks)
                    .map(|(p, c)| p * c[k] as f64)
                    .sum::<f64>()
                    / z) as f32
            })
            .collect()
    }

    pub fn mla_decode(
        cache: &LatentCache,
        seqs: &[SeqPages],
        heads: usize,
        q_abs: &[f32],
        q_pe: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        let (r, p) = (cache.kv_lora_rank, cache.rope_dim);
        let mut out = Vec::new();
        for (b, s) in seqs.iter().enumerate() {
            for h in 0..heads {
                let row = b * heads + h;
                out.extend(attend_row(
                    cache,
                    s.pages,
                    s.len,
                    &q_abs[row * r..(row + 1) * r],
                    &q_pe[row * p..(row + 1) * p],
                    scale,
                ));
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mla_prefill(
        cache: &LatentCache,
        seq: &SeqPages,
        start: usize,
        heads: usize,
        q_abs: &[f32],
        q_pe: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        let (r, p) = (cache.kv_lora_rank, cache.rope_dim);
        let rows = q_abs.len() / r;
        (0..rows)
            .flat_map(|row| {
                attend_row(
                    cache,
                    seq.pages,
                    start + row / heads + 1,
                    &q_abs[row * r..(row + 1) * r],
                    &q_pe[row * p..(row + 1) * p],
                    scale,
                )
            })
            .collect()
    }

    /// The expanded form in f64: K_nope and V of every context token decompressed with
    /// `kv_b`, one (query, head) at a time. `q` is `[chunk, heads, nope + rope]`; the result
    /// `[chunk, heads, v]`.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_prefill_expanded(
        cache: &LatentCache,
        seq: &SeqPages,
        start: usize,
        heads: usize,
        q: &[f32],
        kv_b: &Weight,
        nope: usize,
        scale: f32,
    ) -> Vec<f32> {
        let (r, p) = (cache.kv_lora_rank, cache.rope_dim);
        let hv = kv_b.rows / heads;
        let (v, dq) = (hv - nope, nope + p);
        let chunk = q.len() / (heads * dq);
        let len = start + chunk;
        let toks: Vec<Vec<f32>> = (0..len).map(|t| cache.token(seq.pages, t)).collect();
        // kvs[t][row] = kv_b[row] · c_t
        let kvs: Vec<Vec<f64>> = toks
            .iter()
            .map(|c| {
                (0..kv_b.rows)
                    .map(|row| (0..r).map(|k| kv_b.get(row, k) as f64 * c[k] as f64).sum())
                    .collect()
            })
            .collect();
        let mut out = Vec::with_capacity(chunk * heads * v);
        for i in 0..chunk {
            for h in 0..heads {
                let qr = &q[(i * heads + h) * dq..][..dq];
                let n = start + i + 1;
                let s: Vec<f64> = (0..n)
                    .map(|t| {
                        let a: f64 = (0..nope).map(|k| qr[k] as f64 * kvs[t][h * hv + k]).sum();
                        let b: f64 = (0..p)
                            .map(|k| qr[nope + k] as f64 * toks[t][r + k] as f64)
                            .sum();
                        scale as f64 * (a + b)
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = w.iter().sum();
                for d in 0..v {
                    let acc: f64 = (0..n).map(|t| w[t] * kvs[t][h * hv + nope + d]).sum();
                    out.push((acc / z) as f32);
                }
            }
        }
        out
    }
}
