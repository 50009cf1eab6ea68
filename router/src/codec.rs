//! Row codec: f32 activation rows ↔ the `bytes` payload of a [`Rows`] message.
//!
//! Three wire dtypes (DESIGN.md §4): f32 (exact), bf16 (round to nearest even; the default) and
//! fp8 e4m3fn with one f32 scale per 128 values of a row. The fp8 codec is implemented here rather
//! than borrowed from `shardseek-kernels` because the dependency arrows (DESIGN.md §1) keep the
//! router free of the numeric crate; it is small and tested over every one of its 256 codes.
//!
//! The per-value loops live in [`kernels`], compiled for AVX-512, AVX2 and the portable baseline
//! and chosen at run time; rows are encoded straight into the payload buffer (one write per
//! value) and decoded straight out of the received `Bytes` (no intermediate copy).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use shardseek_proto::v1::{RowDtype, Rows};

use crate::{Error, Result};

pub mod kernels;
use kernels::Level;

/// Values per fp8 scale block along a row: the same 128 as the checkpoints' weight blocks.
pub const FP8_BLOCK: usize = 128;
/// Largest finite e4m3fn value; a block's scale maps its largest magnitude onto it.
pub const FP8_MAX: f32 = 448.0;

/// The dtype rows travel in (`--dispatch-dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WireDtype {
    /// Exact: the cluster agrees with the single process to rounding of the summation order.
    F32,
    /// Half the bytes of f32, relative error ≤ 2⁻⁹ per value. The default: with the SIMD codec
    /// fp8's round trip is at best ~25% shorter (16–128 tokens) and no shorter at 256 tokens
    /// (`shardseek bench dispatch`, same machine), for 16× the error.
    #[default]
    Bf16,
    /// A quarter of the bytes, relative error ≤ 2⁻⁴ of each value plus 2⁻¹⁰ of its block's maximum.
    Fp8E4m3,
}

impl WireDtype {
    /// Payload bytes of one row of `width` values (data plus scales).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            WireDtype::F32 => width * 4,
            WireDtype::Bf16 => width * 2,
            WireDtype::Fp8E4m3 => width + width.div_ceil(FP8_BLOCK) * 4,
        }
    }

    /// The proto enum value.
    pub fn to_proto(self) -> RowDtype {
        match self {
            WireDtype::F32 => RowDtype::F32,
            WireDtype::Bf16 => RowDtype::Bf16,
            WireDtype::Fp8E4m3 => RowDtype::Fp8E4m3,
        }
    }

    /// From the proto enum's wire value; `UNSPECIFIED` and unknown values are refused.
    pub fn from_proto(value: i32) -> Result<Self> {
        match RowDtype::try_from(value) {
            Ok(RowDtype::F32) => Ok(WireDtype::F32),
            Ok(RowDtype::Bf16) => Ok(WireDtype::Bf16),
            Ok(RowDtype::Fp8E4m3) => Ok(WireDtype::Fp8E4m3),
            _ => Err(Error::Codec(format!("unknown row dtype {value}"))),
        }
    }
}

impl fmt::Display for WireDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
            WireDtype::Fp8E4m3 => "fp8",
        })
    }
}

impl FromStr for WireDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WireDtype::F32),
            "bf16" => Ok(WireDtype::Bf16),
            "fp8" | "fp8_e4m3" | "e4m3" => Ok(WireDtype::Fp8E4m3),
            other => Err(Error::Codec(format!(
                "unknown dispatch dtype `{other}` (expected f32, bf16 or fp8)"
            ))),
        }
    }
}

/// A `[count, width]` block of rows in a wire dtype, ready to send or just received.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedRows {
    pub dtype: WireDtype,
    pub count: usize,
    pub width: usize,
    pub data: Bytes,
    /// fp8 only: `count * ceil(width / 128)` little-endian f32 scales.
    pub scales: Bytes,
}

impl EncodedRows {
    /// Encodes `rows` (`count * width` values, row-major) in `dtype`.
    pub fn encode(rows: &[f32], width: usize, dtype: WireDtype) -> Result<Self> {
        if width == 0 || !rows.len().is_multiple_of(width) {
            return Err(Error::Codec(format!(
                "{} values do not make rows of width {width}",
                rows.len()
            )));
        }
        Self::encode_rows(rows.chunks_exact(width), width, dtype)
    }

    /// Encodes the given rows (each `width` values) in `dtype` in one pass, without first
    /// gathering them into one buffer: what the dispatcher does with a shard's tokens.
    pub fn encode_rows<'a>(
        rows: impl ExactSizeIterator<Item = &'a [f32]>,
        width: usize,
        dtype: WireDtype,
    ) -> Result<Self> {
        let count = rows.len();
        let bad_row =
            |len: usize| Error::Codec(format!("a row of {len} values among rows of width {width}"));
        let (data, scales) = match dtype {
            WireDtype::F32 => {
                let mut out: Vec<u32> = Vec::with_capacity(count * width);
                for row in rows {
                    if row.len() != width {
                        return Err(bad_row(row.len()));
                    }
                    out.extend(row.iter().map(|v| v.to_bits().to_le()));
                }
                (Bytes::from_owner(LeWords(out)), Bytes::new())
            }
            WireDtype::Bf16 => {
                let level = Level::detect();
                let mut out: Vec<u16> = vec![0; count * width];
                for (row, dst) in rows.zip(out.chunks_exact_mut(width)) {
                    if row.len() != width {
                        return Err(bad_row(row.len()));
                    }
                    kernels::encode_bf16(level, row, dst);
                }
                (Bytes::from_owner(LeWords(out)), Bytes::new())
            }
            WireDtype::Fp8E4m3 => {
                let level = Level::detect();
                let blocks = width.div_ceil(FP8_BLOCK);
                let mut out: Vec<u8> = vec![0; count * width];
                let mut scales = Vec::with_capacity(count * blocks * 4);
                for (row, dst) in rows.zip(out.chunks_exact_mut(width)) {
                    if row.len() != width {
                        return Err(bad_row(row.len()));
                    }
                    kernels::encode_fp8_row(level, row, dst, &mut scales);
                }
                (Bytes::from(out), Bytes::from(scales))
            }
        };
        Ok(EncodedRows {
            dtype,
            count,
            width,
            data,
            scales,
        })
    }

    /// Checks that the payload sizes match `count`, `width` and `dtype` (data from the network).
    pub fn validate(&self) -> Result<()> {
        let values = self.count * self.width;
        let (data, scales) = match self.dtype {
            WireDtype::F32 => (values * 4, 0),
            WireDtype::Bf16 => (values * 2, 0),
            WireDtype::Fp8E4m3 => (values, self.count * self.width.div_ceil(FP8_BLOCK) * 4),
        };
        if self.data.len() != data || self.scales.len() != scales {
            return Err(Error::Codec(format!(
                "{} rows of width {} in {}: expected {data} data and {scales} scale bytes, got {} and {}",
                self.count,
                self.width,
                self.dtype,
                self.data.len(),
                self.scales.len()
            )));
        }
        Ok(())
    }

    /// Decodes every row into a new `count * width` vector.
    pub fn decode(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let mut out = vec![0.0f32; self.count * self.width];
        for (i, row) in out.chunks_exact_mut(self.width.max(1)).enumerate() {
            self.row_op(i, row, false);
        }
        Ok(out)
    }

    /// Appends every row, decoded, to `out`.
    pub fn decode_append(&self, out: &mut Vec<f32>) -> Result<()> {
        self.validate()?;
        let start = out.len();
        out.resize(start + self.count * self.width, 0.0);
        for i in 0..self.count {
            let row = &mut out[start + i * self.width..start + (i + 1) * self.width];
            self.row_op(i, row, false);
        }
        Ok(())
    }

    /// Decodes row `i` into `out` (`width` values). Call [`validate`](Self::validate) first.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        self.row_op(i, out, false);
    }

    /// Adds row `i` into `out` (`width` values): the combine step, read in place from the
    /// received payload. Call [`validate`](Self::validate) first.
    pub fn add_row_into(&self, i: usize, out: &mut [f32]) {
        self.row_op(i, out, true);
    }

    fn row_op(&self, i: usize, out: &mut [f32], add: bool) {
        let w = self.width;
        let level = Level::detect();
        match self.dtype {
            WireDtype::F32 => {
                kernels::apply_f32(level, &self.data[i * w * 4..(i + 1) * w * 4], out, add);
            }
            WireDtype::Bf16 => {
                kernels::apply_bf16(level, &self.data[i * w * 2..(i + 1) * w * 2], out, add);
            }
            WireDtype::Fp8E4m3 => {
                let blocks = w.div_ceil(FP8_BLOCK);
                let src = &self.data[i * w..(i + 1) * w];
                let scales = &self.scales[i * blocks * 4..(i + 1) * blocks * 4];
                for ((dst, q), s) in out
                    .chunks_mut(FP8_BLOCK)
                    .zip(src.chunks(FP8_BLOCK))
                    .zip(scales.chunks_exact(4))
                {
                    let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    kernels::apply_fp8(level, q, scale, dst, add);
                }
            }
        }
    }

    /// Payload bytes (data and scales).
    pub fn payload_bytes(&self) -> usize {
        self.data.len() + self.scales.len()
    }

    /// The proto message.
    pub fn into_proto(self) -> Rows {
        Rows {
            dtype: self.dtype.to_proto() as i32,
            count: self.count as u32,
            width: self.width as u32,
            data: self.data,
            scales: self.scales,
        }
    }

    /// From the proto message, validated.
    pub fn from_proto(rows: Rows) -> Result<Self> {
        let out = EncodedRows {
            dtype: WireDtype::from_proto(rows.dtype)?,
            count: rows.count as usize,
            width: rows.width as usize,
            data: rows.data,
            scales: rows.scales,
        };
        out.validate()?;
        Ok(out)
    }
}

/// Little-endian words (already byte-swapped with `to_le`) viewed as bytes, so an encoded
/// payload becomes `Bytes` without another copy.
struct LeWords<T>(Vec<T>);

impl AsRef<[u8]> for LeWords<u16> {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: u16 has no padding, any byte is a valid u8, u8 needs no alignment, and the
        // byte length is exactly twice the word count of the live allocation.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 2) }
    }
}

impl AsRef<[u8]> for LeWords<u32> {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as for u16, with four bytes per word.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 4) }
    }
}

/// f32 → bf16 bits, round to nearest even; NaN stays NaN.
#[inline]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 → e4m3fn code, round to nearest even, saturating to ±448 (e4m3fn has no infinity);
/// NaN becomes the NaN code 0x7F. Written without data-dependent branches (both the normal and
/// the subnormal result are computed, then one is selected) so that loops over rows vectorize.
#[inline]
pub fn f32_to_e4m3(v: f32) -> u8 {
    let b = v.to_bits();
    let sign = (b >> 24) & 0x80;
    let a = b & 0x7FFF_FFFF;
    // Normal range (|v| ≥ 2^-6): round the 23-bit mantissa to 3 bits (half to even; a carry
    // moves into the exponent), rebias the exponent from 127 to 7 (subtract 120 from the
    // exponent field), and saturate at 0x7E = 448 — which also maps infinity to 448.
    let rounded = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20;
    let normal = rounded.saturating_sub(120 << 3).min(0x7E);
    // Subnormal range: |v|·2^9 rounded half-to-even by adding 2^23 (the float addition rounds
    // to an integer); 8 lands on the first normal code, as it should.
    let scaled = f32::from_bits(a.min(0x3C80_0000)) * 512.0 + 8_388_608.0;
    let subnormal = scaled.to_bits() - 0x4B00_0000;
    let mag = if a < 0x3C80_0000 { subnormal } else { normal };
    let code = if a > 0x7F80_0000 { 0x7F } else { sign | mag };
    code as u8
}

/// e4m3fn code → f32 (exact).
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    E4M3_TABLE[usize::from(code)]
}

const fn e4m3_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0x0F) as i32;
    let m = (code & 0x07) as f32;
    if e == 15 && code & 0x07 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m / 8.0 / 64.0
    } else {
        let mut p = 1.0f32;
        let mut k = e - 7;
        while k > 0 {
            p *= 2.0;
            k -= 1;
        }
        while k < 0 {
            p /= 2.0;
            k += 1;
        }
        (1.0 + m / 8.0) * p
    };
    sign * mag
}

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode(i as u8);
        i += 1;
    }
    t
}

/// Every e4m3fn code's value, so decoding is one load.
static E4M3_TABLE: [f32; 256] = e4m3_table();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_e4m3_code_round_trips() {
        for code in 0u8..=255 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                assert!(code & 0x7F == 0x7F, "only 0x7F/0xFF are NaN, got {code:#x}");
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0.0 encodes as 0x80, same as its own code.
            assert_eq!(back, code, "code {code:#04x} = {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
    }

    /// Brute force: the code whose value is nearest, ties to the even code, saturating at 448.
    fn nearest_code(v: f32) -> u8 {
        let sign = if v.is_sign_negative() { 0x80 } else { 0 };
        let a = v.abs().min(FP8_MAX);
        let mut best = 0u8;
        for code in 0u8..=0x7E {
            let d = (e4m3_to_f32(code) - a).abs();
            let bd = (e4m3_to_f32(best) - a).abs();
            if d < bd || (d == bd && code % 2 == 0 && best % 2 == 1) {
                best = code;
            }
        }
        sign | best
    }

    #[test]
    fn encode_is_nearest_with_ties_to_even() {
        // Every code's value, the midpoints between neighbours, and points just either side.
        let mut probes = Vec::new();
        for code in 0u8..0x7E {
            let lo = e4m3_to_f32(code);
            let hi = e4m3_to_f32(code + 1);
            let mid = (lo + hi) / 2.0;
            probes.extend([
                lo,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ]);
        }
        probes.extend([448.0, 449.0, 464.0, 1e6, f32::INFINITY, 1e-30, 0.0]);
        for &p in &probes {
            for v in [p, -p] {
                assert_eq!(f32_to_e4m3(v), nearest_code(v), "value {v:e}");
            }
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
        for i in 0..10_000u32 {
            let v = (i as f32 - 5000.0) * 0.37;
            let back = bf16_bits_to_f32(f32_to_bf16_bits(v));
            assert!((back - v).abs() <= v.abs() / 256.0, "{v} -> {back}");
            let h = half::bf16::from_f32(v).to_f32();
            assert_eq!(back, h, "agrees with the half crate");
        }
    }

    fn rows(n: usize, width: usize) -> Vec<f32> {
        (0..n * width)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.013 * (1.0 + (i % 5) as f32))
            .collect()
    }

    #[test]
    fn rows_round_trip_in_every_dtype_within_bounds() {
        let width = 300; // not a multiple of 128: a short last fp8 block
        let x = rows(5, width);
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            let enc = EncodedRows::encode(&x, width, dtype).expect("encode");
            assert_eq!(enc.payload_bytes(), 5 * dtype.row_bytes(width));
            let mut appended = vec![7.0f32];
            enc.decode_append(&mut appended).expect("append");
            assert_eq!(appended[1..], enc.decode().expect("decode")[..], "{dtype}");
            let proto = enc.clone().into_proto();
            let back = EncodedRows::from_proto(proto)
                .expect("valid")
                .decode()
                .expect("decode");
            for (r, (xr, br)) in x.chunks(width).zip(back.chunks(width)).enumerate() {
                for (b, (xb, bb)) in xr.chunks(FP8_BLOCK).zip(br.chunks(FP8_BLOCK)).enumerate() {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (&v, &d) in xb.iter().zip(bb) {
                        let bound = match dtype {
                            WireDtype::F32 => 0.0,
                            WireDtype::Bf16 => v.abs() / 256.0,
                            WireDtype::Fp8E4m3 => v.abs() / 16.0 + amax / 1024.0,
                        };
                        assert!(
                            (v - d).abs() <= bound,
                            "{dtype} row {r} block {b}: {v} -> {d}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn add_row_into_accumulates() {
        let x = rows(2, 8);
        let enc = EncodedRows::encode(&x, 8, WireDtype::F32).expect("encode");
        let mut acc = vec![1.0f32; 8];
        enc.add_row_into(1, &mut acc);
        for (a, v) in acc.iter().zip(&x[8..]) {
            assert_eq!(*a, 1.0 + v);
        }
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let mut p = EncodedRows::encode(&rows(2, 8), 8, WireDtype::Bf16)
            .expect("encode")
            .into_proto();
        p.count = 3;
        assert!(EncodedRows::from_proto(p).is_err());
        assert!(EncodedRows::encode(&[1.0; 7], 8, WireDtype::F32).is_err());
        assert!("fp16".parse::<WireDtype>().is_err());
        assert_eq!("BF16".parse::<WireDtype>().expect("bf16"), WireDtype::Bf16);
    }
}
