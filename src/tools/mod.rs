//! Offline commands beside the server, on top of the stack: a gRPC client for trying the
//! service (`tiergate call`) and the GPU diagnostics. (Training, scoring and replay live in `eval`.)
#![forbid(unsafe_code)]
pub mod client;
pub mod gpu_check;
