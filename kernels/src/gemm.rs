//! y = x · Wᵀ with W in its stored dtype (dequantised inside the kernel).
//!
//! Four strategies:
//! - **FP8 and BF16 on the AVX-512 levels, 3 ≤ `m` ≤ 64** (batched decode, the rows of one
//!   expert): f32 dot-product tiles
//!   ([`crate::cpu::dot_rows`]). Every 64 weights of a row are converted to four f32 vectors in
//!   registers (F16C) once per group of up to 10 rows of x and meet them in a 2×10 register tile;
//!   x is laid out once per call so a tile reads it from one pointer. FP8 and BF16 being exact
//!   in f32, the results are f32 dot products. Against the bf16 tiles below (three bf16
//!   products per multiply-add) they took 0.7–0.85× the time at M = 16 and 0.65–0.75× at
//!   M = 32 on one Zen 5 core (768×2048 and 2048×768, weights from memory, same run).
//! - **FP8 and BF16 on [`Isa::Avx512Bf16`]**, `m ≤ TILE_MAX_M` otherwise (M = 1–2): x is
//!   split once into three bf16 parts and every weight byte is read once, converted to bf16 in
//!   registers and used by `RW`×`RX` tiles of bf16 dot products ([`crate::cpu`]); x beyond
//!   256 KiB is cut into L2-sized blocks.
//! - **decode** otherwise (`m ≤ STREAM_MAX_M`): memory-bound, so each weight row is streamed
//!   from memory once, dequantised in registers and dotted with every row of x.
//! - **prefill** otherwise (larger `m`): compute-bound. x is packed once into 6-row panels;
//!   each task dequantises a `KC × NC` panel of W to f32 (scale applied) once and reuses it
//!   across all rows of x through the 6×16 FMA microkernel.
//!
//! With bf16 activations ([`Activations::Bf16`], AVX512-BF16 only) FP8 and BF16 weights take
//! two other strategies: up to [`PAIRS_MIN_M`] rows the bf16 tiles with x in one bf16 part
//! instead of three; beyond, **pair tiles**: x rounded to bf16 once, each task packs a
//! `KC`-deep block of its weight rows as (k, k+1) bf16 pairs, exact, and a 6×32 tile of
//! `vdpbf16ps` (two multiply-adds per lane at the FMA's issue rate) runs every 6-row panel
//! of x past it, the FP8 block scale applied per 128 columns to each 16-row half's sums.
//!
//! Tasks own disjoint column ranges of y and compute a `[m, cols]` tile locally, then apply
//! the epilogue (store, scaled accumulate, or SiLU(gate)·up) while writing y. They run on the
//! kernel team ([`crate::pool::parallel_for`]).

use crate::cpu::{self, Isa, MR, NR, SyncPtr, Tile};
use crate::error::{Result, shape};
use crate::pool::parallel_for;
use crate::scratch::{self, Scratch};
use crate::weight::{FP8_BLOCK, Weight};
use crate::wide::{NW, PACK_KC_MAX, microkernel_wide, pack_panel};
use std::cell::RefCell;
use std::str::FromStr;
use std::sync::OnceLock;

/// Up to this many rows of x the bf16 tiles of [`Isa::Avx512Bf16`] serve FP8 and BF16 weights
/// (where the f32 dot tiles, [`crate::cpu::dot_rows`], do not). Beyond it the packed
/// microkernel is faster: at M = 512 the tiles measured 0.7–0.9× its GFLOP/s (`bench kernels`,
/// prefill rows).
pub const TILE_MAX_M: usize = 64;

/// Up to this many rows of x the streaming (decode) kernel is used: it re-reads each weight row
/// from L1 once per 4 rows of x, which beats packing while the weight bytes dominate.
pub const STREAM_MAX_M: usize = 16;
/// Depth of a packed weight panel: two FP8 scale blocks, 16 KiB per 16-column micro-panel,
/// so a micro-panel stays in L1 while the 6-row panels of x stream past it.
const KC: usize = 2 * FP8_BLOCK;
const _: () = assert!(KC <= PACK_KC_MAX);
/// Widest column range of one prefill task: a `KC × 256` f32 panel is 256 KiB, in L2.
const NC_MAX: usize = 256;

/// What the activations (the x of y = x·Wᵀ) are multiplied as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// Exact f32 products, on every path: the exactness tests' setting.
    #[default]
    F32,
    /// x rounded to bf16 (nearest even) and multiplied with the weights' exact bf16 values by
    /// `vdpbf16ps`, summed in f32. On Zen 4 that instruction issues at the rate of a 512-bit
    /// FMA and does two multiply-adds per lane, so the compute-bound GEMMs (prefill, experts
    /// of many rows) run at up to twice the exact path's rate. Each product's relative error is
    /// at most 2⁻⁹ (x's rounding). This is the activation precision of vLLM's and SGLang's CPU
    /// backends, and finer than llama.cpp's Q8_0 activations (int8 per 32 values). It needs
    /// [`Isa::Avx512Bf16`] and applies to every GEMM of FP8 and BF16 weights: up to
    /// [`PAIRS_MIN_M`] rows on the bf16 tiles with x in one part instead of three, beyond on
    /// the packed pair tiles ([`crate::wide::microkernel_pairs`]). F16 and F32 weights stay
    /// exact.
    Bf16,
}

impl Activations {
    pub fn name(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Bf16 => "bf16",
        }
    }
}

impl FromStr for Activations {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Activations::F32),
            "bf16" => Ok(Activations::Bf16),
            _ => Err(crate::Error::Unsupported {
                op: "activation dtype",
                detail: format!("{s:?} (expected f32 or bf16)"),
            }),
        }
    }
}

/// How a GEMM computes: the instruction set and the activations' precision. An [`Isa`]
/// converts into its exact (f32) form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compute {
    isa: Isa,
    act: Activations,
}

impl Compute {
    /// Fails for bf16 activations on an instruction set without AVX512-BF16: rounding x
    /// there would cost accuracy and gain nothing.
    pub fn new(isa: Isa, act: Activations) -> Result<Self> {
        if act == Activations::Bf16 && isa != Isa::Avx512Bf16 {
            return Err(crate::Error::Unsupported {
                op: "bf16 activations",
                detail: format!(
                    "they need a CPU with AVX512-BF16 (this path is {}); use f32",
                    isa.name()
                ),
            });
        }
        Ok(Compute { isa, act })
    }

    /// The detected instruction set with activations `act` ([`Compute::new`]'s check).
    pub fn detected(act: Activations) -> Result<Self> {
        Compute::new(cpu::isa(), act)
    }

    pub fn isa(self) -> Isa {
        self.isa
    }

    pub fn activations(self) -> Activations {
        self.act
    }

    /// bf16 pair tiles serve `m` rows of x (of FP8 or BF16 weights).
    fn pairs_serve_m(self, m: usize) -> bool {
        self.act == Activations::Bf16 && self.isa == Isa::Avx512Bf16 && m > PAIRS_MIN_M
    }
}

impl From<Isa> for Compute {
    fn from(isa: Isa) -> Self {
        Compute {
            isa,
            act: Activations::F32,
        }
    }
}

/// With bf16 activations, GEMMs of more rows of x than this run on the packed bf16 pair tiles
/// ([`crate::wide::microkernel_pairs`]), which convert each weight once per task; fewer run
/// on the bf16 tiles, which convert each weight once per 4 rows but pack nothing.
///
/// Measured on Zen 4 (2 threads, medium shapes, same run): expert groups of 64 rows ran at
/// 0.59–0.66 of the bf16 dot peak on the tiles against 0.71–0.74 packed (switch at 16 or 32
/// alike), and a 32-sequence decode step, whose dense GEMMs have 32 rows, was no slower on
/// the tiles.
pub const PAIRS_MIN_M: usize = 32;

/// What a GEMM does with its result.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// y = x·Wᵀ.
    Store,
    /// y += s_i · (x·Wᵀ) for row i, with s_i = `row_scale[i]` (1 when `None`): the weighted
    /// combine of expert outputs.
    Accumulate { row_scale: Option<&'a [f32]> },
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ`, f32 accumulate.
pub fn matmul(x: &[f32], m: usize, w: &Weight, y: &mut [f32]) -> Result<()> {
    matmul_with(cpu::isa(), x, m, w, Epilogue::Store, y)
}

/// `y += row_scale ⊙ (x · Wᵀ)`.
pub fn matmul_acc(
    x: &[f32],
    m: usize,
    w: &Weight,
    row_scale: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    matmul_with(cpu::isa(), x, m, w, Epilogue::Accumulate { row_scale }, y)
}

/// The expert up-projection: `y = SiLU(x · W_gateᵀ) ⊙ (x · W_upᵀ)`, both GEMMs run on the same
/// column tile so the gate and up results never leave the task.
pub fn matmul_silu_mul(
    x: &[f32],
    m: usize,
    gate: &Weight,
    up: &Weight,
    y: &mut [f32],
) -> Result<()> {
    silu_mul_with(cpu::isa(), x, m, gate, up, y)
}

fn check(op: &'static str, x: &[f32], m: usize, w: &Weight, y: &[f32]) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    if x.len() != m * k || y.len() != m * n {
        return Err(shape(
            op,
            format!("x {} (m={m}, k={k}), W [{n}, {k}], y {}", x.len(), y.len()),
        ));
    }
    Ok(())
}

/// [`matmul`] with an explicit instruction set and epilogue (tests compare the paths).
pub fn matmul_with(
    c: impl Into<Compute>,
    x: &[f32],
    m: usize,
    w: &Weight,
    ep: Epilogue,
    y: &mut [f32],
) -> Result<()> {
    check("matmul", x, m, w, y)?;
    if let Epilogue::Accumulate { row_scale: Some(s) } = ep
        && s.len() != m
    {
        return Err(shape("matmul", format!("row_scale {} for m={m}", s.len())));
    }
    if m == 0 || w.rows == 0 {
        return Ok(());
    }
    let c = c.into();
    let tiles = cpu::bf16_tiles_serve(w);
    let mut space = OperandSpace::new(XOperand::needs(c, m, w.cols, tiles));
    let a = XOperand::new(c, x, m, w.cols, tiles, &mut space.parts());
    let n = w.rows;
    let yp = SyncPtr(y.as_mut_ptr());
    let chunk = col_chunk(m, n, 1);
    parallel_for(n.div_ceil(chunk), |t| {
        let n0 = t * chunk;
        let n1 = (n0 + chunk).min(n);
        with_tile(m * (n1 - n0), |tile| {
            a.compute_cols(w, n0, n1, tile);
            // SAFETY: tasks write disjoint column ranges [n0, n1) of y.
            unsafe { write_tile(yp, n, m, n0, n1, tile, ep) };
        });
    });
    Ok(())
}

/// [`matmul_silu_mul`] with an explicit instruction set.
pub fn silu_mul_with(
    c: impl Into<Compute>,
    x: &[f32],
    m: usize,
    gate: &Weight,
    up: &Weight,
    y: &mut [f32],
) -> Result<()> {
    check("matmul_silu_mul", x, m, gate, y)?;
    check("matmul_silu_mul", x, m, up, y)?;
    if m == 0 || gate.rows == 0 {
        return Ok(());
    }
    let c = c.into();
    let tiles = cpu::bf16_tiles_serve(gate) && cpu::bf16_tiles_serve(up);
    let mut space = OperandSpace::new(XOperand::needs(c, m, gate.cols, tiles));
    let a = XOperand::new(c, x, m, gate.cols, tiles, &mut space.parts());
    let n = gate.rows;
    let yp = SyncPtr(y.as_mut_ptr());
    let chunk = col_chunk(m, n, 2);
    parallel_for(n.div_ceil(chunk), |t| {
        let n0 = t * chunk;
        let n1 = (n0 + chunk).min(n);
        let cols = n1 - n0;
        with_tile(2 * m * cols, |buf| {
            let (g, u) = buf.split_at_mut(m * cols);
            a.compute_cols(gate, n0, n1, g);
            a.compute_cols(up, n0, n1, u);
            silu_mul_inplace(g, u);
            // SAFETY: disjoint column ranges.
            unsafe { write_tile(yp, n, m, n0, n1, g, Epilogue::Store) };
        });
    });
    Ok(())
}

/// g ← SiLU(g) ⊙ u.
pub fn silu_mul_inplace(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + (-*a).exp()) * b;
    }
}

/// Columns per task: enough tasks to keep every thread busy (and balance a skewed finish),
/// multiples of 16 so tiles align with the microkernel, bounded so a panel fits in L2.
/// `weights` is how many matrices one task reads per column (2 for gate+up).
pub(crate) fn col_chunk(m: usize, n: usize, weights: usize) -> usize {
    let threads = crate::pool::threads();
    let want = n.div_ceil(4 * threads);
    let cap = if m <= STREAM_MAX_M {
        // Streaming: ~64 KiB of weights per task amortises scheduling.
        (1024 / weights).max(16)
    } else {
        NC_MAX
    };
    want.div_ceil(NR).max(1).saturating_mul(NR).clamp(NR, cap)
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a per-thread zeroed buffer of `len` floats (reused across calls, so large
/// tiles do not cost a fresh mmap and page faults every task).
pub(crate) fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let buf = &mut *s;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        buf[..len].fill(0.0);
        f(&mut buf[..len])
    })
}

/// Per-thread buffer for the dequantised weight panel (separate from the tile buffer, which
/// the caller holds while the panel is filled).
fn with_panel<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    PANEL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < len {
            p.resize(len, 0.0);
        }
        f(&mut p[..len])
    })
}

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Writes a `[m, n1-n0]` tile into columns `n0..n1` of the `[m, n]` matrix at `y`.
///
/// # Safety
/// `y` must point at `m·n` floats and no other thread may touch columns `n0..n1`.
pub(crate) unsafe fn write_tile(
    y: SyncPtr,
    n: usize,
    m: usize,
    n0: usize,
    n1: usize,
    tile: &[f32],
    ep: Epilogue,
) {
    let cols = n1 - n0;
    for i in 0..m {
        let dst = unsafe { std::slice::from_raw_parts_mut(y.0.add(i * n + n0), cols) };
        let src = &tile[i * cols..(i + 1) * cols];
        match ep {
            Epilogue::Store => dst.copy_from_slice(src),
            Epilogue::Accumulate { row_scale } => {
                let s = row_scale.map_or(1.0, |s| s[i]);
                for (d, v) in dst.iter_mut().zip(src) {
                    *d += s * v;
                }
            }
        }
    }
}

/// Room for the prepared forms of operands (the bf16 parts and the dot layout of x), carved by
/// [`XOperand::new`] from two scratch buffers: one pair of buffers for all the operands of a
/// call (a grouped-MoE call has one per expert group), so that the call takes two buffers, not
/// two per group, and their size classes change only when the total crosses a power of two.
pub(crate) struct OperandSpace {
    bf16: Scratch<u16>,
    dot: Scratch<f32>,
}

/// The carving cursor of an [`OperandSpace`].
pub(crate) type OperandParts<'s> = (&'s mut [u16], &'s mut [f32]);

impl OperandSpace {
    /// Room for the operands whose needs ([`XOperand::needs`]) add up to `(bf16, dot)`. The
    /// contents are stale: each operand writes all of its part.
    pub(crate) fn new((bf16, dot): (usize, usize)) -> Self {
        OperandSpace {
            bf16: scratch::stale(bf16),
            dot: scratch::stale(dot),
        }
    }

    /// The cursor operands are carved from.
    pub(crate) fn parts(&mut self) -> OperandParts<'_> {
        (&mut self.bf16, &mut self.dot)
    }
}

/// The first `n` values of the cursor's slice; the cursor moves past them.
fn carve<'s, T>(cursor: &mut &'s mut [T], n: usize) -> &'s mut [T] {
    let (mine, rest) = std::mem::take(cursor).split_at_mut(n);
    *cursor = rest;
    mine
}

/// The x side of a GEMM, prepared once and shared by every task: bf16 hi/mid/lo rows for the
/// tiles of [`Isa::Avx512Bf16`], x rounded to bf16 for the pair tiles (bf16 activations), raw
/// rows for the streaming kernel, or 6-row panels `[k-block][row-panel][kc][6]` for the
/// microkernel (packed on first use).
pub(crate) struct XOperand<'a> {
    isa: Isa,
    /// x rounded to bf16, rows of `k` rounded up to even (the pair tiles), carved from an
    /// [`OperandSpace`].
    pairs: &'a [u16],
    x: &'a [f32],
    m: usize,
    k: usize,
    /// Carved from an [`OperandSpace`]: a decode step allocates nothing here once warm.
    bf16: &'a [u16],
    /// bf16 parts per value in `bf16`: 3 (exact) or 1 (bf16 activations).
    parts: usize,
    packed: OnceLock<Scratch<f32>>,
    /// x in the layout of [`cpu::dot_rows`], carved from an [`OperandSpace`] here, on the
    /// calling thread.
    dot: &'a [f32],
}

impl<'a> XOperand<'a> {
    /// `tiles`: the weights this operand meets are served by the bf16 tiles (FP8, BF16: then,
    /// on [`Isa::Avx512Bf16`] and for row counts the dot tiles do not take, x is prepared for
    /// them; other weights still work, through the f32 paths).
    /// What [`XOperand::new`] carves from an [`OperandSpace`] for `m` rows of `k` columns:
    /// (bf16 parts, dot layout) values.
    pub(crate) fn needs(c: Compute, m: usize, k: usize, tiles: bool) -> (usize, usize) {
        let isa = c.isa;
        if tiles && c.pairs_serve_m(m) {
            return (m * 2 * k.div_ceil(2), 0);
        }
        #[cfg(target_arch = "x86_64")]
        if tiles && c.act == Activations::Bf16 && m > 0 {
            return (cpu::avx512bf16::prepared_len(m, k, 1), 0);
        }
        let mut bf16 = 0;
        #[cfg(target_arch = "x86_64")]
        if tiles
            && isa == Isa::Avx512Bf16
            && m > 0
            && m <= TILE_MAX_M
            && !cpu::dot_rows_serve_m(isa, m)
        {
            bf16 = cpu::avx512bf16::prepared_len(m, k, 3);
        }
        let dot = if tiles && cpu::dot_rows_serve_m(isa, m) {
            cpu::dot_prepared_len(m, k)
        } else {
            0
        };
        (bf16, dot)
    }

    /// The prepared forms are carved from `space` (an [`OperandSpace`] with room for them).
    pub(crate) fn new(
        c: Compute,
        x: &'a [f32],
        m: usize,
        k: usize,
        tiles: bool,
        space: &mut OperandParts<'a>,
    ) -> Self {
        let isa = c.isa;
        #[cfg(target_arch = "x86_64")]
        if tiles && c.pairs_serve_m(m) {
            let out = carve(&mut space.0, m * 2 * k.div_ceil(2));
            // SAFETY: pairs are served only on AVX512-BF16 (Compute::new checks).
            unsafe { crate::wide::round_rows(x, m, k, out) };
            return Self {
                isa,
                pairs: out,
                x,
                m,
                k,
                bf16: &[],
                parts: 0,
                packed: OnceLock::new(),
                dot: &[],
            };
        }
        #[cfg(target_arch = "x86_64")]
        if tiles && c.act == Activations::Bf16 && m > 0 {
            // Few rows with bf16 activations: the bf16 tiles with x in one part.
            let out = carve(&mut space.0, cpu::avx512bf16::prepared_len(m, k, 1));
            // SAFETY: bf16 activations exist only on AVX512-BF16 (Compute::new checks).
            unsafe { cpu::avx512bf16::prepare_x(x, m, k, 1, out) };
            return Self {
                isa,
                pairs: &[],
                x,
                m,
                k,
                bf16: out,
                parts: 1,
                packed: OnceLock::new(),
                dot: &[],
            };
        }
        let mut bf16: &'a [u16] = &[];
        #[cfg(target_arch = "x86_64")]
        if tiles
            && isa == Isa::Avx512Bf16
            && m > 0
            && m <= TILE_MAX_M
            && !cpu::dot_rows_serve_m(isa, m)
        {
            let out = carve(&mut space.0, cpu::avx512bf16::prepared_len(m, k, 3));
            // SAFETY: the ISA was detected; the length is the prepared length.
            unsafe { cpu::avx512bf16::prepare_x(x, m, k, 3, out) };
            bf16 = out;
        }
        let mut dot: &'a [f32] = &[];
        if tiles && cpu::dot_rows_serve_m(isa, m) {
            let out = carve(&mut space.1, cpu::dot_prepared_len(m, k));
            cpu::dot_prepare_x(x, m, k, out);
            dot = out;
        }
        Self {
            isa,
            pairs: &[],
            x,
            m,
            k,
            bf16,
            parts: 3,
            packed: OnceLock::new(),
            dot,
        }
    }

    /// `out[m, n1-n0] = x · W[n0..n1]ᵀ`.
    pub(crate) fn compute_cols(&self, w: &Weight, n0: usize, n1: usize, out: &mut [f32]) {
        debug_assert_eq!(w.cols, self.k);
        let cols = n1 - n0;
        #[cfg(target_arch = "x86_64")]
        if !self.pairs.is_empty() && cpu::bf16_tiles_serve(w) {
            self.pair_cols(w, n0, n1, out);
            return;
        }
        if !self.dot.is_empty() && cpu::dot_serves(self.isa, self.m, w) {
            cpu::dot_rows(self.isa, self.dot, self.m, w, n0, n1, out, cols);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if !self.bf16.is_empty() && cpu::bf16_tiles_serve(w) {
            out.fill(0.0);
            // SAFETY: bf16 is prepared only on a CPU with the ISA; the tiles serve w.
            unsafe { cpu::avx512bf16::rows(self.bf16, self.parts, self.m, w, n0, n1, out, cols) };
            return;
        }
        if self.m <= STREAM_MAX_M {
            cpu::stream_rows(self.isa, self.x, self.m, w, n0, n1, out, cols);
            return;
        }
        let (m, k) = (self.m, self.k);
        if !self.pairs.is_empty() {
            // A weight the pair tiles do not serve (F16, F32) meets the exact path.
            let xs = self.x;
            let packed = self.packed.get_or_init(|| pack_x(xs, m, k));
            return self.packed_cols(packed, w, n0, n1, out);
        }
        let packed = self.packed.get_or_init(|| pack_x(self.x, m, k));
        self.packed_cols(packed, w, n0, n1, out);
    }

    /// The f32 microkernel over `packed` ([`pack_x`]) for columns `n0..n1`.
    fn packed_cols(&self, packed: &[f32], w: &Weight, n0: usize, n1: usize, out: &mut [f32]) {
        let (m, k) = (self.m, self.k);
        let cols = n1 - n0;
        let panels = cols.div_ceil(NR);
        let mp = m.div_ceil(MR) * MR;
        with_panel(KC * panels * NR, |bp| {
            for (pi, k0) in (0..k).step_by(KC).enumerate() {
                let kc = KC.min(k - k0);
                // Dequantise W[n0..n1, k0..k0+kc] into 16-wide micro-panels [kc][16].
                for p in 0..panels {
                    let panel = &mut bp[p * KC * NR..(p * KC + kc) * NR];
                    let r0 = n0 + p * NR;
                    pack_panel(self.isa, w, r0, NR.min(n1 - r0), k0, kc, panel);
                }
                let xa = &packed[pi * mp * KC..];
                for ib in 0..m.div_ceil(MR) {
                    let a = &xa[ib * MR * kc..];
                    let mr = MR.min(m - ib * MR);
                    // Two adjacent 16-column panels per wide tile (`crate::wide`).
                    for p in (0..panels).step_by(2) {
                        let nr = NW.min(cols - p * NR);
                        let t = Tile {
                            kc,
                            a: a.as_ptr(),
                            rsa: 1,
                            csa: MR,
                            b: bp[p * KC * NR..].as_ptr(),
                            rsb: NR,
                            c: out[ib * MR * cols + p * NR..].as_mut_ptr(),
                            ldc: cols,
                            mr,
                            nr,
                            accumulate: pi > 0,
                        };
                        // SAFETY: panels are padded to 16 columns and 6 rows, the second half
                        // is panel p+1 (read only when nr > 16, i.e. when it exists); C is the
                        // [m, cols] tile, and the tile covers rows < m, columns < cols.
                        unsafe { microkernel_wide(self.isa, &t, KC * NR) };
                    }
                }
            }
        });
    }

    /// `out[m, n1-n0] = x · W[n0..n1]ᵀ` on the bf16 pair tiles: each task packs a `KC`-deep
    /// block of its weight rows as bf16 pairs once and runs every 6-row panel of x past it,
    /// one 128-column scale block per tile call.
    #[cfg(target_arch = "x86_64")]
    fn pair_cols(&self, w: &Weight, n0: usize, n1: usize, out: &mut [f32]) {
        use crate::wide::{PairTile, microkernel_pairs, pack_pairs, pair_scales};
        let (m, k) = (self.m, self.k);
        let cols = n1 - n0;
        let panels = cols.div_ceil(NR);
        let kp = KC / 2;
        let rsa = k.div_ceil(2);
        let xb = self.pairs.as_ptr() as *const u32;
        // A task is at most NC_MAX columns (`col_chunk`, more than STREAM_MAX_M rows): the
        // scales of its wide tiles and scale blocks fit a fixed array, looked up once per
        // k-block instead of once per tile call.
        assert!(
            cols <= NC_MAX,
            "pair tiles take at most {NC_MAX} columns a task"
        );
        let mut scales = [[[0f32; 2]; KC / FP8_BLOCK]; NC_MAX / NW];
        with_pair_panel(kp * panels * NR, |bp| {
            for (pi, k0) in (0..k).step_by(KC).enumerate() {
                let kc = KC.min(k - k0);
                for p in 0..panels {
                    let r0 = n0 + p * NR;
                    let panel = &mut bp[p * kp * NR..(p * kp + kc.div_ceil(2)) * NR];
                    // SAFETY: pair tiles serve only FP8 and BF16 weights on AVX512-BF16.
                    unsafe { pack_pairs(w, r0, NR.min(n1 - r0), k0, kc, panel) };
                }
                for (p, tile) in (0..panels).step_by(2).zip(scales.iter_mut()) {
                    for (si, s0) in (0..kc).step_by(FP8_BLOCK).enumerate() {
                        tile[si] = pair_scales(w, n0 + p * NR, (k0 + s0) / FP8_BLOCK);
                    }
                }
                for ib in 0..m.div_ceil(MR) {
                    let mr = MR.min(m - ib * MR);
                    for p in (0..panels).step_by(2) {
                        let nr = NW.min(cols - p * NR);
                        for (si, s0) in (0..kc).step_by(FP8_BLOCK).enumerate() {
                            let t = PairTile {
                                pairs: FP8_BLOCK.min(kc - s0).div_ceil(2),
                                // SAFETY (all three pointers): inside x's rounded rows, the
                                // packed panels and the [m, cols] tile.
                                a: unsafe { xb.add(ib * MR * rsa + (k0 + s0) / 2) },
                                rsa,
                                b: bp[(p * kp + s0 / 2) * NR..].as_ptr(),
                                c: out[ib * MR * cols + p * NR..].as_mut_ptr(),
                                ldc: cols,
                                mr,
                                nr,
                                accumulate: pi > 0 || si > 0,
                                scale: scales[p / 2][si],
                            };
                            // SAFETY: x rows are `rsa` pairs (zero-padded), panels hold
                            // `kp` pairs of 16 rows (the second half, read only when nr > 16,
                            // is panel p+1), C is the [m, cols] tile.
                            unsafe { microkernel_pairs(&t, kp * NR) };
                        }
                    }
                }
            }
        });
    }
}

/// Per-thread buffer for the bf16 pair panels of [`XOperand::pair_cols`].
#[cfg(target_arch = "x86_64")]
fn with_pair_panel<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    thread_local! {
        static PAIR_PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }
    PAIR_PANEL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < len {
            p.resize(len, 0);
        }
        f(&mut p[..len])
    })
}

/// Packs x `[m, k]` into `[k-block of KC][6-row panel][kc][6]`, zero-padding the last panel.
fn pack_x(x: &[f32], m: usize, k: usize) -> Scratch<f32> {
    let mp = m.div_ceil(MR) * MR;
    // A reused buffer, not cleared: a fresh one of a prefill's size was mapped and
    // page-faulted every call, and the tiles read only the rows below m of the last panel.
    let mut p = scratch::stale(mp * k.div_ceil(KC) * KC);
    for (pi, k0) in (0..k).step_by(KC).enumerate() {
        let kc = KC.min(k - k0);
        let blk = &mut p[pi * mp * KC..];
        for ib in 0..m.div_ceil(MR) {
            let panel = &mut blk[ib * MR * kc..(ib + 1) * MR * kc];
            for i in 0..MR.min(m - ib * MR) {
                let row = &x[(ib * MR + i) * k + k0..(ib * MR + i) * k + k0 + kc];
                for (kk, v) in row.iter().enumerate() {
                    panel[kk * MR + i] = *v;
                }
            }
        }
    }
    p
}

/// Dot product with 8 independent accumulators so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

/// Plain reference: f64 accumulate over the element-wise dequantised weight.
pub mod reference {
    use crate::weight::Weight;

    pub fn matmul(x: &[f32], m: usize, w: &Weight) -> Vec<f32> {
        let (n, k) = (w.rows, w.cols);
        let mut y = vec![0f32; m * n];
        let mut row = vec![0f32; k];
        for r in 0..n {
            for (c, v) in row.iter_mut().enumerate() {
                *v = w.get(r, c);
            }
            for i in 0..m {
                let mut s = 0f64;
                for c in 0..k {
                    s += x[i * k + c] as f64 * row[c] as f64;
                }
                y[i * n + r] = s as f32;
            }
        }
        y
    }

    /// SiLU(x·W_gateᵀ) ⊙ (x·W_upᵀ) in f64.
    pub fn silu_mul(x: &[f32], m: usize, gate: &Weight, up: &Weight) -> Vec<f32> {
        let g = matmul(x, m, gate);
        let u = matmul(x, m, up);
        g.iter()
            .zip(&u)
            .map(|(&g, &u)| {
                let g = g as f64;
                (g / (1.0 + (-g).exp()) * u as f64) as f32
            })
            .collect()
    }
}
