//! `shardseek bench kernels --device cuda`: the device's ceilings and each CUDA kernel against
//! them, in one run, on device-resident buffers.
//!
//! Ceilings measured here: device-to-device copy bandwidth (read + write bytes over time, a
//! 1 GiB copy), dense FP8 `mma.sync` throughput and f32 FMA throughput on register operands.
//! The FP8 rows are also quoted against the H100/H200 datasheet's 1979 dense FP8 TFLOP/s.
//! Decode-shape products rotate through enough weight copies (≥ 1 GiB) that every call streams
//! its weights from HBM rather than from the 50 MiB L2. Shapes are DeepSeek-V3's.

use super::{CudaBackend, DeviceCache, DeviceMatrix, Epilogue, GemmAlgo};
use crate::error::Result;
use crate::mla::{CacheData, LatentCache, SeqPages};
use crate::weight::{FP8_BLOCK, Weight, WeightData};
use cudarc::driver::CudaSlice;

/// The datasheet's dense FP8 tensor-core peak of the H100 SXM / H200 (TFLOP/s).
pub const SPEC_FP8_TFLOPS: f64 = 1979.0;
const ROTATE_BYTES: usize = 1 << 30;

/// One measured kernel.
pub struct CudaRow {
    pub name: String,
    pub shape: String,
    pub ms: f64,
    pub bytes: f64,
    pub flops: f64,
    /// "bandwidth", "fp8 peak" or "fma peak": what `fraction` divides by.
    pub against: &'static str,
    pub fraction: f64,
}

/// The whole run.
pub struct CudaReport {
    pub device: String,
    pub copy_gbps: f64,
    pub fma_tflops: f64,
    pub fp8_tflops: Option<f64>,
    pub rows: Vec<CudaRow>,
}

impl CudaReport {
    /// The table `bench kernels --device cuda` prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "device {}; ceilings: copy {:.0} GB/s, f32 FMA {:.1} TFLOP/s, FP8 mma {} (datasheet {SPEC_FP8_TFLOPS:.0})\n",
            self.device,
            self.copy_gbps,
            self.fma_tflops,
            self.fp8_tflops
                .map_or("n/a".to_string(), |v| format!("{v:.0} TFLOP/s"))
        );
        for r in &self.rows {
            let spec = if r.against == "fp8 peak" {
                format!(
                    ", {:.3} of datasheet",
                    r.flops / (r.ms * 1e-3) / 1e12 / SPEC_FP8_TFLOPS
                )
            } else {
                String::new()
            };
            s.push_str(&format!(
                "{:<30} {:<44} {:>9.4} ms {:>8.0} GB/s {:>8.1} TFLOP/s  {:>5.2} of {}{spec}\n",
                r.name,
                r.shape,
                r.ms,
                r.bytes / (r.ms * 1e-3) / 1e9,
                r.flops / (r.ms * 1e-3) / 1e12,
                r.fraction,
                r.against,
            ));
        }
        s
    }
}

/// Deterministic pseudo-random bytes (no RNG dependency).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A random FP8 weight (codes avoid NaN) with scales near 1e-3.
fn fp8_weight(dev: &CudaBackend, n: usize, k: usize, seed: u64) -> Result<DeviceMatrix> {
    let q: Vec<u8> = noise(n * k, seed)
        .into_iter()
        .map(|b| if b & 0x7f == 0x7f { b & 0xf0 } else { b })
        .collect();
    let s = vec![1e-3f32; n.div_ceil(FP8_BLOCK) * k.div_ceil(FP8_BLOCK)];
    dev.upload(&Weight::new(
        n,
        k,
        WeightData::Fp8E4m3 {
            q: &q,
            scale_inv: &s,
        },
    )?)
}

fn bf16_weight(dev: &CudaBackend, n: usize, k: usize, seed: u64) -> Result<DeviceMatrix> {
    let b: Vec<u8> = noise(n * k * 2, seed)
        .chunks(2)
        .flat_map(|c| [c[0], c[1] & 0x3f])
        .collect();
    dev.upload(&Weight::new(n, k, WeightData::Bf16(&b))?)
}

fn randf(dev: &CudaBackend, n: usize, seed: u64) -> Result<CudaSlice<f32>> {
    let v: Vec<f32> = noise(n, seed)
        .into_iter()
        .map(|b| b as f32 / 128.0 - 1.0)
        .collect();
    dev.htod(&v)
}

/// Best milliseconds per call over three timed batches of `reps` calls (after a warm-up).
fn best_ms(dev: &CudaBackend, reps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    f(0)?;
    let mut best = f64::MAX;
    let mut i = 1;
    for _ in 0..3 {
        let ms = dev.time_ms(|| {
            for _ in 0..reps {
                f(i)?;
                i += 1;
            }
            Ok(())
        })?;
        best = best.min(ms / reps as f64);
    }
    Ok(best)
}

/// Measures the ceilings, then each kernel; `progress` sees every row.
pub fn run(dev: &CudaBackend, mut progress: impl FnMut(&str)) -> Result<CudaReport> {
    let copy_gbps = dev.copy_gbps(1 << 30)?;
    let fma_tflops = dev.peak_tflops(false)?;
    let fp8_tflops = if dev.has_fp8_mma() {
        Some(dev.peak_tflops(true)?)
    } else {
        None
    };
    progress(&format!(
        "ceilings: copy {copy_gbps:.0} GB/s, FMA {fma_tflops:.1} TFLOP/s, FP8 {fp8_tflops:?}"
    ));
    let mut rows = Vec::new();
    let mut push = |rows: &mut Vec<CudaRow>, r: CudaRow| {
        progress(&format!(
            "{} {}: {:.4} ms, {:.2} of {}",
            r.name, r.shape, r.ms, r.fraction, r.against
        ));
        rows.push(r);
    };

    // Decode GEMV: one token (and eight), weights streamed from HBM.
    for (fp8, m, n, k) in [
        (true, 1, 2048, 7168),
        (true, 1, 7168, 2048),
        (true, 1, 4096, 7168),
        (true, 1, 24576, 1536),
        (true, 8, 2048, 7168),
        (false, 1, 4096, 7168),
    ] {
        let one = n * k * if fp8 { 1 } else { 2 };
        let copies = ROTATE_BYTES.div_ceil(one).clamp(2, 64);
        let ws: Vec<DeviceMatrix> = (0..copies)
            .map(|i| {
                if fp8 {
                    fp8_weight(dev, n, k, i as u64 + 1)
                } else {
                    bf16_weight(dev, n, k, i as u64 + 1)
                }
            })
            .collect::<Result<_>>()?;
        let x = randf(dev, m * k, 7)?;
        let mut y = dev.zeros::<f32>(m * n)?;
        let ms = best_ms(dev, copies, |i| {
            dev.gemm(
                &x,
                0,
                k,
                m,
                &ws[i % copies],
                &mut y,
                0,
                n,
                Epilogue::Store,
                GemmAlgo::Exact,
            )
        })?;
        let bytes = ws[0].bytes() as f64 + (m * (k + n) * 4) as f64;
        push(
            &mut rows,
            CudaRow {
                name: format!("decode {} GEMV", if fp8 { "FP8" } else { "BF16" }),
                shape: format!("m={m} n={n} k={k}"),
                ms,
                bytes,
                flops: 2.0 * (m * n * k) as f64,
                against: "bandwidth",
                fraction: bytes / (ms * 1e-3) / 1e9 / copy_gbps,
            },
        );
    }

    // Prefill GEMM: f32 tiles (exact) and FP8 tensor cores (activations quantised per 128).
    for (m, n, k) in [(512, 7168, 2048), (4096, 2048, 7168), (4096, 7168, 2048)] {
        let w = fp8_weight(dev, n, k, 11)?;
        let x = randf(dev, m * k, 12)?;
        let mut y = dev.zeros::<f32>(m * n)?;
        let flops = 2.0 * (m * n * k) as f64;
        let mut algos = vec![(GemmAlgo::Exact, "f32 tiles", "fma peak", fma_tflops)];
        if let Some(p) = fp8_tflops {
            algos.push((GemmAlgo::Fp8Activations, "fp8 mma", "fp8 peak", p));
        }
        for (algo, label, against, peak) in algos {
            let ms = best_ms(dev, 3, |_| {
                dev.gemm(&x, 0, k, m, &w, &mut y, 0, n, Epilogue::Store, algo)
            })?;
            push(
                &mut rows,
                CudaRow {
                    name: format!("prefill FP8 GEMM ({label})"),
                    shape: format!("m={m} n={n} k={k}"),
                    ms,
                    bytes: (n * k + m * k * 4 + m * n * 4) as f64,
                    flops,
                    against,
                    fraction: flops / (ms * 1e-3) / 1e12 / peak,
                },
            );
        }
    }

    // Grouped MoE decode: 8 experts (V3 sizes) with few rows each, weights from HBM.
    {
        let (hidden, inter) = (7168, 2048);
        let counts = [1usize, 2, 3, 10, 1, 1, 4, 2];
        let sets = (ROTATE_BYTES / (3 * hidden * inter * counts.len())).clamp(2, 8);
        let mats: Vec<[DeviceMatrix; 3]> = (0..sets * counts.len())
            .map(|i| {
                let s = 100 + 3 * i as u64;
                Ok([
                    fp8_weight(dev, inter, hidden, s)?,
                    fp8_weight(dev, inter, hidden, s + 1)?,
                    fp8_weight(dev, hidden, inter, s + 2)?,
                ])
            })
            .collect::<Result<_>>()?;
        let rows_n: usize = counts.iter().sum();
        let mut ranges = Vec::new();
        let mut r0 = 0;
        for c in counts {
            ranges.push(r0..r0 + c);
            r0 += c;
        }
        let x = randf(dev, rows_n * hidden, 21)?;
        let rw = randf(dev, rows_n, 22)?;
        let mut y = dev.zeros::<f32>(rows_n * hidden)?;
        let ms = best_ms(dev, sets, |i| {
            let set = i % sets;
            let ex: Vec<[&DeviceMatrix; 3]> = (0..counts.len())
                .map(|e| {
                    let m = &mats[set * counts.len() + e];
                    [&m[0], &m[1], &m[2]]
                })
                .collect();
            dev.grouped_ffn_dev(&x, hidden, &ranges, &ex, Some(&rw), false, &mut y)
        })?;
        let bytes: f64 = (0..counts.len())
            .map(|e| mats[e].iter().map(|m| m.bytes()).sum::<usize>() as f64)
            .sum();
        push(
            &mut rows,
            CudaRow {
                name: "grouped MoE decode (FP8)".into(),
                shape: format!("8 experts {inter}x{hidden}, rows {counts:?}"),
                ms,
                bytes,
                flops: 6.0 * (rows_n * hidden * inter) as f64,
                against: "bandwidth",
                fraction: bytes / (ms * 1e-3) / 1e9 / copy_gbps,
            },
        );
    }

    // MLA decode over a bf16 paged latent cache: batch 32 × 4096 tokens, V3's 128 heads and a
    // 16-head model; bytes are the cache entries read (each once per sequence).
    for heads in [128usize, 16] {
        let (r, p, b, ctx) = (512usize, 64usize, 32usize, 4096usize);
        let pages = ctx / 64;
        let blocks = b * pages;
        let host = vec![0u16; blocks * 64 * (r + p)];
        let hc = LatentCache::new(CacheData::Bf16(&host), r, p)?;
        let mut dc: DeviceCache = dev.new_cache(&hc)?;
        let all: Vec<u32> = (0..blocks as u32).collect();
        let filler: Vec<u16> = noise(blocks * 64 * (r + p) * 2, 31)
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1] & 0x3f]))
            .collect();
        let hc2 = LatentCache::new(CacheData::Bf16(&filler), r, p)?;
        dev.cache_write(&mut dc, &hc2, &all, 0, blocks * 64)?;
        let tabs: Vec<Vec<u32>> = (0..b)
            .map(|i| ((i * pages) as u32..((i + 1) * pages) as u32).collect())
            .collect();
        let seqs: Vec<SeqPages> = tabs
            .iter()
            .map(|t| SeqPages { pages: t, len: ctx })
            .collect();
        let (table, stride, lens) = dev.seq_tables(&seqs, blocks)?;
        let qa = randf(dev, b * heads * r, 41)?;
        let qp = randf(dev, b * heads * p, 42)?;
        let mut out = dev.zeros::<f32>(b * heads * r)?;
        let bytes = (b * ctx * (r + p) * 2) as f64;
        let mut kernels = vec![(false, "f32 FMA")];
        if dev.mla_uses_mma(&dc) {
            kernels.push((true, "tensor cores"));
        }
        for (mma, label) in kernels {
            let ms = best_ms(dev, 3, |_| {
                dev.mla_attend_with(
                    mma, &dc, &table, stride, &lens, b, heads, &qa, &qp, 0.1, &mut out,
                )
            })?;
            push(
                &mut rows,
                CudaRow {
                    name: format!("MLA decode bf16 cache ({label})"),
                    shape: format!("batch {b} × {ctx} tokens, {heads} heads, {r}+{p}"),
                    ms,
                    bytes,
                    flops: 2.0 * (b * heads * ctx * (2 * r + p)) as f64,
                    against: "bandwidth",
                    fraction: bytes / (ms * 1e-3) / 1e9 / copy_gbps,
                },
            );
        }
    }
    Ok(CudaReport {
        device: format!(
            "{} (sm_{}{})",
            dev.device_name(),
            dev.compute_capability().0,
            dev.compute_capability().1
        ),
        copy_gbps,
        fma_tflops,
        fp8_tflops,
        rows,
    })
}
