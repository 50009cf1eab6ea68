//! Expert-parallel load balancing (EPLB): a new [`Placement`] from observed expert load, after
//! the algorithm DeepSeek published with V3 (deepseek-ai/EPLB), written anew for our table.
//!
//! Three greedy steps, each the classic "largest item into the lightest bin":
//!
//! 1. **Groups to nodes** (hierarchical form only): the model's expert groups (`n_group`, the
//!    unit of group-limited routing) are packed onto nodes so that every node gets the same
//!    number of groups and close to the same load. A token's experts then mostly sit in one
//!    or two nodes, which is what group-limited routing was designed for: less cross-node
//!    traffic.
//! 2. **Replicas to hot experts**: each node's slots beyond one per expert go, one at a time, to
//!    the expert with the highest load per replica.
//! 3. **Replicas to shards**: every replica (carrying its expert's load ÷ its replica count) is
//!    packed onto the node's shards, heaviest first, each shard taking the same number of slots;
//!    two replicas of one expert go to different shards whenever a shard with room allows it, so
//!    a replica is a real failover target.
//!
//! With one node (or groups that do not divide over the nodes) this is DeepSeek's global policy.
//! The output is one table for all layers (our placement is per model, not per layer): the load
//! fed in is summed over layers.
//!
//! [`imbalance`] is the figure the algorithm minimises and the metric
//! `shardseek_expert_load_imbalance_ratio` reports: the busiest shard's load ÷ the mean shard
//! load, with an expert's load split evenly over its replicas (what the dispatcher's
//! least-loaded replica choice approximates).

use crate::placement::Placement;
use crate::{Error, Result};

/// The shape of the cluster a placement is computed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EplbShape {
    /// Expert shards (each takes `(experts + redundant) / shards` slots).
    pub shards: usize,
    /// Redundant slots over all shards (replicas beyond one per expert).
    pub redundant: usize,
    /// Expert groups of the model (`n_group`); experts of a group are contiguous ids.
    pub groups: usize,
    /// Nodes the shards are spread over (consecutive shard ids share a node); 1 = flat.
    pub nodes: usize,
}

/// A new placement (version `version`) balancing `load` (tokens per expert) over `shape`.
pub fn rebalance(load: &[f64], shape: EplbShape, version: u64) -> Result<Placement> {
    let experts = load.len();
    let EplbShape {
        shards,
        redundant,
        groups,
        nodes,
    } = shape;
    let bad = |why: String| Err(Error::Placement(format!("rebalance: {why}")));
    if experts == 0 || shards == 0 || nodes == 0 {
        return bad(format!(
            "{experts} experts, {shards} shards, {nodes} nodes: all must be positive"
        ));
    }
    if let Some(x) = load.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return bad(format!(
            "expert load {x} is not a finite non-negative count"
        ));
    }
    let physical = experts + redundant;
    if !physical.is_multiple_of(shards) {
        return bad(format!(
            "{experts} experts + {redundant} redundant slots do not fill {shards} shards evenly"
        ));
    }
    if !shards.is_multiple_of(nodes) || !physical.is_multiple_of(nodes) {
        return bad(format!("{shards} shards do not split over {nodes} nodes"));
    }
    // Hierarchical only when groups split evenly over nodes; otherwise one node (global policy).
    let hierarchical =
        nodes > 1 && groups > 0 && experts.is_multiple_of(groups) && groups.is_multiple_of(nodes);
    let (nodes, groups) = if hierarchical {
        (nodes, groups)
    } else {
        (1, 1)
    };
    let per_group = experts / groups;

    // Step 1: groups to nodes.
    let group_load: Vec<f64> = (0..groups)
        .map(|g| load[g * per_group..(g + 1) * per_group].iter().sum())
        .collect();
    let group_node = balanced_packing(&group_load, &vec![0; groups], nodes);

    let shards_per_node = shards / nodes;
    let slots_per_node = physical / nodes;
    let mut replicas: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for node in 0..nodes {
        let node_experts: Vec<usize> = (0..experts)
            .filter(|&e| group_node[e / per_group] == node)
            .collect();
        if node_experts.len() > slots_per_node {
            return bad(format!(
                "node {node} would hold {} experts in {slots_per_node} slots",
                node_experts.len()
            ));
        }
        // Step 2: replicas to hot experts.
        let node_load: Vec<f64> = node_experts.iter().map(|&e| load[e]).collect();
        if node_experts.len() * shards_per_node < slots_per_node {
            return bad(format!(
                "{slots_per_node} slots on node {node} exceed one replica of each of its {} \
                 experts on each of its {shards_per_node} shards",
                node_experts.len()
            ));
        }
        let counts = replicate(&node_load, slots_per_node, shards_per_node);
        // Step 3: replicas to the node's shards.
        let mut items = Vec::with_capacity(slots_per_node);
        let mut keys = Vec::with_capacity(slots_per_node);
        for (i, &e) in node_experts.iter().enumerate() {
            for _ in 0..counts[i] {
                items.push(node_load[i] / counts[i] as f64);
                keys.push(e);
            }
        }
        let pack = balanced_packing(&items, &keys, shards_per_node);
        for (item, &p) in pack.iter().enumerate() {
            let shard = node * shards_per_node + p;
            let list = &mut replicas[keys[item]];
            if !list.contains(&shard) {
                list.push(shard);
            }
        }
    }
    for list in &mut replicas {
        list.sort_unstable();
    }
    Placement::from_assignments(version, shards, replicas)
}

/// Busiest shard's load ÷ mean shard load under `placement`, each expert's `load` split evenly
/// over its replicas; 1.0 when there is no load.
pub fn imbalance(placement: &Placement, load: &[f64]) -> f64 {
    let loads = shard_loads(placement, load);
    let total: f64 = loads.iter().sum();
    if total <= 0.0 || loads.is_empty() {
        return 1.0;
    }
    let max = loads.iter().copied().fold(0.0, f64::max);
    max / (total / loads.len() as f64)
}

/// Each shard's share of `load` under `placement` (an expert's load split over its replicas).
pub fn shard_loads(placement: &Placement, load: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; placement.shards()];
    for (e, &l) in load.iter().enumerate() {
        if let Some(r) = placement.replicas(e).filter(|r| !r.is_empty()) {
            for &s in r {
                out[s] += l / r.len() as f64;
            }
        }
    }
    out
}

/// Packs items into `packs` bins of equal item count (`items.len() / packs`, the first bins one
/// more when it does not divide), heaviest item first into the lightest bin with room. Items
/// with the same `key` avoid sharing a bin while another bin with room does not hold that key.
/// Returns each item's bin.
fn balanced_packing(weights: &[f64], keys: &[usize], packs: usize) -> Vec<usize> {
    let n = weights.len();
    let base = n / packs;
    let extra = n % packs;
    let capacity = |p: usize| base + usize::from(p < extra);
    let mut order: Vec<usize> = (0..n).collect();
    // Heaviest first; equal weights in id order, so the result is a pure function of the input.
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut bin_weight = vec![0.0f64; packs];
    let mut bin_items: Vec<Vec<usize>> = vec![Vec::new(); packs];
    let mut out = vec![0; n];
    for i in order {
        let has_key = |p: usize| bin_items[p].iter().any(|&j| keys[j] == keys[i]);
        let lightest = |avoid_key: bool| {
            (0..packs)
                .filter(|&p| bin_items[p].len() < capacity(p) && !(avoid_key && has_key(p)))
                .min_by(|&a, &b| bin_weight[a].total_cmp(&bin_weight[b]).then(a.cmp(&b)))
        };
        // Capacities sum to n, so some bin always has room.
        let Some(p) = lightest(true).or_else(|| lightest(false)) else {
            continue;
        };
        bin_weight[p] += weights[i];
        bin_items[p].push(i);
        out[i] = p;
    }
    out
}

/// Replica counts for experts of load `weights` filling `slots` (≥ one per expert): each slot
/// beyond the first per expert goes to the expert with the highest load per replica, at most
/// `cap` replicas per expert (one per shard: two copies on one shard would share its load).
fn replicate(weights: &[f64], slots: usize, cap: usize) -> Vec<usize> {
    let mut counts = vec![1usize; weights.len()];
    for _ in weights.len()..slots {
        let hottest = (0..weights.len())
            .filter(|&e| counts[e] < cap)
            .max_by(|&a, &b| {
                let (la, lb) = (weights[a] / counts[a] as f64, weights[b] / counts[b] as f64);
                la.total_cmp(&lb).then(b.cmp(&a))
            });
        if let Some(e) = hottest {
            counts[e] += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Zipf-like skew: expert `e` gets load ∝ 1/(rank+1), ranks shuffled by a fixed stride.
    fn skewed(experts: usize) -> Vec<f64> {
        (0..experts)
            .map(|e| 1000.0 / (((e * 7) % experts) as f64 + 1.0))
            .collect()
    }

    fn slots_per_shard(p: &Placement) -> Vec<usize> {
        (0..p.shards()).map(|s| p.experts_of(s).len()).collect()
    }

    #[test]
    fn every_expert_placed_every_shard_full_replicas_on_distinct_shards() {
        for (experts, shards, redundant) in [(16, 4, 0), (16, 4, 4), (16, 4, 16), (64, 8, 16)] {
            let load = skewed(experts);
            let shape = EplbShape {
                shards,
                redundant,
                groups: 1,
                nodes: 1,
            };
            let p = rebalance(&load, shape, 7).expect("rebalance");
            assert_eq!(p.version(), 7);
            assert_eq!(p.n_experts(), experts);
            let total: usize = (0..experts)
                .map(|e| p.replicas(e).expect("placed").len())
                .sum();
            assert_eq!(total, experts + redundant, "{experts}/{shards}/{redundant}");
            let per = slots_per_shard(&p);
            assert!(
                per.iter().all(|&n| n == (experts + redundant) / shards),
                "{per:?}"
            );
        }
    }

    #[test]
    fn skewed_load_is_balanced_better_than_the_initial_placement() {
        let load = skewed(16);
        for redundant in [0, 4, 8] {
            let initial = Placement::initial(16, 4, redundant / 4).expect("initial");
            let shape = EplbShape {
                shards: 4,
                redundant,
                groups: 1,
                nodes: 1,
            };
            let p = rebalance(&load, shape, 2).expect("rebalance");
            let (before, after) = (imbalance(&initial, &load), imbalance(&p, &load));
            assert!(after < before, "{redundant}: {after} vs {before}");
            if redundant >= 4 {
                // Replicas let the hottest expert (a third of all load) be split.
                assert!(after <= 1.15, "{redundant} redundant: imbalance {after}");
            }
        }
        // Uniform load stays perfectly balanced.
        let flat = vec![5.0; 16];
        let shape = EplbShape {
            shards: 4,
            redundant: 0,
            groups: 1,
            nodes: 1,
        };
        let p = rebalance(&flat, shape, 2).expect("rebalance");
        assert!((imbalance(&p, &flat) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_hottest_expert_gets_the_replicas() {
        let mut load = vec![1.0; 16];
        load[5] = 100.0;
        let shape = EplbShape {
            shards: 4,
            redundant: 4,
            groups: 1,
            nodes: 1,
        };
        let p = rebalance(&load, shape, 2).expect("rebalance");
        assert_eq!(p.replicas(5).expect("placed").len(), 4, "one per shard");
    }

    #[test]
    fn hierarchical_keeps_each_group_within_one_node() {
        // 32 experts in 8 groups of 4, 8 shards on 2 nodes (shards 0-3 and 4-7), 8 redundant.
        let load = skewed(32);
        let shape = EplbShape {
            shards: 8,
            redundant: 8,
            groups: 8,
            nodes: 2,
        };
        let p = rebalance(&load, shape, 3).expect("rebalance");
        let node_of = |s: usize| s / 4;
        for g in 0..8 {
            let nodes: std::collections::BTreeSet<usize> = (g * 4..(g + 1) * 4)
                .flat_map(|e| p.replicas(e).expect("placed").to_vec())
                .map(node_of)
                .collect();
            assert_eq!(nodes.len(), 1, "group {g} spans nodes {nodes:?}");
        }
        let per = slots_per_shard(&p);
        assert!(per.iter().all(|&n| n == 5), "{per:?}");
        // Balanced across nodes too.
        assert!(
            imbalance(&p, &load)
                < imbalance(&Placement::initial(32, 8, 1).expect("initial"), &load)
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        let load = vec![1.0; 16];
        let shape = |shards, redundant, nodes| EplbShape {
            shards,
            redundant,
            groups: 4,
            nodes,
        };
        assert!(rebalance(&load, shape(3, 0, 1), 2).is_err(), "16 over 3");
        assert!(rebalance(&load, shape(4, 2, 1), 2).is_err(), "18 over 4");
        assert!(
            rebalance(&load, shape(4, 0, 3), 2).is_err(),
            "4 shards on 3 nodes"
        );
        assert!(rebalance(&[1.0, f64::NAN], shape(2, 0, 1), 2).is_err());
        assert!(rebalance(&[], shape(2, 0, 1), 2).is_err());
    }
}
