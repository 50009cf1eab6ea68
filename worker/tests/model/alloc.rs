//! The hot path of a step allocates nothing once the engine's buffers have seen a step of the
//! same shape (issue 9, item 5), and reusing those buffers gives the same logits as fresh ones.
//!
//! A counting global allocator counts every thread's allocations while armed: the model's
//! own code, the backend's operations and the kernel threads they run on, and the in-process
//! experts. To count nothing but the step, the counting test runs alone in a child process
//! (this test binary, started again with a filter). Each allocation is charged to the
//! operation running when it was made, so a failure names where it allocated.

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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

struct Counting;

/// What can be charged: the model's own code (0), then each operation.
const OPS: [&str; 12] = [
    "model",
    "embed",
    "linear",
    "linear_heads",
    "rms_norm",
    "rope",
    "gather_cols",
    "add",
    "mla_decode",
    "mla_prefill",
    "mlp|moe",
    "experts",
];
static ARMED: AtomicBool = AtomicBool::new(false);
/// The operation running now (one step at a time runs in the counting process).
static OP: AtomicUsize = AtomicUsize::new(0);
static COUNTS: [AtomicU64; OPS.len()] = [const { AtomicU64::new(0) }; OPS.len()];

fn note() {
    if ARMED.load(Ordering::Relaxed) {
        COUNTS[OP.load(Ordering::Relaxed)].fetch_add(1, Ordering::Relaxed);
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

/// Allocations `f` made, per operation (`(name, count)` of those that allocated).
fn allocations_of<R>(f: impl FnOnce() -> R) -> (R, Vec<(&'static str, u64)>) {
    for c in &COUNTS {
        c.store(0, Ordering::SeqCst);
    }
    ARMED.store(true, Ordering::SeqCst);
    let r = f();
    ARMED.store(false, Ordering::SeqCst);
    let counts = OPS
        .iter()
        .zip(&COUNTS)
        .map(|(&n, c)| (n, c.load(Ordering::SeqCst)))
        .filter(|&(_, c)| c > 0)
        .collect();
    (r, counts)
}

/// Charges allocations to operation `OPS[i]` while it lives.
struct Charged(usize);

impl Charged {
    fn op(name: &str) -> Self {
        let i = OPS
            .iter()
            .position(|&n| n == name)
            .expect("a known operation");
        Charged(OP.swap(i, Ordering::SeqCst))
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        OP.store(self.0, Ordering::SeqCst);
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
        let _p = Charged::op("embed");
        self.0.embed(table, tokens, out)
    }

    fn linear(&self, x: &[f32], m: usize, w: &PreparedWeight, y: &mut [f32]) -> Result<()> {
        let _p = Charged::op("linear");
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
        let _p = Charged::op("linear_heads");
        self.0.linear_heads(x, rows, x_stride, x_off, ws, y)
    }

    fn rms_norm(&self, x: &mut [f32], stride: usize, w: &[f32], eps: f32) -> Result<()> {
        let _p = Charged::op("rms_norm");
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
        let _p = Charged::op("rope");
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
        let _p = Charged::op("gather_cols");
        self.0.gather_cols(src, stride, off, len, dst)
    }

    fn add(&self, x: &mut [f32], y: &[f32]) -> Result<()> {
        let _p = Charged::op("add");
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
        let _p = Charged::op("mla_decode");
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
        let _p = Charged::op("mla_prefill");
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
        let _p = Charged::op("mlp|moe");
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
        let _p = Charged::op("mlp|moe");
        self.0.moe(x, hidden, groups, row_weight, y)
    }
}

/// The in-process experts with counting paused inside.
struct OutsideExperts(LocalExperts);

impl RoutedExperts for OutsideExperts {
    fn start(&self, layer: usize, rows: &[f32], routing: &[Routing]) -> Result<PendingExperts> {
        let _p = Charged::op("experts");
        self.0.start(layer, rows, routing)
    }

    fn start_with_shared(
        &self,
        layer: usize,
        rows: &[f32],
        routing: &[Routing],
        shared: Option<&Mlp>,
    ) -> Result<(PendingExperts, bool)> {
        let _p = Charged::op("experts");
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

/// Set in the child process that runs [`steps_allocate_nothing_in_a_quiet_process`].
const CHILD: &str = "SHARDSEEK_ALLOC_CHILD";

/// Runs the counting test alone in a child process: the allocator counts every thread, so no
/// other test may run beside it.
#[test]
fn forward_into_allocates_nothing_once_warm() {
    let name = "alloc::steps_allocate_nothing_in_a_quiet_process";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the counting process failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the counting test did not run:\n{text}"
    );
}

/// After warm-up steps of each shape, decode steps and mixed (prefill chunk + decode) steps
/// make no allocation in the model's own code, and almost none on any thread: the backend's
/// operations, the kernel threads they run on and the in-process experts take their buffers
/// from the kernels' scratch lists. What remains is a kernel thread meeting a buffer size
/// class for the first time (which thread runs which task changes from step to step; a team
/// worker may win its first task of some small operation only after many steps): at most
/// [`MAX_PER_STEP`] allocations per step on average over [`COUNTED`] steps, where a decode step
/// made over a hundred before the scratch lists. (The test passed 300 runs of 300 on the
/// development machine, 150 of them three at a time.)
#[test]
#[ignore = "run alone, in its own process, by forward_into_allocates_nothing_once_warm"]
fn steps_allocate_nothing_in_a_quiet_process() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "counts every thread: run it through forward_into_allocates_nothing_once_warm"
    );
    let model = instrumented_model();
    let v = model.cfg.vocab_size as u32;
    let mut pool = model.new_pool(4096);
    let mut sc = ForwardScratch::default();
    let mut caches = vec![SeqCache::default(); 3];
    // Prefill three prompts of different lengths in one step (the largest shape first, so the
    // later steps fit the buffers it grew). The first is long enough that the 30 mixed steps'
    // chunks stay within the block list it already has room for: a sequence's block list
    // growing is the sequence's, not the step's.
    let prompts: Vec<Vec<u32>> = [(1, 600), (2, 23), (3, 17)]
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
    // A mixed step: a 9-token chunk for the first sequence, one token for the others.
    let mixed = vec![prompt(9, 9, v), vec![7], vec![8]];
    for (what, toks) in [("decode", &decode), ("mixed", &mixed)] {
        for _ in 0..WARM_UP {
            step(&mut caches, toks);
        }
        let mut total = 0;
        for k in 0..COUNTED {
            let n = step(&mut caches, toks);
            let model_own: u64 = n.iter().filter(|(op, _)| *op == "model").map(|c| c.1).sum();
            assert_eq!(
                model_own, 0,
                "{what} step {k}: the model's own code allocated: {n:?}"
            );
            total += n.iter().map(|c| c.1).sum::<u64>();
        }
        assert!(
            total <= MAX_PER_STEP * COUNTED as u64,
            "{what} steps allocated {total} times in {COUNTED} steps"
        );
    }
    // The counter does see allocations: the convenience `forward`, whose buffers are new at
    // every call, is counted.
    let mut batch = inputs(&mut caches, &decode);
    let (_, n) = allocations_of(|| model.forward(&mut pool, &mut batch).unwrap());
    assert!(
        n.iter().any(|&(op, _)| op == "model"),
        "forward with fresh buffers counted no allocation: {n:?}"
    );
}

/// Steps of a shape before counting.
const WARM_UP: usize = 10;
/// Steps of a shape counted.
const COUNTED: usize = 20;
/// Allocations a warm step may make on average (kernel threads' first buffers of a class).
const MAX_PER_STEP: u64 = 2;

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
