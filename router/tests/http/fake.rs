//! Fakes at the edge of the tests: a backend whose tokens are a pure function of the request,
//! and a codec with one token per byte (so multi-byte characters span tokens).

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use shardseek_router::openai::{
    AppState, Backend, BackendError, FinishReason, Metrics, TemplateOptions, TextCodec, TokenEvent,
    TokenRequest, TokenStream,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// End of sequence of the fake model.
pub const EOS: u32 = 256;
/// Token ids at or above this are out of range for the fake model.
pub const VOCAB: u32 = 300;
/// A prompt containing this token fails with an internal error after its first generated token.
pub const FAIL_MID_STREAM: u32 = 298;
pub const MODEL: &str = "fake-model";
pub const MAX_MODEL_LEN: usize = 64;

/// Generates `prompt[(i + shift) % len]` for step i, where shift is 0 when greedy and the seed
/// otherwise; stops at EOS (unless `ignore_eos`) or a stop token, or after `max_tokens`.
#[derive(Default)]
pub struct FakeBackend {
    pub not_ready: AtomicBool,
    pub refuse: Mutex<Option<BackendError>>,
    pub token_delay: Mutex<Duration>,
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    /// Streams dropped before their end: aborted requests.
    pub aborted: AtomicUsize,
    pub requests: Mutex<Vec<TokenRequest>>,
}

/// Marks the end of a fake generation; dropped before that, it counts an abort.
struct Guard {
    backend: Arc<FakeBackend>,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.backend.finished
        } else {
            &self.backend.aborted
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn token_logprob(step: usize) -> f32 {
    -0.125 * (step % 8 + 1) as f32
}

pub struct SharedBackend(pub Arc<FakeBackend>);

impl Backend for SharedBackend {
    fn generate(&self, req: TokenRequest) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        let backend = self.0.clone();
        Box::pin(async move {
            if let Some(e) = backend.refuse.lock().unwrap().clone() {
                return Err(e);
            }
            if let Some(&t) = req.prompt.iter().find(|&&t| t >= VOCAB) {
                return Err(BackendError::Invalid(format!(
                    "prompt token id {t} is out of range (vocab_size {VOCAB})"
                )));
            }
            backend.requests.lock().unwrap().push(req.clone());
            backend.started.fetch_add(1, Ordering::SeqCst);
            let delay = *backend.token_delay.lock().unwrap();
            let mut events: Vec<Result<TokenEvent, BackendError>> = Vec::new();
            if req.echo {
                events.push(Ok(TokenEvent::PromptLogprobs(
                    (0..req.prompt.len())
                        .map(|i| (i > 0).then(|| -0.5 - 0.25 * (i % 3) as f32))
                        .collect(),
                )));
            }
            let shift = if req.temperature == 0.0 {
                0
            } else {
                req.seed as usize
            };
            let mut reason = FinishReason::Length;
            let mut generated = 0;
            for step in 0..req.max_tokens {
                let id = req.prompt[(step + shift) % req.prompt.len()];
                let top = (0..req.top_logprobs)
                    .map(|k| {
                        if k == 0 {
                            (id, token_logprob(step))
                        } else {
                            ((id + k as u32) % 128 + 32, token_logprob(step) - k as f32)
                        }
                    })
                    .collect();
                events.push(Ok(TokenEvent::Token {
                    id,
                    logprob: token_logprob(step),
                    top,
                }));
                generated += 1;
                if step == 0 && req.prompt.contains(&FAIL_MID_STREAM) {
                    events.push(Err(BackendError::Internal("the fake pod died".into())));
                    break;
                }
                if (id == EOS && !req.ignore_eos) || req.stop_token_ids.contains(&id) {
                    reason = FinishReason::Stop;
                    break;
                }
            }
            events.push(Ok(TokenEvent::Finished {
                reason,
                prompt_tokens: req.prompt.len(),
                completion_tokens: generated,
                cached_tokens: 0,
            }));
            let guard = Guard {
                backend,
                done: false,
            };
            let stream = stream::unfold(
                (events.into_iter(), guard),
                move |(mut it, mut guard)| async move {
                    let ev = it.next()?;
                    if matches!(ev, Ok(TokenEvent::Token { .. })) && !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if matches!(ev, Ok(TokenEvent::Finished { .. }) | Err(_)) {
                        guard.done = true;
                    }
                    Some((ev, (it, guard)))
                },
            );
            Ok(stream.boxed())
        })
    }

    fn ready(&self) -> bool {
        !self.0.not_ready.load(Ordering::SeqCst)
    }
}

/// One token per byte; ids ≥ 256 are special (EOS prints as `<eos>` unless skipped).
pub struct ByteCodec;

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        let mut out = String::new();
        let mut bytes = Vec::new();
        for &id in ids {
            if id < 256 {
                bytes.push(id as u8);
                continue;
            }
            out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut bytes)));
            if !skip_special_tokens {
                out.push_str(if id == EOS { "<eos>" } else { "<special>" });
            }
        }
        out.push_str(&String::from_utf8_lossy(&bytes));
        Ok(out)
    }

    fn apply_chat_template(
        &self,
        messages: &[serde_json::Value],
        opts: &TemplateOptions,
    ) -> Result<String, String> {
        let mut s = String::new();
        for m in messages {
            let role = m["role"].as_str().unwrap_or_default();
            let content = m["content"].as_str().unwrap_or_default();
            if role == "assistant" && content.contains("{%") {
                return Err("template error: raise_exception('bad assistant turn')".into());
            }
            s.push_str(&format!("{role}:{content}\n"));
        }
        if opts.add_generation_prompt {
            s.push_str("assistant:");
        }
        Ok(s)
    }
}

/// A running test server.
pub struct Server {
    pub url: String,
    pub backend: Arc<FakeBackend>,
    pub state: AppState,
}

pub async fn serve() -> Server {
    serve_with(true).await
}

pub async fn serve_with(codec: bool) -> Server {
    serve_configured(codec, |_| {}).await
}

/// A server whose state `configure` adjusts first (API key, CORS origins, …).
pub async fn serve_configured(codec: bool, configure: impl FnOnce(&mut AppState)) -> Server {
    let backend = Arc::new(FakeBackend::default());
    let mut state = AppState::new(
        Arc::new(SharedBackend(backend.clone())),
        codec.then(|| Arc::new(ByteCodec) as Arc<dyn TextCodec>),
        MODEL,
        MAX_MODEL_LEN,
        Metrics::new().expect("metrics"),
    );
    configure(&mut state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The task ends with the test's runtime.
    tokio::spawn(shardseek_router::openai::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    Server {
        url: format!("http://{addr}"),
        backend,
        state,
    }
}

/// Waits (bounded) until `cond` holds.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
