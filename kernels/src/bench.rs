//! `shardseek bench kernels`: this machine's ceilings and every kernel measured against them,
//! in one run.
//!
//! Ceilings: memory read bandwidth (a 256 MiB buffer, 8× the largest L3 we expect, summed by
//! every pool thread), f32 FMA peak (register-resident FMA chains on every pool thread), and
//! bf16 dot peak where the CPU has one (AVX512-BF16; none on AVX2-only CPUs).
//! Decode-shape GEMMs rotate through enough weight copies (≥ 256 MiB) that every call streams
//! its weights from memory, as in serving where a layer's weights are long evicted by the next
//! time they are used. Shapes: DeepSeek-V3 (hidden 7168, 128 heads, MLA 512+64, expert inter
//! 2048) and the `medium` preset (hidden 2048, 16 heads, MLA 512+64, expert inter 768).

use crate::cpu::{self, Isa};
use crate::error::{Error, Result};
use crate::fp8::f32_to_bf16;
use crate::gemm::{self, Activations, Compute};
use crate::mla::{self, CacheData, LatentCache, MLA_BLOCK, SeqPages};
use crate::moe::{self, Combine, ExpertWeights, Group};
use crate::weight::{FP8_BLOCK, Weight, WeightData};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

/// Streams far beyond any cache: the read-bandwidth buffer and the decode weight rotation.
const STREAM_BYTES: usize = 256 << 20;
/// Per-measurement time budget; the whole run stays well under two minutes.
const MEASURE_SECS: f64 = 0.6;

/// The machine's measured ceilings.
#[derive(Clone, Debug)]
pub struct Ceilings {
    pub threads: usize,
    pub isa: Isa,
    pub read_gbps: f64,
    pub fma_gflops: f64,
    /// `None` when the CPU has no bf16 dot instruction (no AVX512-BF16).
    pub bf16_gflops: Option<f64>,
}

/// Which ceiling a kernel is held to (decided by the roofline of the same run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Memory,
    Compute,
    /// Compute-bound on bf16 dot products (bf16 activations): held to the bf16 dot peak.
    Bf16Dot,
}

/// One measured kernel.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub shape: String,
    /// Best wall time of one call.
    pub seconds: f64,
    /// Process CPU time / (wall × threads) during that call (1 = had every core).
    pub cpu_share: f64,
    pub bytes: f64,
    pub flops: f64,
    pub bound: Bound,
    /// Fraction of the same run's ceiling (read bandwidth or FMA peak).
    pub fraction: f64,
    pub note: String,
    /// Ran with bf16 activations: compute-bound, it is held to the bf16 dot peak.
    pub bf16_activations: bool,
}

impl Row {
    pub fn gbps(&self) -> f64 {
        self.bytes / self.seconds / 1e9
    }
    pub fn gflops(&self) -> f64 {
        self.flops / self.seconds / 1e9
    }
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct Report {
    pub ceilings: Ceilings,
    pub rows: Vec<Row>,
}

/// Which rows a run measures: every row, or those whose name contains one of the given
/// strings (ASCII case-insensitive), so work on one kernel can time its rows, alternating
/// binaries, in a short locked run. The ceilings are measured either way.
#[derive(Clone, Debug, Default)]
pub struct Only(pub Vec<String>);

impl Only {
    /// Whether the row named `name` is measured.
    pub fn wants(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|f| name.contains(&f.to_ascii_lowercase()))
    }
}

/// Every row's name, in the order of a run (what [`Only`] filters).
pub const ROW_NAMES: &[&str] = &[
    "decode fp8 gemm (V3)",
    "decode bf16 gemm (V3)",
    "decode fp8 gemm (medium)",
    "decode fp8 gemm with bf16 activations (V3)",
    "decode fp8 gemm with bf16 activations (medium)",
    "prefill fp8 gemm (V3)",
    "prefill bf16 gemm (V3)",
    "prefill f32 gemm (V3)",
    "prefill fp8 gemm (medium)",
    "prefill fp8 gemm with bf16 activations (V3)",
    "prefill fp8 gemm with bf16 activations (medium)",
    "OpenBLAS sgemm via numpy (f32)",
    "grouped moe fp8 decode (V3)",
    "grouped moe fp8 (medium)",
    "grouped moe fp8 prefill (medium)",
    "grouped moe fp8 prefill with bf16 activations (medium)",
    "mla decode bf16 cache (V3)",
    "mla decode f32 cache (V3)",
    "mla decode fp8 cache (V3)",
    "mla decode bf16 cache (medium)",
    "mla prefill expanded (medium)",
    "mla prefill absorbed attention (medium)",
];

/// Measures the ceilings, then each kernel `only` selects (an error when it selects none);
/// `progress` sees every row as it is measured.
pub fn run(only: &Only, mut progress: impl FnMut(&str)) -> Result<Report> {
    if !ROW_NAMES.iter().any(|n| only.wants(n)) {
        return Err(Error::Unsupported {
            op: "bench kernels",
            detail: format!(
                "--only {:?} matches no row; rows: {}",
                only.0,
                ROW_NAMES.join(", ")
            ),
        });
    }
    let threads = rayon::current_num_threads();
    let isa = cpu::isa();
    progress(&format!("threads {threads}, isa {}", isa.name()));
    // Ceilings are measured before and after the kernels and the higher value kept: on a
    // shared machine a momentary slowdown must not make the kernels look better than they are.
    let read_gbps = read_bandwidth(isa);
    progress(&format!("read bandwidth {read_gbps:.1} GB/s"));
    let fma_gflops = fma_peak(isa);
    progress(&format!("f32 FMA peak {fma_gflops:.1} GFLOP/s"));
    let bf16_gflops = bf16_peak(isa);
    if let Some(v) = bf16_gflops {
        progress(&format!(
            "bf16 dot peak {v:.1} GFLOP/s (the ceiling of the rows with bf16 activations)"
        ));
    }
    let ceilings = Ceilings {
        threads,
        isa,
        read_gbps,
        fma_gflops,
        bf16_gflops,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |mut r: Row, progress: &mut dyn FnMut(&str)| {
        if let (true, Bound::Compute, Some(p)) = (r.bf16_activations, r.bound, bf16_gflops) {
            r.bound = Bound::Bf16Dot;
            r.fraction = r.gflops() / p;
        }
        progress(&format_row(&r));
        rows.push(r);
    };
    let mk = |name: &str, shape: String, s: (f64, f64), bytes: f64, flops: f64, bound: Bound| Row {
        name: {
            // Every row is listed where `--only` looks for it.
            assert!(
                ROW_NAMES.contains(&name),
                "bench row {name} not in ROW_NAMES"
            );
            name.into()
        },
        shape,
        seconds: s.0,
        cpu_share: s.1,
        bytes,
        flops,
        bound,
        fraction: match bound {
            Bound::Memory => bytes / s.0 / 1e9 / read_gbps,
            Bound::Compute => flops / s.0 / 1e9 / fma_gflops,
            Bound::Bf16Dot => flops / s.0 / 1e9 / bf16_gflops.unwrap_or(f64::NAN),
        },
        note: String::new(),
        bf16_activations: false,
    };
    // The rows' compute: exact, or bf16 activations where the CPU has them (else the row is
    // skipped, saying why).
    let bf16_act = Compute::new(isa, Activations::Bf16);
    let compute_for = |act: bool, progress: &mut dyn FnMut(&str), name: &str| match (act, &bf16_act)
    {
        (false, _) => Some(Compute::from(isa)),
        (true, Ok(c)) => Some(*c),
        (true, Err(e)) => {
            progress(&format!("{name}: skipped: {e}"));
            None
        }
    };

    // Decode GEMMs, M = 1: DeepSeek-V3 and medium shapes.
    for (name, kind, n, k, act) in [
        ("decode fp8 gemm (V3)", Kind::Fp8, 2048, 7168, false),
        ("decode fp8 gemm (V3)", Kind::Fp8, 4096, 7168, false),
        ("decode fp8 gemm (V3)", Kind::Fp8, 7168, 7168, false),
        ("decode bf16 gemm (V3)", Kind::Bf16, 2048, 7168, false),
        ("decode fp8 gemm (medium)", Kind::Fp8, 768, 2048, false),
        ("decode fp8 gemm (medium)", Kind::Fp8, 2048, 768, false),
        (
            "decode fp8 gemm with bf16 activations (V3)",
            Kind::Fp8,
            2048,
            7168,
            true,
        ),
        (
            "decode fp8 gemm with bf16 activations (medium)",
            Kind::Fp8,
            768,
            2048,
            true,
        ),
        (
            "decode fp8 gemm with bf16 activations (medium)",
            Kind::Fp8,
            2048,
            768,
            true,
        ),
    ] {
        if !only.wants(name) {
            continue;
        }
        let Some(c) = compute_for(act, &mut progress, name) else {
            continue;
        };
        let (s, bytes) = decode_gemm(c, kind, 1, n, k)?;
        let r = mk(
            name,
            format!("M=1 N={n} K={k}"),
            s,
            bytes,
            2.0 * (n * k) as f64,
            Bound::Memory,
        );
        push(r, &mut progress);
    }
    if only.wants("decode fp8 gemm (V3)") {
        let (s, bytes) = decode_gemm(Compute::from(isa), Kind::Fp8, 16, 2048, 7168)?;
        let r = mk(
            "decode fp8 gemm (V3)",
            "M=16 N=2048 K=7168".into(),
            s,
            bytes,
            2.0 * 16.0 * (2048 * 7168) as f64,
            Bound::Memory,
        );
        push(r, &mut progress);
    }

    // Prefill GEMMs, M = 512.
    for (name, kind, m, n, k, act) in [
        ("prefill fp8 gemm (V3)", Kind::Fp8, 512, 2048, 7168, false),
        ("prefill bf16 gemm (V3)", Kind::Bf16, 512, 2048, 7168, false),
        ("prefill f32 gemm (V3)", Kind::F32, 512, 2048, 7168, false),
        (
            "prefill fp8 gemm (medium)",
            Kind::Fp8,
            512,
            768,
            2048,
            false,
        ),
        (
            "prefill fp8 gemm with bf16 activations (V3)",
            Kind::Fp8,
            512,
            2048,
            7168,
            true,
        ),
        (
            "prefill fp8 gemm with bf16 activations (medium)",
            Kind::Fp8,
            512,
            768,
            2048,
            true,
        ),
    ] {
        if !only.wants(name) {
            continue;
        }
        let Some(c) = compute_for(act, &mut progress, name) else {
            continue;
        };
        let s = prefill_gemm(c, kind, m, n, k)?;
        let w_bytes = (n * k * kind.bytes()) as f64;
        let r = mk(
            name,
            format!("M={m} N={n} K={k}"),
            s,
            w_bytes,
            2.0 * (m * n * k) as f64,
            Bound::Compute,
        );
        push(
            Row {
                bf16_activations: act,
                ..r
            },
            &mut progress,
        );
    }
    let blas_row = "OpenBLAS sgemm via numpy (f32)";
    let mut blas = if only.wants(blas_row) {
        Some(openblas_sgemm(512, 2048, 7168, threads))
    } else {
        None
    };
    match &mut blas {
        None => {}
        Some(Ok((s, name))) => {
            let mut r = mk(
                blas_row,
                "M=512 N=2048 K=7168".into(),
                *s,
                (2048 * 7168 * 4) as f64,
                2.0 * (512usize * 2048 * 7168) as f64,
                Bound::Compute,
            );
            r.note = std::mem::take(name);
            push(r, &mut progress);
        }
        Some(Err(e)) => progress(&format!("OpenBLAS comparison unavailable: {e}")),
    }

    // Grouped expert FFN: a shard's worth of experts with a skewed row count.
    for (name, hidden, inter, rows_per, act) in [
        (
            "grouped moe fp8 decode (V3)",
            7168,
            2048,
            &[1usize, 2, 3, 10][..],
            false,
        ),
        (
            "grouped moe fp8 (medium)",
            2048,
            768,
            &[1, 1, 2, 3, 4, 8, 16, 32][..],
            false,
        ),
        (
            "grouped moe fp8 prefill (medium)",
            2048,
            768,
            &[64, 64, 128, 256][..],
            false,
        ),
        (
            "grouped moe fp8 prefill with bf16 activations (medium)",
            2048,
            768,
            &[64, 64, 128, 256][..],
            true,
        ),
    ] {
        if !only.wants(name) {
            continue;
        }
        let Some(c) = compute_for(act, &mut progress, name) else {
            continue;
        };
        let (s, bytes, flops) = grouped(c, hidden, inter, rows_per)?;
        let total: usize = rows_per.iter().sum();
        let bound = if total / rows_per.len() > 32 {
            Bound::Compute
        } else {
            Bound::Memory
        };
        let r = mk(
            name,
            format!(
                "{} experts, rows {rows_per:?}, hidden {hidden}, inter {inter}",
                rows_per.len()
            ),
            s,
            bytes,
            flops,
            bound,
        );
        push(
            Row {
                bf16_activations: act,
                ..r
            },
            &mut progress,
        );
    }

    // MLA decode: batch 16, context 4096.
    for (name, heads, dtype) in [
        ("mla decode bf16 cache (V3)", 128, CacheKind::Bf16),
        ("mla decode f32 cache (V3)", 128, CacheKind::F32),
        ("mla decode fp8 cache (V3)", 128, CacheKind::Fp8),
        ("mla decode bf16 cache (medium)", 16, CacheKind::Bf16),
    ] {
        if !only.wants(name) {
            continue;
        }
        let (s, bytes, flops) = mla_decode(16, 4096, heads, 512, 64, dtype)?;
        let bound = if heads >= 64 {
            Bound::Compute
        } else {
            Bound::Memory
        };
        let r = mk(
            name,
            format!("batch 16, ctx 4096, {heads} heads, 512+64"),
            s,
            bytes,
            flops,
            bound,
        );
        push(r, &mut progress);
    }
    // MLA prefill of a 512-token prompt (no cached prefix), medium shapes, per layer: the
    // expanded form (decompress K/V with kv_b, attend per head) against the absorbed
    // attention alone (its W_UK/W_UV projections, as much work as the decompression here, not
    // included). FLOPs are each form's own multiply-adds.
    for (name, expanded) in [
        ("mla prefill expanded (medium)", true),
        ("mla prefill absorbed attention (medium)", false),
    ] {
        if !only.wants(name) {
            continue;
        }
        let (s, bytes, flops) = mla_prefill(512, 0, 16, 512, 64, 128, 128, expanded)?;
        let r = mk(
            name,
            "chunk 512, no prefix, 16 heads, 512+64, 128+64/128".into(),
            s,
            bytes,
            flops,
            Bound::Compute,
        );
        push(r, &mut progress);
    }
    let read2 = read_bandwidth(isa);
    let fma2 = fma_peak(isa);
    progress(&format!(
        "ceilings again: read bandwidth {read2:.1} GB/s, f32 FMA peak {fma2:.1} GFLOP/s"
    ));
    let ceilings = Ceilings {
        read_gbps: read_gbps.max(read2),
        fma_gflops: fma_gflops.max(fma2),
        ..ceilings
    };
    // Roofline: a kernel is held to read bandwidth when its FLOP per byte is below the
    // machine's ratio of FMA peak to bandwidth, else to the FMA peak.
    // Rows with bf16 activations are held to the bf16 dot peak instead of the FMA peak.
    for r in &mut rows {
        let peak = match (r.bf16_activations, ceilings.bf16_gflops) {
            (true, Some(p)) => p,
            _ => ceilings.fma_gflops,
        };
        r.bound = if r.flops / r.bytes < peak / ceilings.read_gbps {
            Bound::Memory
        } else if r.bf16_activations {
            Bound::Bf16Dot
        } else {
            Bound::Compute
        };
        r.fraction = match r.bound {
            Bound::Memory => r.gbps() / ceilings.read_gbps,
            Bound::Compute | Bound::Bf16Dot => r.gflops() / peak,
        };
    }
    Ok(Report { ceilings, rows })
}

/// One human-readable line of a row.
pub fn format_row(r: &Row) -> String {
    let ceil = match r.bound {
        Bound::Memory => "read bw",
        Bound::Compute => "FMA peak",
        Bound::Bf16Dot => "bf16 dot peak",
    };
    let note = if r.note.is_empty() {
        String::new()
    } else {
        format!("  [{}]", r.note)
    };
    format!(
        "{:<34} {:<52} {:>9.3} ms {:>8.1} GB/s {:>8.1} GFLOP/s  {:>5.2} of {ceil}  (cpu share {:.2}){note}",
        r.name,
        r.shape,
        r.seconds * 1e3,
        r.gbps(),
        r.gflops(),
        r.fraction,
        r.cpu_share
    )
}

impl Report {
    /// The table printed by `shardseek bench kernels`.
    pub fn table(&self) -> String {
        let c = &self.ceilings;
        let mut s = format!(
            "ceilings: {} threads, {}; read bandwidth {:.1} GB/s; f32 FMA peak {:.1} GFLOP/s; bf16 peak {}\n",
            c.threads,
            c.isa.name(),
            c.read_gbps,
            c.fma_gflops,
            c.bf16_gflops
                .map_or("n/a (no AVX512-BF16)".to_string(), |v| format!(
                    "{v:.1} GFLOP/s (the ceiling of the rows with bf16 activations)"
                ))
        );
        for r in &self.rows {
            s.push_str(&format_row(r));
            s.push('\n');
        }
        s
    }

    /// The same as JSON (hand-written: the crate has no serde dependency).
    pub fn to_json(&self) -> String {
        let c = &self.ceilings;
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"name\":{},\"shape\":{},\"seconds\":{},\"gbps\":{},\"gflops\":{},\"bound\":\"{}\",\"fraction\":{},\"cpu_share\":{},\"note\":{}}}",
                    json_str(&r.name),
                    json_str(&r.shape),
                    r.seconds,
                    r.gbps(),
                    r.gflops(),
                    match r.bound {
                        Bound::Memory => "memory",
                        Bound::Compute => "compute",
                        Bound::Bf16Dot => "bf16 compute",
                    },
                    r.fraction,
                    if r.cpu_share.is_finite() { r.cpu_share.to_string() } else { "null".into() },
                    json_str(&r.note)
                )
            })
            .collect();
        format!(
            "{{\"ceilings\":{{\"threads\":{},\"isa\":\"{}\",\"read_gbps\":{},\"fma_gflops\":{},\"bf16_gflops\":{}}},\"rows\":[{}]}}",
            c.threads,
            c.isa.name(),
            c.read_gbps,
            c.fma_gflops,
            c.bf16_gflops.map_or("null".into(), |v| v.to_string()),
            rows.join(",")
        )
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// CPU time of the whole process (all threads), seconds.
fn process_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best wall time per call of `f` over repeated calls within the time budget (after one
/// warm-up), with the CPU share of the measured calls: process CPU time / (wall × pool threads),
/// summed over all of them. A share well below 1 means the machine's other tenants took the
/// cores during the measurement. It is not taken from the best call alone: the kernel updates a
/// running thread's CPU time on other cores only at scheduler ticks, so a sub-millisecond call
/// read on its own missed the busy team worker and reported a share of 0.5.
fn time_best(mut f: impl FnMut(usize) -> Result<()>) -> Result<(f64, f64)> {
    f(0)?;
    let threads = rayon::current_num_threads() as f64;
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let (mut cpu, mut walls) = (0.0, 0.0);
    let mut i = 1;
    while i < 4 || (start.elapsed().as_secs_f64() < MEASURE_SECS && i < 200) {
        let c = process_cpu();
        let t = Instant::now();
        f(i)?;
        let wall = t.elapsed().as_secs_f64();
        cpu += process_cpu() - c;
        walls += wall;
        best = best.min(wall);
        i += 1;
    }
    Ok((best, cpu / (walls * threads)))
}

/// Fast deterministic filler (xorshift): benchmark inputs need no statistical quality.
fn fill_bytes(buf: &mut [u8], seed: u64) {
    buf.par_chunks_mut(1 << 20).enumerate().for_each(|(c, ch)| {
        let mut s = seed ^ ((c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for b in ch.chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = s.to_le_bytes();
            b.copy_from_slice(&v[..b.len()]);
        }
    });
}

/// Memory read bandwidth: every pool thread sums its share of a 256 MiB buffer.
fn read_bandwidth(isa: Isa) -> f64 {
    let n = STREAM_BYTES / 4;
    let mut buf = vec![0f32; n];
    buf.par_chunks_mut(1 << 18).for_each(|c| c.fill(1.0));
    // Best of many passes over 64 MiB segments taken in rotation (each was last read 192 MiB
    // earlier, so it comes from memory): the same best-of-many-short-calls method the
    // kernels are timed with, so a busy neighbour cannot bias one side only.
    const SEG: usize = 64 << 20;
    let segs = STREAM_BYTES / SEG;
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut i = 0;
    while i < 8 || (start.elapsed().as_secs_f64() < 2.0 * MEASURE_SECS && i < 400) {
        let seg = &buf[(i % segs) * SEG / 4..(i % segs + 1) * SEG / 4];
        let t = Instant::now();
        let s: f32 = seg.par_chunks(1 << 16).map(|c| sum(isa, c)).sum();
        black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
        i += 1;
    }
    SEG as f64 / best / 1e9
}

/// Sum with enough independent vector accumulators that loads, not adds, limit it.
fn sum(isa: Isa, c: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 | Isa::Avx512Bf16 => unsafe { sum_avx2(c) },
        _ => {
            let mut acc = [0f32; 16];
            for ch in c.chunks_exact(16) {
                for j in 0..16 {
                    acc[j] += ch[j];
                }
            }
            acc.iter().sum()
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_avx2(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 4];
    let mut out = [0f32; 8];
    unsafe {
        for ch in c.chunks_exact(32) {
            let p = ch.as_ptr();
            for (j, v) in a.iter_mut().enumerate() {
                *v = _mm256_add_ps(*v, _mm256_loadu_ps(p.add(8 * j)));
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        _mm256_storeu_ps(out.as_mut_ptr(), s);
    }
    out.iter().sum()
}

/// f32 FMA peak: independent register-resident FMA chains on every pool thread at once.
fn fma_peak(isa: Isa) -> f64 {
    // ~5 ms per call, best of many calls (as for the kernels and the bandwidth).
    const ITERS: u64 = 1_000_000;
    let mut best = f64::INFINITY;
    let threads = rayon::current_num_threads();
    let start = Instant::now();
    let mut i = 0;
    while i < 8 || (start.elapsed().as_secs_f64() < MEASURE_SECS && i < 400) {
        let t = Instant::now();
        let flops: Vec<f64> = rayon::broadcast(|_| fma_loop(isa, black_box(ITERS)));
        black_box(&flops);
        best = best.min(t.elapsed().as_secs_f64());
        i += 1;
    }
    let per_thread = match isa {
        // 512-bit on AVX-512 CPUs: the compute-bound kernels' wide tile runs 512-bit there.
        Isa::Avx512 | Isa::Avx512Bf16 => ITERS as f64 * 12.0 * 16.0 * 2.0,
        Isa::Avx2Fma => ITERS as f64 * 12.0 * 8.0 * 2.0,
        Isa::Portable => ITERS as f64 * 12.0 * 2.0,
    };
    per_thread * threads as f64 / best / 1e9
}

/// bf16 dot peak (`vdpbf16ps`, 64 flops per 512-bit instruction), measured like
/// [`fma_peak`]; `None` without AVX512-BF16. Reported beside the ceilings, never used to
/// classify or score a row: the FP8 kernels spend three bf16 products per f32 product (the
/// split of x), so their useful rate is held to the f32 FMA peak.
fn bf16_peak(isa: Isa) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Bf16 {
        const ITERS: u64 = 1_000_000;
        let mut best = f64::INFINITY;
        let start = Instant::now();
        let mut i = 0;
        while i < 8 || (start.elapsed().as_secs_f64() < MEASURE_SECS && i < 400) {
            let t = Instant::now();
            // SAFETY: the ISA was detected.
            let r: Vec<f64> = rayon::broadcast(|_| unsafe { bf16_loop(black_box(ITERS)) });
            black_box(&r);
            best = best.min(t.elapsed().as_secs_f64());
            i += 1;
        }
        let per_thread = ITERS as f64 * 12.0 * 64.0;
        return Some(per_thread * rayon::current_num_threads() as f64 / best / 1e9);
    }
    let _ = isa;
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_loop(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_set1_ps(1.0); 12];
    let b: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(0x3f80)) };
    let c: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(0x3380)) };
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, b, c);
        }
    }
    let mut s = a[0];
    for v in &a[1..] {
        s = _mm512_add_ps(s, *v);
    }
    _mm512_reduce_add_ps(s) as f64
}

fn fma_loop(isa: Isa, iters: u64) -> f64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { fma_loop_avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { fma_loop_avx2(iters) },
        _ => {
            let mut a = [1f32; 12];
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = v.mul_add(0.999_999, 1e-7);
                }
            }
            a.iter().map(|&v| v as f64).sum()
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_set1_ps(1.0); 12];
    let b = _mm256_set1_ps(0.999_999);
    let c = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, b, c);
        }
    }
    let mut out = [0f32; 8];
    let mut s = a[0];
    for v in &a[1..] {
        s = _mm256_add_ps(s, *v);
    }
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().map(|&v| v as f64).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_set1_ps(1.0); 12];
    let b = _mm512_set1_ps(0.999_999);
    let c = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, b, c);
        }
    }
    let mut s = a[0];
    for v in &a[1..] {
        s = _mm512_add_ps(s, *v);
    }
    _mm512_reduce_add_ps(s) as f64
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fp8,
    Bf16,
    F32,
}

impl Kind {
    fn bytes(self) -> usize {
        match self {
            Kind::Fp8 => 1,
            Kind::Bf16 => 2,
            Kind::F32 => 4,
        }
    }
}

/// Random weight storage of `copies` `[n, k]` matrices back to back (values O(1) after the
/// scales; FP8 NaN codes replaced).
struct Store {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    n: usize,
    k: usize,
    kind: Kind,
}

impl Store {
    fn new(kind: Kind, n: usize, k: usize, copies: usize, seed: u64) -> Self {
        let per = n * k * kind.bytes();
        let mut bytes = vec![0u8; per * copies];
        fill_bytes(&mut bytes, seed);
        match kind {
            Kind::Fp8 => bytes.par_iter_mut().for_each(|b| {
                if *b & 0x7f == 0x7f {
                    *b &= 0xfe;
                }
            }),
            Kind::Bf16 => bytes.par_chunks_mut(2).for_each(|c| {
                // Keep the exponent moderate: bf16 of a value in ±[0.5, 2).
                c[1] = (c[1] & 0x80) | 0x3f;
            }),
            Kind::F32 => bytes.par_chunks_mut(4).for_each(|c| {
                c[3] = (c[3] & 0x80) | 0x3f;
            }),
        }
        let scales = vec![1.0 / 448.0; n.div_ceil(FP8_BLOCK) * k.div_ceil(FP8_BLOCK) * copies];
        Self {
            bytes,
            scales,
            n,
            k,
            kind,
        }
    }

    fn copies(&self) -> usize {
        self.bytes.len() / (self.n * self.k * self.kind.bytes())
    }

    fn get(&self, i: usize) -> Result<Weight<'_>> {
        let per = self.n * self.k * self.kind.bytes();
        let b = &self.bytes[i * per..(i + 1) * per];
        let data = match self.kind {
            Kind::Fp8 => {
                let ns = self.n.div_ceil(FP8_BLOCK) * self.k.div_ceil(FP8_BLOCK);
                WeightData::Fp8E4m3 {
                    q: b,
                    scale_inv: &self.scales[i * ns..(i + 1) * ns],
                }
            }
            Kind::Bf16 => WeightData::Bf16(b),
            Kind::F32 => WeightData::F32(b),
        };
        Weight::new(self.n, self.k, data)
    }
}

fn randf(n: usize, seed: u64) -> Vec<f32> {
    let mut b = vec![0u8; n * 4];
    fill_bytes(&mut b, seed);
    b.chunks_exact(4)
        .map(|c| {
            (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Decode GEMM over rotating weight copies; returns (seconds per call, bytes per call).
fn decode_gemm(c: Compute, kind: Kind, m: usize, n: usize, k: usize) -> Result<((f64, f64), f64)> {
    let per = n * k * kind.bytes();
    let copies = STREAM_BYTES.div_ceil(per).max(2);
    let store = Store::new(kind, n, k, copies, 1);
    let x = randf(m * k, 2);
    let mut y = vec![0f32; m * n];
    let bytes = store.get(0)?.stored_bytes() as f64;
    let s = time_best(|i| {
        let w = store.get(i % store.copies())?;
        gemm::matmul_with(c, &x, m, &w, gemm::Epilogue::Store, &mut y)
    })?;
    Ok((s, bytes))
}

fn prefill_gemm(c: Compute, kind: Kind, m: usize, n: usize, k: usize) -> Result<(f64, f64)> {
    let store = Store::new(kind, n, k, 1, 3);
    let x = randf(m * k, 4);
    let mut y = vec![0f32; m * n];
    let w = store.get(0)?;
    time_best(|_| gemm::matmul_with(c, &x, m, &w, gemm::Epilogue::Store, &mut y))
}

/// Runs `kernels/bench/sgemm.py` (embedded) with python3 + numpy:
/// ((seconds, CPU share), BLAS name).
fn openblas_sgemm(m: usize, n: usize, k: usize, threads: usize) -> Result<((f64, f64), String)> {
    let unavailable = |d: String| Error::Unsupported {
        op: "bench openblas",
        detail: d,
    };
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(include_str!("../bench/sgemm.py"))
        .args([m, n, k, threads].map(|v| v.to_string()))
        .output()
        .map_err(|e| unavailable(format!("python3: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(unavailable(
            err.lines().last().unwrap_or("python3 failed").to_string(),
        ));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> Option<String> {
        let i = s.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &s[i..];
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim().trim_matches('"').to_string())
    };
    let secs: f64 = field("seconds")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| unavailable(format!("unparsable output {s}")))?;
    let blas = field("blas").unwrap_or_default();
    let np = field("numpy").unwrap_or_default();
    let share: f64 = field("cpu_share")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(((secs, share), format!("{blas}, numpy {np}")))
}

/// Grouped expert FFN over rotating expert sets; (seconds, weight bytes, flops) per call.
fn grouped(
    c: Compute,
    hidden: usize,
    inter: usize,
    rows_per: &[usize],
) -> Result<((f64, f64), f64, f64)> {
    let e = rows_per.len();
    let per_set = 3 * hidden * inter * e;
    let sets = STREAM_BYTES.div_ceil(per_set).clamp(1, 16);
    let gu = Store::new(Kind::Fp8, inter, hidden, 2 * e * sets, 5);
    let dn = Store::new(Kind::Fp8, hidden, inter, e * sets, 6);
    let rows: usize = rows_per.iter().sum();
    let x = randf(rows * hidden, 7);
    let rw = vec![0.5f32; rows];
    let mut y = vec![0f32; rows * hidden];
    let mut groups = Vec::new();
    let mut r = 0;
    for (i, &n) in rows_per.iter().enumerate() {
        groups.push(Group {
            expert: i,
            rows: r..r + n,
        });
        r += n;
    }
    let experts_of = |set: usize| -> Result<Vec<ExpertWeights<'_>>> {
        (0..e)
            .map(|i| {
                Ok(ExpertWeights {
                    gate: gu.get(2 * (set * e + i))?,
                    up: gu.get(2 * (set * e + i) + 1)?,
                    down: dn.get(set * e + i)?,
                })
            })
            .collect()
    };
    let sets_w: Vec<Vec<ExpertWeights>> = (0..sets).map(experts_of).collect::<Result<_>>()?;
    let s = time_best(|i| {
        moe::grouped_ffn_with(
            c,
            &x,
            hidden,
            &groups,
            &sets_w[i % sets],
            Some(&rw),
            Combine::Accumulate,
            &mut y,
        )
    })?;
    let bytes: f64 = sets_w[0]
        .iter()
        .map(|w| (w.gate.stored_bytes() + w.up.stored_bytes() + w.down.stored_bytes()) as f64)
        .sum();
    let flops = 2.0 * 3.0 * (rows * hidden * inter) as f64;
    Ok((s, bytes, flops))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum CacheKind {
    F32,
    Bf16,
    Fp8,
}

/// MLA prefill of `chunk` tokens after `start` cached ones, f32 cache, FP8 kv_b, in the
/// expanded form or the absorbed attention; (seconds, cache bytes, flops) per call.
#[allow(clippy::too_many_arguments)]
fn mla_prefill(
    chunk: usize,
    start: usize,
    heads: usize,
    r: usize,
    p: usize,
    nope: usize,
    v: usize,
    expanded: bool,
) -> Result<((f64, f64), f64, f64)> {
    let e = r + p;
    let len = start + chunk;
    let bytes = (len * e * 4) as f64;
    let pages = len.div_ceil(MLA_BLOCK);
    let vals = randf(pages * MLA_BLOCK * e, 11);
    let cache = LatentCache::new(CacheData::F32(&vals), r, p)?;
    let table: Vec<u32> = (0..pages as u32).collect();
    let seq = SeqPages { pages: &table, len };
    let scale = 1.0 / ((nope + p) as f32).sqrt();
    let pairs = (chunk * start + chunk * (chunk + 1) / 2) as f64;
    if expanded {
        let kv_b = Store::new(Kind::Fp8, heads * (nope + v), r, 1, 12);
        let w = kv_b.get(0)?;
        let q = randf(chunk * heads * (nope + p), 13);
        let mut out = vec![0f32; chunk * heads * v];
        let s = time_best(|_| {
            mla::mla_prefill_expanded(&cache, &seq, start, heads, &q, &w, nope, scale, &mut out)
        })?;
        let flops = 2.0 * (len * heads * (nope + v) * r) as f64
            + 2.0 * pairs * (heads * (nope + p + v)) as f64;
        Ok((s, bytes, flops))
    } else {
        let qa = randf(chunk * heads * r, 13);
        let qp = randf(chunk * heads * p, 14);
        let mut out = vec![0f32; chunk * heads * r];
        let s =
            time_best(|_| mla::mla_prefill(&cache, &seq, start, heads, &qa, &qp, scale, &mut out))?;
        Ok((s, bytes, 2.0 * pairs * (heads * (2 * r + p)) as f64))
    }
}

/// MLA decode, every sequence `ctx` tokens; (seconds, cache bytes, flops) per call.
fn mla_decode(
    batch: usize,
    ctx: usize,
    heads: usize,
    r: usize,
    p: usize,
    kind: CacheKind,
) -> Result<((f64, f64), f64, f64)> {
    let e = r + p;
    let pages_per = ctx.div_ceil(MLA_BLOCK);
    let blocks = batch * pages_per;
    let vals = randf(blocks * MLA_BLOCK * e, 8);
    let bfv: Vec<u16>;
    let q8: Vec<u8>;
    let sc: Vec<f32>;
    let data = match kind {
        CacheKind::F32 => CacheData::F32(&vals),
        CacheKind::Bf16 => {
            bfv = vals.par_iter().map(|&v| f32_to_bf16(v)).collect();
            CacheData::Bf16(&bfv)
        }
        CacheKind::Fp8 => {
            let mut q = vec![0u8; vals.len()];
            sc = vals
                .par_chunks(e)
                .zip(q.par_chunks_mut(e))
                .map(|(v, c)| mla::quantize_token_fp8(v, c))
                .collect();
            q8 = q;
            CacheData::Fp8 { q: &q8, scale: &sc }
        }
    };
    let cache = LatentCache::new(data, r, p)?;
    // Interleave the sequences' pages, as a shared allocator would.
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|b| (0..pages_per).map(|i| (i * batch + b) as u32).collect())
        .collect();
    let seqs: Vec<SeqPages> = tables
        .iter()
        .map(|t| SeqPages { pages: t, len: ctx })
        .collect();
    let qa = randf(batch * heads * r, 9);
    let qp = randf(batch * heads * p, 10);
    let mut out = vec![0f32; batch * heads * r];
    let scale = 1.0 / (e as f32).sqrt();
    let s = time_best(|_| mla::mla_decode(&cache, &seqs, heads, &qa, &qp, scale, &mut out))?;
    let per_value = match kind {
        CacheKind::F32 => 4.0,
        CacheKind::Bf16 => 2.0,
        CacheKind::Fp8 => 1.0 + 4.0 / e as f64,
    };
    let bytes = (batch * ctx * e) as f64 * per_value;
    let flops = 2.0 * (batch * heads * ctx * (e + r)) as f64;
    Ok((s, bytes, flops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selects_rows_by_name_part() {
        let all = Only::default();
        assert!(ROW_NAMES.iter().all(|n| all.wants(n)));
        let some = Only(vec!["GROUPED MOE".into(), "decode fp8 gemm (m".into()]);
        let picked: Vec<&str> = ROW_NAMES
            .iter()
            .copied()
            .filter(|n| some.wants(n))
            .collect();
        assert_eq!(
            picked,
            [
                "decode fp8 gemm (medium)",
                "grouped moe fp8 decode (V3)",
                "grouped moe fp8 (medium)",
                "grouped moe fp8 prefill (medium)",
                "grouped moe fp8 prefill with bf16 activations (medium)"
            ]
        );
        // A filter that selects nothing is an error before anything is measured.
        let none = Only(vec!["no such row".into()]);
        let err = run(&none, |_| {}).unwrap_err().to_string();
        assert!(err.contains("matches no row"), "{err}");
    }
}
