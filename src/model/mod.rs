//! The encoder (MiniLM), its tokenizer, and the trained heads on top of it. Imports base only.
pub mod answer;
pub mod bf16;
pub mod encoder;
pub mod heads;
mod par;
pub mod tokenize;
pub mod trees;
pub mod wordpiece;

pub use encoder::{MiniLm, Precision};
pub use heads::Heads;
pub use tokenize::{Encoded, TextTokenizer, TokenizeError, TruncSide};
