//! Routed experts behind one trait, so the model does not care where they run: in process
//! ([`LocalExperts`]), or on expert shards through the dispatch client (DESIGN.md §2).

use crate::backend::{Backend, CpuBackend, MoeGroup};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::expert::{BatchRows, ReplyRows};
use crate::model::{Mlp, load_mlp};
use crate::weights::Store;
use shardseek_kernels::gate::Routing;
use shardseek_kernels::scratch;
use std::cell::RefCell;
use std::sync::Arc;

/// Computes, for each row, Σ weight · expert(row) over the row's routed experts.
///
/// Split in two phases so the model can overlap remote expert work with local attention:
/// [`RoutedExperts::start`] launches, [`PendingExperts::wait`] collects.
pub trait RoutedExperts: Send + Sync {
    /// `rows` is `[routing.len(), hidden]`; the result has the same shape.
    fn start(&self, layer: usize, rows: &[f32], routing: &[Routing]) -> Result<PendingExperts>;

    /// True when `start` returns before the work is done (experts on other processes); the
    /// model only splits batches into micro-batches when that buys overlap.
    fn is_remote(&self) -> bool {
        false
    }

    /// Starts the routed experts and, where this backend can, the shared expert `shared` over
    /// every row in the same grouped pass (weight 1). The flag says whether the shared expert's
    /// output is included; when it is not, the caller computes it.
    fn start_with_shared(
        &self,
        layer: usize,
        rows: &[f32],
        routing: &[Routing],
        shared: Option<&Mlp>,
    ) -> Result<(PendingExperts, bool)> {
        let _ = shared;
        Ok((self.start(layer, rows, routing)?, false))
    }

    /// Convenience: start and wait.
    fn forward(&self, layer: usize, rows: &[f32], routing: &[Routing]) -> Result<Vec<f32>> {
        self.start(layer, rows, routing)?.wait()
    }

    /// A forward step (every layer of one batch) begins. Experts behind a dispatch client keep
    /// one placement table for the whole step; a newer one waits for [`step_finished`].
    ///
    /// [`step_finished`]: RoutedExperts::step_finished
    fn step_started(&self) {}

    /// The forward step ended (whether it succeeded or not).
    fn step_finished(&self) {}
}

/// Rows of one [`RoutedExperts::start`] whose sums are incomplete: an expert shard holding one
/// of their experts failed and no live replica took over. The model fails only the sequences
/// these rows belong to.
#[derive(Clone, Debug)]
pub struct RowFailure {
    pub layer: usize,
    /// Row indices into the started rows, ascending.
    pub rows: Vec<usize>,
    /// Names the shard (id and address), e.g. `expert shard 1 (127.0.0.1:4001), layer 3: ...`.
    pub error: String,
}

impl RowFailure {
    pub(crate) fn into_error(self) -> Error {
        Error::Dispatch {
            layer: self.layer,
            detail: self.error,
        }
    }
}

/// Routed-expert output that is ready or still being computed elsewhere.
pub enum PendingExperts {
    Ready(Vec<f32>),
    /// Filled by another thread (e.g. the dispatch client's async task).
    Waiting(std::sync::mpsc::Receiver<Result<Vec<f32>>>),
    /// Filled by another thread; the rows listed in the failures have incomplete sums.
    Partial(std::sync::mpsc::Receiver<Result<(Vec<f32>, Vec<RowFailure>)>>),
}

impl PendingExperts {
    /// The rows' sums; an error when any row's sum is incomplete.
    pub fn wait(self) -> Result<Vec<f32>> {
        let (out, failures) = self.wait_partial()?;
        match failures.into_iter().next() {
            None => Ok(out),
            Some(f) => Err(f.into_error()),
        }
    }

    /// The rows' sums and the rows whose sums are incomplete (with why): a shard failure costs
    /// only the sequences it touched.
    pub fn wait_partial(self) -> Result<(Vec<f32>, Vec<RowFailure>)> {
        let gone = || Error::Dispatch {
            layer: usize::MAX,
            detail: "the dispatch task ended without a result".into(),
        };
        match self {
            Self::Ready(v) => Ok((v, Vec::new())),
            Self::Waiting(rx) => Ok((rx.recv().map_err(|_| gone())??, Vec::new())),
            Self::Partial(rx) => rx.recv().map_err(|_| gone())?,
        }
    }
}

/// Stand-in for a process that holds no experts: any use is an error, never zeros.
pub struct NoExperts;

impl RoutedExperts for NoExperts {
    fn start(&self, layer: usize, _rows: &[f32], _routing: &[Routing]) -> Result<PendingExperts> {
        Err(Error::Dispatch {
            layer,
            detail: "this process holds no routed experts and has no dispatch client".into(),
        })
    }
}

/// Routed experts held by this process: every expert (single process) or a shard's subset.
pub struct LocalExperts {
    backend: Arc<dyn Backend>,
    hidden: usize,
    first_moe: usize,
    /// `layers[l - first_moe][expert]`; `None` for experts this process does not hold.
    layers: Vec<Vec<Option<Mlp>>>,
    held: Vec<usize>,
}

impl LocalExperts {
    /// Locates the tensors of `experts` in every MoE layer (nothing is read until used), on
    /// the CPU backend.
    pub fn load(cfg: &ModelConfig, store: Arc<Store>, experts: &[usize]) -> Result<Self> {
        Self::load_on(cfg, store, experts, CpuBackend::shared())
    }

    /// [`LocalExperts::load`] with the weights prepared for, and run on, `backend`.
    pub fn load_on(
        cfg: &ModelConfig,
        store: Arc<Store>,
        experts: &[usize],
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        for l in cfg.first_k_dense_replace..cfg.num_hidden_layers {
            let mut row: Vec<Option<Mlp>> = vec![None; cfg.n_routed_experts];
            for &e in experts {
                if e >= cfg.n_routed_experts {
                    return Err(Error::Input(format!(
                        "expert {e} out of range (n_routed_experts {})",
                        cfg.n_routed_experts
                    )));
                }
                row[e] = Some(load_mlp(
                    &*backend,
                    &store,
                    &format!("model.layers.{l}.mlp.experts.{e}"),
                    cfg.hidden_size,
                    cfg.moe_intermediate_size,
                )?);
            }
            layers.push(row);
        }
        let mut held = experts.to_vec();
        held.sort_unstable();
        held.dedup();
        Ok(Self {
            backend,
            hidden: cfg.hidden_size,
            first_moe: cfg.first_k_dense_replace,
            layers,
            held,
        })
    }

    /// The same layers holding exactly `experts`: the ones already held are shared (their
    /// prepared weights are not prepared again), the others are located in `store` now. What a
    /// shard does when a new placement gives it experts or takes some away.
    pub fn with_experts(
        &self,
        cfg: &ModelConfig,
        store: &Arc<Store>,
        experts: &[usize],
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (li, old) in self.layers.iter().enumerate() {
            let l = self.first_moe + li;
            let mut row: Vec<Option<Mlp>> = vec![None; old.len()];
            for &e in experts {
                let slot = row.get_mut(e).ok_or_else(|| {
                    Error::Input(format!(
                        "expert {e} out of range (n_routed_experts {})",
                        old.len()
                    ))
                })?;
                *slot = Some(match &old[e] {
                    Some(mlp) => mlp.clone(),
                    None => load_mlp(
                        &*self.backend,
                        store,
                        &format!("model.layers.{l}.mlp.experts.{e}"),
                        cfg.hidden_size,
                        cfg.moe_intermediate_size,
                    )?,
                });
            }
            layers.push(row);
        }
        let mut held = experts.to_vec();
        held.sort_unstable();
        held.dedup();
        Ok(Self {
            backend: Arc::clone(&self.backend),
            hidden: self.hidden,
            first_moe: self.first_moe,
            layers,
            held,
        })
    }

    /// Expert ids held, ascending.
    pub fn held(&self) -> &[usize] {
        &self.held
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Bytes of the held experts' weights and scales.
    pub fn stored_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(Mlp::stored_bytes)
            .sum()
    }

    /// Index into `layers` of MoE layer `layer`.
    fn layer_index(&self, layer: usize) -> Result<usize> {
        layer
            .checked_sub(self.first_moe)
            .filter(|&i| i < self.layers.len())
            .ok_or_else(|| Error::Dispatch {
                layer,
                detail: "not a MoE layer".into(),
            })
    }

    /// Weighted sum per row for `(expert, weight)` lists: the partial combine of a shard, each
    /// token's row summed in one buffer and pushed into `out` (in token order) at once.
    pub fn combine(
        &self,
        layer: usize,
        rows: &BatchRows<'_>,
        assign: &[Vec<(usize, f32)>],
        out: &mut ReplyRows,
    ) -> Result<()> {
        let h = self.hidden;
        if rows.len() != assign.len() || rows.width() != h {
            return Err(Error::Input(format!(
                "{} rows of width {} for {} assignments of hidden {h}",
                rows.len(),
                rows.width(),
                assign.len()
            )));
        }
        let li = self.layer_index(layer)?;
        let m = assign.len();
        self.combine_pairs(
            layer,
            li,
            &|r, out| rows.row_into(r, out),
            |pairs| {
                pairs.extend(
                    assign
                        .iter()
                        .enumerate()
                        .flat_map(|(r, list)| list.iter().map(move |&(e, w)| (e, r, w))),
                )
            },
            m,
            None,
            |ys, sorted_rows, lists| self.gather_sum(m, ys, sorted_rows, lists, out),
        )
    }

    /// The grouped pass over the `(expert, row, weight)` pairs `fill` writes, for `m` rows of
    /// `rows`, on buffers kept per thread from call to call (the hot path allocates nothing
    /// once it has seen a call of the same shape). `finish` gets the experts' outputs (`ys`,
    /// one row per pair in sorted order, then the shared expert's `m` rows if any) and each
    /// output row's token.
    #[allow(clippy::too_many_arguments)]
    fn combine_pairs<T>(
        &self,
        layer: usize,
        li: usize,
        rows: RowLoader<'_>,
        fill: impl FnOnce(&mut Vec<(usize, usize, f32)>),
        m: usize,
        shared: Option<&Mlp>,
        finish: impl FnOnce(&[f32], &[usize], &mut CombineLists) -> Result<T>,
    ) -> Result<T> {
        let mut lists = COMBINE
            .try_with(|c| std::mem::take(&mut *c.borrow_mut()))
            .unwrap_or_default();
        let res = self.combine_on(layer, li, rows, fill, m, shared, &mut lists, finish);
        let _ = COMBINE.try_with(|c| *c.borrow_mut() = lists);
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn combine_on<'w, T>(
        &'w self,
        layer: usize,
        li: usize,
        rows: RowLoader<'_>,
        fill: impl FnOnce(&mut Vec<(usize, usize, f32)>),
        m: usize,
        shared: Option<&'w Mlp>,
        lists: &mut CombineLists,
        finish: impl FnOnce(&[f32], &[usize], &mut CombineLists) -> Result<T>,
    ) -> Result<T> {
        let h = self.hidden;
        // Sort the (row, expert) pairs by expert: one group of consecutive rows per expert,
        // all experts in one grouped pass (gate+up with SiLU·mul, down scaled by the combine
        // weight), then each output row is added onto its token's row. (Unstable sort: the
        // stable one allocates a merge buffer.)
        let pairs = &mut lists.pairs;
        pairs.clear();
        fill(pairs);
        pairs.sort_unstable_by_key(|&(e, r, _)| (e, r));
        let n = pairs.len();
        let extra = if shared.is_some() { m } else { 0 };
        let mut xs = scratch::take((n + extra) * h);
        let weight = &mut lists.weight;
        weight.clear();
        let mut groups: Vec<MoeGroup<'w>> = scratch::recycle(std::mem::take(&mut lists.groups));
        for (k, &(e, r, w)) in pairs.iter().enumerate() {
            if r >= m {
                return Err(Error::Input(format!(
                    "row {r} of an assignment for {m} rows"
                )));
            }
            rows(r, &mut xs[k * h..(k + 1) * h]);
            weight.push(w);
            match groups.last_mut() {
                Some(g) if pairs[g.rows.start].0 == e => g.rows.end = k + 1,
                _ => {
                    let mlp = self.layers[li]
                        .get(e)
                        .and_then(Option::as_ref)
                        .ok_or_else(|| Error::Dispatch {
                            layer,
                            detail: format!("expert {e} is not held by this process"),
                        })?;
                    groups.push(MoeGroup {
                        mlp,
                        rows: k..k + 1,
                    });
                }
            }
        }
        if let Some(mlp) = shared {
            for (r, x) in xs[n * h..].chunks_exact_mut(h).enumerate() {
                rows(r, x);
            }
            weight.resize(n + m, 1.0);
            groups.push(MoeGroup {
                mlp,
                rows: n..n + m,
            });
        }
        let mut ys = scratch::take((n + extra) * h);
        let res = self.backend.moe(&xs, h, &groups, weight, &mut ys);
        lists.groups = scratch::recycle(groups);
        res?;
        let mut sorted_rows = std::mem::take(&mut lists.sorted_rows);
        sorted_rows.clear();
        sorted_rows.extend(pairs.iter().map(|p| p.1).chain(0..extra));
        let res = finish(&ys, &sorted_rows, lists);
        lists.sorted_rows = sorted_rows;
        res
    }

    /// Sums each token's output rows of a grouped pass in one cached row and pushes it into
    /// `out`, token by token: a shard's combine. A token's rows are added in ascending output
    /// order, the order [`Self::scatter_sum`] adds them in, so both sums are the same to the bit.
    fn gather_sum(
        &self,
        m: usize,
        ys: &[f32],
        sorted_rows: &[usize],
        lists: &mut CombineLists,
        out: &mut ReplyRows,
    ) -> Result<()> {
        let h = self.hidden;
        // Per token, the positions of its outputs in `ys` (compressed: `start`, `order`).
        let (start, order, fill) = (&mut lists.start, &mut lists.order, &mut lists.fill);
        start.clear();
        start.resize(m + 1, 0);
        for &r in sorted_rows {
            start[r + 1] += 1;
        }
        for t in 0..m {
            start[t + 1] += start[t];
        }
        order.clear();
        order.resize(sorted_rows.len(), 0);
        fill.clear();
        fill.extend_from_slice(&start[..m]);
        for (k, &r) in sorted_rows.iter().enumerate() {
            order[fill[r]] = k;
            fill[r] += 1;
        }
        let mut acc = scratch::take(h);
        for t in 0..m {
            acc.fill(0.0);
            for &k in &order[start[t]..start[t + 1]] {
                self.backend.add(&mut acc, &ys[k * h..(k + 1) * h])?;
            }
            out.push(&acc).map_err(|e| Error::Input(e.to_string()))?;
        }
        Ok(())
    }

    /// Adds each output row of a grouped pass onto its token's row of a `[m, h]` buffer, in
    /// output order: the in-process layer's combine.
    fn scatter_sum(&self, m: usize, ys: &[f32], sorted_rows: &[usize]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut out = RECYCLED
            .try_with(|r| r.borrow_mut().take())
            .ok()
            .flatten()
            .unwrap_or_default();
        out.clear();
        out.resize(m * h, 0.0);
        for (k, &r) in sorted_rows.iter().enumerate() {
            self.backend
                .add(&mut out[r * h..(r + 1) * h], &ys[k * h..(k + 1) * h])?;
        }
        Ok(out)
    }
}

/// Writes input row `r` of a grouped pass into the slice given (`hidden` values): a copy from
/// the in-process rows, or a decode from the received wire bytes on a shard.
type RowLoader<'a> = &'a dyn Fn(usize, &mut [f32]);

/// The per-call lists of [`LocalExperts`]' grouped pass, kept per thread between calls (the
/// groups borrow one call's weights: between calls the list is empty under another lifetime).
#[derive(Default)]
struct CombineLists {
    pairs: Vec<(usize, usize, f32)>,
    weight: Vec<f32>,
    groups: Vec<MoeGroup<'static>>,
    /// Each output row's token.
    sorted_rows: Vec<usize>,
    /// A shard's per-token lists of output rows (compressed: `start`, `order`, `fill`).
    start: Vec<usize>,
    order: Vec<usize>,
    fill: Vec<usize>,
}

thread_local! {
    static COMBINE: RefCell<CombineLists> = RefCell::new(CombineLists::default());
    static RECYCLED: RefCell<Option<Vec<f32>>> = const { RefCell::new(None) };
}

/// Hands a routed-expert output back once its caller has added it to the residual: the next
/// in-process call on this thread writes into it instead of allocating.
pub fn recycle(out: Vec<f32>) {
    let _ = RECYCLED.try_with(|r| *r.borrow_mut() = Some(out));
}

impl RoutedExperts for LocalExperts {
    fn start(&self, layer: usize, rows: &[f32], routing: &[Routing]) -> Result<PendingExperts> {
        self.start_with_shared(layer, rows, routing, None)
            .map(|(p, _)| p)
    }

    fn start_with_shared(
        &self,
        layer: usize,
        rows: &[f32],
        routing: &[Routing],
        shared: Option<&Mlp>,
    ) -> Result<(PendingExperts, bool)> {
        let h = self.hidden;
        if rows.len() != routing.len() * h {
            return Err(Error::Input(format!(
                "{} values for {} rows of hidden {h}",
                rows.len(),
                routing.len()
            )));
        }
        let li = self.layer_index(layer)?;
        let fill = |pairs: &mut Vec<(usize, usize, f32)>| {
            pairs.extend(routing.iter().enumerate().flat_map(|(r, rt)| {
                rt.experts
                    .iter()
                    .zip(&rt.weights)
                    .map(move |(&e, &w)| (e, r, w))
            }))
        };
        let load = |r: usize, out: &mut [f32]| out.copy_from_slice(&rows[r * h..(r + 1) * h]);
        let m = routing.len();
        let out = self.combine_pairs(layer, li, &load, fill, m, shared, |ys, sorted, _| {
            self.scatter_sum(m, ys, sorted)
        })?;
        Ok((PendingExperts::Ready(out), shared.is_some()))
    }
}
