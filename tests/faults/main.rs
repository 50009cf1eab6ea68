//! Faults of the running cluster: a shard killed mid-generation fails the affected request
//! with a clear error within the dispatch deadline, and the cluster recovers when the shard
//! comes back; a shard for another shard count is refused at connect. Under `shardseek up` a
//! killed shard is restarted by the supervisor while `up` keeps serving, and with redundant
//! experts its death fails no request at all.

#[path = "../common/mod.rs"]
mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn killed_shard_fails_requests_then_rejoins() {
    let m = tiny("fp8");
    let model = m.path().to_string_lossy().to_string();
    let (p0, p1) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let shard = |i: &str, addr: &str| {
        spawn(&[
            "worker", "--role", "expert", "--model", &model, "--listen", addr, "--shard", i,
            "--shards", "2",
        ])
    };
    let s0 = shard("0", &p0);
    wait_line(&s0, "READY", Duration::from_secs(60));
    let mut s1 = Some(shard("1", &p1));
    wait_line(s1.as_ref().unwrap(), "READY", Duration::from_secs(60));
    let experts = format!("{p0},{p1}");
    let att = spawn(&[
        "worker",
        "--role",
        "attention",
        "--model",
        &model,
        "--experts",
        &experts,
    ]);
    let att_addr = wait_line(&att, "READY", Duration::from_secs(60));
    let router = spawn(&[
        "router",
        "--listen",
        "127.0.0.1:0",
        "--attention",
        &att_addr,
        "--model",
        &model,
    ]);
    let addr = wait_line(&router, "READY", Duration::from_secs(60));

    let ok = generate(&[
        "--url",
        &addr,
        "--prompt-tokens",
        "1,2,3",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ]);
    assert!(ok.is_ok(), "healthy cluster: {ok:?}");

    // A long generation, and the shard dies under it.
    let a2 = addr.clone();
    let long = std::thread::spawn(move || {
        let t0 = Instant::now();
        (
            generate(&[
                "--url",
                &a2,
                "--prompt-tokens",
                "1,2,3",
                "--max-tokens",
                "4000",
                "--ignore-eos",
            ]),
            t0.elapsed(),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    let mut dead = s1.take().unwrap();
    dead.child.kill().unwrap();
    let _ = dead.child.wait();
    let (res, took) = long.join().unwrap();
    let err = res.expect_err("a request whose shard died must fail");
    assert!(
        err.contains("shard") || err.contains("expert"),
        "the error names the shard: {err}"
    );
    assert!(
        took < Duration::from_secs(30),
        "failed within the deadline, took {took:?}"
    );

    // While the shard is down, requests fail fast and clearly (no hang).
    let t0 = Instant::now();
    let e = generate(&[
        "--url",
        &addr,
        "--prompt-tokens",
        "1,2,3",
        "--max-tokens",
        "4",
        "--ignore-eos",
    ])
    .expect_err("shard down");
    assert!(t0.elapsed() < Duration::from_secs(30), "{e}");

    // The shard comes back on its address and the cluster serves again.
    let s1b = shard("1", &p1);
    wait_line(&s1b, "READY", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match generate(&[
            "--url",
            &addr,
            "--prompt-tokens",
            "1,2,3",
            "--max-tokens",
            "4",
            "--ignore-eos",
        ]) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("the restarted shard did not rejoin: {e}"),
        }
    }
    drop((s0, s1b, att, router));
}

#[test]
fn shard_for_another_shard_count_is_refused() {
    let m = tiny("fp8");
    let model = m.path().to_string_lossy().to_string();
    let shard = spawn(&[
        "worker", "--role", "expert", "--model", &model, "--shard", "0", "--shards", "3",
    ]);
    let saddr = wait_line(&shard, "READY", Duration::from_secs(60));
    // The attention pod believes in one shard; the shard says it is one of three.
    let out = std::process::Command::new(bin())
        .args([
            "worker",
            "--role",
            "attention",
            "--model",
            &model,
            "--experts",
            &saddr,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3") && (err.contains("shard") || err.contains("refused")),
        "{err}"
    );
}

fn sigkill(pid: i32) {
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -KILL {pid}");
}

/// Waits (bounded) until none of `pids` is alive.
fn all_gone(pids: &[i32]) -> Result<(), Vec<i32>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(alive);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_restarts_a_killed_shard_the_affected_request_fails_and_up_serves_again() {
    let m = tiny("fp8");
    let (mut up, addr, metrics, mut lines) = up_supervised(m.path(), 2, &[]);
    let victim = started_pid(&lines, "expert-1").expect("expert-1's pid in the output");
    stream_completion(&addr, &[1, 2, 3], 4).expect("healthy cluster");

    // A long generation through shard 1 (every tiny-model token uses both shards), then the
    // shard is SIGKILLed under it.
    let a2 = addr.clone();
    let long = std::thread::spawn(move || {
        let t0 = Instant::now();
        (stream_completion(&a2, &[1, 2, 3], 4000), t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));
    sigkill(victim);
    let (res, took) = long.join().unwrap();
    let err = res.expect_err("the request whose shard died fails");
    assert!(
        err.contains("expert shard 1"),
        "the error names the shard: {err}"
    );
    assert!(took < Duration::from_secs(60), "failed promptly: {took:?}");

    // `up` stays up and restarts the shard on its address.
    assert!(
        up.child.try_wait().expect("try_wait").is_none(),
        "up exited after a shard died"
    );
    let more = lines_until(
        &up,
        "[supervisor] expert-1 is ready again",
        Duration::from_secs(60),
    );
    let reborn = started_pid(&more, "expert-1").expect("restarted expert-1's pid");
    assert_ne!(reborn, victim);
    lines.extend(more);

    // Requests succeed again once it is back.
    completes_within_30s(
        &addr,
        &[1, 2, 3],
        8,
        "the restarted shard did not rejoin",
        |_| {},
    );
    let text = http_get(&metrics, "/metrics").expect("supervisor metrics");
    assert_eq!(
        sample(
            &text,
            "shardseek_supervisor_restarts_total",
            r#"child="expert-1""#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "shardseek_supervisor_restarts_total",
            r#"child="expert-0""#
        ),
        None,
        "{text}"
    );

    // Stopping `up` stops every child it ever started, the restarted one included.
    let pids = all_started_pids(&lines);
    assert!(pids.contains(&reborn));
    drop(up);
    if let Err(alive) = all_gone(&pids) {
        panic!("children outlived `up`: {alive:?}");
    }
}

/// Without redundant experts, a killed shard fails only the requests whose tokens were routed
/// to it while it was down, each with an error naming it; the rest of the same batches go on,
/// `up` stays up, and requests succeed again once the shard is back. (Which of 16 concurrent
/// streams touch the dead shard is the model's routing; the exact per-sequence split is checked
/// deterministically in worker/tests/model and worker/tests/expert_faults.)
#[test]
fn without_redundancy_a_killed_shard_fails_only_the_requests_routed_to_it() {
    killed_shard_fails_the_routed_requests(&[], "no redundant experts");
}

/// `--failover-wait-ms 0` turns the hold off where redundant slots would default it on: the
/// experts with no live copy fail their requests at once, as without redundancy (with the
/// default wait the same kill fails none: the redundancy tests below).
#[test]
fn with_redundant_slots_but_no_failover_wait_a_killed_shard_fails_the_routed_requests() {
    killed_shard_fails_the_routed_requests(
        &["--redundant-experts", "4", "--failover-wait-ms", "0"],
        "4 redundant slots, no failover wait",
    );
}

/// Kills expert-1 of `up --expert-shards 4 EXTRA` a quarter into 16 streams: some streams fail,
/// each naming the dead shard, the others complete, `up` stays up and serves again once the
/// shard is back.
fn killed_shard_fails_the_routed_requests(extra: &[&str], what: &str) {
    const STREAMS: usize = 16;
    const TOKENS: usize = 300;
    let m = tiny("fp8");
    let mut args = vec!["--dispatch-dtype", "bf16"];
    args.extend_from_slice(extra);
    let (mut up, addr, _metrics, lines) = up_supervised(m.path(), 4, &args);
    let victim = started_pid(&lines, "expert-1").expect("expert-1's pid");
    let (handles, received) = start_streams(&addr, STREAMS, TOKENS);
    quarter_through(&received, TOKENS);
    sigkill(victim);
    lines_until(
        &up,
        "[supervisor] expert-1 is ready again",
        Duration::from_secs(60),
    );
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut failed = 0;
    for r in &results {
        match r {
            Ok(times) => assert_eq!(times.len(), TOKENS),
            Err(e) => {
                failed += 1;
                assert!(
                    e.contains("expert shard 1"),
                    "a failure names the dead shard: {e}"
                );
            }
        }
    }
    eprintln!(
        "{failed} of {STREAMS} streams failed with shard 1 killed ({what}); {} completed",
        STREAMS - failed
    );
    // The kill lands while every stream is generating, and each step of 16 streams routes
    // tokens to every shard's experts.
    assert!(failed > 0, "no stream failed with shard 1 killed ({what})");
    assert!(
        up.child.try_wait().is_ok_and(|s| s.is_none()),
        "up exited after a shard died"
    );
    completes_within_30s(
        &addr,
        &[1, 2, 3],
        8,
        "the restarted shard did not rejoin",
        |_| {},
    );
    drop(up);
}

type Streamed = Result<Vec<Instant>, String>;

/// `streams` concurrent streaming completions of `tokens` tokens each (distinct prompts), with a
/// per-stream count of the tokens received so far.
fn start_streams(
    addr: &str,
    streams: usize,
    tokens: usize,
) -> (
    Vec<std::thread::JoinHandle<Streamed>>,
    Vec<Arc<AtomicUsize>>,
) {
    let received: Vec<Arc<AtomicUsize>> = (0..streams).map(|_| Arc::default()).collect();
    let handles = (0..streams)
        .map(|i| {
            let addr = addr.to_string();
            let count = Arc::clone(&received[i]);
            std::thread::spawn(move || {
                let prompt = [1 + i as u32, 2 * i as u32 + 7, 3, 4];
                stream_completion_counted(&addr, &prompt, tokens, &count)
            })
        })
        .collect();
    (handles, received)
}

/// Returns once every stream has received a quarter of its `tokens` (so a kill lands while all
/// are generating, on a fast machine as on a slow one); after 60 s returns anyway (a stream
/// that failed early never gets there: its join says why).
fn quarter_through(received: &[Arc<AtomicUsize>], tokens: usize) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until
        && received
            .iter()
            .any(|c| c.load(Ordering::Relaxed) < tokens / 4)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The inter-token gaps (seconds) of `streams`: those that ended before `kill`, those that
/// overlap the outage (ended after `kill`, began before `rejoined`: a step held for the restart
/// is one such gap), and those that began after `rejoined`.
fn itl_phases(
    streams: &[Vec<Instant>],
    kill: Instant,
    rejoined: Instant,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut before, mut during, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for s in streams {
        for w in s.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64();
            if w[1] < kill {
                before.push(gap);
            } else if w[0] < rejoined {
                during.push(gap);
            } else {
                after.push(gap);
            }
        }
    }
    (before, during, after)
}

/// 16 redundant slots over 4 shards: every expert of tiny's 16 has a replica on another shard,
/// so the dead shard's tokens fail over at once.
#[test]
fn with_a_replica_of_every_expert_a_killed_shard_fails_no_request_and_rejoins() {
    killed_shard_under_redundancy("16");
}

/// The issue's deployment, 4 redundant slots over 4 shards: most of the dead shard's experts
/// have no other copy, so the pods hold those tokens until `up` has restarted the shard (the
/// default failover wait with redundant slots) — the streams stall once, none fails.
#[test]
fn with_some_replicas_a_killed_shard_stalls_the_streams_once_and_fails_none() {
    killed_shard_under_redundancy("4");
}

/// Kills expert-1 of `up --expert-shards 4 --redundant-experts REDUNDANT` under 16 streams and
/// prints the p99 inter-token latency before, during and after. `SHARDSEEK_FAULTS_MODEL=DIR`
/// runs it on that checkpoint instead of tiny (how the closing notes measure `small`).
fn killed_shard_under_redundancy(redundant: &str) {
    const STREAMS: usize = 16;
    const TOKENS: usize = 400;
    let generated;
    let model = match std::env::var_os("SHARDSEEK_FAULTS_MODEL") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            generated = tiny("fp8");
            generated.path().to_path_buf()
        }
    };
    let (up, addr, _metrics, lines) = up_supervised(
        &model,
        4,
        &["--redundant-experts", redundant, "--dispatch-dtype", "bf16"],
    );
    let victim = started_pid(&lines, "expert-1").expect("expert-1's pid");
    let t0 = Instant::now();
    let (handles, received) = start_streams(&addr, STREAMS, TOKENS);
    quarter_through(&received, TOKENS);
    let kill = Instant::now();
    sigkill(victim);
    let more = lines_until(
        &up,
        "[supervisor] expert-1 is ready again",
        Duration::from_secs(60),
    );
    let rejoined = Instant::now();
    let metrics_of_reborn = more
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("[expert-1] METRICS "))
        .expect("the restarted shard's metrics address")
        .trim()
        .to_string();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let finished = Instant::now();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {STREAMS} failed: {failed:?}",
        failed.len()
    );
    let streams: Vec<Vec<Instant>> = results.into_iter().map(Result::unwrap).collect();
    assert!(streams.iter().all(|s| s.len() == TOKENS));
    assert!(
        finished > rejoined,
        "the shard rejoined only after the streams ended; raise TOKENS"
    );
    let (before, during, after) = itl_phases(&streams, kill, rejoined);
    let p99 = |v: &[f64]| percentile(v, 99.0) * 1e3;
    eprintln!(
        "--redundant-experts {redundant}: ITL p99 ms: before {:.1} ({} gaps), during {:.1} ({}), after {:.1} ({}); max gap {:.0} ms; kill at {:.1} s, rejoined after {:.2} s",
        p99(&before),
        before.len(),
        p99(&during),
        during.len(),
        p99(&after),
        after.len(),
        before
            .iter()
            .chain(&during)
            .chain(&after)
            .fold(0.0f64, |m, &g| m.max(g))
            * 1e3,
        (kill - t0).as_secs_f64(),
        (rejoined - kill).as_secs_f64()
    );
    assert!(!before.is_empty() && !after.is_empty());
    // The restarted shard takes tokens again (least-loaded replica choice uses it).
    let text = http_get(&metrics_of_reborn, "/metrics").expect("restarted shard's metrics");
    let served: f64 = text
        .lines()
        .filter(|l| l.starts_with("shardseek_expert_tokens_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(served > 0.0, "the restarted shard served no token:\n{text}");
    drop(up);
}

const PROMPT: [u32; 6] = [3, 17, 255, 42, 8, 99];

/// 4 shards of tiny under `up` (no periodic rounds), loaded with [`PROMPT`], then rebalanced
/// once: the table in force is version 2.
fn rebalanced_cluster() -> (tempfile::TempDir, Proc, String, String, Vec<String>) {
    let m = tiny("fp8");
    let (up, addr, metrics, lines) = up_supervised(
        m.path(),
        4,
        &["--rebalance-interval", "3600", "--dispatch-dtype", "bf16"],
    );
    for _ in 0..4 {
        stream_completion(&addr, &PROMPT, 24).expect("healthy cluster");
    }
    let report = http_post(&metrics, "/rebalance").expect("rebalance");
    assert!(report.contains("\"outcome\":\"published\""), "{report}");
    (m, up, addr, metrics, lines)
}

/// After a live rebalance, a killed shard comes back on the table in force (the placement file
/// `up` keeps), not on version 1: requests routed with the new version succeed again.
#[test]
fn a_shard_restarted_after_a_rebalance_comes_back_on_the_new_table() {
    let (_m, up, addr, _, lines) = rebalanced_cluster();
    let prompt = PROMPT;
    let victim = started_pid(&lines, "expert-1").expect("expert-1's pid");
    sigkill(victim);
    lines_until(
        &up,
        "[supervisor] expert-1 is ready again",
        Duration::from_secs(60),
    );
    completes_within_30s(&addr, &prompt, 24, "no success after the restart", |e| {
        assert!(
            !e.contains("stale placement"),
            "restarted on an old table: {e}"
        )
    });
    // Several requests in a row: the restarted shard serves the new version's experts.
    for _ in 0..3 {
        stream_completion(&addr, &prompt, 24).expect("after the restart");
    }
    drop(up);
}

/// A shard that comes back on an older table (here: the placement file is gone, so it starts on
/// version 1) is brought back to the table in force by the next rebalance round, and requests
/// succeed again.
#[test]
fn a_shard_on_an_older_table_is_brought_back_by_the_next_round() {
    let (_m, up, addr, metrics, lines) = rebalanced_cluster();
    let prompt = PROMPT;
    let file = std::env::temp_dir()
        .join(format!("shardseek-up-{}", up.child.id()))
        .join("placement.json");
    std::fs::remove_file(&file).expect("the placement file of up");
    sigkill(started_pid(&lines, "expert-1").expect("expert-1's pid"));
    lines_until(
        &up,
        "[supervisor] expert-1 is ready again",
        Duration::from_secs(60),
    );
    // On version 1 the restarted shard refuses what the pods route with version 2.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match stream_completion(&addr, &prompt, 24) {
            Err(e) if e.contains("stale placement") => break,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "the restarted shard never refused version 2"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // The next round (which may also publish a version for the load of the failed requests).
    http_post(&metrics, "/rebalance").expect("rebalance");
    completes_within_30s(
        &addr,
        &prompt,
        24,
        "shard 1 was not brought back to version 2",
        |_| {},
    );
    for _ in 0..3 {
        stream_completion(&addr, &prompt, 24).expect("after the reconcile");
    }
    drop(up);
}

/// Streams `n` tokens of `prompt` until a request succeeds, retrying for 30 s (a restarted
/// shard rejoins within that). `on_error` sees every failed try before the retry and may
/// assert on it; past the deadline the test fails with `what` and the last error.
fn completes_within_30s(addr: &str, prompt: &[u32], n: usize, what: &str, on_error: impl Fn(&str)) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match stream_completion(addr, prompt, n) {
            Ok(t) => {
                assert_eq!(t.len(), n);
                return;
            }
            Err(e) if Instant::now() < deadline => {
                on_error(&e);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}
