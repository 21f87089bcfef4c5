//! tiergate: LLM-routing decisions for gateways. Route (the cheapest model likely to pass)
//! and Verify (ship a cheap answer or escalate), decided fast over gRPC.
//!
//! # Layout
//!
//! Arrows point one way, top to bottom; no file or folder imports one above it (a test,
//! `tests/layers.rs`, fails on a new cycle or an upward import).
//!
//! | layer | folder | open first | what |
//! |---|---|---|---|
//! | edge | [`server`] | `server/grpc.rs` | gRPC Router, health, reflection; proto ↔ domain (`convert.rs`), errors → status (`status.rs`), drain |
//! | edge | [`gateway`] | `gateway/cascade.rs` | OpenAI-compatible HTTP front (the whole cascade) and Envoy ext_proc, beside `server` |
//! | offline | [`eval`], [`tools`] | `eval/replay.rs` | train / score / eval, gpu-check; beside the edge, on the same decisions |
//! | decisions | [`service`] | `service/mod.rs` | Route and Verify on domain types; the rules in `service/decide.rs` |
//! | text → embedding | [`pipeline`] | `pipeline.rs` | tokenizer pool, embedding cache, into the batcher |
//! | settings | [`config`], [`policy`] | `policy/mod.rs` | one config type; the catalog and a request's policy |
//! | batching | [`batch`] | `batch/mod.rs` | bounded queue, priorities, deadlines, token-budget batches |
//! | backends | [`engine`] | `engine/mod.rs` | CPU (`cpu.rs`) and CUDA (`cuda/backend.rs`) |
//! | model | [`model`] | `model/encoder.rs` | MiniLM, tokenizer, heads (`heads.rs`) |
//! | vocabulary | [`base`] | `base/backend.rs` | `PackedBatch`, the `Backend` trait and its error, numerics |
//!
//! `metrics` (names only) and `proto` (generated) sit beside `base`. ARCHITECTURE.md walks a
//! Route and a Verify through these files.
pub mod base;
pub mod batch;
pub mod config;
pub mod engine;
pub mod eval;
pub mod gateway;
mod metrics;
pub mod model;
pub mod pipeline;
pub mod policy;
pub mod server;
pub mod service;
pub mod tools;

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("tiergate.v1");
    /// The generated services' codec (build.rs `codec_path`): prost's, except that a message
    /// that does not parse (malformed bytes, invalid UTF-8 in a string field) is the sender's
    /// mistake, INVALID_ARGUMENT, where tonic-prost says INTERNAL. A server decodes requests
    /// before any handler runs, so this is the only place that can tell the client so. The
    /// generated clients share it: a reply that does not parse reads INVALID_ARGUMENT there.
    pub mod codec {
        use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
        use tonic::{Code, Status};
        use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

        pub struct ParseCodec<T, U>(ProstCodec<T, U>);

        // By hand: a derive would ask T and U for Default too.
        impl<T, U> Default for ParseCodec<T, U> {
            fn default() -> Self {
                Self(ProstCodec::new())
            }
        }

        impl<T, U> Codec for ParseCodec<T, U>
        where
            T: prost::Message + Send + 'static,
            U: prost::Message + Default + Send + 'static,
        {
            type Encode = T;
            type Decode = U;
            type Encoder = ProstEncoder<T>;
            type Decoder = ParseDecoder<U>;

            fn encoder(&mut self) -> Self::Encoder {
                self.0.encoder()
            }

            fn decoder(&mut self) -> Self::Decoder {
                ParseDecoder(self.0.decoder())
            }
        }

        pub struct ParseDecoder<U>(ProstDecoder<U>);

        impl<U: prost::Message + Default> Decoder for ParseDecoder<U> {
            type Item = U;
            type Error = Status;

            fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
                // prost's decoder fails only on a parse error (its INTERNAL); its message is
                // short and quotes no client bytes.
                self.0.decode(buf).map_err(|s| match s.code() {
                    Code::Internal => Status::invalid_argument(s.message()),
                    _ => s,
                })
            }

            fn buffer_settings(&self) -> BufferSettings {
                self.0.buffer_settings()
            }
        }
    }
    /// Encoded descriptors of tiergate.proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tiergate_descriptor.bin"));
}
