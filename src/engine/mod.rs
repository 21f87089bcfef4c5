//! Backends run the encoder on packed token batches. One backend thread owns a backend.
pub mod cpu;
pub mod cuda;

use crate::error::TgError;

/// A batch of variable-length sequences packed end to end, no padding.
/// Sequence `i` is `ids[cu_seqlens[i]..cu_seqlens[i + 1]]` (with its `type_ids`).
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub cu_seqlens: Vec<u32>,
}

impl PackedBatch {
    pub fn new() -> Self {
        Self {
            cu_seqlens: vec![0],
            ..Default::default()
        }
    }
    pub fn push(&mut self, ids: &[u32], type_ids: &[u32]) {
        debug_assert_eq!(ids.len(), type_ids.len());
        self.ids.extend_from_slice(ids);
        self.type_ids.extend_from_slice(type_ids);
        self.cu_seqlens.push(self.ids.len() as u32);
    }
    pub fn len(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
    pub fn seq(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[i] as usize..self.cu_seqlens[i + 1] as usize
    }
}

/// The encoder on some device. `embed` returns `batch.len() * dim()` floats: one
/// mean-pooled, L2-normalised embedding per sequence, in batch order.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn dim(&self) -> usize;
    /// Largest number of tokens in one sequence (position embeddings).
    fn max_seq_len(&self) -> usize;
    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, TgError>;
}

/// Picks the backend. `auto` uses CUDA when its libraries and a device are present (probed
/// before any CUDA call), else the CPU; `cuda` without a GPU is an error.
pub fn select(
    kind: crate::config::BackendKind,
    model: std::sync::Arc<crate::model::encoder::MiniLm>,
    model_dir: &std::path::Path,
    threads: usize,
) -> anyhow::Result<Box<dyn Backend>> {
    use crate::config::BackendKind;
    let start_cuda = || -> anyhow::Result<Box<dyn Backend>> {
        let b = cuda::CudaBackend::new(model.clone(), model_dir)?;
        tracing::info!(device = b.device_name(), "backend: cuda");
        metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cuda").set(1.0);
        Ok(Box::new(b))
    };
    match kind {
        BackendKind::Cpu => {}
        BackendKind::Auto => match cuda::probe() {
            Ok(info) => match start_cuda() {
                Ok(b) => return Ok(b),
                Err(e) => {
                    tracing::warn!(
                        device = %info.name,
                        error = %format!("{e:#}"),
                        "backend auto: the CUDA backend failed to start; using the CPU"
                    );
                    metrics::counter!(crate::metrics::BACKEND_FALLBACK, "reason" => "cuda_init")
                        .increment(1);
                }
            },
            Err(why) => {
                tracing::info!("backend auto: no CUDA ({why}); using the CPU");
                metrics::counter!(crate::metrics::BACKEND_FALLBACK, "reason" => "no_cuda")
                    .increment(1);
            }
        },
        BackendKind::Cuda => {
            cuda::probe().map_err(|e| anyhow::anyhow!("backend cuda: no usable GPU: {e}"))?;
            return start_cuda().map_err(|e| e.context("backend cuda"));
        }
    }
    let b = cpu::CpuBackend::new(model, threads)?;
    metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cpu").set(1.0);
    Ok(Box::new(b))
}
