//! The lowest layer: the vocabulary every other layer shares and nothing below it. A packed
//! batch, the backend contract, its error, and small numeric helpers. Imports only std and
//! thiserror (as text-embeddings-inference's `backends/core`).
#![forbid(unsafe_code)]

mod backend;
mod batch;
mod num;

pub use backend::{Backend, BackendError, Device};
pub use batch::PackedBatch;
pub use num::{cosine, dot, sigmoid};
