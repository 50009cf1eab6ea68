//! Prometheus metrics of a worker process (DESIGN.md §7), rendered in the text format at
//! `/metrics`. Engine counters live in atomics the scheduler updates; they are copied into the
//! registry at scrape time, so the hot loop never touches the registry's locks.

use crate::engine::EngineStats;
use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

/// Latency buckets from 100 µs to ~100 s: dispatch round trips are sub-millisecond on
/// loopback, whole requests take seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 25.0, 50.0, 100.0,
];

/// Metrics of an attention pod or expert shard.
pub struct WorkerMetrics {
    registry: Registry,
    requests_running: IntGauge,
    requests_waiting: IntGauge,
    kv_cache_usage: Gauge,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    prefix_cache_hits: IntCounter,
    prefix_cache_rejected: IntCounter,
    preemptions: IntCounter,
    step_seconds: Counter,
    /// Of the step time, the forward pass (the rest is bookkeeping on the engine thread).
    forward_seconds: Counter,
    prefix_cache_seconds: Counter,
    /// Grammar masks (structured output): time computing them beside the forward pass, and
    /// the part of it steps waited for.
    grammar_mask_seconds: Counter,
    grammar_wait_seconds: Counter,
    grammar_masks: IntCounter,
    steps: IntCounter,
    /// Totals last copied into the counters above: the float counters' nanoseconds (step,
    /// prefix cache, grammar mask, grammar wait), masks, steps, forward nanoseconds.
    last_nanos: Mutex<[u64; 7]>,
    /// Round trip of one MoE layer's dispatch + combine, seen by the attention pod.
    pub dispatch_duration: Histogram,
    /// Bytes of rows sent and received by dispatch.
    pub dispatch_bytes: IntCounter,
    /// Tokens the dispatch held for a restarting shard (no live copy of one of their experts):
    /// each was served after the shard came back or failed when the wait ran out. Nonzero
    /// means a shard died and the redundant slots did not cover its experts.
    pub dispatch_held_tokens: IntCounter,
    /// Tokens routed to each expert (summed over layers), counted where experts compute.
    pub expert_tokens: IntCounterVec,
    /// Busiest expert shard's load ÷ mean shard load over the dispatch client's window (see
    /// `Dispatcher::load_imbalance`); set by attention pods, the only processes that see every
    /// shard's share. A shard alone cannot know it and exports 0.
    pub expert_load_imbalance: Gauge,
    last: Mutex<[u64; 5]>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; a failure here is a programming error caught by tests.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let ig = |n: &str, h: &str| {
            let g = must(IntGauge::new(n, h));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let ic = |n: &str, h: &str| {
            let c = must(IntCounter::new(n, h));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let requests_running = ig(
            "shardseek_requests_running",
            "Requests in the running batch",
        );
        let requests_waiting = ig(
            "shardseek_requests_waiting",
            "Requests waiting for admission",
        );
        let kv_cache_usage = must(Gauge::new(
            "shardseek_kv_cache_usage_ratio",
            "Fraction of KV cache blocks referenced by live requests",
        ));
        must(registry.register(Box::new(kv_cache_usage.clone())));
        let prompt_tokens = ic("shardseek_prompt_tokens_total", "Prompt tokens prefilled");
        let generation_tokens = ic("shardseek_generation_tokens_total", "Tokens generated");
        let prefix_cache_hits = ic(
            "shardseek_prefix_cache_hits_total",
            "KV blocks of prompts served from the prefix cache (their prefill skipped)",
        );
        let prefix_cache_rejected = ic(
            "shardseek_prefix_cache_rejected_total",
            "Prefix-cache key matches refused because the block's tokens or parent differed \
             (hash collisions and stale entries; each costs a miss, never wrong KV)",
        );
        let fc = |n: &str, h: &str| {
            let c = must(Counter::new(n, h));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let step_seconds = fc(
            "shardseek_engine_step_seconds_total",
            "Wall time of the engine's forward steps (planning, forward pass, sampling)",
        );
        let forward_seconds = fc(
            "shardseek_engine_forward_seconds_total",
            "Of the step time, the time in the model's forward pass (the rest is the scheduler's \
             bookkeeping on the engine thread: planning, sampling, sending)",
        );
        let prefix_cache_seconds = fc(
            "shardseek_prefix_cache_seconds_total",
            "Of the step time, the time spent keying, verifying and registering prefix-cache blocks",
        );
        let grammar_mask_seconds = fc(
            "shardseek_grammar_mask_seconds_total",
            "Time computing grammar masks (structured output), on a thread beside the forward pass",
        );
        let grammar_wait_seconds = fc(
            "shardseek_grammar_mask_wait_seconds_total",
            "Of the grammar-mask time, what steps waited for after their forward pass had finished",
        );
        let grammar_masks = ic(
            "shardseek_grammar_masks_total",
            "Grammar masks computed (one per constrained sequence per decode step)",
        );
        let steps = ic(
            "shardseek_engine_steps_total",
            "Forward steps of the engine (the denominator of per-step costs)",
        );
        let preemptions = ic(
            "shardseek_preemptions_total",
            "Requests preempted for KV space",
        );
        let dispatch_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "shardseek_dispatch_duration_seconds",
                "Round trip of one MoE layer's dispatch and combine",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        ));
        must(registry.register(Box::new(dispatch_duration.clone())));
        let dispatch_bytes = ic(
            "shardseek_dispatch_bytes_total",
            "Row bytes moved by dispatch",
        );
        let dispatch_held_tokens = ic(
            "shardseek_dispatch_held_tokens_total",
            "Tokens held for a restarting expert shard that had the only copy of one of their experts",
        );
        let expert_tokens = must(IntCounterVec::new(
            Opts::new(
                "shardseek_expert_tokens_total",
                "Tokens computed per routed expert, summed over layers",
            ),
            &["expert"],
        ));
        must(registry.register(Box::new(expert_tokens.clone())));
        let expert_load_imbalance = must(Gauge::new(
            "shardseek_expert_load_imbalance_ratio",
            "Max expert-shard load over mean shard load, (token, expert) pairs this attention pod sent in the last 60 s",
        ));
        must(registry.register(Box::new(expert_load_imbalance.clone())));
        #[cfg(target_os = "linux")]
        must(registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        Self {
            registry,
            requests_running,
            requests_waiting,
            kv_cache_usage,
            prompt_tokens,
            generation_tokens,
            prefix_cache_hits,
            prefix_cache_rejected,
            preemptions,
            step_seconds,
            forward_seconds,
            prefix_cache_seconds,
            last_nanos: Mutex::new([0; 7]),
            grammar_mask_seconds,
            grammar_wait_seconds,
            grammar_masks,
            steps,
            dispatch_duration,
            dispatch_bytes,
            dispatch_held_tokens,
            expert_tokens,
            expert_load_imbalance,
            last: Mutex::new([0; 5]),
        }
    }

    /// Records the tokens a shard computed for each expert of one dispatch.
    pub fn record_expert_tokens(&self, counts: &[(usize, u64)]) {
        for &(e, n) in counts {
            self.expert_tokens
                .with_label_values(&[&e.to_string()])
                .inc_by(n);
        }
    }

    /// The text exposition, with engine figures copied in first.
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        if let Some(s) = stats {
            self.requests_running
                .set(s.running.load(Ordering::Relaxed) as i64);
            self.requests_waiting
                .set(s.waiting.load(Ordering::Relaxed) as i64);
            self.kv_cache_usage.set(s.kv_usage());
            let now = [
                s.prompt_tokens_total.load(Ordering::Relaxed),
                s.generation_tokens_total.load(Ordering::Relaxed),
                s.prefix_cache_hit_blocks.load(Ordering::Relaxed),
                s.preemptions_total.load(Ordering::Relaxed),
                s.prefix_cache_rejected_blocks.load(Ordering::Relaxed),
            ];
            if let Ok(mut last) = self.last.lock() {
                let counters = [
                    &self.prompt_tokens,
                    &self.generation_tokens,
                    &self.prefix_cache_hits,
                    &self.preemptions,
                    &self.prefix_cache_rejected,
                ];
                for ((c, n), l) in counters.iter().zip(now).zip(last.iter_mut()) {
                    c.inc_by(n.saturating_sub(*l));
                    *l = n.max(*l);
                }
            }
            let nanos = [
                s.step_nanos.load(Ordering::Relaxed),
                s.prefix_cache_nanos.load(Ordering::Relaxed),
                s.grammar_mask_nanos_total.load(Ordering::Relaxed),
                s.grammar_wait_nanos_total.load(Ordering::Relaxed),
            ];
            if let Ok(mut last) = self.last_nanos.lock() {
                let counters = [
                    &self.step_seconds,
                    &self.prefix_cache_seconds,
                    &self.grammar_mask_seconds,
                    &self.grammar_wait_seconds,
                ];
                for ((c, n), l) in counters.iter().zip(nanos).zip(last.iter_mut()) {
                    c.inc_by(n.saturating_sub(*l) as f64 * 1e-9);
                    *l = n.max(*l);
                }
                let masks = s.grammar_masks_total.load(Ordering::Relaxed);
                self.grammar_masks.inc_by(masks.saturating_sub(last[4]));
                last[4] = masks.max(last[4]);
                let steps = s.steps_total.load(Ordering::Relaxed);
                self.steps.inc_by(steps.saturating_sub(last[5]));
                last[5] = steps.max(last[5]);
                let fwd = s.forward_nanos.load(Ordering::Relaxed);
                self.forward_seconds
                    .inc_by(fwd.saturating_sub(last[6]) as f64 * 1e-9);
                last[6] = fwd.max(last[6]);
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_design_names() {
        let m = WorkerMetrics::new();
        let stats = EngineStats::default();
        stats.prompt_tokens_total.store(7, Ordering::Relaxed);
        m.record_expert_tokens(&[(3, 4), (5, 2)]);
        m.dispatch_duration.observe(0.001);
        let text = m.render(Some(&stats));
        for name in [
            "shardseek_requests_running",
            "shardseek_kv_cache_usage_ratio",
            "shardseek_prompt_tokens_total 7",
            "shardseek_expert_tokens_total{expert=\"3\"} 4",
            "shardseek_expert_load_imbalance_ratio",
            "shardseek_dispatch_duration_seconds_bucket",
            "shardseek_dispatch_held_tokens_total 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        // Counters follow the engine's totals without double counting.
        stats.prompt_tokens_total.store(9, Ordering::Relaxed);
        assert!(
            m.render(Some(&stats))
                .contains("shardseek_prompt_tokens_total 9")
        );
    }
}
