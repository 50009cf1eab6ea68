//! The NCCL transport (feature `nccl`): rows move GPU to GPU with NCCL point-to-point
//! send/recv, for GPU nodes where NVLink or InfiniBand beat gRPC over TCP.
//!
//! Every process of the cluster is one NCCL rank; the unique id that joins them travels out of
//! band (the cluster config or the router), see [`unique_id`]. A communicator is used from one
//! thread only, so each [`NcclTransport`] owns a thread that builds the communicator and runs
//! the exchanges; [`Transport::exchange`] hands it work and awaits the answer.
//!
//! Framing (both directions are fixed-size headers followed by payloads whose lengths the
//! header gives, so sender and receiver post matching operations):
//! request header `u64 × 10` = `[layer, step, placement_version, count, width, dtype, data
//! bytes, scale bytes, assignment pairs, reply dtype]`, then data `u8`, scales `u8`, counts
//! `u32 × count`, experts `u32`, weights `f32`; reply header `u64 × 6` = `[error bytes, count,
//! width, dtype, data bytes, scale bytes]`, then the error text or data and scales.
//! The expert-shard side uses [`recv_request`] and [`send_reply`].
//!
//! This code is compiled (`cargo check -p shardseek-router --features nccl`) but can only run
//! where libnccl and GPUs exist; the gRPC transport is what tests exercise.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::Bytes;
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType};
use tokio::sync::oneshot;

use super::{Assignments, ShardRequest, Transport};
use crate::codec::{EncodedRows, WireDtype};
use crate::{Error, Result};

fn nccl_err(op: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Nccl(format!("{op}: {e}"))
}

/// A fresh NCCL unique id (128 bytes) for rank 0 to hand to every other rank.
pub fn unique_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| Error::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// Where this process sits in the NCCL world.
#[derive(Clone, Debug)]
pub struct NcclConfig {
    /// CUDA device ordinal of this process.
    pub device: usize,
    pub rank: usize,
    pub world_size: usize,
    /// The 128-byte id from [`unique_id`] on rank 0.
    pub unique_id: Vec<u8>,
    /// NCCL rank of shard `i` at index `i`.
    pub shard_ranks: Vec<usize>,
}

/// Builds the communicator of `config` on the calling thread.
pub fn communicator(config: &NcclConfig) -> Result<(Comm, Arc<CudaStream>)> {
    if config.unique_id.len() != 128 {
        return Err(Error::Nccl(format!(
            "unique id has {} bytes, NCCL needs 128",
            config.unique_id.len()
        )));
    }
    let mut internal = [0 as core::ffi::c_char; 128];
    for (d, &s) in internal.iter_mut().zip(&config.unique_id) {
        *d = s as core::ffi::c_char;
    }
    let ctx = CudaContext::new(config.device)
        .map_err(|e| Error::Nccl(format!("opening CUDA device {}: {e:?}", config.device)))?;
    let stream = ctx
        .new_stream()
        .map_err(|e| Error::Nccl(format!("creating a stream: {e:?}")))?;
    let comm = Comm::from_rank(
        Arc::clone(&stream),
        config.rank,
        config.world_size,
        Id::uninit(internal),
    )
    .map_err(|e| Error::Nccl(format!("ncclCommInitRank (rank {}): {e:?}", config.rank)))?;
    Ok((comm, stream))
}

fn send_slice<T: DeviceRepr + NcclType>(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    data: &[T],
    peer: usize,
) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let dev = stream
        .clone_htod(data)
        .map_err(|e| nccl_err("host→device copy")(format!("{e:?}")))?;
    comm.send(&dev, peer as i32)
        .map_err(|e| nccl_err("ncclSend")(format!("{e:?}")))?;
    // The device buffer must outlive the send: wait for it before it is freed.
    stream
        .synchronize()
        .map_err(|e| nccl_err("stream sync")(format!("{e:?}")))
}

fn recv_vec<T: DeviceRepr + NcclType + ValidAsZeroBits>(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    n: usize,
    peer: usize,
) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut dev = stream
        .alloc_zeros::<T>(n)
        .map_err(|e| nccl_err("device alloc")(format!("{e:?}")))?;
    comm.recv(&mut dev, peer as i32)
        .map_err(|e| nccl_err("ncclRecv")(format!("{e:?}")))?;
    stream
        .synchronize()
        .map_err(|e| nccl_err("stream sync")(format!("{e:?}")))?;
    stream
        .clone_dtoh(&dev)
        .map_err(|e| nccl_err("device→host copy")(format!("{e:?}")))
}

fn dtype_code(d: WireDtype) -> u64 {
    d.to_proto() as i32 as u64
}

fn dtype_of(code: u64) -> Result<WireDtype> {
    WireDtype::from_proto(
        i32::try_from(code).map_err(|_| Error::Nccl(format!("bad dtype {code}")))?,
    )
}

/// Sends a request to `peer` (attention side).
pub fn send_request(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    peer: usize,
    req: &ShardRequest,
) -> Result<()> {
    let r = &req.rows.encode();
    let header = [
        req.layer as u64,
        req.step,
        req.placement_version,
        r.count as u64,
        r.width as u64,
        dtype_code(r.dtype),
        r.data.len() as u64,
        r.scales.len() as u64,
        req.assignments.experts().len() as u64,
        dtype_code(req.reply_dtype),
    ];
    send_slice(comm, stream, &header, peer)?;
    send_slice(comm, stream, &r.data[..], peer)?;
    send_slice(comm, stream, &r.scales[..], peer)?;
    send_slice(comm, stream, &req.assignments.counts(), peer)?;
    send_slice(comm, stream, req.assignments.experts(), peer)?;
    send_slice(comm, stream, req.assignments.weights(), peer)
}

/// A request as the expert shard receives it: the rows still encoded.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    pub layer: usize,
    pub step: u64,
    pub placement_version: u64,
    pub rows: EncodedRows,
    pub assignments: Assignments,
    pub reply_dtype: WireDtype,
}

/// Receives a request from `peer` (expert-shard side).
pub fn recv_request(comm: &Comm, stream: &Arc<CudaStream>, peer: usize) -> Result<ReceivedRequest> {
    let h: Vec<u64> = recv_vec(comm, stream, 10, peer)?;
    let data: Vec<u8> = recv_vec(comm, stream, h[6] as usize, peer)?;
    let scales: Vec<u8> = recv_vec(comm, stream, h[7] as usize, peer)?;
    let counts: Vec<u32> = recv_vec(comm, stream, h[3] as usize, peer)?;
    let experts: Vec<u32> = recv_vec(comm, stream, h[8] as usize, peer)?;
    let weights: Vec<f32> = recv_vec(comm, stream, h[8] as usize, peer)?;
    let rows = EncodedRows {
        dtype: dtype_of(h[5])?,
        count: h[3] as usize,
        width: h[4] as usize,
        data: Bytes::from(data),
        scales: Bytes::from(scales),
    };
    rows.validate()?;
    Ok(ReceivedRequest {
        layer: h[0] as usize,
        step: h[1],
        placement_version: h[2],
        rows,
        assignments: Assignments::from_counts(&counts, experts, weights)?,
        reply_dtype: dtype_of(h[9])?,
    })
}

/// Sends a reply (or the shard's error) to `peer` (expert-shard side).
pub fn send_reply(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    peer: usize,
    reply: &std::result::Result<EncodedRows, String>,
) -> Result<()> {
    match reply {
        Ok(r) => {
            let header = [
                0,
                r.count as u64,
                r.width as u64,
                dtype_code(r.dtype),
                r.data.len() as u64,
                r.scales.len() as u64,
            ];
            send_slice(comm, stream, &header, peer)?;
            send_slice(comm, stream, &r.data[..], peer)?;
            send_slice(comm, stream, &r.scales[..], peer)
        }
        Err(text) => {
            let header = [text.len() as u64, 0, 0, 0, 0, 0];
            send_slice(comm, stream, &header, peer)?;
            send_slice(comm, stream, text.as_bytes(), peer)
        }
    }
}

/// Receives a reply from `peer` (attention side); the shard's error text becomes `Err`.
pub fn recv_reply(
    comm: &Comm,
    stream: &Arc<CudaStream>,
    peer: usize,
) -> Result<std::result::Result<EncodedRows, String>> {
    let h: Vec<u64> = recv_vec(comm, stream, 6, peer)?;
    if h[0] > 0 {
        let text: Vec<u8> = recv_vec(comm, stream, h[0] as usize, peer)?;
        return Ok(Err(String::from_utf8_lossy(&text).into_owned()));
    }
    let data: Vec<u8> = recv_vec(comm, stream, h[4] as usize, peer)?;
    let scales: Vec<u8> = recv_vec(comm, stream, h[5] as usize, peer)?;
    let rows = EncodedRows {
        dtype: dtype_of(h[3])?,
        count: h[1] as usize,
        width: h[2] as usize,
        data: Bytes::from(data),
        scales: Bytes::from(scales),
    };
    rows.validate()?;
    Ok(Ok(rows))
}

struct Job {
    shard: usize,
    request: ShardRequest,
    reply: oneshot::Sender<Result<EncodedRows>>,
}

/// NCCL transport of an attention rank: exchanges run in order on the communicator's thread.
pub struct NcclTransport {
    jobs: std::sync::Mutex<std_mpsc::Sender<Job>>,
    shard_ranks: Vec<usize>,
    max_request_bytes: usize,
}

impl NcclTransport {
    /// Starts the communicator thread; fails if the communicator cannot be built.
    pub fn start(config: NcclConfig, max_request_bytes: usize) -> Result<Self> {
        let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<()>>();
        let shard_ranks = config.shard_ranks.clone();
        std::thread::Builder::new()
            .name("nccl-transport".into())
            .spawn(move || {
                let (comm, stream) = match communicator(&config) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = jobs_rx.recv() {
                    let peer = config.shard_ranks[job.shard];
                    let layer = job.request.layer;
                    let result = send_request(&comm, &stream, peer, &job.request)
                        .and_then(|()| recv_reply(&comm, &stream, peer))
                        .and_then(|r| {
                            r.map_err(|reason| Error::Shard {
                                shard: job.shard,
                                addr: format!("nccl rank {peer}"),
                                layer,
                                reason,
                            })
                        });
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|source| Error::Io {
                op: "starting the NCCL thread".into(),
                source,
            })?;
        ready_rx
            .recv()
            .map_err(|_| Error::Nccl("the NCCL thread ended during setup".into()))??;
        Ok(NcclTransport {
            jobs: std::sync::Mutex::new(jobs_tx),
            shard_ranks,
            max_request_bytes,
        })
    }
}

impl Transport for NcclTransport {
    fn shards(&self) -> usize {
        self.shard_ranks.len()
    }

    fn is_live(&self, _shard: usize) -> bool {
        // NCCL has no liveness signal short of an aborted communicator; assume live.
        true
    }

    fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    async fn exchange(
        &self,
        shard: usize,
        request: ShardRequest,
        deadline: Duration,
    ) -> Result<EncodedRows> {
        let layer = request.layer;
        let addr = self
            .shard_ranks
            .get(shard)
            .map_or_else(|| "?".to_string(), |r| format!("nccl rank {r}"));
        if shard >= self.shard_ranks.len() {
            return Err(Error::Input(format!(
                "shard {shard} of {} does not exist",
                self.shard_ranks.len()
            )));
        }
        let (tx, rx) = oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .map_err(|_| Error::Nccl("job queue poisoned".into()))?
            .send(Job {
                shard,
                request,
                reply: tx,
            });
        if sent.is_err() {
            return Err(Error::Shard {
                shard,
                addr,
                layer,
                reason: "the NCCL thread has stopped".into(),
            });
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Shard {
                shard,
                addr,
                layer,
                reason: "the NCCL thread dropped the request".into(),
            }),
            Err(_) => Err(Error::Shard {
                shard,
                addr,
                layer,
                reason: format!("no reply within the {deadline:?} deadline"),
            }),
        }
    }
}
