//! Backends run the encoder on packed token batches (the contract is `base::Backend`). One
//! backend thread owns a backend. Imports base and model only.
pub mod cpu;
pub mod cuda;
pub mod fault;

use crate::base::{cosine, Backend, BackendError, PackedBatch};
use crate::model::{MiniLm, Precision};

/// Which backend to run: `auto` takes CUDA when a usable GPU is present.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Auto,
    Cpu,
    Cuda,
    /// The CPU backend with injected faults (tests only: needs `TIERGATE_FAULT_INJECTION`,
    /// see fault.rs).
    #[value(hide = true)]
    Fault,
}

/// Builds the backend to use after the selected one failed while serving.
pub type FallbackBuilder = Box<dyn FnOnce() -> Result<Box<dyn Backend>, BackendError> + Send>;

/// [`select_with_fallback`] without the fallback.
pub fn select(
    kind: BackendKind,
    model: std::sync::Arc<MiniLm>,
    model_dir: &std::path::Path,
    threads: usize,
    precision: Precision,
) -> anyhow::Result<Box<dyn Backend>> {
    select_with_fallback(kind, model, model_dir, threads, precision).map(|(b, _)| b)
}

/// Picks the backend. `auto` uses CUDA when its libraries and a device are present (probed
/// before any CUDA call), else the CPU; `cuda` without a GPU is an error. With `auto` on CUDA
/// the CPU backend is the fallback for CUDA failing while serving.
pub fn select_with_fallback(
    kind: BackendKind,
    model: std::sync::Arc<MiniLm>,
    model_dir: &std::path::Path,
    threads: usize,
    precision: Precision,
) -> anyhow::Result<(Box<dyn Backend>, Option<FallbackBuilder>)> {
    let cpu_fallback = |model: std::sync::Arc<MiniLm>, from_cuda: bool| -> FallbackBuilder {
        Box::new(move || {
            let b = cpu::CpuBackend::new(model, threads, precision)?;
            if from_cuda {
                metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cuda", "precision" => "f16")
                    .set(0.0);
            }
            metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cpu", "precision" => b.precision().as_str())
                .set(1.0);
            Ok(Box::new(b) as Box<dyn Backend>)
        })
    };
    let start_cuda_inner = || -> anyhow::Result<Box<dyn Backend>> {
        let mut b = cuda::CudaBackend::new(model.clone(), model_dir)?;
        // A device that runs but disagrees with the CPU reference must not serve decisions.
        let mut cpu = cpu::CpuBackend::new(model.clone(), 1, Precision::F32)?;
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
        BackendKind::Fault => {
            let control = std::env::var_os(fault::ENV)
                .ok_or_else(|| anyhow::anyhow!("backend fault needs {}", fault::ENV))?;
            let inner = cpu::CpuBackend::new(model.clone(), threads, precision)?;
            tracing::warn!(control = ?control, "backend: fault injection (tests only)");
            let fallback = std::env::var(fault::FALLBACK_ENV)
                .is_ok_and(|v| v == "cpu")
                .then(|| cpu_fallback(model, false));
            return Ok((
                Box::new(fault::FaultBackend::new(Box::new(inner), control.into())),
                fallback,
            ));
        }
        BackendKind::Auto => match cuda::probe() {
            Ok(info) => match start_cuda() {
                Ok(b) => return Ok((b, Some(cpu_fallback(model.clone(), true)))),
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
            return start_cuda()
                .map(|b| (b, None))
                .map_err(|e| e.context("backend cuda"));
        }
    }
    let b = cpu::CpuBackend::new(model, threads, precision)?;
    tracing::info!(threads, precision = b.precision().as_str(), "backend: cpu");
    metrics::gauge!(crate::metrics::BACKEND_INFO, "backend" => "cpu", "precision" => b.precision().as_str())
        .set(1.0);
    Ok((Box::new(b), None))
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
