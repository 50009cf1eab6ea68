//! The paged latent KV cache (DESIGN.md §2): a pool of blocks of [`BLOCK_TOKENS`] tokens; each
//! token holds, per layer, MLA's normalised latent and rotated rope key (`latent_dim` f32).
//! Sequences own a page table of block ids.
//!
//! Prefix caching: a block that is full is registered in a [`PrefixIndex`] under a key chained
//! from the request's salt and the blocks before it (see `prefix` for the keys and why a hit is
//! verified). A new sequence whose prompt starts with the same tokens, under the same salt,
//! shares those blocks (reference counted) and skips their prefill. Unreferenced registered
//! blocks stay cached (and count as available) until the pool needs them, oldest first.

use crate::error::{Error, Result};
use crate::prefix::{BlockKeyFn, ChainLink, PrefixIndex, sha256_block_key};
use std::collections::VecDeque;

/// Tokens per block: FlashMLA's page size, and what the kernels' paged decode expects.
pub const BLOCK_TOKENS: usize = 64;

/// Block pool shared by every sequence of one attention pod.
pub struct KvPool {
    latent_dim: usize,
    /// `storage[layer]` is `[num_blocks][BLOCK_TOKENS][latent_dim]`.
    storage: Vec<Vec<f32>>,
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
    /// A pool of `num_blocks` blocks for a model with `layers` layers.
    pub fn new(layers: usize, latent_dim: usize, num_blocks: usize) -> Self {
        Self::with_key_fn(layers, latent_dim, num_blocks, sha256_block_key)
    }

    /// A pool whose prefix index keys blocks with `key_fn`.
    pub fn with_key_fn(
        layers: usize,
        latent_dim: usize,
        num_blocks: usize,
        key_fn: BlockKeyFn,
    ) -> Self {
        Self {
            latent_dim,
            storage: (0..layers)
                .map(|_| vec![0f32; num_blocks * BLOCK_TOKENS * latent_dim])
                .collect(),
            refcount: vec![0; num_blocks],
            index: PrefixIndex::new(num_blocks, key_fn),
            free: (0..num_blocks as u32).rev().collect(),
            evictable: VecDeque::new(),
            prefix_hits: 0,
        }
    }

    /// A pool sized to a memory budget in bytes.
    pub fn with_budget(layers: usize, latent_dim: usize, bytes: usize) -> Self {
        let per_block = layers * BLOCK_TOKENS * latent_dim * 4;
        Self::new(layers, latent_dim, (bytes / per_block.max(1)).max(1))
    }

    pub fn latent_dim(&self) -> usize {
        self.latent_dim
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

    /// Writes one token's entry for `layer` at position `pos` of `cache`.
    pub(crate) fn write(&mut self, layer: usize, cache: &SeqCache, pos: usize, entry: &[f32]) {
        let ld = self.latent_dim;
        let b = cache.blocks[pos / BLOCK_TOKENS] as usize;
        let off = (b * BLOCK_TOKENS + pos % BLOCK_TOKENS) * ld;
        self.storage[layer][off..off + ld].copy_from_slice(entry);
    }

    /// The storage of one layer, `[num_blocks][BLOCK_TOKENS][latent_dim]`.
    pub fn layer(&self, layer: usize) -> &[f32] {
        &self.storage[layer]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release_returns_every_block() {
        let mut p = KvPool::new(2, 8, 10);
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
        let mut p = KvPool::new(1, 4, 8);
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
        let mut p = KvPool::new(1, 4, 16);
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
        let mut p = KvPool::with_key_fn(1, 4, 16, weak);
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
