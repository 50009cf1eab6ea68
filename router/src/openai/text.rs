//! Incremental detokenisation and stop-string matching: the text of a stream is released only
//! as complete UTF-8 and never shows a stop string or the beginning of one.

use super::backend::TextCodec;

/// Turns a growing list of token ids into text pieces, each complete UTF-8.
///
/// Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and
/// decoding the whole list each step is quadratic, so, as Hugging Face TGI does, it decodes a
/// window `ids[prefix..]` and emits what it adds past `ids[prefix..read]` once the new text does
/// not end in U+FFFD (the replacement character of an incomplete sequence).
#[derive(Debug)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special: bool,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new(true)
    }
}

impl IncrementalDecoder {
    /// A decoder that drops special tokens (`skip_special_tokens`) or keeps their text.
    pub fn new(skip_special: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special,
        }
    }

    /// Adds one token; returns the text it completes (often empty while a character is split).
    pub fn push(&mut self, codec: &dyn TextCodec, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let prefix_text = codec.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let new_text = codec.decode(&self.ids[self.prefix..], self.skip_special)?;
        if new_text.len() > prefix_text.len()
            && !new_text.ends_with('\u{FFFD}')
            && let Some(piece) = new_text.get(prefix_text.len()..)
        {
            let piece = piece.to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// The text not yet released (at the end of a generation: an incomplete character comes out
    /// as U+FFFD rather than being lost).
    pub fn flush(&mut self, codec: &dyn TextCodec) -> Result<String, String> {
        let prefix_text = codec.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let new_text = codec.decode(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(new_text
            .get(prefix_text.len()..)
            .map(str::to_string)
            .unwrap_or_default())
    }
}

/// Holds back text that may be the start of a stop string and finds the first full match.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    /// `include_stop_str_in_output`: the matched stop string ends the released text.
    include: bool,
}

/// What [`StopMatcher::push`] releases.
#[derive(Debug, PartialEq)]
pub struct Released {
    /// Text safe to send (before any stop string).
    pub text: String,
    /// A stop string was found: generation must end, `text` ends right before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            include: false,
        }
    }

    /// Keep the stop string that matched at the end of the text (vLLM's
    /// `include_stop_str_in_output`).
    pub fn including_stop(mut self, include: bool) -> Self {
        self.include = include;
        self
    }

    pub fn push(&mut self, text: &str) -> Released {
        self.pending.push_str(text);
        // Matches can only start in `pending`: any earlier text was released because no suffix
        // of it began a stop string.
        if let Some((pos, len)) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s).map(|p| (p, s.len())))
            .min()
        {
            let end = if self.include { pos + len } else { pos };
            let text = self.pending[..end].to_string();
            self.pending.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let hold = self.held_back_len();
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Everything held back (the generation ended without completing a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_back_len(&self) -> usize {
        let p = self.pending.as_bytes();
        let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        (1..=longest.min(p.len()))
            .rev()
            .find(|&k| {
                self.pending.is_char_boundary(p.len() - k)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.len() > k && s.as_bytes()[..k] == p[p.len() - k..])
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::backend::TemplateOptions;

    /// Token id = byte value.
    struct Bytes;
    impl TextCodec for Bytes {
        fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>, String> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32], _: bool) -> Result<String, String> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
        fn apply_chat_template(
            &self,
            _: &[serde_json::Value],
            _: &TemplateOptions,
        ) -> Result<String, String> {
            Err("none".into())
        }
    }

    #[test]
    fn releases_only_complete_characters() {
        let text = "aé€😀b";
        let mut d = IncrementalDecoder::default();
        let mut out = Vec::new();
        for b in text.bytes() {
            out.push(d.push(&Bytes, u32::from(b)).unwrap());
        }
        assert!(out.iter().all(|p| !p.contains('\u{FFFD}')));
        assert_eq!(out.concat(), text);
        assert_eq!(out.iter().filter(|p| !p.is_empty()).count(), 5);
        assert_eq!(d.flush(&Bytes).unwrap(), "");
    }

    #[test]
    fn flush_releases_a_dangling_byte() {
        let mut d = IncrementalDecoder::default();
        assert_eq!(d.push(&Bytes, u32::from(b'x')).unwrap(), "x");
        assert_eq!(d.push(&Bytes, 0xE2).unwrap(), "");
        assert_eq!(d.flush(&Bytes).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut m = StopMatcher::new(vec!["END".into(), "xyz".into()]);
        assert_eq!(m.push("abc E").text, "abc ");
        assert_eq!(m.push("N").text, "");
        let r = m.push("Dtail");
        assert_eq!(
            r,
            Released {
                text: "".into(),
                stopped: true
            }
        );
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("E").text, "");
        assert_eq!(m.push("X").text, "EX");
        assert_eq!(m.push("EN").text, "");
        assert_eq!(m.flush(), "EN");
        let mut m = StopMatcher::new(vec!["END".into()]).including_stop(true);
        assert_eq!(m.push("abEN").text, "ab");
        let r = m.push("Dx");
        assert_eq!((r.text.as_str(), r.stopped), ("END", true));
        // The earliest of two matches wins.
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        let r = m.push("xxabx");
        assert_eq!(r.text, "xx");
        assert!(r.stopped);
    }
}
