//! The distributed forward equals the single process: `shardseek up` (attention pod + expert
//! shards over gRPC) against in-process `generate`, on generated models and the reference
//! fixtures, with 1, 2 and 4 shards, both weight dtypes, f32 and bf16 wires, and micro-batch
//! overlap on. Every process here keeps its latent cache in f32 (`--kv-cache-dtype f32`): the
//! comparison is of the distributed math, and the exact cache keeps it at summation order.

#[path = "../common/mod.rs"]
mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// f32 wire: the same math up to summation order.
const F32_WIRE_TOL: f64 = 1e-4;
/// bf16 wire: each dispatched and returned row is rounded to 8 mantissa bits (relative 2⁻⁹),
/// which moves log-probs of these small random models by at most a few 1e-3.
const BF16_WIRE_TOL: f64 = 3e-2;

const PROMPT: &str = "3,17,255,42,8,99,100,7,1,64,65,66";

fn local(model: &Path) -> Value {
    local_with(model, &[])
}

fn local_with(model: &Path, extra: &[&str]) -> Value {
    let model = model.to_string_lossy();
    let mut args = vec![
        "--model",
        &model,
        "--prompt-tokens",
        PROMPT,
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--echo",
        "--kv-cache-dtype",
        "f32",
    ];
    args.extend_from_slice(extra);
    generate(&args).expect("in-process generate")
}

fn remote(addr: &str) -> Value {
    generate(&[
        "--url",
        addr,
        "--prompt-tokens",
        PROMPT,
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--echo",
    ])
    .expect("generate --url")
}

fn compare(a: &Value, b: &Value, tol: f64, what: &str, same_tokens: bool) {
    if same_tokens {
        assert_eq!(a["tokens"], b["tokens"], "{what}: tokens differ");
        for (x, y) in floats(&a["logprobs"]).iter().zip(floats(&b["logprobs"])) {
            assert!((x - y).abs() <= tol, "{what}: logprob {x} vs {y}");
        }
    }
    let (pa, pb) = (floats(&a["prompt_logprobs"]), floats(&b["prompt_logprobs"]));
    assert_eq!(pa.len(), pb.len(), "{what}: prompt log-probs");
    for (x, y) in pa.iter().zip(&pb).skip(1) {
        assert!((x - y).abs() <= tol, "{what}: prompt logprob {x} vs {y}");
    }
}

#[test]
fn tiny_models_all_shard_counts_f32_wire() {
    for dtype in ["fp8", "bf16"] {
        let m = tiny(dtype);
        let want = local(m.path());
        for shards in [1, 2, 4] {
            let (_up, addr) = up(
                m.path(),
                shards,
                &["--dispatch-dtype", "f32", "--kv-cache-dtype", "f32"],
            );
            let got = remote(&addr);
            compare(
                &want,
                &got,
                F32_WIRE_TOL,
                &format!("tiny {dtype}, {shards} shards, f32 wire"),
                true,
            );
        }
    }
}

/// Redundant experts (replicas chosen per token by load) change which shard computes an
/// expert, never the math: tokens equal the single process at f32 wire. (One shard cannot hold
/// a replica of its own experts, so redundancy starts at two shards.)
#[test]
fn tiny_model_with_redundant_experts_f32_wire() {
    let m = tiny("fp8");
    let want = local(m.path());
    for (shards, redundant) in [(2, 2), (2, 16), (4, 4), (4, 16)] {
        let r = redundant.to_string();
        let (_up, addr) = up(
            m.path(),
            shards,
            &[
                "--dispatch-dtype",
                "f32",
                "--kv-cache-dtype",
                "f32",
                "--redundant-experts",
                &r,
            ],
        );
        compare(
            &want,
            &remote(&addr),
            F32_WIRE_TOL,
            &format!("tiny fp8, {shards} shards, {redundant} redundant, f32 wire"),
            true,
        );
    }
}

/// bf16 activations (`--activation-dtype bf16`, passed by `up` to the pod and the shards) are
/// the same rounding of each GEMM's input in every process, so the cluster still gives the
/// single process's tokens, its log-probs at summation order.
#[test]
fn bf16_activations_cluster_equals_single_process() {
    if !shardseek_kernels::cpu::Isa::Avx512Bf16.available() {
        eprintln!("skipped: bf16 activations need AVX512-BF16");
        return;
    }
    let m = tiny("fp8");
    let exact = local(m.path());
    let want = local_with(m.path(), &["--activation-dtype", "bf16"]);
    assert_ne!(
        exact["prompt_logprobs"], want["prompt_logprobs"],
        "bf16 activations changed nothing"
    );
    for shards in [2, 4] {
        let (_up, addr) = up(
            m.path(),
            shards,
            &[
                "--dispatch-dtype",
                "f32",
                "--kv-cache-dtype",
                "f32",
                "--activation-dtype",
                "bf16",
            ],
        );
        compare(
            &want,
            &remote(&addr),
            F32_WIRE_TOL,
            &format!("tiny fp8, {shards} shards, bf16 activations, f32 wire"),
            true,
        );
    }
}

#[test]
fn fixtures_two_shards_f32_and_bf16_wire() {
    for name in ["open-bf16", "open-fp8"] {
        let m = fixture(name);
        let want = local(&m);
        let (_up, addr) = up(
            &m,
            2,
            &["--dispatch-dtype", "f32", "--kv-cache-dtype", "f32"],
        );
        compare(
            &want,
            &remote(&addr),
            F32_WIRE_TOL,
            &format!("{name}, f32 wire"),
            true,
        );
        drop(_up);
        let (_up, addr) = up(
            &m,
            2,
            &["--dispatch-dtype", "bf16", "--kv-cache-dtype", "f32"],
        );
        compare(
            &want,
            &remote(&addr),
            BF16_WIRE_TOL,
            &format!("{name}, bf16 wire"),
            false,
        );
    }
}

#[test]
fn concurrent_requests_with_micro_batch_overlap() {
    // Several requests in flight make batches of several sequences, which the attention pod
    // splits into two micro-batches (overlap is on by default).
    let m = tiny("fp8");
    let prompts = [
        "5,6,7,8,9,10,11,12,13",
        "100,200,300,400,500,600,700,800",
        "42,43,44,45,46,47,48,49,50,51",
    ];
    let want: Vec<Value> = prompts
        .iter()
        .map(|p| {
            generate(&[
                "--model",
                &m.path().to_string_lossy(),
                "--prompt-tokens",
                p,
                "--max-tokens",
                "12",
                "--ignore-eos",
                "--kv-cache-dtype",
                "f32",
            ])
            .unwrap()
        })
        .collect();
    let (_up, addr) = up(
        m.path(),
        2,
        &["--dispatch-dtype", "f32", "--kv-cache-dtype", "f32"],
    );
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (addr, p) = (addr.clone(), p.to_string());
            std::thread::spawn(move || {
                generate(&[
                    "--url",
                    &addr,
                    "--prompt-tokens",
                    &p,
                    "--max-tokens",
                    "12",
                    "--ignore-eos",
                ])
                .unwrap()
            })
        })
        .collect();
    for (h, w) in handles.into_iter().zip(&want) {
        let got = h.join().unwrap();
        compare(w, &got, F32_WIRE_TOL, "overlapped batch", true);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The pods as the operator starts them: `--cluster-config cluster.json` (and the shard id in
/// SHARDSEEK_SHARD_ID), each role on its ports from the config. Locally every process shares
/// one IP, so each gets its own copy of the config with its own metrics port.
#[test]
fn pods_started_from_the_operators_cluster_config() {
    let m = tiny("fp8");
    let (att, exp, http, grpc) = (free_port(), free_port(), free_port(), free_port());
    let config = |metrics: u16| {
        serde_json::json!({
            "name": "t", "namespace": "default",
            "model": {"servedName": "tiny-moe", "path": m.path()},
            "attention": {"replicas": 1, "service": "localhost", "addresses": [format!("127.0.0.1:{att}")],
                          "grpcPort": att, "maxBatchTokens": 512, "maxSeqLen": 1024},
            "experts": {"shards": 1, "redundantSlots": 0, "addresses": [format!("127.0.0.1:{exp}")],
                        "grpcPort": exp, "rebalanceIntervalSeconds": null},
            "router": {"httpPort": http, "grpcPort": grpc},
            "dispatchDtype": "f32", "transport": "grpc", "metricsPort": metrics
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, metrics: u16| {
        let p = dir.path().join(name);
        std::fs::write(&p, config(metrics).to_string()).unwrap();
        p.to_string_lossy().to_string()
    };
    let (ce, ca, cr) = (
        write("e.json", free_port()),
        write("a.json", free_port()),
        write("r.json", free_port()),
    );
    let shard = std::process::Command::new(bin())
        .args(["worker", "--role", "expert", "--cluster-config", &ce])
        .env("SHARDSEEK_SHARD_ID", "0")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let shard = wrap(shard);
    wait_line(&shard, "READY", std::time::Duration::from_secs(60));
    let pod = spawn(&["worker", "--role", "attention", "--cluster-config", &ca]);
    wait_line(&pod, "READY", std::time::Duration::from_secs(60));
    let router = spawn(&["router", "--cluster-config", &cr]);
    wait_line(&router, "READY", std::time::Duration::from_secs(60));
    let want = generate(&[
        "--model",
        &m.path().to_string_lossy(),
        "--prompt-tokens",
        "1,2,3",
        "--max-tokens",
        "5",
        "--ignore-eos",
    ])
    .unwrap();
    for port in [http, grpc] {
        let got = generate(&[
            "--url",
            &format!("127.0.0.1:{port}"),
            "--prompt-tokens",
            "1,2,3",
            "--max-tokens",
            "5",
            "--ignore-eos",
        ])
        .unwrap();
        assert_eq!(want["tokens"], got["tokens"], "port {port}");
    }
    drop((router, pod, shard));
}

/// Per-expert load summed over the shards' `shardseek_expert_tokens_total{expert="e"}`.
fn expert_load(metrics_addrs: &[String], experts: usize) -> Vec<f64> {
    let mut load = vec![0.0; experts];
    for addr in metrics_addrs {
        let text = http_get(addr, "/metrics").expect("shard metrics");
        for (e, l) in load.iter_mut().enumerate() {
            *l += sample(
                &text,
                "shardseek_expert_tokens_total",
                &format!("expert=\"{e}\""),
            )
            .unwrap_or(0.0);
        }
    }
    load
}

/// A skewed workload (one prompt, repeated) on 4 shards, rebalanced live by `up`'s online EPLB:
/// the attention pod's imbalance ratio before is what the shards' own per-expert counts give,
/// a rebalance switches the placement while generations are in flight (their tokens equal the
/// single process at the f32 wire), the placement version goes 1 → 2, and the ratio measured
/// after the switch, on the same workload, meets the issue's goal (≤ 1.15).
#[test]
fn skewed_load_rebalanced_live_tokens_unchanged_across_the_switch() {
    use shardseek_router::eplb::imbalance;
    use shardseek_router::placement::Placement;
    const LONG: usize = 48;
    let long = LONG.to_string();
    let m = tiny("fp8");
    // The periodic rounds are an hour apart: the test asks for its round (`POST /rebalance`)
    // while generations run, so the figures before and after each belong to one table.
    let (_up, addr, sup, lines) = up_supervised(
        m.path(),
        4,
        &[
            "--dispatch-dtype",
            "f32",
            "--kv-cache-dtype",
            "f32",
            "--rebalance-interval",
            "3600",
        ],
    );
    let shard_metrics: Vec<String> = lines
        .iter()
        .filter(|l| l.starts_with("[expert-"))
        .filter_map(|l| {
            l.split_once("] METRICS ")
                .map(|(_, a)| a.trim().to_string())
        })
        .collect();
    assert_eq!(shard_metrics.len(), 4, "{lines:?}");
    let attention = lines
        .iter()
        .find_map(|l| l.strip_prefix("[attention-0] READY "))
        .expect("attention pod address")
        .trim()
        .to_string();
    let version = || {
        let text = http_get(&sup, "/metrics").expect("supervisor metrics");
        sample(&text, "shardseek_placement_version", "").expect("placement version")
    };
    let ratio = || {
        let text = http_get(&attention, "/metrics").expect("attention metrics");
        sample(&text, "shardseek_expert_load_imbalance_ratio", "").expect("ratio")
    };
    assert_eq!(version(), 1.0);
    let prompt: Vec<u32> = PROMPT.split(',').map(|t| t.parse().unwrap()).collect();
    // The workload: 16 concurrent streams of the same prompt (greedy: the same tokens, so the
    // same experts, 16 times over).
    let skewed = || {
        let streams: Vec<_> = (0..16)
            .map(|_| {
                let (addr, prompt) = (addr.clone(), prompt.clone());
                std::thread::spawn(move || stream_completion(&addr, &prompt, LONG))
            })
            .collect();
        for h in streams {
            h.join().unwrap().expect("generation");
        }
    };
    skewed();
    let load = expert_load(&shard_metrics, 16);
    let before = ratio();
    let offline = imbalance(&Placement::initial(16, 4, 0).expect("initial"), &load);
    assert!(
        (before - offline).abs() <= 1e-9 * offline,
        "exported {before} vs {offline} from the shards' counts {load:?}"
    );
    assert!(before > 1.0, "one repeated prompt skews the load");

    // The same workload again, rebalanced halfway through.
    let want = generate(&[
        "--model",
        &m.path().to_string_lossy(),
        "--prompt-tokens",
        PROMPT,
        "--max-tokens",
        &long,
        "--ignore-eos",
        "--kv-cache-dtype",
        "f32",
    ])
    .expect("in-process generate");
    // 16 concurrent streams: 4 whose tokens are compared, 12 whose arrival times are kept.
    let running: Vec<_> = (0..4)
        .map(|_| {
            let (addr, long) = (addr.clone(), long.clone());
            std::thread::spawn(move || {
                generate(&[
                    "--url",
                    &addr,
                    "--prompt-tokens",
                    PROMPT,
                    "--max-tokens",
                    &long,
                    "--ignore-eos",
                ])
            })
        })
        .collect();
    let timed: Vec<_> = (0..12)
        .map(|_| {
            let (addr, prompt) = (addr.clone(), prompt.clone());
            std::thread::spawn(move || stream_completion(&addr, &prompt, LONG))
        })
        .collect();
    // Wait until they generate, then rebalance under them.
    let text = http_get(&attention, "/metrics").expect("attention metrics");
    let generated = sample(&text, "shardseek_generation_tokens_total", "").unwrap_or(0.0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = http_get(&attention, "/metrics").expect("attention metrics");
        let now = sample(&text, "shardseek_generation_tokens_total", "").unwrap_or(0.0);
        if now >= generated + 16.0 * (LONG / 3) as f64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no tokens generated");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let switch_start = std::time::Instant::now();
    let report: Value =
        serde_json::from_str(&http_post(&sup, "/rebalance").expect("rebalance")).expect("JSON");
    let switch_end = std::time::Instant::now();
    let in_flight = running.iter().filter(|h| !h.is_finished()).count();
    assert_eq!(report["outcome"], "published", "{report}");
    assert_eq!(report["version"], 2, "{report}");
    assert_eq!(version(), 2.0);
    assert!(
        in_flight > 0,
        "every generation ended before the switch; raise LONG ({report})"
    );
    for h in running {
        let got = h.join().unwrap().expect("generation across the switch");
        compare(
            &want,
            &got,
            F32_WIRE_TOL,
            "across the placement switch",
            true,
        );
    }
    // Inter-token gaps ending before, during and after the rebalance call (reported only:
    // speed is never asserted).
    let (mut gaps_before, mut gaps_during, mut gaps_after) = (Vec::new(), Vec::new(), Vec::new());
    for h in timed {
        let times = h.join().unwrap().expect("timed stream across the switch");
        assert_eq!(times.len(), LONG);
        for w in times.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64() * 1e3;
            if w[1] < switch_start {
                gaps_before.push(gap);
            } else if w[1] <= switch_end {
                gaps_during.push(gap);
            } else {
                gaps_after.push(gap);
            }
        }
    }
    eprintln!(
        "ITL p99 ms, 16 streams: before {:.1} ({} gaps), during the rebalance {:.1} ({}), after {:.1} ({}); the rebalance took {:.0} ms",
        percentile(&gaps_before, 99.0),
        gaps_before.len(),
        percentile(&gaps_during, 99.0),
        gaps_during.len(),
        percentile(&gaps_after, 99.0),
        gaps_after.len(),
        (switch_end - switch_start).as_secs_f64() * 1e3
    );

    // The same workload under the new table (the window restarted at the switch, so it holds
    // the second half of the rebalanced run and this one).
    skewed();
    let after = ratio();
    eprintln!(
        "imbalance ratio (shardseek_expert_load_imbalance_ratio, 4 shards, no redundant slots): \
         {before:.3} before, {after:.3} after the live rebalance (EPLB predicted {:.3} → {:.3}; \
         {in_flight} of 4 generations in flight across the switch)",
        report["before"].as_f64().unwrap_or(f64::NAN),
        report["after"].as_f64().unwrap_or(f64::NAN),
    );
    assert!(after < before, "{after} vs {before}");
    assert!(after <= 1.15, "the issue's goal: {after} (before {before})");
    // Another round: the version only moves forward.
    let again: Value =
        serde_json::from_str(&http_post(&sup, "/rebalance").expect("rebalance")).expect("JSON");
    let v = if again["outcome"] == "published" {
        3.0
    } else {
        2.0
    };
    assert_eq!(again["version"].as_f64(), Some(v), "{again}");
    assert_eq!(version(), v);
}

/// `--rebalance-interval` rounds run by themselves: with load, the version moves past 1 and
/// requests keep succeeding; a shape EPLB cannot fill is refused before anything starts.
#[test]
fn periodic_rebalancing_publishes_new_versions() {
    let m = tiny("fp8");
    let (_up, addr, sup, _lines) = up_supervised(
        m.path(),
        4,
        &["--dispatch-dtype", "f32", "--rebalance-interval", "1"],
    );
    let prompt: Vec<u32> = PROMPT.split(',').map(|t| t.parse().unwrap()).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        stream_completion(&addr, &prompt, 8).expect("generation");
        let text = http_get(&sup, "/metrics").expect("supervisor metrics");
        if sample(&text, "shardseek_placement_version", "").unwrap_or(0.0) >= 2.0 {
            assert!(
                sample(
                    &text,
                    "shardseek_rebalances_total",
                    r#"outcome="published""#
                )
                .is_some_and(|n| n >= 1.0),
                "{text}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new placement version within a minute:\n{text}"
        );
    }
    stream_completion(&addr, &prompt, 8).expect("generation after the switch");
    // 16 experts over 3 shards cannot be balanced evenly: refused, naming the flag.
    let out = std::process::Command::new(bin())
        .args(["up", "--model"])
        .arg(m.path())
        .args([
            "--port",
            "0",
            "--expert-shards",
            "3",
            "--rebalance-interval",
            "5",
        ])
        .output()
        .expect("run up");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--rebalance-interval"), "{err}");
}

/// Redundant slots that cannot be spread evenly (or with one shard) are refused before any
/// process starts, with the flag named.
#[test]
fn uneven_redundant_experts_are_refused() {
    let m = tiny("fp8");
    for (shards, redundant) in [("4", "3"), ("1", "2")] {
        let out = std::process::Command::new(bin())
            .args(["up", "--model"])
            .arg(m.path())
            .args([
                "--port",
                "0",
                "--expert-shards",
                shards,
                "--redundant-experts",
                redundant,
            ])
            .output()
            .expect("run up");
        assert!(!out.status.success(), "{shards} shards, {redundant} slots");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--redundant-experts"), "{err}");
    }
}

/// `--device cuda` on a machine without a usable GPU (or a build without the `cuda` feature)
/// fails at start with an error naming the flag, never a panic; misplaced GPU-only flags and
/// unknown devices are refused the same way.
#[test]
fn cuda_without_a_gpu_is_a_clear_startup_error() {
    let m = tiny("fp8");
    let model = m.path().to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "generate",
                "--model",
                &model,
                "--prompt-tokens",
                "1,2",
                "--device",
                "cuda",
            ],
            "--device cuda:0",
        ),
        (
            vec![
                "worker",
                "--role",
                "attention",
                "--model",
                &model,
                "--device",
                "cuda:1",
            ],
            "--device cuda:1",
        ),
        (
            vec![
                "worker",
                "--role",
                "attention",
                "--model",
                &model,
                "--gpu-memory-utilization",
                "0.9",
            ],
            "--gpu-memory-utilization",
        ),
        (
            vec!["bench", "kernels", "--device", "cuda"],
            "--device cuda:0",
        ),
        (
            vec![
                "generate",
                "--model",
                &model,
                "--prompt-tokens",
                "1",
                "--device",
                "tpu",
            ],
            "tpu",
        ),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(bin())
            .args(&args)
            .output()
            .expect("run shardseek");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
