//! The encoder (MiniLM), its tokenizer, and the trained heads on top of it. Imports base only.
pub mod ability;
pub mod answer;
pub mod benchmarks;
pub mod bf16;
pub mod encoder;
pub mod heads;
pub mod int8;
pub mod memory;
pub mod overlay;
mod par;
pub mod student;
pub mod tokenize;
pub mod trees;
pub mod wordpiece;

pub use encoder::{ActStats, MiniLm, Precision};
pub use heads::Heads;
pub use overlay::Overlay;
pub use tokenize::{Encoded, TextTokenizer, TokenizeError, TruncSide};
