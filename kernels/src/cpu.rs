//! CPU feature dispatch and the shared inner loops: weight-row dequantisation into f32 and the
//! 6×16 register-tile microkernel every GEMM-shaped kernel (prefill GEMM, MLA) is built on.
//!
//! Dispatch is decided once per process by `is_x86_feature_detected!`. The fast path needs
//! AVX2 + FMA + F16C (every x86 server since 2013); the portable path is plain Rust that the
//! compiler vectorises as it can. On AVX-512 (F + BW + VL) CPUs the FP8 decode GEMV — the
//! memory-bound kernel of batch-1 decode — runs 512-bit: 32 codes per load become two
//! 16-lane f32 vectors with the same shift-and-mask trick, half the instructions per weight
//! byte of the AVX2 path. FP8 and BF16 GEMMs of 3–64 rows of x (batched decode, the rows of
//! one expert) run on f32 dot-product tiles ([`dot_rows`]): 64
//! converted weights of each of 2 rows meet up to 10 rows of x in a tile of 512-bit
//! accumulators. The other kernels of [`Isa::Avx512`] run the AVX2 code.
//!
//! With AVX512-VBMI and AVX512-BF16 as well (Zen 4, Sapphire Rapids: [`Isa::Avx512Bf16`]),
//! the FP8 and BF16 GEMMs of 1–2 rows of x (decode GEMV, small batches) run on `vdpbf16ps`
//! ([`avx512bf16`]; prefill sizes keep the packed f32 microkernel, which measured faster
//! there, and 3–64 rows the f32 dot tiles, which do one FMA where these do three bf16
//! products): an e4m3 code is exact in bf16, and two `vpermt2b` lookups turn 64 codes into 64
//! bf16 values in six instructions (the f16 route costs about 14);
//! x is split once per call into three bf16 parts (x = hi + mid + lo + O(2⁻²⁴|x|), f32's own
//! precision), so each product is accumulated in f32 from three exact bf16 products.
//!
//! FP8 in registers: an e4m3 code `s eeee mmm` becomes the f16 `s 0eeee mmm0000000` with two
//! shifts and a mask, i.e. exactly the e4m3 value times 2⁻⁸ (normals and subnormals alike), and
//! F16C converts it to f32; the 2⁸ is folded into the block scale. The one code this does not
//! map exactly is NaN (0x7f/0xff), which becomes ±480 — checkpoints never contain NaN weights.

use crate::fp8::{E4M3_TABLE, bf16_to_f32};
use crate::weight::{FP8_BLOCK, Weight, WeightData};
use std::sync::OnceLock;

/// Instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VL/VBMI/BF16: FP8/BF16 GEMMs of up to 64 rows on bf16 dot products
    /// ([`avx512bf16`]).
    Avx512Bf16,
    /// AVX-512 F/BW/VL on top of AVX2 + FMA + F16C: the FP8 decode GEMV in 512-bit vectors.
    Avx512,
    /// AVX2 + FMA + F16C, 256-bit vectors.
    Avx2Fma,
    /// Plain Rust, any CPU.
    Portable,
}

impl Isa {
    /// Every path, best first (tests run each one the CPU supports).
    pub const ALL: [Isa; 4] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2Fma, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512f+bw+vl+vbmi+bf16",
            Isa::Avx512 => "avx512f+bw+vl",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2Fma => detect_avx2(),
            Isa::Avx512 => detect_avx512(),
            Isa::Avx512Bf16 => detect_avx512bf16(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512bf16() -> bool {
    detect_avx512()
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512bf16() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512() -> bool {
    detect_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

/// The best instruction set of this CPU, detected once. `SHARDSEEK_KERNELS_ISA=portable`,
/// `=avx2` or `=avx512` (F/BW/VL without the bf16 path) caps the choice (to compare paths on
/// one machine).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("SHARDSEEK_KERNELS_ISA").unwrap_or_default();
        let allowed: &[Isa] = match cap.as_str() {
            "portable" => &[Isa::Portable],
            "avx2" => &[Isa::Avx2Fma, Isa::Portable],
            "avx512" => &Isa::ALL[1..],
            _ => &Isa::ALL,
        };
        allowed
            .iter()
            .copied()
            .find(|i| i.available())
            .unwrap_or(Isa::Portable)
    })
}

/// Whether the bf16 tiles add a second software prefetch, into L2, beyond their L1 one
/// ([`avx512bf16`]'s `FAR_BYTES`): measured faster on Zen 4; off on AMD family 1Ah (Zen 5),
/// where an L2 prefetch 64 KiB ahead cost a core 10–25% of its GEMV rate at the V3 and medium
/// shapes (one core, weights from memory, an earlier session).
#[cfg(target_arch = "x86_64")]
pub(crate) fn l2_prefetch() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| amd_family().is_none_or(|f| f < 0x1a))
}

/// The CPU family of an AMD CPU (base family plus extended family), `None` on other vendors.
#[cfg(target_arch = "x86_64")]
fn amd_family() -> Option<u32> {
    use std::arch::x86_64::__cpuid;
    let v = __cpuid(0);
    let vendor = [v.ebx, v.edx, v.ecx].map(u32::to_le_bytes).concat();
    if vendor != b"AuthenticAMD" {
        return None;
    }
    let eax = __cpuid(1).eax;
    let base = (eax >> 8) & 0xf;
    Some(if base == 0xf {
        base + ((eax >> 20) & 0xff)
    } else {
        base
    })
}

/// Rows of the microkernel's register tile (rows of x / queries).
pub const MR: usize = 6;
/// Columns of the register tile (weight rows / keys): two 8-lane vectors.
pub const NR: usize = 16;

/// A raw pointer that may cross threads: kernels hand disjoint parts of one output to tasks.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer `off` floats further (a method, so closures capture the whole `SyncPtr`).
    ///
    /// # Safety
    /// The result must stay inside the allocation.
    pub(crate) unsafe fn add(self, off: usize) -> SyncPtr {
        SyncPtr(unsafe { self.0.add(off) })
    }
}

/// Operands of one microkernel call: C[i][j] (+)= Σ_k A(i,k) · B(k,j) for i < mr, j < nr.
/// A(i,k) is at `a + i·rsa + k·csa`; row k of B is the 16 floats at `b + k·rsb` (always 16 are
/// read, so B must be padded to 16 columns); C(i,j) is at `c + i·ldc + j`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub kc: usize,
    pub a: *const f32,
    pub rsa: usize,
    pub csa: usize,
    pub b: *const f32,
    pub rsb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub mr: usize,
    pub nr: usize,
    pub accumulate: bool,
}

/// Runs one register tile.
///
/// # Safety
/// Every address the [`Tile`] describes must be valid for reads (A, B) and writes (C).
#[inline]
pub(crate) unsafe fn microkernel(isa: Isa, t: &Tile) {
    debug_assert!(t.mr <= MR && t.nr <= NR);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            match t.mr {
                6 => avx2::kern::<6>(t),
                5 => avx2::kern::<5>(t),
                4 => avx2::kern::<4>(t),
                3 => avx2::kern::<3>(t),
                2 => avx2::kern::<2>(t),
                1 => avx2::kern::<1>(t),
                _ => {}
            }
        },
        _ => unsafe { portable_kern(t) },
    }
}

unsafe fn portable_kern(t: &Tile) {
    let mut acc = [[0f32; NR]; MR];
    for k in 0..t.kc {
        let b = unsafe { std::slice::from_raw_parts(t.b.add(k * t.rsb), NR) };
        for (i, row) in acc.iter_mut().enumerate().take(t.mr) {
            let a = unsafe { *t.a.add(i * t.rsa + k * t.csa) };
            for j in 0..NR {
                row[j] += a * b[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(t.mr) {
        for (j, v) in row.iter().enumerate().take(t.nr) {
            let p = unsafe { t.c.add(i * t.ldc + j) };
            unsafe {
                *p = if t.accumulate { *p + v } else { *v };
            }
        }
    }
}

/// Dequantises columns `c0..c0+out.len()` of row `r` of `w` into `out` (scale applied).
#[inline]
pub fn dequant_row(isa: Isa, w: &Weight, r: usize, c0: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe { avx2::dequant_row(w, r, c0, out) },
        _ => w.dequant_row_into(r, c0, out),
    }
}

/// Whether the [`Isa::Avx512Bf16`] tiles compute with `w` (FP8 and BF16 weights; F16 and F32
/// take the f32 paths).
pub(crate) fn bf16_tiles_serve(w: &Weight) -> bool {
    matches!(w.data, WeightData::Fp8E4m3 { .. } | WeightData::Bf16(_))
}

/// Weight kinds as const-generic parameters of the streaming kernels.
pub(crate) const KIND_FP8: u8 = 0;
pub(crate) const KIND_BF16: u8 = 1;
pub(crate) const KIND_F16: u8 = 2;
pub(crate) const KIND_F32: u8 = 3;

/// One weight element in the units the vector path uses (FP8: value·2⁻⁸ before the scale).
#[inline(always)]
pub(crate) fn scalar_elem<const KIND: u8>(bytes: &[u8], idx: usize) -> f32 {
    match KIND {
        KIND_FP8 => E4M3_TABLE[bytes[idx] as usize] * (1.0 / 256.0),
        KIND_BF16 => bf16_to_f32(u16::from_le_bytes([bytes[2 * idx], bytes[2 * idx + 1]])),
        KIND_F16 => {
            half::f16::from_bits(u16::from_le_bytes([bytes[2 * idx], bytes[2 * idx + 1]])).to_f32()
        }
        _ => f32::from_le_bytes([
            bytes[4 * idx],
            bytes[4 * idx + 1],
            bytes[4 * idx + 2],
            bytes[4 * idx + 3],
        ]),
    }
}

/// The stored bytes of `w`, its kind, and the per-block scales (FP8 only).
pub(crate) fn weight_parts<'a>(w: &Weight<'a>) -> (&'a [u8], u8, Option<&'a [f32]>) {
    match w.data {
        WeightData::Fp8E4m3 { q, scale_inv } => (q, KIND_FP8, Some(scale_inv)),
        WeightData::Bf16(b) => (b, KIND_BF16, None),
        WeightData::F16(b) => (b, KIND_F16, None),
        WeightData::F32(b) => (b, KIND_F32, None),
    }
}

/// Multiplier of a block's partial sums: FP8 scale·2⁸ (see the module doc), 1 otherwise.
#[inline(always)]
pub(crate) fn block_scale(
    kind: u8,
    scales: Option<&[f32]>,
    cols: usize,
    row: usize,
    blk: usize,
) -> f32 {
    match (kind, scales) {
        (KIND_FP8, Some(s)) => s[(row / FP8_BLOCK) * cols.div_ceil(FP8_BLOCK) + blk] * 256.0,
        _ => 1.0,
    }
}

/// Decode-shape streaming GEMM: `out[i·ld + (n-n0)] = x_i · W_n` for rows `n0..n1` of W and
/// the `m` rows of `x` (`m` small). Every weight byte is read once per group of 4 rows of x
/// (from memory for the first group, from L1 for the others) and dequantised in registers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stream_rows(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Weight,
    n0: usize,
    n1: usize,
    out: &mut [f32],
    ld: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 if matches!(w.data, WeightData::Fp8E4m3 { .. }) => unsafe {
            avx512::stream_rows_fp8(x, m, w, n0, n1, out, ld)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            avx2::stream_rows(x, m, w, n0, n1, out, ld)
        },
        _ => portable_stream_rows(x, m, w, n0, n1, out, ld),
    }
}

/// Rows of x from which the FP8/BF16 GEMMs of the AVX-512 levels run [`dot_rows`]
/// (f32 dot-product tiles) instead of the streaming GEMV or the bf16 tiles, up to
/// [`DOT_MAX_M`] (beyond it the packed microkernel). Below it the bf16 tiles, or the streaming
/// GEMV without AVX512-BF16, are faster: same run, one core, busy machine, an expert of
/// 7168×2048 FP8 weights with its tiles' prefetch and sums as they are now, the dot tiles took
/// 1.05× the bf16 tiles' time at 2 rows and 0.85× at 3 (best wall time; their CPU time per
/// call was within 3% at both), and 0.6× the streaming GEMV's at 3 rows on [`Isa::Avx512`]. (At 16 and 32 rows they took 0.7–0.85× and 0.65–0.75× the bf16
/// tiles' time in an earlier run.) On [`Isa::Avx512Bf16`] too, with the dot tiles' sign-extending
/// conversion and the bf16 tiles' L2 prefetch: a whole expert's grouped FFN (gate, up, down)
/// of 3 rows took the dot tiles 0.89× the bf16 tiles' time at V3 shapes (7168, 2048) and 0.92×
/// at medium ones (2048, 768), of 2 rows 0.99× and 1.01× (one core, weights from memory, same
/// process, alternating calls, best of 60; Zen 4). (An earlier session kept 3 rows on the bf16
/// tiles: 1.25× at 2048×7168 with the slower conversion, two threads.)
pub(crate) const DOT_MIN_M: usize = 3;
pub(crate) const DOT_MAX_M: usize = 64;
// Every group of DOT_MIN_M or more rows (at most DOT_RX each, as even as possible) has 3 to
// 10: fewer than 11 rows make one group, and m ≥ 11 rows ⌈m/10⌉ groups of at least
// m/⌈m/10⌉ ≥ 10m/(m+9) > 5 rows.
const _: () = assert!(DOT_MIN_M == 3 && DOT_RX == 10);
/// Rows of x in one group of [`dot_rows`] (the register tile's x side): a 2×10 tile is 20
/// accumulators, and the 8 registers of two converted weight rows still fit beside them. Each
/// converted weight meets up to 10 rows, so a 10-row expert converts its weights once instead
/// of twice (5 + 5 rows): against 8, 10 rows of 2048×7168, 768×2048 and 2048×768 FP8 weights
/// took 0.78×, 0.88× and 0.90× the time (two threads, weights from memory, same process,
/// alternating calls; 16 and 32 rows, in groups of 8 either way, the same). 12 was no better
/// than 10 at 12 and 32 rows (0.87–1.07×).
pub(crate) const DOT_RX: usize = 10;
/// Columns of one step of [`dot_rows`]: 64 codes, one cache line of FP8 weights.
const DOT_STEP: usize = 64;

/// Whether [`dot_rows`] computes `m` rows of x against `w` on `isa`.
pub(crate) fn dot_serves(isa: Isa, m: usize, w: &Weight) -> bool {
    bf16_tiles_serve(w) && dot_rows_serve_m(isa, m)
}

/// Whether [`dot_rows`] computes `m` rows of x against the FP8 and BF16 weights on `isa`.
pub(crate) fn dot_rows_serve_m(isa: Isa, m: usize) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Avx512Bf16) && (DOT_MIN_M..=DOT_MAX_M).contains(&m)
}

/// The row groups of [`dot_rows`]: (first row, rows), at most [`DOT_RX`] rows each and as even
/// as possible (20 = 7+7+6), so no tile runs with a sliver of rows.
pub(crate) fn dot_groups(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let groups = m.div_ceil(DOT_RX);
    (0..groups).scan(0, move |i, g| {
        let rx = m / groups + usize::from(g < m % groups);
        let r = (*i, rx);
        *i += rx;
        Some(r)
    })
}

/// Length of [`dot_prepare_x`]'s output for `m` rows of `k` columns (linear in `m`).
pub(crate) fn dot_prepared_len(m: usize, k: usize) -> usize {
    m * k.div_ceil(DOT_STEP) * DOT_STEP
}

/// x `[m, k]` in the layout of [`dot_rows`]: per row group (at row i, offset `i·kp`, kp = k
/// rounded up to 64), `[kp/64][rows][64]` with zeros past k, so a tile reads each step of its
/// rows at fixed offsets from one pointer.
/// Every element of `out` ([`dot_prepared_len`] long) is written, so it may hold stale values.
pub(crate) fn dot_prepare_x(x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let kp = k.div_ceil(DOT_STEP) * DOT_STEP;
    assert_eq!(out.len(), dot_prepared_len(m, k), "dot operand length");
    for (i0, rx) in dot_groups(m) {
        let g = &mut out[i0 * kp..(i0 + rx) * kp];
        for j in 0..rx {
            let row = &x[(i0 + j) * k..(i0 + j + 1) * k];
            for (s, ch) in row.chunks(DOT_STEP).enumerate() {
                let dst = &mut g[(s * rx + j) * DOT_STEP..(s * rx + j + 1) * DOT_STEP];
                dst[..ch.len()].copy_from_slice(ch);
                dst[ch.len()..].fill(0.0);
            }
        }
    }
}

/// `out[i·ld + (n−n0)] = x_i · W_n` for rows `n0..n1` of the FP8 or BF16 weight `w`, in f32
/// ([`dot_serves`]): x as [`dot_prepare_x`] made it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows(
    isa: Isa,
    xp: &[f32],
    m: usize,
    w: &Weight,
    n0: usize,
    n1: usize,
    out: &mut [f32],
    ld: usize,
) {
    assert!(dot_serves(isa, m, w));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: dot_serves checked the ISA level (AVX-512 F/BW/VL) and the weight kind.
    unsafe {
        avx512::dot_rows(xp, m, w, n0, n1, out, ld)
    }
}

fn portable_stream_rows(
    x: &[f32],
    m: usize,
    w: &Weight,
    n0: usize,
    n1: usize,
    out: &mut [f32],
    ld: usize,
) {
    let k = w.cols;
    let mut row = vec![0f32; k];
    for n in n0..n1 {
        w.dequant_row_into(n, 0, &mut row);
        for i in 0..m {
            out[i * ld + n - n0] = crate::gemm::dot(&x[i * k..(i + 1) * k], &row);
        }
    }
}

/// `out[i] = e4m3(codes[i]) · scale` (vectorised on AVX2; the NaN code gives ±480 there).
pub fn convert_fp8(isa: Isa, codes: &[u8], scale: f32, out: &mut [f32]) {
    assert_eq!(codes.len(), out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            avx2::convert::<KIND_FP8>(codes, scale * 256.0, out)
        },
        _ => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = E4M3_TABLE[c as usize] * scale;
            }
        }
    }
}

/// `out[i] = bf16(bits[i])` for little-endian bf16 bytes (vectorised on AVX2).
pub fn convert_bf16(isa: Isa, bits: &[u16], out: &mut [f32]) {
    assert_eq!(bits.len(), out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            let bytes = std::slice::from_raw_parts(bits.as_ptr() as *const u8, bits.len() * 2);
            avx2::convert::<KIND_BF16>(bytes, 1.0, out)
        },
        _ => {
            for (o, &b) in out.iter_mut().zip(bits) {
                *o = bf16_to_f32(b);
            }
        }
    }
}

/// e^x for a slice in place (vectorised on AVX2; −∞ gives 0).
pub fn exp_inplace(isa: Isa, v: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe { avx2::exp_inplace(v) },
        _ => {
            for x in v.iter_mut() {
                *x = x.exp();
            }
        }
    }
}

/// The AVX-512 FP8 decode GEMV.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Bytes ahead of the current weight position that the GEMV prefetches: far enough to
    /// cover memory latency at one core's stream rate, near enough to stay in L1 (4 KiB read
    /// 1.4× the bytes per second of 1 KiB per core in the same run on the development box).
    const PREFETCH: usize = 4096;

    /// 32 e4m3 codes at `p` as two 16-lane f32 vectors of value·2⁻⁸ (module doc).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn load32(p: *const u8) -> (__m512, __m512) {
        unsafe {
            let b = _mm256_loadu_si256(p as *const __m256i);
            let w = _mm512_cvtepu8_epi16(b);
            let t = _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 1);
            let h = _mm512_and_si512(t, _mm512_set1_epi16(0xBF80u16 as i16));
            (
                _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)),
            )
        }
    }

    /// [`super::stream_rows`] for FP8 weights: rows of x in groups of up to 4 share each
    /// 32-code load.
    pub(super) unsafe fn stream_rows_fp8(
        x: &[f32],
        m: usize,
        w: &Weight,
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let k = w.cols;
        assert!(x.len() >= m * k && out.len() >= (m.max(1) - 1) * ld + (n1 - n0));
        for n in n0..n1 {
            let mut i = 0;
            while i < m {
                let g = (m - i).min(4);
                let xs = &x[i * k..];
                let mut res = [0f32; 4];
                unsafe {
                    match g {
                        1 => res[..1].copy_from_slice(&dot::<1>(xs, w, n)),
                        2 => res[..2].copy_from_slice(&dot::<2>(xs, w, n)),
                        3 => res[..3].copy_from_slice(&dot::<3>(xs, w, n)),
                        _ => res.copy_from_slice(&dot::<4>(xs, w, n)),
                    }
                }
                for (j, v) in res.iter().enumerate().take(g) {
                    out[(i + j) * ld + n - n0] = *v;
                }
                i += g;
            }
        }
    }

    /// G rows of x against FP8 weight row `n`: two FMA chains per row, the block scale
    /// applied once per 128 columns, columns past the last 32 of a block done in scalar.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn dot<const G: usize>(x: &[f32], w: &Weight, n: usize) -> [f32; G] {
        let k = w.cols;
        let (q, _, scales) = weight_parts(w);
        let base = n * k;
        let mut tot = [_mm512_setzero_ps(); G];
        let mut tail = [0f32; G];
        let mut c = 0;
        unsafe {
            while c < k {
                let blk = c / FP8_BLOCK;
                let bend = ((blk + 1) * FP8_BLOCK).min(k);
                let s = block_scale(KIND_FP8, scales, k, n, blk);
                let mut a0 = [_mm512_setzero_ps(); G];
                let mut a1 = [_mm512_setzero_ps(); G];
                let mut a2 = [_mm512_setzero_ps(); G];
                let mut a3 = [_mm512_setzero_ps(); G];
                // 64 codes a step on four chains, so FMA latency does not bound the stream;
                // the bytes PREFETCH ahead are prefetched (one cache line per step).
                while c + 64 <= bend {
                    let p = q.as_ptr().add(base + c);
                    // A hint: past the end of the weights it is dropped, never faults.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    let (w0, w1) = load32(p);
                    let (w2, w3) = load32(p.add(32));
                    for g in 0..G {
                        let xp = x.as_ptr().add(g * k + c);
                        a0[g] = _mm512_fmadd_ps(_mm512_loadu_ps(xp), w0, a0[g]);
                        a1[g] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), w1, a1[g]);
                        a2[g] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(32)), w2, a2[g]);
                        a3[g] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(48)), w3, a3[g]);
                    }
                    c += 64;
                }
                if c + 32 <= bend {
                    let (w0, w1) = load32(q.as_ptr().add(base + c));
                    for g in 0..G {
                        let xp = x.as_ptr().add(g * k + c);
                        a0[g] = _mm512_fmadd_ps(_mm512_loadu_ps(xp), w0, a0[g]);
                        a1[g] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), w1, a1[g]);
                    }
                    c += 32;
                }
                let sv = _mm512_set1_ps(s);
                for g in 0..G {
                    let sum =
                        _mm512_add_ps(_mm512_add_ps(a0[g], a1[g]), _mm512_add_ps(a2[g], a3[g]));
                    tot[g] = _mm512_fmadd_ps(sum, sv, tot[g]);
                }
                while c < bend {
                    let wv = scalar_elem::<KIND_FP8>(q, base + c) * s;
                    for (g, t) in tail.iter_mut().enumerate() {
                        *t += x[g * k + c] * wv;
                    }
                    c += 1;
                }
            }
            let mut r = [0f32; G];
            for g in 0..G {
                r[g] = _mm512_reduce_add_ps(tot[g]) + tail[g];
            }
            r
        }
    }

    /// [`super::dot_rows`] on AVX-512: every 64 weights of a row are converted to four f32
    /// vectors in registers (16 at a time through F16C) once per x group and meet the group's
    /// rows in a 2×`RX` tile of dot-product accumulators. (The two-`vpermt2b` table of the
    /// bf16 tiles, fewer instructions for 64 codes, took 1.1–1.35× the time from memory at 8,
    /// 16 and 32 rows on a Zen 5 core pair, weights 768×2048 and 2048×7168, same run,
    /// alternating; at 3 and 10 rows 0.9–1.1×.)
    ///
    /// # Safety
    /// The CPU must have [`Isa::Avx512`]; `w` must be FP8 or BF16; `xp` is
    /// [`super::dot_prepare_x`] of `m` rows of `w.cols` columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(
        xp: &[f32],
        m: usize,
        w: &Weight,
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let k = w.cols;
        assert!(n1 <= w.rows && xp.len() >= m * k.div_ceil(DOT_STEP) * DOT_STEP);
        assert!(m == 0 || out.len() >= (m - 1) * ld + (n1 - n0));
        unsafe {
            match w.data {
                WeightData::Fp8E4m3 { q, scale_inv } => {
                    dot_rows_kind::<KIND_FP8>(xp, m, k, q, scale_inv, n0, n1, out, ld)
                }
                WeightData::Bf16(b) => {
                    dot_rows_kind::<KIND_BF16>(xp, m, k, b, &[], n0, n1, out, ld)
                }
                _ => unreachable!("avx512::dot_rows on a weight it does not serve"),
            }
        }
    }

    /// x per pass of [`dot_rows`], in f32 values of one group's block: the scaled copy the
    /// tiles read (16 KiB) stays in L1 next to the weights prefetched ahead while the task's
    /// weight rows pass it. A pass is at least [`DOT_KC_MIN`] columns, rounded to the FP8
    /// block: 512 for groups of 8 rows, 1024 for 4, 2048 for 2; rows of at most
    /// [`DOT_ONE_PASS`] columns take one pass. (Same run, one core, quiet machine: 4 rows ×
    /// 2048 columns in one pass took 1.4× the time of two; 8 rows × 768 in two passes 1.2×
    /// the time of one.)
    const DOT_PASS_VALUES: usize = 4 << 10;
    const DOT_KC_MIN: usize = 512;
    const DOT_ONE_PASS: usize = 1024;
    /// Prefetch distances of [`dot_rows`] in weight bytes: about 0.5 and 4 µs of one core's
    /// stream (as the bf16 tiles).
    const DOT_NEAR: usize = 16 << 10;
    const DOT_FAR: usize = 128 << 10;
    const _: () =
        assert!(DOT_KC_MIN.is_multiple_of(FP8_BLOCK) && FP8_BLOCK.is_multiple_of(DOT_STEP));

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn dot_rows_kind<const KIND: u8>(
        xp: &[f32],
        m: usize,
        k: usize,
        q: &[u8],
        scale_inv: &[f32],
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let eb = if KIND == KIND_FP8 { 1 } else { 2 };
        assert!(q.len() >= n1 * k * eb);
        let kp = k.div_ceil(DOT_STEP) * DOT_STEP;
        // x of one group and pass times the FP8 block scale of the weight rows it meets, so
        // the tiles multiply converted codes by x without a per-vector scale: in a per-thread
        // buffer (a fresh zeroed one per task cost as much as a small GEMV), taken out of its
        // cell and put back, since the kernel must not run inside a closure (which would not
        // inherit this function's target features: its intrinsics became calls).
        let mut b = DOT_XS.with(|c| c.take());
        let rx = m.clamp(1, DOT_RX);
        let kc = if kp <= DOT_ONE_PASS {
            kp
        } else {
            (DOT_PASS_VALUES / rx / FP8_BLOCK * FP8_BLOCK).max(DOT_KC_MIN)
        };
        let len = rx * kc.min(kp);
        if b.len() < len {
            b.resize(len, 0.0);
        }
        unsafe { dot_rows_passes::<KIND>(xp, m, k, q, scale_inv, n0, n1, out, ld, kc, &mut b) };
        DOT_XS.with(|c| c.replace(b));
    }

    thread_local! {
        static DOT_XS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn dot_rows_passes<const KIND: u8>(
        xp: &[f32],
        m: usize,
        k: usize,
        q: &[u8],
        scale_inv: &[f32],
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
        kc: usize,
        xs: &mut [f32],
    ) {
        let eb = if KIND == KIND_FP8 { 1 } else { 2 };
        let kb = k.div_ceil(FP8_BLOCK);
        let kp = k.div_ceil(DOT_STEP) * DOT_STEP;
        for c0 in (0..k).step_by(kc) {
            let c1 = (c0 + kc).min(k);
            let steps = (c1 - c0).div_ceil(DOT_STEP);
            let groups = m.div_ceil(DOT_RX);
            for (gi, (i, rx)) in dot_groups(m).enumerate() {
                // Step s of the group's row j is at (s·rx + j)·64 (`dot_prepare_x`).
                let xg = unsafe { xp.as_ptr().add(i * kp + c0 * rx) };
                let mut n = n0;
                while n < n1 {
                    let seg_end = if KIND == KIND_FP8 {
                        n1.min((n / FP8_BLOCK + 1) * FP8_BLOCK)
                    } else {
                        n1
                    };
                    let xsrc = if KIND == KIND_FP8 {
                        let srow = &scale_inv[(n / FP8_BLOCK) * kb..];
                        for s in 0..steps {
                            let sv = unsafe {
                                _mm512_set1_ps(srow[(c0 + DOT_STEP * s) / FP8_BLOCK] * 256.0)
                            };
                            for v in 0..rx * DOT_STEP / 16 {
                                let o = s * rx * DOT_STEP + 16 * v;
                                unsafe {
                                    let x16 = _mm512_loadu_ps(xg.add(o));
                                    _mm512_storeu_ps(
                                        xs.as_mut_ptr().add(o),
                                        _mm512_mul_ps(x16, sv),
                                    );
                                }
                            }
                        }
                        xs.as_ptr()
                    } else {
                        xg
                    };
                    while n < seg_end {
                        let rw = if n + 2 <= seg_end { 2 } else { 1 };
                        let qn = unsafe { q.as_ptr().add((n * k + c0) * eb) };
                        let pf = (
                            dot_ahead(DOT_NEAR, rw, eb, k, c0, c1, n0, n, n1, gi + 1 == groups),
                            dot_ahead(DOT_FAR, rw, eb, k, c0, c1, n0, n, n1, gi + 1 == groups),
                        );
                        macro_rules! run {
                            ($rw:literal, $rx:literal) => {{
                                let t = unsafe {
                                    dot_tile::<KIND, $rw, $rx>(xsrc, steps, k - c0, qn, k * eb, pf)
                                };
                                for (r, tr) in t.iter().enumerate() {
                                    for (j, v) in tr.iter().enumerate() {
                                        let o = &mut out[(i + j) * ld + n + r - n0];
                                        *o = if c0 == 0 { *v } else { *o + v };
                                    }
                                }
                            }};
                        }
                        // Groups of at least DOT_MIN_M rows have 3 to 10 rows.
                        match (rw, rx) {
                            (2, 3) => run!(2, 3),
                            (2, 4) => run!(2, 4),
                            (2, 5) => run!(2, 5),
                            (2, 6) => run!(2, 6),
                            (2, 7) => run!(2, 7),
                            (2, 8) => run!(2, 8),
                            (2, 9) => run!(2, 9),
                            (2, 10) => run!(2, 10),
                            (1, 3) => run!(1, 3),
                            (1, 4) => run!(1, 4),
                            (1, 5) => run!(1, 5),
                            (1, 6) => run!(1, 6),
                            (1, 7) => run!(1, 7),
                            (1, 8) => run!(1, 8),
                            (1, 9) => run!(1, 9),
                            (1, 10) => run!(1, 10),
                            _ => unreachable!("dot_rows groups of {rx} rows"),
                        }
                        n += rw;
                    }
                }
            }
        }
    }

    /// Where [`dot_rows`] prefetches `bytes` of its weight stream ahead of row `n` of a pass
    /// over columns `c0..c1` of the task's rows `n0..n1` (`rw` rows at a time, `eb` bytes a
    /// weight, `k` columns a row): a byte offset from the row's pass start, or `None`. The
    /// stream is what the tile reads, `c1 − c0` columns a row, not whole rows (a distance in
    /// whole rows of 7168 columns put the prefetches 3 KiB ahead in a 768-column pass, and the
    /// tiles waited on memory for a third of the time, `perf annotate`). Past the task's last
    /// row the stream goes on with the first rows of the next pass, whose weights the last row
    /// group reads from memory next; the earlier groups' next reads (the same pass, the next
    /// row group) are in cache.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn dot_ahead(
        bytes: usize,
        rw: usize,
        eb: usize,
        k: usize,
        c0: usize,
        c1: usize,
        n0: usize,
        n: usize,
        n1: usize,
        last_group: bool,
    ) -> Option<isize> {
        let row_bytes = (c1 - c0) * eb;
        let rows = bytes.div_ceil(rw * row_bytes) * rw;
        let (t, task) = (n - n0 + rows, n1 - n0);
        let rb = (k * eb) as isize;
        if t < task {
            Some(rows as isize * rb)
        } else if last_group && c1 < k && t - task < task {
            let row = (n0 + t - task) as isize;
            Some((row - n as isize) * rb + ((c1 - c0) * eb) as isize)
        } else {
            None
        }
    }

    /// 16 weights of kind `KIND` at `p` as f32 in vector-path units (FP8: value·2⁻⁸), natural
    /// order, those from `left` on zero. FP8: the code sign-extended to 16 bits and shifted
    /// left by 7 is `s s eeee mmm 0000000`; clearing bit 14 leaves the f16 of the module doc
    /// (one shift fewer than zero-extending, shifting left by 8 and back by 1).
    #[inline(always)]
    unsafe fn load16w<const KIND: u8>(p: *const u8, left: usize) -> __m512 {
        unsafe {
            if KIND == KIND_FP8 {
                let b = if left >= 16 {
                    _mm_loadu_si128(p as *const __m128i)
                } else {
                    _mm_maskz_loadu_epi8(((1u32 << left) - 1) as u16, p as *const i8)
                };
                let w = _mm256_cvtepi8_epi16(b);
                let h =
                    _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(0xBF80u16 as i16));
                _mm512_cvtph_ps(h)
            } else {
                let b = if left >= 16 {
                    _mm256_loadu_si256(p as *const __m256i)
                } else {
                    _mm256_maskz_loadu_epi16(((1u32 << left) - 1) as u16, p as *const i16)
                };
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16))
            }
        }
    }

    /// 64 weights of kind `KIND` at `p` (those from `left` on zero) as four f32 vectors, in
    /// vector-path units (FP8: value·2⁻⁸).
    #[inline(always)]
    unsafe fn load64w<const KIND: u8, const MASKED: bool>(
        p: *const u8,
        left: usize,
    ) -> [__m512; 4] {
        let eb = if KIND == KIND_FP8 { 1 } else { 2 };
        // (No closures here: a closure does not inherit the caller's target features, and its
        // intrinsics would become calls.)
        let mut o = [unsafe { _mm512_setzero_ps() }; 4];
        for (v, o) in o.iter_mut().enumerate() {
            let l = if MASKED {
                left.saturating_sub(16 * v)
            } else {
                16
            };
            if l > 0 {
                *o = unsafe { load16w::<KIND>(p.add(16 * v * eb), l) };
            }
        }
        o
    }

    /// `RW` weight rows at `q` (row stride `rb` bytes) against the `RX` rows of one group of
    /// x at `x` (`[steps][RX][64]`), `steps` 64-column steps of which `left` columns exist
    /// (the rest read as zero weights): the dot products. `prefetch`: byte offsets ([`dot_ahead`])
    /// at which the weights read later are fetched into L1 and L2 on the way.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn dot_tile<const KIND: u8, const RW: usize, const RX: usize>(
        x: *const f32,
        steps: usize,
        left: usize,
        q: *const u8,
        rb: usize,
        prefetch: (Option<isize>, Option<isize>),
    ) -> [[f32; RX]; RW] {
        let mut acc = [[unsafe { _mm512_setzero_ps() }; RX]; RW];
        // Steps with all 64 columns, then at most one partial step.
        let full = steps.min(left / DOT_STEP);
        unsafe {
            for s in 0..full {
                let eb = if KIND == KIND_FP8 { 1 } else { 2 };
                for r in 0..RW {
                    let p = q.add(r * rb + DOT_STEP * s * eb);
                    for line in 0..eb {
                        let l = 64 * line as isize;
                        if let Some(d) = prefetch.0 {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_offset(d + l) as *const i8);
                        }
                        if let Some(d) = prefetch.1 {
                            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_offset(d + l) as *const i8);
                        }
                    }
                }
                dot_step::<KIND, RW, RX, false>(x, q, rb, s, 0, &mut acc);
            }
            if full < steps {
                let cols = left - DOT_STEP * full;
                dot_step::<KIND, RW, RX, true>(x, q, rb, full, cols, &mut acc);
            }
            sums(&acc)
        }
    }

    /// The 16 lane sums of `v`, in order, as one vector: four levels of shuffles and adds
    /// (15 adds, 30 shuffles) where a reduction per vector takes 16 × 8 instructions, about a
    /// tenth of a tile's time at 8 steps (`perf annotate`, 32 rows of x).
    #[inline(always)]
    pub(super) unsafe fn hsum16(v: &[__m512; 16]) -> __m512 {
        // (Loops and a macro, no closures: a closure does not inherit the caller's target
        // features.)
        unsafe {
            let mut x = [_mm512_setzero_ps(); 8];
            for j in 0..8 {
                let (a, b) = (v[2 * j], v[2 * j + 1]);
                x[j] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            }
            let mut y = [_mm512_setzero_ps(); 4];
            for j in 0..4 {
                let (a, b) = (_mm512_castps_pd(x[2 * j]), _mm512_castps_pd(x[2 * j + 1]));
                y[j] = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
                );
            }
            // 128-bit lanes 0+1 and 2+3 of a, then of b.
            macro_rules! lanes {
                ($a:expr, $b:expr) => {
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b10_00_10_00>($a, $b),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>($a, $b),
                    )
                };
            }
            let (z0, z1) = (lanes!(y[0], y[1]), lanes!(y[2], y[3]));
            lanes!(z0, z1)
        }
    }

    /// The lane sums of a tile's accumulators ([`hsum16`] per 16 for more than 4 of them; at
    /// most 32).
    #[inline(always)]
    pub(super) unsafe fn sums<const RW: usize, const RX: usize>(
        acc: &[[__m512; RX]; RW],
    ) -> [[f32; RX]; RW] {
        const { assert!(RW * RX <= 32) };
        unsafe {
            if RW * RX <= 4 {
                // Fewer instructions one vector at a time (8 each against the tree's 45).
                let mut o = [[0f32; RX]; RW];
                for r in 0..RW {
                    for i in 0..RX {
                        o[r][i] = _mm512_reduce_add_ps(acc[r][i]);
                    }
                }
                return o;
            }
            let mut v = [[_mm512_setzero_ps(); 16]; 2];
            for (r, row) in acc.iter().enumerate() {
                for (i, a) in row.iter().enumerate() {
                    let p = r * RX + i;
                    v[p / 16][p % 16] = *a;
                }
            }
            let mut lanes = [0f32; 32];
            _mm512_storeu_ps(lanes.as_mut_ptr(), hsum16(&v[0]));
            if RW * RX > 16 {
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16), hsum16(&v[1]));
            }
            let mut o = [[0f32; RX]; RW];
            for (r, row) in o.iter_mut().enumerate() {
                row.copy_from_slice(&lanes[r * RX..(r + 1) * RX]);
            }
            o
        }
    }

    /// Step `s` (columns 64s..64s+64, of which `cols` exist when `MASKED`) of [`dot_tile`].
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn dot_step<const KIND: u8, const RW: usize, const RX: usize, const MASKED: bool>(
        x: *const f32,
        q: *const u8,
        rb: usize,
        s: usize,
        cols: usize,
        acc: &mut [[__m512; RX]; RW],
    ) {
        let eb = if KIND == KIND_FP8 { 1 } else { 2 };
        unsafe {
            let mut wv = [[_mm512_setzero_ps(); 4]; RW];
            for (r, w) in wv.iter_mut().enumerate() {
                *w = load64w::<KIND, MASKED>(q.add(r * rb + DOT_STEP * s * eb), cols);
            }
            let xv = x.add(DOT_STEP * RX * s);
            for v in 0..4 {
                for i in 0..RX {
                    let x16 = _mm512_loadu_ps(xv.add(DOT_STEP * i + 16 * v));
                    for r in 0..RW {
                        acc[r][i] = _mm512_fmadd_ps(x16, wv[r][v], acc[r][i]);
                    }
                }
            }
        }
    }
}

/// FP8 and BF16 GEMMs on AVX512-BF16 dot products (module doc): x prepared once per call into
/// bf16 hi/mid/lo parts, FP8 weights converted 64 codes at a time by table lookup (BF16 weights
/// permuted into the same lane order), `RW`×`RX` register tiles of (weight row, x row) dot
/// products with the FP8 block scale applied per 128 columns.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512bf16 {
    use super::*;
    use crate::fp8::e4m3_to_f32;
    use std::arch::x86_64::*;

    /// bf16 bits of the non-negative e4m3 codes 0..128, as high bytes and low bytes: the two
    /// 128-byte `vpermt2b` tables. Every e4m3 value (subnormals too) is exact in bf16; the
    /// NaN code 0x7f maps to a bf16 NaN.
    const fn tables() -> [[u8; 128]; 2] {
        let mut t = [[0u8; 128]; 2];
        let mut c = 0;
        while c < 128 {
            let b = e4m3_to_f32(c as u8).to_bits() >> 16;
            t[0][c] = (b >> 8) as u8;
            t[1][c] = b as u8;
            c += 1;
        }
        t
    }
    static TABLES: [[u8; 128]; 2] = tables();

    /// `vpermt2w` indices that put 64 bf16 weights (two vectors, natural order) into the lane
    /// order of [`prepare_x`]: A = words {0–7, 16–23, 32–39, 48–55}, B = the others.
    const fn bf16_order() -> [[u16; 32]; 2] {
        let mut t = [[0u16; 32]; 2];
        let mut j = 0;
        while j < 32 {
            t[0][j] = (16 * (j / 8) + j % 8) as u16;
            t[1][j] = (16 * (j / 8) + 8 + j % 8) as u16;
            j += 1;
        }
        t
    }
    static BF16_ORDER: [[u16; 32]; 2] = bf16_order();

    /// u16 words of one part of a 64-column chunk of a prepared row (A and B, 32 each); a
    /// chunk holds the parts one after another: hi A, hi B, mid A, mid B, lo A, lo B.
    const PART_WORDS: usize = 64;
    /// Columns a prepared row is padded to.
    const CHUNK: usize = 64;
    /// Prepared x of at most this many bytes is used whole per task; beyond it, the columns
    /// are cut into [`KCB`] blocks, so a block of x (at most 64 rows, the most the tiles are
    /// given: `gemm::TILE_MAX_M`, · `KCB` · 6 bytes = 192 KiB) stays in L2 while every weight
    /// row of the task passes it.
    const WHOLE_X_BYTES: usize = 256 << 10;
    const KCB: usize = 4 * FP8_BLOCK;
    /// Distance of the L1 prefetch, in weight bytes (rounded up to whole row groups): about
    /// 0.3 µs of one core's stream. Prefetches stop at the task's last row, so a shorter
    /// distance leaves less of each task (96 to 256 rows at the medium shapes) to the hardware
    /// prefetchers alone: against 16 KiB a decode GEMV of 768×2048 or 2048×768 FP8 weights from
    /// memory took 0.88–0.9× the CPU time (one core, same run, alternating, four rounds), a
    /// 7168-column expert the same. 4 or 32 KiB here were no better (one core, weights from
    /// memory, same run, alternating).
    const NEAR_BYTES: usize = 8 << 10;
    /// Distance of the second prefetch, into L2 only, where [`super::l2_prefetch`] allows it:
    /// the L1 prefetch alone keeps too few lines in flight for one core to stream at the rate
    /// these tiles convert a GEMV's weights. A Zen 4 core (one thread, weights from memory,
    /// same process, alternating calls, best of 150) ran the decode GEMV at 17.7 → 22.0 GB/s
    /// (2048×7168 FP8), 12.8 → 18.5 (768×2048) and 10.2 → 16.7–18.9 (2048×768) with it 16–32
    /// KiB ahead, near its rate with the weights in L3 (23 GB/s); 64 KiB was as good at 7168
    /// columns and 10–15% worse at the medium shapes, whose tasks are a few hundred KiB. 3 rows
    /// (compute-bound) were unchanged.
    const FAR_BYTES: usize = 32 << 10;

    /// Length in u16 of `m` prepared rows of `k` columns in `parts` bf16 parts.
    pub(crate) fn prepared_len(m: usize, k: usize, parts: usize) -> usize {
        m * k.div_ceil(CHUNK) * PART_WORDS * parts
    }

    /// Splits `m` rows of x (`[m, k]`) into `parts` bf16 parts. Three (exact activations):
    /// x = hi + mid + lo + r with |r| ≤ 2⁻²⁴|x| (each bf16 rounding keeps 8 significant bits
    /// of what the previous left). One (bf16 activations): x rounded to bf16, nearest even.
    /// The parts are laid out in the lane order the weight conversion produces: within
    /// chunk c, the A vectors hold
    /// columns 64c + {0–7, 16–23, 32–39, 48–55} and the B vectors the other 32 (the order of
    /// `vpunpck{l,h}bw` on 64 codes). Columns past k are zero. (Two parts, |r| ≤ 2⁻¹⁶|x|, made
    /// results depend on rounding flips of the hi part at the 1e-5 level: a batch and its
    /// sequences alone then differed by 1e-4 in the logits.)
    ///
    /// # Safety
    /// The CPU must have [`Isa::Avx512Bf16`]; `out.len() == prepared_len(m, k, parts)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
    pub(crate) unsafe fn prepare_x(x: &[f32], m: usize, k: usize, parts: usize, out: &mut [u16]) {
        let chunks = k.div_ceil(CHUNK);
        let chunk_words = PART_WORDS * parts;
        assert!(x.len() >= m * k && out.len() == prepared_len(m, k, parts));
        for i in 0..m {
            for ch in 0..chunks {
                unsafe {
                    let o = out.as_mut_ptr().add((i * chunks + ch) * chunk_words);
                    for j in 0..4 {
                        let c0 = ch * CHUNK + 16 * j;
                        let rem = k.saturating_sub(c0).min(16);
                        let mask: u16 = if rem == 16 { 0xffff } else { (1u16 << rem) - 1 };
                        let mut v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i * k + c0.min(k)));
                        for part in 0..parts {
                            let p: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                            let back = _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(p),
                                16,
                            ));
                            v = _mm512_sub_ps(v, back);
                            let a = o.add(PART_WORDS * part + 8 * j) as *mut __m128i;
                            _mm_storeu_si128(a, _mm256_castsi256_si128(p));
                            _mm_storeu_si128(a.add(4), _mm256_extracti128_si256::<1>(p));
                        }
                    }
                }
            }
        }
    }

    /// 64 e4m3 codes → two vectors of 32 bf16 (the lane order of [`prepare_x`]).
    #[inline(always)]
    unsafe fn convert64(
        codes: __m512i,
        th0: __m512i,
        th1: __m512i,
        tl0: __m512i,
        tl1: __m512i,
    ) -> (__m512bh, __m512bh) {
        unsafe {
            let h = _mm512_permutex2var_epi8(th0, codes, th1);
            // (table high byte) | (code & 0x80): the sign.
            let h = _mm512_ternarylogic_epi32::<0xF8>(h, codes, _mm512_set1_epi8(0x80u8 as i8));
            let l = _mm512_permutex2var_epi8(tl0, codes, tl1);
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi8(l, h)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi8(l, h)),
            )
        }
    }

    /// Accumulators per (weight row, x row) pair of a tile with `pairs` pairs: each 64-column
    /// chunk adds six dependent `vdpbf16ps` (three parts, two halves) to a pair's sum, and
    /// with one accumulator a tile of 4×1 (the decode GEMV) waited on their latency (about 6
    /// cycles, two issued a cycle: 12 chains keep the unit busy; three chains took 0.9× the
    /// CPU time of one on a 768×2048 FP8 GEMV from L3, one core). The six products are dealt
    /// round-robin over the pair's chains, which are added once per 128 columns.
    const fn chains(pairs: usize) -> usize {
        if pairs >= 12 {
            1
        } else if pairs >= 6 {
            2
        } else {
            3
        }
    }

    /// `RW` weight rows of kind `KIND` (at `q`, `k` columns each; FP8: in one 128-row scale
    /// block, scales at `srow`) against `RX` prepared x rows (at `xp`, stride `xs` words),
    /// columns `c0..c1` (`c0` on a 128-column block); `rows_left` rows of the weight start at
    /// `q` (prefetch bound). Returns the partial dot products, scale applied.
    #[inline]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
    unsafe fn tile<const KIND: u8, const PARTS: usize, const RW: usize, const RX: usize>(
        xp: *const u16,
        xs: usize,
        q: *const u8,
        k: usize,
        c0: usize,
        c1: usize,
        srow: *const f32,
        rows_left: usize,
    ) -> [[f32; RX]; RW] {
        unsafe {
            let tp = TABLES.as_ptr() as *const u8;
            let th0 = _mm512_loadu_si512(tp as *const _);
            let th1 = _mm512_loadu_si512(tp.add(64) as *const _);
            let tl0 = _mm512_loadu_si512(tp.add(128) as *const _);
            let tl1 = _mm512_loadu_si512(tp.add(192) as *const _);
            let (ia, ib) = (
                _mm512_loadu_si512(BF16_ORDER[0].as_ptr() as *const _),
                _mm512_loadu_si512(BF16_ORDER[1].as_ptr() as *const _),
            );
            // Bytes per weight and per weight row.
            let eb = if KIND == KIND_FP8 { 1 } else { 2 };
            let rb = k * eb;
            // Prefetch the same columns of later row groups: the first group at least
            // NEAR_BYTES ahead into L1 (one core's demand misses alone reach about half of what
            // its share of the memory bandwidth allows), never past the weight's last row.
            // Past the task's last row is intended: the kernel team hands a thread consecutive
            // tasks (`crate::pool`), so the rows after this task are most likely its next, and
            // a prefetch stream that stopped at each task's end restarted from demand misses
            // at the next one's start (a `small` batch-1 decode step, 64 KiB tasks, took 1.1×
            // as long).
            // The distance counts the bytes the tiles stream, `c1 − c0` columns a row (x cut
            // into column blocks reads a block of every row, not whole rows).
            let group = RW * (c1 - c0) * eb;
            let ahead = |bytes: usize| {
                let rows = bytes.div_ceil(group) * RW;
                (rows < rows_left).then_some(rows * rb)
            };
            let near = ahead(NEAR_BYTES);
            // The L2 prefetch at least one row group beyond the L1 one (both round up to
            // whole groups: 16 and 24 KiB ahead landed on the L1 prefetch's group at 7168
            // columns, and gained nothing).
            let far = if super::l2_prefetch() {
                ahead(FAR_BYTES.max(NEAR_BYTES.div_ceil(group) * group + 1))
            } else {
                None
            };
            let mut tot = [[_mm512_setzero_ps(); RX]; RW];
            let chains = chains(RW * RX);
            let mut c = c0;
            while c < c1 {
                let bend = (c + FP8_BLOCK).min(c1);
                let mut acc = [[[_mm512_setzero_ps(); 3]; RX]; RW];
                while c < bend {
                    let mut wa = [std::mem::transmute::<__m512, __m512bh>(_mm512_setzero_ps()); RW];
                    let mut wb = wa;
                    for r in 0..RW {
                        let p = q.add(r * rb + c * eb);
                        // One line per 64 FP8 codes, two per 64 BF16 values.
                        for line in 0..eb {
                            if let Some(d) = near {
                                _mm_prefetch::<_MM_HINT_T0>(p.add(d + 64 * line) as *const i8);
                            }
                            if let Some(d) = far {
                                _mm_prefetch::<_MM_HINT_T1>(p.add(d + 64 * line) as *const i8);
                            }
                        }
                        let left = k - c;
                        if KIND == KIND_FP8 {
                            let codes = if left >= CHUNK {
                                _mm512_loadu_si512(p as *const _)
                            } else {
                                _mm512_maskz_loadu_epi8((1u64 << left) - 1, p as *const i8)
                            };
                            (wa[r], wb[r]) = convert64(codes, th0, th1, tl0, tl1);
                        } else {
                            let (z0, z1) = if left >= CHUNK {
                                (
                                    _mm512_loadu_si512(p as *const _),
                                    _mm512_loadu_si512(p.add(64) as *const _),
                                )
                            } else {
                                let m0 = ((1u64 << left.min(32)) as u32).wrapping_sub(1);
                                let m1 = ((1u64 << left.saturating_sub(32)) as u32).wrapping_sub(1);
                                (
                                    _mm512_maskz_loadu_epi16(m0, p as *const i16),
                                    _mm512_maskz_loadu_epi16(m1, p.add(64) as *const i16),
                                )
                            };
                            wa[r] = std::mem::transmute::<__m512i, __m512bh>(
                                _mm512_permutex2var_epi16(z0, ia, z1),
                            );
                            wb[r] = std::mem::transmute::<__m512i, __m512bh>(
                                _mm512_permutex2var_epi16(z0, ib, z1),
                            );
                        }
                    }
                    let ch = c / CHUNK;
                    for i in 0..RX {
                        let xv = xp.add(i * xs + ch * PART_WORDS * PARTS) as *const __m512i;
                        let ld = |j: usize| -> __m512bh {
                            std::mem::transmute(_mm512_loadu_si512(xv.add(j) as *const _))
                        };
                        for part in 0..PARTS {
                            let (xa, xb) = (ld(2 * part), ld(2 * part + 1));
                            let (ja, jb) = ((2 * part) % chains, (2 * part + 1) % chains);
                            for r in 0..RW {
                                acc[r][i][ja] = _mm512_dpbf16_ps(acc[r][i][ja], xa, wa[r]);
                                acc[r][i][jb] = _mm512_dpbf16_ps(acc[r][i][jb], xb, wb[r]);
                            }
                        }
                    }
                    c += CHUNK;
                }
                let mut sum = [[_mm512_setzero_ps(); RX]; RW];
                for r in 0..RW {
                    for i in 0..RX {
                        sum[r][i] = acc[r][i][0];
                        for j in 1..chains {
                            sum[r][i] = _mm512_add_ps(sum[r][i], acc[r][i][j]);
                        }
                    }
                }
                if KIND == KIND_FP8 {
                    let sv = _mm512_set1_ps(*srow.add((bend - 1) / FP8_BLOCK));
                    for r in 0..RW {
                        for i in 0..RX {
                            tot[r][i] = _mm512_fmadd_ps(sum[r][i], sv, tot[r][i]);
                        }
                    }
                } else {
                    for r in 0..RW {
                        for i in 0..RX {
                            tot[r][i] = _mm512_add_ps(sum[r][i], tot[r][i]);
                        }
                    }
                }
            }
            super::avx512::sums(&tot)
        }
    }

    /// `out[i·ld + (n−n0)] += x_i · W_n` for rows `n0..n1` of the FP8 or BF16 weight `w` and
    /// the `m` prepared rows `xp` ([`prepare_x`] of `[m, w.cols]` in `parts` parts: 1 or 3).
    ///
    /// # Safety
    /// The CPU must have [`Isa::Avx512Bf16`]; `w` must be FP8 or BF16 ([`bf16_tiles_serve`]).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
    pub(crate) unsafe fn rows(
        xp: &[u16],
        parts: usize,
        m: usize,
        w: &Weight,
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        assert!(n1 <= w.rows);
        match w.data {
            WeightData::Fp8E4m3 { q, scale_inv } if parts == 1 => unsafe {
                rows_kind::<KIND_FP8, 1>(xp, m, w.cols, q, scale_inv, n0, n1, out, ld)
            },
            WeightData::Fp8E4m3 { q, scale_inv } => unsafe {
                rows_kind::<KIND_FP8, 3>(xp, m, w.cols, q, scale_inv, n0, n1, out, ld)
            },
            WeightData::Bf16(b) if parts == 1 => unsafe {
                rows_kind::<KIND_BF16, 1>(xp, m, w.cols, b, &[], n0, n1, out, ld)
            },
            WeightData::Bf16(b) => unsafe {
                rows_kind::<KIND_BF16, 3>(xp, m, w.cols, b, &[], n0, n1, out, ld)
            },
            _ => unreachable!("avx512bf16::rows on a weight it does not serve"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")]
    unsafe fn rows_kind<const KIND: u8, const PARTS: usize>(
        xp: &[u16],
        m: usize,
        k: usize,
        q: &[u8],
        scale_inv: &[f32],
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let eb = if KIND == KIND_FP8 { 1 } else { 2 };
        assert!(q.len() >= n1 * k * eb);
        // The prefetch bound: the weight's last row, not the task's (see `tile`).
        let all_rows = q.len() / (k * eb).max(1);
        let xs = k.div_ceil(CHUNK) * PART_WORDS * PARTS;
        assert!(xp.len() >= m * xs);
        assert!(m == 0 || out.len() >= (m - 1) * ld + (n1 - n0));
        let kb = k.div_ceil(FP8_BLOCK);
        let kcb = if m * k * 2 * PARTS <= WHOLE_X_BYTES {
            k.max(1)
        } else {
            KCB
        };
        for c0 in (0..k).step_by(kcb) {
            let c1 = (c0 + kcb).min(k);
            let mut n = n0;
            while n < n1 {
                // Four rows at a time when they share a scale block.
                let four = n + 4 <= n1 && n % FP8_BLOCK + 4 <= FP8_BLOCK;
                let srow = match KIND {
                    KIND_FP8 => unsafe { scale_inv.as_ptr().add((n / FP8_BLOCK) * kb) },
                    _ => std::ptr::null(),
                };
                let qn = unsafe { q.as_ptr().add(n * k * eb) };
                let mut i = 0;
                while i < m {
                    let g = (m - i).min(4);
                    let xi = unsafe { xp.as_ptr().add(i * xs) };
                    macro_rules! run {
                        ($rw:literal, $rx:literal) => {{
                            let t = unsafe {
                                tile::<KIND, PARTS, $rw, $rx>(
                                    xi,
                                    xs,
                                    qn,
                                    k,
                                    c0,
                                    c1,
                                    srow,
                                    all_rows - n,
                                )
                            };
                            for (r, tr) in t.iter().enumerate() {
                                for (j, v) in tr.iter().enumerate() {
                                    out[(i + j) * ld + n + r - n0] += v;
                                }
                            }
                        }};
                    }
                    match (four, g) {
                        (true, 1) => run!(4, 1),
                        (true, 2) => run!(4, 2),
                        (true, 3) => run!(4, 3),
                        (true, _) => run!(4, 4),
                        (false, 1) => run!(1, 1),
                        (false, 2) => run!(1, 2),
                        (false, 3) => run!(1, 3),
                        (false, _) => run!(1, 4),
                    }
                    i += g;
                }
                n += if four { 4 } else { 1 };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// 16 weights starting at element `idx` as two f32 vectors, in vector-path units.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load16<const KIND: u8>(p: *const u8, idx: usize) -> (__m256, __m256) {
        unsafe {
            match KIND {
                KIND_FP8 => {
                    let b = _mm_loadu_si128(p.add(idx) as *const __m128i);
                    let w = _mm256_cvtepu8_epi16(b);
                    let t = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 1);
                    let h = _mm256_and_si256(t, _mm256_set1_epi16(0xBF80u16 as i16));
                    (
                        _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                        _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)),
                    )
                }
                KIND_BF16 => {
                    let q = p.add(2 * idx);
                    let lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(q as *const __m128i));
                    let hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(q.add(16) as *const __m128i));
                    (
                        _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)),
                        _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)),
                    )
                }
                KIND_F16 => {
                    let q = p.add(2 * idx);
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(q as *const __m128i)),
                        _mm256_cvtph_ps(_mm_loadu_si128(q.add(16) as *const __m128i)),
                    )
                }
                _ => {
                    let q = p.add(4 * idx) as *const f32;
                    (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)))
                }
            }
        }
    }

    #[inline]
    /// Converts `out.len()` elements of kind `KIND` from `bytes`, times `mul` (vector units).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn convert<const KIND: u8>(bytes: &[u8], mul: f32, out: &mut [f32]) {
        let n = out.len();
        let mv = _mm256_set1_ps(mul);
        let mut i = 0;
        unsafe {
            while i + 16 <= n {
                let (a, b) = load16::<KIND>(bytes.as_ptr(), i);
                let o = out.as_mut_ptr().add(i);
                _mm256_storeu_ps(o, _mm256_mul_ps(a, mv));
                _mm256_storeu_ps(o.add(8), _mm256_mul_ps(b, mv));
                i += 16;
            }
        }
        for (j, o) in out.iter_mut().enumerate().skip(i) {
            *o = scalar_elem::<KIND>(bytes, j) * mul;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_row(w: &Weight, r: usize, c0: usize, out: &mut [f32]) {
        let (bytes, kind) = {
            let (b, k, _) = weight_parts(w);
            (b, k)
        };
        unsafe {
            match kind {
                KIND_FP8 => dequant_kind::<KIND_FP8>(w, bytes, r, c0, out),
                KIND_BF16 => dequant_kind::<KIND_BF16>(w, bytes, r, c0, out),
                KIND_F16 => dequant_kind::<KIND_F16>(w, bytes, r, c0, out),
                _ => dequant_kind::<KIND_F32>(w, bytes, r, c0, out),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequant_kind<const KIND: u8>(
        w: &Weight,
        bytes: &[u8],
        r: usize,
        c0: usize,
        out: &mut [f32],
    ) {
        let k = w.cols;
        let (_, _, scales) = weight_parts(w);
        let base = r * k;
        let p = bytes.as_ptr();
        let mut c = c0;
        let end = c0 + out.len();
        while c < end {
            let blk = c / FP8_BLOCK;
            let bend = ((blk + 1) * FP8_BLOCK).min(end);
            let s = block_scale(KIND, scales, k, r, blk);
            let sv = _mm256_set1_ps(s);
            while c + 16 <= bend {
                unsafe {
                    let (a, b) = load16::<KIND>(p, base + c);
                    let o = out.as_mut_ptr().add(c - c0);
                    _mm256_storeu_ps(o, _mm256_mul_ps(a, sv));
                    _mm256_storeu_ps(o.add(8), _mm256_mul_ps(b, sv));
                }
                c += 16;
            }
            while c < bend {
                out[c - c0] = scalar_elem::<KIND>(bytes, base + c) * s;
                c += 1;
            }
        }
    }

    pub(super) unsafe fn stream_rows(
        x: &[f32],
        m: usize,
        w: &Weight,
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let (_, kind, _) = weight_parts(w);
        unsafe {
            match kind {
                KIND_FP8 => stream_kind::<KIND_FP8>(x, m, w, n0, n1, out, ld),
                KIND_BF16 => stream_kind::<KIND_BF16>(x, m, w, n0, n1, out, ld),
                KIND_F16 => stream_kind::<KIND_F16>(x, m, w, n0, n1, out, ld),
                _ => stream_kind::<KIND_F32>(x, m, w, n0, n1, out, ld),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn stream_kind<const KIND: u8>(
        x: &[f32],
        m: usize,
        w: &Weight,
        n0: usize,
        n1: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let k = w.cols;
        assert!(x.len() >= m * k && out.len() >= (m.max(1) - 1) * ld + (n1 - n0));
        for n in n0..n1 {
            let mut i = 0;
            while i < m {
                let g = (m - i).min(4);
                let xs = &x[i * k..];
                let res: [f32; 4] = unsafe {
                    match g {
                        1 => pad(dot_m1::<KIND>(xs, w, n)),
                        2 => pad(dot_mr::<KIND, 2>(xs, w, n)),
                        3 => pad(dot_mr::<KIND, 3>(xs, w, n)),
                        _ => pad(dot_mr::<KIND, 4>(xs, w, n)),
                    }
                };
                for (j, v) in res.iter().enumerate().take(g) {
                    out[(i + j) * ld + n - n0] = *v;
                }
                i += g;
            }
        }
    }

    fn pad<const G: usize>(v: [f32; G]) -> [f32; 4] {
        let mut o = [0f32; 4];
        o[..G].copy_from_slice(&v);
        o
    }

    /// One row of x against weight row `n`: four independent FMA chains, the block scale
    /// applied once per 128 columns.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_m1<const KIND: u8>(x: &[f32], w: &Weight, n: usize) -> [f32; 1] {
        let k = w.cols;
        let (bytes, _, scales) = weight_parts(w);
        let p = bytes.as_ptr();
        let xp = x.as_ptr();
        let base = n * k;
        let mut tot = _mm256_setzero_ps();
        let mut tail = 0f32;
        let mut c = 0;
        unsafe {
            while c < k {
                let blk = c / FP8_BLOCK;
                let bend = ((blk + 1) * FP8_BLOCK).min(k);
                let s = block_scale(KIND, scales, k, n, blk);
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut a2 = _mm256_setzero_ps();
                let mut a3 = _mm256_setzero_ps();
                while c + 32 <= bend {
                    let (w0, w1) = load16::<KIND>(p, base + c);
                    let (w2, w3) = load16::<KIND>(p, base + c + 16);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c)), w0, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c + 8)), w1, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c + 16)), w2, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c + 24)), w3, a3);
                    c += 32;
                }
                if c + 16 <= bend {
                    let (w0, w1) = load16::<KIND>(p, base + c);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c)), w0, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c + 8)), w1, a1);
                    c += 16;
                }
                let mut ts = 0f32;
                while c < bend {
                    ts += x[c] * scalar_elem::<KIND>(bytes, base + c);
                    c += 1;
                }
                tail += ts * s;
                let part = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
                tot = _mm256_fmadd_ps(part, _mm256_set1_ps(s), tot);
            }
            [hsum(tot) + tail]
        }
    }

    /// `G` rows of x (stride k) against weight row `n`, the weights dequantised once for all.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_mr<const KIND: u8, const G: usize>(x: &[f32], w: &Weight, n: usize) -> [f32; G] {
        let k = w.cols;
        let (bytes, _, scales) = weight_parts(w);
        let p = bytes.as_ptr();
        let xp = x.as_ptr();
        let base = n * k;
        let mut tot = [_mm256_setzero_ps(); G];
        let mut tail = [0f32; G];
        let mut c = 0;
        unsafe {
            while c < k {
                let blk = c / FP8_BLOCK;
                let bend = ((blk + 1) * FP8_BLOCK).min(k);
                let s = block_scale(KIND, scales, k, n, blk);
                let mut a = [[_mm256_setzero_ps(); 2]; G];
                while c + 16 <= bend {
                    let (w0, w1) = load16::<KIND>(p, base + c);
                    for (g, ag) in a.iter_mut().enumerate() {
                        let xr = xp.add(g * k + c);
                        ag[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, ag[0]);
                        ag[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, ag[1]);
                    }
                    c += 16;
                }
                let mut ts = [0f32; G];
                while c < bend {
                    let wv = scalar_elem::<KIND>(bytes, base + c);
                    for (g, t) in ts.iter_mut().enumerate() {
                        *t += x[g * k + c] * wv;
                    }
                    c += 1;
                }
                let sv = _mm256_set1_ps(s);
                for g in 0..G {
                    tail[g] += ts[g] * s;
                    tot[g] = _mm256_fmadd_ps(_mm256_add_ps(a[g][0], a[g][1]), sv, tot[g]);
                }
            }
            let mut r = [0f32; G];
            for g in 0..G {
                r[g] = hsum(tot[g]) + tail[g];
            }
            r
        }
    }

    /// The 6×16 (or `R`×16) register tile: 2·R accumulators, one broadcast per row and k.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kern<const R: usize>(t: &Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        unsafe {
            let mut a = t.a;
            let mut b = t.b;
            for _ in 0..t.kc {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for (i, ai) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(i * t.rsa));
                    ai[0] = _mm256_fmadd_ps(av, b0, ai[0]);
                    ai[1] = _mm256_fmadd_ps(av, b1, ai[1]);
                }
                a = a.add(t.csa);
                b = b.add(t.rsb);
            }
            if t.nr == NR {
                for (i, ai) in acc.iter().enumerate() {
                    let c = t.c.add(i * t.ldc);
                    let (mut c0, mut c1) = (ai[0], ai[1]);
                    if t.accumulate {
                        c0 = _mm256_add_ps(c0, _mm256_loadu_ps(c));
                        c1 = _mm256_add_ps(c1, _mm256_loadu_ps(c.add(8)));
                    }
                    _mm256_storeu_ps(c, c0);
                    _mm256_storeu_ps(c.add(8), c1);
                }
            } else {
                let mut tmp = [0f32; NR];
                for (i, ai) in acc.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr(), ai[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), ai[1]);
                    let c = t.c.add(i * t.ldc);
                    for (j, v) in tmp.iter().enumerate().take(t.nr) {
                        *c.add(j) = if t.accumulate { *c.add(j) + v } else { *v };
                    }
                }
            }
        }
    }

    /// e^x, Cephes-style: 2^n · p(r) with x = n·ln2 + r, |r| ≤ ln2/2; relative error ~2e-7.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp_ps(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-88.0));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_inplace(v: &mut [f32]) {
        let mut i = 0;
        unsafe {
            while i + 8 <= v.len() {
                let p = v.as_mut_ptr().add(i);
                let x = _mm256_loadu_ps(p);
                // −∞ (masked scores) must give exactly 0, not e^-88.
                let keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_GT_OQ);
                _mm256_storeu_ps(p, _mm256_and_ps(exp_ps(x), keep));
                i += 8;
            }
        }
        for x in v[i..].iter_mut() {
            *x = x.exp();
        }
    }
}
