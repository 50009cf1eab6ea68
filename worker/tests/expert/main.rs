//! Dispatch over real gRPC on 127.0.0.1 against test shards (a deterministic linear map per
//! expert): equivalence with the same math done locally, message splitting, deadlines,
//! cross-pod batching, and refusal of shards for another model or layout.

mod common;
mod faults;
mod rebalance;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use shardseek_proto::v1::expert_client::ExpertClient;
use shardseek_proto::v1::{DispatchReply, DispatchRequest};
use shardseek_router::transport::grpc::{GrpcConfig, GrpcTransport};
use shardseek_router::{EncodedRows, Error, Placement, Routes, WireDtype};

const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_equals_local_math_on_1_2_4_shards() {
    for shards in [1, 2, 4] {
        let placement = Placement::initial(EXPERTS, shards, 0).expect("placement");
        let running = start_shards(&placement, |_| {}).await;
        let t = transport(&running, GrpcConfig::default());
        t.connect_all().await.expect("connect");
        for (dtype, layer) in [
            (WireDtype::F32, 3),
            (WireDtype::Bf16, 4),
            (WireDtype::Fp8E4m3, 5),
        ] {
            let d = dispatcher(Arc::clone(&t), placement.clone(), dtype, DEADLINE);
            for tokens in [1, 7, 33] {
                let (rows, experts, weights) = batch(tokens, tokens as u64 + shards as u64);
                let routes = Routes {
                    top_k: TOP_K,
                    experts: &experts,
                    weights: &weights,
                };
                let got = d.dispatch(layer, 0, &rows, routes).await.expect("dispatch");
                let want = local_reference(&placement, layer, &rows, &experts, &weights);
                assert_eq!(got.len(), want.len());
                for tok in 0..tokens {
                    let g = &got[tok * HIDDEN..(tok + 1) * HIDDEN];
                    let w = &want[tok * HIDDEN..(tok + 1) * HIDDEN];
                    match dtype {
                        WireDtype::F32 => {
                            assert_eq!(g, w, "{shards} shards, token {tok}: f32 wire is exact")
                        }
                        _ => {
                            let bound = if dtype == WireDtype::Bf16 {
                                bf16_bound(layer, &rows, &experts, &weights, tok)
                            } else {
                                fp8_bound(layer, &rows, &experts, &weights, tok)
                            };
                            for (a, b) in g.iter().zip(w) {
                                assert!(
                                    (a - b).abs() <= bound,
                                    "{shards} shards, {dtype} wire, token {tok}: {a} vs {b}, bound {bound}"
                                );
                            }
                            assert_ne!(g, w, "{dtype} rounding is visible (the test can fail)");
                        }
                    }
                }
            }
        }
        for s in running {
            s.server.shutdown().await.expect("clean stop");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_split_under_the_message_limit() {
    // 8 KiB messages: one f32 row is 256 bytes, so 200 tokens to one shard need several messages;
    // the shards refuse anything larger, so an unsplit batch would fail.
    let limit = 8 << 10;
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let running = start_shards(&placement, |c| c.max_message_bytes = limit).await;
    let t = transport(
        &running,
        GrpcConfig {
            max_message_bytes: limit,
            ..GrpcConfig::default()
        },
    );
    let d = dispatcher(Arc::clone(&t), placement.clone(), WireDtype::F32, DEADLINE);
    let (rows, experts, weights) = batch(200, 9);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let got = d
        .dispatch(5, 1, &rows, routes)
        .await
        .expect("split dispatch");
    assert_eq!(
        got,
        local_reference(&placement, 5, &rows, &experts, &weights)
    );

    // Without splitting (the transport believes the limit is large), the shard refuses.
    let big = transport(
        &running,
        GrpcConfig {
            max_message_bytes: 1 << 20,
            ..GrpcConfig::default()
        },
    );
    let d = dispatcher(big, placement, WireDtype::F32, DEADLINE);
    let err = d
        .dispatch(5, 1, &rows, routes)
        .await
        .expect_err("oversized message refused");
    assert!(err.to_string().contains("expert shard"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shard_fails_the_call_at_its_deadline() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let running = start_shards(&placement, |_| {}).await;
    *running[1].compute.delay.lock().expect("lock") = Duration::from_secs(3);
    let t = transport(&running, GrpcConfig::default());
    t.connect_all().await.expect("connect");
    let d = dispatcher(
        Arc::clone(&t),
        placement,
        WireDtype::Bf16,
        Duration::from_millis(300),
    );
    let (rows, experts, weights) = batch(8, 3);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let start = Instant::now();
    let err = d.dispatch(7, 2, &rows, routes).await.expect_err("deadline");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
    let text = err.to_string();
    assert!(
        text.contains("expert shard 1") && text.contains("layer 7") && text.contains("deadline"),
        "{text}"
    );
    for s in running {
        s.server.abort().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_several_pods_for_one_layer_are_batched() {
    let placement = Placement::initial(EXPERTS, 1, 0).expect("placement");
    let running = start_shards(&placement, |c| c.batch_window = Duration::from_millis(100)).await;
    let pods: Vec<_> = (0..3)
        .map(|_| {
            let t = transport(&running, GrpcConfig::default());
            dispatcher(t, placement.clone(), WireDtype::F32, DEADLINE)
        })
        .collect();
    for p in &pods {
        p.transport().connect_all().await.expect("connect");
    }
    let (rows, experts, weights) = batch(5, 11);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let want = local_reference(&placement, 2, &rows, &experts, &weights);
    let results =
        futures::future::join_all(pods.iter().map(|p| p.dispatch(2, 0, &rows, routes))).await;
    for r in results {
        assert_eq!(r.expect("dispatch"), want);
    }
    let c = &running[0].compute;
    assert_eq!(
        c.max_rows.load(Ordering::SeqCst),
        15,
        "three pods' 5 rows in one batch"
    );
    assert_eq!(c.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_for_another_model_or_layout_is_refused_with_the_reason() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    // Shard 1 was started for another checkpoint (same shape, different config.json).
    let mut running = vec![start_shard(&placement, 0, None, |_| {}).await];
    running.push(
        start_shard(&placement, 1, None, |c| {
            c.fingerprint.config_sha256 = "0".repeat(64);
        })
        .await,
    );
    let t = transport(&running, GrpcConfig::default());
    let err = t.connect_all().await.expect_err("refused");
    assert!(matches!(err, Error::Refused { shard: 1, .. }), "{err}");
    assert!(
        err.to_string().contains("serves model config 000000000000"),
        "{err}"
    );

    // Shard started as one of 4, addressed as one of 2.
    let running = vec![
        start_shard(&placement, 0, None, |_| {}).await,
        start_shard(&placement, 1, None, |c| c.shard_count = 4).await,
    ];
    let err = transport(&running, GrpcConfig::default())
        .connect_all()
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("it is shard 1 of 4"), "{err}");

    // The server checks the stream's own metadata too (a client that skipped Info).
    let addr = format!("http://{}", running[0].server.local_addr());
    let mut client = ExpertClient::connect(addr).await.expect("connect");
    let mut request = tonic::Request::new(futures::stream::empty::<DispatchRequest>());
    request.metadata_mut().insert(
        shardseek_proto::METADATA_MODEL,
        format!("{}/{}/{}", "f".repeat(64), EXPERTS, HIDDEN)
            .parse()
            .expect("ascii"),
    );
    request.metadata_mut().insert(
        shardseek_proto::METADATA_SHARDS,
        "2".parse().expect("ascii"),
    );
    let status = client
        .dispatch(request)
        .await
        .expect_err("refused at connect");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("serves model") && status.message().contains("caller expects"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_placement_version_is_refused() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let running = start_shards(&placement, |c| c.placement_version = 2).await;
    let t: Arc<GrpcTransport> = transport(&running, GrpcConfig::default());
    let d = dispatcher(t, placement, WireDtype::Bf16, DEADLINE);
    let (rows, experts, weights) = batch(4, 5);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let err = d.dispatch(3, 0, &rows, routes).await.expect_err("stale");
    assert!(err.to_string().contains("stale placement"), "{err}");
}

/// Sends pre-encoded frames as they are (a client that is not ours, or a corrupted stream).
#[derive(Clone, Default)]
struct RawFrames;

struct RawEncoder;
struct ReplyDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ReplyDecoder {
    type Item = DispatchReply;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<DispatchReply>, tonic::Status> {
        use prost::Message as _;
        DispatchReply::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawFrames {
    type Encode = bytes::Bytes;
    type Decode = DispatchReply;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

/// Opens a dispatch stream that sends `frames` as they are and returns the replies' stream.
async fn send_raw(
    addr: std::net::SocketAddr,
    frames: Vec<bytes::Bytes>,
) -> tonic::Streaming<DispatchReply> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(futures::stream::iter(frames));
    request.metadata_mut().insert(
        shardseek_proto::METADATA_MODEL,
        fingerprint().to_metadata().parse().expect("ascii"),
    );
    request.metadata_mut().insert(
        shardseek_proto::METADATA_SHARDS,
        "1".parse().expect("ascii"),
    );
    grpc.streaming(
        request,
        http::uri::PathAndQuery::from_static("/shardseek.v1.Expert/Dispatch"),
        RawFrames,
    )
    .await
    .expect("stream opens")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_mis_sized_frames_get_a_status_and_the_shard_keeps_serving() {
    use prost::Message as _;
    let placement = Placement::initial(EXPERTS, 1, 0).expect("placement");
    let running = start_shards(&placement, |_| {}).await;
    let addr = running[0].server.local_addr();
    let (rows, _, _) = batch(2, 9);
    let request = |rows_msg: shardseek_proto::rows::Rows| DispatchRequest {
        request_id: 7,
        step: 0,
        layer: 1,
        placement_version: placement.version(),
        rows: Some(rows_msg),
        expert_counts: vec![1, 1],
        experts: vec![0, 1],
        weights: vec![1.0, 1.0],
        reply_dtype: WireDtype::Bf16.to_proto() as i32,
    };
    let good = EncodedRows::encode(&rows, HIDDEN, WireDtype::Bf16).expect("encode");

    // Rows whose payload is one row short of `count`: the request's error, the stream lives on,
    // and the next (good) request on it is answered.
    let mut short = good.clone();
    short.data = short.data.slice(..HIDDEN * 2);
    let mut replies = send_raw(
        addr,
        vec![
            request(short.into_proto()).encode_to_vec().into(),
            request(good.clone().into_proto()).encode_to_vec().into(),
        ],
    )
    .await;
    let first = replies.message().await.expect("a reply").expect("one");
    assert!(
        first.error.contains("expected") && first.rows.is_none(),
        "{first:?}"
    );
    let second = replies.message().await.expect("a reply").expect("two");
    assert!(second.error.is_empty(), "{}", second.error);
    let back = EncodedRows::from_proto(second.rows.expect("rows")).expect("valid");
    assert_eq!((back.count, back.width), (2, HIDDEN));

    // A frame cut short inside the row payload: not a DispatchRequest at all. The stream ends
    // with INVALID_ARGUMENT (no panic, no silent end).
    let full = request(good.clone().into_proto()).encode_to_vec();
    for cut in [full.len() - 1, full.len() / 2, 3] {
        let mut replies = send_raw(addr, vec![bytes::Bytes::copy_from_slice(&full[..cut])]).await;
        let status = replies.message().await.expect_err("a status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("malformed"), "{status:?}");
    }

    // The shard still serves a regular client.
    let t = transport(&running, GrpcConfig::default());
    let d = dispatcher(t, placement.clone(), WireDtype::F32, DEADLINE);
    let (rows, experts, weights) = batch(3, 4);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let got = d.dispatch(2, 0, &rows, routes).await.expect("dispatch");
    assert_eq!(
        got,
        local_reference(&placement, 2, &rows, &experts, &weights)
    );
    for s in running {
        s.server.shutdown().await.expect("clean stop");
    }
}
