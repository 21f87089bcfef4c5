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
    /// The arithmetic behind the embeddings ("f32", "bf16", "f16"): caches of embeddings
    /// must not mix them.
    fn numerics(&self) -> &'static str;
}

/// Picks the backend. `auto` uses CUDA when its libraries and a device are present (probed
/// before any CUDA call), else the CPU; `cuda` without a GPU is an error.
pub fn select(
    kind: crate::config::BackendKind,
    model: std::sync::Arc<crate::model::encoder::MiniLm>,
    model_dir: &std::path::Path,
    threads: usize,
    precision: crate::model::encoder::Precision,
) -> anyhow::Result<Box<dyn Backend>> {
    use crate::config::BackendKind;
    let start_cuda_inner = || -> anyhow::Result<Box<dyn Backend>> {
        let mut b = cuda::CudaBackend::new(model.clone(), model_dir)?;
        // A device that runs but disagrees with the CPU reference must not serve decisions.
        let mut cpu =
            cpu::CpuBackend::new(model.clone(), 1, crate::model::encoder::Precision::F32)?;
        let worst = self_check(&mut b, &mut cpu)?;
        anyhow::ensure!(
            worst >= 0.999,
            "CUDA embeddings disagree with the CPU reference (min cosine {worst:.5})"
        );
        tracing::info!(
            device = b.device_name(),
            min_cosine = worst,
            "backend: cuda"
        );
        metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cuda", "precision" => "f16")
            .set(1.0);
        Ok(Box::new(b))
    };
    // cudarc panics on a symbol the installed driver lacks (its bindings are for CUDA 13):
    // that is a failed start, not a crash.
    let start_cuda = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(start_cuda_inner)).unwrap_or_else(
            |_| {
                Err(anyhow::anyhow!(
                    "the CUDA backend panicked while starting (see above)"
                ))
            },
        )
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
    let b = cpu::CpuBackend::new(model, threads, precision)?;
    tracing::info!(threads, precision = b.precision().as_str(), "backend: cpu");
    metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cpu", "precision" => b.precision().as_str())
        .set(1.0);
    Ok(Box::new(b))
}

/// Min cosine between two backends' embeddings of a few fixed sequences (ids of the MiniLM
/// vocabulary: [CLS] ... [SEP], of different lengths, packed together).
pub fn self_check(a: &mut dyn Backend, b: &mut dyn Backend) -> anyhow::Result<f32> {
    let mut batch = PackedBatch::new();
    for n in [6usize, 37, 130] {
        let mut ids: Vec<u32> = (0..n as u32).map(|i| 1000 + (i * 7919) % 20000).collect();
        ids[0] = 101;
        ids[n - 1] = 102;
        batch.push(&ids, &vec![0; n]);
    }
    let (x, y) = (a.embed(&batch)?, b.embed(&batch)?);
    let d = a.dim();
    anyhow::ensure!(
        x.len() == y.len() && x.len() == batch.len() * d,
        "self-check: output sizes differ"
    );
    Ok(x.chunks_exact(d)
        .zip(y.chunks_exact(d))
        .map(|(p, q)| cosine(p, q) as f32)
        .fold(f32::INFINITY, f32::min))
}

/// Cosine of two embeddings, accumulated in f64; 0 when either is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}
