//! The encoder (MiniLM), its tokenizer, and the trained heads on top of it.
pub mod answer;
pub mod bf16;
pub mod encoder;
pub mod heads;
pub mod tokenize;
pub mod trees;
pub mod wordpiece;
