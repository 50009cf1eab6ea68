//! The model's hot path allocates nothing of its own once the engine's buffers have seen a
//! step of the same shape (issue 9, item 5), and reusing those buffers gives the same logits as
//! fresh ones.
//!
//! A counting global allocator counts the allocations of the test's thread while armed. The
//! backend's operations and the routed experts are wrapped so that counting pauses inside
//! them: what they allocate is theirs (kernels' task lists, grouped-MoE row buffers), and
//! what is left is exactly the model's own code — `Model::forward_into` between those calls.

use crate::fixtures::fixture_dir;
use shardseek_kernels::gate::Routing;
use shardseek_kernels::mla::{LatentCache, SeqPages};
use shardseek_kernels::rope::Rope;
use shardseek_worker::backend::{
    Backend, CpuBackend, MlaWeights, MlpWeights, MoeGroup, PreparedWeight,
};
use shardseek_worker::config::ModelConfig;
use shardseek_worker::error::Result;
use shardseek_worker::experts::{LocalExperts, PendingExperts, RoutedExperts};
use shardseek_worker::kv::SeqCache;
use shardseek_worker::model::{ForwardScratch, Mlp, Model, SeqInput};
use shardseek_worker::weights::{Linear, Store};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // try_with: the allocator also runs while thread-locals are being torn down.
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Counts this thread's allocations made by `f` outside the paused regions.
fn allocations_of<R>(f: impl FnOnce() -> R) -> (R, u64) {
    COUNT.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, COUNT.with(Cell::get))
}

/// Counting is off while one lives (inside a backend operation or the experts).
struct Paused(bool);

impl Paused {
    fn new() -> Self {
        Paused(ARMED.with(|a| a.replace(false)))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        ARMED.with(|a| a.set(self.0));
    }
}

/// The CPU backend with counting paused inside every operation.
struct Outside(Arc<dyn Backend>);

impl Backend for Outside {
    fn name(&self) -> String {
        self.0.name()
    }

    fn prepare(&self, store: &Arc<Store>, w: &Linear) -> Result<PreparedWeight> {
        self.0.prepare(store, w)
    }

    fn prepare_kv_b(
        &self,
        kv_b: PreparedWeight,
        heads: usize,
        nope: usize,
        v: usize,
    ) -> Result<MlaWeights> {
        self.0.prepare_kv_b(kv_b, heads, nope, v)
    }

    fn embed(&self, table: &PreparedWeight, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let _p = Paused::new();
        self.0.embed(table, tokens, out)
    }

    fn linear(&self, x: &[f32], m: usize, w: &PreparedWeight, y: &mut [f32]) -> Result<()> {
        let _p = Paused::new();
        self.0.linear(x, m, w, y)
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
        let _p = Paused::new();
        self.0.linear_heads(x, rows, x_stride, x_off, ws, y)
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) -> Result<()> {
        let _p = Paused::new();
        self.0.rms_norm(x, stride, w, eps)
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
        let _p = Paused::new();
        self.0.rope(rope, x, heads, stride, off, positions)
    }

    fn gather_cols(
        &self,
        src: &[f32],
        stride: usize,
        off: usize,
        len: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        let _p = Paused::new();
        self.0.gather_cols(src, stride, off, len, dst)
    }

    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()> {
        let _p = Paused::new();
        self.0.add(x, y)
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
        let _p = Paused::new();
        self.0
            .mla_decode(cache, seqs, heads, q_abs, q_pe, scale, out)
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
        let _p = Paused::new();
        self.0
            .mla_prefill(cache, seq, start, heads, q, w, scale, out)
    }

    fn mlp(
        &self,
        x: &[f32],
        m: usize,
        w: &MlpWeights,
        accumulate: bool,
        y: &mut [f32],
    ) -> Result<()> {
        let _p = Paused::new();
        self.0.mlp(x, m, w, accumulate, y)
    }

    fn moe(
        &self,
        x: &[f32],
        hidden: usize,
        groups: &[MoeGroup<'_>],
        row_weight: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let _p = Paused::new();
        self.0.moe(x, hidden, groups, row_weight, y)
    }
}

/// The in-process experts with counting paused inside.
struct OutsideExperts(LocalExperts);

impl RoutedExperts for OutsideExperts {
    fn start(&self, layer: usize, rows: &[f32], routing: &[Routing]) -> Result<PendingExperts> {
        let _p = Paused::new();
        self.0.start(layer, rows, routing)
    }

    fn start_with_shared(
        &self,
        layer: usize,
        rows: &[f32],
        routing: &[Routing],
        shared: Option<&Mlp>,
    ) -> Result<(PendingExperts, bool)> {
        let _p = Paused::new();
        self.0.start_with_shared(layer, rows, routing, shared)
    }
}

fn instrumented_model() -> Model {
    let dir = fixture_dir("open-fp8");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let store = Store::open(&dir).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(Outside(CpuBackend::shared()));
    let all: Vec<usize> = (0..cfg.n_routed_experts).collect();
    let experts = LocalExperts::load_on(&cfg, store.clone(), &all, backend.clone()).unwrap();
    Model::with_backend(cfg, store, Arc::new(OutsideExperts(experts)), backend).unwrap()
}

fn prompt(seed: u32, len: usize, vocab: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7919 + seed * 104_729 + 13) % vocab)
        .collect()
}

fn inputs<'a>(caches: &'a mut [SeqCache], toks: &'a [Vec<u32>]) -> Vec<SeqInput<'a>> {
    caches
        .iter_mut()
        .zip(toks)
        .map(|(cache, t)| SeqInput {
            tokens: t,
            cache,
            all_logits: false,
        })
        .collect()
}

/// After one warm-up step of each shape, decode steps and mixed (prefill chunk + decode) steps
/// make no allocation in the model's own code.
#[test]
fn forward_into_allocates_nothing_once_warm() {
    let model = instrumented_model();
    let v = model.cfg.vocab_size as u32;
    let mut pool = model.new_pool(1024);
    let mut sc = ForwardScratch::default();
    let mut caches = vec![SeqCache::default(); 3];
    // Prefill three prompts of different lengths in one step (the largest shape first, so the
    // later steps fit the buffers it grew).
    let prompts: Vec<Vec<u32>> = [(1, 40), (2, 23), (3, 17)]
        .iter()
        .map(|&(s, n)| prompt(s, n, v))
        .collect();
    let mut batch = inputs(&mut caches, &prompts);
    model.forward_into(&mut pool, &mut batch, &mut sc).unwrap();
    drop(batch);
    let mut step = |caches: &mut [SeqCache], toks: &[Vec<u32>]| {
        let mut batch = inputs(caches, toks);
        // The inputs are built outside the counted region: they are the caller's.
        allocations_of(|| model.forward_into(&mut pool, &mut batch, &mut sc).unwrap()).1
    };
    let decode: Vec<Vec<u32>> = (0..3).map(|i| vec![(i * 11 + 5) % v]).collect();
    step(&mut caches, &decode); // warm-up of the decode shape
    for k in 0..3 {
        let n = step(&mut caches, &decode);
        assert_eq!(n, 0, "decode step {k} allocated {n} times in the model");
    }
    // A mixed step: a 9-token chunk for the first sequence, one token for the others.
    let mixed = vec![prompt(9, 9, v), vec![7], vec![8]];
    step(&mut caches, &mixed);
    let n = step(&mut caches, &mixed);
    assert_eq!(n, 0, "a mixed step allocated {n} times in the model");
    // The counter does see the model's allocations: the convenience `forward`, whose buffers
    // are new at every call, is counted.
    let mut batch = inputs(&mut caches, &decode);
    let (_, n) = allocations_of(|| model.forward(&mut pool, &mut batch).unwrap());
    assert!(n > 0, "forward with fresh buffers counted no allocation");
}

/// Buffers reused after steps of other shapes hold stale values; the logits must not see them.
#[test]
fn reused_buffers_give_the_logits_of_fresh_ones() {
    let model = instrumented_model();
    let v = model.cfg.vocab_size as u32;
    let (p1, p2) = (prompt(4, 30, v), prompt(5, 12, v));
    // Reused: a two-sequence prefill, then p2's next token on its own.
    let mut pool = model.new_pool(1024);
    let mut sc = ForwardScratch::default();
    let mut caches = vec![SeqCache::default(); 2];
    let toks = vec![p1.clone(), p2.clone()];
    model
        .forward_into(&mut pool, &mut inputs(&mut caches, &toks), &mut sc)
        .unwrap();
    let next = [vec![3u32]];
    model
        .forward_into(&mut pool, &mut inputs(&mut caches[1..], &next), &mut sc)
        .unwrap();
    let reused = sc.logits(0).to_vec();
    // Fresh: p2 alone, then the same token, each step with new buffers.
    let mut pool = model.new_pool(1024);
    let mut cache = vec![SeqCache::default()];
    model
        .forward(
            &mut pool,
            &mut inputs(&mut cache, std::slice::from_ref(&p2)),
        )
        .unwrap();
    let fresh = model
        .forward(&mut pool, &mut inputs(&mut cache, &next))
        .unwrap()
        .remove(0);
    assert_eq!(reused.len(), fresh.len());
    // Batched with another sequence vs alone: the same math with rows in other GEMM tiles, so
    // equal up to f32 rounding (the bound the consistency tests use for batching).
    for (a, b) in reused.iter().zip(&fresh) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "reused buffers changed a logit: {a} vs {b}"
        );
    }
}
