//! The paged latent KV cache (DESIGN.md §2, §5): a pool of blocks of [`BLOCK_TOKENS`] tokens;
//! each token holds, per layer, MLA's normalised latent and rotated rope key (`latent_dim`
//! values) in the pool's [`KvDtype`]: f32 (exact; what the reference tests use), bf16 (the
//! default: half the bytes, ~3 significant digits, well inside the model's own bf16 noise) or
//! fp8 e4m3 with one f32 scale per token (a quarter of f32, plus 4 bytes per token).
//! Sequences own a page table of block ids.
//!
//! Prefix caching: a block that is full is registered in a [`PrefixIndex`] under a key chained
//! from the request's salt and the blocks before it (see `prefix` for the keys and why a hit is
//! verified). A new sequence whose prompt starts with the same tokens, under the same salt,
//! shares those blocks (reference counted) and skips their prefill. Unreferenced registered
//! blocks stay cached (and count as available) until the pool needs them, oldest first.

use crate::error::{Error, Result};
use crate::prefix::{BlockKeyFn, ChainLink, PrefixIndex, sha256_block_key};
use shardseek_kernels::fp8::f32_to_bf16;
use shardseek_kernels::mla::{CacheData, LatentCache, MLA_BLOCK, quantize_token_fp8};
use std::collections::VecDeque;

/// Tokens per block: FlashMLA's page size, and what the kernels' paged decode expects.
pub const BLOCK_TOKENS: usize = MLA_BLOCK;

/// Element type of the latent cache (`--kv-cache-dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    #[default]
    Bf16,
    /// e4m3 codes with one f32 scale per token.
    Fp8,
}

impl KvDtype {
    /// Bytes one token's entry of `latent_dim` values takes in one layer.
    pub fn token_bytes(self, latent_dim: usize) -> usize {
        match self {
            Self::F32 => latent_dim * 4,
            Self::Bf16 => latent_dim * 2,
            Self::Fp8 => latent_dim + 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" | "auto" => Ok(Self::Bf16),
            "fp8" | "fp8_e4m3" => Ok(Self::Fp8),
            _ => Err(Error::Input(format!(
                "kv cache dtype `{s}`: expected f32, bf16 or fp8"
            ))),
        }
    }
}

/// Shape of the latent cache of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_lora_rank: usize,
    pub rope_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }

    /// Bytes of one block across all layers.
    pub fn block_bytes(&self) -> usize {
        self.layers * BLOCK_TOKENS * self.dtype.token_bytes(self.latent_dim())
    }
}

/// One layer's storage, `[num_blocks][BLOCK_TOKENS][latent_dim]` in the pool's dtype.
enum LayerStore {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Fp8 { q: Vec<u8>, scale: Vec<f32> },
}

/// Block pool shared by every sequence of one attention pod.
pub struct KvPool {
    layout: KvLayout,
    latent_dim: usize,
    storage: Vec<LayerStore>,
    refcount: Vec<u32>,
    /// Registered (full, immutable, verifiable) blocks and their keys.
    index: PrefixIndex,
    free: Vec<u32>,
    /// Registered blocks nobody references, least recently released first.
    evictable: VecDeque<u32>,
    prefix_hits: u64,
}

/// One sequence's view of the pool: its page table and cached length.
#[derive(Clone, Debug, Default)]
pub struct SeqCache {
    pub(crate) blocks: Vec<u32>,
    pub(crate) len: usize,
    /// Where this sequence's key chain starts (its salt); `None`: never registered.
    root: Option<ChainLink>,
    /// Chain links of this sequence's full blocks, registered or verified.
    links: Vec<ChainLink>,
}

impl SeqCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

impl KvPool {
    /// A pool of `num_blocks` blocks.
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        Self::with_key_fn(layout, num_blocks, sha256_block_key)
    }

    /// A pool whose prefix index keys blocks with `key_fn`.
    pub fn with_key_fn(layout: KvLayout, num_blocks: usize, key_fn: BlockKeyFn) -> Self {
        let latent_dim = layout.latent_dim();
        let n = num_blocks * BLOCK_TOKENS * latent_dim;
        Self {
            layout,
            latent_dim,
            storage: (0..layout.layers)
                .map(|_| match layout.dtype {
                    KvDtype::F32 => LayerStore::F32(vec![0f32; n]),
                    KvDtype::Bf16 => LayerStore::Bf16(vec![0u16; n]),
                    KvDtype::Fp8 => LayerStore::Fp8 {
                        q: vec![0u8; n],
                        scale: vec![0f32; num_blocks * BLOCK_TOKENS],
                    },
                })
                .collect(),
            refcount: vec![0; num_blocks],
            index: PrefixIndex::new(num_blocks, key_fn),
            free: (0..num_blocks as u32).rev().collect(),
            evictable: VecDeque::new(),
            prefix_hits: 0,
        }
    }

    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }
    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }
    /// Fraction of blocks referenced by live sequences.
    pub fn usage(&self) -> f64 {
        1.0 - self.available() as f64 / self.num_blocks().max(1) as f64
    }
    /// Prompt blocks served from the prefix cache so far.
    pub fn prefix_hits(&self) -> u64 {
        self.prefix_hits
    }
    /// Key matches refused by verification so far (collisions, stale entries).
    pub fn prefix_rejected(&self) -> u64 {
        self.index.rejected()
    }

    /// Blocks needed to grow `cache` to `len` tokens.
    pub fn blocks_needed(&self, cache: &SeqCache, len: usize) -> usize {
        len.div_ceil(BLOCK_TOKENS)
            .saturating_sub(cache.blocks.len())
    }

    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => self.evictable.pop_front()?,
        };
        self.index.recycle(b);
        Some(b)
    }

    /// Grows `cache`'s page table to hold `len` tokens.
    pub fn reserve(&mut self, cache: &mut SeqCache, len: usize) -> Result<()> {
        let need = self.blocks_needed(cache, len);
        if need > self.available() {
            return Err(Error::Input(format!(
                "KV cache full: need {need} blocks, {} available",
                self.available()
            )));
        }
        for _ in 0..need {
            let b = self
                .take_block()
                .ok_or_else(|| Error::Input("KV cache full".into()))?;
            self.refcount[b as usize] = 1;
            cache.blocks.push(b);
        }
        Ok(())
    }

    /// Starts a sequence for `prompt` under `salt`, sharing cached full blocks of its prefix
    /// that verify (same tokens after the same verified parent). At least one prompt token is
    /// always left to compute, so the step yields logits.
    pub fn start_with_prefix(&mut self, prompt: &[u32], salt: Option<&str>) -> SeqCache {
        let mut at = ChainLink::root(salt);
        let mut cache = SeqCache {
            root: Some(at),
            ..SeqCache::default()
        };
        let max_blocks = prompt.len().saturating_sub(1) / BLOCK_TOKENS;
        for i in 0..max_blocks {
            let chunk = &prompt[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
            let Some((b, link)) = self.index.lookup(&at, chunk) else {
                break;
            };
            if self.refcount[b as usize] == 0 {
                self.evictable.retain(|&x| x != b);
            }
            self.refcount[b as usize] += 1;
            cache.blocks.push(b);
            cache.links.push(link);
            cache.len += BLOCK_TOKENS;
            self.prefix_hits += 1;
            at = link;
        }
        cache
    }

    /// Starts a sequence that reads nothing from the cache (its prompt is computed in full) but
    /// registers its full blocks under `salt` for later requests.
    pub fn start_cold(&mut self, salt: Option<&str>) -> SeqCache {
        SeqCache {
            root: Some(ChainLink::root(salt)),
            ..SeqCache::default()
        }
    }

    /// Registers the sequence's newly filled blocks; `tokens` are all tokens cached so far
    /// (`tokens.len() == cache.len`). A sequence started without a root registers nothing.
    pub fn register_full_blocks(&mut self, cache: &mut SeqCache, tokens: &[u32]) {
        let Some(root) = cache.root else {
            return;
        };
        let full = cache.len.min(tokens.len()) / BLOCK_TOKENS;
        while cache.links.len() < full {
            let i = cache.links.len();
            let at = cache.links.last().copied().unwrap_or(root);
            let link = self.index.register(
                &at,
                cache.blocks[i],
                &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS],
            );
            cache.links.push(link);
        }
    }

    /// Returns a sequence's blocks to the pool.
    pub fn release(&mut self, cache: &mut SeqCache) {
        for b in cache.blocks.drain(..) {
            let rc = &mut self.refcount[b as usize];
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                if self.index.is_registered(b) {
                    self.evictable.push_back(b);
                } else {
                    self.free.push(b);
                }
            }
        }
        cache.len = 0;
        cache.links.clear();
    }

    /// Writes the entries of consecutive tokens (`entries` is `[n, latent_dim]`) for `layer`
    /// at positions `start..start+n` of `cache`, whose blocks must be reserved.
    pub(crate) fn write_tokens(
        &mut self,
        layer: usize,
        cache: &SeqCache,
        start: usize,
        entries: &[f32],
    ) -> Result<()> {
        let ld = self.latent_dim;
        let n = entries.len() / ld;
        if (start + n).div_ceil(BLOCK_TOKENS) > cache.blocks.len() {
            return Err(Error::Input(format!(
                "KV write of positions {start}..{} beyond the {} reserved blocks",
                start + n,
                cache.blocks.len()
            )));
        }
        let store = &mut self.storage[layer];
        for (i, e) in entries.chunks_exact(ld).enumerate() {
            let pos = start + i;
            let slot =
                cache.blocks[pos / BLOCK_TOKENS] as usize * BLOCK_TOKENS + pos % BLOCK_TOKENS;
            let off = slot * ld;
            match store {
                LayerStore::F32(d) => d[off..off + ld].copy_from_slice(e),
                LayerStore::Bf16(d) => {
                    for (o, &v) in d[off..off + ld].iter_mut().zip(e) {
                        *o = f32_to_bf16(v);
                    }
                }
                LayerStore::Fp8 { q, scale } => {
                    scale[slot] = quantize_token_fp8(e, &mut q[off..off + ld]);
                }
            }
        }
        Ok(())
    }

    /// One layer of the pool as the MLA kernels read it.
    pub fn latent_cache(&self, layer: usize) -> Result<LatentCache<'_>> {
        let data = match &self.storage[layer] {
            LayerStore::F32(d) => CacheData::F32(d),
            LayerStore::Bf16(d) => CacheData::Bf16(d),
            LayerStore::Fp8 { q, scale } => CacheData::Fp8 { q, scale },
        };
        Ok(LatentCache::new(
            data,
            self.layout.kv_lora_rank,
            self.layout.rope_dim,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(layers: usize, dtype: KvDtype) -> KvLayout {
        KvLayout {
            layers,
            kv_lora_rank: 16,
            rope_dim: 4,
            dtype,
        }
    }

    #[test]
    fn entries_round_trip_in_every_dtype_and_budget_counts_the_dtype() {
        let entry: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        for (dtype, tol) in [
            (KvDtype::F32, 0.0),
            (KvDtype::Bf16, 1.0 / 128.0),
            (KvDtype::Fp8, 1.0 / 8.0),
        ] {
            let lay = layout(2, dtype);
            let mut p = KvPool::new(lay, 4);
            let mut c = SeqCache::default();
            p.reserve(&mut c, 70).unwrap();
            p.write_tokens(1, &c, 63, &entry).unwrap();
            let lc = p.latent_cache(1).unwrap();
            for (k, pos) in [63, 64].into_iter().enumerate() {
                let got = lc.token(c.blocks(), pos);
                for (g, w) in got.iter().zip(&entry[k * 20..(k + 1) * 20]) {
                    // Relative to the token's largest value for fp8 (per-token scale).
                    assert!((g - w).abs() <= tol * 3.0, "{dtype:?}: {g} vs {w}");
                }
            }
            assert!(
                p.write_tokens(0, &c, 127, &entry).is_err(),
                "beyond reserved blocks"
            );
            let per_block = 2 * 64 * dtype.token_bytes(20);
            assert_eq!(lay.block_bytes(), per_block, "budget counts the dtype");
        }
        assert_eq!(
            KvDtype::Bf16.token_bytes(576) * 2,
            KvDtype::F32.token_bytes(576)
        );
        assert_eq!(KvDtype::Fp8.token_bytes(576), 580);
    }

    #[test]
    fn reserve_release_returns_every_block() {
        let mut p = KvPool::new(layout(2, KvDtype::F32), 10);
        let mut a = SeqCache::default();
        p.reserve(&mut a, 130).unwrap();
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(p.available(), 7);
        let mut b = SeqCache::default();
        assert!(
            p.reserve(&mut b, 64 * 8).is_err(),
            "over capacity must fail, not panic"
        );
        p.release(&mut a);
        assert_eq!(p.available(), 10);
    }

    #[test]
    fn prefix_blocks_are_shared_and_counted() {
        let mut p = KvPool::new(layout(1, KvDtype::Bf16), 8);
        let prompt: Vec<u32> = (0..150).collect();
        let mut a = p.start_with_prefix(&prompt, None);
        assert_eq!(a.len, 0);
        p.reserve(&mut a, prompt.len()).unwrap();
        a.len = prompt.len();
        p.register_full_blocks(&mut a, &prompt);
        let mut b = p.start_with_prefix(&prompt, None);
        assert_eq!(b.len, 128, "two full blocks shared");
        assert_eq!(p.prefix_hits(), 2);
        assert_eq!(&b.blocks[..2], &a.blocks[..2]);
        p.release(&mut a);
        p.release(&mut b);
        assert_eq!(p.available(), 8);
        // A prompt of exactly one block keeps its last token to compute.
        let one: Vec<u32> = (0..64).collect();
        assert_eq!(p.start_with_prefix(&one, None).len, 0);
        // Cached blocks are reused for new allocations when the free list runs dry.
        let mut c = SeqCache::default();
        p.reserve(&mut c, 8 * 64).unwrap();
        assert_eq!(
            p.start_with_prefix(&prompt, None).len,
            0,
            "evicted blocks no longer hit"
        );
    }

    #[test]
    fn salts_separate_the_cache_and_the_same_salt_shares_it() {
        let mut p = KvPool::new(layout(1, KvDtype::Bf16), 16);
        let prompt: Vec<u32> = (0..150).collect();
        let mut a = p.start_with_prefix(&prompt, Some("tenant-a"));
        p.reserve(&mut a, prompt.len()).unwrap();
        a.len = prompt.len();
        p.register_full_blocks(&mut a, &prompt);
        assert_eq!(p.start_with_prefix(&prompt, Some("tenant-b")).len, 0);
        assert_eq!(p.start_with_prefix(&prompt, None).len, 0);
        let b = p.start_with_prefix(&prompt, Some("tenant-a"));
        assert_eq!(b.len, 128);
        assert_eq!(p.prefix_hits(), 2);
    }

    #[test]
    fn a_weak_key_function_never_shares_different_prompts() {
        fn weak(_: &crate::prefix::BlockKey, t: &[u32]) -> crate::prefix::BlockKey {
            // Collides every prompt whose blocks have the same length and first token.
            let mut k = [0u8; 32];
            k[0] = t.len() as u8;
            k[1..5].copy_from_slice(&t[0].to_le_bytes());
            k
        }
        let mut p = KvPool::with_key_fn(layout(1, KvDtype::Bf16), 16, weak);
        let first: Vec<u32> = (0..150).collect();
        let mut second = first.clone();
        second[70] = 9999; // same first block, different second block, same key
        let mut a = p.start_with_prefix(&first, None);
        p.reserve(&mut a, first.len()).unwrap();
        a.len = first.len();
        p.register_full_blocks(&mut a, &first);
        let b = p.start_with_prefix(&second, None);
        assert_eq!(b.len, 64, "only the truly shared first block is reused");
        assert_eq!(p.prefix_rejected(), 1);
    }
}
