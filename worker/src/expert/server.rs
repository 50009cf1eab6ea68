//! The tonic `Expert` service, its request batcher, and the handle that stops it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Frame;
use shardseek_proto::frames::{MessageSplitter, decode_message, encode_frame};
use shardseek_proto::v1::expert_server::{Expert, ExpertServer as ExpertGrpc};
use shardseek_proto::v1::{
    DispatchReply, DispatchRequest, HealthReply, HealthRequest, InfoReply, InfoRequest,
    ModelFingerprint,
};
use shardseek_proto::{METADATA_MODEL, METADATA_SHARDS};
use shardseek_router::transport::Assignments;
use shardseek_router::transport::grpc::{
    CONNECTION_WINDOW_BYTES, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES, DISPATCH_PATH, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES,
};
use shardseek_router::{EncodedRows, Error, Result, WireDtype};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::codegen::Bytes;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use super::placement::{ShardControl, ShardPlacement};
use super::{BatchRows, ComputeError, ExpertCompute, ReplyRows, ReplyTo, RowExperts};
use shardseek_proto::v1::placement_server::PlacementServer;

/// How long the batcher waits for other attention pods' requests of the same layer once one
/// arrived, when several pods are connected: a fraction of one layer's dispatch round trip, so
/// the latency it adds is small next to what merged GEMMs save.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_micros(200);
/// Rows computed in one batch at most: bounds the shard's scratch memory per batch.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 4096;
/// Requests queued for the batcher before stream readers wait (back-pressure to the pods).
const JOB_QUEUE: usize = 1024;
/// Replies queued per stream before the batcher waits for the network.
const REPLY_QUEUE: usize = 256;

/// Settings of one expert shard's server.
#[derive(Clone, Debug)]
pub struct ExpertServerConfig {
    /// Where to listen; port 0 picks a free port (see [`RunningExpertServer::local_addr`]).
    pub addr: SocketAddr,
    pub shard_id: usize,
    pub shard_count: usize,
    pub fingerprint: ModelFingerprint,
    pub placement_version: u64,
    /// Versions accepted from the start, each with this shard's experts in its table; empty:
    /// `placement_version` alone, with every expert the compute holds. Two while a publication
    /// is under way (the placement file records the table it switches from until it commits):
    /// a shard that restarts mid-publication then refuses neither the pods that switched nor
    /// those that have not. The compute holds the union.
    pub accepted: Vec<(u64, Vec<usize>)>,
    pub batch_window: Duration,
    pub max_batch_rows: usize,
    pub max_message_bytes: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl ExpertServerConfig {
    /// Defaults for shard `shard_id` of `shard_count` serving `fingerprint`, on 127.0.0.1:0.
    pub fn new(shard_id: usize, shard_count: usize, fingerprint: ModelFingerprint) -> Self {
        ExpertServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            shard_id,
            shard_count,
            fingerprint,
            placement_version: 1,
            accepted: Vec::new(),
            batch_window: DEFAULT_BATCH_WINDOW,
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// Starts expert servers.
pub struct ExpertServer;

/// A running server: its address and the two ways to stop it.
pub struct RunningExpertServer {
    addr: SocketAddr,
    stop: CancellationToken,
    kill: CancellationToken,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl RunningExpertServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful stop: no new connections; requests already received are answered, then every
    /// dispatch stream ends (callers see "the shard closed the stream") and the server exits.
    pub async fn shutdown(self) -> Result<()> {
        self.stop.cancel();
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Io {
                op: "expert server".into(),
                source: std::io::Error::other(e),
            }),
            Err(e) => Err(Error::Io {
                op: "expert server task".into(),
                source: std::io::Error::other(e),
            }),
        }
    }

    /// Abrupt stop: every connection is dropped at once, as when the process dies; in-flight
    /// requests get no answer. What a crash looks like from the attention pods.
    pub async fn abort(self) {
        self.kill.cancel();
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl ExpertServer {
    /// Binds `config.addr` and serves `compute` until stopped.
    pub async fn start<C: ExpertCompute>(
        compute: Arc<C>,
        config: ExpertServerConfig,
    ) -> Result<RunningExpertServer> {
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| Error::Io {
                op: format!("binding {}", config.addr),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            op: "reading the bound address".into(),
            source,
        })?;
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE);
        let streams = Arc::new(AtomicUsize::new(0));
        tokio::spawn(batcher(
            Arc::clone(&compute),
            jobs_rx,
            config.batch_window,
            config.max_batch_rows,
            config.max_message_bytes,
            Arc::clone(&streams),
        ));
        let accepted = if config.accepted.is_empty() {
            vec![(config.placement_version, compute.experts())]
        } else {
            config.accepted.clone()
        };
        let placement = Arc::new(ShardPlacement::with_versions(
            config.shard_id,
            config.shard_count,
            config.fingerprint.n_routed_experts as usize,
            &accepted,
        ));
        let control = PlacementServer::new(ShardControl::new(
            Arc::clone(&compute),
            Arc::clone(&placement),
        ));
        let shared = Arc::new(Shared {
            compute,
            config: Arc::new(config.clone()),
            placement,
            jobs: jobs_tx,
            stop: stop.clone(),
            streams,
        });
        let grpc = ExpertRoutes {
            shared: Arc::clone(&shared),
            grpc: ExpertGrpc::new(Service(shared))
                .max_decoding_message_size(config.max_message_bytes)
                .max_encoding_message_size(config.max_message_bytes),
        };
        let kill_for_io = kill.clone();
        let incoming = TcpListenerStream::new(listener).map(move |conn| {
            conn.map(|io| {
                // Rows are latency-bound messages: never wait to coalesce them.
                let _ = io.set_nodelay(true);
                KillableIo::new(io, kill_for_io.clone())
            })
        });
        let shutdown = stop.clone();
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .add_service(grpc)
            .add_service(control);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        });
        tracing::info!(%addr, shard = config.shard_id, shards = config.shard_count, "expert shard serving");
        Ok(RunningExpertServer {
            addr,
            stop,
            kill,
            task,
        })
    }
}

/// The tonic service: a handle on the state its stream tasks share.
struct Service<C>(Arc<Shared<C>>);

impl<C> std::ops::Deref for Service<C> {
    type Target = Shared<C>;
    fn deref(&self) -> &Shared<C> {
        &self.0
    }
}

struct Shared<C> {
    compute: Arc<C>,
    config: Arc<ExpertServerConfig>,
    /// The placement versions accepted and the experts held (changed by the `Placement`
    /// service's Prepare and Commit).
    placement: Arc<ShardPlacement>,
    jobs: mpsc::Sender<Job>,
    stop: CancellationToken,
    /// Open dispatch streams: the batch window only waits when more than one pod is connected.
    streams: Arc<AtomicUsize>,
}

/// One dispatch request on its way through the batcher.
struct Job {
    request_id: u64,
    layer: usize,
    rows: EncodedRows,
    assignments: Vec<RowExperts>,
    reply_dtype: WireDtype,
    reply: mpsc::Sender<std::result::Result<Outgoing, Status>>,
}

/// A reply on its way to its stream, with its frame when it was written straight into one
/// (a computed batch's rows: see [`ReplyRows`]).
struct Outgoing {
    reply: DispatchReply,
    frame: Option<Bytes>,
}

impl From<DispatchReply> for Outgoing {
    fn from(reply: DispatchReply) -> Self {
        Outgoing { reply, frame: None }
    }
}

/// An admitted request: (request id, layer, rows, assignments, reply dtype).
type Admitted = (u64, usize, EncodedRows, Vec<RowExperts>, WireDtype);

/// [`error_reply`] boxed: what `admit` refuses with (a reply is too large to return unboxed).
fn rejected(request_id: u64, error: String) -> Box<DispatchReply> {
    Box::new(error_reply(request_id, error))
}

fn error_reply(request_id: u64, error: String) -> DispatchReply {
    DispatchReply {
        request_id,
        rows: None,
        error,
    }
}

impl<C: ExpertCompute> Shared<C> {
    /// Refuses a stream whose caller expects another model or another shard layout.
    fn check_caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> std::result::Result<(), Status> {
        let mine = &self.config.fingerprint;
        let theirs = metadata
            .get(METADATA_MODEL)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "the dispatch stream carries no `{METADATA_MODEL}` metadata"
                ))
            })?;
        let theirs = ModelFingerprint::from_metadata(theirs).ok_or_else(|| {
            Status::failed_precondition(format!("malformed `{METADATA_MODEL}` metadata `{theirs}`"))
        })?;
        if &theirs != mine {
            return Err(Status::failed_precondition(format!(
                "shard {} serves model {mine}, the caller expects model {theirs}",
                self.config.shard_id
            )));
        }
        let shards = metadata
            .get(METADATA_SHARDS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if shards != Some(self.config.shard_count) {
            return Err(Status::failed_precondition(format!(
                "shard {} is one of {} shards, the caller expects {}",
                self.config.shard_id,
                self.config.shard_count,
                shards.map_or_else(|| "an unstated number".to_string(), |s| s.to_string())
            )));
        }
        Ok(())
    }

    /// Turns a request into a batcher job, or the error to send back.
    fn admit(&self, req: DispatchRequest) -> std::result::Result<Admitted, Box<DispatchReply>> {
        let id = req.request_id;
        if let Some(why) = self.placement.refuse(req.placement_version, &[]) {
            return Err(rejected(id, why));
        }
        let rows = req
            .rows
            .ok_or_else(|| "request has no rows".to_string())
            .and_then(|r| EncodedRows::from_proto(r).map_err(|e| e.to_string()))
            .map_err(|e| rejected(id, e))?;
        if rows.width != self.compute.hidden() {
            return Err(rejected(
                id,
                format!(
                    "rows of width {}, this model's hidden size is {}",
                    rows.width,
                    self.compute.hidden()
                ),
            ));
        }
        let assignments = Assignments::from_counts(&req.expert_counts, req.experts, req.weights)
            .map_err(|e| rejected(id, e.to_string()))?;
        if assignments.rows() != rows.count {
            return Err(rejected(
                id,
                format!(
                    "{} rows but {} expert lists",
                    rows.count,
                    assignments.rows()
                ),
            ));
        }
        if let Some(why) = self
            .placement
            .refuse(req.placement_version, assignments.experts())
        {
            return Err(rejected(id, why));
        }
        let dtype =
            WireDtype::from_proto(req.reply_dtype).map_err(|e| rejected(id, e.to_string()))?;
        Ok((id, req.layer as usize, rows, assignments.to_lists(), dtype))
    }
}

#[tonic::async_trait]
impl<C: ExpertCompute> Expert for Service<C> {
    type DispatchStream =
        Pin<Box<dyn Stream<Item = std::result::Result<DispatchReply, Status>> + Send + 'static>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> std::result::Result<Response<Self::DispatchStream>, Status> {
        self.check_caller(request.metadata())?;
        let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
        tokio::spawn(serve_stream(
            Arc::clone(&self.0),
            request.into_inner(),
            reply_tx,
        ));
        // tonic encodes these replies itself; the frames are for the in-place path below.
        let replies = ReceiverStream::new(reply_rx).map(|r| r.map(|o: Outgoing| o.reply));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn info(
        &self,
        _request: Request<InfoRequest>,
    ) -> std::result::Result<Response<InfoReply>, Status> {
        Ok(Response::new(InfoReply {
            model: Some(self.config.fingerprint.clone()),
            shard_id: self.config.shard_id as u32,
            shard_count: self.config.shard_count as u32,
            placement_version: self.placement.newest_version(),
            experts: self
                .placement
                .held()
                .into_iter()
                .map(|e| e as u32)
                .collect(),
            max_message_bytes: self.config.max_message_bytes as u64,
            accepted_versions: self.placement.accepted_versions(),
        }))
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> std::result::Result<Response<HealthReply>, Status> {
        let serving = !self.stop.is_cancelled();
        Ok(Response::new(HealthReply {
            serving,
            status: if serving { "serving" } else { "stopping" }.to_string(),
        }))
    }
}

/// Reads one dispatch stream's requests and hands them to the batcher; replies (and a refusal
/// or a decoding error, which ends the stream) go to `reply_tx`.
async fn serve_stream<C, S>(
    this: Arc<Shared<C>>,
    mut inbound: S,
    reply_tx: mpsc::Sender<std::result::Result<Outgoing, Status>>,
) where
    C: ExpertCompute,
    S: Stream<Item = std::result::Result<DispatchRequest, Status>> + Unpin,
{
    this.streams.fetch_add(1, Ordering::AcqRel);
    loop {
        let message = tokio::select! {
            _ = this.stop.cancelled() => break,
            m = inbound.next() => m,
        };
        let req = match message {
            Some(Ok(req)) => req,
            None => break,
            Some(Err(status)) => {
                // A frame that does not decode (truncated, mis-sized, not a DispatchRequest)
                // ends the stream with its status: the caller learns why instead of seeing a
                // clean end.
                tracing::debug!(%status, "dispatch stream ended");
                let _ = reply_tx.send(Err(status)).await;
                break;
            }
        };
        match this.admit(req) {
            Ok((request_id, layer, rows, assignments, reply_dtype)) => {
                let job = Job {
                    request_id,
                    layer,
                    rows,
                    assignments,
                    reply_dtype,
                    reply: reply_tx.clone(),
                };
                if this.jobs.send(job).await.is_err() {
                    break;
                }
            }
            Err(reply) => {
                if reply_tx.send(Ok((*reply).into())).await.is_err() {
                    break;
                }
            }
        }
    }
    this.streams.fetch_sub(1, Ordering::AcqRel);
}

/// The `Expert` service as served: `Dispatch` streams are read and written here, the other
/// methods by the generated server.
///
/// tonic's generated streaming path copies every received HTTP/2 DATA frame into a buffer of
/// its own before decoding. Here requests are cut out of the received frames in place
/// ([`MessageSplitter`]): with the transport's frame size a request is one frame, so its rows
/// are decoded straight from where the socket read wrote them. The bytes on the wire are the
/// same gRPC call (a generated tonic client talks to it unchanged).
struct ExpertRoutes<C: ExpertCompute> {
    shared: Arc<Shared<C>>,
    grpc: ExpertGrpc<Service<C>>,
}

impl<C: ExpertCompute> Clone for ExpertRoutes<C> {
    fn clone(&self) -> Self {
        ExpertRoutes {
            shared: Arc::clone(&self.shared),
            grpc: self.grpc.clone(),
        }
    }
}

impl<C: ExpertCompute> tonic::server::NamedService for ExpertRoutes<C> {
    const NAME: &'static str = <ExpertGrpc<Service<C>> as tonic::server::NamedService>::NAME;
}

impl<C: ExpertCompute> tonic::codegen::Service<http::Request<tonic::body::Body>>
    for ExpertRoutes<C>
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        tonic::codegen::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.grpc, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == DISPATCH_PATH {
            let response = open_dispatch(Arc::clone(&self.shared), req);
            return Box::pin(async move { Ok(response) });
        }
        self.grpc.call(req)
    }
}

/// Opens a dispatch stream: checks the caller, starts reading requests, answers with the
/// stream of replies.
fn open_dispatch<C: ExpertCompute>(
    this: Arc<Shared<C>>,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let (head, body) = req.into_parts();
    if let Some(encoding) = head.headers.get("grpc-encoding")
        && encoding != "identity"
    {
        return Status::unimplemented(format!("message compression {encoding:?} is not supported"))
            .into_http();
    }
    if let Err(status) =
        this.check_caller(&tonic::metadata::MetadataMap::from_headers(head.headers))
    {
        return status.into_http();
    }
    let max = this.config.max_message_bytes;
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
    let inbound = FramedRequests {
        body,
        split: MessageSplitter::new(max),
        done: false,
    };
    tokio::spawn(serve_stream(this, inbound, reply_tx));
    let mut response = http::Response::new(tonic::body::Body::new(ReplyBody {
        rx: reply_rx,
        max,
        done: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The requests of a dispatch stream, cut out of the received frames in place.
struct FramedRequests {
    body: tonic::body::Body,
    split: MessageSplitter,
    done: bool,
}

impl Stream for FramedRequests {
    type Item = std::result::Result<DispatchRequest, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use hyper::body::Body as _;
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.split.next_message() {
                Ok(Some(m)) => return Poll::Ready(Some(decode_message(m))),
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    // Data is cut into messages; trailers (none are sent by callers) are ignored.
                    if let Ok(data) = frame.into_data() {
                        this.split.push(data);
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    if !this.split.is_empty() {
                        return Poll::Ready(Some(Err(Status::invalid_argument(
                            "the dispatch stream ended inside a message",
                        ))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The replies of a dispatch stream: each encoded into its frame when the connection polls
/// for data (rows straight into the frame buffer), then the trailers with the stream's status.
struct ReplyBody {
    rx: mpsc::Receiver<std::result::Result<Outgoing, Status>>,
    max: usize,
    done: bool,
}

/// The trailers carrying `status` (only its code if the message cannot be a header).
fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers = http::HeaderMap::new();
        trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
    }
    trailers
}

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let end = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(Outgoing {
                frame: Some(frame), ..
            }))) => return Poll::Ready(Some(Ok(Frame::data(frame)))),
            Poll::Ready(Some(Ok(Outgoing { reply, .. }))) => match encode_frame(&reply, self.max) {
                Ok(frame) => return Poll::Ready(Some(Ok(Frame::data(frame)))),
                Err(status) => status,
            },
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Collects jobs into per-layer batches and computes each batch on the blocking pool. Jobs that
/// queue while a batch computes join the next batch; with several pods connected, the batcher
/// also waits up to `window` after the first job for more.
async fn batcher<C: ExpertCompute>(
    compute: Arc<C>,
    mut rx: mpsc::Receiver<Job>,
    window: Duration,
    max_rows: usize,
    max_message: usize,
    streams: Arc<AtomicUsize>,
) {
    while let Some(first) = rx.recv().await {
        let mut rows = first.rows.count;
        let mut jobs = vec![first];
        if !window.is_zero() && streams.load(Ordering::Acquire) > 1 {
            let deadline = tokio::time::Instant::now() + window;
            while rows < max_rows {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => {
                        rows += job.rows.count;
                        jobs.push(job);
                    }
                    _ => break,
                }
            }
        }
        while rows < max_rows {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job.rows.count;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut by_layer: BTreeMap<usize, Vec<Job>> = BTreeMap::new();
        for job in jobs {
            by_layer.entry(job.layer).or_default().push(job);
        }
        for (layer, group) in by_layer {
            let compute = Arc::clone(&compute);
            // A panic in compute would lose these replies; the callers' deadlines then report it.
            let _ = tokio::task::spawn_blocking(move || {
                run_batch(&*compute, layer, group, max_message)
            })
            .await;
        }
    }
}

/// Computes and answers one layer's batch (on the blocking pool).
fn run_batch<C: ExpertCompute>(compute: &C, layer: usize, jobs: Vec<Job>, max_message: usize) {
    let h = compute.hidden();
    let total: usize = jobs.iter().map(|j| j.rows.count).sum();
    let mut assignments = Vec::with_capacity(total);
    let mut jobs = jobs;
    for job in &mut jobs {
        assignments.append(&mut job.assignments);
    }
    // The rows stay as they arrived; the compute decodes each where it uses it, and encodes
    // each token's partial sum into its reply as soon as it has summed it.
    let to = jobs.iter().map(|j| ReplyTo {
        request_id: j.request_id,
        count: j.rows.count,
        dtype: j.reply_dtype,
    });
    let mut out = ReplyRows::new(h, to, max_message);
    let result = BatchRows::new(jobs.iter().map(|j| &j.rows), h)
        .map_err(|e| -> ComputeError { e.into() })
        .and_then(|rows| compute.compute(layer, &rows, &assignments, &mut out))
        .and_then(|()| out.finish());
    let replies: Vec<std::result::Result<(EncodedRows, Option<Bytes>), String>> = match result {
        Ok(parts) => parts.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(format!("layer {layer}: {e}")); jobs.len()],
    };
    for (job, rows) in jobs.into_iter().zip(replies) {
        let reply = match rows {
            Ok((rows, frame)) => Outgoing {
                reply: DispatchReply {
                    request_id: job.request_id,
                    rows: Some(rows.into_proto()),
                    error: String::new(),
                },
                frame,
            },
            Err(e) => error_reply(job.request_id, e).into(),
        };
        // The caller's stream may be gone; its requests are simply not answered then.
        let _ = job.reply.blocking_send(Ok(reply));
    }
}

/// A TCP connection that fails every read and write once `kill` is cancelled, so
/// [`RunningExpertServer::abort`] drops connections the way a dying process does.
struct KillableIo {
    io: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableIo {
    fn new(io: TcpStream, kill: CancellationToken) -> Self {
        KillableIo {
            io,
            killed: Box::pin(kill.cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        // Polling registers the waker, so a kill wakes a connection blocked in read.
        self.killed.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "expert server aborted")
        })
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for KillableIo {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
