//! BERT WordPiece for ASCII text, laid out for the GPU (`kernels/wordpiece.cu`), and its CPU
//! reference, which follows the kernel step by step.
//!
//! `tokenizer.json` (BertNormalizer + BertPreTokenizer + WordPiece) reduces, on ASCII input, to:
//! drop control bytes other than `\t \n \r`; lowercase; split on whitespace and around each
//! ASCII punctuation byte; then greedy longest-match-first over the vocabulary, a word of more
//! than `max_input_chars_per_word` characters or with an unmatched rest becoming `[UNK]`.
//! Text with a non-ASCII byte (accents, CJK, Unicode punctuation) or with an added token's
//! literal (`[SEP]`, ...) is left to the `tokenizers` crate: [`WordPieceTable::encode_ascii`]
//! returns `None` for it.
//!
//! The vocabulary is an open-addressing hash table of entry indices (linear probing, FNV-1a
//! over the bytes, seeded by whether the piece continues a word, i.e. had the `##` prefix).
#![forbid(unsafe_code)]
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// Byte classes; the same numbers as `kernels/wordpiece.cu`.
pub const LETTER: u8 = 0;
pub const SPACE: u8 = 1;
pub const PUNCT: u8 = 2;
/// Control bytes the normalizer deletes (they join what is around them).
pub const REMOVED: u8 = 3;

pub fn class(b: u8) -> u8 {
    match b {
        b' ' | b'\t' | b'\n' | b'\r' => SPACE,
        0..=0x1f | 0x7f => REMOVED,
        b'!'..=b'/' | b':'..=b'@' | b'['..=b'`' | b'{'..=b'~' => PUNCT,
        _ => LETTER,
    }
}

/// FNV-1a over `bytes`, seeded apart for continuation pieces (`##` + bytes).
pub fn hash(cont: bool, bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut h: u32 = 0x811c_9dc5 ^ if cont { 0x5bd1_e995 } else { 0 };
    for b in bytes {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// (byte offset, length, continuation) of a table entry.
fn unpack(e: &[u32; 3]) -> (usize, usize, bool) {
    (
        e[0] as usize,
        (e[1] & 0x7fff_ffff) as usize,
        e[1] >> 31 == 1,
    )
}

/// The vocabulary as flat arrays, uploaded as they are to the GPU.
#[derive(Debug, Clone)]
pub struct WordPieceTable {
    /// Entry index + 1 per slot, 0 = empty; a power of two long, at most half full.
    pub slots: Vec<u32>,
    /// Per entry: byte offset into `bytes`, length | continuation << 31, token id.
    pub entries: Vec<[u32; 3]>,
    pub bytes: Vec<u8>,
    pub unk: u32,
    pub max_chars: u32,
    /// Longest piece in bytes: the greedy match never tries a longer one (a 256 KB text of
    /// 100-character unmatched words would otherwise cost ~50x more lookups).
    pub max_piece: u32,
    /// Added tokens' text (`[CLS]`, ...): the tokenizer matches them before normalizing.
    pub added: Vec<String>,
}

impl WordPieceTable {
    /// Reads a BERT `tokenizer.json`; errors if its pipeline is not the one mirrored here.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(&j).with_context(|| path.display().to_string())
    }

    pub fn from_json(j: &serde_json::Value) -> Result<Self> {
        let n = &j["normalizer"];
        ensure!(
            n["type"] == "BertNormalizer"
                && n["clean_text"] == true
                && n["lowercase"] == true
                && n["strip_accents"] != false,
            "normalizer is not a lowercasing, cleaning BertNormalizer: {n}"
        );
        ensure!(
            j["pre_tokenizer"]["type"] == "BertPreTokenizer",
            "pre-tokenizer is not BertPreTokenizer"
        );
        let m = &j["model"];
        ensure!(m["type"] == "WordPiece", "model is not WordPiece");
        ensure!(
            m["continuing_subword_prefix"] == "##",
            "continuing prefix is not ##"
        );
        let max_chars = m["max_input_chars_per_word"]
            .as_u64()
            .context("no max_input_chars_per_word")?;
        ensure!(
            (1..=255).contains(&max_chars),
            "max_input_chars_per_word {max_chars} outside 1..=255"
        );
        let vocab = m["vocab"].as_object().context("no vocab")?;
        let unk_tok = m["unk_token"].as_str().context("no unk_token")?;
        let unk = vocab
            .get(unk_tok)
            .and_then(|v| v.as_u64())
            .context("unk_token not in the vocabulary")? as u32;
        let added = j["added_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["content"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();

        let mut entries = Vec::with_capacity(vocab.len());
        let mut bytes = Vec::new();
        for (tok, id) in vocab {
            let id = id.as_u64().context("a vocabulary id is not a number")? as u32;
            // Pieces of non-ASCII text are never looked up here.
            if !tok.is_ascii() {
                continue;
            }
            let (cont, piece) = match tok.strip_prefix("##") {
                Some(rest) if !rest.is_empty() => (true, rest),
                _ => (false, tok.as_str()),
            };
            ensure!(piece.len() < 1 << 16, "vocabulary piece too long");
            entries.push([
                bytes.len() as u32,
                piece.len() as u32 | (cont as u32) << 31,
                id,
            ]);
            bytes.extend_from_slice(piece.as_bytes());
        }
        if entries.is_empty() {
            bail!("empty vocabulary");
        }
        let cap = (2 * entries.len()).next_power_of_two();
        let mask = cap - 1;
        let mut slots = vec![0u32; cap];
        let mut max_piece = 1;
        for (i, e) in entries.iter().enumerate() {
            let (off, len, cont) = unpack(e);
            max_piece = max_piece.max(len as u32);
            let mut s = hash(cont, bytes[off..off + len].iter().copied()) as usize & mask;
            while slots[s] != 0 {
                s = (s + 1) & mask;
            }
            slots[s] = i as u32 + 1;
        }
        Ok(WordPieceTable {
            slots,
            entries,
            bytes,
            unk,
            max_chars: max_chars as u32,
            max_piece,
            added,
        })
    }

    /// Token id of `piece` (continuing a word when `cont`).
    pub fn lookup(&self, cont: bool, piece: &[u8]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut s = hash(cont, piece.iter().copied()) as usize & mask;
        loop {
            let e = *self.slots.get(s)?;
            if e == 0 {
                return None;
            }
            let entry = self.entries.get(e as usize - 1)?;
            let (off, len, c) = unpack(entry);
            if c == cont && self.bytes.get(off..off + len) == Some(piece) {
                return Some(entry[2]);
            }
            s = (s + 1) & mask;
        }
    }

    /// Whether the GPU path takes `text` (otherwise the `tokenizers` crate must).
    pub fn accepts(&self, text: &str) -> bool {
        text.is_ascii() && !self.added.iter().any(|a| text.contains(a.as_str()))
    }

    /// Texts as the GPU kernel takes them: the accepted ones concatenated, each followed by a
    /// space (so no word crosses two texts), and per text its (offset, length) in that buffer,
    /// `None` where declined.
    pub fn pack(&self, texts: &[&str]) -> (Vec<u8>, Vec<Option<(usize, usize)>>) {
        let mut buf = Vec::new();
        let spans = texts
            .iter()
            .map(|t| {
                self.accepts(t).then(|| {
                    let span = (buf.len(), t.len());
                    buf.extend_from_slice(t.as_bytes());
                    buf.push(b' ');
                    span
                })
            })
            .collect();
        (buf, spans)
    }

    /// The kernel's per-byte output (`ids[i..i + counts[i]]`: the tokens of the word starting
    /// at byte i) gathered back into each packed text's ids, in byte order.
    pub fn stitch(
        spans: &[Option<(usize, usize)>],
        ids: &[u32],
        counts: &[u8],
    ) -> Vec<Option<Vec<u32>>> {
        spans
            .iter()
            .map(|s| {
                s.map(|(off, len)| {
                    let mut out = Vec::new();
                    let end = (off + len).min(counts.len());
                    for (i, &c) in counts.iter().enumerate().take(end).skip(off) {
                        out.extend_from_slice(ids.get(i..i + c as usize).unwrap_or(&[]));
                    }
                    out
                })
            })
            .collect()
    }

    /// Token ids of `text` without special tokens, as `tokenizers` gives them; `None` when
    /// [`Self::accepts`] says no.
    pub fn encode_ascii(&self, text: &str) -> Option<Vec<u32>> {
        if !self.accepts(text) {
            return None;
        }
        let b = text.as_bytes();
        let mut out = Vec::new();
        for i in 0..b.len() {
            out.extend_from_slice(&self.word_at(b, i));
        }
        Some(out)
    }

    /// The tokens of the word starting at byte `i`, empty if none starts there: what one GPU
    /// thread computes for byte `i`.
    pub fn word_at(&self, b: &[u8], i: usize) -> Vec<u32> {
        match class(b[i]) {
            PUNCT => return vec![self.lookup(false, &b[i..i + 1]).unwrap_or(self.unk)],
            LETTER => {}
            _ => return Vec::new(),
        }
        // A word starts here unless the previous kept byte is a letter.
        if b[..i]
            .iter()
            .rev()
            .find(|&&c| class(c) != REMOVED)
            .is_some_and(|&c| class(c) == LETTER)
        {
            return Vec::new();
        }
        let max = self.max_chars as usize;
        let mut w = Vec::with_capacity(max);
        let mut chars = 0usize;
        for &c in &b[i..] {
            match class(c) {
                LETTER => {
                    chars += 1;
                    if chars <= max {
                        w.push(c.to_ascii_lowercase());
                    }
                }
                REMOVED => {}
                _ => break,
            }
        }
        if chars > max {
            return vec![self.unk];
        }
        let mut toks = Vec::new();
        let mut start = 0;
        while start < w.len() {
            let mut end = w.len().min(start + self.max_piece as usize);
            let found = loop {
                if let Some(id) = self.lookup(start > 0, &w[start..end]) {
                    break Some(id);
                }
                end -= 1;
                if end == start {
                    break None;
                }
            };
            match found {
                Some(id) => toks.push(id),
                None => return vec![self.unk],
            }
            start = end;
        }
        toks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> WordPieceTable {
        let j = serde_json::json!({
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "lowercase": true,
                           "strip_accents": null, "handle_chinese_chars": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "added_tokens": [{"content": "[SEP]"}],
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 10,
                      "vocab": {"[UNK]": 0, "un": 1, "##aff": 2, "##able": 3, "!": 4, "a": 5,
                                "##b": 6, "é": 7}}
        });
        WordPieceTable::from_json(&j).unwrap()
    }

    #[test]
    fn greedy_longest_match_with_unk_for_the_unmatched() {
        let t = table();
        assert_eq!(t.encode_ascii("UnAffable!"), Some(vec![1, 2, 3, 4]));
        // Control bytes vanish inside a word; whitespace and punctuation split.
        assert_eq!(
            t.encode_ascii("un\u{1}aff\u{7f}able  a\tab"),
            Some(vec![1, 2, 3, 5, 5, 6])
        );
        // An unmatched rest makes the whole word [UNK]; so does a word over 10 characters.
        assert_eq!(t.encode_ascii("unx a"), Some(vec![0, 5]));
        assert_eq!(t.encode_ascii("abbbbbbbbbb"), Some(vec![0]));
        assert_eq!(
            t.encode_ascii("abbbbbbbbb"),
            Some(vec![5, 6, 6, 6, 6, 6, 6, 6, 6, 6])
        );
        // Unknown punctuation is [UNK] on its own.
        assert_eq!(t.encode_ascii("a?a"), Some(vec![5, 0, 5]));
        assert_eq!(t.encode_ascii(""), Some(vec![]));
        assert_eq!(t.encode_ascii(" \u{1} "), Some(vec![]));
        // Left to the tokenizers crate.
        assert_eq!(t.encode_ascii("café"), None);
        assert_eq!(t.encode_ascii("a [SEP] b"), None);
    }

    #[test]
    fn bad_tokenizer_configs_are_refused() {
        let mut j = serde_json::json!({
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "lowercase": false},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0}}
        });
        assert!(WordPieceTable::from_json(&j).is_err());
        j["normalizer"]["lowercase"] = true.into();
        assert!(WordPieceTable::from_json(&j).is_ok());
        j["model"]["unk_token"] = "<unk>".into();
        assert!(WordPieceTable::from_json(&j).is_err());
    }
}
