//! The DeepSeek-R1 reasoning parser (`--reasoning-parser deepseek-r1`): splits a reply into
//! `reasoning_content` (inside `<think>` … `</think>`) and `content` (after it), streaming.
//!
//! DeepSeek's templates open the thinking block in the prompt (R1: `<｜Assistant｜><think>\n`,
//! V3.1 with `thinking: true`: `<｜Assistant｜><think>`), so the reply usually starts inside it
//! and only `</think>` appears in the output; a reply that itself starts with `<think>` is
//! handled too. Text that may be the start of a tag is held back until it is decided, so no
//! chunk ever shows half a tag.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Which parsers exist (the `--reasoning-parser` values).
pub const PARSERS: &[&str] = &["deepseek-r1"];

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Not yet known whether the reply opens a thinking block.
    Start,
    Reasoning,
    Content,
}

/// Splits one reply's text as it streams.
#[derive(Clone, Debug)]
pub struct ReasoningSplitter {
    state: State,
    pending: String,
}

/// Text released by one [`ReasoningSplitter::push`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

/// Whether a rendered prompt leaves the model inside a thinking block.
pub fn prompt_opens_thinking(prompt: &str) -> bool {
    let t = prompt.trim_end_matches(['\n', ' ']);
    t.ends_with(OPEN)
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&k| {
            tag.is_char_boundary(k) && s.is_char_boundary(s.len() - k) && s.ends_with(&tag[..k])
        })
        .unwrap_or(0)
}

impl ReasoningSplitter {
    /// `in_thinking`: the prompt opened the thinking block.
    pub fn new(in_thinking: bool) -> Self {
        Self {
            state: if in_thinking {
                State::Reasoning
            } else {
                State::Start
            },
            pending: String::new(),
        }
    }

    /// Whether the reply has left (or never entered) the reasoning block.
    pub fn in_content(&self) -> bool {
        self.state == State::Content
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.pending.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Start => {
                    let t = self.pending.trim_start();
                    if t.starts_with(OPEN) {
                        let skip = self.pending.len() - t.len() + OPEN.len();
                        self.pending.drain(..skip);
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(t) {
                        return out; // maybe the start of `<think>`: wait
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => {
                    if let Some(pos) = self.pending.find(CLOSE) {
                        out.reasoning.push_str(&self.pending[..pos]);
                        self.pending.drain(..pos + CLOSE.len());
                        self.state = State::Content;
                    } else {
                        let hold = partial_suffix(&self.pending, CLOSE);
                        let cut = self.pending.len() - hold;
                        out.reasoning.push_str(&self.pending[..cut]);
                        self.pending.drain(..cut);
                        return out;
                    }
                }
                State::Content => {
                    out.content.push_str(&self.pending);
                    self.pending.clear();
                    return out;
                }
            }
        }
    }

    /// The end of the reply: what was held back goes where it was heading.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            State::Reasoning => Split {
                reasoning: rest,
                content: String::new(),
            },
            State::Start | State::Content => Split {
                reasoning: String::new(),
                content: rest,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(in_thinking: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(in_thinking);
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let o = s.push(p);
            r += &o.reasoning;
            c += &o.content;
        }
        let o = s.finish();
        (r + &o.reasoning, c + &o.content)
    }

    #[test]
    fn splits_whatever_the_chunking() {
        let text = "Let me think.\n</think>\n\nThe answer is 4.";
        for cut in 0..text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            let (r, c) = run(true, &[&text[..cut], &text[cut..]]);
            assert_eq!(r, "Let me think.\n");
            assert_eq!(c, "\n\nThe answer is 4.");
        }
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(
            run(true, &refs),
            ("Let me think.\n".into(), "\n\nThe answer is 4.".into())
        );
    }

    #[test]
    fn reply_that_opens_its_own_block_and_one_that_does_not() {
        assert_eq!(
            run(false, &["<th", "ink>hm</thi", "nk>ok"]),
            ("hm".into(), "ok".into())
        );
        assert_eq!(run(false, &["<b>", "x"]), ("".into(), "<b>x".into()));
        // Never closed: all reasoning, as vLLM reports a truncated R1 reply.
        assert_eq!(run(true, &["abc </th"]), ("abc </th".into(), "".into()));
    }

    #[test]
    fn prompt_detection() {
        assert!(prompt_opens_thinking("<｜Assistant｜><think>\n"));
        assert!(prompt_opens_thinking("<｜Assistant｜><think>"));
        assert!(!prompt_opens_thinking("<｜Assistant｜></think>"));
        assert!(!prompt_opens_thinking("<｜Assistant｜>"));
    }
}
