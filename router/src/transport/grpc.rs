//! The gRPC transport: one long-lived bidirectional `Expert.Dispatch` stream per shard.
//!
//! Many requests share a stream; each carries a request id that its reply repeats, so replies
//! may come back in any order. A reader task per stream routes replies to their waiting callers
//! and, when the stream ends or breaks, fails every pending caller at once (no caller waits for
//! its deadline on a shard known to be gone). A broken link is rebuilt on the next call after a
//! short back-off; rebuilding starts with `Info`, and a shard that serves another model, another
//! shard count or another shard id is refused with a message saying which.
//!
//! A shard whose stream ends is masked at once ([`Transport::is_live`] turns false in the reader
//! task, before any caller times out), so the dispatcher sends its tokens to replicas. Nothing
//! would then call the masked shard again, so [`GrpcTransport::spawn_rejoin`] probes masked
//! shards in the background and unmasks one as soon as a connection succeeds: a restarted shard
//! rejoins without any request paying for the probe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use shardseek_proto::frames::{MessageSplitter, decode_message, encode_frame};
use shardseek_proto::v1::expert_client::ExpertClient;
use shardseek_proto::v1::{DispatchReply, DispatchRequest, InfoRequest, ModelFingerprint};
use shardseek_proto::{METADATA_MODEL, METADATA_SHARDS};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use super::{ShardRequest, Transport};
use crate::codec::EncodedRows;
use crate::{Error, Result};

/// Default request size limit: 32 MiB holds 256 tokens × 7168 hidden in f32 (7.3 MB) with room,
/// while staying far below gRPC's 4 GiB hard limit and bounding a shard's per-message memory.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 << 20;
/// HTTP/2 PING interval: a silent peer is probed every second…
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// …and declared dead when a PING is not answered within two, so a dead shard (pod gone, cable
/// pulled: no TCP reset) is noticed within about three seconds, not the kernel's minutes.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting (TCP + HTTP/2 + `Info`) to a shard on the cluster network takes milliseconds; a
/// second means it is not there.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connect, calls fail fast for this long instead of each paying the connect
/// timeout; then the next call tries again, so a restarted shard rejoins within this delay.
pub const DEFAULT_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// HTTP/2 flow-control windows: a layer's batch to one shard is a few MB, and the 64 KiB
/// default window would cost a round trip per 64 KiB on the way. The stream window holds the
/// largest message with room, so a message is never held back waiting for a window update
/// and goes out as one DATA frame; the connection window holds a few of them in flight.
pub const STREAM_WINDOW_BYTES: u32 = 2 * DEFAULT_MAX_MESSAGE_BYTES as u32;
pub const CONNECTION_WINDOW_BYTES: u32 = 8 * DEFAULT_MAX_MESSAGE_BYTES as u32;
/// Largest HTTP/2 frame either side accepts: HTTP/2's maximum (2^24 - 1 bytes), so that a
/// message of up to 16 MiB (256 tokens of V3 rows to one shard are 3-4 MB in bf16) is one DATA
/// frame — one frame header, and on receipt a slice of the frame read in place instead of
/// pieces gathered into another buffer (`shardseek_proto::frames`).
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;
/// Path of the `Expert.Dispatch` method.
pub const DISPATCH_PATH: &str = "/shardseek.v1.Expert/Dispatch";
/// Requests queued on one stream before senders wait: enough for every layer of two micro-batches.
const STREAM_QUEUE: usize = 256;

/// Settings of the gRPC transport.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    pub max_message_bytes: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    pub reconnect_backoff: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_backoff: DEFAULT_RECONNECT_BACKOFF,
        }
    }
}

type Pending =
    Arc<Mutex<HashMap<u64, oneshot::Sender<std::result::Result<DispatchReply, String>>>>>;

/// One open `Dispatch` stream.
struct Link {
    tx: mpsc::Sender<DispatchRequest>,
    pending: Pending,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[derive(Default)]
struct SlotState {
    link: Option<Arc<Link>>,
    /// When and why the last connect failed.
    failure: Option<(Instant, String)>,
}

struct Slot {
    addr: String,
    state: tokio::sync::Mutex<SlotState>,
    /// Mirror of "has a live link or no recent failure", readable without the async lock;
    /// shared with the link's reader task, which clears it the moment the stream ends.
    live: Arc<AtomicBool>,
}

/// gRPC transport to a fixed list of shard addresses (`host:port`, shard id = position).
pub struct GrpcTransport {
    slots: Vec<Slot>,
    expected: ModelFingerprint,
    config: GrpcConfig,
}

/// Removes a pending entry when the caller stops waiting (deadline, cancellation), so a late
/// reply finds nobody and is dropped instead of leaking the entry.
struct PendingGuard {
    pending: Pending,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pending.lock() {
            map.remove(&self.id);
        }
    }
}

impl GrpcTransport {
    /// A transport to `addrs` (shard `i` at `addrs[i]`) that accepts only shards serving
    /// `expected` with `addrs.len()` shards. Connects lazily; see [`connect_all`](Self::connect_all).
    pub fn new(addrs: Vec<String>, expected: ModelFingerprint, config: GrpcConfig) -> Self {
        let slots = addrs
            .into_iter()
            .map(|addr| Slot {
                addr,
                state: tokio::sync::Mutex::new(SlotState::default()),
                live: Arc::new(AtomicBool::new(true)),
            })
            .collect();
        GrpcTransport {
            slots,
            expected,
            config,
        }
    }

    /// Connects to every shard now, failing with the first refusal or connect error: what a pod
    /// does at start so a misconfigured cluster fails loudly before serving.
    pub async fn connect_all(&self) -> Result<()> {
        let results = futures::future::join_all((0..self.slots.len()).map(|s| self.link(s))).await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Probes masked shards every `every` until the transport is dropped: a shard that comes
    /// back (restarted on its address) is reconnected and unmasked, so the dispatcher uses it
    /// again. Connect failures only re-arm the back-off.
    pub fn spawn_rejoin(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                for shard in 0..this.slots.len() {
                    if this.is_live(shard) {
                        continue;
                    }
                    if this.link(shard).await.is_ok() {
                        tracing::info!(shard, addr = %this.addr(shard), "expert shard rejoined");
                    }
                }
            }
        })
    }

    /// The address of shard `shard`.
    pub fn addr(&self, shard: usize) -> &str {
        self.slots.get(shard).map_or("?", |s| s.addr.as_str())
    }

    /// The live link to `shard`, connecting (or reconnecting) when needed.
    async fn link(&self, shard: usize) -> Result<Arc<Link>> {
        let slot = self.slots.get(shard).ok_or_else(|| {
            Error::Input(format!(
                "shard {shard} of {} does not exist",
                self.slots.len()
            ))
        })?;
        let mut state = slot.state.lock().await;
        if let Some(link) = &state.link {
            if link.alive.load(Ordering::Acquire) {
                return Ok(Arc::clone(link));
            }
            state.link = None;
        }
        if let Some((at, why)) = &state.failure
            && at.elapsed() < self.config.reconnect_backoff
        {
            return Err(Error::Connect {
                shard,
                addr: slot.addr.clone(),
                reason: format!("unavailable ({why}); retrying shortly"),
            });
        }
        match self.open(shard, &slot.addr, Arc::clone(&slot.live)).await {
            Ok(link) => {
                let link = Arc::new(link);
                state.link = Some(Arc::clone(&link));
                state.failure = None;
                slot.live.store(true, Ordering::Release);
                Ok(link)
            }
            Err(e) => {
                state.failure = Some((Instant::now(), e.to_string()));
                slot.live.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Connects, checks `Info` against the expected model and shard layout, opens the stream.
    async fn open(&self, shard: usize, addr: &str, slot_live: Arc<AtomicBool>) -> Result<Link> {
        let connect_err = |reason: String| Error::Connect {
            shard,
            addr: addr.to_string(),
            reason,
        };
        let refused = |reason: String| Error::Refused {
            shard,
            addr: addr.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| connect_err(format!("bad address: {e}")))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES);
        let deadline = self.config.connect_timeout;
        let channel: Channel = tokio::time::timeout(deadline, endpoint.connect())
            .await
            .map_err(|_| connect_err(format!("no answer within {deadline:?}")))?
            .map_err(|e| connect_err(error_chain(&e)))?;
        let mut client = ExpertClient::new(channel.clone())
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);

        let info = tokio::time::timeout(deadline, client.info(InfoRequest {}))
            .await
            .map_err(|_| connect_err(format!("Info not answered within {deadline:?}")))?
            .map_err(|s| connect_err(format!("Info failed: {}", s.message())))?
            .into_inner();
        let theirs = info.model.unwrap_or_default();
        if theirs != self.expected {
            return Err(refused(format!(
                "it serves model {theirs}, this pod serves {}",
                self.expected
            )));
        }
        if info.shard_count as usize != self.slots.len() || info.shard_id as usize != shard {
            return Err(refused(format!(
                "it is shard {} of {}, this pod expects shard {shard} of {} at this address",
                info.shard_id,
                info.shard_count,
                self.slots.len()
            )));
        }

        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let model = HeaderValue::try_from(self.expected.to_metadata())
            .map_err(|e| connect_err(format!("fingerprint is not valid metadata: {e}")))?;
        // The stream is opened on the channel itself rather than through the generated client,
        // so that replies are cut out of the received HTTP/2 frames in place (see
        // `shardseek_proto::frames`); on the wire it is the same gRPC call.
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{addr}{DISPATCH_PATH}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(METADATA_MODEL, model)
            .header(METADATA_SHARDS, self.slots.len())
            .body(tonic::body::Body::new(RequestBody {
                rx,
                max: self.config.max_message_bytes,
            }))
            .map_err(|e| connect_err(format!("building the Dispatch request: {e}")))?;
        let mut service = channel.clone();
        let opened = async move {
            std::future::poll_fn(|cx| tonic::codegen::Service::poll_ready(&mut service, cx))
                .await?;
            tonic::codegen::Service::call(&mut service, request).await
        };
        let response = tokio::time::timeout(deadline, opened)
            .await
            .map_err(|_| connect_err(format!("Dispatch not opened within {deadline:?}")))?
            .map_err(|e| connect_err(format!("Dispatch failed: {}", error_chain(&e))))?;
        if response.status() != http::StatusCode::OK {
            return Err(connect_err(format!(
                "Dispatch answered HTTP {}",
                response.status()
            )));
        }
        // A refusal comes as a response with no body whose headers carry the status.
        if let Some(status) = tonic::Status::from_header_map(response.headers())
            && status.code() != tonic::Code::Ok
        {
            return Err(if status.code() == tonic::Code::FailedPrecondition {
                refused(status.message().to_string())
            } else {
                connect_err(format!("Dispatch refused: {}", status.message()))
            });
        }
        let mut inbound = response.into_body();
        let max_message = self.config.max_message_bytes;

        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let reader = {
            let pending = Arc::clone(&pending);
            let alive = Arc::clone(&alive);
            tokio::spawn(async move {
                let mut split = MessageSplitter::new(max_message);
                let why = 'read: loop {
                    let data = match inbound.frame().await {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => data,
                            Err(frame) => {
                                let status = frame
                                    .into_trailers()
                                    .ok()
                                    .and_then(|t| tonic::Status::from_header_map(&t));
                                break match status {
                                    Some(s) if s.code() != tonic::Code::Ok => {
                                        format!("stream broke: {}", status_text(&s))
                                    }
                                    _ => "the shard closed the stream".to_string(),
                                };
                            }
                        },
                        Some(Err(status)) => {
                            break format!("stream broke: {}", status_text(&status));
                        }
                        None => break "the shard closed the stream".to_string(),
                    };
                    split.push(data);
                    loop {
                        let reply = match split.next_message().and_then(|m| match m {
                            Some(m) => decode_message::<DispatchReply>(m).map(Some),
                            None => Ok(None),
                        }) {
                            Ok(Some(reply)) => reply,
                            Ok(None) => break,
                            Err(status) => {
                                break 'read format!("stream broke: {}", status_text(&status));
                            }
                        };
                        let waiter = pending
                            .lock()
                            .ok()
                            .and_then(|mut m| m.remove(&reply.request_id));
                        if let Some(w) = waiter {
                            // The caller may have given up (deadline); nothing to do then.
                            let _ = w.send(Ok(reply));
                        }
                    }
                };
                alive.store(false, Ordering::Release);
                slot_live.store(false, Ordering::Release);
                tracing::warn!(shard, reason = %why, "dispatch stream ended; shard masked");
                let waiters: Vec<_> = pending
                    .lock()
                    .map(|mut m| m.drain().map(|(_, w)| w).collect())
                    .unwrap_or_default();
                for w in waiters {
                    let _ = w.send(Err(why.clone()));
                }
            })
        };
        Ok(Link {
            tx,
            pending,
            next_id: AtomicU64::new(1),
            alive,
            reader,
        })
    }

    async fn exchange_inner(&self, shard: usize, request: ShardRequest) -> Result<EncodedRows> {
        let layer = request.layer;
        let addr = self.addr(shard).to_string();
        let shard_err = |reason: String| Error::Shard {
            shard,
            addr: addr.clone(),
            layer,
            reason,
        };
        let link = match self.link(shard).await {
            Ok(l) => l,
            Err(Error::Connect { reason, .. }) => return Err(shard_err(reason)),
            Err(e) => return Err(e),
        };
        let expected_rows = request.rows.count();
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        link.pending
            .lock()
            .map_err(|_| shard_err("pending table poisoned".into()))?
            .insert(id, reply_tx);
        let _guard = PendingGuard {
            pending: Arc::clone(&link.pending),
            id,
        };
        let message = DispatchRequest {
            request_id: id,
            step: request.step,
            layer: layer as u32,
            placement_version: request.placement_version,
            expert_counts: request.assignments.counts(),
            experts: request.assignments.experts().to_vec(),
            weights: request.assignments.weights().to_vec(),
            rows: Some(request.rows.into_proto()),
            reply_dtype: request.reply_dtype.to_proto() as i32,
        };
        if link.tx.send(message).await.is_err() {
            self.mark_dead(shard, &link);
            return Err(shard_err("the dispatch stream is closed".into()));
        }
        let reply = match reply_rx.await {
            Ok(Ok(reply)) => reply,
            Ok(Err(why)) => {
                self.mark_dead(shard, &link);
                return Err(shard_err(why));
            }
            Err(_) => {
                return Err(shard_err(
                    "the dispatch stream ended without a reply".into(),
                ));
            }
        };
        if !reply.error.is_empty() {
            return Err(shard_err(format!(
                "the shard failed the request: {}",
                reply.error
            )));
        }
        let rows = reply
            .rows
            .ok_or_else(|| shard_err("reply has no rows".into()))
            .and_then(|r| EncodedRows::from_proto(r).map_err(|e| shard_err(e.to_string())))?;
        if rows.count != expected_rows {
            return Err(shard_err(format!(
                "sent {expected_rows} rows, got {} back",
                rows.count
            )));
        }
        Ok(rows)
    }

    fn mark_dead(&self, shard: usize, link: &Link) {
        link.alive.store(false, Ordering::Release);
        if let Some(slot) = self.slots.get(shard) {
            slot.live.store(false, Ordering::Release);
        }
    }
}

impl Transport for GrpcTransport {
    fn shards(&self) -> usize {
        self.slots.len()
    }

    fn is_live(&self, shard: usize) -> bool {
        self.slots
            .get(shard)
            .is_some_and(|s| s.live.load(Ordering::Acquire))
    }

    fn max_request_bytes(&self) -> usize {
        // Leave room for the assignments and protobuf framing next to the row payload.
        self.config.max_message_bytes * 7 / 8
    }

    async fn exchange(
        &self,
        shard: usize,
        request: ShardRequest,
        deadline: Duration,
    ) -> Result<EncodedRows> {
        let layer = request.layer;
        match tokio::time::timeout(deadline, self.exchange_inner(shard, request)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Shard {
                shard,
                addr: self.addr(shard).to_string(),
                layer,
                reason: format!("no reply within the {deadline:?} deadline"),
            }),
        }
    }
}

/// The request body of a dispatch stream: each queued request becomes one gRPC message when
/// the HTTP/2 connection polls for data, encoded then (rows straight into the frame buffer, in
/// the connection's task, so each shard's stream encodes in parallel with the others).
struct RequestBody {
    rx: mpsc::Receiver<DispatchRequest>,
    max: usize,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, tonic::Status>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(encode_frame(&m, self.max).map(Frame::data))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A status as one line: code and message.
fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// An error and its sources on one line (transport errors hide the useful part in the chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
