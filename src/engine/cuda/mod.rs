//! CUDA backend: the MiniLM forward pass on one NVIDIA GPU over packed variable-length batches
//! (no padding), numerically mirroring the CPU encoder (`model::encoder`).
//!
//! GEMMs run on cuBLAS (`cublasGemmEx`: f16 inputs, f32 accumulation and f32 output); our own
//! kernels (`kernels/*.cu`, compiled by NVRTC at start) do the embedding gather + LayerNorm, the
//! bias + GELU and bias + residual + LayerNorm epilogues, attention within each sequence, and
//! mean pooling + L2 norm. The residual stream stays f32 with an f16 copy for the next GEMM, so
//! only GEMM inputs are rounded to f16.
//!
//! cudarc loads the CUDA libraries lazily and panics when one is missing, so [`probe`] checks
//! for them (and for a device) before anything else touches CUDA.
mod backend;
mod gpu;
mod harness;
pub mod kernel_check;
pub mod kernels;
mod probe;
mod vocab;
mod weights;

pub use backend::CudaBackend;
pub use gpu::{router_layout, token_bucket, DeviceRouter, DEFAULT_GRAPH_MAX_TOKENS};
pub use harness::KernelHarness;
pub use probe::{nvrtc_available, probe, ProbeInfo};
pub use vocab::DeviceVocab;
pub use weights::write_random_model;
