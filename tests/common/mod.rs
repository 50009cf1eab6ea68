//! Helpers of the end-to-end tests: real `shardseek` processes on 127.0.0.1, killed when the
//! test ends (pass or fail).

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shardseek")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/fixtures")
        .join(name)
}

/// A child process killed (with its process group's children) on drop.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM lets `up` stop its children; then make sure.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `shardseek ARGS` and forwards its stdout lines to a channel.
pub fn spawn(args: &[&str]) -> Proc {
    let child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn shardseek");
    wrap(child)
}

/// Forwards a started child's stdout lines to a channel (its stdout must be piped).
pub fn wrap(mut child: Child) -> Proc {
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc { child, lines: rx }
}

/// Waits for a stdout line starting with `prefix`; returns the rest of it.
pub fn wait_line(p: &Proc, prefix: &str, timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match p.lines.recv_timeout(left) {
            Ok(l) => {
                if let Some(rest) = l.strip_prefix(prefix) {
                    return rest.trim().to_string();
                }
            }
            Err(_) => panic!("no `{prefix}` line within {timeout:?}"),
        }
    }
}

/// Collects stdout lines until one starts with `prefix`; returns them all (that one last).
pub fn lines_until(p: &Proc, prefix: &str, timeout: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match p.lines.recv_timeout(left) {
            Ok(l) => {
                let done = l.starts_with(prefix);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("no `{prefix}` line within {timeout:?}"),
        }
    }
}

/// `shardseek up` on `model`; returns the process, the router's address, and every
/// component's `/metrics` URL.
pub fn up_with_metrics(model: &Path, shards: usize, extra: &[&str]) -> (Proc, String, Vec<String>) {
    let m = model.to_string_lossy().to_string();
    let s = shards.to_string();
    let mut args = vec!["up", "--model", &m, "--expert-shards", &s, "--port", "0"];
    args.extend_from_slice(extra);
    let p = spawn(&args);
    let lines = lines_until(&p, "shardseek up:", Duration::from_secs(120));
    let mut urls = Vec::new();
    let mut addr = String::new();
    for l in &lines {
        // Children's lines arrive as `[name] READY addr` / `[name] METRICS addr`.
        let mut parts = l.split_whitespace();
        let (who, what, at) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let expert = who.starts_with("[expert");
        if (what == "READY" && !expert) || (what == "METRICS" && expert) {
            urls.push(format!("http://{at}/metrics"));
        }
        if let Some(rest) = l.strip_prefix("shardseek up:") {
            addr = rest
                .split("http://")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("")
                .to_string();
        }
    }
    (p, addr, urls)
}

/// `shardseek up` on `model`; returns the process and the router's address.
pub fn up(model: &Path, shards: usize, extra: &[&str]) -> (Proc, String) {
    let m = model.to_string_lossy().to_string();
    let s = shards.to_string();
    let mut args = vec!["up", "--model", &m, "--expert-shards", &s, "--port", "0"];
    args.extend_from_slice(extra);
    let p = spawn(&args);
    let line = wait_line(&p, "shardseek up:", Duration::from_secs(120));
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address in the up line")
        .to_string();
    (p, addr)
}

/// Runs `shardseek generate ARGS --json` and parses the JSON on its last stdout line.
pub fn generate(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(bin())
        .arg("generate")
        .args(args)
        .arg("--json")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().ok_or("no output")?;
    serde_json::from_str(last).map_err(|e| format!("{e}: {last}"))
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// Generates a `tiny` model into a temporary directory.
pub fn tiny(dtype: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Command::new(bin())
        .args([
            "model", "gen", "--preset", "tiny", "--dtype", dtype, "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("model gen");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    dir
}

/// `GET http://addr/path` (HTTP/1.0, so the body ends with the connection); the body.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or_default().to_string());
    }
    Ok(body.to_string())
}

/// `POST http://addr/path` with an empty body (HTTP/1.0); the body of a 200 answer.
pub fn http_post(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "{}: {body}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_string())
}

/// A streaming `/v1/completions` of `max_tokens` tokens after `prompt` (token ids), ignoring
/// EOS. Returns the arrival time of every generated token, or the error the stream carried
/// (HTTP status, or an `{"error": …}` event) — whatever failed, as text.
pub fn stream_completion(
    addr: &str,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<Vec<std::time::Instant>, String> {
    stream_completion_counted(addr, prompt, max_tokens, &AtomicUsize::new(0))
}

/// [`stream_completion`], adding each token to `received` as it arrives, so a test can act at a
/// point of the generation (kill a shard once every stream is a quarter through) whatever the
/// machine's speed.
pub fn stream_completion_counted(
    addr: &str,
    prompt: &[u32],
    max_tokens: usize,
    received: &AtomicUsize,
) -> Result<Vec<std::time::Instant>, String> {
    use std::io::Write;
    let body = serde_json::json!({
        "prompt": prompt, "max_tokens": max_tokens, "stream": true,
        "ignore_eos": true, "temperature": 0
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    // HTTP/1.0: no chunked framing around the events, the body ends with the connection.
    write!(
        s,
        "POST /v1/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(|e| e.to_string())?;
    if !status.contains(" 200 ") {
        let rest: Vec<String> = reader.lines().map_while(Result::ok).collect();
        return Err(format!("{} {}", status.trim(), rest.join(" ")));
    }
    let mut times = Vec::new();
    let mut done = false;
    for line in reader.lines() {
        let line = line.map_err(|e| format!("reading the stream: {e}"))?;
        let Some(payload) = line.strip_prefix("data:") else {
            continue;
        };
        let payload = payload.trim();
        if payload == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(payload).map_err(|e| format!("{e}: {payload}"))?;
        if let Some(err) = v.get("error") {
            return Err(err.to_string());
        }
        let tokens = v["choices"].as_array().map_or(0, |c| {
            c.iter().filter(|c| c["finish_reason"].is_null()).count()
        });
        for _ in 0..tokens {
            times.push(std::time::Instant::now());
        }
        received.fetch_add(tokens, Ordering::Relaxed);
    }
    if !done {
        return Err(format!(
            "the stream ended without [DONE] after {} tokens",
            times.len()
        ));
    }
    Ok(times)
}

/// `up` with its stdout lines up to and including the one announcing the supervisor's metrics:
/// the process, the router's address, the metrics address, and those lines (child starts with
/// their pids are among them).
pub fn up_supervised(
    model: &Path,
    shards: usize,
    extra: &[&str],
) -> (Proc, String, String, Vec<String>) {
    let m = model.to_string_lossy().to_string();
    let s = shards.to_string();
    let mut args = vec!["up", "--model", &m, "--expert-shards", &s, "--port", "0"];
    args.extend_from_slice(extra);
    let p = spawn(&args);
    let lines = lines_until(
        &p,
        "shardseek supervisor: metrics on",
        Duration::from_secs(180),
    );
    let after = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|r| r.split("http://").nth(1))
            .and_then(|r| r.split(['/', ' ']).next())
            .unwrap_or_default()
            .to_string()
    };
    let addr = after("shardseek up:");
    let metrics = after("shardseek supervisor: metrics on");
    (p, addr, metrics, lines)
}

/// The pid in a supervisor line `[supervisor] started NAME pid PID` for `name`, the last one.
pub fn started_pid(lines: &[String], name: &str) -> Option<i32> {
    let prefix = format!("[supervisor] started {name} pid ");
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|p| p.trim().parse().ok())
}

/// Every pid the supervisor reported starting.
pub fn all_started_pids(lines: &[String]) -> Vec<i32> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("[supervisor] started "))
        .filter_map(|r| r.rsplit(' ').next())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether process `pid` exists (and is not a zombie waiting to be reaped by a dead parent).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The value of the Prometheus sample `name{labels}` (labels as written, e.g. `child="x"`).
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&key).map(str::trim))
        .and_then(|v| v.parse().ok())
}

/// The p-th percentile (0..=100) of `xs` (nearest rank); NaN when empty.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}
