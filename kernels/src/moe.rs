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

use crate::cpu::{self, SyncPtr};
use crate::error::{Result, shape};
use crate::gemm::{
    Compute, Epilogue, OperandSpace, XOperand, col_chunk, silu_mul_inplace, with_tile, write_tile,
};
use crate::pool::parallel_for;
use crate::scratch::{self, Scratch};
use crate::weight::Weight;
use std::cell::RefCell;
use std::ops::Range;

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

/// [`grouped_ffn`] with an explicit instruction set and activation precision.
#[allow(clippy::too_many_arguments)]
pub fn grouped_ffn_with(
    c: impl Into<Compute>,
    x: &[f32],
    hidden: usize,
    groups: &[Group],
    experts: &[ExpertWeights],
    row_weight: Option<&[f32]>,
    combine: Combine,
    y: &mut [f32],
) -> Result<()> {
    const OP: &str = "grouped_ffn";
    let c = c.into();
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
    // Validate groups: in range, disjoint, expert shapes consistent. Every list of the call is
    // scratch (kept per thread), so a decode step allocates nothing here once warm.
    let mut covered = scratch::take::<usize>(rows);
    let mut h_off = scratch::take::<usize>(groups.len());
    let mut h_len = 0usize;
    for (gi, g) in groups.iter().enumerate() {
        let e = experts
            .get(g.expert)
            .ok_or_else(|| shape(OP, format!("expert {} of {}", g.expert, experts.len())))?;
        if g.rows.start > g.rows.end || g.rows.end > rows {
            return Err(shape(OP, format!("rows {:?} of {rows}", g.rows)));
        }
        for c in &mut covered[g.rows.clone()] {
            if *c != 0 {
                return Err(shape(
                    OP,
                    format!("rows {:?} overlap another group", g.rows),
                ));
            }
            *c = 1;
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
        h_off[gi] = h_len;
        h_len += g.rows.len() * inter;
    }
    let mut live_buf = scratch::take::<usize>(groups.len());
    let mut n_live = 0;
    for (i, g) in groups.iter().enumerate() {
        if !g.rows.is_empty() {
            live_buf[n_live] = i;
            n_live += 1;
        }
    }
    let live = &live_buf[..n_live];
    if live.is_empty() {
        return Ok(());
    }
    // Room for both phases' prepared operands: one pair of buffers per phase for all groups.
    let tiles_of = |e: &ExpertWeights, down: bool| {
        if down {
            cpu::bf16_tiles_serve(&e.down)
        } else {
            cpu::bf16_tiles_serve(&e.gate) && cpu::bf16_tiles_serve(&e.up)
        }
    };
    let needs = |down: bool| {
        live.iter().fold((0, 0), |(b, d), &gi| {
            let e = &experts[groups[gi].expert];
            let (m, k) = (
                groups[gi].rows.len(),
                if down { e.gate.rows } else { hidden },
            );
            let (nb, nd) = XOperand::needs(c, m, k, tiles_of(e, down));
            (b + nb, d + nd)
        })
    };
    let mut space1 = OperandSpace::new(needs(false));
    let mut space2 = OperandSpace::new(needs(true));
    let (mut parts1, mut parts2) = (space1.parts(), space2.parts());
    let (mut xa, mut ha) = OPERANDS
        .try_with(|o| std::mem::take(&mut *o.borrow_mut()))
        .unwrap_or_default();
    let mut xa: Vec<XOperand> = scratch::recycle(std::mem::take(&mut xa));
    let mut ha: Vec<XOperand> = scratch::recycle(std::mem::take(&mut ha));

    // Phase 1: h_g = SiLU(x_g·W_gateᵀ) ⊙ (x_g·W_upᵀ), tasks over (group, inter columns). The
    // operands are prepared here, on the calling thread (preparing x is a small part of the
    // call).
    xa.extend(live.iter().map(|&gi| {
        let r = &groups[gi].rows;
        let e = &experts[groups[gi].expert];
        XOperand::new(
            c,
            &x[r.start * hidden..r.end * hidden],
            r.len(),
            hidden,
            tiles_of(e, false),
            &mut parts1,
        )
    }));
    // The intermediate activations, in a per-thread buffer kept across calls: a fresh one of a
    // 32-token decode step's size (hundreds of KiB) came from mmap and page-faulted on every
    // call. Phase 1 writes every element, so it is not cleared.
    let mut h_buf = H_BUF.with(|c| c.take());
    if h_buf.len() < h_len {
        h_buf.resize(h_len, 0.0);
    }
    let h = &mut h_buf[..h_len];
    let hp = SyncPtr(h.as_mut_ptr());
    let tasks = group_tasks(live, groups, |gi| {
        let (m, inter) = (groups[gi].rows.len(), experts[groups[gi].expert].gate.rows);
        (inter, col_chunk(m, inter, 2))
    });
    parallel_for(tasks.len() / 3, |t| {
        let (li, n0, n1) = (tasks[3 * t], tasks[3 * t + 1], tasks[3 * t + 2]);
        let gi = live[li];
        let e = &experts[groups[gi].expert];
        let (m, inter, cols) = (groups[gi].rows.len(), e.gate.rows, n1 - n0);
        let a = &xa[li];
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
    ha.extend(live.iter().map(|&gi| {
        let e = &experts[groups[gi].expert];
        let m = groups[gi].rows.len();
        let hs = &h[h_off[gi]..h_off[gi] + m * e.gate.rows];
        XOperand::new(c, hs, m, e.gate.rows, tiles_of(e, true), &mut parts2)
    }));
    let yp = SyncPtr(y.as_mut_ptr());
    let tasks = group_tasks(live, groups, |gi| {
        (hidden, col_chunk(groups[gi].rows.len(), hidden, 1))
    });
    parallel_for(tasks.len() / 3, |t| {
        let (li, n0, n1) = (tasks[3 * t], tasks[3 * t + 1], tasks[3 * t + 2]);
        let gi = live[li];
        let r = groups[gi].rows.clone();
        let e = &experts[groups[gi].expert];
        let m = r.len();
        let a = &ha[li];
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
    // The operands (and the scratch they hold) are dropped here, on this thread; the lists keep
    // their allocations for the next call.
    xa.clear();
    ha.clear();
    let _ = OPERANDS.try_with(|o| *o.borrow_mut() = (scratch::recycle(xa), scratch::recycle(ha)));
    H_BUF.with(|c| c.set(h_buf));
    Ok(())
}

/// The two operand lists of [`grouped_ffn_with`], empty between calls (see [`scratch::recycle`]).
type OperandLists = (Vec<XOperand<'static>>, Vec<XOperand<'static>>);

thread_local! {
    static OPERANDS: RefCell<OperandLists> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// [`grouped_ffn_with`]'s intermediate buffer (taken out while a call runs, so a nested or
    /// panicking call only costs a fresh one).
    static H_BUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// (live index, n0, n1) column tasks of every live group, three values per task,
/// `cols_chunk(group)` giving the group's (columns, chunk); groups with more rows (longer
/// tasks) first, ties in group order.
fn group_tasks(
    live: &[usize],
    groups: &[Group],
    cols_chunk: impl Fn(usize) -> (usize, usize),
) -> Scratch<usize> {
    let mut order = scratch::take::<usize>(live.len());
    for (i, o) in order.iter_mut().enumerate() {
        *o = i;
    }
    // Unstable sort with the index as tie-break: the same order as a stable sort, without its
    // merge buffer.
    order.sort_unstable_by_key(|&li| (std::cmp::Reverse(groups[live[li]].rows.len()), li));
    let count: usize = live
        .iter()
        .map(|&gi| {
            let (n, chunk) = cols_chunk(gi);
            n.div_ceil(chunk)
        })
        .sum();
    let mut tasks = scratch::take::<usize>(3 * count);
    let mut t = 0;
    for &li in order.iter() {
        let (n, chunk) = cols_chunk(live[li]);
        for n0 in (0..n).step_by(chunk) {
            tasks[t..t + 3].copy_from_slice(&[li, n0, (n0 + chunk).min(n)]);
            t += 3;
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
