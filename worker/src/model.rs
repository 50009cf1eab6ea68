//! The DeepSeek-V3 forward pass (DESIGN.md §3): embeddings → [RMSNorm → MLA → RMSNorm → dense
//! MLP or MoE] × layers → final norm → lm_head, activations in f32, weights in their stored
//! dtype. The model only says what each layer computes; every operation runs on a
//! [`Backend`] chosen at load, with weights prepared for it once (`crate::backend`).
//!
//! The latent cache holds, per token and layer, the normalised latent c (kv_lora_rank) and the
//! rotated rope key k_pe. Decode runs MLA in the absorbed form (kernels::mla): scores are
//! (q_nope·W_UK)·c + q_pe·k_pe and the output is W_UV·(Σ p·c). A prefill chunk runs in the
//! expanded form: K_nope = W_UK·c and V = W_UV·c are decompressed for the chunk's context and
//! every head attends over [k_nope, k_pe] (the absorbed form is kept for short chunks after a
//! long cached prefix, where it does less work; `kernels::mla::prefer_expanded`). Both are the
//! math of the reference, reassociated, so prefill-then-decode and a full recompute give the
//! same numbers up to f32 rounding.

use crate::backend::{Backend, CpuBackend, MlaWeights, MlpWeights, PreparedWeight};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::{LocalExperts, PendingExperts, RoutedExperts, RowFailure};
use crate::kv::{KvDtype, KvLayout, KvPool, SeqCache};
use crate::weights::Store;
use shardseek_kernels::gate::{GateParams, GateScratch, Routing, noaux_tc_into};
use shardseek_kernels::mla::SeqPages;
use shardseek_kernels::rope::Rope;
use std::path::Path;
use std::sync::Arc;

/// gate/up/down projections of one SwiGLU MLP (dense layer, shared or routed expert), as the
/// backend holds them.
pub type Mlp = MlpWeights;

/// Locates and prepares an MLP's three projections.
pub fn load_mlp(
    backend: &dyn Backend,
    store: &Arc<Store>,
    prefix: &str,
    hidden: usize,
    inter: usize,
) -> Result<Mlp> {
    let lin = |name: &str, rows, cols| -> Result<PreparedWeight> {
        backend.prepare(
            store,
            &store.linear(&format!("{prefix}.{name}.weight"), rows, cols)?,
        )
    };
    Ok(MlpWeights {
        gate: lin("gate_proj", inter, hidden)?,
        up: lin("up_proj", inter, hidden)?,
        down: lin("down_proj", hidden, inter)?,
    })
}

enum QProj {
    LoRA {
        a: PreparedWeight,
        norm: Vec<f32>,
        b: PreparedWeight,
    },
    Full(PreparedWeight),
}

struct Attention {
    q: QProj,
    kv_a: PreparedWeight,
    kv_a_norm: Vec<f32>,
    /// kv_b split into per-head W_UKᵀ and W_UV at load.
    mla: MlaWeights,
    o: PreparedWeight,
}

struct MoeGate {
    weight: PreparedWeight,
    bias: Vec<f32>,
    shared: Option<Mlp>,
}

enum Ffn {
    Dense(Mlp),
    Moe(MoeGate),
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attention,
    ffn: Ffn,
}

/// Which routed experts this process holds.
#[derive(Clone, Debug)]
pub enum ExpertSelection {
    /// Every routed expert (single process).
    All,
    /// None: routed experts are computed elsewhere (attention pod with expert shards).
    Remote,
}

/// The dtype of the output projection (lm_head): `--lm-head-dtype`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LmHeadDtype {
    /// As stored in the checkpoint (BF16 in DeepSeek's FP8 releases): exact.
    #[default]
    Checkpoint,
    /// FP8 e4m3 with 128×128 block scales ([`Model::quantize_lm_head_fp8`]).
    Fp8,
}

impl std::str::FromStr for LmHeadDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "checkpoint" => Ok(Self::Checkpoint),
            "fp8" => Ok(Self::Fp8),
            _ => Err(Error::Input(format!(
                "lm-head dtype `{s}`: use checkpoint or fp8"
            ))),
        }
    }
}

impl LmHeadDtype {
    /// Applies the choice to a loaded model.
    pub fn apply(self, model: &mut Model) -> Result<()> {
        match self {
            Self::Checkpoint => Ok(()),
            Self::Fp8 => model.quantize_lm_head_fp8(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoint",
            Self::Fp8 => "fp8",
        }
    }
}

/// One sequence's part of a forward step: new tokens appended to its cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    /// Logits for every new token (prompt log-probs) instead of only the last.
    pub all_logits: bool,
}

/// Micro-batch overlap settings (DESIGN.md §2: two micro-batches in flight).
#[derive(Clone, Debug)]
pub struct Overlap {
    pub enabled: bool,
    /// Smallest batch (in tokens) that is split in two.
    pub min_tokens: usize,
}

impl Default for Overlap {
    fn default() -> Self {
        // Below a handful of tokens per half, the second round trip costs more than it hides.
        Self {
            enabled: true,
            min_tokens: 8,
        }
    }
}

#[derive(Clone, Debug)]
struct MicroBatch {
    seqs: std::ops::Range<usize>,
    row0: usize,
    rows: usize,
}

/// Resizes `buf` to `n` zeros without giving back capacity: once a step of this shape ran,
/// the same buffer serves every later step without allocating.
fn zeroed<T: Copy + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    buf.clear();
    buf.resize(n, T::default());
    buf
}

/// An empty vector of `SeqPages` that keeps `v`'s allocation (in-place collect of an empty
/// iterator): the pages borrowed by one step must not outlive it, the buffer should.
#[expect(
    clippy::unnecessary_filter_map,
    reason = "filter_map is what changes the element's lifetime; filter keeps the short one"
)]
fn reuse_pages<'b>(mut v: Vec<SeqPages<'_>>) -> Vec<SeqPages<'b>> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

/// The buffers of one MLA call (queries, latent entries, context, output).
#[derive(Default)]
struct AttnScratch {
    q: Vec<f32>,
    qa: Vec<f32>,
    kv: Vec<f32>,
    q_abs: Vec<f32>,
    q_pe: Vec<f32>,
    ctx: Vec<f32>,
    o: Vec<f32>,
    out: Vec<f32>,
    seqs: Vec<SeqPages<'static>>,
}

/// One micro-batch's residual stream, its normalised copy, its MLA and router buffers, and its
/// MoE layer in flight.
#[derive(Default)]
struct GroupScratch {
    x: Vec<f32>,
    y: Vec<f32>,
    attn: AttnScratch,
    gate_logits: Vec<f32>,
    routing: Vec<Routing>,
    gate: GateScratch,
    /// The shared expert's output when the routed experts are remote (computed while they run).
    shared: Vec<f32>,
    pending: Option<PendingMoe>,
}

/// Every buffer of a forward step, owned by the caller and reused from step to step (the
/// engine keeps one for its lifetime): after the first step of a given shape, the model's own
/// code allocates nothing on the hot path. What the backend and the routed experts allocate
/// inside their operations is theirs.
#[derive(Default)]
pub struct ForwardScratch {
    tokens: Vec<u32>,
    positions: Vec<usize>,
    starts: Vec<usize>,
    x: Vec<f32>,
    micro: Vec<MicroBatch>,
    groups: Vec<GroupScratch>,
    hsel: Vec<f32>,
    logits: Vec<f32>,
    /// Per sequence of the last step: first row of its logits in `logits`, and row count.
    spans: Vec<(usize, usize)>,
    vocab: usize,
}

impl ForwardScratch {
    /// Sequences of the last step.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Logits of sequence `i` of the last step: its last new token's row, or every new
    /// token's rows with `all_logits`, each `vocab_size` long.
    pub fn logits(&self, i: usize) -> &[f32] {
        let (r0, n) = self.spans[i];
        &self.logits[r0 * self.vocab..(r0 + n) * self.vocab]
    }

    /// [`ForwardScratch::logits`], writable (the sampler's logits processors edit rows).
    pub fn logits_mut(&mut self, i: usize) -> &mut [f32] {
        let (r0, n) = self.spans[i];
        &mut self.logits[r0 * self.vocab..(r0 + n) * self.vocab]
    }
}

/// A MoE layer in flight for one micro-batch.
struct PendingMoe {
    layer: usize,
    routed: PendingExperts,
    /// Whether the group's `shared` buffer holds the shared expert's output to add.
    shared: bool,
    len: usize,
}

impl PendingMoe {
    /// Waits for the routed experts and adds them and the shared expert to the residual.
    /// Returns the rows whose routed sums are incomplete (a shard failed under them).
    fn finish(
        self,
        backend: &dyn Backend,
        x: &mut [f32],
        shared: &[f32],
    ) -> Result<Vec<RowFailure>> {
        let (out, failures) = self.routed.wait_partial()?;
        if out.len() != self.len {
            return Err(Error::Dispatch {
                layer: self.layer,
                detail: format!(
                    "expert backend returned {} values for {}",
                    out.len(),
                    self.len
                ),
            });
        }
        backend.add(x, &out)?;
        crate::experts::recycle(out);
        if self.shared {
            backend.add(x, shared)?;
        }
        Ok(failures)
    }
}

/// Tells the routed experts that a step ended, however it ends.
struct StepGuard<'a>(&'a dyn RoutedExperts);

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        self.0.step_finished();
    }
}

/// A loaded model.
pub struct Model {
    pub cfg: ModelConfig,
    pub store: Arc<Store>,
    backend: Arc<dyn Backend>,
    embed: PreparedWeight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: PreparedWeight,
    rope: Rope,
    softmax_scale: f32,
    gate_params: GateParams,
    experts: Arc<dyn RoutedExperts>,
    overlap: Overlap,
}

impl Model {
    /// Loads config, tensors and (per `sel`) the routed experts from a checkpoint directory.
    pub fn load(dir: &Path, sel: ExpertSelection) -> Result<Self> {
        Self::load_on(dir, sel, CpuBackend::shared())
    }

    /// [`Model::load`] with every weight prepared for, and every layer run on, `backend`.
    pub fn load_on(dir: &Path, sel: ExpertSelection, backend: Arc<dyn Backend>) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let store = Store::open(dir)?;
        let experts: Arc<dyn RoutedExperts> = match sel {
            ExpertSelection::All => {
                let all: Vec<usize> = (0..cfg.n_routed_experts).collect();
                Arc::new(LocalExperts::load_on(
                    &cfg,
                    store.clone(),
                    &all,
                    backend.clone(),
                )?)
            }
            ExpertSelection::Remote => Arc::new(crate::experts::NoExperts),
        };
        Self::with_backend(cfg, store, experts, backend)
    }

    /// A model over an opened store on the CPU backend.
    pub fn from_store(
        cfg: ModelConfig,
        store: Arc<Store>,
        experts: Arc<dyn RoutedExperts>,
    ) -> Result<Self> {
        Self::with_backend(cfg, store, experts, CpuBackend::shared())
    }

    /// A model whose weights are prepared for, and whose layers run on, `backend`.
    pub fn with_backend(
        cfg: ModelConfig,
        store: Arc<Store>,
        experts: Arc<dyn RoutedExperts>,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let be = &*backend;
        let lin = |name: &str, rows: usize, cols: usize| -> Result<PreparedWeight> {
            be.prepare(&store, &store.linear(name, rows, cols)?)
        };
        let embed = lin("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let lm_head = if store.contains("lm_head.weight") || !cfg.tie_word_embeddings {
            lin("lm_head.weight", cfg.vocab_size, h)?
        } else {
            embed.clone()
        };
        let norm = store.vector_f32("model.norm.weight", &[h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let q = match cfg.q_lora_rank {
                Some(r) => QProj::LoRA {
                    a: lin(&format!("{p}.self_attn.q_a_proj.weight"), r, h)?,
                    norm: store.vector_f32(&format!("{p}.self_attn.q_a_layernorm.weight"), &[r])?,
                    b: lin(
                        &format!("{p}.self_attn.q_b_proj.weight"),
                        heads * cfg.qk_head_dim(),
                        r,
                    )?,
                },
                None => QProj::Full(lin(
                    &format!("{p}.self_attn.q_proj.weight"),
                    heads * cfg.qk_head_dim(),
                    h,
                )?),
            };
            let kv_a = lin(
                &format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
                cfg.latent_dim(),
                h,
            )?;
            let kv_a_norm = store.vector_f32(
                &format!("{p}.self_attn.kv_a_layernorm.weight"),
                &[cfg.kv_lora_rank],
            )?;
            let kv_b = lin(
                &format!("{p}.self_attn.kv_b_proj.weight"),
                heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                cfg.kv_lora_rank,
            )?;
            let attn = Attention {
                q,
                kv_a,
                kv_a_norm,
                mla: be.prepare_kv_b(kv_b, heads, cfg.qk_nope_head_dim, cfg.v_head_dim)?,
                o: lin(
                    &format!("{p}.self_attn.o_proj.weight"),
                    h,
                    heads * cfg.v_head_dim,
                )?,
            };
            let ffn = if cfg.is_moe_layer(l) {
                let e = cfg.n_routed_experts;
                let bias_name = format!("{p}.mlp.gate.e_score_correction_bias");
                let bias = if store.contains(&bias_name) {
                    store.vector_f32(&bias_name, &[e])?
                } else {
                    vec![0.0; e]
                };
                let shared = if cfg.n_shared_experts > 0 {
                    Some(load_mlp(
                        be,
                        &store,
                        &format!("{p}.mlp.shared_experts"),
                        h,
                        cfg.moe_intermediate_size * cfg.n_shared_experts,
                    )?)
                } else {
                    None
                };
                Ffn::Moe(MoeGate {
                    weight: lin(&format!("{p}.mlp.gate.weight"), e, h)?,
                    bias,
                    shared,
                })
            } else {
                Ffn::Dense(load_mlp(
                    be,
                    &store,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                )?)
            };
            layers.push(Layer {
                input_norm: store.vector_f32(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: store
                    .vector_f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn,
                ffn,
            });
        }
        let rope = Rope::new(
            cfg.qk_rope_head_dim,
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
        );
        let softmax_scale = cfg.softmax_scale();
        let gate_params = GateParams {
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor,
        };
        Ok(Self {
            cfg,
            store,
            backend,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            softmax_scale,
            gate_params,
            experts,
            overlap: Overlap::default(),
        })
    }

    /// The backend the layers run on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Sets the micro-batch overlap policy.
    pub fn set_overlap(&mut self, overlap: Overlap) {
        self.overlap = overlap;
    }

    /// Replaces the routed-expert backend (e.g. the dispatch client of an attention pod).
    pub fn set_experts(&mut self, experts: Arc<dyn RoutedExperts>) {
        self.experts = experts;
    }

    /// Quantises the output projection (lm_head, BF16 in DeepSeek's FP8 checkpoints) to FP8
    /// with 128×128 block scales, as every other projection of those checkpoints is: decode
    /// reads half the bytes for it (a quarter of a small model's bytes per token), at e4m3's
    /// precision for the logits (see `worker/tests/model/kv_dtype.rs` for its tolerance).
    /// `--lm-head-dtype fp8`; the default keeps the checkpoint's dtype.
    pub fn quantize_lm_head_fp8(&mut self) -> Result<()> {
        self.lm_head = self.backend.adopt(self.lm_head.to_fp8_blocks())?;
        Ok(())
    }

    /// The latent cache's shape for this model in `dtype`.
    pub fn kv_layout(&self, dtype: KvDtype) -> KvLayout {
        KvLayout {
            layers: self.cfg.num_hidden_layers,
            kv_lora_rank: self.cfg.kv_lora_rank,
            rope_dim: self.cfg.qk_rope_head_dim,
            dtype,
        }
    }

    /// A private f32 (exact) cache pool with room for `tokens` tokens of one sequence.
    pub fn new_pool(&self, tokens: usize) -> KvPool {
        self.new_pool_with(tokens, KvDtype::F32)
    }

    /// A private cache pool in `dtype` with room for `tokens` tokens of one sequence.
    pub fn new_pool_with(&self, tokens: usize, dtype: KvDtype) -> KvPool {
        KvPool::new(
            self.kv_layout(dtype),
            tokens.div_ceil(crate::kv::BLOCK_TOKENS).max(1),
        )
    }

    /// Runs one step for a batch of sequences: appends their new tokens to their caches and
    /// returns, per sequence, the logits of its last new token (or of all of them with
    /// `all_logits`), each `vocab_size` long. Fails when any sequence's routed experts failed.
    /// A convenience over [`Model::forward_into`] that allocates its buffers for this call.
    pub fn forward(&self, pool: &mut KvPool, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        let mut sc = ForwardScratch::default();
        let failed = self.forward_into(pool, batch, &mut sc)?;
        match failed.into_iter().next() {
            None => Ok((0..sc.len()).map(|i| sc.logits(i).to_vec()).collect()),
            Some((_, f)) => Err(f.into_error()),
        }
    }

    /// [`Model::forward`] into buffers the caller keeps from step to step: the logits are
    /// read with [`ForwardScratch::logits`]. This is the engine's hot path.
    ///
    /// A failure of remote experts (an expert shard died and no replica holds its experts)
    /// fails only the sequences whose tokens were routed there: they are returned (index into
    /// the batch, first failure) and their logits are meaningless; the others' logits are
    /// exact. Rows are independent through every operation of a step (attention reads only the
    /// sequence's own cache), so the failed rows' incomplete sums reach no other sequence.
    pub fn forward_into(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqInput<'_>],
        sc: &mut ForwardScratch,
    ) -> Result<Vec<(usize, RowFailure)>> {
        let cfg = &self.cfg;
        let be = &*self.backend;
        let h = cfg.hidden_size;
        sc.spans.clear();
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Input("a sequence in the batch has no tokens".into()));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::Input(format!(
                    "token id {t} is out of range (vocab_size {})",
                    cfg.vocab_size
                )));
            }
        }
        if pool.latent_dim() != cfg.latent_dim() {
            return Err(Error::Input("KV pool was made for another model".into()));
        }
        let needed: usize = batch
            .iter()
            .map(|s| pool.blocks_needed(s.cache, s.cache.len + s.tokens.len()))
            .sum();
        if needed > pool.available() {
            return Err(Error::Input(format!(
                "KV cache full: the step needs {needed} blocks, {} available",
                pool.available()
            )));
        }
        for s in batch.iter_mut() {
            let len = s.cache.len + s.tokens.len();
            pool.reserve(s.cache, len)?;
        }
        let ForwardScratch {
            tokens,
            positions,
            starts,
            x,
            micro,
            groups,
            hsel,
            logits,
            spans,
            vocab,
        } = sc;
        tokens.clear();
        tokens.extend(batch.iter().flat_map(|s| s.tokens.iter().copied()));
        positions.clear();
        positions.extend(
            batch
                .iter()
                .flat_map(|s| s.cache.len..s.cache.len + s.tokens.len()),
        );
        let total = tokens.len();
        let x = zeroed(x, total * h);
        be.embed(&self.embed, tokens, x)?;
        starts.clear();
        starts.extend(batch.iter().map(|s| s.cache.len));
        self.micro_batches(batch, micro);
        if groups.len() < micro.len() {
            groups.resize_with(micro.len(), GroupScratch::default);
        }
        for (g, st) in micro.iter().zip(groups.iter_mut()) {
            st.x.clear();
            st.x.extend_from_slice(&x[g.row0 * h..(g.row0 + g.rows) * h]);
            st.pending = None;
        }
        // One placement table for the whole step (remote experts switch tables between steps).
        self.experts.step_started();
        let _step = StepGuard(&*self.experts);
        // (first row of the micro-batch, failure with micro-batch row indices); empty, it does
        // not allocate.
        let mut failures: Vec<(usize, RowFailure)> = Vec::new();
        // Software pipeline over micro-batches: a group's routed experts are started (possibly
        // on remote shards) and only awaited when that group comes round again, so the other
        // group's attention runs while the experts compute.
        for (l, layer) in self.layers.iter().enumerate() {
            for (g, st) in micro.iter().zip(groups.iter_mut()) {
                if let Some(p) = st.pending.take() {
                    let lost = p.finish(be, &mut st.x, &st.shared)?;
                    failures.extend(lost.into_iter().map(|f| (g.row0, f)));
                }
                let rows = g.row0..g.row0 + g.rows;
                // x += MLA(RMSNorm(x))
                st.y.clear();
                st.y.extend_from_slice(&st.x);
                be.rms_norm(&mut st.y, h, &layer.input_norm, cfg.rms_norm_eps)?;
                let a = self.attention(
                    l,
                    &layer.attn,
                    &st.y,
                    pool,
                    &mut batch[g.seqs.clone()],
                    &starts[g.seqs.clone()],
                    &positions[rows],
                    &mut st.attn,
                )?;
                be.add(&mut st.x, a)?;
                // x += FFN(RMSNorm(x))
                st.y.clear();
                st.y.extend_from_slice(&st.x);
                be.rms_norm(&mut st.y, h, &layer.post_norm, cfg.rms_norm_eps)?;
                match &layer.ffn {
                    Ffn::Dense(mlp) => be.mlp(&st.y, g.rows, mlp, true, &mut st.x)?,
                    Ffn::Moe(gate) => st.pending = Some(self.start_moe(l, gate, g.rows, st)?),
                }
            }
        }
        for (g, st) in micro.iter().zip(groups.iter_mut()) {
            if let Some(p) = st.pending.take() {
                let lost = p.finish(be, &mut st.x, &st.shared)?;
                failures.extend(lost.into_iter().map(|f| (g.row0, f)));
            }
            x[g.row0 * h..(g.row0 + g.rows) * h].copy_from_slice(&st.x);
        }
        // Rows → sequences; a sequence keeps its first failure (the earliest layer). Only a step
        // with failures pays for the map.
        let mut failed: Vec<(usize, RowFailure)> = Vec::new();
        if !failures.is_empty() {
            let mut seq_of_row = Vec::with_capacity(total);
            for (i, s) in batch.iter().enumerate() {
                seq_of_row.extend(std::iter::repeat_n(i, s.tokens.len()));
            }
            for (row0, f) in failures {
                for &r in &f.rows {
                    if let Some(&seq) = seq_of_row.get(row0 + r)
                        && !failed.iter().any(|(s, _)| *s == seq)
                    {
                        failed.push((seq, f.clone()));
                    }
                }
            }
            failed.sort_by_key(|(s, _)| *s);
        }
        for s in batch.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        // Only the rows whose logits are wanted go through the final norm and lm_head.
        hsel.clear();
        let mut r0 = 0;
        for s in batch.iter() {
            let n = s.tokens.len();
            let first = if s.all_logits { r0 } else { r0 + n - 1 };
            spans.push((hsel.len() / h, r0 + n - first));
            hsel.extend_from_slice(&x[first * h..(r0 + n) * h]);
            r0 += n;
        }
        let rows = hsel.len() / h;
        be.rms_norm(hsel, h, &self.norm, cfg.rms_norm_eps)?;
        let v = cfg.vocab_size;
        *vocab = v;
        be.linear(hsel, rows, &self.lm_head, zeroed(logits, rows * v))?;
        Ok(failed)
    }

    /// Router choice for the `m` normalised rows in `st.y` of MoE layer `l`, into
    /// `st.routing` (its per-row vectors are refilled, not reallocated).
    fn route(&self, g: &MoeGate, m: usize, st: &mut GroupScratch) -> Result<()> {
        let e = self.cfg.n_routed_experts;
        let logits = zeroed(&mut st.gate_logits, m * e);
        self.backend.linear(&st.y, m, &g.weight, logits)?;
        st.routing.truncate(m);
        while st.routing.len() < m {
            st.routing.push(Routing {
                experts: Vec::new(),
                weights: Vec::new(),
            });
        }
        for (row, r) in logits.chunks_exact(e).zip(st.routing.iter_mut()) {
            noaux_tc_into(row, &g.bias, &self.gate_params, &mut st.gate, r);
        }
        Ok(())
    }

    /// Routes the `m` rows in `st.y` of MoE layer `l` and starts their routed experts; the
    /// shared expert joins the experts' grouped pass when they are local, and is computed here
    /// (into `st.shared`) while they run when they are remote.
    fn start_moe(
        &self,
        l: usize,
        g: &MoeGate,
        m: usize,
        st: &mut GroupScratch,
    ) -> Result<PendingMoe> {
        self.route(g, m, st)?;
        let y = &st.y;
        let (routed, with_shared) =
            self.experts
                .start_with_shared(l, y, &st.routing, g.shared.as_ref())?;
        let shared = match &g.shared {
            Some(sh) if !with_shared => {
                let out = zeroed(&mut st.shared, y.len());
                self.backend.mlp(y, m, sh, false, out)?;
                true
            }
            _ => false,
        };
        Ok(PendingMoe {
            layer: l,
            routed,
            shared,
            len: y.len(),
        })
    }

    /// Splits a batch into one or two micro-batches of whole sequences with about equal
    /// tokens, into `out`. Two only when enabled, the experts are remote, and the batch is
    /// large enough for the overlap to pay for the extra round trip.
    fn micro_batches(&self, batch: &[SeqInput<'_>], out: &mut Vec<MicroBatch>) {
        out.clear();
        let len = |i: usize| batch[i].tokens.len();
        let total: usize = (0..batch.len()).map(len).sum();
        let split = self.overlap.enabled
            && batch.len() >= 2
            && total >= self.overlap.min_tokens
            && self.experts.is_remote();
        if !split {
            out.push(MicroBatch {
                seqs: 0..batch.len(),
                row0: 0,
                rows: total,
            });
            return;
        }
        let mut acc = 0;
        let mut cut = 1;
        for i in 0..batch.len() {
            let n = len(i);
            if acc + n > total / 2 && i > 0 {
                cut = i;
                break;
            }
            acc += n;
            cut = i + 1;
        }
        let cut = cut.clamp(1, batch.len() - 1);
        let first: usize = (0..cut).map(len).sum();
        out.push(MicroBatch {
            seqs: 0..cut,
            row0: 0,
            rows: first,
        });
        out.push(MicroBatch {
            seqs: cut..batch.len(),
            row0: first,
            rows: total - first,
        });
    }

    /// MLA (DESIGN.md §3) for the rows of `batch`, whose tokens sit at `positions`:
    /// q = W_qb·norm(W_qa·y), c‖k_pe = W_kva·y (c normalised, k_pe rotated, appended to the
    /// latent cache), attention over the cache (absorbed for decode, expanded for a prefill
    /// chunk), out = W_o·o.
    #[allow(clippy::too_many_arguments)]
    fn attention<'s>(
        &self,
        l: usize,
        at: &Attention,
        y: &[f32],
        pool: &mut KvPool,
        batch: &mut [SeqInput<'_>],
        starts: &[usize],
        positions: &[usize],
        sc: &'s mut AttnScratch,
    ) -> Result<&'s [f32]> {
        let cfg = &self.cfg;
        let be = &*self.backend;
        let eps = cfg.rms_norm_eps;
        let (heads, nope, rope_d, vd, lat) = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let (qk, ld) = (nope + rope_d, cfg.latent_dim());
        let t = positions.len();
        // Queries [t, heads, nope + rope].
        let q = zeroed(&mut sc.q, t * heads * qk);
        match &at.q {
            QProj::LoRA { a, norm, b } => {
                let qa = zeroed(&mut sc.qa, t * a.rows);
                be.linear(y, t, a, qa)?;
                be.rms_norm(qa, a.rows, norm, eps)?;
                be.linear(qa, t, b, q)?;
            }
            QProj::Full(w) => be.linear(y, t, w, q)?,
        }
        be.rope(&self.rope, q, heads, qk, nope, positions)?;
        // Cache entries [t, kv_lora_rank + rope]: normalised latent, rotated shared key.
        let kv = zeroed(&mut sc.kv, t * ld);
        be.linear(y, t, &at.kv_a, kv)?;
        be.rms_norm(kv, ld, &at.kv_a_norm, eps)?;
        be.rope(&self.rope, kv, 1, ld, lat, positions)?;
        let mut r0 = 0;
        for (s, &p0) in batch.iter().zip(starts) {
            let n = s.tokens.len();
            pool.write_tokens(l, s.cache, p0, &kv[r0 * ld..(r0 + n) * ld])?;
            be.latent_written(&pool.latent_cache(l)?, s.cache.blocks(), p0, n)?;
            r0 += n;
        }
        // Attention over the paged cache into o [t, heads, v]: runs of one-token sequences
        // as one decode batch in the absorbed form (q̃ = W_UKᵀ·q_nope, attend over latents,
        // W_UV after), each longer chunk causally over its sequence in the form the backend
        // measures faster (expanded for a fresh prompt).
        let cache = pool.latent_cache(l)?;
        let scale = self.softmax_scale;
        let o = zeroed(&mut sc.o, t * heads * vd);
        let (hq, hv) = (heads * qk, heads * vd);
        let mut seqs = reuse_pages(std::mem::take(&mut sc.seqs));
        let mut i = 0;
        let mut r0 = 0;
        while i < batch.len() {
            let n = batch[i].tokens.len();
            if n == 1 {
                let j = (i..batch.len())
                    .find(|&j| batch[j].tokens.len() != 1)
                    .unwrap_or(batch.len());
                seqs.clear();
                seqs.extend((i..j).map(|k| SeqPages {
                    pages: batch[k].cache.blocks(),
                    len: starts[k] + 1,
                }));
                let (r1, b) = (r0 + (j - i), j - i);
                let qs = &q[r0 * hq..r1 * hq];
                let q_abs = zeroed(&mut sc.q_abs, b * heads * lat);
                be.linear_heads(qs, b, qk, 0, &at.mla.w_uk_t, q_abs)?;
                let q_pe = zeroed(&mut sc.q_pe, b * heads * rope_d);
                be.gather_cols(qs, qk, nope, rope_d, q_pe)?;
                let ctx = zeroed(&mut sc.ctx, b * heads * lat);
                be.mla_decode(&cache, &seqs, heads, q_abs, q_pe, scale, ctx)?;
                be.linear_heads(ctx, b, lat, 0, &at.mla.w_uv, &mut o[r0 * hv..r1 * hv])?;
                (i, r0) = (j, r1);
            } else {
                let seq = SeqPages {
                    pages: batch[i].cache.blocks(),
                    len: starts[i] + n,
                };
                let r1 = r0 + n;
                be.mla_prefill(
                    &cache,
                    &seq,
                    starts[i],
                    heads,
                    &q[r0 * hq..r1 * hq],
                    &at.mla,
                    scale,
                    &mut o[r0 * hv..r1 * hv],
                )?;
                (i, r0) = (i + 1, r1);
            }
        }
        sc.seqs = reuse_pages(seqs);
        // out = W_o · o.
        let out = zeroed(&mut sc.out, t * cfg.hidden_size);
        be.linear(o, t, &at.o, out)?;
        Ok(out)
    }
}
