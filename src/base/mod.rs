//! The lowest layer: the vocabulary every other layer shares and nothing below it. A packed
//! batch, the backend contract, its error, and small numeric and text helpers. Imports only
//! std and thiserror (as text-embeddings-inference's `backends/core`).
#![forbid(unsafe_code)]

mod backend;
mod batch;
mod num;

pub use backend::{Backend, BackendError, Device};
pub use batch::PackedBatch;
pub use num::{cosine, dot, sigmoid};

// Client text inside error messages: a short prefix, never the whole input, so a huge field
// cannot bloat a reply's trailers (past the client's header limit) or the logs.

/// Characters of client text an error message may quote.
pub const CLIP_CHARS: usize = 64;

/// `s` quoted (Debug form) when short; else its first [`CLIP_CHARS`] characters, "…" and
/// its length in bytes.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(CLIP_CHARS) {
        None => format!("{s:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &s[..end], s.len()),
    }
}

/// The longest prefix of `s` of at most `max_bytes`, cut at a character boundary
/// (`str::floor_char_boundary` is newer than this crate's rust-version).
pub fn prefix(s: &str, max_bytes: usize) -> &str {
    let mut end = s.len().min(max_bytes);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod clip_tests {
    use super::*;

    #[test]
    fn a_prefix_ends_on_a_character() {
        assert_eq!(prefix("aé", 2), "a");
        assert_eq!(prefix("aé", 3), "aé");
        assert_eq!(prefix("abc", 0), "");
    }

    #[test]
    fn short_text_is_quoted_whole_and_long_text_is_cut() {
        assert_eq!(clip("gpt-4o"), "\"gpt-4o\"");
        let long = "é".repeat(1 << 19);
        let c = clip(&long);
        assert!(c.len() < 200, "{c}");
        assert!(c.ends_with(&format!("… ({} bytes)", long.len())), "{c}");
    }
}
