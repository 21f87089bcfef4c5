//! The encoder (MiniLM), its tokenizer, and the trained heads on top of it.
pub mod encoder;
pub mod heads;
pub mod tokenize;
