//! The CUDA implementation (feature `cuda`): modules compiled by NVRTC, device buffers, launches.

use super::{CudaBackend, SOURCES, full_source};
use crate::error::{Error, Result, shape};
use crate::gate::{GateParams, Routing};
use crate::mla::{CacheData, LatentCache, MLA_BLOCK, SeqPages};
use crate::moe::{Combine, ExpertWeights, Group};
use crate::rope::Rope;
use crate::weight::{FP8_BLOCK, Weight, WeightData};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    cc: (i32, i32),
    sms: usize,
}

fn drv(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        op,
        detail: e.to_string(),
    }
}

const FUNCS: &[(&str, &[&str])] = &[
    (
        "activation",
        &["silu_mul", "f32_to_bf16_rows", "bf16_to_f32_rows"],
    ),
    ("gate", &["noaux_tc"]),
    (
        "gemm",
        &[
            "gemv_fp8",
            "gemv_bf16",
            "gemv_f32",
            "block_gemm",
            "quant_rows_fp8",
            "gemm_fp8_mma",
            "fp8_mma_peak",
            "fma_peak",
        ],
    ),
    (
        "mla",
        &[
            "mla_decode_f32",
            "mla_decode_bf16",
            "mla_decode_fp8",
            "mla_decode_mma_bf16",
            "mla_combine_splits",
        ],
    ),
    ("moe", &["grouped_gate_up", "grouped_down"]),
    ("norm", &["rms_norm"]),
    ("rope", &["rope_interleaved"]),
    ("softmax", &["softmax_rows", "argmax_rows"]),
];

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape(op, format!("{v} exceeds i32")))
}

fn u32_of(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| shape(op, format!("grid {v} exceeds u32")))
}

/// Rows per `gemv_*` launch row-block (`GEMV_ROWS` in gemm.cu).
const GEMV_ROWS: usize = 8;
/// Up to this many rows a product runs as GEMV (weights streamed once per 8 rows).
pub const GEMV_MAX_ROWS: usize = 16;

/// A weight matrix on the device, uploaded once: FP8 stays FP8 with its block scales.
pub struct DeviceMatrix {
    pub rows: usize,
    pub cols: usize,
    /// 0 = FP8 e4m3 with 128×128 scales, 1 = BF16, 2 = F32 (gemm.cu's `kind`).
    kind: i32,
    data: CudaSlice<u8>,
    /// Block scales (FP8), or one unused value.
    scales: CudaSlice<f32>,
}

impl DeviceMatrix {
    /// Device bytes the kernels stream to use it once.
    pub fn bytes(&self) -> usize {
        self.data.len()
            + if self.kind == 0 {
                self.scales.len() * 4
            } else {
                0
            }
    }

    /// Whether the values are FP8 codes.
    pub fn is_fp8(&self) -> bool {
        self.kind == 0
    }
}

/// What a product does with `y`.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `y = x·Wᵀ`.
    Store,
    /// `y += s[m] · (x·Wᵀ)` (`None`: s = 1).
    Accumulate(Option<&'a CudaSlice<f32>>),
}

/// How a product with more than [`GEMV_MAX_ROWS`] rows runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmAlgo {
    /// f32 activations, f32 FMA tiles: the CPU's numerics (exact reference tolerance).
    Exact,
    /// FP8 weights on sm_89+: activations quantised per (row, 128 columns) to e4m3 and FP8
    /// tensor-core `mma` (DeepSeek-V3's inference recipe); other weights as `Exact`.
    Fp8Activations,
}

/// A paged latent cache (one layer) mirrored on the device, in the host cache's layout:
/// `[blocks][64][rank + rope]` in f32, bf16 or e4m3 codes (with per-token scales).
pub struct DeviceCache {
    pub blocks: usize,
    pub rank: usize,
    pub rope: usize,
    /// 0 f32, 1 bf16, 2 fp8.
    dtype: u8,
    data: CudaSlice<u8>,
    scales: CudaSlice<f32>,
}

impl DeviceCache {
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }

    fn elem(&self) -> usize {
        match self.dtype {
            0 => 4,
            1 => 2,
            _ => 1,
        }
    }

    fn entry(&self) -> usize {
        self.rank + self.rope
    }

    /// Whether `host` is a cache of this shape and dtype.
    pub fn matches(&self, host: &LatentCache) -> bool {
        let dt = match host.data {
            CacheData::F32(_) => 0,
            CacheData::Bf16(_) => 1,
            CacheData::Fp8 { .. } => 2,
        };
        dt == self.dtype
            && host.kv_lora_rank == self.rank
            && host.rope_dim == self.rope
            && host.num_blocks() == self.blocks
    }
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices (f32, u16) viewed as their bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// (free, total) memory of device `ordinal`, without compiling any kernel.
pub fn device_memory(ordinal: usize) -> Result<(usize, usize)> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::CudaUnavailable(
            "libcuda (the NVIDIA driver) not found".into(),
        ));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| Error::CudaUnavailable(format!("device cuda:{ordinal}: {e}")))?;
    ctx.mem_get_info().map_err(drv("mem_get_info"))
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles every source for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the shared libraries can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "libcuda (the NVIDIA driver) not found".into(),
            ));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable("libnvrtc not found".into()));
        }
        let n = CudaContext::device_count()
            .map_err(|e| Error::CudaUnavailable(format!("no CUDA device: {e}")))?;
        if ordinal >= n.max(0) as usize {
            return Err(Error::CudaUnavailable(format!(
                "device cuda:{ordinal} requested, {n} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("device cuda:{ordinal}: {e}")))?;
        let cc = ctx
            .compute_capability()
            .map_err(drv("compute_capability"))?;
        let suffix = if cc.0 >= 9 { "a" } else { "" };
        let arch = format!("--gpu-architecture=compute_{}{}{suffix}", cc.0, cc.1);
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for (name, src) in SOURCES {
            let opts = cudarc::nvrtc::CompileOptions {
                options: vec![arch.clone(), "--std=c++17".into()],
                name: Some(format!("{name}.cu")),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(full_source(src, name), opts).map_err(
                |e| Error::Cuda {
                    op: "nvrtc",
                    detail: format!("{name}.cu: {e}"),
                },
            )?;
            let module = ctx.load_module(ptx).map_err(drv("load_module"))?;
            let names = FUNCS
                .iter()
                .find(|(m, _)| m == name)
                .map_or(&[][..], |(_, f)| *f);
            for f in names {
                funcs.insert(*f, module.load_function(f).map_err(drv("load_function"))?);
            }
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(drv("attribute"))?
            .max(1) as usize;
        Ok(Self {
            inner: Inner {
                ctx,
                stream,
                funcs,
                cc,
                sms,
            },
        })
    }

    fn f(&self, name: &'static str) -> Result<&CudaFunction> {
        self.inner.funcs.get(name).ok_or(Error::Cuda {
            op: "load_function",
            detail: format!("{name} not loaded"),
        })
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn device_name(&self) -> String {
        self.inner
            .ctx
            .name()
            .unwrap_or_else(|e| format!("unknown ({e})"))
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.cc
    }

    /// Whether FP8 tensor-core `mma` exists (sm_89 and newer).
    pub fn has_fp8_mma(&self) -> bool {
        self.inner.cc >= (8, 9)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.inner.ctx.mem_get_info().map_err(drv("mem_get_info"))
    }

    /// Waits for every queued operation.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(drv("synchronize"))
    }

    /// Copies a host slice to a new device buffer.
    pub fn htod<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            // SAFETY: a one-element buffer that no kernel reads (empty inputs launch nothing).
            return unsafe { self.inner.stream.alloc(1) }.map_err(drv("alloc"));
        }
        self.inner.stream.clone_htod(v).map_err(drv("htod"))
    }

    /// Copies a host slice into the start of a device buffer.
    pub fn htod_into<T: DeviceRepr>(&self, v: &[T], d: &mut CudaSlice<T>) -> Result<()> {
        if v.len() > d.len() {
            return Err(shape("htod", format!("{} into {}", v.len(), d.len())));
        }
        if v.is_empty() {
            return Ok(());
        }
        let mut view = d.slice_mut(..v.len());
        self.inner
            .stream
            .memcpy_htod(v, &mut view)
            .map_err(drv("htod"))
    }

    /// Copies the start of a device buffer into a host slice (waits for it).
    pub fn dtoh<T: DeviceRepr>(&self, d: &CudaSlice<T>, out: &mut [T]) -> Result<()> {
        if out.len() > d.len() {
            return Err(shape("dtoh", format!("{} from {}", out.len(), d.len())));
        }
        if out.is_empty() {
            return Ok(());
        }
        let view = d.slice(..out.len());
        self.inner
            .stream
            .memcpy_dtoh(&view, out)
            .map_err(drv("dtoh"))
    }

    /// A zeroed device buffer of `n` values (at least one).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.inner
            .stream
            .alloc_zeros(n.max(1))
            .map_err(drv("alloc"))
    }

    fn ptr<T>(&self, d: &CudaSlice<T>) -> u64 {
        let (p, _sync) = d.device_ptr(&self.inner.stream);
        p
    }

    /// Uploads a weight (once, at load). F16 becomes exact f32.
    pub fn upload(&self, w: &Weight) -> Result<DeviceMatrix> {
        let (kind, data, scales) = match w.data {
            WeightData::Fp8E4m3 { q, scale_inv } => (0, self.htod(q)?, self.htod(scale_inv)?),
            WeightData::Bf16(b) => (1, self.htod(b)?, self.zeros(1)?),
            WeightData::F32(b) => (2, self.htod(b)?, self.zeros(1)?),
            WeightData::F16(_) => {
                let mut bytes = Vec::with_capacity(w.rows * w.cols * 4);
                let mut row = vec![0f32; w.cols];
                for r in 0..w.rows {
                    w.dequant_row_into(r, 0, &mut row);
                    bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
                }
                (2, self.htod(&bytes)?, self.zeros(1)?)
            }
        };
        Ok(DeviceMatrix {
            rows: w.rows,
            cols: w.cols,
            kind,
            data,
            scales,
        })
    }

    /// `y[m·ldy + y_off ..] (+)= x[m·ldx + x_off ..] · Wᵀ` for `m` rows on device buffers (offsets
    /// and strides in f32 elements).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        x: &CudaSlice<f32>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &DeviceMatrix,
        y: &mut CudaSlice<f32>,
        y_off: usize,
        ldy: usize,
        epi: Epilogue,
        algo: GemmAlgo,
    ) -> Result<()> {
        const OP: &str = "cuda gemm";
        let (n, k) = (w.rows, w.cols);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if ldx < k || ldy < n || x_off + (m - 1) * ldx + k > x.len() {
            return Err(shape(OP, format!("x {} for {m}×{k} (ldx {ldx})", x.len())));
        }
        if y_off + (m - 1) * ldy + n > y.len() {
            return Err(shape(OP, format!("y {} for {m}×{n} (ldy {ldy})", y.len())));
        }
        let (mode, rs) = match epi {
            Epilogue::Store => (0i32, 0u64),
            Epilogue::Accumulate(None) => (1, 0),
            Epilogue::Accumulate(Some(s)) => {
                if s.len() < m {
                    return Err(shape(OP, "row scales"));
                }
                (1, self.ptr(s))
            }
        };
        let xp = self.ptr(x) + 4 * x_off as u64;
        let yp = self.ptr(y) + 4 * y_off as u64;
        let (wp, sp) = (self.ptr(&w.data), self.ptr(&w.scales));
        let (mi, ni, ki) = (i32_of(OP, m)?, i32_of(OP, n)?, i32_of(OP, k)?);
        let (ldx, ldy) = (ldx as i64, ldy as i64);
        let s = &self.inner.stream;
        if m <= GEMV_MAX_ROWS {
            let name = match w.kind {
                0 => "gemv_fp8",
                1 => "gemv_bf16",
                _ => "gemv_f32",
            };
            let f = self.f(name)?;
            let mut b = s.launch_builder(f);
            b.arg(&xp).arg(&ldx).arg(&wp).arg(&sp).arg(&yp).arg(&ldy);
            b.arg(&mi).arg(&ni).arg(&ki).arg(&mode).arg(&rs);
            let grid = (u32_of(OP, n.div_ceil(8))?, m.div_ceil(GEMV_ROWS) as u32, 1);
            // SAFETY: argument types and order match gemm.cu's gemv_*; every pointer lies in a
            // live buffer whose bounds were checked above.
            unsafe { b.launch(cfg(grid, 256)) }.map_err(drv("gemv"))?;
            return Ok(());
        }
        if algo == GemmAlgo::Fp8Activations && w.kind == 0 && self.has_fp8_mma() {
            let kb = k.div_ceil(FP8_BLOCK);
            let ldq = k.div_ceil(16) * 16;
            let xq = self.zeros::<u8>(m * ldq)?;
            let xs = self.zeros::<f32>(m * kb)?;
            let (qp, qsp) = (self.ptr(&xq), self.ptr(&xs));
            let ldq = ldq as i64;
            let f = self.f("quant_rows_fp8")?;
            let mut b = s.launch_builder(f);
            b.arg(&xp)
                .arg(&ldx)
                .arg(&mi)
                .arg(&ki)
                .arg(&qp)
                .arg(&ldq)
                .arg(&qsp);
            // SAFETY: matches gemm.cu's quant_rows_fp8; xq holds m × ldq codes, xs m × kb.
            unsafe { b.launch(cfg((kb as u32, u32_of(OP, m)?, 1), 128)) }
                .map_err(drv("quant_rows_fp8"))?;
            let f = self.f("gemm_fp8_mma")?;
            let mut b = s.launch_builder(f);
            b.arg(&qp)
                .arg(&ldq)
                .arg(&qsp)
                .arg(&wp)
                .arg(&sp)
                .arg(&yp)
                .arg(&ldy);
            b.arg(&mi).arg(&ni).arg(&ki).arg(&mode).arg(&rs);
            let grid = (
                u32_of(OP, n.div_ceil(128))?,
                u32_of(OP, m.div_ceil(128))?,
                1,
            );
            // SAFETY: matches gemm.cu's gemm_fp8_mma; launched on sm_89+ only.
            unsafe { b.launch(cfg(grid, 256)) }.map_err(drv("gemm_fp8_mma"))?;
            // The quantised copies are freed when the stream reaches this point.
            drop((xq, xs));
            return Ok(());
        }
        let f = self.f("block_gemm")?;
        let mut b = s.launch_builder(f);
        b.arg(&xp)
            .arg(&ldx)
            .arg(&wp)
            .arg(&sp)
            .arg(&w.kind)
            .arg(&yp)
            .arg(&ldy);
        b.arg(&mi).arg(&ni).arg(&ki).arg(&mode).arg(&rs);
        let grid = (u32_of(OP, n.div_ceil(64))?, u32_of(OP, m.div_ceil(64))?, 1);
        // SAFETY: matches gemm.cu's block_gemm.
        unsafe { b.launch(cfg(grid, 256)) }.map_err(drv("block_gemm"))?;
        Ok(())
    }

    /// `y = SiLU(g) ⊙ u` over the first `n` values, in place into `g`'s twin `y`.
    pub fn silu_mul_dev(
        &self,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if g.len() < n || u.len() < n || y.len() < n {
            return Err(shape("cuda silu_mul", "buffers shorter than n"));
        }
        if n == 0 {
            return Ok(());
        }
        let n64 = n as i64;
        let f = self.f("silu_mul")?;
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(g).arg(u).arg(y).arg(&n64);
        // SAFETY: matches activation.cu's silu_mul.
        unsafe { b.launch(cfg((u32_of("silu_mul", n.div_ceil(256))?, 1, 1), 256)) }
            .map_err(drv("silu_mul"))?;
        Ok(())
    }

    /// The grouped expert FFN on device buffers: for group g (rows `ranges[g]` of x), h =
    /// SiLU(x·Wgᵀ) ⊙ x·Wuᵀ, then y[rows] (+)= row_weight · h·Wdᵀ. All experts FP8 or all BF16
    /// and of one size.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_ffn_dev(
        &self,
        x: &CudaSlice<f32>,
        hidden: usize,
        ranges: &[std::ops::Range<usize>],
        experts: &[[&DeviceMatrix; 3]],
        row_weight: Option<&CudaSlice<f32>>,
        accumulate: bool,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "cuda grouped_ffn";
        if ranges.len() != experts.len() {
            return Err(shape(OP, "one expert per group"));
        }
        let rows = x.len() / hidden.max(1);
        let live: Vec<usize> = (0..ranges.len())
            .filter(|&g| !ranges[g].is_empty())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let inter = experts[live[0]][0].rows;
        let kind = experts[live[0]][0].kind;
        let mut range = Vec::with_capacity(2 * live.len());
        let mut tables: [Vec<u64>; 6] = Default::default();
        for &g in &live {
            let [gate, up, down] = experts[g];
            let r = &ranges[g];
            if r.end > rows
                || y.len() < r.end * hidden
                || gate.rows != inter
                || up.rows != inter
                || gate.cols != hidden
                || up.cols != hidden
                || down.rows != hidden
                || down.cols != inter
            {
                return Err(shape(
                    OP,
                    "group rows out of range or experts differ in size",
                ));
            }
            if [gate, up, down].iter().any(|m| m.kind != kind) || kind == 2 {
                return Err(Error::Unsupported {
                    op: OP,
                    detail: "experts must all be FP8 or all BF16".into(),
                });
            }
            range.push(i32_of(OP, r.start)?);
            range.push(i32_of(OP, r.end)?);
            for (j, m) in [gate, up, down].iter().enumerate() {
                tables[2 * j].push(self.ptr(&m.data));
                tables[2 * j + 1].push(self.ptr(&m.scales));
            }
        }
        let dt: Vec<CudaSlice<u64>> = tables.iter().map(|t| self.htod(t)).collect::<Result<_>>()?;
        let dr = self.htod(&range)?;
        let mut dh = self.zeros::<f32>(rows * inter)?;
        let maxr = live.iter().map(|&g| ranges[g].len()).max().unwrap_or(0);
        let (hi, ii) = (i32_of(OP, hidden)?, i32_of(OP, inter)?);
        let ng = live.len() as u32;
        let s = &self.inner.stream;
        let f = self.f("grouped_gate_up")?;
        let mut b = s.launch_builder(f);
        b.arg(x)
            .arg(&dr)
            .arg(&dt[0])
            .arg(&dt[1])
            .arg(&dt[2])
            .arg(&dt[3]);
        b.arg(&kind).arg(&mut dh).arg(&hi).arg(&ii);
        let grid = (
            u32_of(OP, inter.div_ceil(32))?,
            u32_of(OP, maxr.div_ceil(32))?,
            ng,
        );
        // SAFETY: matches moe.cu's grouped_gate_up; the tables hold pointers of live matrices.
        unsafe { b.launch(cfg(grid, 256)) }.map_err(drv("grouped_gate_up"))?;
        let acc = i32::from(accumulate);
        let rw = row_weight.map_or(0u64, |w| self.ptr(w));
        if row_weight.is_some_and(|w| w.len() < rows) {
            return Err(shape(OP, "row_weight length"));
        }
        let f = self.f("grouped_down")?;
        let mut b = s.launch_builder(f);
        b.arg(&dh)
            .arg(&dr)
            .arg(&dt[4])
            .arg(&dt[5])
            .arg(&kind)
            .arg(&rw);
        b.arg(&acc).arg(y).arg(&hi).arg(&ii);
        let grid = (
            u32_of(OP, hidden.div_ceil(32))?,
            u32_of(OP, maxr.div_ceil(32))?,
            ng,
        );
        // SAFETY: matches moe.cu's grouped_down.
        unsafe { b.launch(cfg(grid, 256)) }.map_err(drv("grouped_down"))?;
        Ok(())
    }

    /// A device mirror for a host cache of this shape (contents undefined until written).
    pub fn new_cache(&self, host: &LatentCache) -> Result<DeviceCache> {
        let blocks = host.num_blocks();
        let e = host.kv_lora_rank + host.rope_dim;
        let (dtype, bytes, scales) = match host.data {
            CacheData::F32(_) => (0u8, blocks * MLA_BLOCK * e * 4, 1),
            CacheData::Bf16(_) => (1, blocks * MLA_BLOCK * e * 2, 1),
            CacheData::Fp8 { .. } => (2, blocks * MLA_BLOCK * e, blocks * MLA_BLOCK),
        };
        Ok(DeviceCache {
            blocks,
            rank: host.kv_lora_rank,
            rope: host.rope_dim,
            dtype,
            data: self.zeros(bytes)?,
            scales: self.zeros(scales)?,
        })
    }

    /// Copies the host cache's entries of `pages` positions `start..start + n` to the mirror.
    pub fn cache_write(
        &self,
        dev: &mut DeviceCache,
        host: &LatentCache,
        pages: &[u32],
        start: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "cuda cache_write";
        if !dev.matches(host) {
            return Err(shape(OP, "device cache and host cache differ in shape"));
        }
        let (e, el) = (dev.entry(), dev.elem());
        let mut pos = start;
        while pos < start + n {
            let page = *pages
                .get(pos / MLA_BLOCK)
                .ok_or_else(|| shape(OP, format!("position {pos} beyond the pages")))?
                as usize;
            if page >= dev.blocks {
                return Err(shape(OP, format!("page {page} out of range")));
            }
            let run = (MLA_BLOCK - pos % MLA_BLOCK).min(start + n - pos);
            let slot = page * MLA_BLOCK + pos % MLA_BLOCK;
            let (a, b) = (slot * e, (slot + run) * e);
            let src: &[u8] = match host.data {
                CacheData::F32(d) => as_bytes(&d[a..b]),
                CacheData::Bf16(d) => as_bytes(&d[a..b]),
                CacheData::Fp8 { q, scale } => {
                    let mut sv = dev.scales.slice_mut(slot..slot + run);
                    self.inner
                        .stream
                        .memcpy_htod(&scale[slot..slot + run], &mut sv)
                        .map_err(drv("htod"))?;
                    &q[a..b]
                }
            };
            let mut dv = dev.data.slice_mut(a * el..b * el);
            self.inner
                .stream
                .memcpy_htod(src, &mut dv)
                .map_err(drv("htod"))?;
            pos += run;
        }
        Ok(())
    }

    /// Whether [`Self::mla_attend`] runs a cache of this shape on the tensor-core kernel: a
    /// bf16 cache with rank % 32 == 0, (rank + rope) % 16 == 0, rank + rope ≤ 576, on sm_80+.
    pub fn mla_uses_mma(&self, cache: &DeviceCache) -> bool {
        let (r, p) = (cache.rank, cache.rope);
        cache.dtype == 1
            && r > 0
            && r.is_multiple_of(32)
            && (r + p).is_multiple_of(16)
            && r + p <= 576
            && self.inner.cc >= (8, 0)
    }

    /// Absorbed MLA attention on the device: query row i (heads `[i][h]` of `q_abs` [rows,
    /// heads, rank] and `q_pe` [rows, heads, rope]) attends over the first `lens[i]` tokens of
    /// page-table row `i · table_stride` of `table`; `out` is `[rows, heads, rank]`. A bf16
    /// cache of a supported shape runs on tensor cores (bf16 queries and probabilities, f32
    /// accumulation: its own tolerance); anything else on the f32 kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_attend(
        &self,
        cache: &DeviceCache,
        table: &CudaSlice<i32>,
        table_stride: usize,
        lens: &CudaSlice<i32>,
        rows: usize,
        heads: usize,
        q_abs: &CudaSlice<f32>,
        q_pe: &CudaSlice<f32>,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let mma = self.mla_uses_mma(cache);
        self.mla_attend_with(
            mma,
            cache,
            table,
            table_stride,
            lens,
            rows,
            heads,
            q_abs,
            q_pe,
            scale,
            out,
        )
    }

    /// [`Self::mla_attend`] on the kernel chosen by `mma` (tests and benchmarks compare both).
    #[allow(clippy::too_many_arguments)]
    pub fn mla_attend_with(
        &self,
        mma: bool,
        cache: &DeviceCache,
        table: &CudaSlice<i32>,
        table_stride: usize,
        lens: &CudaSlice<i32>,
        rows: usize,
        heads: usize,
        q_abs: &CudaSlice<f32>,
        q_pe: &CudaSlice<f32>,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "cuda mla";
        let (r, p) = (cache.rank, cache.rope);
        if r > 1024 || p > 128 {
            return Err(Error::Unsupported {
                op: OP,
                detail: format!("rank {r} + rope {p} exceeds 1024 + 128"),
            });
        }
        if q_abs.len() < rows * heads * r
            || q_pe.len() < rows * heads * p
            || out.len() < rows * heads * r
            || lens.len() < rows
        {
            return Err(shape(OP, "query or output shorter than rows × heads"));
        }
        if rows == 0 || heads == 0 {
            return Ok(());
        }
        let (st, hi, ri, pi) = (
            i32_of(OP, table_stride)?,
            i32_of(OP, heads)?,
            i32_of(OP, r)?,
            i32_of(OP, p)?,
        );
        let s = &self.inner.stream;
        if mma {
            if !self.mla_uses_mma(cache) {
                return Err(Error::Unsupported {
                    op: OP,
                    detail: format!("tensor-core MLA for a cache of rank {r} + rope {p}"),
                });
            }
            // Splits of each row's tokens so that the grid fills the device twice over.
            let groups = heads.div_ceil(16);
            let splits = (2 * self.inner.sms).div_ceil(groups * rows).clamp(1, 16);
            let po = self.zeros::<f32>(rows * splits * heads * r)?;
            let pm = self.zeros::<f32>(rows * splits * heads)?;
            let pl = self.zeros::<f32>(rows * splits * heads)?;
            let f = self.f("mla_decode_mma_bf16")?;
            let mut b = s.launch_builder(f);
            b.arg(&cache.data)
                .arg(table)
                .arg(&st)
                .arg(lens)
                .arg(q_abs)
                .arg(q_pe);
            b.arg(&po)
                .arg(&pm)
                .arg(&pl)
                .arg(&hi)
                .arg(&ri)
                .arg(&pi)
                .arg(&scale);
            let grid = (groups as u32, u32_of(OP, rows)?, splits as u32);
            // SAFETY: matches mla.cu's mla_decode_mma_bf16; po/pm/pl hold rows × splits × heads
            // entries; the shape constraints were checked by mla_uses_mma.
            unsafe { b.launch(cfg(grid, 128)) }.map_err(drv("mla_decode_mma"))?;
            let sp = splits as i32;
            let f = self.f("mla_combine_splits")?;
            let mut b = s.launch_builder(f);
            b.arg(&po)
                .arg(&pm)
                .arg(&pl)
                .arg(&sp)
                .arg(out)
                .arg(&hi)
                .arg(&ri);
            // SAFETY: matches mla.cu's mla_combine_splits.
            unsafe { b.launch(cfg((hi as u32, u32_of(OP, rows)?, 1), 128)) }
                .map_err(drv("mla_combine_splits"))?;
            return Ok(());
        }
        let name = match cache.dtype {
            0 => "mla_decode_f32",
            1 => "mla_decode_bf16",
            _ => "mla_decode_fp8",
        };
        let ts = if cache.dtype == 2 {
            self.ptr(&cache.scales)
        } else {
            0u64
        };
        let f = self.f(name)?;
        let mut b = s.launch_builder(f);
        b.arg(&cache.data).arg(&ts).arg(table).arg(&st).arg(lens);
        b.arg(q_abs)
            .arg(q_pe)
            .arg(out)
            .arg(&hi)
            .arg(&ri)
            .arg(&pi)
            .arg(&scale);
        // SAFETY: matches mla.cu's mla_decode_*; the caller's tables index pages below
        // `cache.blocks` (checked where they are built).
        unsafe { b.launch(cfg((hi as u32, u32_of(OP, rows)?, 1), 256)) }
            .map_err(drv("mla_decode"))?;
        Ok(())
    }

    /// Builds the page table and lengths of `seqs` for [`Self::mla_attend`] (checked against
    /// the cache's pages).
    pub fn seq_tables(
        &self,
        seqs: &[SeqPages],
        blocks: usize,
    ) -> Result<(CudaSlice<i32>, usize, CudaSlice<i32>)> {
        const OP: &str = "cuda mla";
        let stride = seqs
            .iter()
            .map(|s| s.len.div_ceil(MLA_BLOCK))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut table = vec![0i32; seqs.len() * stride];
        let mut lens = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let need = s.len.div_ceil(MLA_BLOCK);
            if s.len == 0 || s.pages.len() < need {
                return Err(shape(OP, format!("sequence {i}: {} tokens", s.len)));
            }
            for (j, &pg) in s.pages[..need].iter().enumerate() {
                if pg as usize >= blocks {
                    return Err(shape(OP, format!("page {pg} out of range")));
                }
                table[i * stride + j] = pg as i32;
            }
            lens.push(i32_of(OP, s.len)?);
        }
        Ok((self.htod(&table)?, stride, self.htod(&lens)?))
    }

    /// Times `f` on the stream (milliseconds between events around it).
    pub fn time_ms(&self, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        let s = &self.inner.stream;
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let a = s.record_event(timed).map_err(drv("event"))?;
        f()?;
        let b = s.record_event(timed).map_err(drv("event"))?;
        b.synchronize().map_err(drv("event"))?;
        Ok(a.elapsed_ms(&b).map_err(drv("event"))? as f64)
    }

    /// Device-to-device copy of `bytes`: the bandwidth ceiling (GB/s, counting read + write).
    pub fn copy_gbps(&self, bytes: usize) -> Result<f64> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        let s = self.inner.stream.clone();
        let mut copy = || s.memcpy_dtod(&src, &mut dst).map_err(drv("dtod"));
        copy()?;
        let reps = 20;
        let ms = self.time_ms(|| {
            for _ in 0..reps {
                copy()?;
            }
            Ok(())
        })?;
        Ok(2.0 * bytes as f64 * reps as f64 / (ms * 1e-3) / 1e9)
    }

    /// Dense FP8 `mma` (if `fp8`) or f32 FMA throughput in TFLOP/s, on register operands.
    pub fn peak_tflops(&self, fp8: bool) -> Result<f64> {
        if fp8 && !self.has_fp8_mma() {
            return Err(Error::Unsupported {
                op: "fp8_mma_peak",
                detail: "no FP8 mma before sm_89".into(),
            });
        }
        let blocks = 132 * 16;
        let iters = 4096i32;
        let mut out = self.zeros::<f32>(blocks)?;
        let name = if fp8 { "fp8_mma_peak" } else { "fma_peak" };
        let f = self.f(name)?;
        let s = &self.inner.stream;
        let mut run = || {
            let mut b = s.launch_builder(f);
            b.arg(&mut out).arg(&iters);
            // SAFETY: matches gemm.cu's peak kernels (out holds one value per block).
            unsafe { b.launch(cfg((blocks as u32, 1, 1), 256)) }.map_err(drv(name))?;
            Ok(())
        };
        run()?;
        let ms = self.time_ms(&mut run)?;
        // Per thread-iteration: 8 mma of 16×8×32 per warp (2 flops each) or 8 FMAs.
        let per_iter = if fp8 {
            8.0 * 2.0 * 16.0 * 8.0 * 32.0 / 32.0
        } else {
            8.0 * 2.0
        };
        let flops = blocks as f64 * 256.0 * iters as f64 * per_iter;
        Ok(flops / (ms * 1e-3) / 1e12)
    }

    // ---- Host-slice conveniences (tests compare each kernel with the CPU) ----

    fn down(&self, d: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        self.dtoh(d, &mut out)?;
        Ok(out)
    }

    pub fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let d = w.len();
        if d == 0 || !x.len().is_multiple_of(d) {
            return Err(shape("cuda rms_norm", format!("x {} for d {d}", x.len())));
        }
        let rows = (x.len() / d) as u32;
        let (dx, dw) = (self.htod(x)?, self.htod(w)?);
        let mut dy = self.zeros::<f32>(x.len())?;
        let di = i32_of("cuda rms_norm", d)?;
        let f = self.f("rms_norm")?;
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(&dx).arg(&dw).arg(&mut dy).arg(&di).arg(&eps);
        // SAFETY: argument types and order match norm.cu's rms_norm.
        unsafe { b.launch(cfg((rows, 1, 1), 256)) }.map_err(drv("rms_norm"))?;
        self.down(&dy, x.len())
    }

    pub fn silu_mul(&self, g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
        if g.len() != u.len() {
            return Err(shape("cuda silu_mul", "gate and up differ in length"));
        }
        let (dg, du) = (self.htod(g)?, self.htod(u)?);
        let mut dy = self.zeros::<f32>(g.len())?;
        self.silu_mul_dev(&dg, &du, &mut dy, g.len())?;
        self.down(&dy, g.len())
    }

    /// Rotates `x` (`[tokens, heads, 2·inv_freq.len()]`) in place at `pos[token]`.
    pub fn rope(&self, x: &mut [f32], pos: &[usize], heads: usize, r: &Rope) -> Result<()> {
        let dim = 2 * r.inv_freq.len();
        if x.len() != pos.len() * heads * dim || dim == 0 {
            return Err(shape(
                "cuda rope",
                format!("x {} for {} tokens", x.len(), pos.len()),
            ));
        }
        if pos.is_empty() {
            return Ok(());
        }
        let p: Vec<i32> = pos
            .iter()
            .map(|&v| i32_of("cuda rope", v))
            .collect::<Result<_>>()?;
        let mut dx = self.htod(x)?;
        let (dp, df) = (self.htod(&p)?, self.htod(&r.inv_freq)?);
        let (h, d) = (i32_of("cuda rope", heads)?, i32_of("cuda rope", dim)?);
        let af = r.attention_factor;
        let f = self.f("rope_interleaved")?;
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(&mut dx).arg(&dp).arg(&df).arg(&h).arg(&d).arg(&af);
        let threads = (dim / 2).div_ceil(32) as u32 * 32;
        // SAFETY: matches rope.cu's rope_interleaved.
        unsafe { b.launch(cfg((pos.len() as u32, heads as u32, 1), threads)) }
            .map_err(drv("rope"))?;
        self.dtoh(&dx, x)
    }

    /// y = x · Wᵀ (FP8 with block scales, BF16, F16 or F32 weights), uploading W for this call.
    pub fn matmul(&self, x: &[f32], m: usize, w: &Weight, algo: GemmAlgo) -> Result<Vec<f32>> {
        let (n, k) = (w.rows, w.cols);
        if x.len() != m * k {
            return Err(shape(
                "cuda matmul",
                format!("x {} for m={m}, k={k}", x.len()),
            ));
        }
        let dw = self.upload(w)?;
        let dx = self.htod(x)?;
        let mut dy = self.zeros::<f32>(m * n)?;
        self.gemm(&dx, 0, k, m, &dw, &mut dy, 0, n, Epilogue::Store, algo)?;
        self.down(&dy, m * n)
    }

    /// The grouped expert FFN of [`crate::moe::grouped_ffn`], uploading the experts for this call.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_ffn(
        &self,
        x: &[f32],
        hidden: usize,
        groups: &[Group],
        experts: &[ExpertWeights],
        row_weight: Option<&[f32]>,
        combine: Combine,
        y: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "cuda grouped_ffn";
        if hidden == 0 || !x.len().is_multiple_of(hidden) || y.len() != x.len() {
            return Err(shape(OP, format!("x {}, y {}", x.len(), y.len())));
        }
        let mut mats = Vec::with_capacity(groups.len());
        for g in groups {
            let e = experts
                .get(g.expert)
                .ok_or_else(|| shape(OP, format!("expert {}", g.expert)))?;
            mats.push([
                self.upload(&e.gate)?,
                self.upload(&e.up)?,
                self.upload(&e.down)?,
            ]);
        }
        let refs: Vec<[&DeviceMatrix; 3]> = mats.iter().map(|[a, b, c]| [a, b, c]).collect();
        let ranges: Vec<_> = groups.iter().map(|g| g.rows.clone()).collect();
        let dx = self.htod(x)?;
        let mut dy = self.htod(y)?;
        let dw = match row_weight {
            Some(w) if w.len() == x.len() / hidden => Some(self.htod(w)?),
            Some(_) => return Err(shape(OP, "row_weight length")),
            None => None,
        };
        self.grouped_ffn_dev(
            &dx,
            hidden,
            &ranges,
            &refs,
            dw.as_ref(),
            combine == Combine::Accumulate,
            &mut dy,
        )?;
        self.dtoh(&dy, y)
    }

    /// MLA decode as [`crate::mla::mla_decode`], uploading the cache for this call, on the
    /// tensor-core kernel if `mma` (bf16 caches) or the f32 one; returns `[batch, heads,
    /// kv_lora_rank]`.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_decode(
        &self,
        mma: bool,
        cache: &LatentCache,
        seqs: &[SeqPages],
        heads: usize,
        q_abs: &[f32],
        q_pe: &[f32],
        scale: f32,
    ) -> Result<Vec<f32>> {
        let (r, p, b) = (cache.kv_lora_rank, cache.rope_dim, seqs.len());
        if q_abs.len() != b * heads * r || q_pe.len() != b * heads * p {
            return Err(shape("cuda mla_decode", "query shapes"));
        }
        let mut dev = self.new_cache(cache)?;
        let all: Vec<u32> = (0..cache.num_blocks() as u32).collect();
        self.cache_write(&mut dev, cache, &all, 0, cache.num_blocks() * MLA_BLOCK)?;
        let (table, stride, lens) = self.seq_tables(seqs, dev.blocks)?;
        let (qa, qp) = (self.htod(q_abs)?, self.htod(q_pe)?);
        let mut out = self.zeros::<f32>(b * heads * r)?;
        self.mla_attend_with(
            mma, &dev, &table, stride, &lens, b, heads, &qa, &qp, scale, &mut out,
        )?;
        self.down(&out, b * heads * r)
    }

    /// The noaux_tc router for each row of `logits` (`[tokens, experts]`).
    pub fn noaux_tc(&self, logits: &[f32], bias: &[f32], p: &GateParams) -> Result<Vec<Routing>> {
        const OP: &str = "cuda noaux_tc";
        let e = bias.len();
        if e == 0 || e > 1024 || p.n_group == 0 || p.n_group > 64 || !logits.len().is_multiple_of(e)
        {
            return Err(shape(OP, format!("{} logits, {e} experts", logits.len())));
        }
        let t = logits.len() / e;
        if t == 0 || p.top_k == 0 {
            return Ok(vec![
                Routing {
                    experts: vec![],
                    weights: vec![]
                };
                t
            ]);
        }
        let (dl, db) = (self.htod(logits)?, self.htod(bias)?);
        let mut de = self.zeros::<i32>(t * p.top_k)?;
        let mut dw = self.zeros::<f32>(t * p.top_k)?;
        let args = [e, p.n_group, p.topk_group, p.top_k]
            .map(|v| i32_of(OP, v))
            .into_iter()
            .collect::<Result<Vec<i32>>>()?;
        let norm = i32::from(p.norm_topk_prob);
        let f = self.f("noaux_tc")?;
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(&dl)
            .arg(&db)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&args[3]);
        b.arg(&norm)
            .arg(&p.routed_scaling_factor)
            .arg(&mut de)
            .arg(&mut dw);
        // SAFETY: matches gate.cu's noaux_tc.
        unsafe { b.launch(cfg((t as u32, 1, 1), 256)) }.map_err(drv("noaux_tc"))?;
        let mut ex = vec![0i32; t * p.top_k];
        self.dtoh(&de, &mut ex)?;
        let wt = self.down(&dw, t * p.top_k)?;
        Ok((0..t)
            .map(|i| Routing {
                experts: ex[i * p.top_k..(i + 1) * p.top_k]
                    .iter()
                    .map(|&v| v as usize)
                    .collect(),
                weights: wt[i * p.top_k..(i + 1) * p.top_k].to_vec(),
            })
            .collect())
    }

    /// Softmax (or log-softmax) of each row of `x` (`[rows, n]`).
    pub fn softmax_rows(&self, x: &[f32], n: usize, log: bool) -> Result<Vec<f32>> {
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(shape(
                "cuda softmax",
                format!("{} values, rows of {n}", x.len()),
            ));
        }
        let dx = self.htod(x)?;
        let mut dy = self.zeros::<f32>(x.len())?;
        let (ni, li) = (i32_of("cuda softmax", n)?, i32::from(log));
        let f = self.f("softmax_rows")?;
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(&dx).arg(&mut dy).arg(&ni).arg(&li);
        // SAFETY: matches softmax.cu's softmax_rows.
        unsafe { b.launch(cfg(((x.len() / n) as u32, 1, 1), 256)) }.map_err(drv("softmax"))?;
        self.down(&dy, x.len())
    }

    /// Index of each row's maximum (first on ties).
    pub fn argmax_rows(&self, x: &[f32], n: usize) -> Result<Vec<usize>> {
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(shape(
                "cuda argmax",
                format!("{} values, rows of {n}", x.len()),
            ));
        }
        let rows = x.len() / n;
        let dx = self.htod(x)?;
        let mut dy = self.zeros::<i32>(rows)?;
        let ni = i32_of("cuda argmax", n)?;
        let f = self.f("argmax_rows")?;
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(&dx).arg(&mut dy).arg(&ni);
        // SAFETY: matches softmax.cu's argmax_rows.
        unsafe { b.launch(cfg((rows as u32, 1, 1), 256)) }.map_err(drv("argmax"))?;
        let mut out = vec![0i32; rows];
        self.dtoh(&dy, &mut out)?;
        Ok(out.into_iter().map(|v| v as usize).collect())
    }
}
