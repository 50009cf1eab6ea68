//! FP8 e4m3 ↔ f32/bf16: every one of the 256 codes, exactly.

use shardseek_kernels::fp8::*;

/// Independent decoding from the format's definition: (-1)^s · 2^(e-7) · (1 + m/8), subnormals
/// 2^-6 · m/8, S.1111.111 NaN.
fn by_definition(code: u8) -> f64 {
    let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0xf) as i32;
    let m = (code & 7) as f64;
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    if e == 0 {
        s * 2f64.powi(-6) * m / 8.0
    } else {
        s * 2f64.powi(e - 7) * (1.0 + m / 8.0)
    }
}

#[test]
fn decode_all_256_codes() {
    for c in 0..=255u8 {
        let want = by_definition(c);
        let got = e4m3_to_f32(c);
        assert_eq!(E4M3_TABLE[c as usize].to_bits(), got.to_bits());
        if want.is_nan() {
            assert!(got.is_nan(), "code {c:#x}");
            assert!(bf16_to_f32(e4m3_to_bf16(c)).is_nan());
            continue;
        }
        assert_eq!(got as f64, want, "code {c:#x}");
        // Every e4m3 value has ≤ 4 significant bits, so bf16 holds it exactly.
        assert_eq!(
            bf16_to_f32(e4m3_to_bf16(c)) as f64,
            want,
            "bf16 of code {c:#x}"
        );
    }
    assert_eq!(e4m3_to_f32(0x7e), 448.0);
    assert_eq!(e4m3_to_f32(0xfe), -448.0);
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    assert!(e4m3_to_f32(0x80) == 0.0 && e4m3_to_f32(0x80).is_sign_negative());
}

#[test]
fn encode_round_trips_every_code() {
    for c in 0..=255u8 {
        let v = e4m3_to_f32(c);
        let back = f32_to_e4m3(v);
        if v.is_nan() {
            assert!(e4m3_to_f32(back).is_nan());
        } else {
            assert_eq!(back, c, "code {c:#x} value {v}");
        }
        if !v.is_nan() {
            assert_eq!(bf16_to_e4m3(f32_to_bf16(v)), c);
        }
    }
}

#[test]
fn encode_rounds_to_nearest_even_and_saturates() {
    // Midpoints between neighbouring codes go to the even mantissa.
    let finite: Vec<u8> = (0..=0x7eu8).collect();
    for w in finite.windows(2) {
        let (a, b) = (e4m3_to_f32(w[0]), e4m3_to_f32(w[1]));
        let mid = (a + b) / 2.0;
        let want = if w[0] & 1 == 0 { w[0] } else { w[1] };
        assert_eq!(
            f32_to_e4m3(mid),
            want,
            "midpoint of {:#x},{:#x}",
            w[0],
            w[1]
        );
        assert_eq!(f32_to_e4m3(-mid), want | 0x80);
        // Just off the midpoint goes to the nearer code.
        assert_eq!(f32_to_e4m3(mid * (1.0 - 1e-6)), w[0]);
        assert_eq!(f32_to_e4m3(mid * (1.0 + 1e-6)), w[1]);
    }
    assert_eq!(f32_to_e4m3(1e6), 0x7e);
    assert_eq!(f32_to_e4m3(-1e6), 0xfe);
    assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7e);
    assert!(e4m3_to_f32(f32_to_e4m3(f32::NAN)).is_nan());
    assert_eq!(f32_to_e4m3(1e-9), 0);
}

#[test]
fn bf16_round_trip() {
    for bits in [0u16, 0x3f80, 0xbf80, 0x7f7f, 0x0001, 0x8001] {
        assert_eq!(f32_to_bf16(bf16_to_f32(bits)), bits);
    }
    // Round to nearest even on the dropped 16 bits.
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
}

/// The vectorised decoders used inside the kernels agree exactly with the table on every
/// finite code (NaN codes are documented to decode as ±480 there).
#[test]
fn vector_decoders_are_exact() {
    use shardseek_kernels::cpu::{Isa, convert_bf16, convert_fp8};
    let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7f != 0x7f).collect();
    let bits: Vec<u16> = (0..=u16::MAX).step_by(7).collect();
    for isa in Isa::ALL {
        if !isa.available() {
            continue;
        }
        for scale in [1.0f32, 3.5e-3] {
            let mut out = vec![0f32; codes.len()];
            convert_fp8(isa, &codes, scale, &mut out);
            for (c, o) in codes.iter().zip(&out) {
                assert_eq!(*o, E4M3_TABLE[*c as usize] * scale, "{isa:?} code {c:#x}");
            }
        }
        let mut out = vec![0f32; bits.len()];
        convert_bf16(isa, &bits, &mut out);
        for (b, o) in bits.iter().zip(&out) {
            assert_eq!(
                o.to_bits(),
                bf16_to_f32(*b).to_bits(),
                "{isa:?} bits {b:#x}"
            );
        }
    }
}

/// The branch-free encoder gives the same code as the reference encoder: every midpoint and its
/// neighbours, every code's value, and a sweep of random magnitudes over the whole range.
#[test]
fn fast_encoder_matches_the_reference() {
    use shardseek_kernels::fp8::f32_to_e4m3_fast;
    let mut vals: Vec<f32> = Vec::new();
    for c in 0..=0x7eu8 {
        let a = e4m3_to_f32(c);
        let b = e4m3_to_f32(c + 1);
        vals.extend([
            a,
            (a + b) / 2.0,
            (a + b) / 2.0 * (1.0 - 1e-6),
            (a + b) / 2.0 * (1.0 + 1e-6),
        ]);
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Magnitudes from 2^-12 to 2^10.
        let e = (x % 22) as i32 - 12;
        let m = 1.0 + (x >> 40) as f32 / (1u64 << 24) as f32;
        vals.push(m * 2f32.powi(e));
    }
    vals.extend([0.0, 1e-9, 447.9, 448.0, 464.0, 480.0, 1e6, f32::INFINITY]);
    for v in vals {
        for s in [v, -v] {
            assert_eq!(f32_to_e4m3_fast(s), f32_to_e4m3(s), "{s:e}");
        }
    }
}

/// Block quantisation: the block maximum is exact, every value is within half an e4m3 step
/// (2^-4 relative, or 2^-10 of the block scale for the smallest values) of the original, and the
/// scales have DeepSeek's [ceil(rows/128), ceil(cols/128)] layout, at odd shapes.
#[test]
fn quantize_blocks_keeps_values_within_an_e4m3_step() {
    use shardseek_kernels::fp8::quantize_blocks;
    use shardseek_kernels::{Weight, WeightData};
    let (rows, cols) = (300, 200);
    let mut x = 7u64;
    let vals: Vec<f32> = (0..rows * cols)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let w = Weight::new(rows, cols, WeightData::F32(&bytes)).unwrap();
    let (codes, scales) = quantize_blocks(&w);
    assert_eq!(scales.len(), 3 * 2);
    let q = Weight::new(
        rows,
        cols,
        WeightData::Fp8E4m3 {
            q: &codes,
            scale_inv: &scales,
        },
    )
    .unwrap();
    for r in 0..rows {
        for c in 0..cols {
            let (v, got) = (vals[r * cols + c], q.get(r, c));
            let s = scales[(r / 128) * 2 + c / 128];
            let tol = (v.abs() / 16.0).max(s / 1024.0) * 1.0001;
            assert!((got - v).abs() <= tol, "({r}, {c}): {got} vs {v}");
        }
    }
}
