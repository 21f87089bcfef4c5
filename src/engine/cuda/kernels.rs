//! Our CUDA C sources (`kernels/*.cu`), embedded in the binary and compiled by NVRTC once
//! when a backend starts, for the device's own architecture.
#![forbid(unsafe_code)]
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

/// `(file name, source)` of every kernel file, and the kernels each defines.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "norm.cu",
        include_str!("../../../kernels/norm.cu"),
        &["embed_layernorm", "bias_residual_layernorm", "mean_pool_l2"],
    ),
    (
        "gelu.cu",
        include_str!("../../../kernels/gelu.cu"),
        &["bias_gelu"],
    ),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
        &["attention_varlen"],
    ),
    (
        "heads.cu",
        include_str!("../../../kernels/heads.cu"),
        &["router_logits"],
    ),
    (
        "wordpiece.cu",
        include_str!("../../../kernels/wordpiece.cu"),
        &["wordpiece_ascii"],
    ),
];

/// Compiles one source to PTX for `arch` (e.g. `compute_90`). The error carries NVRTC's log.
///
/// Panics (inside cudarc) if libnvrtc cannot be loaded: check [`super::nvrtc_available`] first.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Ptx, String> {
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some(name.to_string()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            format!("NVRTC failed on {name}:\n{}", log.to_string_lossy())
        }
        other => format!("NVRTC failed on {name}: {other:?}"),
    })
}
