//! How big an attention pod's latent KV cache is, and whether the longest allowed sequence fits
//! (DESIGN.md §5): the pod checks at start that one `max_seq_len` sequence fits its cache and,
//! when it does not, either caps the length (with a warning) or refuses to start with the
//! numbers, as the user chose ([`OnOverflow`]). vLLM does the same check at start.
//!
//! The budget is explicit (`--kv-cache-memory`, `attention.kvCache.memory` in the CRD) or, when
//! unset, automatic: room for one max-length sequence and never less than [`AUTO_MIN_BYTES`],
//! bounded by [`AUTO_MAX_FRACTION`] of the memory this process may use (its cgroup's limit, else
//! the machine's). The pool's pages are mapped lazily, so a budget costs memory only as it fills.

use crate::config::ModelConfig;
use crate::kv::BLOCK_TOKENS;

/// The automatic budget's floor: 1 GiB, what the cache had before it was sized (enough for
/// batches of short requests on the small presets).
pub const AUTO_MIN_BYTES: u64 = 1 << 30;
/// The automatic budget's ceiling, as a fraction of the memory the process may use: the other
/// half holds the attention weights, activations and the runtime.
pub const AUTO_MAX_FRACTION: f64 = 0.5;

/// What to do when one `max_seq_len` sequence does not fit the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnOverflow {
    /// Refuse to start, saying how much memory the length needs (vLLM's behaviour).
    #[default]
    Refuse,
    /// Start with the longest length that fits, and warn.
    Cap,
}

impl std::str::FromStr for OnOverflow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "cap" => Ok(Self::Cap),
            other => Err(format!("`{other}`: expected refuse or cap")),
        }
    }
}

/// The cache an attention pod allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSizing {
    /// Blocks of [`BLOCK_TOKENS`] tokens in the pool.
    pub blocks: usize,
    /// Bytes of one block over all layers.
    pub block_bytes: u64,
    /// The longest sequence the pod accepts (the requested one, or the cap).
    pub max_seq_len: usize,
    /// The requested length when it was capped.
    pub capped_from: Option<usize>,
}

/// Why a pod refuses to start: the numbers a user needs to fix the settings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV cache ({budget_bytes} bytes, {blocks} blocks of {block_tokens} tokens) holds {capacity_tokens} tokens, \
     but one sequence of max_seq_len {max_seq_len} tokens needs {needed_bytes} bytes: raise the KV cache memory \
     (--kv-cache-memory / attention.kvCache.memory) to at least {needed_bytes} bytes, lower max_seq_len to at most \
     {capacity_tokens}, or let the pod cap the length (--kv-cache-on-overflow cap / attention.kvCache.onOverflow: cap)"
)]
pub struct KvFitError {
    /// The cache budget in bytes.
    pub budget_bytes: u64,
    /// Blocks that budget holds.
    pub blocks: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// Tokens the cache holds.
    pub capacity_tokens: usize,
    /// The requested longest sequence.
    pub max_seq_len: usize,
    /// Bytes one such sequence needs.
    pub needed_bytes: u64,
}

/// Bytes of one block of the latent cache: every layer's latent and rope key for
/// [`BLOCK_TOKENS`] tokens, at `bytes_per_value`.
pub fn block_bytes(cfg: &ModelConfig, dtype: crate::kv::KvDtype) -> u64 {
    crate::kv::KvLayout {
        layers: cfg.num_hidden_layers,
        kv_lora_rank: cfg.kv_lora_rank,
        rope_dim: cfg.qk_rope_head_dim,
        dtype,
    }
    .block_bytes() as u64
}

/// The automatic budget for `max_seq_len` when the process may use `memory_limit` bytes.
pub fn auto_budget(block_bytes: u64, max_seq_len: usize, memory_limit: Option<u64>) -> u64 {
    let one_sequence = max_seq_len.div_ceil(BLOCK_TOKENS) as u64 * block_bytes;
    let want = one_sequence.max(AUTO_MIN_BYTES);
    match memory_limit {
        Some(limit) => want.min((limit as f64 * AUTO_MAX_FRACTION) as u64),
        None => want,
    }
}

/// Sizes the cache for `budget_bytes` and checks that one `max_seq_len` sequence fits.
pub fn size(
    block_bytes: u64,
    budget_bytes: u64,
    max_seq_len: usize,
    on_overflow: OnOverflow,
) -> Result<KvSizing, KvFitError> {
    let blocks = usize::try_from(budget_bytes / block_bytes.max(1)).unwrap_or(usize::MAX);
    let capacity_tokens = blocks.saturating_mul(BLOCK_TOKENS);
    let needed_bytes = max_seq_len.div_ceil(BLOCK_TOKENS) as u64 * block_bytes;
    if max_seq_len <= capacity_tokens {
        return Ok(KvSizing {
            blocks,
            block_bytes,
            max_seq_len,
            capped_from: None,
        });
    }
    let error = KvFitError {
        budget_bytes,
        blocks,
        block_tokens: BLOCK_TOKENS,
        capacity_tokens,
        max_seq_len,
        needed_bytes,
    };
    match on_overflow {
        OnOverflow::Cap if capacity_tokens > 0 => Ok(KvSizing {
            blocks,
            block_bytes,
            max_seq_len: capacity_tokens,
            capped_from: Some(max_seq_len),
        }),
        _ => Err(error),
    }
}

/// Parses a memory size: plain bytes or a Kubernetes quantity (`8Gi`, `512Mi`).
pub use shardseek_proto::cluster_config::parse_bytes;

/// The memory this process may use: its cgroup v2 (or v1) limit, else the machine's total.
pub fn memory_limit() -> Option<u64> {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    // cgroup v1 reports "no limit" as a huge page-aligned number.
    .find(|&v| v < (1 << 60));
    cgroup.or_else(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3's shape: 61 layers, latent 512 + rope 64.
    const V3_BLOCK_F32: u64 = 61 * 64 * 576 * 4;

    #[test]
    fn fits_when_the_budget_holds_one_sequence() {
        let s = size(V3_BLOCK_F32, 24 << 30, 163_840, OnOverflow::Refuse).unwrap();
        assert_eq!(s.max_seq_len, 163_840);
        assert_eq!(s.capped_from, None);
        assert!(s.blocks * BLOCK_TOKENS >= 163_840);
    }

    #[test]
    fn refuses_with_the_numbers() {
        // 1 GiB of f32 holds ~7.6k tokens of V3.
        let e = size(V3_BLOCK_F32, 1 << 30, 163_840, OnOverflow::Refuse).unwrap_err();
        assert_eq!(e.capacity_tokens, 7616);
        assert_eq!(e.needed_bytes, 2560 * V3_BLOCK_F32);
        let text = e.to_string();
        assert!(text.contains("7616") && text.contains("163840"), "{text}");
    }

    #[test]
    fn caps_to_what_fits() {
        let s = size(V3_BLOCK_F32, 1 << 30, 163_840, OnOverflow::Cap).unwrap();
        assert_eq!(s.max_seq_len, 7616);
        assert_eq!(s.capped_from, Some(163_840));
        // Not even one block: nothing to cap to.
        assert!(size(V3_BLOCK_F32, 1000, 100, OnOverflow::Cap).is_err());
    }

    #[test]
    fn automatic_budget_fits_one_sequence_within_the_limit() {
        // v3-slice: 3 layers; its full 163840-token context needs 1.13 GB of f32, more than the
        // old fixed 1 GiB.
        let block = 3 * 64 * 576 * 4;
        let budget = auto_budget(block, 163_840, Some(64 << 30));
        assert_eq!(budget, 2560 * block);
        assert!(size(block, budget, 163_840, OnOverflow::Refuse).is_ok());
        // Small contexts keep the floor; a small machine bounds it.
        assert_eq!(auto_budget(block, 4096, None), AUTO_MIN_BYTES);
        assert_eq!(auto_budget(block, 163_840, Some(1 << 30)), 1 << 29);
    }

    #[test]
    fn parses_quantities() {
        assert_eq!(parse_bytes("8Gi").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("8GB").is_err());
        assert!(parse_bytes("lots").is_err());
    }
}
