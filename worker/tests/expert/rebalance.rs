//! Online EPLB against real shards and a real attention-pod control service (the rebalancer of
//! `up` and of the operator, in-process): a restarted rebalancer loses no load, and processes
//! that restart in the middle of a publication end up on the new table with no request failing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use shardseek_proto::v1::CommitRequest;
use shardseek_proto::v1::placement_client::PlacementClient;
use shardseek_proto::v1::placement_server::PlacementServer;
use shardseek_router::eplb::EplbShape;
use shardseek_router::rebalancer::{
    FileStore, Outcome, PlacementStore, Rebalancer, RebalancerConfig,
};
use shardseek_router::transport::grpc::{DEFAULT_RECONNECT_BACKOFF, GrpcConfig, GrpcTransport};
use shardseek_router::{Dispatcher, KeptTable, Placement, Routes, WireDtype};
use shardseek_worker::expert::{
    BatchRows, ComputeError, ExpertCompute, ExpertServer, ExpertServerConfig, ReplyRows,
    RowExperts, RunningExpertServer,
};
use shardseek_worker::placement_control::PodControl;
use shardseek_worker::serve::shard_start_versions;

use crate::common::*;

const SHARDS: usize = 2;
const DEADLINE: Duration = Duration::from_secs(5);

/// Test experts whose set a placement may change (`Prepare`/`Commit` map and drop experts).
struct MovableExperts {
    experts: Mutex<Vec<usize>>,
}

impl ExpertCompute for MovableExperts {
    fn hidden(&self) -> usize {
        HIDDEN
    }
    fn experts(&self) -> Vec<usize> {
        self.experts.lock().map(|e| e.clone()).unwrap_or_default()
    }
    fn set_experts(&self, experts: &[usize]) -> Result<(), ComputeError> {
        *self.experts.lock().map_err(|_| "poisoned")? = experts.to_vec();
        Ok(())
    }
    fn compute(
        &self,
        layer: usize,
        rows: &BatchRows<'_>,
        assignments: &[RowExperts],
        out: &mut ReplyRows,
    ) -> Result<(), ComputeError> {
        out.push_all(&partial_sums(layer, &rows.decode(), assignments))
    }
}

/// Shard `s` started from `kept`, as `run_expert` starts one from the placement file.
async fn start_shard_from(
    kept: &KeptTable,
    s: usize,
    addr: Option<SocketAddr>,
) -> RunningExpertServer {
    let versions = shard_start_versions(kept, s);
    let mut held: Vec<usize> = versions.iter().flat_map(|v| v.1.clone()).collect();
    held.sort_unstable();
    held.dedup();
    let mut cfg = ExpertServerConfig::new(s, SHARDS, fingerprint());
    cfg.placement_version = kept.current.version();
    cfg.accepted = versions;
    if let Some(a) = addr {
        cfg.addr = a;
    }
    ExpertServer::start(
        Arc::new(MovableExperts {
            experts: Mutex::new(held),
        }),
        cfg,
    )
    .await
    .expect("shard starts")
}

/// An attention pod's dispatch client and its `Placement` service on 127.0.0.1.
struct Pod {
    dispatcher: Arc<Dispatcher<GrpcTransport>>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start_pod(shards: &[String], placement: Placement, addr: Option<SocketAddr>) -> Pod {
    let transport = Arc::new(GrpcTransport::new(
        shards.to_vec(),
        fingerprint(),
        GrpcConfig::default(),
    ));
    transport.connect_all().await.expect("shards reachable");
    transport.spawn_rejoin(DEFAULT_RECONNECT_BACKOFF);
    let d = Arc::new(dispatcher(transport, placement, WireDtype::F32, DEADLINE));
    let listener = tokio::net::TcpListener::bind(
        addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
    )
    .await
    .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = PlacementServer::new(PodControl::new(Arc::clone(&d), 1));
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Pod {
        dispatcher: d,
        addr,
        server,
    }
}

/// One step of `tokens` tokens, each routed to `TOP_K` experts among `hot`; the sums are
/// checked against the same math done directly.
async fn step(
    d: &Dispatcher<GrpcTransport>,
    tokens: usize,
    hot: &[u32],
    seed: u64,
) -> Result<(), String> {
    let (rows, _, _) = batch(tokens, seed);
    let mut experts = Vec::new();
    for t in 0..tokens {
        for k in 0..TOP_K {
            experts.push(hot[(t + k) % hot.len()]);
        }
    }
    let weights: Vec<f32> = (0..experts.len()).map(|i| 0.2 + 0.01 * i as f32).collect();
    d.step_started();
    let r = d
        .dispatch(
            1,
            seed,
            &rows,
            Routes {
                top_k: TOP_K,
                experts: &experts,
                weights: &weights,
            },
        )
        .await;
    d.step_finished();
    let out = r.map_err(|e| e.to_string())?;
    for t in 0..tokens {
        let list: RowExperts = (0..TOP_K)
            .map(|k| (experts[t * TOP_K + k] as usize, weights[t * TOP_K + k]))
            .collect();
        let want = partial_sums(1, &rows[t * HIDDEN..(t + 1) * HIDDEN], &[list]);
        for (a, b) in out[t * HIDDEN..(t + 1) * HIDDEN].iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "token {t}: {a} vs {b}"
            );
        }
    }
    Ok(())
}

/// Every expert, so that every shard is asked.
fn all_experts() -> Vec<u32> {
    (0..EXPERTS as u32).collect()
}

/// Hot experts all held by shard 0 in the initial table: EPLB moves some of them.
const HOT: [u32; 4] = [0, 1, 2, 3];

struct Cluster {
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
    shards: Vec<Option<RunningExpertServer>>,
    shard_addrs: Vec<String>,
    pod: Pod,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("placement.json");
    let initial = KeptTable::settled(Placement::initial(EXPERTS, SHARDS, 1).expect("table"));
    let mut shards = Vec::new();
    for s in 0..SHARDS {
        shards.push(Some(start_shard_from(&initial, s, None).await));
    }
    let shard_addrs: Vec<String> = shards
        .iter()
        .map(|s| {
            s.as_ref()
                .map(|s| s.local_addr().to_string())
                .unwrap_or_default()
        })
        .collect();
    let pod = start_pod(&shard_addrs, initial.current.clone(), None).await;
    Cluster {
        _dir: dir,
        file,
        shards,
        shard_addrs,
        pod,
    }
}

fn config(c: &Cluster, store: Arc<dyn PlacementStore>) -> RebalancerConfig {
    RebalancerConfig {
        shards: c.shard_addrs.clone(),
        attention: vec![c.pod.addr.to_string()],
        shape: EplbShape {
            shards: SHARDS,
            redundant: SHARDS,
            groups: 1,
            nodes: 1,
        },
        interval: Duration::from_secs(3600),
        store: Some(store),
    }
}

fn kept(c: &Cluster) -> KeptTable {
    KeptTable::read_file(&c.file)
        .expect("readable")
        .unwrap_or_else(|| {
            KeptTable::settled(Placement::initial(EXPERTS, SHARDS, 1).expect("table"))
        })
}

/// The rebalancer keeps no load of its own: the pods keep what no finished round used, so a
/// rebalancer that restarts (the operator replaces one whenever its pods change, or fails over)
/// reads exactly the load counted since the last finished round — none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_rebalancer_reads_the_load_counted_since_the_last_round() {
    let c = cluster().await;
    let store: Arc<dyn PlacementStore> = Arc::new(FileStore {
        path: c.file.clone(),
    });
    let mut first = Rebalancer::new(
        config(&c, Arc::clone(&store)),
        kept(&c),
        &prometheus::Registry::new(),
    )
    .expect("rebalancer");
    first.bring_back().await.expect("all on version 1");
    for i in 0..5 {
        step(&c.pod.dispatcher, 8, &HOT, i).await.expect("step");
    }
    let r = first.rebalance_once().await.expect("round");
    assert_eq!(r.outcome, Outcome::Published, "{r:?}");
    assert_eq!(r.load.iter().sum::<f64>(), (5 * 8 * TOP_K) as f64);
    assert_eq!(c.pod.dispatcher.placement().version(), 2);

    // Load after that round, then the rebalancer restarts before its next round.
    for i in 0..3 {
        step(&c.pod.dispatcher, 8, &[4, 5, 6, 7], 10 + i)
            .await
            .expect("step");
    }
    drop(first);
    let mut second = Rebalancer::new(
        config(&c, Arc::clone(&store)),
        kept(&c),
        &prometheus::Registry::new(),
    )
    .expect("rebalancer");
    assert_eq!(
        second.placement().version(),
        2,
        "resumes from the kept table"
    );
    second.bring_back().await.expect("all on version 2");
    let r = second.rebalance_once().await.expect("round");
    assert_eq!(
        r.load.iter().sum::<f64>(),
        (3 * 8 * TOP_K) as f64,
        "the load counted since the last finished round, not less, not the first round's again: {r:?}"
    );
    assert!(
        r.load[4..8]
            .iter()
            .all(|&l| l == (3 * 8 * TOP_K / 4) as f64),
        "{r:?}"
    );

    // That round finished: a third rebalancer has nothing left to read.
    drop(second);
    let mut third = Rebalancer::new(
        config(&c, Arc::clone(&store)),
        kept(&c),
        &prometheus::Registry::new(),
    )
    .expect("rebalancer");
    let r = third.rebalance_once().await.expect("round");
    assert_eq!(r.outcome, Outcome::NoLoad, "{r:?}");

    // Consuming is bounded by what was counted and tied to these counters.
    let d = &c.pod.dispatcher;
    let counted = d.expert_load();
    assert!(
        d.consume_load(d.load_epoch() ^ 1, &counted).is_err(),
        "another epoch"
    );
    assert!(
        d.consume_load(d.load_epoch(), &counted[1..]).is_err(),
        "another length"
    );
    let more: Vec<u64> = counted.iter().map(|&n| n + 100).collect();
    d.consume_load(d.load_epoch(), &more).expect("consume");
    assert_eq!(d.consumed_load(), counted, "never past what was counted");
}

/// A store that runs `hook` once, right after the record of a publication under way is written
/// (every shard prepared, no pod switched yet): where a process restart hurts.
#[derive(Debug)]
struct HookStore {
    file: FileStore,
    hook: Mutex<Option<Hook>>,
}

struct Hook(Box<dyn FnOnce(&KeptTable) + Send>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl PlacementStore for HookStore {
    fn save<'a>(&'a self, kept: &'a KeptTable) -> BoxFuture<'a, shardseek_router::Result<()>> {
        Box::pin(async move {
            self.file.save(kept).await?;
            if kept.previous.is_some()
                && let Some(Hook(hook)) = self.hook.lock().ok().and_then(|mut h| h.take())
            {
                hook(kept);
            }
            Ok(())
        })
    }
}

/// Steps until one succeeds (a restarted shard rejoins the pod's transport within a few
/// hundred milliseconds); a refusal for a stale placement fails the test at once.
async fn steps_succeed(d: &Dispatcher<GrpcTransport>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seed = 100;
    loop {
        seed += 1;
        match step(d, 8, &all_experts(), seed).await {
            Ok(()) => break,
            Err(e) => {
                assert!(!e.contains("stale placement"), "{what}: {e}");
                assert!(Instant::now() < deadline, "{what}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for i in 0..3 {
        step(d, 8, &all_experts(), 200 + i)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// An attention pod that restarts during a publication and read the record before it changed
/// (so it starts on the old table) and answers only after the pods were switched: the publisher
/// waits for it and switches it before any shard commits, so it never routes with a version the
/// shards refuse, and the round's end finds every process on the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_restarted_mid_publication_is_switched_before_the_shards_commit() {
    let c = cluster().await;
    for i in 0..5 {
        step(&c.pod.dispatcher, 8, &HOT, i).await.expect("step");
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shard_addrs = c.shard_addrs.clone();
    let pod_addr = c.pod.addr;
    let old_server = c.pod.server.abort_handle();
    let store = Arc::new(HookStore {
        file: FileStore {
            path: c.file.clone(),
        },
        hook: Mutex::new(Some(Hook(Box::new(move |kept: &KeptTable| {
            // The pod dies now; it had read the record before this write (the old table).
            old_server.abort();
            let old = kept.previous.clone().expect("under way");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tx.send(start_pod(&shard_addrs, old, Some(pod_addr)).await);
            });
        })))),
    });
    let mut rb = Rebalancer::new(config(&c, store), kept(&c), &prometheus::Registry::new())
        .expect("rebalancer");
    let r = rb.rebalance_once().await.expect("round");
    assert_eq!(r.outcome, Outcome::Published, "{r:?}");
    assert!(!rb.publishing(), "the publication finished in the round");
    let reborn = rx.await.expect("the pod restarted");
    assert_eq!(
        reborn.dispatcher.placement().version(),
        2,
        "the restarted pod was switched to the new version"
    );
    steps_succeed(&reborn.dispatcher, "the restarted pod").await;
    let file = KeptTable::read_file(&c.file).expect("file").expect("kept");
    assert_eq!(
        (file.current.version(), file.previous),
        (2, None),
        "recorded as finished"
    );
}

/// A shard that restarts during a publication and read the record before it changed (so it
/// accepts only the old version) is prepared again before any pod switches; one that reads the
/// record after it changed accepts both versions. Either way no pod is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_restarted_mid_publication_is_not_left_refusing_the_new_version() {
    let mut c = cluster().await;
    for i in 0..5 {
        step(&c.pod.dispatcher, 8, &HOT, i).await.expect("step");
    }
    let victim = c.shards[1].take().expect("shard 1");
    let addr = victim.local_addr();
    let victim = Arc::new(tokio::sync::Mutex::new(Some(victim)));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let store = Arc::new(HookStore {
        file: FileStore {
            path: c.file.clone(),
        },
        hook: Mutex::new(Some(Hook(Box::new(move |kept: &KeptTable| {
            let old = KeptTable::settled(kept.previous.clone().expect("under way"));
            tokio::spawn(async move {
                if let Some(v) = victim.lock().await.take() {
                    v.abort().await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = tx.send(start_shard_from(&old, 1, Some(addr)).await);
            });
        })))),
    });
    let mut rb = Rebalancer::new(config(&c, store), kept(&c), &prometheus::Registry::new())
        .expect("rebalancer");
    let r = rb.rebalance_once().await.expect("round");
    assert_eq!(r.outcome, Outcome::Published, "{r:?}");
    let _reborn = rx.await.expect("shard 1 restarted");
    assert_eq!(c.pod.dispatcher.placement().version(), 2);
    steps_succeed(&c.pod.dispatcher, "shard 1 restarted mid-publication").await;

    // A shard that starts from a record under way serves both versions until the commit.
    let v2 = kept(&c).current;
    let v3 = Placement::from_assignments(
        3,
        SHARDS,
        (0..EXPERTS).map(|e| vec![(e + 1) % SHARDS]).collect(),
    )
    .expect("table");
    let under_way = KeptTable {
        current: v3.clone(),
        previous: Some(v2.clone()),
    };
    let fresh = [
        start_shard_from(&under_way, 0, None).await,
        start_shard_from(&under_way, 1, None).await,
    ];
    let fresh_addrs: Vec<String> = fresh.iter().map(|s| s.local_addr().to_string()).collect();
    let not_switched = start_pod(&fresh_addrs, v2, None).await;
    let switched = start_pod(&fresh_addrs, v3, None).await;
    step(&not_switched.dispatcher, 8, &all_experts(), 1)
        .await
        .expect("old version served");
    step(&switched.dispatcher, 8, &all_experts(), 2)
        .await
        .expect("new version served");
    for a in &fresh_addrs {
        let mut cl = PlacementClient::connect(format!("http://{a}"))
            .await
            .expect("connect");
        cl.commit(CommitRequest { version: 3 })
            .await
            .expect("commit");
    }
    let e = step(&not_switched.dispatcher, 8, &all_experts(), 3)
        .await
        .expect_err("committed: the old version is refused");
    assert!(e.contains("stale placement"), "{e}");
    step(&switched.dispatcher, 8, &all_experts(), 4)
        .await
        .expect("new version served");
}

/// A rebalancer that starts while the store records a publication under way (the one that
/// published it stopped half-way: the operator replaced or lost it) finishes it: every pod on
/// the new version, shards committed, the record settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_left_under_way_is_finished_by_the_next_rebalancer() {
    let c = cluster().await;
    let v1 = c.pod.dispatcher.placement().as_ref().clone();
    let v2 = Placement::from_assignments(
        2,
        SHARDS,
        (0..EXPERTS).map(|e| vec![(e + 1) % SHARDS]).collect(),
    )
    .expect("table");
    // Every shard prepared version 2 and the record says so; no pod switched yet.
    for a in &c.shard_addrs {
        let mut cl = PlacementClient::connect(format!("http://{a}"))
            .await
            .expect("connect");
        cl.prepare(v2.to_proto()).await.expect("prepare");
    }
    let under_way = KeptTable {
        current: v2,
        previous: Some(v1),
    };
    under_way.write_file(&c.file).expect("record");
    let store: Arc<dyn PlacementStore> = Arc::new(FileStore {
        path: c.file.clone(),
    });
    let mut rb = Rebalancer::new(config(&c, store), kept(&c), &prometheus::Registry::new())
        .expect("rebalancer");
    assert!(rb.publishing());
    rb.bring_back().await.expect("finished");
    assert!(!rb.publishing());
    assert_eq!(c.pod.dispatcher.placement().version(), 2);
    let file = KeptTable::read_file(&c.file).expect("file").expect("kept");
    assert_eq!((file.current.version(), file.previous), (2, None));
    for a in &c.shard_addrs {
        let mut cl =
            shardseek_proto::v1::expert_client::ExpertClient::connect(format!("http://{a}"))
                .await
                .expect("connect");
        let info = cl
            .info(shardseek_proto::v1::InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.accepted_versions, [2], "committed");
    }
    steps_succeed(&c.pod.dispatcher, "after the publication finished").await;
}
