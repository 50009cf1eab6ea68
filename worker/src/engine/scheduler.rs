//! Scheduling loop of the engine; see the module docs of `engine`.

use super::grammar::{Constraint, Grammar, GrammarCompiler};
use super::logits::{GrammarMask, LogitsParams, LogitsStage, MaskSlot};
use super::sampler::{Sampler, SeqContext, SeqParams, SeqSampler};
use crate::generate::FinishReason;
use crate::kv::{KvDtype, KvPool, SeqCache};
use crate::model::{ForwardScratch, Model, SeqInput};
use crate::prefix::{BlockKeyFn, sha256_block_key};
use shardseek_kernels::sampling::SamplingParams;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Limits of one engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per forward step (decode tokens + prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running_requests: usize,
    /// Requests allowed to wait; beyond it `submit` refuses at once.
    pub max_waiting_requests: usize,
    /// Longest sequence (prompt + generated) accepted.
    pub max_seq_len: usize,
    /// KV cache blocks (of 64 tokens) in the pool.
    pub kv_blocks: usize,
    /// How prefix-cache blocks are keyed (hits are verified whatever the function; see
    /// `prefix::PrefixHash` for the choices a deployment has).
    pub prefix_key: BlockKeyFn,
    /// Element type of the latent cache (`--kv-cache-dtype`).
    pub kv_dtype: KvDtype,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            max_running_requests: 64,
            max_waiting_requests: 256,
            max_seq_len: 4096,
            kv_blocks: 512,
            prefix_key: sha256_block_key,
            kv_dtype: KvDtype::default(),
        }
    }
}

/// One generation request as the engine sees it (token ids in, token ids out).
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub top_logprobs: usize,
    /// Compute each generated token's log-prob (see [`SeqParams::token_logprob`]).
    pub token_logprob: bool,
    pub echo: bool,
    pub ignore_eos: bool,
    /// Extra token ids that end generation (besides the model's EOS).
    pub stop_token_ids: Vec<u32>,
    /// Prefix-cache isolation (vLLM's `cache_salt`): only requests with the same salt share
    /// cached blocks; `None` shares with every other unsalted request.
    pub cache_salt: Option<String>,
    /// Penalties, bias, min_tokens, min_p: a logits processor of the sequence's sampler.
    pub logits: LogitsParams,
    /// Grammar the output must follow (structured output, forced tool calls).
    pub constraint: Option<Constraint>,
}

/// What a request's channel carries, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// With `echo`: log-prob of each prompt token given the ones before (first is None).
    PromptLogprobs(Vec<Option<f32>>),
    Token {
        id: u32,
        /// None unless the request asked for it (or for top alternatives).
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    Error(String),
}

/// Why `submit` refused a request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters the metrics exporters read.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_available: AtomicUsize,
    pub prefix_cache_hit_blocks: AtomicU64,
    /// Prefix-cache key matches refused because the block's tokens or parent differed.
    pub prefix_cache_rejected_blocks: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub preemptions_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Of the step time, the model's forward pass, in nanoseconds (the rest is bookkeeping).
    pub forward_nanos: AtomicU64,
    /// Wall time of forward steps (planning, forward pass, sampling), in nanoseconds.
    pub step_nanos: AtomicU64,
    /// Of that, the time spent keying, looking up, verifying and registering prefix-cache
    /// blocks, in nanoseconds: what the collision-resistant keys cost.
    pub prefix_cache_nanos: AtomicU64,
    /// Tokens not yet computed of running and waiting requests (for load balancing).
    pub outstanding_tokens: AtomicUsize,
    /// Grammar masks computed, and the time spent computing them (on the mask thread, in
    /// parallel with the forward pass), in nanoseconds.
    pub grammar_masks_total: AtomicU64,
    pub grammar_mask_nanos_total: AtomicU64,
    /// Time steps waited for masks after their forward pass had finished (the cost not hidden).
    pub grammar_wait_nanos_total: AtomicU64,
}

impl EngineStats {
    pub fn kv_usage(&self) -> f64 {
        let t = self.kv_blocks_total.load(Ordering::Relaxed).max(1) as f64;
        1.0 - self.kv_blocks_available.load(Ordering::Relaxed) as f64 / t
    }
}

enum Command {
    /// Boxed: a request is large next to the other commands.
    Add(
        u64,
        Box<EngineRequest>,
        Option<Box<Grammar>>,
        UnboundedSender<Event>,
    ),
    Abort(u64),
    Stop,
}

/// A submitted request: its events, and an abort when dropped before it finished.
pub struct RequestHandle {
    pub id: u64,
    events: UnboundedReceiver<Event>,
    tx: mpsc::Sender<Command>,
    done: bool,
}

impl RequestHandle {
    /// Next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.events.recv().await;
        if matches!(
            ev,
            None | Some(Event::Finished { .. }) | Some(Event::Error(_))
        ) {
            self.done = true;
        }
        ev
    }

    /// Blocking variant for synchronous callers.
    pub fn blocking_next(&mut self) -> Option<Event> {
        let ev = self.events.blocking_recv();
        if matches!(
            ev,
            None | Some(Event::Finished { .. }) | Some(Event::Error(_))
        ) {
            self.done = true;
        }
        ev
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            // The client went away: free its slot and blocks at the next step.
            let _ = self.tx.send(Command::Abort(self.id));
        }
    }
}

/// The engine: a scheduling thread that owns the model's KV pool.
pub struct Engine {
    tx: Mutex<mpsc::Sender<Command>>,
    next_id: AtomicU64,
    pub stats: Arc<EngineStats>,
    cfg: EngineConfig,
    vocab: usize,
    /// Compiles constraints; None when the checkpoint has no tokenizer.json.
    grammar: Option<Arc<GrammarCompiler>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Seq {
    id: u64,
    req: EngineRequest,
    tx: UnboundedSender<Event>,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    cache: SeqCache,
    sampler: SeqSampler,
    generated: usize,
    prompt_lp: Option<Vec<Option<f32>>>,
    cached_tokens: usize,
    /// The request's grammar and where its next mask goes (read by the sampler's
    /// [`GrammarMask`] processor).
    grammar: Option<(Box<Grammar>, MaskSlot)>,
}

impl Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

impl Engine {
    /// Starts the scheduling thread for `model`, without grammar support.
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Arc<Self> {
        Self::start_with_grammar(model, cfg, None)
    }

    /// Starts the scheduling thread for `model`; `grammar` compiles the constraints of
    /// structured-output requests (without it they are refused).
    pub fn start_with_grammar(
        model: Arc<Model>,
        cfg: EngineConfig,
        grammar: Option<Arc<GrammarCompiler>>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let pool =
            KvPool::with_key_fn(model.kv_layout(cfg.kv_dtype), cfg.kv_blocks, cfg.prefix_key);
        stats
            .kv_blocks_total
            .store(pool.num_blocks(), Ordering::Relaxed);
        stats
            .kv_blocks_available
            .store(pool.available(), Ordering::Relaxed);
        let vocab = model.cfg.vocab_size;
        let (sched_cfg, sched_stats) = (cfg.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("shardseek-engine".into())
            .spawn(move || Scheduler::new(&model, sched_cfg, pool, sched_stats, rx).run())
            .ok();
        Arc::new(Self {
            tx: Mutex::new(tx),
            next_id: AtomicU64::new(1),
            stats,
            cfg,
            vocab,
            grammar,
            thread: Mutex::new(thread),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Validates and enqueues a request; refuses at once when the queue is full.
    pub fn submit(&self, req: EngineRequest) -> Result<RequestHandle, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::Invalid(format!(
                "prompt token id {t} is out of range (vocab_size {})",
                self.vocab
            )));
        }
        let total = req.prompt.len() + req.max_tokens;
        if total > self.cfg.max_seq_len {
            return Err(SubmitError::Invalid(format!(
                "prompt ({} tokens) + max_tokens ({}) = {total} exceeds the context limit of {} tokens",
                req.prompt.len(),
                req.max_tokens,
                self.cfg.max_seq_len
            )));
        }
        if total.div_ceil(crate::kv::BLOCK_TOKENS)
            > self.stats.kv_blocks_total.load(Ordering::Relaxed)
        {
            return Err(SubmitError::Invalid(format!(
                "a sequence of {total} tokens does not fit the KV cache"
            )));
        }
        req.logits
            .validate(self.vocab)
            .map_err(SubmitError::Invalid)?;
        if self.stats.waiting.load(Ordering::Relaxed) >= self.cfg.max_waiting_requests {
            return Err(SubmitError::QueueFull(self.cfg.max_waiting_requests));
        }
        // Compiled here, on the caller's thread, so a slow schema never stalls a step.
        let grammar = match &req.constraint {
            None => None,
            Some(c) => {
                let compiler = self.grammar.as_ref().ok_or_else(|| {
                    SubmitError::Invalid(
                        "structured output needs the model's tokenizer.json, which this pod does not have"
                            .into(),
                    )
                })?;
                Some(Box::new(
                    compiler
                        .compile(c)
                        .map_err(|e| SubmitError::Invalid(e.to_string()))?,
                ))
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = unbounded_channel();
        let tx = self.tx.lock().map_err(|_| SubmitError::Stopped)?.clone();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        tx.send(Command::Add(id, Box::new(req), grammar, etx))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(RequestHandle {
            id,
            events: erx,
            tx,
            done: false,
        })
    }

    /// Aborts a request by id (as dropping its handle would): slot and blocks are freed at
    /// the next step.
    pub fn abort(&self, id: u64) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Command::Abort(id));
        }
    }

    /// Whether the scheduling thread runs: false after [`Engine::stop`] and after a panic in
    /// the thread (the pod's liveness probe fails, so the kubelet restarts it).
    pub fn is_alive(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    /// Stops the scheduling thread; running requests get an error event.
    pub fn stop(&self) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Command::Stop);
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs requests to completion on the calling thread with the engine's own scheduling loop
/// (what `shardseek generate` and `bench model` do in process, so that there is one
/// generation loop). Returns each request's events in order.
pub fn run_blocking(model: &Model, cfg: EngineConfig, reqs: Vec<EngineRequest>) -> Vec<Vec<Event>> {
    let (_tx, rx) = mpsc::channel();
    let pool = KvPool::new(model.kv_layout(cfg.kv_dtype), cfg.kv_blocks);
    let mut sched = Scheduler::new(model, cfg, pool, Arc::default(), rx);
    let mut receivers = Vec::with_capacity(reqs.len());
    for (i, req) in reqs.into_iter().enumerate() {
        let (etx, erx) = unbounded_channel();
        // The in-process loop has no grammar compiler: a constrained request fails, rather
        // than running unconstrained.
        if req.constraint.is_some() {
            let _ = etx.send(Event::Error(
                "structured output is served by attention pods, not in process".into(),
            ));
            receivers.push(erx);
            continue;
        }
        sched.add(i as u64, req, None, etx);
        receivers.push(erx);
    }
    while !(sched.running.is_empty() && sched.waiting.is_empty()) {
        if !sched.step() {
            break;
        }
    }
    receivers
        .into_iter()
        .map(|mut rx| {
            let mut evs = Vec::new();
            while let Ok(e) = rx.try_recv() {
                evs.push(e);
            }
            evs
        })
        .collect()
}

struct Scheduler<'m> {
    model: &'m Model,
    cfg: EngineConfig,
    pool: KvPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: Arc<EngineStats>,
    rx: mpsc::Receiver<Command>,
    sampler: Sampler,
    /// The model's buffers (activations, logits), reused by every step.
    scratch: ForwardScratch,
    /// The step's plan, each entry's first position, and the forward pass's inputs: kept
    /// between steps so that planning allocates nothing once the batch size was seen.
    plan: Vec<(usize, usize)>,
    started: Vec<usize>,
    inputs: Vec<SeqInput<'static>>,
}

/// An empty input list that keeps `v`'s allocation: the inputs borrow the running sequences
/// for one step only, the buffer lives on (an in-place collect of an empty iterator).
#[expect(
    clippy::unnecessary_filter_map,
    reason = "filter_map is what changes the element's lifetime; filter keeps the short one"
)]
fn recycle_inputs<'b>(mut v: Vec<SeqInput<'_>>) -> Vec<SeqInput<'b>> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

impl<'m> Scheduler<'m> {
    fn new(
        model: &'m Model,
        cfg: EngineConfig,
        pool: KvPool,
        stats: Arc<EngineStats>,
        rx: mpsc::Receiver<Command>,
    ) -> Self {
        Self {
            model,
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats,
            rx,
            sampler: Sampler::new(),
            scratch: ForwardScratch::default(),
            plan: Vec::new(),
            started: Vec::new(),
            inputs: Vec::new(),
        }
    }

    fn add(
        &mut self,
        id: u64,
        req: EngineRequest,
        grammar: Option<Box<Grammar>>,
        tx: UnboundedSender<Event>,
    ) {
        let mut sampler = SeqSampler::new(SeqParams {
            sampling: req.sampling.clone(),
            seed: req.seed,
            top_logprobs: req.top_logprobs,
            token_logprob: req.token_logprob,
        });
        // The logits-processing stages, in vLLM's order: grammar mask, then min_tokens,
        // penalties, bias and min_p.
        let grammar = grammar.map(|g| {
            let slot = MaskSlot::default();
            sampler.push_processor(Box::new(GrammarMask::new(slot.clone())));
            (g, slot)
        });
        if !req.logits.is_neutral() {
            let ends: Vec<u32> = self
                .model
                .cfg
                .eos_token_ids
                .iter()
                .chain(&req.stop_token_ids)
                .copied()
                .collect();
            sampler.push_processor(Box::new(LogitsStage::new(
                req.logits.clone(),
                ends,
                req.sampling.temperature,
                &req.prompt,
            )));
        }
        self.waiting.push_back(Seq {
            id,
            tokens: req.prompt.clone(),
            prompt_lp: req.echo.then(|| vec![None]),
            req,
            tx,
            cache: SeqCache::default(),
            sampler,
            generated: 0,
            cached_tokens: 0,
            grammar,
        });
    }

    fn run(&mut self) {
        loop {
            // Block only when there is nothing to compute.
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(c) => {
                        if !self.apply(c) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            while let Ok(c) = self.rx.try_recv() {
                if !self.apply(c) {
                    return;
                }
            }
            let t = std::time::Instant::now();
            self.step();
            self.stats
                .step_nanos
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.publish();
        }
    }

    /// Applies one command; false means stop.
    fn apply(&mut self, c: Command) -> bool {
        match c {
            Command::Add(id, req, grammar, tx) => self.add(id, *req, grammar, tx),
            Command::Abort(id) => {
                if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
                    if let Some(s) = self.waiting.remove(i) {
                        self.finish_silently(s);
                    }
                } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
                    let s = self.running.remove(i);
                    self.finish_silently(s);
                }
            }
            Command::Stop => {
                for s in self.running.drain(..).chain(self.waiting.drain(..)) {
                    let _ =
                        s.tx.send(Event::Error("the engine is shutting down".into()));
                }
                return false;
            }
        }
        self.publish();
        true
    }

    fn finish_silently(&mut self, mut s: Seq) {
        self.pool.release(&mut s.cache);
    }

    fn publish(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats
            .kv_blocks_available
            .store(self.pool.available(), Ordering::Relaxed);
        self.stats
            .prefix_cache_hit_blocks
            .store(self.pool.prefix_hits(), Ordering::Relaxed);
        self.stats
            .prefix_cache_rejected_blocks
            .store(self.pool.prefix_rejected(), Ordering::Relaxed);
        let outstanding: usize = self
            .running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.pending() + s.req.max_tokens.saturating_sub(s.generated))
            .sum();
        self.stats
            .outstanding_tokens
            .store(outstanding, Ordering::Relaxed);
    }

    /// Frees the newest running sequence's blocks and puts it back at the head of the queue.
    fn preempt_newest(&mut self) -> bool {
        let Some(mut s) = self.running.pop() else {
            return false;
        };
        self.pool.release(&mut s.cache);
        if s.prompt_lp.is_some() {
            s.prompt_lp = Some(vec![None]); // recomputed from the start
        }
        s.cached_tokens = 0;
        self.stats.preemptions_total.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(s);
        true
    }

    /// One forward step over the planned batch; false when nothing could be scheduled.
    fn step(&mut self) -> bool {
        // The plan's buffers are the scheduler's, reused from step to step.
        let (mut plan, mut started) = (
            std::mem::take(&mut self.plan),
            std::mem::take(&mut self.started),
        );
        plan.clear();
        started.clear();
        let scheduled = self.step_with(&mut plan, &mut started);
        (self.plan, self.started) = (plan, started);
        scheduled
    }

    fn step_with(&mut self, plan: &mut Vec<(usize, usize)>, started: &mut Vec<usize>) -> bool {
        let mut budget = self.cfg.max_batch_tokens;
        // Plan: (index into running, tokens this step). Running sequences first, oldest first.
        let mut claimed = 0usize; // blocks promised to earlier entries of the plan
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let want = s.pending().min(budget);
            let mut take = want;
            while take > 0
                && self.pool.blocks_needed(&s.cache, s.cache.len() + take) + claimed
                    > self.pool.available()
            {
                take -= 1;
            }
            if take == 0 {
                // No room even for one token: free the newest sequence (maybe this one).
                if i + 1 == self.running.len() && plan.iter().all(|p| p.0 != i) {
                    self.preempt_newest();
                    break;
                }
                if !self.preempt_newest() {
                    break;
                }
                continue;
            }
            claimed += self.pool.blocks_needed(&s.cache, s.cache.len() + take);
            plan.push((i, take));
            budget -= take;
            i += 1;
        }
        // Admit waiting requests while slots, budget and blocks allow.
        while budget > 0 && self.running.len() < self.cfg.max_running_requests {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if s.cache.is_empty() {
                let t = std::time::Instant::now();
                let salt = s.req.cache_salt.as_deref();
                // Echo needs every prompt position's logits, so it reads nothing cached; its
                // blocks are still registered for later requests.
                s.cache = if s.req.echo {
                    self.pool.start_cold(salt)
                } else {
                    self.pool.start_with_prefix(&s.tokens, salt)
                };
                s.cached_tokens = s.cache.len();
                self.stats
                    .prefix_cache_nanos
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            let mut take = s.pending().min(budget);
            while take > 0
                && self.pool.blocks_needed(&s.cache, s.cache.len() + take) + claimed
                    > self.pool.available()
            {
                take -= 1;
            }
            if take == 0 {
                self.pool.release(&mut s.cache);
                s.cached_tokens = 0;
                self.waiting.push_front(s);
                break;
            }
            claimed += self.pool.blocks_needed(&s.cache, s.cache.len() + take);
            self.running.push(s);
            plan.push((self.running.len() - 1, take));
            budget -= take;
        }
        if plan.is_empty() {
            return false;
        }
        for &(i, take) in plan.iter() {
            let s = &mut self.running[i];
            let len = s.cache.len() + take;
            if let Err(e) = self.pool.reserve(&mut s.cache, len) {
                // Planning above guarantees the blocks; report rather than panic if not.
                let _ =
                    s.tx.send(Event::Error(format!("KV cache reservation failed: {e}")));
            }
        }
        started.extend(plan.iter().map(|&(i, _)| self.running[i].cache.len()));
        // Sequences that select a token this step and follow a grammar: their masks depend only
        // on tokens already chosen, so they are computed on another thread while the forward
        // pass runs (the grammars are moved there and back).
        let mut grammars: Vec<(usize, Box<Grammar>, MaskSlot)> = Vec::new();
        for &(i, take) in plan.iter() {
            let s = &mut self.running[i];
            if take == s.pending()
                && let Some((g, slot)) = s.grammar.take()
            {
                grammars.push((i, g, slot));
            }
        }
        let stats = self.stats.clone();
        let mut mask_errors: Vec<(usize, String)> = Vec::new();
        let model = self.model;
        let pool = &mut self.pool;
        let running = &mut self.running;
        let (scratch, inputs_buf) = (&mut self.scratch, &mut self.inputs);
        let plan_ref = &*plan;
        let mut forward = || {
            let mut inputs = recycle_inputs(std::mem::take(inputs_buf));
            let mut rest: &mut [Seq] = running;
            let mut base = 0;
            for &(i, take) in plan_ref {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (head, tail) = tail.split_at_mut(1);
                let s = &mut head[0];
                let start = s.cache.len();
                let want_all = s.prompt_lp.is_some() && start < s.req.prompt.len();
                inputs.push(SeqInput {
                    tokens: &s.tokens[start..start + take],
                    cache: &mut s.cache,
                    all_logits: want_all,
                });
                rest = tail;
                base = i + 1;
            }
            let t0 = std::time::Instant::now();
            let result = model.forward_into(pool, &mut inputs, scratch);
            stats
                .forward_nanos
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            *inputs_buf = recycle_inputs(inputs);
            result
        };
        let result = if grammars.is_empty() {
            forward()
        } else {
            let constrained: Vec<usize> = grammars.iter().map(|g| g.0).collect();
            std::thread::scope(|scope| {
                let job = scope.spawn(|| {
                    let t0 = std::time::Instant::now();
                    let mut errors = Vec::new();
                    let mut n = 0u64;
                    for (i, g, slot) in grammars.iter_mut() {
                        match g.mask() {
                            Ok(m) => {
                                n += u64::from(m.is_some());
                                slot.put(m);
                            }
                            Err(e) => errors.push((*i, e.to_string())),
                        }
                    }
                    stats.grammar_masks_total.fetch_add(n, Ordering::Relaxed);
                    stats
                        .grammar_mask_nanos_total
                        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    errors
                });
                let result = forward();
                let t0 = std::time::Instant::now();
                mask_errors = job.join().unwrap_or_else(|_| {
                    constrained
                        .iter()
                        .map(|&i| (i, "the grammar mask thread panicked".to_string()))
                        .collect()
                });
                stats
                    .grammar_wait_nanos_total
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                result
            })
        };
        for (i, g, slot) in grammars {
            self.running[i].grammar = Some((g, slot));
        }
        self.stats.steps_total.fetch_add(1, Ordering::Relaxed);
        let step_failed = match result {
            Ok(failed) => failed,
            Err(e) => {
                // A failed step (e.g. an expert shard is down) fails the requests in it; the
                // others go on at the next step.
                let failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                for &i in failed.iter().rev() {
                    let mut s = self.running.remove(i);
                    let _ = s.tx.send(Event::Error(e.to_string()));
                    self.pool.release(&mut s.cache);
                }
                return true;
            }
        };
        let v = self.model.cfg.vocab_size;
        let mut finished: Vec<usize> = Vec::new();
        // An expert shard failed under some sequences (no replica held their experts): those
        // end with the error naming the shard, and their KV blocks are freed unregistered
        // (this step's entries are wrong); the rest of the batch goes on.
        for (k, failure) in step_failed {
            if let Some(&(i, _)) = plan.get(k) {
                let _ = self.running[i]
                    .tx
                    .send(Event::Error(failure.into_error().to_string()));
                finished.push(i);
            }
        }
        for (i, e) in mask_errors {
            let _ = self.running[i]
                .tx
                .send(Event::Error(format!("grammar: {e}")));
            finished.push(i);
        }
        for (k, (&(i, take), &start)) in plan.iter().zip(started.iter()).enumerate() {
            if finished.contains(&i) {
                continue;
            }
            let lg = self.scratch.logits_mut(k);
            let s = &mut self.running[i];
            let prompt_len = s.req.prompt.len();
            if start < prompt_len {
                self.stats
                    .prompt_tokens_total
                    .fetch_add(take.min(prompt_len - start) as u64, Ordering::Relaxed);
            }
            // Echo: log-probs of the prompt tokens this chunk predicts.
            if let Some(pl) = s.prompt_lp.as_mut()
                && start < prompt_len
                && lg.len() == take * v
            {
                for r in 0..take {
                    let pos = start + r;
                    if pos + 1 < prompt_len {
                        let row = &lg[r * v..(r + 1) * v];
                        pl.push(Some(Sampler::token_logprob(row, s.tokens[pos + 1])));
                    }
                }
                if start + take >= prompt_len {
                    let _ = s.tx.send(Event::PromptLogprobs(std::mem::take(pl)));
                    s.prompt_lp = None;
                }
            }
            let done_len = s.cache.len();
            let t = std::time::Instant::now();
            self.pool
                .register_full_blocks(&mut s.cache, &s.tokens[..done_len]);
            self.stats
                .prefix_cache_nanos
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if s.pending() > 0 {
                continue; // mid-prefill: nothing to sample yet
            }
            let n = lg.len();
            let ctx = SeqContext {
                prompt: &s.tokens[..prompt_len],
                generated: &s.tokens[prompt_len..],
            };
            let picked = self.sampler.sample(&mut s.sampler, &ctx, &mut lg[n - v..]);
            let tok = picked.token;
            let mut grammar_done = false;
            if let Some((g, _)) = s.grammar.as_mut() {
                if let Err(e) = g.accept(tok) {
                    let _ = s.tx.send(Event::Error(e.to_string()));
                    finished.push(i);
                    continue;
                }
                grammar_done = g.is_finished();
            }
            s.tokens.push(tok);
            s.generated += 1;
            self.stats
                .generation_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            let _ = s.tx.send(Event::Token {
                id: tok,
                logprob: picked.logprob,
                top: picked.top,
            });
            // A complete grammar ends the output (only end-of-sequence could follow).
            let eos = grammar_done
                || (!s.req.ignore_eos
                    && (self.model.cfg.eos_token_ids.contains(&tok)
                        || s.req.stop_token_ids.contains(&tok)));
            if eos || s.generated >= s.req.max_tokens || s.tokens.len() >= self.cfg.max_seq_len {
                let reason = if eos {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                };
                let _ = s.tx.send(Event::Finished {
                    reason,
                    prompt_tokens: prompt_len,
                    completion_tokens: s.generated,
                    cached_tokens: s.cached_tokens,
                });
                finished.push(i);
            }
        }
        finished.sort_unstable();
        finished.dedup();
        for &i in finished.iter().rev() {
            let s = self.running.remove(i);
            self.finish_silently(s);
        }
        true
    }
}
