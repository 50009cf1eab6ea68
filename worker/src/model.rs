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
use crate::experts::{LocalExperts, PendingExperts, RoutedExperts};
use crate::kv::{KvDtype, KvLayout, KvPool, SeqCache};
use crate::weights::Store;
use shardseek_kernels::gate::{GateParams, Routing, noaux_tc};
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

struct MicroBatch {
    seqs: std::ops::Range<usize>,
    row0: usize,
    rows: usize,
}

struct GroupState {
    x: Vec<f32>,
    pending: Option<PendingMoe>,
}

/// A MoE layer in flight for one micro-batch.
struct PendingMoe {
    layer: usize,
    routed: PendingExperts,
    shared: Option<Vec<f32>>,
    len: usize,
}

impl PendingMoe {
    /// Waits for the routed experts and adds them and the shared expert to the residual.
    fn finish(self, backend: &dyn Backend, x: &mut [f32]) -> Result<()> {
        let out = self.routed.wait()?;
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
        if let Some(sh) = self.shared {
            backend.add(x, &sh)?;
        }
        Ok(())
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
        let cfg = ModelConfig::from_dir(dir)?;
        let store = Store::open(dir)?;
        let experts: Arc<dyn RoutedExperts> = match sel {
            ExpertSelection::All => {
                let all: Vec<usize> = (0..cfg.n_routed_experts).collect();
                Arc::new(LocalExperts::load(&cfg, store.clone(), &all)?)
            }
            ExpertSelection::Remote => Arc::new(crate::experts::NoExperts),
        };
        Self::from_store(cfg, store, experts)
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
    /// `all_logits`), each `vocab_size` long.
    pub fn forward(&self, pool: &mut KvPool, batch: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let be = &*self.backend;
        let h = cfg.hidden_size;
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
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = batch
            .iter()
            .flat_map(|s| s.cache.len..s.cache.len + s.tokens.len())
            .collect();
        let total = tokens.len();
        let mut x = vec![0f32; total * h];
        be.embed(&self.embed, &tokens, &mut x)?;
        let starts: Vec<usize> = batch.iter().map(|s| s.cache.len).collect();
        let groups = self.micro_batches(batch);
        // Software pipeline over micro-batches: a group's routed experts are started (possibly
        // on remote shards) and only awaited when that group comes round again, so the other
        // group's attention runs while the experts compute.
        let mut state: Vec<GroupState> = groups
            .iter()
            .map(|g| GroupState {
                x: x[g.row0 * h..(g.row0 + g.rows) * h].to_vec(),
                pending: None,
            })
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            for (g, st) in groups.iter().zip(state.iter_mut()) {
                if let Some(p) = st.pending.take() {
                    p.finish(be, &mut st.x)?;
                }
                let rows = g.row0..g.row0 + g.rows;
                let xs = &mut st.x;
                // x += MLA(RMSNorm(x))
                let mut y = xs.clone();
                be.rms_norm(&mut y, h, &layer.input_norm, cfg.rms_norm_eps)?;
                let a = self.attention(
                    l,
                    &layer.attn,
                    &y,
                    pool,
                    &mut batch[g.seqs.clone()],
                    &starts[g.seqs.clone()],
                    &positions[rows],
                )?;
                be.add(xs, &a)?;
                // x += FFN(RMSNorm(x))
                let mut y = xs.clone();
                be.rms_norm(&mut y, h, &layer.post_norm, cfg.rms_norm_eps)?;
                match &layer.ffn {
                    Ffn::Dense(mlp) => be.mlp(&y, g.rows, mlp, true, xs)?,
                    Ffn::Moe(gate) => st.pending = Some(self.start_moe(l, gate, y, g.rows)?),
                }
            }
        }
        for (g, st) in groups.iter().zip(state.iter_mut()) {
            if let Some(p) = st.pending.take() {
                p.finish(be, &mut st.x)?;
            }
            x[g.row0 * h..(g.row0 + g.rows) * h].copy_from_slice(&st.x);
        }
        for s in batch.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        // Only the rows whose logits are wanted go through the final norm and lm_head.
        let mut hsel = Vec::with_capacity(batch.len() * h);
        let mut r0 = 0;
        for s in batch.iter() {
            let n = s.tokens.len();
            let first = if s.all_logits { r0 } else { r0 + n - 1 };
            hsel.extend_from_slice(&x[first * h..(r0 + n) * h]);
            r0 += n;
        }
        let rows = hsel.len() / h;
        be.rms_norm(&mut hsel, h, &self.norm, cfg.rms_norm_eps)?;
        let v = cfg.vocab_size;
        let mut logits = vec![0f32; rows * v];
        be.linear(&hsel, rows, &self.lm_head, &mut logits)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut k = 0;
        for s in batch.iter() {
            let n = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(logits[k * v..(k + n) * v].to_vec());
            k += n;
        }
        Ok(out)
    }

    /// Router choice for `m` normalised rows of MoE layer `l`.
    fn route(&self, g: &MoeGate, y: &[f32], m: usize) -> Result<Vec<Routing>> {
        let e = self.cfg.n_routed_experts;
        let mut logits = vec![0f32; m * e];
        self.backend.linear(y, m, &g.weight, &mut logits)?;
        Ok(logits
            .chunks_exact(e)
            .map(|row| noaux_tc(row, &g.bias, &self.gate_params))
            .collect())
    }

    /// Routes `m` rows of MoE layer `l` and starts their routed experts; the shared expert
    /// joins the experts' grouped pass when they are local, and is computed here while they
    /// run when they are remote.
    fn start_moe(&self, l: usize, g: &MoeGate, y: Vec<f32>, m: usize) -> Result<PendingMoe> {
        let routing = self.route(g, &y, m)?;
        let (routed, with_shared) =
            self.experts
                .start_with_shared(l, &y, &routing, g.shared.as_ref())?;
        let shared = match &g.shared {
            Some(sh) if !with_shared => {
                let mut out = vec![0f32; y.len()];
                self.backend.mlp(&y, m, sh, false, &mut out)?;
                Some(out)
            }
            _ => None,
        };
        Ok(PendingMoe {
            layer: l,
            routed,
            shared,
            len: y.len(),
        })
    }

    /// Splits a batch into one or two micro-batches of whole sequences with about equal
    /// tokens. Two only when enabled, the experts are remote, and the batch is large enough for
    /// the overlap to pay for the extra round trip.
    fn micro_batches(&self, batch: &[SeqInput<'_>]) -> Vec<MicroBatch> {
        let lens: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        let total: usize = lens.iter().sum();
        let split = self.overlap.enabled
            && batch.len() >= 2
            && total >= self.overlap.min_tokens
            && self.experts.is_remote();
        if !split {
            return vec![MicroBatch {
                seqs: 0..batch.len(),
                row0: 0,
                rows: total,
            }];
        }
        let mut acc = 0;
        let mut cut = 1;
        for (i, &n) in lens.iter().enumerate() {
            if acc + n > total / 2 && i > 0 {
                cut = i;
                break;
            }
            acc += n;
            cut = i + 1;
        }
        let cut = cut.clamp(1, batch.len() - 1);
        let first: usize = lens[..cut].iter().sum();
        vec![
            MicroBatch {
                seqs: 0..cut,
                row0: 0,
                rows: first,
            },
            MicroBatch {
                seqs: cut..batch.len(),
                row0: first,
                rows: total - first,
            },
        ]
    }

    /// MLA (DESIGN.md §3) for the rows of `batch`, whose tokens sit at `positions`:
    /// q = W_qb·norm(W_qa·y), c‖k_pe = W_kva·y (c normalised, k_pe rotated, appended to the
    /// latent cache), attention over the cache (absorbed for decode, expanded for a prefill
    /// chunk), out = W_o·o.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        at: &Attention,
        y: &[f32],
        pool: &mut KvPool,
        batch: &mut [SeqInput<'_>],
        starts: &[usize],
        positions: &[usize],
    ) -> Result<Vec<f32>> {
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
        let mut q = vec![0f32; t * heads * qk];
        match &at.q {
            QProj::LoRA { a, norm, b } => {
                let mut qa = vec![0f32; t * a.rows];
                be.linear(y, t, a, &mut qa)?;
                be.rms_norm(&mut qa, a.rows, norm, eps)?;
                be.linear(&qa, t, b, &mut q)?;
            }
            QProj::Full(w) => be.linear(y, t, w, &mut q)?,
        }
        be.rope(&self.rope, &mut q, heads, qk, nope, positions)?;
        // Cache entries [t, kv_lora_rank + rope]: normalised latent, rotated shared key.
        let mut kv = vec![0f32; t * ld];
        be.linear(y, t, &at.kv_a, &mut kv)?;
        be.rms_norm(&mut kv, ld, &at.kv_a_norm, eps)?;
        be.rope(&self.rope, &mut kv, 1, ld, lat, positions)?;
        let mut r0 = 0;
        for (s, &p0) in batch.iter().zip(starts) {
            let n = s.tokens.len();
            pool.write_tokens(l, s.cache, p0, &kv[r0 * ld..(r0 + n) * ld])?;
            r0 += n;
        }
        // Attention over the paged cache into o [t, heads, v]: runs of one-token sequences
        // as one decode batch in the absorbed form (q̃ = W_UKᵀ·q_nope, attend over latents,
        // W_UV after), each longer chunk causally over its sequence in the form the backend
        // measures faster (expanded for a fresh prompt).
        let cache = pool.latent_cache(l)?;
        let scale = self.softmax_scale;
        let mut o = vec![0f32; t * heads * vd];
        let (hq, hv) = (heads * qk, heads * vd);
        let mut i = 0;
        let mut r0 = 0;
        while i < batch.len() {
            let n = batch[i].tokens.len();
            if n == 1 {
                let j = (i..batch.len())
                    .find(|&j| batch[j].tokens.len() != 1)
                    .unwrap_or(batch.len());
                let seqs: Vec<SeqPages> = (i..j)
                    .map(|k| SeqPages {
                        pages: batch[k].cache.blocks(),
                        len: starts[k] + 1,
                    })
                    .collect();
                let (r1, b) = (r0 + (j - i), j - i);
                let qs = &q[r0 * hq..r1 * hq];
                let mut q_abs = vec![0f32; b * heads * lat];
                be.linear_heads(qs, b, qk, 0, &at.mla.w_uk_t, &mut q_abs)?;
                let mut q_pe = vec![0f32; b * heads * rope_d];
                be.gather_cols(qs, qk, nope, rope_d, &mut q_pe)?;
                let mut ctx = vec![0f32; b * heads * lat];
                be.mla_decode(&cache, &seqs, heads, &q_abs, &q_pe, scale, &mut ctx)?;
                be.linear_heads(&ctx, b, lat, 0, &at.mla.w_uv, &mut o[r0 * hv..r1 * hv])?;
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
        // out = W_o · o.
        let mut out = vec![0f32; t * cfg.hidden_size];
        be.linear(&o, t, &at.o, &mut out)?;
        Ok(out)
    }
}
