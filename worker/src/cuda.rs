//! The CUDA backend (`--device cuda[:N]`, feature `cuda`): the model's operations on an NVIDIA
//! GPU through `shardseek_kernels::cuda`, on the same [`Backend`] interface as the CPU.
//!
//! Every weight is uploaded once, in [`Backend::prepare`], in its stored dtype (FP8 stays FP8
//! with its block scales); the latent cache is mirrored in device memory page by page as the KV
//! pool writes it ([`Backend::latent_written`]), so attention reads device memory only.
//!
//! Activations are host buffers in this version of the interface: an operation that reads
//! weights (projections, per-head projections, MLP, experts) or the cache (MLA decode and
//! prefill) copies its input rows in, runs on the device and copies its output rows back. The
//! cheap element-wise operations (RMSNorm, RoPE, column gathers, adds) run on the CPU, where
//! their operands already are — a round trip to the device would cost more than they do. This
//! keeps the model unforked; device-resident activations are the next step (named in the
//! closing note), and `bench kernels --device cuda` measures the kernels on device buffers.

use crate::backend::{
    Backend, CpuBackend, MlaWeights, MlpWeights, MoeGroup, PrefillShape, PreparedWeight,
    heads_shape, input_err, prefill_shape,
};
use crate::error::{Error, Result};
use crate::weights::{Linear, Store};
use shardseek_kernels::cuda::{
    CudaBackend as Device, DeviceCache, DeviceMatrix, Epilogue, GemmAlgo,
};
use shardseek_kernels::cudarc::driver::CudaSlice;
use shardseek_kernels::mla::{CacheData, LatentCache, SeqPages};
use shardseek_kernels::rope::Rope;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How many latent-cache mirrors are kept (one per layer of each live KV pool); the least
/// recently used goes first when a new pool's layers arrive.
const MAX_MIRRORS: usize = 256;

/// The environment variable choosing the prefill GEMM for FP8 weights: `fp8` (activations
/// quantised per 128 columns, FP8 tensor cores, as DeepSeek-V3's inference does) or `f32`
/// (exact f32 activations; the default, so that results match the CPU's tolerance).
pub const ENV_PREFILL_GEMM: &str = "SHARDSEEK_CUDA_PREFILL_GEMM";

/// One device's mirrors of latent caches, keyed by the host cache's address and length.
#[derive(Default)]
struct Mirrors {
    map: HashMap<(usize, usize), (DeviceCache, u64)>,
    tick: u64,
}

/// The CUDA backend.
pub struct CudaBackend {
    dev: Device,
    ordinal: usize,
    algo: GemmAlgo,
    mirrors: Mutex<Mirrors>,
}

fn key(cache: &LatentCache) -> (usize, usize) {
    match cache.data {
        CacheData::F32(d) => (d.as_ptr() as usize, d.len()),
        CacheData::Bf16(d) => (d.as_ptr() as usize, d.len()),
        CacheData::Fp8 { q, .. } => (q.as_ptr() as usize, q.len()),
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` (compiling the kernels for it), with the prefill GEMM
    /// [`ENV_PREFILL_GEMM`] chooses.
    pub fn new(ordinal: usize) -> Result<Self> {
        let algo = match std::env::var(ENV_PREFILL_GEMM).as_deref() {
            Err(_) | Ok("f32") => GemmAlgo::Exact,
            Ok("fp8") => GemmAlgo::Fp8Activations,
            Ok(other) => {
                return Err(Error::Device(format!(
                    "{ENV_PREFILL_GEMM}={other}: use f32 or fp8"
                )));
            }
        };
        Self::with_algo(ordinal, algo)
    }

    /// Opens CUDA device `ordinal` with prefill GEMMs of `algo`.
    pub fn with_algo(ordinal: usize, algo: GemmAlgo) -> Result<Self> {
        let dev = Device::new(ordinal)
            .map_err(|e| Error::Device(format!("--device cuda:{ordinal}: {e}")))?;
        Ok(Self {
            dev,
            ordinal,
            algo,
            mirrors: Mutex::new(Mirrors::default()),
        })
    }

    /// The kernels' device handle (memory queries, benchmarks).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn mat<'a>(&self, w: &'a PreparedWeight) -> Result<&'a DeviceMatrix> {
        w.device
            .as_ref()
            .and_then(|d| d.downcast_ref::<DeviceMatrix>())
            .ok_or_else(|| {
                Error::Device(format!(
                    "a [{}, {}] weight was not prepared for the CUDA backend",
                    w.rows, w.cols
                ))
            })
    }

    /// `w` with its device copy (uploaded now if it has none).
    fn upload(&self, mut w: PreparedWeight) -> Result<PreparedWeight> {
        if w.device.is_none() {
            let m = self.dev.upload(&w.view())?;
            w.device = Some(Arc::new(m));
        }
        Ok(w)
    }

    fn down(&self, d: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        Ok(self.dev.dtoh(d, out)?)
    }

    /// Per-head products on device buffers: head h of row r reads `ws[h].cols` values at
    /// `(r·heads + h)·x_stride + x_off` of `x` and writes its `ws[h].rows` outputs at column
    /// offset Σ rows of earlier heads of the `y_stride`-wide row r of `y`.
    #[allow(clippy::too_many_arguments)]
    fn heads_dev(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        heads: usize,
        x_stride: usize,
        x_off: usize,
        ws: &[PreparedWeight],
        y: &mut CudaSlice<f32>,
        y_stride: usize,
    ) -> Result<()> {
        let mut off = 0;
        for (h, w) in ws.iter().enumerate() {
            self.dev.gemm(
                x,
                h * x_stride + x_off,
                heads * x_stride,
                rows,
                self.mat(w)?,
                y,
                off,
                y_stride,
                Epilogue::Store,
                self.algo,
            )?;
            off += w.rows;
        }
        Ok(())
    }

    /// The device mirror of `cache` (marked as just used), and whether it was created now
    /// (contents undefined); the least recently used mirror goes when [`MAX_MIRRORS`] are held.
    fn mirror<'m>(
        &self,
        m: &'m mut Mirrors,
        cache: &LatentCache,
    ) -> Result<(&'m mut DeviceCache, bool)> {
        m.tick += 1;
        let (k, tick) = (key(cache), m.tick);
        let fresh = !m.map.get(&k).is_some_and(|(d, _)| d.matches(cache));
        if fresh {
            let d = self.dev.new_cache(cache)?;
            if m.map.len() >= MAX_MIRRORS
                && let Some(old) = m.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k)
            {
                m.map.remove(&old);
            }
            m.map.insert(k, (d, tick));
        }
        let entry = m
            .map
            .get_mut(&k)
            .ok_or_else(|| Error::Device("latent-cache mirror missing".into()))?;
        entry.1 = tick;
        Ok((&mut entry.0, fresh))
    }

    /// Runs `f` on the device mirror of `cache`, creating it (and copying the pages `seqs`
    /// read) if this cache was never written through [`Backend::latent_written`].
    fn with_mirror<T>(
        &self,
        cache: &LatentCache,
        seqs: &[SeqPages],
        f: impl FnOnce(&DeviceCache) -> Result<T>,
    ) -> Result<T> {
        let mut m = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        let (dc, fresh) = self.mirror(&mut m, cache)?;
        if fresh {
            for s in seqs {
                self.dev.cache_write(dc, cache, s.pages, 0, s.len)?;
            }
        }
        f(dc)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        let (a, b) = self.dev.compute_capability();
        format!(
            "cuda:{} ({}, sm_{a}{b}, prefill GEMM {})",
            self.ordinal,
            self.dev.device_name(),
            match self.algo {
                GemmAlgo::Exact => "f32",
                GemmAlgo::Fp8Activations => "fp8",
            }
        )
    }

    fn prepare(&self, store: &Arc<Store>, w: &Linear) -> Result<PreparedWeight> {
        self.upload(PreparedWeight::mapped(store, w))
    }

    fn adopt(&self, w: PreparedWeight) -> Result<PreparedWeight> {
        let mut w = w;
        w.device = None;
        self.upload(w)
    }

    fn prepare_kv_b(
        &self,
        kv_b: PreparedWeight,
        heads: usize,
        nope: usize,
        v: usize,
    ) -> Result<MlaWeights> {
        let split = CpuBackend::EXACT.prepare_kv_b(kv_b, heads, nope, v)?;
        Ok(MlaWeights {
            w_uk_t: split
                .w_uk_t
                .into_iter()
                .map(|w| self.upload(w))
                .collect::<Result<_>>()?,
            w_uv: split
                .w_uv
                .into_iter()
                .map(|w| self.upload(w))
                .collect::<Result<_>>()?,
            kv_b: self.upload(split.kv_b)?,
        })
    }

    fn embed(&self, table: &PreparedWeight, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        // A row lookup: read from the mapped checkpoint where the activations live.
        CpuBackend::EXACT.embed(table, tokens, out)
    }

    fn linear(&self, x: &[f32], m: usize, w: &PreparedWeight, y: &mut [f32]) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        if x.len() != m * k || y.len() != m * n {
            return Err(input_err(
                "linear",
                format!("x {}, y {} for {m} × [{n}, {k}]", x.len(), y.len()),
            ));
        }
        let dx = self.dev.htod(x)?;
        let mut dy = self.dev.zeros::<f32>(m * n)?;
        self.dev.gemm(
            &dx,
            0,
            k,
            m,
            self.mat(w)?,
            &mut dy,
            0,
            n,
            Epilogue::Store,
            self.algo,
        )?;
        self.down(&dy, y)
    }

    fn linear_heads(
        &self,
        x: &[f32],
        rows: usize,
        x_stride: usize,
        x_off: usize,
        ws: &[PreparedWeight],
        y: &mut [f32],
    ) -> Result<()> {
        let (heads, y_stride) = heads_shape(x, rows, x_stride, x_off, ws, y)?;
        let dx = self.dev.htod(x)?;
        let mut dy = self.dev.zeros::<f32>(y.len())?;
        self.heads_dev(&dx, rows, heads, x_stride, x_off, ws, &mut dy, y_stride)?;
        self.down(&dy, y)
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) -> Result<()> {
        CpuBackend::EXACT.rms_norm(x, stride, w, eps)
    }

    fn rope(
        &self,
        rope: &Rope,
        x: &mut [f32],
        heads: usize,
        stride: usize,
        off: usize,
        positions: &[usize],
    ) -> Result<()> {
        CpuBackend::EXACT.rope(rope, x, heads, stride, off, positions)
    }

    fn gather_cols(
        &self,
        src: &[f32],
        stride: usize,
        off: usize,
        len: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        CpuBackend::EXACT.gather_cols(src, stride, off, len, dst)
    }

    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()> {
        CpuBackend::EXACT.add(x, y)
    }

    fn latent_written(
        &self,
        cache: &LatentCache,
        pages: &[u32],
        start: usize,
        n: usize,
    ) -> Result<()> {
        let mut m = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        let (dc, _) = self.mirror(&mut m, cache)?;
        Ok(self.dev.cache_write(dc, cache, pages, start, n)?)
    }

    fn mla_decode(
        &self,
        cache: &LatentCache,
        seqs: &[SeqPages],
        heads: usize,
        q_abs: &[f32],
        q_pe: &[f32],
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let (r, p, b) = (cache.kv_lora_rank, cache.rope_dim, seqs.len());
        if q_abs.len() != b * heads * r || q_pe.len() != b * heads * p || out.len() != q_abs.len() {
            return Err(input_err(
                "mla_decode",
                format!("queries for {b} sequences × {heads} heads"),
            ));
        }
        if b == 0 {
            return Ok(());
        }
        let (qa, qp) = (self.dev.htod(q_abs)?, self.dev.htod(q_pe)?);
        let mut dout = self.dev.zeros::<f32>(out.len())?;
        self.with_mirror(cache, seqs, |dc| {
            let (table, stride, lens) = self.dev.seq_tables(seqs, dc.blocks)?;
            Ok(self.dev.mla_attend(
                dc, &table, stride, &lens, b, heads, &qa, &qp, scale, &mut dout,
            )?)
        })?;
        self.down(&dout, out)
    }

    fn mla_prefill(
        &self,
        cache: &LatentCache,
        seq: &SeqPages,
        start: usize,
        heads: usize,
        q: &[f32],
        w: &MlaWeights,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let (r, rope) = (cache.kv_lora_rank, cache.rope_dim);
        let PrefillShape { nope, v, qk, chunk } = prefill_shape(cache, heads, q, w)?;
        if out.len() != chunk * heads * v || start + chunk != seq.len {
            return Err(input_err(
                "mla_prefill",
                format!(
                    "out {} for {chunk} rows; chunk at {start} of a {}-token sequence",
                    out.len(),
                    seq.len
                ),
            ));
        }
        // Absorbed form on the device: q̃ = W_UKᵀ·q_nope per head, row i attends causally over
        // the first start + i + 1 tokens, then W_UV.
        let dq = self.dev.htod(q)?;
        let mut q_abs = self.dev.zeros::<f32>(chunk * heads * r)?;
        self.heads_dev(&dq, chunk, heads, qk, 0, &w.w_uk_t, &mut q_abs, heads * r)?;
        let mut pe = vec![0f32; chunk * heads * rope];
        CpuBackend::EXACT.gather_cols(q, qk, nope, rope, &mut pe)?;
        let q_pe = self.dev.htod(&pe)?;
        let lens: Vec<i32> = (0..chunk).map(|i| (start + i + 1) as i32).collect();
        let dl = self.dev.htod(&lens)?;
        let mut ctx = self.dev.zeros::<f32>(chunk * heads * r)?;
        self.with_mirror(cache, std::slice::from_ref(seq), |dc| {
            let (table, _, _) = self.dev.seq_tables(std::slice::from_ref(seq), dc.blocks)?;
            Ok(self.dev.mla_attend(
                dc, &table, 0, &dl, chunk, heads, &q_abs, &q_pe, scale, &mut ctx,
            )?)
        })?;
        let mut dout = self.dev.zeros::<f32>(out.len())?;
        self.heads_dev(&ctx, chunk, heads, r, 0, &w.w_uv, &mut dout, heads * v)?;
        self.down(&dout, out)
    }

    fn mlp(
        &self,
        x: &[f32],
        m: usize,
        w: &MlpWeights,
        accumulate: bool,
        y: &mut [f32],
    ) -> Result<()> {
        let (inter, hidden) = (w.gate.rows, w.gate.cols);
        if x.len() != m * hidden || y.len() != m * w.down.rows {
            return Err(input_err(
                "mlp",
                format!("x {}, y {} for {m} rows", x.len(), y.len()),
            ));
        }
        let dx = self.dev.htod(x)?;
        let mut g = self.dev.zeros::<f32>(m * inter)?;
        let mut u = self.dev.zeros::<f32>(m * inter)?;
        let st = Epilogue::Store;
        let (wg, wu, wd) = (self.mat(&w.gate)?, self.mat(&w.up)?, self.mat(&w.down)?);
        self.dev
            .gemm(&dx, 0, hidden, m, wg, &mut g, 0, inter, st, self.algo)?;
        self.dev
            .gemm(&dx, 0, hidden, m, wu, &mut u, 0, inter, st, self.algo)?;
        let mut h = self.dev.zeros::<f32>(m * inter)?;
        self.dev.silu_mul_dev(&g, &u, &mut h, m * inter)?;
        let n = w.down.rows;
        let (mut dy, epi) = if accumulate {
            (self.dev.htod(y)?, Epilogue::Accumulate(None))
        } else {
            (self.dev.zeros::<f32>(m * n)?, Epilogue::Store)
        };
        self.dev
            .gemm(&h, 0, inter, m, wd, &mut dy, 0, n, epi, self.algo)?;
        self.down(&dy, y)
    }

    fn moe(
        &self,
        x: &[f32],
        hidden: usize,
        groups: &[MoeGroup<'_>],
        row_weight: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        if hidden == 0 || x.len() != y.len() || row_weight.len() * hidden != x.len() {
            return Err(input_err(
                "moe",
                format!(
                    "x {}, y {}, {} row weights",
                    x.len(),
                    y.len(),
                    row_weight.len()
                ),
            ));
        }
        let mut mats = Vec::with_capacity(groups.len());
        for g in groups {
            mats.push([
                self.mat(&g.mlp.gate)?,
                self.mat(&g.mlp.up)?,
                self.mat(&g.mlp.down)?,
            ]);
        }
        let dx = self.dev.htod(x)?;
        let mut dy = self.dev.htod(y)?;
        let dw = self.dev.htod(row_weight)?;
        // One grouped pass per weight dtype and expert size (a BF16 shared expert beside FP8
        // routed experts runs in its own pass); groups cover disjoint rows.
        let mut done = vec![false; groups.len()];
        for i in 0..groups.len() {
            if done[i] {
                continue;
            }
            let like = |j: usize| {
                mats[j][0].is_fp8() == mats[i][0].is_fp8() && mats[j][0].rows == mats[i][0].rows
            };
            let pick: Vec<usize> = (i..groups.len()).filter(|&j| !done[j] && like(j)).collect();
            let ranges: Vec<_> = pick.iter().map(|&j| groups[j].rows.clone()).collect();
            let ex: Vec<[&DeviceMatrix; 3]> = pick.iter().map(|&j| mats[j]).collect();
            self.dev
                .grouped_ffn_dev(&dx, hidden, &ranges, &ex, Some(&dw), false, &mut dy)?;
            for j in pick {
                done[j] = true;
            }
        }
        self.down(&dy, y)
    }
}
