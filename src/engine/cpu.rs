//! CPU backend: the MiniLM forward pass on a dedicated rayon pool, so encoder work
//! neither competes with nor blocks the global pool used elsewhere.
#![forbid(unsafe_code)]
use std::sync::Arc;

use crate::base::{Backend, BackendError, Device, PackedBatch};
use crate::model::{MiniLm, Precision};

pub struct CpuBackend {
    model: Arc<MiniLm>,
    pool: rayon::ThreadPool,
    precision: Precision,
}

impl CpuBackend {
    /// A backend running on its own pool of `threads` threads (at least 1), its linear
    /// layers in `precision` (`auto` resolved here; `bf16` on a CPU without it is an error).
    pub fn new(
        model: Arc<MiniLm>,
        threads: usize,
        precision: Precision,
    ) -> Result<Self, BackendError> {
        let resolved = model.resolve_precision(precision)?;
        if resolved != precision.resolve()? {
            tracing::warn!(
                fallback = resolved.as_str(),
                "precision auto: no int8 smoothing ranges fit these weights"
            );
        }
        let precision = resolved;
        match precision {
            Precision::Bf16 => model.prepare_bf16(),
            Precision::Int8 => model.prepare_int8(),
            Precision::Static if model.student().is_none() => {
                return Err(BackendError::Unsupported(
                    "precision static needs a student fitted on these weights \
                     (models/static-student.bin, tiergate distill-static)"
                        .into(),
                ))
            }
            Precision::Auto | Precision::F32 | Precision::Static => {}
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tg-cpu-{i}"))
            .build()
            .map_err(|e| {
                BackendError::Unsupported(format!("building the CPU backend pool: {e}"))
            })?;
        Ok(Self {
            model,
            pool,
            precision,
        })
    }

    /// The resolved precision: `F32`, `Bf16` or `Int8`.
    pub fn precision(&self) -> Precision {
        self.precision
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

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn dim(&self) -> usize {
        self.model.dim()
    }

    fn max_seq_len(&self) -> usize {
        self.model.max_positions()
    }

    fn numerics(&self) -> &'static str {
        match self.precision {
            // The AVX2 kernel's 7-bit weights give other embeddings than the 8-bit kernels:
            // a name of their own, so no cache mixes the two.
            Precision::Int8 if crate::model::int8::kernel().weight_bits() == 7 => "int8-w7",
            p => p.as_str(),
        }
    }

    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, BackendError> {
        self.model.validate(batch)?;
        let (model, p) = (&self.model, self.precision);
        Ok(self.pool.install(|| model.forward_with(batch, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn model() -> Arc<MiniLm> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/base");
        match MiniLm::load(&dir) {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("{e:#}; run scripts/setup-model.sh first"),
        }
    }

    #[test]
    fn embeds_on_its_pool_and_rejects_bad_batches() {
        let m = model();
        let mut b = CpuBackend::new(m.clone(), 2, Precision::F32).unwrap();
        assert_eq!(
            (b.name(), b.dim(), b.max_seq_len(), b.threads()),
            ("cpu", 384, 512, 2)
        );
        let mut batch = PackedBatch::new();
        batch.push(&[101, 7592, 2088, 102], &[0; 4]);
        batch.push(&[101, 102], &[0, 0]);
        let out = b.embed(&batch).unwrap();
        assert_eq!(out, m.forward(&batch));
        let norm: f32 = out[..384].iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert!(b.embed(&PackedBatch::new()).unwrap().is_empty());

        let mut bad = PackedBatch::new();
        bad.push(&[101, 999_999, 102], &[0; 3]);
        assert!(matches!(b.embed(&bad), Err(BackendError::InvalidBatch(_))));
        let mut bad = PackedBatch::new();
        bad.push(&[101, 102], &[0, 7]);
        assert!(matches!(b.embed(&bad), Err(BackendError::InvalidBatch(_))));
        let mut long = PackedBatch::new();
        long.push(&vec![100; 513], &[0; 513]);
        assert!(matches!(b.embed(&long), Err(BackendError::InvalidBatch(_))));
    }
}
