//! The compute interface between the model and the kernels (DESIGN.md §5, STYLE.md rule 16).
//!
//! The model says *what* a layer does — project, normalise, rotate, attend over the paged
//! latent cache, run the experts — through the coarse operations of [`Backend`]; a backend
//! says *how*. [`CpuBackend`] is the kernels crate. A CUDA backend implements the same trait:
//! weights reach a backend only through [`Backend::prepare`] / [`Backend::prepare_kv_b`], so it
//! can place them where it computes, and the model never names a device.
//!
//! Weights are prepared once at load. Checkpoint matrices stay in their stored dtype (FP8 stays
//! FP8 with its block scales, mapped from the file, not copied). MLA's `kv_b` is split into
//! per-head W_UKᵀ (`[kv_lora_rank, qk_nope]`, for the absorbed query) and W_UV
//! (`[v_head_dim, kv_lora_rank]`, applied to the attention's latent output): W_UV is a row
//! slice of `kv_b` and stays mapped; W_UKᵀ is a transposed copy in the stored dtype (FP8 codes
//! with transposed block scales when the head's rows start on a 128-row scale block, as in
//! DeepSeek-V3; exact f32 otherwise).
//!
//! Activations are host f32 buffers in this version of the interface: the CPU backend computes
//! on them in place, and a device backend would stage them (the next step for CUDA is device
//! buffers behind the same operations).

use crate::error::{Error, Result};
use crate::weights::{Linear, Store};
use rayon::prelude::*;
use shardseek_kernels::gemm::{Activations, Compute, Epilogue, matmul_with, silu_mul_with};
use shardseek_kernels::mla::{
    LatentCache, SeqPages, mla_decode, mla_prefill, mla_prefill_expanded, prefer_expanded,
};
use shardseek_kernels::moe::{Combine, ExpertWeights, Group, grouped_ffn_with};
use shardseek_kernels::norm::rms_norm_inplace;
use shardseek_kernels::pool::parallel_for;
use shardseek_kernels::rope::Rope;
use shardseek_kernels::scratch;
use shardseek_kernels::weight::{FP8_BLOCK, Weight, WeightData};
pub use shardseek_proto::cluster_config::Device;
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// A weight matrix prepared for a backend.
#[derive(Clone)]
pub struct PreparedWeight {
    pub rows: usize,
    pub cols: usize,
    stored: Stored,
    /// The backend's own copy (a device backend's uploaded matrix), which only that backend
    /// reads; the host form above stays available (mapped, so it costs no memory until read).
    pub(crate) device: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for PreparedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match (&self.stored, self.view().data) {
            (Stored::Mapped { .. }, WeightData::Fp8E4m3 { .. }) => "mapped fp8",
            (Stored::Mapped { .. }, _) => "mapped",
            (Stored::Owned(_), WeightData::Fp8E4m3 { .. }) => "owned fp8",
            (Stored::Owned(_), _) => "owned",
        };
        let dev = if self.device.is_some() {
            " + device copy"
        } else {
            ""
        };
        write!(
            f,
            "PreparedWeight[{}, {}] ({kind}{dev})",
            self.rows, self.cols
        )
    }
}

#[derive(Clone)]
enum Stored {
    /// Rows `row0..row0+rows` of a matrix mapped from the checkpoint.
    Mapped {
        store: Arc<Store>,
        linear: Linear,
        row0: usize,
    },
    /// A matrix built at load (transposed or dequantised).
    Owned(Owned),
}

#[derive(Clone)]
enum Owned {
    F32(Vec<u8>),
    Bf16(Vec<u8>),
    F16(Vec<u8>),
    Fp8 { q: Vec<u8>, scale_inv: Vec<f32> },
}

impl PreparedWeight {
    /// The matrix as the kernels see it.
    pub fn view(&self) -> Weight<'_> {
        match &self.stored {
            Stored::Mapped {
                store,
                linear,
                row0,
            } => {
                let w = linear.weight(store);
                if *row0 == 0 && self.rows == w.rows {
                    return w;
                }
                let (r0, n, k) = (*row0, self.rows, self.cols);
                let data = match w.data {
                    WeightData::F32(b) => WeightData::F32(&b[r0 * k * 4..(r0 + n) * k * 4]),
                    WeightData::Bf16(b) => WeightData::Bf16(&b[r0 * k * 2..(r0 + n) * k * 2]),
                    WeightData::F16(b) => WeightData::F16(&b[r0 * k * 2..(r0 + n) * k * 2]),
                    WeightData::Fp8E4m3 { q, scale_inv } => {
                        // Only built with row0 on a scale-block boundary (see `rows_of`).
                        let kb = k.div_ceil(FP8_BLOCK);
                        let s0 = r0 / FP8_BLOCK * kb;
                        WeightData::Fp8E4m3 {
                            q: &q[r0 * k..(r0 + n) * k],
                            scale_inv: &scale_inv[s0..s0 + n.div_ceil(FP8_BLOCK) * kb],
                        }
                    }
                };
                Weight {
                    rows: n,
                    cols: k,
                    data,
                }
            }
            Stored::Owned(o) => {
                let data = match o {
                    Owned::F32(b) => WeightData::F32(b),
                    Owned::Bf16(b) => WeightData::Bf16(b),
                    Owned::F16(b) => WeightData::F16(b),
                    Owned::Fp8 { q, scale_inv } => WeightData::Fp8E4m3 { q, scale_inv },
                };
                Weight {
                    rows: self.rows,
                    cols: self.cols,
                    data,
                }
            }
        }
    }

    /// A checkpoint matrix read in place from the mapping.
    pub(crate) fn mapped(store: &Arc<Store>, w: &Linear) -> Self {
        PreparedWeight {
            rows: w.rows,
            cols: w.cols,
            stored: Stored::Mapped {
                store: store.clone(),
                linear: w.clone(),
                row0: 0,
            },
            device: None,
        }
    }

    /// Bytes the kernels read to use this matrix once (weights plus scales).
    pub fn stored_bytes(&self) -> usize {
        self.view().stored_bytes()
    }

    /// This matrix quantised to FP8 e4m3 with 128×128 block scales (DeepSeek-V3's layout; see
    /// `kernels::fp8::quantize_blocks`), as an owned host matrix with no device copy: pass it
    /// to [`Backend::adopt`]. An FP8 matrix is returned as it is.
    pub fn to_fp8_blocks(&self) -> PreparedWeight {
        let w = self.view();
        if matches!(w.data, WeightData::Fp8E4m3 { .. }) {
            return self.clone();
        }
        let (q, scale_inv) = shardseek_kernels::fp8::quantize_blocks(&w);
        PreparedWeight {
            rows: self.rows,
            cols: self.cols,
            stored: Stored::Owned(Owned::Fp8 { q, scale_inv }),
            device: None,
        }
    }

    /// Rows `row0..row0+rows`: a view when the stored layout allows (FP8 needs the start on a
    /// scale block), otherwise an exact f32 copy.
    pub(crate) fn rows_of(&self, row0: usize, rows: usize) -> PreparedWeight {
        let w = self.view();
        let aligned =
            !matches!(w.data, WeightData::Fp8E4m3 { .. }) || row0.is_multiple_of(FP8_BLOCK);
        if let (
            Stored::Mapped {
                store,
                linear,
                row0: base,
            },
            true,
        ) = (&self.stored, aligned)
            && base.is_multiple_of(FP8_BLOCK)
        {
            return PreparedWeight {
                rows,
                cols: self.cols,
                stored: Stored::Mapped {
                    store: store.clone(),
                    linear: linear.clone(),
                    row0: base + row0,
                },
                device: None,
            };
        }
        let mut bytes = Vec::with_capacity(rows * self.cols * 4);
        let mut row = vec![0f32; self.cols];
        for r in row0..row0 + rows {
            w.dequant_row_into(r, 0, &mut row);
            bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        }
        PreparedWeight {
            rows,
            cols: self.cols,
            stored: Stored::Owned(Owned::F32(bytes)),
            device: None,
        }
    }

    /// The transpose of rows `row0..row0+rows` (`[cols, rows]`), in the stored dtype when
    /// exact: 16-bit values are moved as they are; FP8 codes move with their block scales when
    /// `row0` starts a scale block; anything else becomes exact f32.
    pub(crate) fn transposed_rows(&self, row0: usize, rows: usize) -> PreparedWeight {
        let w = self.view();
        let k = self.cols;
        let move16 = |b: &[u8]| {
            let mut out = vec![0u8; rows * k * 2];
            for i in 0..rows {
                for c in 0..k {
                    let src = ((row0 + i) * k + c) * 2;
                    let dst = (c * rows + i) * 2;
                    out[dst..dst + 2].copy_from_slice(&b[src..src + 2]);
                }
            }
            out
        };
        let owned = match w.data {
            WeightData::Bf16(b) => Owned::Bf16(move16(b)),
            WeightData::F16(b) => Owned::F16(move16(b)),
            WeightData::Fp8E4m3 { q, scale_inv } if row0.is_multiple_of(FP8_BLOCK) => {
                let mut codes = vec![0u8; rows * k];
                for i in 0..rows {
                    for c in 0..k {
                        codes[c * rows + i] = q[(row0 + i) * k + c];
                    }
                }
                let (kb, ib) = (k.div_ceil(FP8_BLOCK), rows.div_ceil(FP8_BLOCK));
                let mut scales = vec![0f32; kb * ib];
                for cb in 0..kb {
                    for b in 0..ib {
                        scales[cb * ib + b] = scale_inv[(row0 / FP8_BLOCK + b) * kb + cb];
                    }
                }
                Owned::Fp8 {
                    q: codes,
                    scale_inv: scales,
                }
            }
            _ => {
                let mut vals = vec![0f32; rows * k];
                let mut row = vec![0f32; k];
                for i in 0..rows {
                    w.dequant_row_into(row0 + i, 0, &mut row);
                    for (c, v) in row.iter().enumerate() {
                        vals[c * rows + i] = *v;
                    }
                }
                Owned::F32(vals.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
        };
        PreparedWeight {
            rows: k,
            cols: rows,
            stored: Stored::Owned(owned),
            device: None,
        }
    }
}

/// kv_b split per head for the absorbed form, plus the whole matrix for the expanded form.
#[derive(Clone, Debug)]
pub struct MlaWeights {
    /// `[heads]` of W_UKᵀ `[kv_lora_rank, qk_nope_head_dim]`.
    pub w_uk_t: Vec<PreparedWeight>,
    /// `[heads]` of W_UV `[v_head_dim, kv_lora_rank]`.
    pub w_uv: Vec<PreparedWeight>,
    /// `kv_b` itself, `[heads·(nope+v), kv_lora_rank]`: decompresses K_nope and V of a chunk.
    pub kv_b: PreparedWeight,
}

/// An MLP's projections as a backend holds them (dense layer, shared or routed expert).
#[derive(Clone, Debug)]
pub struct MlpWeights {
    pub gate: PreparedWeight,
    pub up: PreparedWeight,
    pub down: PreparedWeight,
}

impl MlpWeights {
    /// Bytes of the three matrices and their scales.
    pub fn stored_bytes(&self) -> usize {
        self.gate.stored_bytes() + self.up.stored_bytes() + self.down.stored_bytes()
    }

    fn experts(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            gate: self.gate.view(),
            up: self.up.view(),
            down: self.down.view(),
        }
    }
}

/// One group of rows for [`Backend::moe`]: rows `rows` (of the sorted input) go through
/// `mlp`.
pub struct MoeGroup<'a> {
    pub mlp: &'a MlpWeights,
    pub rows: std::ops::Range<usize>,
}

/// The coarse operations the model is written in. Buffers are row-major f32.
pub trait Backend: Send + Sync {
    /// What runs the operations (for logs and benchmarks), e.g. `cpu (avx2+fma)`.
    fn name(&self) -> String;

    /// Prepares a checkpoint matrix for this backend (once, at load).
    fn prepare(&self, store: &Arc<Store>, w: &Linear) -> Result<PreparedWeight>;

    /// Takes a matrix built at load (e.g. [`PreparedWeight::to_fp8_blocks`]) into this
    /// backend: a device backend uploads it; the CPU uses it as it is.
    fn adopt(&self, w: PreparedWeight) -> Result<PreparedWeight> {
        Ok(w)
    }

    /// Splits MLA's `kv_b` (`[heads·(nope+v), rank]`) into per-head W_UKᵀ and W_UV.
    fn prepare_kv_b(
        &self,
        kv_b: PreparedWeight,
        heads: usize,
        nope: usize,
        v: usize,
    ) -> Result<MlaWeights>;

    /// `out[i] = table[tokens[i]]` (embedding rows, dequantised).
    fn embed(&self, table: &PreparedWeight, tokens: &[u32], out: &mut [f32]) -> Result<()>;

    /// `y = x · Wᵀ` for `m` rows.
    fn linear(&self, x: &[f32], m: usize, w: &PreparedWeight, y: &mut [f32]) -> Result<()>;

    /// Per-head projection: x is `[rows, heads, x_stride]`; head h of row r reads
    /// `ws[h].cols` values at offset `x_off` and writes `ws[h].rows` values into y
    /// (`[rows, heads, ws[h].rows]`).
    fn linear_heads(
        &self,
        x: &[f32],
        rows: usize,
        x_stride: usize,
        x_off: usize,
        ws: &[PreparedWeight],
        y: &mut [f32],
    ) -> Result<()>;

    /// RMSNorm of the first `w.len()` values of every `stride`-long row of x, in place.
    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) -> Result<()>;

    /// Rotates, for every row r (`[rows, heads, stride]`), the `rope_dim` values at `off` of
    /// each head by position `positions[r]`.
    fn rope(
        &self,
        rope: &Rope,
        x: &mut [f32],
        heads: usize,
        stride: usize,
        off: usize,
        positions: &[usize],
    ) -> Result<()>;

    /// Copies `len` values at `off` of every `stride`-long row of `src` into the rows of
    /// `dst` (`[rows, len]`).
    fn gather_cols(
        &self,
        src: &[f32],
        stride: usize,
        off: usize,
        len: usize,
        dst: &mut [f32],
    ) -> Result<()>;

    /// `x += y`.
    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()>;

    /// MLA decode, absorbed form, one query token per sequence (see `kernels::mla`).
    #[allow(clippy::too_many_arguments)]
    fn mla_decode(
        &self,
        cache: &LatentCache,
        seqs: &[SeqPages],
        heads: usize,
        q_abs: &[f32],
        q_pe: &[f32],
        scale: f32,
        out: &mut [f32],
    ) -> Result<()>;

    /// MLA over a chunk of one sequence whose latents are in the cache (causal): `q` is
    /// `[chunk, heads, nope + rope]` (q_pe rotated), `out` `[chunk, heads, v_head_dim]`, the
    /// attention output after W_UV. The backend picks the form: expanded (decompress K/V of
    /// the context with kv_b, attend per head) or absorbed (attend over the latents), by
    /// `kernels::mla::prefer_expanded` on the CPU.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    /// The entries of positions `start..start + n` of a sequence (pages `pages`) were just
    /// written to `cache` (by the KV pool, on the host). A backend that computes attention
    /// elsewhere copies them to its own mirror of the cache; the CPU reads the host cache.
    fn latent_written(
        &self,
        cache: &LatentCache,
        pages: &[u32],
        start: usize,
        n: usize,
    ) -> Result<()> {
        let _ = (cache, pages, start, n);
        Ok(())
    }

    /// `y (+)= down(SiLU(gate·x) ⊙ up·x)` for `m` rows (dense layer, shared expert).
    fn mlp(
        &self,
        x: &[f32],
        m: usize,
        w: &MlpWeights,
        accumulate: bool,
        y: &mut [f32],
    ) -> Result<()>;

    /// Experts over rows sorted by expert, in one grouped pass: gate+up with the SiLU·mul
    /// epilogue, then down with each row scaled by `row_weight` and stored into `y` (rows not
    /// in any group are left as they are).
    fn moe(
        &self,
        x: &[f32],
        hidden: usize,
        groups: &[MoeGroup<'_>],
        row_weight: &[f32],
        y: &mut [f32],
    ) -> Result<()>;
}

/// The backend for `device`: the CPU kernels, or a CUDA device (a build with the `cuda`
/// feature and a GPU), with activations `act` (`--activation-dtype`). Fails with a clear
/// error, never a panic, when the device is missing or cannot run `act`.
pub fn for_device(device: Device, act: Activations) -> Result<Arc<dyn Backend>> {
    if act != Activations::F32 && device != Device::Cpu {
        return Err(Error::Device(format!(
            "--activation-dtype {}: a CPU setting; the CUDA backend multiplies f32 activations",
            act.name()
        )));
    }
    match device {
        Device::Cpu => Ok(Arc::new(CpuBackend::with_activations(act)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(Arc::new(crate::cuda::CudaBackend::new(n as usize)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(Error::Device(format!(
            "--device cuda:{n}: this binary was built without CUDA support (cargo build --features cuda)"
        ))),
    }
}

/// Total memory of a GPU `device` in bytes (for `--gpu-memory-utilization`).
pub fn device_memory(device: Device) -> Result<usize> {
    match device {
        Device::Cpu => Err(Error::Device("cpu has no device memory to size".into())),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(shardseek_kernels::cuda::device_memory(n as usize)?.1),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(Error::Device(format!(
            "--device cuda:{n}: this binary was built without CUDA support (cargo build --features cuda)"
        ))),
    }
}

/// The CPU backend: every operation is a `shardseek_kernels` kernel on the one thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    /// How the GEMMs compute; `None`: the detected instruction set, exact f32 activations.
    compute: Option<Compute>,
}

impl CpuBackend {
    /// Exact (f32) activations on the detected instruction set.
    pub const EXACT: CpuBackend = CpuBackend { compute: None };

    /// The process-wide CPU backend, exact.
    pub fn shared() -> Arc<dyn Backend> {
        Arc::new(CpuBackend::EXACT)
    }

    /// The CPU backend with activations `act`; bf16 needs AVX512-BF16 (an error naming the
    /// flag otherwise, rather than a setting that would be silently exact).
    pub fn with_activations(act: Activations) -> Result<Self> {
        if act == Activations::F32 {
            return Ok(CpuBackend::EXACT);
        }
        let c = Compute::detected(act)
            .map_err(|e| Error::Device(format!("--activation-dtype {}: {e}", act.name())))?;
        Ok(CpuBackend { compute: Some(c) })
    }

    fn compute(&self) -> Compute {
        self.compute
            .unwrap_or_else(|| shardseek_kernels::cpu::isa().into())
    }
}

pub(crate) fn input_err(op: &str, detail: String) -> Error {
    Error::Input(format!("{op}: {detail}"))
}

/// Checks the operands of [`Backend::linear_heads`]; returns (heads, y's row stride).
pub(crate) fn heads_shape(
    x: &[f32],
    rows: usize,
    x_stride: usize,
    x_off: usize,
    ws: &[PreparedWeight],
    y: &[f32],
) -> Result<(usize, usize)> {
    let heads = ws.len();
    let y_stride: usize = ws.iter().map(|w| w.rows).sum();
    if x.len() != rows * heads * x_stride
        || y.len() != rows * y_stride
        || ws.iter().any(|w| x_off + w.cols > x_stride)
    {
        return Err(input_err(
            "linear_heads",
            format!(
                "x {}, y {} for {rows} rows × {heads} heads",
                x.len(),
                y.len()
            ),
        ));
    }
    Ok((heads, y_stride))
}

/// The dimensions of an [`Backend::mla_prefill`] call, checked.
pub(crate) struct PrefillShape {
    /// qk_nope_head_dim (W_UKᵀ's columns).
    pub nope: usize,
    /// v_head_dim (W_UV's rows).
    pub v: usize,
    /// nope + rope: one head's query width.
    pub qk: usize,
    /// Query rows in the chunk.
    pub chunk: usize,
}

pub(crate) fn prefill_shape(
    cache: &LatentCache,
    heads: usize,
    q: &[f32],
    w: &MlaWeights,
) -> Result<PrefillShape> {
    let (nope, v) = match (w.w_uk_t.first(), w.w_uv.first()) {
        (Some(uk), Some(uv)) if w.w_uk_t.len() == heads && w.w_uv.len() == heads => {
            (uk.cols, uv.rows)
        }
        _ => {
            return Err(input_err(
                "mla_prefill",
                format!("MLA weights of {} heads for {heads}", w.w_uk_t.len()),
            ));
        }
    };
    let qk = nope + cache.rope_dim;
    if heads == 0 || !q.len().is_multiple_of(heads * qk) {
        return Err(input_err(
            "mla_prefill",
            format!("q {} for {heads} heads of {qk}", q.len()),
        ));
    }
    Ok(PrefillShape {
        nope,
        v,
        qk,
        chunk: q.len() / (heads * qk),
    })
}

/// The output of [`Backend::linear_heads`], shared by the heads' tasks, each writing only its
/// own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint ranges through it (see `OutPtr::write`) while the owner waits.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Copies `src` to `off..off + src.len()` of the output.
    ///
    /// # Safety
    /// The range must lie inside the output and no other task may write it concurrently.
    unsafe fn write(self, off: usize, src: &[f32]) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(off), src.len()) }
    }
}

/// The grouped-MoE call's expert and group lists, kept per thread between calls (the expert
/// views borrow one call's weights, so between calls the list is kept empty under another
/// lifetime; see [`scratch::recycle`]).
#[derive(Default)]
struct MoeLists {
    experts: Vec<ExpertWeights<'static>>,
    groups: Vec<Group>,
}

thread_local! {
    static MOE_LISTS: RefCell<MoeLists> = RefCell::new(MoeLists::default());
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        let c = self.compute();
        match c.activations() {
            Activations::F32 => format!("cpu ({})", c.isa().name()),
            a => format!("cpu ({}, {} activations)", c.isa().name(), a.name()),
        }
    }

    fn prepare(&self, store: &Arc<Store>, w: &Linear) -> Result<PreparedWeight> {
        // The kernels read the mapping in place: map its pages now, not on the first step.
        w.prefault(store);
        Ok(PreparedWeight::mapped(store, w))
    }

    fn prepare_kv_b(
        &self,
        kv_b: PreparedWeight,
        heads: usize,
        nope: usize,
        v: usize,
    ) -> Result<MlaWeights> {
        if kv_b.rows != heads * (nope + v) {
            return Err(input_err(
                "prepare_kv_b",
                format!(
                    "kv_b has {} rows for {heads} heads × ({nope} + {v})",
                    kv_b.rows
                ),
            ));
        }
        let per: Vec<(PreparedWeight, PreparedWeight)> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let r0 = h * (nope + v);
                (kv_b.transposed_rows(r0, nope), kv_b.rows_of(r0 + nope, v))
            })
            .collect();
        let (w_uk_t, w_uv) = per.into_iter().unzip();
        Ok(MlaWeights { w_uk_t, w_uv, kv_b })
    }

    fn embed(&self, table: &PreparedWeight, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let (v, h) = (table.rows, table.cols);
        if out.len() != tokens.len() * h {
            return Err(input_err(
                "embed",
                format!("out {} for {} tokens", out.len(), tokens.len()),
            ));
        }
        let w = table.view();
        for (&t, row) in tokens.iter().zip(out.chunks_exact_mut(h)) {
            if t as usize >= v {
                return Err(input_err("embed", format!("token {t} of vocab {v}")));
            }
            w.dequant_row_into(t as usize, 0, row);
        }
        Ok(())
    }

    fn linear(&self, x: &[f32], m: usize, w: &PreparedWeight, y: &mut [f32]) -> Result<()> {
        Ok(matmul_with(
            self.compute(),
            x,
            m,
            &w.view(),
            Epilogue::Store,
            y,
        )?)
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
        // One task per head on the kernel team (each head's matmul runs inside its task, on
        // that worker's scratch buffers); each head writes its own columns of `y`.
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let out = OutPtr(y.as_mut_ptr());
        parallel_for(heads, |h| {
            let w = &ws[h];
            let (k, n) = (w.cols, w.rows);
            let off: usize = ws[..h].iter().map(|w| w.rows).sum();
            let mut xh = scratch::take(rows * k);
            for (r, dst) in xh.chunks_exact_mut(k).enumerate() {
                let s = (r * heads + h) * x_stride + x_off;
                dst.copy_from_slice(&x[s..s + k]);
            }
            let mut yh = scratch::take(rows * n);
            match matmul_with(
                self.compute(),
                &xh,
                rows,
                &w.view(),
                Epilogue::Store,
                &mut yh,
            ) {
                Ok(()) => {
                    for (r, src) in yh.chunks_exact(n).enumerate() {
                        // SAFETY: `y` is rows × y_stride long (checked above) and columns
                        // off..off + n of each row belong to head h alone.
                        unsafe { out.write(r * y_stride + off, src) };
                    }
                }
                Err(e) => {
                    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                    f.get_or_insert(e.into());
                }
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) -> Result<()> {
        if stride == w.len() {
            return Ok(rms_norm_inplace(x, w, eps)?);
        }
        if stride < w.len() || !x.len().is_multiple_of(stride) {
            return Err(input_err(
                "rms_norm",
                format!("stride {stride} for {} weights", w.len()),
            ));
        }
        for row in x.chunks_exact_mut(stride) {
            rms_norm_inplace(&mut row[..w.len()], w, eps)?;
        }
        Ok(())
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
        let d = 2 * rope.inv_freq.len();
        if x.len() != positions.len() * heads * stride || off + d > stride {
            return Err(input_err(
                "rope",
                format!(
                    "x {} for {} rows × {heads} × {stride}",
                    x.len(),
                    positions.len()
                ),
            ));
        }
        for (row, &pos) in x.chunks_exact_mut(heads * stride).zip(positions) {
            rope.apply_heads(row, heads, stride, off, pos);
        }
        Ok(())
    }

    fn gather_cols(
        &self,
        src: &[f32],
        stride: usize,
        off: usize,
        len: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        if off + len > stride || src.len() / stride * len != dst.len() {
            return Err(input_err(
                "gather_cols",
                format!(
                    "src {}, dst {}, {len} of {stride} at {off}",
                    src.len(),
                    dst.len()
                ),
            ));
        }
        for (s, d) in src.chunks_exact(stride).zip(dst.chunks_exact_mut(len)) {
            d.copy_from_slice(&s[off..off + len]);
        }
        Ok(())
    }

    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()> {
        if x.len() != y.len() {
            return Err(input_err("add", format!("{} and {}", x.len(), y.len())));
        }
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
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
        Ok(mla_decode(cache, seqs, heads, q_abs, q_pe, scale, out)?)
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
        if prefer_expanded(chunk, start, heads, r, nope, rope, v) {
            return Ok(mla_prefill_expanded(
                cache,
                seq,
                start,
                heads,
                q,
                &w.kv_b.view(),
                nope,
                scale,
                out,
            )?);
        }
        // Absorbed: q̃ = W_UKᵀ·q_nope per head, attention over the latents, then W_UV.
        let mut q_abs = scratch::take(chunk * heads * r);
        self.linear_heads(q, chunk, qk, 0, &w.w_uk_t, &mut q_abs)?;
        let mut q_pe = scratch::take(chunk * heads * rope);
        self.gather_cols(q, qk, nope, rope, &mut q_pe)?;
        let mut ctx = scratch::take(chunk * heads * r);
        mla_prefill(cache, seq, start, heads, &q_abs, &q_pe, scale, &mut ctx)?;
        self.linear_heads(&ctx, chunk, r, 0, &w.w_uv, out)
    }

    fn mlp(
        &self,
        x: &[f32],
        m: usize,
        w: &MlpWeights,
        accumulate: bool,
        y: &mut [f32],
    ) -> Result<()> {
        let mut h = scratch::take(m * w.gate.rows);
        let c = self.compute();
        silu_mul_with(c, x, m, &w.gate.view(), &w.up.view(), &mut h)?;
        let ep = if accumulate {
            Epilogue::Accumulate { row_scale: None }
        } else {
            Epilogue::Store
        };
        matmul_with(c, &h, m, &w.down.view(), ep, y)?;
        Ok(())
    }

    fn moe(
        &self,
        x: &[f32],
        hidden: usize,
        groups: &[MoeGroup<'_>],
        row_weight: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        // The two lists keep their allocations from call to call (see `MoeLists`).
        let lists = MOE_LISTS
            .try_with(|l| std::mem::take(&mut *l.borrow_mut()))
            .unwrap_or_default();
        let mut experts: Vec<ExpertWeights> = scratch::recycle(lists.experts);
        let mut kgroups = lists.groups;
        kgroups.clear();
        experts.extend(groups.iter().map(|g| g.mlp.experts()));
        kgroups.extend(groups.iter().enumerate().map(|(i, g)| Group {
            expert: i,
            rows: g.rows.clone(),
        }));
        let res = grouped_ffn_with(
            self.compute(),
            x,
            hidden,
            &kgroups,
            &experts,
            Some(row_weight),
            Combine::Store,
            y,
        );
        let _ = MOE_LISTS.try_with(|l| {
            *l.borrow_mut() = MoeLists {
                experts: scratch::recycle(experts),
                groups: kgroups,
            }
        });
        Ok(res?)
    }
}
