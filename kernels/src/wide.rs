//! The 6×32 register tile of the compute-bound kernels (prefill GEMM, MLA attention).
//!
//! Zen 4/5 and recent Intel server cores execute 512-bit FMAs at full rate: on the development
//! box (EPYC, Zen 5) a register-resident 512-bit FMA loop runs 2.2–2.3× the FLOP/s of the same
//! loop in 256-bit. The shared 6×16 AVX2 tile ([`crate::cpu::microkernel`]) cannot use that,
//! so compute-bound kernels call [`microkernel_wide`]: on [`Isa::Avx512`] one tile is 6 rows ×
//! two 16-lane vectors (12 zmm accumulators, two B loads and six broadcasts per k); elsewhere
//! it is two 6×16 tiles. The B operand keeps the 16-column panel layout every kernel already
//! packs: columns 16..32 are read `b_hi` floats after columns 0..16, so two adjacent packed
//! panels (or 32 consecutive values of a row) form one wide tile.

use crate::cpu::{self, Isa, NR, Tile};
use crate::weight::{FP8_BLOCK, Weight};

/// Columns of the wide tile.
pub(crate) const NW: usize = 2 * NR;

/// C (+)= A·B over `t.mr` ≤ 6 rows and `t.nr` ≤ 32 columns; columns `16..t.nr` read B at
/// `t.b + b_hi` (row k: 16 floats at `t.b + b_hi + k·rsb`). As with the narrow tile, 16 B values
/// are read per half in use, so each half must be padded to 16 columns; the second half is not
/// read when `t.nr ≤ 16`.
///
/// # Safety
/// Every address the tile describes must be valid for reads (A, B) and writes (C).
#[inline]
pub(crate) unsafe fn microkernel_wide(isa: Isa, t: &Tile, b_hi: usize) {
    debug_assert!(t.mr <= cpu::MR && t.nr <= NW && t.nr > 0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            let two = t.nr > NR;
            match (t.mr, two) {
                (6, true) => avx512::kern::<6, 2>(t, b_hi),
                (5, true) => avx512::kern::<5, 2>(t, b_hi),
                (4, true) => avx512::kern::<4, 2>(t, b_hi),
                (3, true) => avx512::kern::<3, 2>(t, b_hi),
                (2, true) => avx512::kern::<2, 2>(t, b_hi),
                (1, true) => avx512::kern::<1, 2>(t, b_hi),
                (6, false) => avx512::kern::<6, 1>(t, b_hi),
                (5, false) => avx512::kern::<5, 1>(t, b_hi),
                (4, false) => avx512::kern::<4, 1>(t, b_hi),
                (3, false) => avx512::kern::<3, 1>(t, b_hi),
                (2, false) => avx512::kern::<2, 1>(t, b_hi),
                (1, false) => avx512::kern::<1, 1>(t, b_hi),
                _ => {}
            }
        },
        _ => unsafe {
            let lo = Tile {
                nr: t.nr.min(NR),
                ..*t
            };
            cpu::microkernel(isa, &lo);
            if t.nr > NR {
                let hi = Tile {
                    b: t.b.add(b_hi),
                    c: t.c.add(NR),
                    nr: t.nr - NR,
                    ..*t
                };
                cpu::microkernel(isa, &hi);
            }
        },
    }
}

/// Deepest panel [`pack_panel`] takes (the prefill GEMM's KC).
pub(crate) const PACK_KC_MAX: usize = 256;

/// Dequantises rows `r0..r0+rows` (`rows` ≤ 16), columns `k0..k0+kc`, of `w` into the
/// 16-wide micro-panel `panel` (`[kc][16]`, scale applied, rows past `rows` zero): the B
/// operand of the prefill GEMM. On AVX-512 the rows are dequantised with the vector path and
/// transposed 16×16 in registers; the scalar transpose it replaces cost about as much as the
/// FMAs of a 32-row expert GEMM.
pub(crate) fn pack_panel(
    isa: Isa,
    w: &Weight,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    panel: &mut [f32],
) {
    debug_assert!(rows <= NR && kc <= PACK_KC_MAX && panel.len() >= kc * NR);
    // The rows' next KC columns are needed a whole k-block of tile work later: prefetch them
    // into L2 now (and this block too when it is the first), so the dequantisation streams
    // from cache instead of waiting on memory one short row segment at a time.
    if k0 == 0 {
        prefetch_rows(w, r0, rows, 0, kc);
    }
    prefetch_rows(w, r0, rows, k0 + kc, PACK_KC_MAX);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { avx512::pack_panel(w, r0, rows, k0, kc, panel) },
        _ => {
            let mut rowbuf = [0f32; PACK_KC_MAX];
            for j in 0..NR {
                if j < rows {
                    cpu::dequant_row(isa, w, r0 + j, k0, &mut rowbuf[..kc]);
                    for (kk, v) in rowbuf[..kc].iter().enumerate() {
                        panel[kk * NR + j] = *v;
                    }
                } else {
                    for kk in 0..kc {
                        panel[kk * NR + j] = 0.0;
                    }
                }
            }
        }
    }
}

/// Prefetches (into L2) the stored bytes of columns `c0..c0+n` (clamped to the matrix) of rows
/// `r0..r0+rows`. Only a hint: nothing is read, so any range is safe.
fn prefetch_rows(w: &Weight, r0: usize, rows: usize, c0: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let (bytes, kind, _) = cpu::weight_parts(w);
        let c1 = (c0 + n).min(w.cols);
        if c0 >= c1 {
            return;
        }
        let es = match kind {
            cpu::KIND_FP8 => 1,
            cpu::KIND_F32 => 4,
            _ => 2,
        };
        for r in r0..(r0 + rows).min(w.rows) {
            let (b0, b1) = ((r * w.cols + c0) * es, (r * w.cols + c1) * es);
            for off in (b0..b1).step_by(64).chain(std::iter::once(b1 - 1)) {
                // SAFETY: a prefetch hint at an address inside `bytes`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(off) as *const i8) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, r0, rows, c0, n);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// `R`×(16·`H`) tile: R·H zmm accumulators, one broadcast per row and k.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kern<const R: usize, const H: usize>(t: &Tile, b_hi: usize) {
        let mut acc = [[_mm512_setzero_ps(); H]; R];
        unsafe {
            let mut a = t.a;
            let mut b = t.b;
            for _ in 0..t.kc {
                let mut bv = [_mm512_setzero_ps(); H];
                for (h, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(b.add(h * b_hi));
                }
                for (i, ai) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(i * t.rsa));
                    for h in 0..H {
                        ai[h] = _mm512_fmadd_ps(av, bv[h], ai[h]);
                    }
                }
                a = a.add(t.csa);
                b = b.add(t.rsb);
            }
            let masks = half_masks::<H>(t.nr);
            for (i, ai) in acc.iter().enumerate() {
                let c = t.c.add(i * t.ldc);
                for h in 0..H {
                    let ch = c.add(h * NR);
                    let mut v = ai[h];
                    if t.accumulate {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], ch));
                    }
                    _mm512_mask_storeu_ps(ch, masks[h], v);
                }
            }
        }
    }

    /// [`super::pack_panel`]: 16 rows dequantised into a row buffer, then 16×16 blocks
    /// transposed with two unpack and two 128-bit-lane shuffle stages.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn pack_panel(
        w: &Weight,
        r0: usize,
        rows: usize,
        k0: usize,
        kc: usize,
        panel: &mut [f32],
    ) {
        if let (crate::weight::WeightData::Fp8E4m3 { q, scale_inv }, true) =
            (w.data, k0.is_multiple_of(NR))
        {
            unsafe { pack_fp8(q, scale_inv, w.cols, r0, rows, k0, kc, panel) };
            return;
        }
        let mut buf = [0f32; NR * PACK_KC_MAX];
        for j in 0..rows {
            cpu::dequant_row(Isa::Avx512, w, r0 + j, k0, &mut buf[j * kc..(j + 1) * kc]);
        }
        let full = kc / NR * NR;
        unsafe {
            let src = buf.as_ptr();
            let dst = panel.as_mut_ptr();
            for kb in (0..full).step_by(NR) {
                let mut r = [_mm512_setzero_ps(); NR];
                for (j, v) in r.iter_mut().enumerate().take(rows) {
                    *v = _mm512_loadu_ps(src.add(j * kc + kb));
                }
                let t = transpose16(r);
                for (i, v) in t.iter().enumerate() {
                    _mm512_storeu_ps(dst.add((kb + i) * NR), *v);
                }
            }
        }
        for kk in full..kc {
            for j in 0..NR {
                panel[kk * NR + j] = if j < rows { buf[j * kc + kk] } else { 0.0 };
            }
        }
    }

    /// [`pack_panel`] for FP8 weights: each row's 16 codes of a column block are converted
    /// straight into a 16-lane register (the shift-and-mask f16 trick of `crate::cpu`, block
    /// scale·2⁸ applied), transposed, and stored; no row buffer.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn pack_fp8(
        q: &[u8],
        scale_inv: &[f32],
        cols: usize,
        r0: usize,
        rows: usize,
        k0: usize,
        kc: usize,
        panel: &mut [f32],
    ) {
        let kbs = cols.div_ceil(FP8_BLOCK);
        let full = kc / NR * NR;
        let mask = _mm256_set1_epi16(0xBF80u16 as i16);
        unsafe {
            let dst = panel.as_mut_ptr();
            for kb in (0..full).step_by(NR) {
                let c = k0 + kb;
                let mut r = [_mm512_setzero_ps(); NR];
                for (j, v) in r.iter_mut().enumerate().take(rows) {
                    let row = r0 + j;
                    let s = scale_inv[(row / FP8_BLOCK) * kbs + c / FP8_BLOCK] * 256.0;
                    let b = _mm_loadu_si128(q.as_ptr().add(row * cols + c) as *const __m128i);
                    let w = _mm256_cvtepu8_epi16(b);
                    let t = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 1);
                    let h = _mm256_and_si256(t, mask);
                    *v = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(s));
                }
                let t = transpose16(r);
                for (i, v) in t.iter().enumerate() {
                    _mm512_storeu_ps(dst.add((kb + i) * NR), *v);
                }
            }
        }
        for kk in full..kc {
            for j in 0..NR {
                panel[kk * NR + j] = if j < rows {
                    let row = r0 + j;
                    let c = k0 + kk;
                    crate::fp8::E4M3_TABLE[q[row * cols + c] as usize]
                        * scale_inv[(row / FP8_BLOCK) * kbs + c / FP8_BLOCK]
                } else {
                    0.0
                };
            }
        }
    }

    /// The store masks of a tile's `H` 16-column halves for `nr` columns in use.
    #[inline(always)]
    fn half_masks<const H: usize>(nr: usize) -> [__mmask16; H] {
        std::array::from_fn(|h| {
            let n = nr.saturating_sub(h * NR).min(NR);
            if n == NR { 0xffff } else { (1u16 << n) - 1 }
        })
    }

    /// [`super::microkernel_pairs`]: `R`×(16·`H`) accumulators, one 32-bit broadcast of x's
    /// pair per row and pair step, `H` B loads.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn kern_pairs<const R: usize, const H: usize>(t: &PairTile, b_hi: usize) {
        let mut acc = [[_mm512_setzero_ps(); H]; R];
        unsafe {
            let mut a = t.a;
            let mut b = t.b;
            for _ in 0..t.pairs {
                let mut bv = [std::mem::transmute::<__m512, __m512bh>(_mm512_setzero_ps()); H];
                for (h, v) in bv.iter_mut().enumerate() {
                    *v = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        b.add(h * b_hi) as *const _,
                    ));
                }
                for (i, ai) in acc.iter_mut().enumerate() {
                    let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *a.add(i * t.rsa) as i32,
                    ));
                    for h in 0..H {
                        ai[h] = _mm512_dpbf16_ps(ai[h], av, bv[h]);
                    }
                }
                a = a.add(1);
                b = b.add(NR);
            }
            let masks = half_masks::<H>(t.nr);
            for (i, ai) in acc.iter().enumerate() {
                let c = t.c.add(i * t.ldc);
                for h in 0..H {
                    let ch = c.add(h * NR);
                    let s = _mm512_set1_ps(t.scale[h]);
                    let v = if t.accumulate {
                        _mm512_fmadd_ps(ai[h], s, _mm512_maskz_loadu_ps(masks[h], ch))
                    } else {
                        _mm512_mul_ps(ai[h], s)
                    };
                    _mm512_mask_storeu_ps(ch, masks[h], v);
                }
            }
        }
    }

    /// [`super::pack_pairs`]: 32 columns of each of the 16 rows become one vector of 16 bf16
    /// pairs (FP8 through the f16 route of [`pack_fp8`], exact), and the 16×16 block of pairs
    /// is transposed like f32 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
    pub(super) unsafe fn pack_pairs(
        w: &Weight,
        r0: usize,
        rows: usize,
        k0: usize,
        kc: usize,
        panel: &mut [u32],
    ) {
        use crate::weight::WeightData;
        let cols = w.cols;
        let pairs = kc.div_ceil(2);
        let full = kc / 32 * 32;
        let dst = panel.as_mut_ptr();
        let mask = _mm256_set1_epi16(0xBF80u16 as i16);
        let two8 = _mm512_set1_ps(256.0);
        let elem = |j: usize, c: usize| -> u32 {
            match w.data {
                WeightData::Fp8E4m3 { q, .. } => {
                    crate::fp8::E4M3_TABLE[q[(r0 + j) * cols + c] as usize].to_bits() >> 16
                }
                WeightData::Bf16(b) => {
                    let i = 2 * ((r0 + j) * cols + c);
                    u16::from_le_bytes([b[i], b[i + 1]]) as u32
                }
                _ => unreachable!("pack_pairs on a weight the pair tiles do not serve"),
            }
        };
        unsafe {
            for kb in (0..full).step_by(32) {
                let mut r = [_mm512_setzero_ps(); NR];
                for (j, v) in r.iter_mut().enumerate().take(rows) {
                    let off = (r0 + j) * cols + k0 + kb;
                    *v = match w.data {
                        WeightData::Fp8E4m3 { q, .. } => {
                            let p = q.as_ptr().add(off);
                            let half = |p: *const u8| {
                                let b = _mm_loadu_si128(p as *const __m128i);
                                let t = _mm256_srai_epi16(
                                    _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8),
                                    1,
                                );
                                _mm512_mul_ps(_mm512_cvtph_ps(_mm256_and_si256(t, mask)), two8)
                            };
                            let (lo, hi) = (half(p), half(p.add(16)));
                            std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo))
                        }
                        WeightData::Bf16(b) => {
                            _mm512_loadu_ps(b.as_ptr().add(2 * off) as *const f32)
                        }
                        _ => unreachable!("pack_pairs on a weight the pair tiles do not serve"),
                    };
                }
                let t = transpose16(r);
                for (i, v) in t.iter().enumerate() {
                    _mm512_storeu_ps(dst.add((kb / 2 + i) * NR) as *mut f32, *v);
                }
            }
        }
        for p in full / 2..pairs {
            for j in 0..NR {
                let c = k0 + 2 * p;
                panel[p * NR + j] = if j < rows {
                    let lo = elem(j, c);
                    let hi = if 2 * p + 1 < kc { elem(j, c + 1) } else { 0 };
                    lo | hi << 16
                } else {
                    0
                };
            }
        }
    }

    /// One row of [`super::round_rows`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn round_row(x: &[f32], out: &mut [u16]) {
        let k = x.len();
        let mut c = 0;
        unsafe {
            while c < k {
                let n = (k - c).min(16);
                let mask: u16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(c));
                let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(out.as_mut_ptr().add(c) as *mut i16, mask, b);
                c += 16;
            }
        }
        if k % 2 == 1 {
            out[k] = 0;
        }
    }

    /// Transposes a 16×16 f32 block held as 16 row vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Stage 1: interleave row pairs within 128-bit lanes.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Stage 2: u[4g + c] holds, for rows 4g..4g+4, columns c, c+4, c+8, c+12 (one per lane).
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            let (a, b, c, d) = (
                _mm512_castps_pd(a),
                _mm512_castps_pd(b),
                _mm512_castps_pd(c),
                _mm512_castps_pd(d),
            );
            u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
            u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
        }
        // Stages 3 and 4: gather the four row groups' lanes of each column.
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let a = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let b = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let cc = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let d = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(a, cc);
            out[c + 8] = _mm512_shuffle_f32x4::<0xdd>(a, cc);
            out[c + 4] = _mm512_shuffle_f32x4::<0x88>(b, d);
            out[c + 12] = _mm512_shuffle_f32x4::<0xdd>(b, d);
        }
        out
    }
}

/// Operands of one bf16 register tile: C[i][j] (+)= s_h · Σ_p A(i,p)·B(p,j), where A(i,p) is
/// the u32 at `a + i·rsa + p` (x's bf16 values k = 2p, 2p+1 of row i) and row p of B is the 16
/// u32 at `b + p·16` (the same two k of 16 weight rows); columns `16..nr` read B at
/// `b + b_hi`. `scale[h]` multiplies the products of half h (the FP8 block scale of its 16
/// weight rows, 1 for BF16), so weights stay exact in bf16 and one call covers one scale block.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct PairTile {
    pub pairs: usize,
    pub a: *const u32,
    pub rsa: usize,
    pub b: *const u32,
    pub c: *mut f32,
    pub ldc: usize,
    pub mr: usize,
    pub nr: usize,
    pub accumulate: bool,
    pub scale: [f32; 2],
}

/// Runs one bf16 pair tile ([`PairTile`]): `vdpbf16ps` does two multiply-adds per lane in one
/// instruction at the FMA's issue rate, so the tile has twice the f32 microkernel's rate.
///
/// # Safety
/// The CPU must have AVX512-BF16; every address the tile describes must be valid.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) unsafe fn microkernel_pairs(t: &PairTile, b_hi: usize) {
    debug_assert!(t.mr <= cpu::MR && t.nr <= NW && t.nr > 0);
    let two = t.nr > NR;
    unsafe {
        match (t.mr, two) {
            (6, true) => avx512::kern_pairs::<6, 2>(t, b_hi),
            (5, true) => avx512::kern_pairs::<5, 2>(t, b_hi),
            (4, true) => avx512::kern_pairs::<4, 2>(t, b_hi),
            (3, true) => avx512::kern_pairs::<3, 2>(t, b_hi),
            (2, true) => avx512::kern_pairs::<2, 2>(t, b_hi),
            (1, true) => avx512::kern_pairs::<1, 2>(t, b_hi),
            (6, false) => avx512::kern_pairs::<6, 1>(t, b_hi),
            (5, false) => avx512::kern_pairs::<5, 1>(t, b_hi),
            (4, false) => avx512::kern_pairs::<4, 1>(t, b_hi),
            (3, false) => avx512::kern_pairs::<3, 1>(t, b_hi),
            (2, false) => avx512::kern_pairs::<2, 1>(t, b_hi),
            (1, false) => avx512::kern_pairs::<1, 1>(t, b_hi),
            _ => {}
        }
    }
}

/// Packs rows `r0..r0+rows` (`rows` ≤ 16), columns `k0..k0+kc` of the FP8 or BF16 weight `w`
/// into the pair micro-panel `panel` (`[kc/2 rounded up][16]` u32: two bf16 of one weight row,
/// k even in the low half; rows past `rows` and a last odd column zero). The values are the
/// stored ones, exact in bf16 (FP8 codes unscaled: the caller applies the block scale to the
/// products, [`PairTile::scale`]).
///
/// # Safety
/// The CPU must have AVX512-BF16; `w` must be FP8 or BF16.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn pack_pairs(
    w: &Weight,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    panel: &mut [u32],
) {
    let pairs = kc.div_ceil(2);
    debug_assert!(rows <= NR && kc <= PACK_KC_MAX && panel.len() >= pairs * NR);
    if k0 == 0 {
        prefetch_rows(w, r0, rows, 0, kc);
    }
    prefetch_rows(w, r0, rows, k0 + kc, PACK_KC_MAX);
    unsafe { avx512::pack_pairs(w, r0, rows, k0, kc, panel) }
}

/// The per-half scales of a pair tile whose 16-row halves start at weight rows `r0` and
/// `r0 + 16`, over the columns of scale block `kb`: FP8 block scales (the ×2⁸ of the f16 route
/// the packing takes is not applied: [`pack_pairs`] stores the codes' true values), 1 for BF16.
#[cfg(target_arch = "x86_64")]
pub(crate) fn pair_scales(w: &Weight, r0: usize, kb: usize) -> [f32; 2] {
    match w.data {
        crate::weight::WeightData::Fp8E4m3 { scale_inv, .. } => {
            let kbs = w.cols.div_ceil(FP8_BLOCK);
            let s = |r: usize| {
                let r = r.min(w.rows.saturating_sub(1));
                scale_inv[(r / FP8_BLOCK) * kbs + kb]
            };
            [s(r0), s(r0 + NR)]
        }
        _ => [1.0, 1.0],
    }
}

/// `out` (`[m][2·⌈k/2⌉]` u16) = the rows of x (`[m, k]`) rounded to bf16, nearest even; an odd
/// `k` leaves a zero at the end of each row (the pair tiles read whole pairs).
///
/// # Safety
/// The CPU must have AVX512-BF16.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn round_rows(x: &[f32], m: usize, k: usize, out: &mut [u16]) {
    let ks = 2 * k.div_ceil(2);
    assert!(x.len() >= m * k && out.len() >= m * ks);
    for i in 0..m {
        unsafe { avx512::round_row(&x[i * k..(i + 1) * k], &mut out[i * ks..(i + 1) * ks]) };
    }
}
