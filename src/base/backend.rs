//! The contract between the batcher and whatever runs the encoder.
#![forbid(unsafe_code)]
use super::PackedBatch;

/// Where a backend computes: the batcher sizes its batches by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// What a backend can fail with. Bad input and device faults stay apart all the way up, so
/// the edge can answer INVALID_ARGUMENT for one and INTERNAL for the other.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The batch itself is malformed (ids outside the vocabulary, a sequence too long).
    #[error("{0}")]
    InvalidBatch(String),
    /// The device or its runtime failed (a kernel launch, a panic, a wrong output size).
    #[error("backend failure: {0}")]
    Fault(String),
    /// The backend could not be built (a thread pool, an unsupported precision).
    #[error("{0}")]
    Unsupported(String),
}

/// The encoder on some device. `embed` returns `batch.len() * dim()` floats: one
/// mean-pooled, L2-normalised embedding per sequence, in batch order.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn device(&self) -> Device;
    fn dim(&self) -> usize;
    /// Largest number of tokens in one sequence (position embeddings).
    fn max_seq_len(&self) -> usize;
    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, BackendError>;
    /// The arithmetic behind the embeddings ("f32", "bf16", "f16"): caches of embeddings
    /// must not mix them.
    fn numerics(&self) -> &'static str;
}
