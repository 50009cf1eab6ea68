//! `shardseek model pull`: download a model repository from the Hugging Face hub (or any
//! server with the hub's URL layout, `HF_ENDPOINT`) into a directory the worker can load.
//!
//! The operator runs this as an init container, so a pod restart or a dropped connection must
//! not start a multi-hundred-gigabyte download over: every file is written to
//! `NAME.incomplete` and continued with an HTTP `Range` request, and files already in place
//! with the hub's size and sha256 are not fetched again. Every file is checked against the
//! hub's listing (size always, sha256 where the hub gives it, i.e. LFS files) before it is
//! renamed into place, so the worker never maps a truncated or corrupted shard.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use http::header::{AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE, USER_AGENT};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

/// The public hub, used when `HF_ENDPOINT` is not set (the same default as `huggingface_hub`).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The suffix of a file being downloaded; the same as `huggingface_hub` uses, so a reader of
/// the directory recognises an unfinished file.
pub const INCOMPLETE_SUFFIX: &str = ".incomplete";

/// The lock file a pull holds in its output directory. Pods sharing one cache volume
/// (`spec.model.cacheClaim`) start their pulls together; without the lock they would write the
/// same `.incomplete` files at once. With it they take turns, and the later ones find the files
/// verified and skip them.
pub const LOCK_FILE: &str = ".shardseek-pull.lock";

/// Redirects followed per request: the hub answers `resolve` for LFS files with one redirect
/// to its CDN; a chain longer than this is a loop.
const MAX_REDIRECTS: usize = 10;

/// A model on the hub: `hf://ORG/NAME[@REVISION]` (revision `main` when omitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit.
    pub revision: String,
}

impl HubSource {
    /// Parses `hf://ORG/NAME[@REVISION]`; anything else is an [`Error::Input`] that shows the
    /// expected form.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Input(format!(
                "model source {s:?}: {why} (expected hf://ORG/NAME[@REVISION])"
            ))
        };
        let rest = s
            .strip_prefix("hf://")
            .ok_or_else(|| bad("not an hf:// source"))?;
        let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
        // The hub's own rule for repository ids: letters, digits, `-`, `_`, `.`.
        let name_ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| name_ok(p)) {
            return Err(bad("the repository must be ORG/NAME"));
        }
        if revision.is_empty()
            || revision
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("empty or malformed revision"));
        }
        Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

impl std::str::FromStr for HubSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl std::fmt::Display for HubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf://{}@{}", self.repo, self.revision)
    }
}

/// Where to pull from and as whom. A struct rather than environment reads inside the pull, so
/// tests (and callers) pass an endpoint and token without touching the process environment.
#[derive(Clone)]
pub struct PullConfig {
    /// Base URL of the hub, no trailing slash needed (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint's host only (`HF_TOKEN`).
    pub token: Option<String>,
    /// Longest wait for a response or for the next piece of a body. A stalled connection then
    /// fails the pull (and the kubelet restarts it, resuming) instead of hanging forever.
    pub read_timeout: Duration,
}

impl PullConfig {
    /// `HF_ENDPOINT` (default [`DEFAULT_ENDPOINT`]) and `HF_TOKEN` (unset or empty: none), the
    /// variables `huggingface_hub` reads, so an existing setup works unchanged.
    pub fn from_env() -> Self {
        let non_empty = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            endpoint: non_empty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token: non_empty("HF_TOKEN").map(|t| t.trim().to_string()),
            read_timeout: Duration::from_secs(60),
        }
    }
}

// The token must never reach a log through `{:?}`.
impl std::fmt::Debug for PullConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

/// What a pull did.
#[derive(Debug, Clone, Default)]
pub struct PullReport {
    /// The commit the revision resolved to; every file was fetched at this commit, so a branch
    /// that moves during the pull cannot mix two versions.
    pub commit: String,
    /// Files fetched (in full or resumed).
    pub downloaded: usize,
    /// Of those, files continued from an earlier `.incomplete`.
    pub resumed: usize,
    /// Files already present and verified.
    pub skipped: usize,
    /// Bytes received over the network.
    pub bytes_received: u64,
}

/// The hub's answer to `GET /api/models/{repo}/revision/{rev}?blobs=true` (the fields used).
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// One file to fetch, as the listing describes it.
struct RemoteFile {
    path: String,
    size: u64,
    /// Lowercase hex; the hub gives it for LFS files only.
    sha256: Option<String>,
}

enum Fetched {
    Skipped,
    Downloaded { resumed: bool, received: u64 },
}

/// Downloads the files of `source` into `out` (created if missing) and verifies them.
/// `include`: glob patterns (`*` matches any run of characters) a file's path must match one
/// of; empty means every file. The router, which reads only the tokenizer and config, pulls
/// `*.json` instead of hundreds of gigabytes of weights.
pub async fn pull(
    source: &HubSource,
    out: &Path,
    cfg: &PullConfig,
    include: &[String],
) -> Result<PullReport> {
    let hub = Hub::new(cfg)?;
    let info = hub.repo_info(source).await?;
    let files = info
        .siblings
        .iter()
        .filter(|s| include.is_empty() || include.iter().any(|p| glob_match(p, &s.rfilename)))
        .map(remote_file)
        .collect::<Result<Vec<_>>>()?;
    if files.is_empty() {
        return Err(Error::Input(format!(
            "{source} at {}: no file matches {include:?}",
            info.sha
        )));
    }
    tokio::fs::create_dir_all(out)
        .await
        .map_err(|e| io_err(out, e))?;
    // Held until the pull returns.
    let _lock = lock_dir(out).await?;
    let mut report = PullReport {
        commit: info.sha.clone(),
        ..PullReport::default()
    };
    for f in &files {
        match hub.fetch(source, &info.sha, f, out).await? {
            Fetched::Skipped => {
                tracing::info!(file = %f.path, "present and verified");
                report.skipped += 1;
            }
            Fetched::Downloaded { resumed, received } => {
                tracing::info!(file = %f.path, size = f.size, resumed, "downloaded");
                report.downloaded += 1;
                report.resumed += usize::from(resumed);
                report.bytes_received += received;
            }
        }
    }
    Ok(report)
}

/// Takes the exclusive lock on `out`'s [`LOCK_FILE`] (`flock`, which Linux NFS clients turn
/// into a server-side lock), waiting for another pull to finish.
async fn lock_dir(out: &Path) -> Result<std::fs::File> {
    let path = out.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!(dir = %out.display(), "another pull holds the directory; waiting");
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path, e)),
    }
    let waited = path.clone();
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| io_err(&waited, std::io::Error::other(e)))?
        .map_err(|e| io_err(&path, e))
}

/// `*` matches any run of characters (`/` included); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn remote_file(s: &Sibling) -> Result<RemoteFile> {
    let size = s.lfs.as_ref().map(|l| l.size).or(s.size).ok_or_else(|| {
        Error::Input(format!(
            "the hub's listing gives no size for {} (cannot verify it)",
            s.rfilename
        ))
    })?;
    Ok(RemoteFile {
        path: s.rfilename.clone(),
        size,
        sha256: s.lfs.as_ref().map(|l| l.sha256.to_ascii_lowercase()),
    })
}

/// `rel` under `out`, refusing anything that would leave `out` (a hostile or broken listing
/// must not write `../../etc/...`).
fn local_path(out: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::Input(format!(
            "the hub's listing names an unsafe path {rel:?}"
        )));
    }
    Ok(out.join(p))
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and `/` when
/// `keep_slash`): a revision like `refs/pr/1` is one path segment, a file path is several.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex sha256 of a file, read in 1 MiB pieces (shards are gigabytes).
async fn sha256_file(path: &Path, hasher: &mut Sha256) -> Result<()> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_err(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await.map_err(|e| io_err(path, e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// Two clients: plain HTTP always, TLS only when the system's root certificates load, so an
/// `http://` mirror works in an image without a CA bundle and an `https://` URL there fails
/// with a message that says why.
struct Hub<'a> {
    cfg: &'a PullConfig,
    endpoint: Uri,
    plain: Client<HttpConnector, Empty<Bytes>>,
    tls: std::result::Result<Client<HttpsConnector<HttpConnector>, Empty<Bytes>>, String>,
}

impl<'a> Hub<'a> {
    fn new(cfg: &'a PullConfig) -> Result<Self> {
        let base = cfg.endpoint.trim_end_matches('/');
        let endpoint: Uri = base.parse().map_err(|e| http_err(base, format!("{e}")))?;
        match endpoint.scheme_str() {
            Some("http" | "https") if endpoint.authority().is_some() => {}
            _ => {
                return Err(http_err(
                    base,
                    "the endpoint must be an http:// or https:// URL",
                ));
            }
        }
        let plain = Client::builder(TokioExecutor::new()).build_http();
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map(|b| {
                Client::builder(TokioExecutor::new())
                    .build(b.https_or_http().enable_http1().build())
            })
            .map_err(|e| format!("no TLS root certificates could be loaded: {e}"));
        Ok(Self {
            cfg,
            endpoint,
            plain,
            tls,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.endpoint.trim_end_matches('/'))
    }

    async fn repo_info(&self, src: &HubSource) -> Result<RepoInfo> {
        let url = self.url(&format!(
            "/api/models/{}/revision/{}?blobs=true",
            src.repo,
            encode(&src.revision, false)
        ));
        let (url, resp) = self.get(&url, None).await?;
        let status = resp.status();
        let body = self.read_all(&url, resp).await?;
        if !status.is_success() {
            let hint = match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    " (a gated or private model needs HF_TOKEN)"
                }
                StatusCode::NOT_FOUND => " (no such model or revision)",
                _ => "",
            };
            return Err(http_err(
                &url,
                format!(
                    "{status}{hint}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| http_err(&url, format!("not the hub's model JSON: {e}")))
    }

    async fn read_all(&self, url: &str, resp: Response<Incoming>) -> Result<Bytes> {
        tokio::time::timeout(self.cfg.read_timeout, resp.into_body().collect())
            .await
            .map_err(|_| http_err(url, "timed out reading the body"))?
            .map(|c| c.to_bytes())
            .map_err(|e| http_err(url, format!("reading the body: {e}")))
    }

    /// GET with redirects followed. The token goes to the endpoint's host only: the hub
    /// redirects LFS files to signed CDN URLs, which must not receive the user's credential.
    async fn get(
        &self,
        url: &str,
        range_from: Option<u64>,
    ) -> Result<(String, Response<Incoming>)> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let uri: Uri = url.parse().map_err(|e| http_err(&url, format!("{e}")))?;
            let mut req = Request::get(uri.clone()).header(USER_AGENT, "shardseek-model-pull");
            if let Some(token) = &self.cfg.token
                && uri.authority() == self.endpoint.authority()
                && uri.scheme() == self.endpoint.scheme()
            {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            if let Some(n) = range_from {
                req = req.header(RANGE, format!("bytes={n}-"));
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| http_err(&url, format!("{e}")))?;
            let send = match uri.scheme_str() {
                Some("https") => match &self.tls {
                    Ok(c) => c.request(req),
                    Err(why) => return Err(http_err(&url, why.clone())),
                },
                _ => self.plain.request(req),
            };
            let resp = tokio::time::timeout(self.cfg.read_timeout, send)
                .await
                .map_err(|_| http_err(&url, "timed out waiting for a response"))?
                .map_err(|e| http_err(&url, with_causes(&e)))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok((url, resp));
            }
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| http_err(&url, format!("{} without a Location", resp.status())))?;
            url = redirect_target(&uri, location).ok_or_else(|| {
                http_err(&url, format!("unsupported redirect Location {location:?}"))
            })?;
        }
        Err(http_err(
            &url,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    async fn fetch(
        &self,
        src: &HubSource,
        commit: &str,
        f: &RemoteFile,
        out: &Path,
    ) -> Result<Fetched> {
        let dest = local_path(out, &f.path)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_err(parent, e))?;
        }
        // Only a file with a known hash can be trusted as already there; the others (config
        // and tokenizer JSON, small) are fetched again so a stale one cannot survive.
        if let Some(want) = &f.sha256
            && tokio::fs::metadata(&dest)
                .await
                .is_ok_and(|m| m.is_file() && m.len() == f.size)
        {
            let mut h = Sha256::new();
            sha256_file(&dest, &mut h).await?;
            if &hex(&h.finalize()) == want {
                return Ok(Fetched::Skipped);
            }
        }
        let mut partial = dest.clone().into_os_string();
        partial.push(INCOMPLETE_SUFFIX);
        let partial = PathBuf::from(partial);
        let url = self.url(&format!(
            "/{}/resolve/{}/{}",
            src.repo,
            encode(commit, false),
            encode(&f.path, true)
        ));

        let mut offset = match tokio::fs::metadata(&partial).await {
            Ok(m) if m.len() <= f.size => m.len(),
            // Longer than the file can be: not a prefix of it.
            Ok(_) => 0,
            Err(_) => 0,
        };
        let resumed = offset > 0;
        let mut hasher = Sha256::new();
        if offset > 0 {
            sha256_file(&partial, &mut hasher).await?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(offset > 0)
            .truncate(offset == 0)
            .open(&partial)
            .await
            .map_err(|e| io_err(&partial, e))?;
        let mut received = 0u64;
        if offset < f.size {
            let (url, mut resp) = self.get(&url, (offset > 0).then_some(offset)).await?;
            let restart = match resp.status() {
                StatusCode::PARTIAL_CONTENT if offset > 0 => {
                    let cr = resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if !cr.starts_with(&format!("bytes {offset}-")) {
                        return Err(http_err(
                            &url,
                            format!("asked for bytes {offset}- but got Content-Range {cr:?}"),
                        ));
                    }
                    false
                }
                // A server that ignores Range sends the whole file: start over.
                StatusCode::OK => offset > 0,
                // The partial file does not fit the remote one (changed underneath): start over.
                StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                    let (_, full) = self.get(&url, None).await?;
                    if full.status() != StatusCode::OK {
                        return Err(http_err(&url, format!("{}", full.status())));
                    }
                    resp = full;
                    true
                }
                s => {
                    let body = self.read_all(&url, resp).await.unwrap_or_default();
                    return Err(http_err(
                        &url,
                        format!(
                            "{s}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        ),
                    ));
                }
            };
            if restart {
                drop(file);
                file = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|e| io_err(&partial, e))?;
                hasher = Sha256::new();
                offset = 0;
            }
            let mut body = resp.into_body();
            loop {
                let Ok(frame) = tokio::time::timeout(self.cfg.read_timeout, body.frame()).await
                else {
                    file.flush().await.map_err(|e| io_err(&partial, e))?;
                    return Err(http_err(&url, "timed out waiting for data"));
                };
                let Some(frame) = frame else { break };
                // An error here keeps the `.incomplete` file: the next run resumes it. tokio's
                // file finishes a write in the background, so it is flushed first: the partial
                // file must hold every byte received before this call returns (a resume reads
                // its length).
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        file.flush().await.map_err(|e| io_err(&partial, e))?;
                        return Err(http_err(
                            &url,
                            format!("download broke: {}", with_causes(&e)),
                        ));
                    }
                };
                if let Ok(data) = frame.into_data() {
                    if offset + received + data.len() as u64 > f.size {
                        // More than the listing says: cannot be the right file.
                        received += data.len() as u64;
                        break;
                    }
                    hasher.update(&data);
                    file.write_all(&data)
                        .await
                        .map_err(|e| io_err(&partial, e))?;
                    received += data.len() as u64;
                }
            }
            file.flush().await.map_err(|e| io_err(&partial, e))?;
            file.sync_all().await.map_err(|e| io_err(&partial, e))?;
        }
        drop(file);

        let total = offset + received;
        if total != f.size {
            remove_quietly(&partial).await;
            return Err(Error::Mismatch {
                file: f.path.clone(),
                what: "size",
                expected: f.size.to_string(),
                actual: if total > f.size {
                    format!("more than {}", f.size)
                } else {
                    total.to_string()
                },
            });
        }
        if let Some(want) = &f.sha256 {
            let got = hex(&hasher.finalize());
            if &got != want {
                remove_quietly(&partial).await;
                return Err(Error::Mismatch {
                    file: f.path.clone(),
                    what: "sha256",
                    expected: want.clone(),
                    actual: got,
                });
            }
        }
        tokio::fs::rename(&partial, &dest)
            .await
            .map_err(|e| io_err(&dest, e))?;
        Ok(Fetched::Downloaded { resumed, received })
    }
}

/// Removes a file that failed verification; a failure to remove it is logged, not fatal, since
/// the verification error is the one the user must see.
async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a bad download");
    }
}

/// An absolute `Location`, or an absolute path on the same host (what the hub sends).
fn redirect_target(from: &Uri, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_string());
    }
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(format!(
            "{}://{}{location}",
            from.scheme_str()?,
            from.authority()?
        ));
    }
    None
}

/// An error and its sources on one line: hyper's own message is only "client error (Connect)";
/// the cause (refused, DNS, TLS handshake) is in the chain.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn http_err(url: &str, detail: impl Into<String>) -> Error {
    Error::Http {
        url: url.to_string(),
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let s = HubSource::parse("hf://deepseek-ai/DeepSeek-V3@v1.0").unwrap();
        assert_eq!(s.repo, "deepseek-ai/DeepSeek-V3");
        assert_eq!(s.revision, "v1.0");
        assert_eq!(HubSource::parse("hf://a/b").unwrap().revision, "main");
        for bad in [
            "a/b",
            "hf://a",
            "hf://a/b/c",
            "hf://a/..",
            "hf://a/b@",
            "hf:///b",
        ] {
            assert!(HubSource::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rejects_paths_leaving_the_output() {
        let out = Path::new("/m");
        assert_eq!(
            local_path(out, "sub/x.json").unwrap(),
            Path::new("/m/sub/x.json")
        );
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(local_path(out, bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.json", "config.json"));
        assert!(glob_match("*.json", "sub/a.json"));
        assert!(!glob_match("*.json", "model.safetensors"));
        assert!(glob_match("config.json", "config.json"));
        assert!(!glob_match("config.json", "config.json.bak"));
        assert!(glob_match(
            "model-*-of-*.safetensors",
            "model-00001-of-00002.safetensors"
        ));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn encodes_revisions_as_one_segment() {
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
    }
}
