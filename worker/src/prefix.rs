//! Keys and verification of the prefix cache (DESIGN.md §2, the paged latent cache).
//!
//! A full block of [`BLOCK_TOKENS`] prompt tokens is registered under a *block key*, a hash of
//! its parent's key and its token ids. The chain starts at a *root key* derived from the
//! request's `cache_salt`, so requests with different salts never meet in the index (vLLM's
//! `cache_salt`: tenants that must not share a cache, and cannot probe each other's prompts by
//! timing, never do).
//!
//! A key is only an index, never a proof. Before a cached block is used, [`PrefixIndex::lookup`]
//! checks that it holds exactly the tokens asked for, and that its parent is exactly the block
//! the caller already verified (block id *and* generation, so a parent that was evicted and
//! reused invalidates its children). A hit is therefore exact whatever the key function: a
//! collision, accidental or engineered (CVE-2025-25183 was a predictable-hash collision in
//! vLLM's prefix cache), costs a miss and nothing else.
//!
//! The key function is a pure function of bytes with a fixed layout, identical in every process
//! and across restarts, so that a cache-aware router can predict hits:
//! - root: `SHA-256("shardseek/prefix-cache/v1" ‖ 0x00)` without a salt,
//!   `SHA-256("shardseek/prefix-cache/v1" ‖ 0x01 ‖ salt bytes)` with one;
//! - block: `SHA-256(parent key ‖ token ids as little-endian u32)`.

use crate::kv::BLOCK_TOKENS;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A block's key: 32 bytes, the width of SHA-256.
pub type BlockKey = [u8; 32];

/// Computes a block's key from its parent's key and its token ids. Pluggable so that a test can
/// inject a deliberately weak function and show that collisions never serve wrong KV.
pub type BlockKeyFn = fn(&BlockKey, &[u32]) -> BlockKey;

/// The block key functions a deployment can choose (`--prefix-cache-hash`). Both are verified
/// on every hit, so neither can serve another prompt's KV; they differ in what a collision can
/// cost (a miss, or a deliberately aimed eviction) and in speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefixHash {
    /// SHA-256: collision-resistant; the default.
    #[default]
    Sha256,
    /// 64-bit FNV-1a, the key of earlier releases: cheaper, collidable by construction. Kept
    /// for measuring the cost of SHA-256 against it in the same run.
    Fnv1a64,
}

impl PrefixHash {
    /// The key function of this choice.
    pub fn key_fn(self) -> BlockKeyFn {
        match self {
            Self::Sha256 => sha256_block_key,
            Self::Fnv1a64 => fnv1a64_block_key,
        }
    }
}

impl std::str::FromStr for PrefixHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sha256" => Ok(Self::Sha256),
            "fnv1a64" => Ok(Self::Fnv1a64),
            other => Err(format!(
                "prefix cache hash {other:?} is not one of sha256, fnv1a64"
            )),
        }
    }
}

/// The root of a request's key chain, from its optional salt. Always SHA-256, whatever the block
/// key function, because the index also compares roots when it verifies a first block.
pub fn root_key(salt: Option<&str>) -> BlockKey {
    let mut h = Sha256::new();
    h.update(b"shardseek/prefix-cache/v1");
    match salt {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            h.update(s.as_bytes());
        }
    }
    h.finalize().into()
}

/// SHA-256 of the parent key and the token ids (little-endian u32).
pub fn sha256_block_key(parent: &BlockKey, tokens: &[u32]) -> BlockKey {
    let mut bytes = [0u8; BLOCK_TOKENS * 4];
    let n = tokens.len().min(BLOCK_TOKENS);
    for (dst, t) in bytes.chunks_exact_mut(4).zip(&tokens[..n]) {
        dst.copy_from_slice(&t.to_le_bytes());
    }
    let mut h = Sha256::new();
    h.update(parent);
    h.update(&bytes[..n * 4]);
    if tokens.len() > n {
        for t in &tokens[n..] {
            h.update(t.to_le_bytes());
        }
    }
    h.finalize().into()
}

/// 64-bit FNV-1a of the parent key and the token ids, widened to a [`BlockKey`].
pub fn fnv1a64_block_key(parent: &BlockKey, tokens: &[u32]) -> BlockKey {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    parent[..8].iter().for_each(|&b| eat(b));
    for &t in tokens {
        t.to_le_bytes().into_iter().for_each(&mut eat);
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&h.to_le_bytes());
    key
}

/// What a registered block must be preceded by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parent {
    /// The first block of a chain: the chain's root key (the salt).
    Root(BlockKey),
    /// The block before it, as it was when this one was registered.
    Block { id: u32, generation: u64 },
}

#[derive(Clone, Debug)]
struct Registered {
    key: BlockKey,
    parent: Parent,
    tokens: Box<[u32]>,
}

/// Where a sequence's verified prefix chain stands: the key and identity of its last block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLink {
    key: BlockKey,
    parent: Parent,
}

impl ChainLink {
    /// The start of a chain for requests with this salt.
    pub fn root(salt: Option<&str>) -> Self {
        let key = root_key(salt);
        Self {
            key,
            parent: Parent::Root(key),
        }
    }
}

/// The index of registered blocks of one pool: key → block, and what each block holds.
pub struct PrefixIndex {
    key_fn: BlockKeyFn,
    by_key: HashMap<BlockKey, u32>,
    registered: Vec<Option<Registered>>,
    /// Bumped whenever a block is handed out anew, so that children registered against its
    /// old contents no longer verify.
    generation: Vec<u64>,
    /// Lookups whose key matched a block that failed verification.
    rejected: u64,
}

impl PrefixIndex {
    pub fn new(num_blocks: usize, key_fn: BlockKeyFn) -> Self {
        Self {
            key_fn,
            by_key: HashMap::new(),
            registered: vec![None; num_blocks],
            generation: vec![0; num_blocks],
            rejected: 0,
        }
    }

    /// Whether `block` is registered (and so must be kept as evictable, not freed).
    pub fn is_registered(&self, block: u32) -> bool {
        self.registered[block as usize].is_some()
    }

    /// Key matches that failed verification so far (collisions and stale children).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Forgets `block`'s registration because it is being handed out for new contents.
    pub fn recycle(&mut self, block: u32) {
        if let Some(r) = self.registered[block as usize].take()
            && self.by_key.get(&r.key) == Some(&block)
        {
            self.by_key.remove(&r.key);
        }
        self.generation[block as usize] += 1;
    }

    /// The next link of a chain whose last verified link is `at`, for `tokens`: the cached
    /// block holding exactly these tokens after exactly that parent, if any.
    pub fn lookup(&mut self, at: &ChainLink, tokens: &[u32]) -> Option<(u32, ChainLink)> {
        let key = (self.key_fn)(&at.key, tokens);
        let &b = self.by_key.get(&key)?;
        let r = self.registered[b as usize].as_ref()?;
        if r.parent != at.parent || *r.tokens != *tokens {
            self.rejected += 1;
            return None;
        }
        Some((b, self.link_of(b, key)))
    }

    fn link_of(&self, block: u32, key: BlockKey) -> ChainLink {
        ChainLink {
            key,
            parent: Parent::Block {
                id: block,
                generation: self.generation[block as usize],
            },
        }
    }

    /// Registers `block`, now full with `tokens` after the chain link `at`, and returns the link
    /// that follows it. A key already taken by another block stays with that block.
    pub fn register(&mut self, at: &ChainLink, block: u32, tokens: &[u32]) -> ChainLink {
        let key = (self.key_fn)(&at.key, tokens);
        if self.registered[block as usize].is_none() {
            let taken = self.by_key.get(&key).is_some_and(|&other| {
                // A stale holder (its parent was recycled) gives way to a verifiable block.
                self.registered[other as usize]
                    .as_ref()
                    .is_some_and(|r| self.parent_live(&r.parent))
            });
            if !taken {
                if let Some(&other) = self.by_key.get(&key) {
                    self.registered[other as usize] = None;
                }
                self.by_key.insert(key, block);
                self.registered[block as usize] = Some(Registered {
                    key,
                    parent: at.parent,
                    tokens: tokens.into(),
                });
            }
        }
        self.link_of(block, key)
    }

    fn parent_live(&self, p: &Parent) -> bool {
        match *p {
            Parent::Root(_) => true,
            Parent::Block { id, generation } => self.generation[id as usize] == generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_across_processes_and_releases() {
        // Pinned bytes: a change of the key layout must be deliberate (it invalidates every
        // prediction a cache-aware router makes).
        let root = root_key(None);
        let k = sha256_block_key(&root, &(0..64).collect::<Vec<u32>>());
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut h = Sha256::new();
        h.update(b"shardseek/prefix-cache/v1\x00");
        assert_eq!(root, <[u8; 32]>::from(h.finalize()));
        let mut h = Sha256::new();
        h.update(root);
        for t in 0u32..64 {
            h.update(t.to_le_bytes());
        }
        assert_eq!(hex(&k), hex(&h.finalize()));
        assert_ne!(root_key(Some("a")), root_key(None));
        assert_ne!(root_key(Some("a")), root_key(Some("b")));
    }

    #[test]
    fn a_colliding_key_function_costs_a_miss_not_wrong_blocks() {
        fn constant(_: &BlockKey, _: &[u32]) -> BlockKey {
            [7; 32]
        }
        let mut ix = PrefixIndex::new(4, constant);
        let root = ChainLink::root(None);
        let a: Vec<u32> = (0..64).collect();
        let b: Vec<u32> = (100..164).collect();
        ix.register(&root, 0, &a);
        assert!(
            ix.lookup(&root, &b).is_none(),
            "different tokens must not hit"
        );
        assert_eq!(ix.rejected(), 1);
        assert_eq!(ix.lookup(&root, &a).map(|x| x.0), Some(0));
        // Same tokens under another salt: the root differs, so no hit either.
        assert!(ix.lookup(&ChainLink::root(Some("t")), &a).is_none());
    }

    #[test]
    fn children_of_a_recycled_parent_no_longer_verify() {
        let mut ix = PrefixIndex::new(4, sha256_block_key);
        let root = ChainLink::root(None);
        let a: Vec<u32> = (0..64).collect();
        let b: Vec<u32> = (64..128).collect();
        let l0 = ix.register(&root, 0, &a);
        ix.register(&l0, 1, &b);
        let (b0, l0b) = ix.lookup(&root, &a).unwrap();
        assert_eq!(b0, 0);
        assert_eq!(ix.lookup(&l0b, &b).map(|x| x.0), Some(1));
        // Block 0 is recycled and registered again with the same tokens: a new generation.
        ix.recycle(0);
        let l0new = ix.register(&root, 0, &a);
        assert!(
            ix.lookup(&l0new, &b).is_none(),
            "a child registered against the old contents must not verify"
        );
    }
}
