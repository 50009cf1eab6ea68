//! The codec's inner loops, compiled three times — for AVX-512 (F + BW), for AVX2 + FMA, and for
//! the portable baseline — and chosen once per process from the CPU's features
//! (`is_x86_feature_detected!`). The loops are written branch-free over plain slices so the
//! compiler vectorizes each copy at its instruction set's width: bf16 rounding in 16- or 8-lane
//! integer ops, the fp8 block maximum as an integer max, fp8 decoding arithmetically instead of
//! through a 256-entry table (a table lookup would not vectorize without gathers).
//!
//! Every entry point agrees bit for bit with the scalar reference functions of the parent
//! module (`f32_to_bf16_bits`, `f32_to_e4m3`, `e4m3_to_f32`); the tests check each level this
//! CPU has against them.

use super::{FP8_BLOCK, FP8_MAX, f32_to_bf16_bits, f32_to_e4m3};
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Environment variable that caps the codec's instruction set (see [`Level::detect`]).
pub const SIMD_ENV: &str = "SHARDSEEK_CODEC_SIMD";

/// The instruction set the loops run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    /// The level in use: the best this CPU supports (detected once), or a lower one named by
    /// `SHARDSEEK_CODEC_SIMD` (`portable`, `avx2`, `avx512`) to measure or rule out a path.
    pub fn detect() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = Level::best();
            let asked = match std::env::var(SIMD_ENV).ok().as_deref() {
                Some("portable") => Level::Portable,
                Some("avx2") => Level::Avx2,
                _ => best,
            };
            if (asked as u8) < (best as u8) {
                asked
            } else {
                best
            }
        })
    }

    /// The best level this CPU supports (std caches the feature checks).
    fn best() -> Level {
        {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    return Level::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Level::Avx2;
                }
            }
            Level::Portable
        }
    }

    /// Every level this CPU can run, portable first (for tests and benchmarks).
    pub fn available() -> Vec<Level> {
        let best = Level::best();
        [Level::Portable, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|l| *l as u8 <= best as u8)
            .collect()
    }
}

/// Defines `pub fn $name(level, args…)` that runs `$body` compiled for the requested level.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name(level: Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw")]
            fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match level {
                // SAFETY: `Level::best` checked that the CPU has these features.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 if Level::best() == Level::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 | Level::Avx512 if Level::best() as u8 >= Level::Avx2 as u8 => {
                    // SAFETY: as above.
                    unsafe { avx2($($arg),*) }
                }
                _ => body($($arg),*),
            }
        }
    };
}

/// bf16 bits of `v`, as [`f32_to_bf16_bits`] but branch-free (NaN selected, not branched to).
#[inline(always)]
fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) | 0x0040) as u16;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet
    } else {
        rounded
    }
}

/// e4m3fn code → f32 without a table: the normal codes rebias the exponent, the subnormal ones
/// are m·2⁻⁹, 0x7F/0xFF are NaN.
#[inline(always)]
fn e4m3(code: u8) -> f32 {
    let c = u32::from(code);
    let sign = (c & 0x80) << 24;
    let e = (c >> 3) & 0x0F;
    let m = c & 0x07;
    let normal = ((e + 120) << 23) | (m << 20);
    let subnormal = (m as f32 * (1.0 / 512.0)).to_bits();
    let mag = if e == 0 { subnormal } else { normal };
    let mag = if c & 0x7F == 0x7F { 0x7FC0_0000 } else { mag };
    f32::from_bits(mag | sign)
}

multiversion! {
    /// Writes `src` as little-endian bf16 words into the first `2 * src.len()` bytes of `dst`.
    fn encode_bf16(src: &[f32], dst: &mut [MaybeUninit<u8>]) {
        let dst = &mut dst[..src.len() * 2];
        let words = dst.as_mut_ptr().cast::<u16>();
        for (i, &v) in src.iter().enumerate() {
            // SAFETY: `dst` holds 2 * src.len() bytes (the slice above panics otherwise), so
            // word i lies inside it; unaligned writes need no alignment.
            unsafe { words.add(i).write_unaligned(bf16(v).to_le()) };
        }
    }
}

multiversion! {
    /// Writes `src` as little-endian f32 into the first `4 * src.len()` bytes of `dst`.
    fn encode_f32(src: &[f32], dst: &mut [MaybeUninit<u8>]) {
        let dst = &mut dst[..src.len() * 4];
        let words = dst.as_mut_ptr().cast::<u32>();
        for (i, &v) in src.iter().enumerate() {
            // SAFETY: as in `encode_bf16`, with four bytes per value.
            unsafe { words.add(i).write_unaligned(v.to_bits().to_le()) };
        }
    }
}

multiversion! {
    /// Encodes one fp8 block (≤ 128 values) into `dst` and returns its scale.
    fn encode_fp8_block(src: &[f32], dst: &mut [MaybeUninit<u8>]) -> f32 {
        // Max of |v| on the bit patterns: for non-negative floats integer order is float order.
        let amax = f32::from_bits(src.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF)));
        let scale = if amax > 0.0 && amax.is_finite() { amax / FP8_MAX } else { 1.0 };
        let inv = 1.0 / scale;
        for (d, &v) in dst[..src.len()].iter_mut().zip(src) {
            d.write(f32_to_e4m3(v * inv));
        }
        scale
    }
}

multiversion! {
    /// `out[i] = bf16 value of little-endian word i of src`, into uninitialised memory.
    fn load_bf16(src: &[u8], out: &mut [MaybeUninit<f32>]) {
        let words = src.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16));
        for (d, v) in out.iter_mut().zip(words) {
            d.write(v);
        }
    }
}

multiversion! {
    /// `out[i] = e4m3(src[i]) · scale`, into uninitialised memory.
    fn load_fp8(src: &[u8], scale: f32, out: &mut [MaybeUninit<f32>]) {
        for (d, &c) in out.iter_mut().zip(src) {
            d.write(e4m3(c) * scale);
        }
    }
}

multiversion! {
    /// `out[i] = little-endian f32 i of src`, into uninitialised memory.
    fn load_f32(src: &[u8], out: &mut [MaybeUninit<f32>]) {
        let vals = src.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        for (d, v) in out.iter_mut().zip(vals) {
            d.write(v);
        }
    }
}

multiversion! {
    /// `out[i] (+)= bf16 value of little-endian word i of src`.
    fn apply_bf16(src: &[u8], out: &mut [f32], add: bool) {
        let words = src.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16));
        if add {
            for (d, v) in out.iter_mut().zip(words) {
                *d += v;
            }
        } else {
            for (d, v) in out.iter_mut().zip(words) {
                *d = v;
            }
        }
    }
}

multiversion! {
    /// `out[i] (+)= e4m3(src[i]) · scale`.
    fn apply_fp8(src: &[u8], scale: f32, out: &mut [f32], add: bool) {
        if add {
            for (d, &c) in out.iter_mut().zip(src) {
                *d += e4m3(c) * scale;
            }
        } else {
            for (d, &c) in out.iter_mut().zip(src) {
                *d = e4m3(c) * scale;
            }
        }
    }
}

multiversion! {
    /// `out[i] (+)= little-endian f32 i of src`.
    fn apply_f32(src: &[u8], out: &mut [f32], add: bool) {
        let vals = src.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if add {
            for (d, v) in out.iter_mut().zip(vals) {
                *d += v;
            }
        } else {
            for (d, v) in out.iter_mut().zip(vals) {
                *d = v;
            }
        }
    }
}

/// Encodes one row into fp8 codes (`row.len()` bytes of `codes`) and its per-block scales
/// (4 little-endian bytes per 128 values, `scales`) at `level`.
pub fn encode_fp8_row(
    level: Level,
    row: &[f32],
    codes: &mut [MaybeUninit<u8>],
    scales: &mut [MaybeUninit<u8>],
) {
    let mut row = row;
    let mut codes = codes;
    let mut scales = scales;
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && Level::best() == Level::Avx512 {
        // Whole blocks in AVX-512 intrinsics; a short last block (if any) below.
        let whole = (row.len() / FP8_BLOCK)
            .min(codes.len() / FP8_BLOCK)
            .min(scales.len() / 4);
        let (head, tail) = row.split_at(whole * FP8_BLOCK);
        let (head_codes, tail_codes) = std::mem::take(&mut codes).split_at_mut(whole * FP8_BLOCK);
        let (head_scales, tail_scales) = std::mem::take(&mut scales).split_at_mut(whole * 4);
        // SAFETY: `Level::best` checked the CPU has AVX-512 F and BW; the three slices hold
        // `whole` blocks, codes and scales.
        unsafe { encode_fp8_blocks_avx512(head, head_codes, head_scales) };
        (row, codes, scales) = (tail, tail_codes, tail_scales);
    }
    for ((src, dst), s) in row
        .chunks(FP8_BLOCK)
        .zip(codes.chunks_mut(FP8_BLOCK))
        .zip(scales.chunks_exact_mut(4))
    {
        let scale = encode_fp8_block(level, src, dst);
        for (d, b) in s.iter_mut().zip(scale.to_le_bytes()) {
            d.write(b);
        }
    }
}

/// [`encode_fp8_block`] over whole blocks in AVX-512 intrinsics, the same arithmetic bit for bit
/// (the tests compare it with the scalar reference, NaN and infinity included). The generic
/// loop, one block at a time, waits on each block's chain of maximum → two divisions →
/// broadcast before converting it; here the maxima of 16 blocks come first, their scales and
/// inverses are two vector divisions, and the conversions then run without waiting (the
/// blocks are re-read from L1), with the 32→8-bit narrowing in one instruction (`vpmovdb`).
///
/// # Safety
/// The CPU must have AVX-512 F and BW. `src.len()` must be a multiple of 128, `codes` must
/// hold `src.len()` bytes and `scales` 4 per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn encode_fp8_blocks_avx512(
    src: &[f32],
    codes: &mut [MaybeUninit<u8>],
    scales: &mut [MaybeUninit<u8>],
) {
    use std::arch::x86_64::*;
    let blocks = src.len() / FP8_BLOCK;
    assert!(codes.len() >= blocks * FP8_BLOCK && scales.len() >= blocks * 4);
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let c_sign = _mm512_set1_epi32(0x80);
    let c_one = _mm512_set1_epi32(1);
    let c_round = _mm512_set1_epi32(0x7FFFF);
    let c_rebias = _mm512_set1_epi32(120 << 3);
    let c_max_code = _mm512_set1_epi32(0x7E);
    let c_min_normal = _mm512_set1_epi32(0x3C80_0000);
    let c_512 = _mm512_set1_ps(512.0);
    let c_two23 = _mm512_set1_ps(8_388_608.0);
    let c_two23_bits = _mm512_set1_epi32(0x4B00_0000);
    let c_inf = _mm512_set1_epi32(0x7F80_0000);
    let c_nan_code = _mm512_set1_epi32(0x7F);
    let mut first = 0;
    while first < blocks {
        let n = (blocks - first).min(16);
        // Max of |v| per block on the bit patterns, as the generic kernel (a NaN is the
        // largest pattern, and fails the finiteness test below).
        let mut amax = [0u32; 16];
        for (j, a) in amax.iter_mut().enumerate().take(n) {
            let p = src[(first + j) * FP8_BLOCK..(first + j + 1) * FP8_BLOCK].as_ptr();
            let mut m = _mm512_setzero_si512();
            for k in 0..FP8_BLOCK / 16 {
                // SAFETY: the block holds 128 values; unaligned loads.
                let v = unsafe { _mm512_loadu_si512(p.add(16 * k).cast()) };
                m = _mm512_max_epu32(m, _mm512_and_si512(v, abs_mask));
            }
            *a = _mm512_reduce_max_epu32(m);
        }
        // scale = amax / 448 where 0 < amax < ∞, else 1; inv = 1 / scale (IEEE divisions: the
        // same values as the scalar ones).
        // SAFETY: 16 u32 are 16 f32 bit patterns; unaligned load.
        let a = _mm512_castsi512_ps(unsafe { _mm512_loadu_si512(amax.as_ptr().cast()) });
        let ok = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, _mm512_setzero_ps())
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_castsi512_ps(c_inf));
        let one = _mm512_set1_ps(1.0);
        let scale = _mm512_mask_div_ps(one, ok, a, _mm512_set1_ps(FP8_MAX));
        let inv = _mm512_div_ps(one, scale);
        let mut scale_arr = [0.0f32; 16];
        let mut inv_arr = [0.0f32; 16];
        // SAFETY: two 16-value arrays; unaligned stores.
        unsafe {
            _mm512_storeu_ps(scale_arr.as_mut_ptr(), scale);
            _mm512_storeu_ps(inv_arr.as_mut_ptr(), inv);
        }
        for j in 0..n {
            let b = first + j;
            let p = src[b * FP8_BLOCK..(b + 1) * FP8_BLOCK].as_ptr();
            let dst = codes[b * FP8_BLOCK..(b + 1) * FP8_BLOCK]
                .as_mut_ptr()
                .cast::<u8>();
            let inv = _mm512_set1_ps(inv_arr[j]);
            for k in 0..FP8_BLOCK / 16 {
                // SAFETY: as above.
                let x = _mm512_mul_ps(unsafe { _mm512_loadu_ps(p.add(16 * k)) }, inv);
                let bits = _mm512_castps_si512(x);
                // The steps of `f32_to_e4m3`, lane by lane.
                let sign = _mm512_and_si512(_mm512_srli_epi32::<24>(bits), c_sign);
                let a = _mm512_and_si512(bits, abs_mask);
                let odd = _mm512_and_si512(_mm512_srli_epi32::<20>(a), c_one);
                let rounded =
                    _mm512_srli_epi32::<20>(_mm512_add_epi32(_mm512_add_epi32(a, c_round), odd));
                let normal = _mm512_min_epu32(
                    _mm512_sub_epi32(_mm512_max_epu32(rounded, c_rebias), c_rebias),
                    c_max_code,
                );
                let scaled = _mm512_add_ps(
                    _mm512_mul_ps(
                        _mm512_castsi512_ps(_mm512_min_epu32(a, c_min_normal)),
                        c_512,
                    ),
                    c_two23,
                );
                let subnormal = _mm512_sub_epi32(_mm512_castps_si512(scaled), c_two23_bits);
                let mag = _mm512_mask_blend_epi32(
                    _mm512_cmplt_epu32_mask(a, c_min_normal),
                    normal,
                    subnormal,
                );
                let code = _mm512_mask_blend_epi32(
                    _mm512_cmpgt_epu32_mask(a, c_inf),
                    _mm512_or_si512(sign, mag),
                    c_nan_code,
                );
                // SAFETY: the block's 128 code bytes; unaligned 16-byte store.
                unsafe { _mm_storeu_si128(dst.add(16 * k).cast(), _mm512_cvtepi32_epi8(code)) };
            }
            for (d, byte) in scales[b * 4..b * 4 + 4]
                .iter_mut()
                .zip(scale_arr[j].to_le_bytes())
            {
                d.write(byte);
            }
        }
        first += n;
    }
}

/// Views initialised values as writable uninitialised memory, to run the kernels (which write
/// every element they are given) on buffers that already hold values.
///
/// # Safety
/// Only initialised values may be stored through the returned slice (what every kernel of this
/// module does), or `values` would end up holding uninitialised memory.
pub unsafe fn as_uninit<T>(values: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout; the caller keeps the contents initialised.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), values.len()) }
}

/// The scalar reference of [`encode_bf16`], for tests.
pub fn encode_bf16_reference(src: &[f32]) -> Vec<u16> {
    src.iter().map(|&v| f32_to_bf16_bits(v).to_le()).collect()
}

/// Runs an encode kernel into a fresh vector of `len` bytes (tests, materialisation; the hot
/// path encodes into the frame buffer instead).
///
/// # Safety
/// `f` must initialise all `len` bytes it is given (every encode kernel of this module does,
/// given a source of the matching length).
pub unsafe fn encode_to_vec(len: usize, f: impl FnOnce(&mut [MaybeUninit<u8>])) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    f(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: `f` initialised the `len` bytes (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::super::e4m3_to_f32;
    use super::*;

    /// Values that exercise rounding, ties, subnormals, infinities, NaN and saturation.
    fn probes() -> Vec<f32> {
        let mut v: Vec<f32> = (0..4096u32)
            .map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B9) ^ 0x3F80_0000))
            .collect();
        v.extend((0..2000).map(|i| (i as f32 - 1000.0) * 0.731));
        v.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
            448.0,
            449.0,
            1e30,
            -1e30,
        ]);
        v
    }

    #[test]
    fn bf16_encode_matches_the_scalar_reference_at_every_level() {
        let src = probes();
        let want = encode_bf16_reference(&src);
        for level in Level::available() {
            // SAFETY (here and below): the kernels write every element they are given.
            let bytes = unsafe { encode_to_vec(src.len() * 2, |d| encode_bf16(level, &src, d)) };
            let got: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                .collect();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{level:?}: value {:e} ({:#x})",
                    src[i],
                    src[i].to_bits()
                );
            }
        }
    }

    #[test]
    fn fp8_decode_matches_the_table_for_every_code_at_every_level() {
        let codes: Vec<u8> = (0..=255u8).collect();
        for level in Level::available() {
            let mut out = vec![0.0f32; 256];
            apply_fp8(level, &codes, 2.0, &mut out, false);
            for (c, v) in codes.iter().zip(&out) {
                let want = e4m3_to_f32(*c) * 2.0;
                assert!(
                    (want.is_nan() && v.is_nan()) || want.to_bits() == v.to_bits(),
                    "{level:?}: code {c:#04x}: {v} vs {want}"
                );
            }
            let mut loaded = vec![0.0f32; 256];
            // SAFETY: the kernel writes every element it is given.
            load_fp8(level, &codes, 2.0, unsafe { as_uninit(&mut loaded) });
            for (v, l) in out.iter().zip(&loaded) {
                assert!(v.to_bits() == l.to_bits() || (v.is_nan() && l.is_nan()));
            }
            let mut acc = vec![1.0f32; 256];
            apply_fp8(level, &codes, 1.0, &mut acc, true);
            for (c, v) in codes.iter().zip(&acc) {
                let want = 1.0 + e4m3_to_f32(*c);
                assert!(
                    (want.is_nan() && v.is_nan()) || want == *v,
                    "{level:?}: add code {c:#04x}"
                );
            }
        }
    }

    #[test]
    fn fp8_encode_agrees_at_every_level_with_nan_and_infinity() {
        // Whole blocks (the AVX-512 path) and a short tail, blocks holding NaN or infinity
        // (scale 1, NaN codes, saturation) among ordinary ones.
        let mut src = probes();
        src.truncate(src.len() / FP8_BLOCK * FP8_BLOCK + 37);
        let n = src.len();
        src[n - 200] = f32::NAN;
        src[5] = f32::INFINITY;
        let blocks = n.div_ceil(FP8_BLOCK);
        let run = |level| {
            let mut codes = vec![0u8; n];
            let mut scales = vec![0u8; blocks * 4];
            // SAFETY: the kernel writes every element it is given.
            encode_fp8_row(level, &src, unsafe { as_uninit(&mut codes) }, unsafe {
                as_uninit(&mut scales)
            });
            (codes, scales)
        };
        let portable = run(Level::Portable);
        for (b, block) in src.chunks(FP8_BLOCK).enumerate() {
            for (i, &v) in block.iter().enumerate() {
                if v.is_nan() {
                    assert_eq!(portable.0[b * FP8_BLOCK + i] & 0x7F, 0x7F, "NaN stays NaN");
                }
            }
        }
        for level in Level::available() {
            assert_eq!(run(level), portable, "{level:?}");
        }
    }

    #[test]
    fn fp8_encode_and_bf16_f32_decode_match_the_reference_at_every_level() {
        let src: Vec<f32> = probes().into_iter().filter(|v| v.is_finite()).collect();
        let src = &src[..src.len() / FP8_BLOCK * FP8_BLOCK + 37];
        // Reference: scalar block scale and codes.
        let mut want_codes = Vec::new();
        let mut want_scales = Vec::new();
        for block in src.chunks(FP8_BLOCK) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 { amax / FP8_MAX } else { 1.0 };
            want_scales.extend_from_slice(&scale.to_le_bytes());
            want_codes.extend(block.iter().map(|&v| f32_to_e4m3(v * (1.0 / scale))));
        }
        let bytes: Vec<u8> = src.iter().flat_map(|v| v.to_le_bytes()).collect();
        let halves: Vec<u8> = encode_bf16_reference(src)
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        for level in Level::available() {
            let mut codes = vec![0u8; src.len()];
            let mut scales = vec![0u8; want_scales.len()];
            // SAFETY (here and below): the kernels write every element they are given.
            encode_fp8_row(level, src, unsafe { as_uninit(&mut codes) }, unsafe {
                as_uninit(&mut scales)
            });
            assert_eq!(codes, want_codes, "{level:?} codes");
            assert_eq!(scales, want_scales, "{level:?} scales");
            let f32_bytes = unsafe { encode_to_vec(src.len() * 4, |d| encode_f32(level, src, d)) };
            assert_eq!(f32_bytes, bytes, "{level:?} f32 encode");
            let mut out = vec![0.0f32; src.len()];
            apply_f32(level, &bytes, &mut out, false);
            assert_eq!(out, src, "{level:?} f32");
            let mut loaded = vec![f32::NAN; src.len()];
            load_f32(level, &bytes, unsafe { as_uninit(&mut loaded) });
            assert_eq!(loaded, src, "{level:?} f32 load");
            apply_bf16(level, &halves, &mut out, false);
            load_bf16(level, &halves, unsafe { as_uninit(&mut loaded) });
            for ((o, l), h) in out.iter().zip(&loaded).zip(halves.chunks_exact(2)) {
                let want = f32::from_bits(u32::from(u16::from_le_bytes([h[0], h[1]])) << 16);
                assert_eq!(o.to_bits(), want.to_bits(), "{level:?} bf16");
                assert_eq!(l.to_bits(), want.to_bits(), "{level:?} bf16 load");
            }
        }
    }
}
