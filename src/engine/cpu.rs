//! CPU backend: the MiniLM forward pass on a dedicated rayon pool, so encoder work
//! neither competes with nor blocks the global pool used elsewhere.
use std::sync::Arc;

use super::{Backend, PackedBatch};
use crate::error::TgError;
use crate::model::encoder::MiniLm;

pub struct CpuBackend {
    model: Arc<MiniLm>,
    pool: rayon::ThreadPool,
}

impl CpuBackend {
    /// A backend running on its own pool of `threads` threads (at least 1).
    pub fn new(model: Arc<MiniLm>, threads: usize) -> Result<Self, TgError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tg-cpu-{i}"))
            .build()
            .map_err(|e| TgError::Internal(format!("building the CPU backend pool: {e}")))?;
        Ok(Self { model, pool })
    }

    pub fn model(&self) -> &Arc<MiniLm> {
        &self.model
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn dim(&self) -> usize {
        self.model.dim()
    }

    fn max_seq_len(&self) -> usize {
        self.model.max_positions()
    }

    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, TgError> {
        self.model.validate(batch)?;
        let model = &self.model;
        Ok(self.pool.install(|| model.forward(batch)))
    }
}
