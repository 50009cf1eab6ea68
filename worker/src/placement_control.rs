//! An attention pod's side of the placement control plane (proto `shardseek.v1.Placement`,
//! driven by `shardseek_router::rebalancer`): it reports the expert load its dispatch client
//! observed and how much of it finished rounds used (`Load`, `ConsumeLoad`: the pod keeps the
//! window, so a restarted rebalancer loses none) and switches to a new placement table between
//! two steps (`Switch`).

use std::sync::Arc;
use std::time::Duration;

use shardseek_proto::v1::placement_server::Placement as PlacementRpc;
use shardseek_proto::v1::{
    CommitRequest, ConsumeRequest, LoadReply, LoadRequest, PlacementAck, PlacementTable,
};
use shardseek_router::transport::grpc::GrpcTransport;
use shardseek_router::{Dispatcher, Placement};
use tonic::{Request, Response, Status};

/// How long `Switch` waits for the step under way to end: a step is one forward pass, which even
/// a large prefill chunk on CPU finishes in seconds.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(20);

/// The `Placement` service of an attention pod with expert shards.
pub struct PodControl {
    dispatcher: Arc<Dispatcher<GrpcTransport>>,
    /// The model's expert groups, reported with the load (the rebalancer needs the model's
    /// shape and does not read the checkpoint).
    expert_groups: u32,
}

impl PodControl {
    pub fn new(dispatcher: Arc<Dispatcher<GrpcTransport>>, expert_groups: usize) -> Self {
        PodControl {
            dispatcher,
            expert_groups: u32::try_from(expert_groups).unwrap_or(0),
        }
    }
}

#[tonic::async_trait]
impl PlacementRpc for PodControl {
    async fn load(&self, _request: Request<LoadRequest>) -> Result<Response<LoadReply>, Status> {
        // Consumed first: a round that finishes between the two reads then shows as less
        // consumed, never as more consumed than counted.
        let consumed_pairs = self.dispatcher.consumed_load();
        Ok(Response::new(LoadReply {
            expert_pairs: self.dispatcher.expert_load(),
            placement_version: self.dispatcher.placement().version(),
            expert_groups: self.expert_groups,
            consumed_pairs,
            load_epoch: self.dispatcher.load_epoch(),
        }))
    }

    async fn consume_load(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<PlacementAck>, Status> {
        let r = request.get_ref();
        self.dispatcher
            .consume_load(r.load_epoch, &r.expert_pairs)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(PlacementAck {
            placement_version: self.dispatcher.placement().version(),
            experts: Vec::new(),
        }))
    }

    async fn prepare(
        &self,
        _request: Request<PlacementTable>,
    ) -> Result<Response<PlacementAck>, Status> {
        Err(Status::unimplemented(
            "this is an attention pod; shards prepare and commit, attention pods switch",
        ))
    }

    async fn switch(
        &self,
        request: Request<PlacementTable>,
    ) -> Result<Response<PlacementAck>, Status> {
        let p = Placement::from_proto(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let version = p.version();
        self.dispatcher
            .stage_placement(p)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        if !self
            .dispatcher
            .wait_for_version(version, SWITCH_TIMEOUT)
            .await
        {
            return Err(Status::deadline_exceeded(format!(
                "the step under way did not end within {SWITCH_TIMEOUT:?}"
            )));
        }
        Ok(Response::new(PlacementAck {
            placement_version: self.dispatcher.placement().version(),
            experts: Vec::new(),
        }))
    }

    async fn commit(
        &self,
        _request: Request<CommitRequest>,
    ) -> Result<Response<PlacementAck>, Status> {
        Err(Status::unimplemented(
            "this is an attention pod; shards prepare and commit, attention pods switch",
        ))
    }
}
