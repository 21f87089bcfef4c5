//! WordPiece tokenisation for the encoder, with our own truncation rules.
//!
//! The HF `tokenizer.json` bakes in padding to 128 and truncation to 128; both are
//! switched off here. We encode without special tokens, truncate with rules that know
//! where the useful content lives (head+tail for prompts, mostly tail for answers,
//! where final results are written), then add `[CLS]`/`[SEP]` ourselves.
//!
//! ASCII text goes through `model::wordpiece` (the GPU tokenizer's CPU reference): the same
//! ids as the `tokenizers` crate on every ASCII dev text, about 15x faster (benches/README.md).
//! Other text, or a tokenizer.json whose pipeline it does not mirror, uses the crate.
#![forbid(unsafe_code)]
use std::path::Path;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::wordpiece::WordPieceTable;

/// Why a tokenizer could not be loaded or could not encode a text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenizeError {
    /// tokenizer.json missing or not a pipeline we can use (a start-up error).
    #[error("{0}")]
    Load(String),
    /// The `tokenizers` crate refused a text.
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Which part of an over-long text survives truncation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TruncSide {
    /// First half and last half of the budget (drops the middle).
    #[default]
    HeadTail,
    /// Keep the beginning.
    Head,
    /// Keep the end.
    Tail,
}

/// Whether a single text encoded to `tokens` tokens kept nothing of it: `[CLS] [SEP]` alone
/// (a blank text, or one of characters the tokenizer drops: zero-width, control). Verify and
/// `score` treat such an answer as empty.
pub fn kept_nothing(tokens: usize) -> bool {
    tokens <= 2
}

/// One encoded sequence, special tokens included.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Whether any token of the input was dropped.
    pub truncated: bool,
    /// tokens the full input would have had (with specials)
    pub full_len: usize,
}

/// Share of the pair budget the answer keeps at least when both parts are long.
const ANSWER_MIN_SHARE: f64 = 0.6;

/// Thread-safe tokenizer; cheap to share in an `Arc`.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The ASCII fast path; None when tokenizer.json is not a BERT WordPiece pipeline.
    fast: Option<WordPieceTable>,
    cls: u32,
    sep: u32,
    max_tokens: usize,
    max_pair_tokens: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`. `max_tokens` bounds single sequences and
    /// `max_pair_tokens` prompt/answer pairs, special tokens included.
    pub fn from_file(
        path: &Path,
        max_tokens: usize,
        max_pair_tokens: usize,
    ) -> Result<Self, TokenizeError> {
        if max_tokens < 3 || max_pair_tokens < 5 {
            return Err(TokenizeError::Load(format!(
                "token limits too small: max_tokens={max_tokens} (min 3), \
                 max_pair_tokens={max_pair_tokens} (min 5)"
            )));
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| {
            TokenizeError::Load(format!("loading tokenizer {}: {e}", path.display()))
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizeError::Load(format!("tokenizer {}: {e}", path.display())))?;
        let special = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                TokenizeError::Load(format!("tokenizer {} has no {tok} token", path.display()))
            })
        };
        let cls = special("[CLS]")?;
        let sep = special("[SEP]")?;
        let fast = match WordPieceTable::from_file(path) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::info!(error = %format!("{e:#}"), "tokenizer: no ASCII fast path");
                None
            }
        };
        Ok(Self {
            inner,
            fast,
            cls,
            sep,
            max_tokens,
            max_pair_tokens,
        })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn max_pair_tokens(&self) -> usize {
        self.max_pair_tokens
    }

    /// Without the ASCII fast path: every text through the `tokenizers` crate.
    pub fn crate_only(mut self) -> Self {
        self.fast = None;
        self
    }

    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// Token ids of `text` without special tokens or truncation.
    pub fn raw_ids(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        if let Some(ids) = self.fast.as_ref().and_then(|w| w.encode_ascii(text)) {
            return Ok(ids);
        }
        // `encode_fast` skips offset computation, which we never use.
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// `[CLS] text [SEP]`, at most `max_tokens`, truncated on `side`.
    pub fn encode_single(&self, text: &str, side: TruncSide) -> Result<Encoded, TokenizeError> {
        let body = self.max_tokens - 2;
        let head = match side {
            TruncSide::HeadTail => body.div_ceil(2),
            TruncSide::Head => body,
            TruncSide::Tail => 0,
        };
        self.encode_limited(text, self.max_tokens, head)
    }

    /// An answer on its own, at most `limit` tokens, keeping 1/4 head and 3/4 tail: verdicts
    /// and final answers sit at the end. `limit` is bounded by the larger of the two limits
    /// this tokenizer was built with (an answer may be longer than a prompt).
    pub fn encode_answer(&self, text: &str, limit: usize) -> Result<Encoded, TokenizeError> {
        let limit = limit.clamp(3, self.max_tokens.max(self.max_pair_tokens));
        self.encode_limited(text, limit, (limit - 2) / 4)
    }

    fn encode_limited(
        &self,
        text: &str,
        limit: usize,
        head: usize,
    ) -> Result<Encoded, TokenizeError> {
        let raw = self.raw_ids(text)?;
        let full_len = raw.len() + 2;
        let body = limit - 2;
        let mut ids = Vec::with_capacity(full_len.min(limit));
        ids.push(self.cls);
        let truncated = push_head_tail(&mut ids, &raw, body, head);
        ids.push(self.sep);
        let type_ids = vec![0; ids.len()];
        Ok(Encoded {
            ids,
            type_ids,
            truncated,
            full_len,
        })
    }

    /// `[CLS] prompt [SEP] answer [SEP]`, type ids 0 then 1, at most `max_pair_tokens`.
    ///
    /// When both do not fit, the answer keeps at least 60% of the budget (all of what
    /// the prompt leaves if the prompt is short) and is cut keeping 1/4 head, 3/4 tail,
    /// since verdicts and final answers sit at the end; the prompt keeps head+tail.
    pub fn encode_pair(&self, prompt: &str, answer: &str) -> Result<Encoded, TokenizeError> {
        let p = self.raw_ids(prompt)?;
        let a = self.raw_ids(answer)?;
        let full_len = p.len() + a.len() + 3;
        let budget = self.max_pair_tokens - 3;
        let (p_keep, a_keep) = pair_budget(p.len(), a.len(), budget);

        let mut ids = Vec::with_capacity(full_len.min(self.max_pair_tokens));
        ids.push(self.cls);
        let mut truncated = push_head_tail(&mut ids, &p, p_keep, p_keep.div_ceil(2));
        ids.push(self.sep);
        let first_len = ids.len();
        truncated |= push_head_tail(&mut ids, &a, a_keep, a_keep / 4);
        ids.push(self.sep);
        let mut type_ids = vec![0; ids.len()];
        type_ids[first_len..].fill(1);
        Ok(Encoded {
            ids,
            type_ids,
            truncated,
            full_len,
        })
    }

    /// [`Self::encode_single`] over many texts in parallel (offline train/score).
    pub fn encode_single_batch(
        &self,
        texts: &[&str],
        side: TruncSide,
    ) -> Result<Vec<Encoded>, TokenizeError> {
        texts
            .par_iter()
            .map(|t| self.encode_single(t, side))
            .collect()
    }

    /// [`Self::encode_pair`] over many pairs in parallel (offline train/score).
    pub fn encode_pair_batch(&self, pairs: &[(&str, &str)]) -> Result<Vec<Encoded>, TokenizeError> {
        pairs
            .par_iter()
            .map(|(p, a)| self.encode_pair(p, a))
            .collect()
    }
}

/// Splits `budget` body tokens between a prompt of `p` and an answer of `a` tokens:
/// returns (prompt tokens kept, answer tokens kept).
fn pair_budget(p: usize, a: usize, budget: usize) -> (usize, usize) {
    if p + a <= budget {
        return (p, a);
    }
    let answer_min = (budget as f64 * ANSWER_MIN_SHARE).ceil() as usize;
    let a_keep = a.min(answer_min.max(budget.saturating_sub(p)));
    let p_keep = p.min(budget - a_keep);
    (p_keep, a_keep)
}

/// Appends `src` to `out` if it fits in `keep` tokens; otherwise its first `head`
/// tokens and its last `keep - head`. Returns whether anything was dropped.
fn push_head_tail(out: &mut Vec<u32>, src: &[u32], keep: usize, head: usize) -> bool {
    if src.len() <= keep {
        out.extend_from_slice(src);
        return false;
    }
    let head = head.min(keep);
    out.extend_from_slice(&src[..head]);
    out.extend_from_slice(&src[src.len() - (keep - head)..]);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tok(max: usize, max_pair: usize) -> TextTokenizer {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/base/tokenizer.json");
        match TextTokenizer::from_file(&path, max, max_pair) {
            Ok(t) => t,
            Err(e) => panic!("{e}; run scripts/setup-model.sh first"),
        }
    }

    /// "one two three ... n", one WordPiece token per word for small numbers.
    fn words(range: std::ops::Range<usize>) -> String {
        range.map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn matches_hf_tokenizer_ids() {
        // Reference: python `tokenizers` 0.23.3, Tokenizer.from_file(models/base/tokenizer.json)
        // with padding/truncation disabled, add_special_tokens=True.
        let t = tok(128, 256);
        let e = t
            .encode_single(
                "Hello, world! Tokenizers split unbelievably long words.",
                TruncSide::HeadTail,
            )
            .unwrap();
        assert_eq!(e.ids, HF_IDS);
        assert_eq!(e.type_ids, vec![0; HF_IDS.len()]);
        assert!(!e.truncated);
        assert_eq!(e.full_len, HF_IDS.len());
    }

    const HF_IDS: &[u32] = &[
        101, 7592, 1010, 2088, 999, 19204, 17629, 2015, 3975, 4895, 8671, 2666, 3567, 6321, 2146,
        2616, 1012, 102,
    ];

    #[test]
    fn single_truncation_sides() {
        let t = tok(12, 32);
        let text = words(0..40);
        let raw = t.raw_ids(&text).unwrap();
        assert!(raw.len() > 40);
        for side in [TruncSide::HeadTail, TruncSide::Head, TruncSide::Tail] {
            let e = t.encode_single(&text, side).unwrap();
            assert_eq!(e.ids.len(), 12);
            assert!(e.truncated);
            assert_eq!(e.full_len, raw.len() + 2);
            assert_eq!(e.ids[0], t.cls);
            assert_eq!(e.ids[11], t.sep);
            let body = &e.ids[1..11];
            match side {
                TruncSide::HeadTail => {
                    assert_eq!(&body[..5], &raw[..5]);
                    assert_eq!(&body[5..], &raw[raw.len() - 5..]);
                }
                TruncSide::Head => assert_eq!(body, &raw[..10]),
                TruncSide::Tail => assert_eq!(body, &raw[raw.len() - 10..]),
            }
        }
        let short = t.encode_single("short text", TruncSide::Tail).unwrap();
        assert!(!short.truncated);
        assert_eq!(short.ids.len(), short.full_len);
        let empty = t.encode_single("", TruncSide::HeadTail).unwrap();
        assert_eq!(empty.ids, vec![t.cls, t.sep]);
    }

    #[test]
    fn pair_layout_and_budget() {
        let t = tok(16, 43); // pair body budget 40
        let e = t.encode_pair("what is two plus two", "four").unwrap();
        assert!(!e.truncated);
        let seps: Vec<usize> = (0..e.ids.len()).filter(|&i| e.ids[i] == t.sep).collect();
        assert_eq!(seps.len(), 2);
        assert_eq!(*seps.last().unwrap(), e.ids.len() - 1);
        assert!(e.type_ids[..=seps[0]].iter().all(|&x| x == 0));
        assert!(e.type_ids[seps[0] + 1..].iter().all(|&x| x == 1));

        // Both long: answer gets 24 (60%), prompt 16; answer is 1/4 head, 3/4 tail.
        let (prompt, answer) = (words(0..100), words(500..600));
        let (p, a) = (t.raw_ids(&prompt).unwrap(), t.raw_ids(&answer).unwrap());
        let e = t.encode_pair(&prompt, &answer).unwrap();
        assert!(e.truncated);
        assert_eq!(e.ids.len(), 43);
        assert_eq!(e.full_len, p.len() + a.len() + 3);
        assert_eq!(&e.ids[1..9], &p[..8]);
        assert_eq!(&e.ids[9..17], &p[p.len() - 8..]);
        assert_eq!(e.ids[17], t.sep);
        assert_eq!(&e.ids[18..24], &a[..6]);
        assert_eq!(&e.ids[24..42], &a[a.len() - 18..]);
        assert_eq!(e.type_ids.iter().filter(|&&x| x == 1).count(), 25);

        // Short prompt: answer takes everything the prompt leaves.
        let e = t.encode_pair("hi", &answer).unwrap();
        assert_eq!(e.ids.len(), 43);
        assert_eq!(e.ids[2], t.sep);
        assert_eq!(&e.ids[e.ids.len() - 10..e.ids.len() - 1], &a[a.len() - 9..]);

        // Short answer: kept whole, prompt truncated.
        let e = t.encode_pair(&prompt, "four").unwrap();
        assert_eq!(e.ids.len(), 43);
        let four = t.raw_ids("four").unwrap();
        assert_eq!(four.len(), 1);
        assert_eq!(&e.ids[e.ids.len() - 3..], &[t.sep, four[0], t.sep]);
    }

    #[test]
    fn lengths_never_exceed_limits() {
        let t = tok(20, 30);
        for n in [0, 1, 5, 17, 18, 19, 40, 200] {
            for m in [0, 1, 3, 20, 27, 60] {
                let (x, y) = (words(0..n), words(1000..1000 + m));
                for side in [TruncSide::HeadTail, TruncSide::Head, TruncSide::Tail] {
                    let e = t.encode_single(&x, side).unwrap();
                    assert!(e.ids.len() <= 20);
                    assert_eq!(e.truncated, e.full_len > 20);
                    assert_eq!(e.ids.len(), e.full_len.min(20));
                }
                let e = t.encode_pair(&x, &y).unwrap();
                assert!(e.ids.len() <= 30, "{n} {m}");
                assert_eq!(e.truncated, e.full_len > 30);
                assert_eq!(e.ids.len(), e.full_len.min(30));
                assert_eq!(e.ids.len(), e.type_ids.len());
            }
        }
    }

    #[test]
    fn batch_matches_single() {
        let t = tok(16, 24);
        let texts = ["a b c", "", &words(0..50)];
        let b = t.encode_single_batch(&texts, TruncSide::Head).unwrap();
        for (s, e) in texts.iter().zip(&b) {
            assert_eq!(t.encode_single(s, TruncSide::Head).unwrap().ids, e.ids);
        }
        let pairs = [("q", "a"), ("long", texts[2])];
        let b = t.encode_pair_batch(&pairs).unwrap();
        for ((p, a), e) in pairs.iter().zip(&b) {
            assert_eq!(t.encode_pair(p, a).unwrap().ids, e.ids);
        }
    }

    #[test]
    fn bad_path_is_an_error() {
        let err = TextTokenizer::from_file(Path::new("/nonexistent/tok.json"), 128, 256);
        assert!(matches!(err, Err(TokenizeError::Load(m)) if m.contains("/nonexistent/tok.json")));
    }
}
