//! Compiles proto/ with protox (pure Rust), so a fresh machine needs no protoc.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tiergate/v1/tiergate.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The descriptor set also feeds server reflection.
    std::fs::write(
        out.join("tiergate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, with a request that does not parse answered INVALID_ARGUMENT.
        .codec_path("crate::proto::codec::ParseCodec")
        .compile_fds(fds)?;
    Ok(())
}
