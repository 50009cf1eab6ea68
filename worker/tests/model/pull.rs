//! `model pull` against a local server in the Hugging Face hub's URL layout, serving a model
//! `model gen` wrote: full pull, re-pull (skips), a dropped connection resumed with `Range`, a
//! server that ignores `Range`, a corrupted shard, and the token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};
use shardseek_worker::Error;
use shardseek_worker::modelgen::{self, Dtype, GenOptions};
use shardseek_worker::pull::{HubSource, INCOMPLETE_SUFFIX, LOCK_FILE, PullConfig, pull};

const REPO: &str = "acme/tiny-v3";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct HubState {
    files: BTreeMap<String, Vec<u8>>,
    log: Vec<Seen>,
    /// Answer every download with the whole file, as a server without Range support does.
    ignore_range: bool,
    /// Serve this file with one byte flipped (same size, wrong sha256).
    corrupt: Option<String>,
    /// Send this many bytes of this file, then break the connection (once).
    cut: Option<(String, usize)>,
    /// Refuse API and resolve requests without `Authorization: Bearer <token>`.
    require_token: Option<String>,
}

type Shared = Arc<Mutex<HubState>>;

/// The hub marks weights as LFS (they carry a sha256 in the listing); JSON stays in git.
fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors")
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

async fn handle(
    axum::extract::State(state): axum::extract::State<Shared>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let header_str = |h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut st = state.lock().unwrap();
    st.log.push(Seen {
        path: path.clone(),
        range: header_str(header::RANGE),
        auth: header_str(header::AUTHORIZATION),
    });
    let authorized = match &st.require_token {
        Some(t) => header_str(header::AUTHORIZATION).as_deref() == Some(&format!("Bearer {t}")),
        None => true,
    };
    let api_prefix = format!("/api/models/{REPO}/revision/");
    let resolve_prefix = format!("/{REPO}/resolve/{COMMIT}/");
    if let Some(rev) = path.strip_prefix(&api_prefix) {
        if !authorized {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        if rev != "main" || uri.query() != Some("blobs=true") {
            return StatusCode::NOT_FOUND.into_response();
        }
        let siblings: Vec<_> = st
            .files
            .iter()
            .map(|(name, bytes)| {
                let mut s = json!({"rfilename": name, "size": bytes.len()});
                if is_lfs(name) {
                    s["lfs"] = json!({"sha256": sha256_hex(bytes), "size": bytes.len(), "pointerSize": 134});
                }
                s
            })
            .collect();
        return axum::Json(json!({"id": REPO, "sha": COMMIT, "siblings": siblings}))
            .into_response();
    }
    if let Some(name) = path.strip_prefix(&resolve_prefix) {
        if !authorized {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        if !st.files.contains_key(name) {
            return StatusCode::NOT_FOUND.into_response();
        }
        // The hub redirects LFS files to its CDN.
        if is_lfs(name) {
            return (
                StatusCode::FOUND,
                [(header::LOCATION, format!("/cdn/{name}"))],
            )
                .into_response();
        }
        return serve(&mut st, name, &headers);
    }
    if let Some(name) = path.strip_prefix("/cdn/")
        && st.files.contains_key(name)
    {
        return serve(&mut st, name, &headers);
    }
    StatusCode::NOT_FOUND.into_response()
}

fn serve(st: &mut HubState, name: &str, headers: &HeaderMap) -> Response {
    let mut bytes = st.files[name].clone();
    if st.corrupt.as_deref() == Some(name) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let len = bytes.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| !st.ignore_range);
    if let Some(cut_name) = st.cut.as_ref().map(|c| c.0.clone())
        && cut_name == name
    {
        let (_, n) = st.cut.take().unwrap();
        let first = Bytes::from(bytes[..n].to_vec());
        let stream = futures::stream::iter(vec![
            Ok(first),
            Err(std::io::Error::other("connection dropped by the test")),
        ]);
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    match start {
        None => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from(bytes))
            .unwrap(),
        Some(s) if s >= len => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        Some(s) => Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {s}-{}/{len}", len - 1),
            )
            .header(header::CONTENT_LENGTH, len - s)
            .body(Body::from(bytes[s..].to_vec()))
            .unwrap(),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    src: PathBuf,
    out: PathBuf,
    state: Shared,
    cfg: PullConfig,
}

impl Fixture {
    /// A `tiny` model served on 127.0.0.1 in the hub's layout, and an empty output directory.
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        modelgen::generate(&GenOptions::new("tiny", Dtype::Fp8, 7, &src)).unwrap();
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            files.insert(name, std::fs::read(&p).unwrap());
        }
        assert!(files.keys().any(|f| is_lfs(f)) && files.keys().any(|f| !is_lfs(f)));
        let state: Shared = Arc::new(Mutex::new(HubState {
            files,
            ..HubState::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            src,
            out: dir.path().join("out"),
            _dir: dir,
            state,
            cfg: PullConfig {
                endpoint: format!("http://{addr}/"),
                token: None,
                read_timeout: Duration::from_secs(20),
            },
        }
    }

    fn source() -> HubSource {
        HubSource::parse(&format!("hf://{REPO}")).unwrap()
    }

    /// The largest weight file (the one worth resuming).
    fn big_shard(&self) -> String {
        let st = self.state.lock().unwrap();
        let (name, _) = st
            .files
            .iter()
            .filter(|(n, _)| is_lfs(n))
            .max_by_key(|(_, b)| b.len())
            .unwrap();
        name.clone()
    }

    fn take_log(&self) -> Vec<Seen> {
        std::mem::take(&mut self.state.lock().unwrap().log)
    }

    /// Every served file is in `out` byte for byte, and nothing else is.
    fn assert_same(&self) {
        let mut got: Vec<String> = std::fs::read_dir(&self.out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != LOCK_FILE)
            .collect();
        got.sort();
        let want: Vec<String> = self.state.lock().unwrap().files.keys().cloned().collect();
        assert_eq!(got, want);
        for name in &want {
            assert!(
                std::fs::read(self.out.join(name)).unwrap()
                    == std::fs::read(self.src.join(name)).unwrap(),
                "{name} differs"
            );
        }
    }
}

fn count(files: &BTreeMap<String, Vec<u8>>, lfs: bool) -> usize {
    files.keys().filter(|f| is_lfs(f) == lfs).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_fetches_every_file_then_skips_verified_weights() {
    let fx = Fixture::new().await;
    let (n_lfs, n_git) = {
        let st = fx.state.lock().unwrap();
        (count(&st.files, true), count(&st.files, false))
    };
    let report = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .unwrap();
    assert_eq!(report.commit, COMMIT);
    assert_eq!(
        (report.downloaded, report.skipped, report.resumed),
        (n_lfs + n_git, 0, 0)
    );
    fx.assert_same();
    let log = fx.take_log();
    // Downloads are pinned to the commit the revision resolved to, weights via the CDN hop.
    assert!(log.iter().all(|s| s.range.is_none() && s.auth.is_none()));
    assert_eq!(
        log.iter()
            .filter(|s| s.path.starts_with(&format!("/{REPO}/resolve/{COMMIT}/")))
            .count(),
        n_lfs + n_git
    );
    assert_eq!(
        log.iter().filter(|s| s.path.starts_with("/cdn/")).count(),
        n_lfs
    );

    // Again: the weights are verified in place, the small git files are fetched anew.
    let report = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .unwrap();
    assert_eq!((report.downloaded, report.skipped), (n_git, n_lfs));
    assert!(fx.take_log().iter().all(|s| !s.path.starts_with("/cdn/")));
    fx.assert_same();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_patterns_pull_only_matching_files() {
    let fx = Fixture::new().await;
    let report = pull(
        &Fixture::source(),
        &fx.out,
        &fx.cfg,
        &["*.json".to_string()],
    )
    .await
    .unwrap();
    let want: Vec<String> = {
        let st = fx.state.lock().unwrap();
        st.files
            .keys()
            .filter(|f| f.ends_with(".json"))
            .cloned()
            .collect()
    };
    assert!(want.iter().any(|f| f == "tokenizer.json") && want.iter().any(|f| f == "config.json"));
    assert_eq!(report.downloaded, want.len());
    let mut got: Vec<String> = std::fs::read_dir(&fx.out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != LOCK_FILE)
        .collect();
    got.sort();
    assert_eq!(got, want);
    let err = pull(
        &Fixture::source(),
        &fx.out,
        &fx.cfg,
        &["*.gguf".to_string()],
    )
    .await
    .expect_err("nothing matches");
    assert!(err.to_string().contains("no file matches"), "{err}");
}

/// Pods sharing a cache volume pull at once: they take turns, so every weight file is
/// downloaded exactly once and the later pull verifies and skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_into_one_directory_take_turns() {
    let fx = Fixture::new().await;
    let n_lfs = count(&fx.state.lock().unwrap().files, true);
    let src = Fixture::source();
    let (a, b) = tokio::join!(
        pull(&src, &fx.out, &fx.cfg, &[]),
        pull(&src, &fx.out, &fx.cfg, &[])
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.skipped + b.skipped, n_lfs, "{a:?} {b:?}");
    let cdn = fx
        .take_log()
        .iter()
        .filter(|s| s.path.starts_with("/cdn/"))
        .count();
    assert_eq!(cdn, n_lfs);
    fx.assert_same();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_download_resumes_with_a_range_request() {
    let fx = Fixture::new().await;
    let shard = fx.big_shard();
    let len = fx.state.lock().unwrap().files[&shard].len();
    let half = len / 2;
    fx.state.lock().unwrap().cut = Some((shard.clone(), half));

    let err = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .expect_err("the connection broke");
    assert!(matches!(err, Error::Http { .. }), "{err}");
    let partial = fx.out.join(format!("{shard}{INCOMPLETE_SUFFIX}"));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), half as u64);
    fx.take_log();

    let report = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .unwrap();
    assert_eq!(report.resumed, 1);
    let want_range = format!("bytes={half}-");
    let log = fx.take_log();
    assert!(
        log.iter().any(|s| s.path == format!("/cdn/{shard}")
            && s.range.as_deref() == Some(want_range.as_str())),
        "no resumed Range request in {log:?}"
    );
    assert!(!partial.exists());
    fx.assert_same();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_range_restarts_the_file() {
    let fx = Fixture::new().await;
    let shard = fx.big_shard();
    std::fs::create_dir_all(&fx.out).unwrap();
    let bytes = fx.state.lock().unwrap().files[&shard].clone();
    let partial = fx.out.join(format!("{shard}{INCOMPLETE_SUFFIX}"));
    std::fs::write(&partial, &bytes[..bytes.len() / 3]).unwrap();
    fx.state.lock().unwrap().ignore_range = true;

    let report = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .unwrap();
    assert_eq!(report.resumed, 1);
    assert!(
        fx.take_log()
            .iter()
            .any(|s| s.path == format!("/cdn/{shard}") && s.range.is_some())
    );
    fx.assert_same();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_file_fails_naming_it_and_is_removed() {
    let fx = Fixture::new().await;
    let shard = fx.big_shard();
    let want = sha256_hex(&fx.state.lock().unwrap().files[&shard]);
    fx.state.lock().unwrap().corrupt = Some(shard.clone());

    let err = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .expect_err("corrupted shard accepted");
    match &err {
        Error::Mismatch {
            file,
            what,
            expected,
            actual,
        } => {
            assert_eq!((file.as_str(), *what), (shard.as_str(), "sha256"));
            assert_eq!(expected, &want);
            assert_ne!(actual, &want);
            assert_eq!(actual.len(), 64);
        }
        other => panic!("expected a sha256 mismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&shard) && msg.contains(&want), "{msg}");
    assert!(!fx.out.join(&shard).exists());
    assert!(!fx.out.join(format!("{shard}{INCOMPLETE_SUFFIX}")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_as_a_bearer_header() {
    let fx = Fixture::new().await;
    fx.state.lock().unwrap().require_token = Some("hf_test_secret".into());

    let err = pull(&Fixture::source(), &fx.out, &fx.cfg, &[])
        .await
        .expect_err("pulled a gated model without a token");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    fx.take_log();

    let mut cfg = fx.cfg.clone();
    cfg.token = Some("hf_test_secret".into());
    assert!(!format!("{cfg:?}").contains("hf_test_secret"));
    pull(&Fixture::source(), &fx.out, &cfg, &[]).await.unwrap();
    fx.assert_same();
    let log = fx.take_log();
    assert!(
        log.iter()
            .filter(|s| !s.path.starts_with("/cdn/"))
            .all(|s| s.auth.as_deref() == Some("Bearer hf_test_secret"))
    );
}
