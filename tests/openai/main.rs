//! The official `openai` Python client against `shardseek up` (tests/python/test_openai.py):
//! on the generated `tiny` model with expert shards, and on a reference fixture with its
//! expected echo log-probs. Needs python3 with `openai` and `pytest` (`.ci/run` installs
//! them); without them the test says SKIPPED, unless SHARDSEEK_REQUIRE_PYTHON=1 (CI) makes
//! that a failure.

#[path = "../common/mod.rs"]
mod common;

use common::*;
use std::process::Command;

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai, pytest, prometheus_client"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("SHARDSEEK_REQUIRE_PYTHON").is_err(),
            "python3 with openai and pytest is required (SHARDSEEK_REQUIRE_PYTHON is set)"
        );
        eprintln!(
            "SKIPPED: python3 with `openai`, `pytest` and `prometheus_client` is not installed"
        );
    }
    ok
}

fn pytest(url: &str, expected: Option<&std::path::Path>) {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"])
        .arg(&tests)
        .env("SHARDSEEK_URL", format!("http://{url}"));
    if let Some(e) = expected {
        cmd.env("SHARDSEEK_EXPECTED", e);
    }
    let st = cmd.status().expect("run pytest");
    assert!(st.success(), "pytest failed against {url}");
}

#[test]
fn openai_client_against_up() {
    if !python_ready() {
        return;
    }
    let m = tiny("fp8");
    let (_up, addr, metrics) = up_with_metrics(m.path(), 2, &[]);
    // router + attention pod + two shards
    assert_eq!(metrics.len(), 4, "{metrics:?}");
    pytest(&addr, None);
    // After traffic, every component's /metrics parses as Prometheus text and has its names.
    let st = Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_metrics.py"))
        .arg(format!(
            "--dashboard={}",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("charts/shardseek/dashboards/shardseek.json")
                .display()
        ))
        .args(&metrics)
        .status()
        .expect("run check_metrics.py");
    assert!(st.success(), "metrics check failed");
    drop(_up);
    let fx = fixture("open-bf16");
    // The fixture's expected log-probs are exact: f32 wire and f32 latent cache.
    let (_up, addr) = up(
        &fx,
        2,
        &["--dispatch-dtype", "f32", "--kv-cache-dtype", "f32"],
    );
    pytest(&addr, Some(&fx.join("expected.json")));
}
