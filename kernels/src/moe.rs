//! Grouped expert FFN: the gate/up → SiLU·mul → down chain of every routed expert in one call.
//!
//! Rows of x arrive sorted by expert with a list of (expert, row range). Both GEMM phases are
//! cut into (expert, column range) tasks on the kernel team, so a skewed batch — one expert
//! with most rows, many with one — still spreads over every core instead of one thread per
//! expert; tasks are claimed largest-first (most rows), so the long ones do not finish last.
//! Each task reads its weight columns once for all of its expert's rows (the GEMM strategies of
//! [`crate::gemm`], chosen by the expert's row count), and the gate and up results of a task
//! meet in the SiLU·mul epilogue without leaving it. Output row i is multiplied by `row_weight[i]` (the router's combine weight) and
//! stored into or accumulated onto `y[i]`.

use crate::cpu::{self, Isa, SyncPtr};
use crate::error::{Result, shape};
use crate::gemm::{Epilogue, XOperand, col_chunk, silu_mul_inplace, with_tile, write_tile};
use crate::pool::parallel_for;
use crate::weight::Weight;
use std::ops::Range;
use std::sync::OnceLock;

/// The three projections of one expert: gate and up `[inter, hidden]`, down `[hidden, inter]`.
#[derive(Clone, Copy, Debug)]
pub struct ExpertWeights<'a> {
    pub gate: Weight<'a>,
    pub up: Weight<'a>,
    pub down: Weight<'a>,
}

/// Rows `rows` of the sorted input belong to expert `expert`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub expert: usize,
    pub rows: Range<usize>,
}

/// Whether the expert outputs replace or add to `y`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    Store,
    Accumulate,
}

/// Runs every group's expert on its rows of `x` (`[rows, hidden]`), writing `[rows, hidden]`
/// into `y` (rows not covered by any group are left untouched).
pub fn grouped_ffn(
    x: &[f32],
    hidden: usize,
    groups: &[Group],
    experts: &[ExpertWeights],
    row_weight: Option<&[f32]>,
    combine: Combine,
    y: &mut [f32],
) -> Result<()> {
    grouped_ffn_with(
        cpu::isa(),
        x,
        hidden,
        groups,
        experts,
        row_weight,
        combine,
        y,
    )
}

/// [`grouped_ffn`] with an explicit instruction set.
#[allow(clippy::too_many_arguments)]
pub fn grouped_ffn_with(
    isa: Isa,
    x: &[f32],
    hidden: usize,
    groups: &[Group],
    experts: &[ExpertWeights],
    row_weight: Option<&[f32]>,
    combine: Combine,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "grouped_ffn";
    if hidden == 0 || !x.len().is_multiple_of(hidden) || y.len() != x.len() {
        return Err(shape(
            OP,
            format!("x {}, y {}, hidden {hidden}", x.len(), y.len()),
        ));
    }
    let rows = x.len() / hidden;
    if let Some(w) = row_weight
        && w.len() != rows
    {
        return Err(shape(OP, format!("row_weight {} for {rows} rows", w.len())));
    }
    // Validate groups: in range, disjoint, expert shapes consistent.
    let mut covered = vec![false; rows];
    let mut h_off = Vec::with_capacity(groups.len());
    let mut h_len = 0usize;
    for g in groups {
        let e = experts
            .get(g.expert)
            .ok_or_else(|| shape(OP, format!("expert {} of {}", g.expert, experts.len())))?;
        if g.rows.start > g.rows.end || g.rows.end > rows {
            return Err(shape(OP, format!("rows {:?} of {rows}", g.rows)));
        }
        for c in &mut covered[g.rows.clone()] {
            if *c {
                return Err(shape(
                    OP,
                    format!("rows {:?} overlap another group", g.rows),
                ));
            }
            *c = true;
        }
        let inter = e.gate.rows;
        if e.gate.cols != hidden
            || e.up.rows != inter
            || e.up.cols != hidden
            || e.down.rows != hidden
            || e.down.cols != inter
        {
            return Err(shape(
                OP,
                format!(
                    "expert {}: gate [{}, {}], up [{}, {}], down [{}, {}] for hidden {hidden}",
                    g.expert,
                    e.gate.rows,
                    e.gate.cols,
                    e.up.rows,
                    e.up.cols,
                    e.down.rows,
                    e.down.cols
                ),
            ));
        }
        h_off.push(h_len);
        h_len += g.rows.len() * inter;
    }
    let live: Vec<usize> = (0..groups.len())
        .filter(|&i| !groups[i].rows.is_empty())
        .collect();
    if live.is_empty() {
        return Ok(());
    }

    // Phase 1: h_g = SiLU(x_g·W_gateᵀ) ⊙ (x_g·W_upᵀ), tasks over (group, inter columns).
    let xa: Vec<OnceLock<XOperand>> = live.iter().map(|_| OnceLock::new()).collect();
    parallel_for(live.len(), |li| {
        let r = &groups[live[li]].rows;
        let e = &experts[groups[live[li]].expert];
        let tiles = cpu::bf16_tiles_serve(&e.gate) && cpu::bf16_tiles_serve(&e.up);
        let xs = &x[r.start * hidden..r.end * hidden];
        let _ = xa[li].set(XOperand::new(isa, xs, r.len(), hidden, tiles));
    });
    // The intermediate activations, in a per-thread buffer kept across calls: a fresh one of a
    // 32-token decode step's size (hundreds of KiB) came from mmap and page-faulted on every
    // call. Phase 1 writes every element, so it is not cleared.
    let mut h_buf = H_BUF.with(|c| c.take());
    if h_buf.len() < h_len {
        h_buf.resize(h_len, 0.0);
    }
    let h = &mut h_buf[..h_len];
    let hp = SyncPtr(h.as_mut_ptr());
    let tasks = group_tasks(&live, groups, |gi| {
        let (m, inter) = (groups[gi].rows.len(), experts[groups[gi].expert].gate.rows);
        (inter, col_chunk(m, inter, 2))
    });
    parallel_for(tasks.len(), |t| {
        let (li, n0, n1) = tasks[t];
        let gi = live[li];
        let e = &experts[groups[gi].expert];
        let (m, inter, cols) = (groups[gi].rows.len(), e.gate.rows, n1 - n0);
        let a = xa[li]
            .get()
            .expect("every operand is prepared before phase 1");
        with_tile(2 * m * cols, |buf| {
            let (g, u) = buf.split_at_mut(m * cols);
            a.compute_cols(&e.gate, n0, n1, g);
            a.compute_cols(&e.up, n0, n1, u);
            silu_mul_inplace(g, u);
            // SAFETY: group gi's slice of h is [m, inter] at h_off; columns n0..n1 are ours.
            let dst = unsafe { hp.add(h_off[gi]) };
            unsafe { write_tile(dst, inter, m, n0, n1, g, Epilogue::Store) };
        });
    });

    // Phase 2: y_g (+)= w ⊙ (h_g·W_downᵀ), tasks over (group, hidden columns).
    let ha: Vec<OnceLock<XOperand>> = live.iter().map(|_| OnceLock::new()).collect();
    parallel_for(live.len(), |li| {
        let gi = live[li];
        let e = &experts[groups[gi].expert];
        let m = groups[gi].rows.len();
        let hs = &h[h_off[gi]..h_off[gi] + m * e.gate.rows];
        let _ = ha[li].set(XOperand::new(
            isa,
            hs,
            m,
            e.gate.rows,
            cpu::bf16_tiles_serve(&e.down),
        ));
    });
    let yp = SyncPtr(y.as_mut_ptr());
    let tasks = group_tasks(&live, groups, |gi| {
        (hidden, col_chunk(groups[gi].rows.len(), hidden, 1))
    });
    parallel_for(tasks.len(), |t| {
        let (li, n0, n1) = tasks[t];
        let gi = live[li];
        let r = groups[gi].rows.clone();
        let e = &experts[groups[gi].expert];
        let m = r.len();
        let a = ha[li]
            .get()
            .expect("every operand is prepared before phase 2");
        with_tile(m * (n1 - n0), |tile| {
            a.compute_cols(&e.down, n0, n1, tile);
            let scale = row_weight.map(|w| &w[r.clone()]);
            let ep = match (combine, scale) {
                (Combine::Accumulate, s) => Epilogue::Accumulate { row_scale: s },
                (Combine::Store, Some(s)) => {
                    for i in 0..m {
                        for v in &mut tile[i * (n1 - n0)..(i + 1) * (n1 - n0)] {
                            *v *= s[i];
                        }
                    }
                    Epilogue::Store
                }
                (Combine::Store, None) => Epilogue::Store,
            };
            // SAFETY: groups own disjoint rows of y; columns n0..n1 are this task's.
            let dst = unsafe { yp.add(r.start * hidden) };
            unsafe { write_tile(dst, hidden, m, n0, n1, tile, ep) };
        });
    });
    H_BUF.with(|c| c.set(h_buf));
    Ok(())
}

thread_local! {
    /// [`grouped_ffn_with`]'s intermediate buffer (taken out while a call runs, so a nested or
    /// panicking call only costs a fresh one).
    static H_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// (live index, n0, n1) column tasks of every live group, `cols_chunk(group)` giving the
/// group's (columns, chunk); groups with more rows (longer tasks) first.
fn group_tasks(
    live: &[usize],
    groups: &[Group],
    cols_chunk: impl Fn(usize) -> (usize, usize),
) -> Vec<(usize, usize, usize)> {
    let mut order: Vec<usize> = (0..live.len()).collect();
    order.sort_by_key(|&li| std::cmp::Reverse(groups[live[li]].rows.len()));
    let mut tasks = Vec::new();
    for li in order {
        let (n, chunk) = cols_chunk(live[li]);
        for n0 in (0..n).step_by(chunk) {
            tasks.push((li, n0, (n0 + chunk).min(n)));
        }
    }
    tasks
}

/// Plain reference: each group through [`crate::gemm::reference`] in f64.
pub mod reference {
    use super::*;
    use crate::gemm::reference as g;

    pub fn grouped_ffn(
        x: &[f32],
        hidden: usize,
        groups: &[Group],
        experts: &[ExpertWeights],
        row_weight: Option<&[f32]>,
        combine: Combine,
        y: &mut [f32],
    ) {
        for grp in groups {
            let e = &experts[grp.expert];
            let m = grp.rows.len();
            let xs = &x[grp.rows.start * hidden..grp.rows.end * hidden];
            let h = g::silu_mul(xs, m, &e.gate, &e.up);
            let o = g::matmul(&h, m, &e.down);
            for i in 0..m {
                let r = grp.rows.start + i;
                let s = row_weight.map_or(1.0, |w| w[r]);
                for c in 0..hidden {
                    let v = s * o[i * hidden + c];
                    let d = &mut y[r * hidden + c];
                    *d = if combine == Combine::Accumulate {
                        *d + v
                    } else {
                        v
                    };
                }
            }
        }
    }
}
