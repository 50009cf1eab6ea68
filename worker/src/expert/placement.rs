//! An expert shard's side of the placement control plane (proto `shardseek.v1.Placement`,
//! driven by `shardseek_router::rebalancer`): which placement versions the shard accepts
//! requests for, which experts it holds, and the `Prepare`/`Commit` handlers that change both.
//!
//! Between a `Prepare(v)` and the matching `Commit(v)` the shard serves two versions at once: it
//! holds the experts of both tables, so a pod still routing with the old table and one already
//! routing with the new table are both answered. `Commit` first stops accepting the old version,
//! then drops the experts only it needed (no pod routes with it any more by then).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use shardseek_proto::v1::placement_server::Placement as PlacementRpc;
use shardseek_proto::v1::{
    CommitRequest, ConsumeRequest, LoadReply, LoadRequest, PlacementAck, PlacementTable,
};
use shardseek_router::Placement;
use tonic::{Request, Response, Status};

use super::ExpertCompute;

/// The versions a shard accepts and the experts it holds.
pub struct ShardPlacement {
    shard: usize,
    shards: usize,
    experts: usize,
    state: RwLock<ShardState>,
}

struct ShardState {
    /// Accepted versions → this shard's experts in that version's table.
    accepted: BTreeMap<u64, Vec<usize>>,
    /// `held[e]`: expert `e`'s weights are mapped (the union over `accepted`).
    held: Vec<bool>,
}

impl ShardState {
    fn rebuild_held(&mut self) {
        self.held.iter_mut().for_each(|h| *h = false);
        for list in self.accepted.values() {
            for &e in list {
                if let Some(h) = self.held.get_mut(e) {
                    *h = true;
                }
            }
        }
    }

    fn held_list(&self) -> Vec<usize> {
        (0..self.held.len()).filter(|&e| self.held[e]).collect()
    }
}

impl ShardPlacement {
    /// Shard `shard` of `shards`, serving version `version` with `held` of the model's
    /// `experts` routed experts.
    pub fn new(shard: usize, shards: usize, experts: usize, version: u64, held: &[usize]) -> Self {
        Self::with_versions(shard, shards, experts, &[(version, held.to_vec())])
    }

    /// Shard `shard` of `shards` accepting each of `versions`, with its experts in that
    /// version's table (a shard that starts while a publication is under way accepts the
    /// version it switches from and the new one).
    pub fn with_versions(
        shard: usize,
        shards: usize,
        experts: usize,
        versions: &[(u64, Vec<usize>)],
    ) -> Self {
        let mut state = ShardState {
            accepted: versions.iter().cloned().collect(),
            held: vec![false; experts],
        };
        state.rebuild_held();
        ShardPlacement {
            shard,
            shards,
            experts,
            state: RwLock::new(state),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ShardState> {
        match self.state.read() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ShardState> {
        match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Why a request routed with placement `version` for `experts` cannot be served here;
    /// `None` when it can.
    pub fn refuse(&self, version: u64, experts: &[u32]) -> Option<String> {
        let state = self.read();
        if !state.accepted.contains_key(&version) {
            let versions: Vec<u64> = state.accepted.keys().copied().collect();
            return Some(format!(
                "stale placement: request routed with version {version}, shard {} serves version {}",
                self.shard,
                versions
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }
        experts
            .iter()
            .find(|&&e| !state.held.get(e as usize).copied().unwrap_or(false))
            .map(|e| format!("expert {e} is not held by shard {}", self.shard))
    }

    /// The newest version accepted.
    pub fn newest_version(&self) -> u64 {
        self.read()
            .accepted
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// Every version accepted, ascending.
    pub fn accepted_versions(&self) -> Vec<u64> {
        self.read().accepted.keys().copied().collect()
    }

    /// The experts held, ascending.
    pub fn held(&self) -> Vec<usize> {
        self.read().held_list()
    }

    fn ack(&self) -> PlacementAck {
        let state = self.read();
        PlacementAck {
            placement_version: state.accepted.keys().next_back().copied().unwrap_or(0),
            experts: state.held_list().into_iter().map(|e| e as u32).collect(),
        }
    }
}

/// The `Placement` service of an expert shard.
pub struct ShardControl<C> {
    compute: Arc<C>,
    placement: Arc<ShardPlacement>,
    /// One change at a time: each maps weights, then changes what the shard accepts.
    changes: tokio::sync::Mutex<()>,
}

impl<C: ExpertCompute> ShardControl<C> {
    pub fn new(compute: Arc<C>, placement: Arc<ShardPlacement>) -> Self {
        ShardControl {
            compute,
            placement,
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// Maps exactly `experts` (on the blocking pool: locating or preparing weights reads files).
    async fn hold(&self, experts: Vec<usize>) -> Result<(), Status> {
        let compute = Arc::clone(&self.compute);
        tokio::task::spawn_blocking(move || compute.set_experts(&experts))
            .await
            .map_err(|e| Status::internal(format!("mapping experts: {e}")))?
            .map_err(|e| Status::internal(format!("mapping experts: {e}")))
    }
}

#[tonic::async_trait]
impl<C: ExpertCompute> PlacementRpc for ShardControl<C> {
    async fn load(&self, _request: Request<LoadRequest>) -> Result<Response<LoadReply>, Status> {
        Err(Status::unimplemented(
            "this is an expert shard; expert load is read from attention pods",
        ))
    }

    async fn consume_load(
        &self,
        _request: Request<ConsumeRequest>,
    ) -> Result<Response<PlacementAck>, Status> {
        Err(Status::unimplemented(
            "this is an expert shard; expert load is read from attention pods",
        ))
    }

    async fn prepare(
        &self,
        request: Request<PlacementTable>,
    ) -> Result<Response<PlacementAck>, Status> {
        let p = Placement::from_proto(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let me = &self.placement;
        if p.shards() != me.shards || p.n_experts() != me.experts {
            return Err(Status::failed_precondition(format!(
                "table version {} is for {} experts on {} shards; shard {} serves {} experts on {}",
                p.version(),
                p.n_experts(),
                p.shards(),
                me.shard,
                me.experts,
                me.shards
            )));
        }
        let _one = self.changes.lock().await;
        let oldest = me.read().accepted.keys().next().copied().unwrap_or(0);
        if p.version() < oldest {
            return Err(Status::failed_precondition(format!(
                "table version {} is older than version {oldest} in force",
                p.version()
            )));
        }
        let mine = p.experts_of(me.shard);
        let mut union = me.held();
        union.extend(&mine);
        union.sort_unstable();
        union.dedup();
        self.hold(union).await?;
        {
            let mut state = me.write();
            state.accepted.insert(p.version(), mine);
            state.rebuild_held();
        }
        tracing::info!(
            shard = me.shard,
            version = p.version(),
            "placement prepared"
        );
        Ok(Response::new(me.ack()))
    }

    async fn switch(
        &self,
        _request: Request<PlacementTable>,
    ) -> Result<Response<PlacementAck>, Status> {
        Err(Status::unimplemented(
            "this is an expert shard; shards prepare and commit, attention pods switch",
        ))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<PlacementAck>, Status> {
        let version = request.get_ref().version;
        let me = &self.placement;
        let _one = self.changes.lock().await;
        let keep = {
            let mut state = me.write();
            if !state.accepted.contains_key(&version) {
                return Err(Status::failed_precondition(format!(
                    "version {version} was not prepared on shard {}",
                    me.shard
                )));
            }
            // Refuse every other version first (older ones: no pod routes with them any more; a
            // newer one could only be left by an aborted publication); then drop their experts.
            state.accepted.retain(|&v, _| v == version);
            state.rebuild_held();
            state.held_list()
        };
        self.hold(keep).await?;
        tracing::info!(shard = me.shard, version, "placement committed");
        Ok(Response::new(me.ack()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_serves_both_versions_between_prepare_and_commit() {
        let p = ShardPlacement::new(1, 2, 4, 1, &[2, 3]);
        assert_eq!(p.refuse(1, &[2, 3]), None);
        assert!(p.refuse(1, &[0]).is_some_and(|e| e.contains("expert 0")));
        assert!(
            p.refuse(2, &[2])
                .is_some_and(|e| e.contains("stale placement"))
        );
        {
            let mut s = p.write();
            s.accepted.insert(2, vec![0, 3]);
            s.rebuild_held();
        }
        assert_eq!(p.refuse(1, &[2]), None, "old version still served");
        assert_eq!(p.refuse(2, &[0, 3]), None, "new version served");
        assert_eq!(p.newest_version(), 2);
        assert_eq!(p.held(), vec![0, 2, 3]);
        {
            let mut s = p.write();
            s.accepted.retain(|&v, _| v >= 2);
            s.rebuild_held();
        }
        assert!(p.refuse(1, &[2]).is_some_and(|e| e.contains("version 2")));
        assert_eq!(p.held(), vec![0, 3]);
    }
}
