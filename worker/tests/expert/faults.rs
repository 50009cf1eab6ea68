//! Fault injection: a shard killed mid-stream, the survivors going on, the restarted shard
//! rejoining, and failover to redundant replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use shardseek_router::transport::grpc::{GrpcConfig, GrpcTransport};
use shardseek_router::{DispatchConfig, Dispatcher, Placement, Routes, Transport, WireDtype};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const DEADLINE: Duration = Duration::from_secs(5);

/// Routes every token to `TOP_K` experts chosen among `allowed`.
fn routes_within(tokens: usize, allowed: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut experts = Vec::new();
    for t in 0..tokens {
        for k in 0..TOP_K {
            experts.push(allowed[(t + k) % allowed.len()]);
        }
    }
    let weights = (0..experts.len()).map(|i| 0.2 + 0.01 * i as f32).collect();
    (experts, weights)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shard_fails_its_calls_others_go_on_and_it_rejoins() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let mut running = start_shards(&placement, |_| {}).await;
    let t = transport(&running, GrpcConfig::default());
    t.connect_all().await.expect("connect");
    let d = Arc::new(dispatcher(
        Arc::clone(&t),
        placement.clone(),
        WireDtype::F32,
        DEADLINE,
    ));
    let (rows, _, _) = batch(6, 1);
    let shard0: Vec<u32> = placement.experts_of(0).iter().map(|&e| e as u32).collect();
    let shard1: Vec<u32> = placement.experts_of(1).iter().map(|&e| e as u32).collect();
    let both: Vec<u32> = (0..EXPERTS as u32).collect();

    // A call in flight on shard 1 (its compute takes a second) when shard 1 dies.
    *running[1].compute.delay.lock().expect("lock") = Duration::from_secs(1);
    let in_flight = {
        let d = Arc::clone(&d);
        let rows = rows.clone();
        let (experts, weights) = routes_within(6, &both);
        tokio::spawn(async move {
            let start = Instant::now();
            let r = d
                .dispatch(
                    9,
                    0,
                    &rows,
                    Routes {
                        top_k: TOP_K,
                        experts: &experts,
                        weights: &weights,
                    },
                )
                .await;
            (r, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dead = running.pop().expect("shard 1");
    let addr1 = dead.server.local_addr();
    dead.server.abort().await;
    let (result, took) = in_flight.await.expect("task");
    let err = result.expect_err("the call needing shard 1 fails");
    assert!(
        took < Duration::from_secs(2),
        "took {took:?}: no waiting for the {DEADLINE:?} deadline"
    );
    let text = err.to_string();
    assert!(
        text.contains("expert shard 1") && text.contains("layer 9"),
        "{text}"
    );
    assert!(!t.is_live(1), "the transport knows shard 1 is gone");

    // Calls that need only shard 0 go on.
    let (experts, weights) = routes_within(6, &shard0);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let got = d
        .dispatch(9, 1, &rows, routes)
        .await
        .expect("shard 0 alone serves");
    assert_eq!(
        got,
        local_reference(&placement, 9, &rows, &experts, &weights)
    );

    // Calls that need shard 1 fail fast with a clear error.
    let (experts, weights) = routes_within(6, &shard1);
    let routes1 = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let start = Instant::now();
    let err = d
        .dispatch(9, 2, &rows, routes1)
        .await
        .expect_err("shard 1 is down");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("expert shard 1"), "{err}");

    // Shard 1 comes back on its address and rejoins.
    let back = start_shard(&placement, 1, Some(addr1), |_| {}).await;
    let want = local_reference(&placement, 9, &rows, &experts, &weights);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match d.dispatch(9, 3, &rows, routes1).await {
            Ok(got) => {
                assert_eq!(got, want);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                tracing_free_sleep(&e).await;
            }
            Err(e) => panic!("shard 1 did not rejoin: {e}"),
        }
    }
    assert!(t.is_live(1));
    back.server.shutdown().await.expect("stop");
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}

async fn tracing_free_sleep(_last_error: &shardseek_router::Error) {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shards_experts_fail_over_to_replicas() {
    // 8 redundant slots per shard: each shard also holds the other's 8 experts.
    let placement = Placement::initial(EXPERTS, 2, 8).expect("placement");
    let mut running = start_shards(&placement, |_| {}).await;
    let t = transport(&running, GrpcConfig::default());
    t.connect_all().await.expect("connect");
    let d = dispatcher(Arc::clone(&t), placement.clone(), WireDtype::F32, DEADLINE);
    let (rows, experts, weights) = batch(10, 4);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let want = local_reference(&placement, 4, &rows, &experts, &weights);

    running.pop().expect("shard 1").server.abort().await;
    let got = d
        .dispatch(4, 0, &rows, routes)
        .await
        .expect("failover to shard 0");
    for (g, w) in got.iter().zip(&want) {
        // Same terms, another summation grouping: equal to f32 rounding.
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    // Later calls route around the dead shard directly (masked: it gets no request). The
    // first call may have split its tokens over both shards before the death was seen, so the
    // two results group their sums differently: both equal the reference to f32 rounding.
    assert!(!t.is_live(1), "shard 1 is masked");
    let again = d.dispatch(4, 1, &rows, routes).await.expect("still served");
    for (g, w) in again.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}

/// A TCP proxy in front of a shard that can turn into a black hole: connections stay open but
/// nothing passes any more — a shard whose node vanished without a TCP reset.
async fn blackhole_proxy(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let hole = Arc::new(AtomicBool::new(false));
    let hole2 = Arc::clone(&hole);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, Arc::clone(&hole2)));
            tokio::spawn(pump(sr, cw, Arc::clone(&hole2)));
        }
    });
    (addr, hole)
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, hole: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hole.load(Ordering::SeqCst) {
            // Swallow everything from now on, keeping both sockets open.
            while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(to);
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_shard_is_noticed_by_keepalive_before_the_deadline() {
    let placement = Placement::initial(EXPERTS, 1, 0).expect("placement");
    let running = start_shards(&placement, |_| {}).await;
    let (proxy, hole) = blackhole_proxy(running[0].server.local_addr()).await;
    let t = Arc::new(GrpcTransport::new(
        vec![proxy.to_string()],
        fingerprint(),
        GrpcConfig::default(),
    ));
    t.connect_all().await.expect("connect through the proxy");
    // A deadline far beyond keepalive's interval + timeout (1 s + 2 s).
    let d = dispatcher(
        Arc::clone(&t),
        placement.clone(),
        WireDtype::F32,
        Duration::from_secs(30),
    );
    let (rows, experts, weights) = batch(4, 8);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    d.dispatch(1, 0, &rows, routes)
        .await
        .expect("served through the proxy");

    hole.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let err = d
        .dispatch(1, 1, &rows, routes)
        .await
        .expect_err("the shard went silent");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(8), "noticed after {took:?}");
    assert!(
        !err.to_string().contains("deadline"),
        "keepalive, not the deadline: {err}"
    );
    assert!(err.to_string().contains("expert shard 0"), "{err}");
    assert!(!t.is_live(0));
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_load_a_dead_shard_is_masked_at_once_and_rejoins() {
    // Full replication over 2 shards: every expert on both.
    let placement = Placement::initial(EXPERTS, 2, 8).expect("placement");
    let mut running = start_shards(&placement, |_| {}).await;
    let t = transport(&running, GrpcConfig::default());
    t.connect_all().await.expect("connect");
    let _rejoin = t.spawn_rejoin(Duration::from_millis(50));
    let d = dispatcher(Arc::clone(&t), placement.clone(), WireDtype::F32, DEADLINE);
    let (rows, experts, weights) = batch(16, 7);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    let want = local_reference(&placement, 2, &rows, &experts, &weights);
    let close = |got: &[f32]| {
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    };

    // Least-loaded replica choice: with every expert on both shards, one batch uses both.
    assert_eq!(d.load_imbalance(), None, "no load yet");
    close(&d.dispatch(2, 0, &rows, routes).await.expect("served"));
    let load = d.shard_load();
    assert_eq!(load.iter().sum::<u64>(), (16 * TOP_K) as u64, "{load:?}");
    let ratio = d.load_imbalance().expect("load seen");
    let max = *load.iter().max().expect("two shards") as f64;
    assert!((ratio - max / (16 * TOP_K) as f64 * 2.0).abs() < 1e-12);
    assert!(
        ratio < 1.2,
        "least-loaded choice spreads the pairs: {load:?}"
    );
    let calls = |s: &Shard| s.compute.calls.load(Ordering::SeqCst);
    assert!(
        calls(&running[0]) >= 1 && calls(&running[1]) >= 1,
        "both replicas served: {} and {} calls",
        calls(&running[0]),
        calls(&running[1])
    );

    // Shard 1 dies: it is masked before anyone calls it, and shard 0 serves everything.
    let dead = running.pop().expect("shard 1");
    let addr1 = dead.server.local_addr();
    dead.server.abort().await;
    let masked_by = Instant::now() + Duration::from_secs(2);
    while t.is_live(1) {
        assert!(Instant::now() < masked_by, "shard 1 still counted live");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = calls(&running[0]);
    close(&d.dispatch(2, 1, &rows, routes).await.expect("no failure"));
    assert!(calls(&running[0]) > before);

    // It comes back on its address: the prober unmasks it and it takes tokens again.
    let back = start_shard(&placement, 1, Some(addr1), |_| {}).await;
    let rejoined_by = Instant::now() + Duration::from_secs(5);
    while !t.is_live(1) {
        assert!(Instant::now() < rejoined_by, "shard 1 did not rejoin");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    close(&d.dispatch(2, 2, &rows, routes).await.expect("served"));
    assert!(
        back.compute.calls.load(Ordering::SeqCst) >= 1,
        "the rejoined shard serves again"
    );
    back.server.shutdown().await.expect("stop");
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}

/// Without replicas, a dead shard costs only the tokens routed to it: `dispatch_partial` lists
/// them, each with the error naming the shard, and every other token's sum is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_only_the_tokens_on_the_dead_shard_fail() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let mut running = start_shards(&placement, |_| {}).await;
    let t = transport(&running, GrpcConfig::default());
    t.connect_all().await.expect("connect");
    let d = dispatcher(Arc::clone(&t), placement.clone(), WireDtype::F32, DEADLINE);
    let shard0: Vec<u32> = placement.experts_of(0).iter().map(|&e| e as u32).collect();
    let mixed: Vec<u32> = vec![
        shard0[0],
        placement.experts_of(1)[0] as u32,
        shard0[1],
        placement.experts_of(1)[1] as u32,
    ];
    // Tokens 0..4 need only shard 0; tokens 4..8 need both.
    let (rows, _, _) = batch(8, 2);
    let (e0, w0) = routes_within(4, &shard0);
    let (e1, w1) = routes_within(4, &mixed);
    let experts = [e0.clone(), e1].concat();
    let weights = [w0.clone(), w1].concat();
    running.pop().expect("shard 1").server.abort().await;
    let got = d
        .dispatch_partial(
            5,
            0,
            Arc::new(rows.clone()),
            Routes {
                top_k: TOP_K,
                experts: &experts,
                weights: &weights,
            },
        )
        .await
        .expect("the input is fine");
    let mut lost: Vec<usize> = Vec::new();
    for f in &got.failures {
        let text = f.error.to_string();
        assert!(text.contains("expert shard 1"), "{text}");
        lost.extend(&f.tokens);
    }
    lost.sort_unstable();
    lost.dedup();
    assert_eq!(
        lost,
        vec![4, 5, 6, 7],
        "exactly the tokens routed to shard 1"
    );
    assert_eq!(got.held, 0, "no failover wait: nothing is held");
    let want = local_reference(&placement, 5, &rows[..4 * HIDDEN], &e0, &w0);
    assert_eq!(
        &got.rows[..4 * HIDDEN],
        &want[..],
        "the others' sums are exact"
    );
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}

/// With a failover wait, tokens whose experts have no live copy are held until their shard is
/// back (restarted on its address, unmasked by the prober) and then served in full; the sums are
/// the reference's. Past the wait they fail as without it, naming the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_live_copy_tokens_wait_for_the_restart_or_fail_after_the_wait() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let mut running = start_shards(&placement, |_| {}).await;
    let t = transport(&running, GrpcConfig::default());
    t.connect_all().await.expect("connect");
    let _rejoin = t.spawn_rejoin(Duration::from_millis(50));
    let holding = |wait: Duration| {
        Dispatcher::new(
            Arc::clone(&t),
            placement.clone(),
            HIDDEN,
            DispatchConfig {
                wire_dtype: WireDtype::F32,
                deadline: DEADLINE,
                failover_wait: wait,
                ..DispatchConfig::default()
            },
        )
        .expect("dispatcher")
    };
    let (rows, experts, weights) = batch(12, 5);
    let routes = Routes {
        top_k: TOP_K,
        experts: &experts,
        weights: &weights,
    };
    assert!(
        placement
            .experts_of(1)
            .iter()
            .any(|e| experts.contains(&(*e as u32))),
        "the batch needs shard 1"
    );
    let want = local_reference(&placement, 3, &rows, &experts, &weights);

    // Shard 1 dies; it comes back on its address 400 ms later, while the dispatch waits.
    let dead = running.pop().expect("shard 1");
    let addr1 = dead.server.local_addr();
    dead.server.abort().await;
    let restart = {
        let placement = placement.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            start_shard(&placement, 1, Some(addr1), |_| {}).await
        })
    };
    let d = holding(Duration::from_secs(5));
    let started = Instant::now();
    let got = d
        .dispatch_partial(3, 0, Arc::new(rows.clone()), routes)
        .await
        .expect("the input is fine");
    let held = started.elapsed();
    assert!(got.held > 0, "some tokens were held");
    assert!(
        got.failures.is_empty(),
        "held tokens failed: {:?}",
        got.failures
            .iter()
            .map(|f| f.error.to_string())
            .collect::<Vec<_>>()
    );
    assert!(
        held >= Duration::from_millis(300),
        "served in {held:?}, before shard 1 was back"
    );
    for (g, w) in got.rows.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    let back = restart.await.expect("restart task");
    assert!(back.compute.calls.load(Ordering::SeqCst) >= 1);

    // It dies again and stays down: after a 300 ms wait its tokens fail, naming it.
    back.server.abort().await;
    let d = holding(Duration::from_millis(300));
    let started = Instant::now();
    let got = d
        .dispatch_partial(3, 1, Arc::new(rows.clone()), routes)
        .await
        .expect("the input is fine");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        !got.failures.is_empty(),
        "tokens on a dead shard cannot succeed"
    );
    assert_eq!(
        got.held,
        got.failures.iter().map(|f| f.tokens.len()).sum::<usize>(),
        "every held token failed"
    );
    for f in &got.failures {
        let text = f.error.to_string();
        assert!(text.contains("expert shard 1"), "{text}");
    }
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}

/// A table staged during a step waits for the step's end (every layer of a step routes with one
/// table); one staged between steps is used at once; an older one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_placement_takes_effect_between_steps() {
    let placement = Placement::initial(EXPERTS, 2, 0).expect("placement");
    let running = start_shards(&placement, |_| {}).await;
    let t = transport(&running, GrpcConfig::default());
    let d = dispatcher(Arc::clone(&t), placement.clone(), WireDtype::F32, DEADLINE);
    // Version 2 swaps the halves.
    let swapped = |version| {
        Placement::from_assignments(
            version,
            2,
            (0..EXPERTS).map(|e| vec![1 - e * 2 / EXPERTS]).collect(),
        )
        .expect("valid")
    };
    d.step_started();
    d.stage_placement(swapped(2)).expect("staged");
    assert_eq!(d.placement().version(), 1, "not inside a step");
    assert!(!d.wait_for_version(2, Duration::from_millis(50)).await);
    d.step_finished();
    assert!(d.wait_for_version(2, Duration::from_millis(50)).await);
    assert_eq!(d.placement().version(), 2);
    assert_eq!(d.placement().replicas(0), Some(&[1][..]));
    d.stage_placement(swapped(3)).expect("between steps");
    assert_eq!(d.placement().version(), 3, "used at once between steps");
    assert!(d.stage_placement(placement.clone()).is_err(), "older");
    for s in running {
        s.server.shutdown().await.expect("stop");
    }
}
