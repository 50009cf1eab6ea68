//! Generates the gRPC code from `proto/shardseek/v1/*.proto` with `protox` (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "shardseek/v1/rows.proto",
    "shardseek/v1/expert.proto",
    "shardseek/v1/generate.proto",
    "shardseek/v1/attention.proto",
    "shardseek/v1/gateway.proto",
    "shardseek/v1/placement.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    tonic_prost_build::configure()
        // `Rows` is written by hand (src/rows.rs): received payloads are `Bytes` slices of the
        // frame, and outgoing rows are encoded straight into the frame buffer.
        .extern_path(".shardseek.v1.Rows", "crate::rows::Rows")
        // Reserves each message's length before encoding it (src/codec.rs).
        .codec_path("crate::codec::WireCodec")
        .compile_fds(fds)?;
    Ok(())
}
