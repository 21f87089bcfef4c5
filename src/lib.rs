//! tiergate: LLM-routing decisions over gRPC. The data path:
//! server (gRPC) → batch (queue, packing) → engine (backends) → model (encoder, heads) → policy.
pub mod batch;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod policy;
pub mod server;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("tiergate.v1");
    /// Encoded descriptors of tiergate.proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tiergate_descriptor.bin"));
}
