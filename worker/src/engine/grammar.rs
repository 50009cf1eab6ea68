//! Grammar-constrained decoding with llguidance (the library vLLM and SGLang use): JSON schemas
//! (`response_format`), regular expressions, and Lark grammars (the router writes one for
//! forced tool calls). A [`GrammarCompiler`] is built once per engine from the checkpoint's
//! `tokenizer.json`; each constrained request gets a [`Grammar`] that yields the set of allowed
//! next tokens and follows the tokens actually chosen.
//!
//! Cost: computing a mask walks the token trie (O(vocab) in the worst case, far less in
//! practice). The scheduler computes the masks of a step on another thread while the forward
//! pass runs, so the step only waits for what the forward pass did not hide; both times are
//! counted in the engine's statistics (`shardseek_grammar_mask_seconds_total`).

use crate::error::{Error, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::path::Path;
use std::sync::Arc;
use toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};

/// What a request is constrained to: the router's types, shared so the two crates cannot drift
/// apart.
pub use shardseek_router::openai::backend::{Constraint, ConstraintKind};

/// Compiles constraints for one tokenizer; shared by every request of an engine.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

/// Largest grammar source accepted: schemas of real APIs are a few KiB; this bounds compile time.
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;

impl GrammarCompiler {
    /// Builds the token trie from `tokenizer.json` (byte-level BPE and special tokens) for a
    /// model of `vocab_size` ids (ids past the tokenizer's are never allowed) ending on `eos`.
    pub fn from_tokenizer_file(path: &Path, vocab_size: usize, eos: &[u32]) -> Result<Self> {
        let text = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|source| Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| Error::Grammar(format!("{}: {e}", path.display())))?;
        if words.len() > vocab_size {
            return Err(Error::Grammar(format!(
                "{}: {} tokens exceed the model's vocab_size {vocab_size}",
                path.display(),
                words.len()
            )));
        }
        words.resize(vocab_size, Vec::new());
        let first_eos = *eos
            .first()
            .ok_or_else(|| Error::Grammar("the model has no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&(env as toktrie::TokEnv))
            .map_err(|e| Error::Grammar(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `c` into a fresh matcher; errors name what is wrong with the grammar or schema.
    pub fn compile(&self, c: &Constraint) -> Result<Grammar> {
        let grammar = match &c.kind {
            ConstraintKind::JsonSchema(s) | ConstraintKind::Regex(s) | ConstraintKind::Lark(s)
                if s.len() > MAX_GRAMMAR_BYTES =>
            {
                return Err(Error::Grammar(format!(
                    "the grammar is {} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
                    s.len()
                )));
            }
            ConstraintKind::JsonSchema(s) => {
                let mut schema: serde_json::Value = serde_json::from_str(s)
                    .map_err(|e| Error::Grammar(format!("JSON schema is not JSON: {e}")))?;
                // Compact separators and no free whitespace: a model cannot pad the answer
                // with whitespace until it runs out of tokens.
                if let Some(obj) = schema.as_object_mut()
                    && !obj.contains_key("x-guidance")
                {
                    obj.insert(
                        "x-guidance".into(),
                        serde_json::json!({
                            "whitespace_flexible": false,
                            "item_separator": ", ",
                            "key_separator": ": ",
                        }),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            ConstraintKind::Regex(r) => TopLevelGrammar::from_regex(r),
            ConstraintKind::Lark(l) => TopLevelGrammar::from_lark(l.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| Error::Grammar(e.to_string()))?;
        Ok(Grammar {
            matcher: Matcher::new(Ok(parser)),
            start_after: c.start_after,
            started: c.start_after.is_none(),
        })
    }
}

/// One request's constraint as generation proceeds.
pub struct Grammar {
    matcher: Matcher,
    start_after: Option<u32>,
    started: bool,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("started", &self.started)
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Grammar {
    /// The allowed next tokens; None while the constraint has not started. Once the grammar is
    /// complete only end-of-sequence tokens are allowed.
    pub fn mask(&mut self) -> Result<Option<SimpleVob>> {
        if !self.started {
            return Ok(None);
        }
        self.matcher
            .compute_mask_or_eos()
            .map(Some)
            .map_err(|e| Error::Grammar(e.to_string()))
    }

    /// Follows the token that was chosen.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        if !self.started {
            self.started = self.start_after == Some(token);
            return Ok(());
        }
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Grammar(e.to_string()))
    }

    /// The grammar is complete: nothing but end-of-sequence may follow.
    pub fn is_finished(&self) -> bool {
        self.started && self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level tokenizer.json over single bytes plus two special tokens.
    fn compiler() -> (tempfile::TempDir, GrammarCompiler) {
        let chars = crate::modelgen::bpe::byte_chars();
        let mut vocab = serde_json::Map::new();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), serde_json::json!(i));
        }
        let tj = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 256, "content": "<eos>", "special": true, "single_word": false,
                 "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 257, "content": "<call>", "special": true, "single_word": false,
                 "lstrip": false, "rstrip": false, "normalized": false},
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "vocab": vocab, "merges": []},
        });
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, tj.to_string()).unwrap();
        let c = GrammarCompiler::from_tokenizer_file(&p, 260, &[256]).unwrap();
        (dir, c)
    }

    fn allowed(m: &SimpleVob) -> Vec<u32> {
        (0..260u32).filter(|&t| m.is_allowed(t)).collect()
    }

    #[test]
    fn regex_masks_then_ends() {
        let (_d, c) = compiler();
        let mut g = c
            .compile(&Constraint {
                kind: ConstraintKind::Regex("ab".into()),
                start_after: None,
            })
            .unwrap();
        assert_eq!(allowed(&g.mask().unwrap().unwrap()), vec![b'a' as u32]);
        g.accept(b'a' as u32).unwrap();
        assert_eq!(allowed(&g.mask().unwrap().unwrap()), vec![b'b' as u32]);
        g.accept(b'b' as u32).unwrap();
        assert_eq!(allowed(&g.mask().unwrap().unwrap()), vec![256]);
    }

    #[test]
    fn starts_after_the_marker_token() {
        let (_d, c) = compiler();
        let mut g = c
            .compile(&Constraint {
                kind: ConstraintKind::Regex("x".into()),
                start_after: Some(257),
            })
            .unwrap();
        assert!(g.mask().unwrap().is_none());
        g.accept(b'q' as u32).unwrap();
        assert!(g.mask().unwrap().is_none());
        g.accept(257).unwrap();
        assert_eq!(allowed(&g.mask().unwrap().unwrap()), vec![b'x' as u32]);
    }

    #[test]
    fn lark_with_special_token_and_json() {
        let (_d, c) = compiler();
        let lark = "start: <[257]> \"f\" args\nargs: %json {\"type\": \"boolean\"}\n";
        let mut g = c
            .compile(&Constraint {
                kind: ConstraintKind::Lark(lark.into()),
                start_after: None,
            })
            .unwrap();
        assert_eq!(allowed(&g.mask().unwrap().unwrap()), vec![257]);
        for t in [
            257,
            b'f' as u32,
            b't' as u32,
            b'r' as u32,
            b'u' as u32,
            b'e' as u32,
        ] {
            g.accept(t).unwrap();
        }
        assert!(g.is_finished() || allowed(&g.mask().unwrap().unwrap()) == vec![256]);
    }

    #[test]
    fn bad_schema_is_an_error() {
        let (_d, c) = compiler();
        let e = c
            .compile(&Constraint {
                kind: ConstraintKind::JsonSchema("{not json".into()),
                start_after: None,
            })
            .unwrap_err();
        assert!(e.to_string().contains("JSON schema"), "{e}");
    }
}
