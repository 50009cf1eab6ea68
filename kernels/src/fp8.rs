//! FP8 e4m3 (the `float8_e4m3fn` of PyTorch and safetensors' `F8_E4M3`) conversion.
//!
//! e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; S.1111.111 is NaN;
//! the largest finite value is ±448; exponent field 0 holds subnormals m/8 · 2^-6.

/// Decodes one e4m3fn code exactly (every code is representable in f32).
pub const fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exp = ((code >> 3) & 0x0f) as i32;
    let man = (code & 0x07) as i32;
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        // m/8 · 2^-6 = m · 2^-9
        return sign * (man as f32) * (1.0 / 512.0);
    }
    // (1 + m/8) · 2^(exp-7) built from the bit pattern: f32 exponent bias 127.
    let bits = (((exp - 7 + 127) as u32) << 23) | ((man as u32) << 20);
    sign * f32::from_bits(bits)
}

/// All 256 codes decoded, for table lookups in the hot loops.
pub static E4M3_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// Encodes an f32 to the nearest e4m3fn code (round to nearest even, saturating to ±448; NaN → NaN).
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7e;
    }
    // Smallest subnormal step is 2^-9; values below 2^-6 are subnormal.
    if a < 1.0 / 64.0 {
        let m = round_half_even(a * 512.0) as u8; // 0..=8; 8 rolls into the first normal
        return sign | m;
    }
    let e = a.log2().floor() as i32; // -6..=8
    let e = e.clamp(-6, 8);
    let scaled = a / 2f32.powi(e); // in [1, 2)
    let mut m = round_half_even((scaled - 1.0) * 8.0) as i32;
    let mut exp = e + 7;
    if m == 8 {
        m = 0;
        exp += 1;
    }
    if exp > 15 || (exp == 15 && m == 7) {
        return sign | 0x7e;
    }
    sign | ((exp as u8) << 3) | (m as u8)
}

fn round_half_even(v: f32) -> f32 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        r - v.signum()
    } else {
        r
    }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// e4m3 → bf16 bits, exact (an e4m3 value has at most 4 significant bits).
#[inline]
pub fn e4m3_to_bf16(code: u8) -> u16 {
    (E4M3_TABLE[code as usize].to_bits() >> 16) as u16
}

/// [`f32_to_e4m3`] without branches on the value (both the normal and the subnormal result
/// are computed and one is selected), so that loops over whole matrices and dispatch rows
/// vectorize; the same codes for every input (tests compare the two). In the normal range the
/// 23-bit mantissa is rounded to 3 bits (half to even; a carry moves into the exponent), the
/// exponent rebiased from 127 to 7 and the result saturated at 0x7E = 448 (infinity too); in
/// the subnormal range |v|·2^9 is rounded by adding 2^23, and 8 lands on the first normal code.
#[inline]
pub fn f32_to_e4m3_fast(v: f32) -> u8 {
    let b = v.to_bits();
    let sign = (b >> 24) & 0x80;
    let a = b & 0x7FFF_FFFF;
    // Normal range: round the mantissa to 3 bits (ties to even), rebias 127 → 7, saturate.
    let rounded = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20;
    let normal = rounded.saturating_sub(120 << 3).min(0x7E);
    // Subnormal range: |v|·2^9 rounded to an integer (ties to even) by adding 2^23.
    let scaled = f32::from_bits(a.min(0x3C80_0000)) * 512.0 + 8_388_608.0;
    let subnormal = scaled.to_bits() - 0x4B00_0000;
    let mag = if a < 0x3C80_0000 { subnormal } else { normal };
    (if a > 0x7F80_0000 { 0x7F } else { sign | mag }) as u8
}

/// Quantises a `[rows, cols]` matrix (any stored dtype) to DeepSeek-V3's FP8 layout: e4m3
/// codes with one scale per 128×128 block, scale = the block's largest |value| / 448, so the
/// block's largest value is exact and the rest carry e4m3's 3-bit mantissa (2^-4 relative).
/// Returns (codes `[rows, cols]`, scales `[ceil(rows/128), ceil(cols/128)]`).
pub fn quantize_blocks(w: &crate::weight::Weight) -> (Vec<u8>, Vec<f32>) {
    use crate::weight::FP8_BLOCK;
    use rayon::prelude::*;
    let (rows, cols) = (w.rows, w.cols);
    let kb = cols.div_ceil(FP8_BLOCK);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows.div_ceil(FP8_BLOCK) * kb];
    codes
        .par_chunks_mut(FP8_BLOCK * cols.max(1))
        .zip(scales.par_chunks_mut(kb.max(1)))
        .enumerate()
        .for_each(|(br, (out, sc))| {
            let r0 = br * FP8_BLOCK;
            let n = out.len() / cols.max(1);
            let mut vals = vec![0f32; n * cols];
            for (i, row) in vals.chunks_exact_mut(cols).enumerate() {
                w.dequant_row_into(r0 + i, 0, row);
            }
            for (b, s) in sc.iter_mut().enumerate() {
                let c0 = b * FP8_BLOCK;
                let c1 = (c0 + FP8_BLOCK).min(cols);
                let amax = vals
                    .chunks_exact(cols)
                    .flat_map(|row| row[c0..c1].iter())
                    .fold(0f32, |m, v| m.max(v.abs()));
                *s = if amax > 0.0 { amax / 448.0 } else { 1.0 };
                let inv = *s;
                for (row, orow) in vals.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
                    for (o, v) in orow[c0..c1].iter_mut().zip(&row[c0..c1]) {
                        *o = f32_to_e4m3_fast(v / inv);
                    }
                }
            }
        });
    (codes, scales)
}

/// bf16 bits → nearest e4m3 code (round to nearest even, saturating).
#[inline]
pub fn bf16_to_e4m3(bits: u16) -> u8 {
    f32_to_e4m3(bf16_to_f32(bits))
}
