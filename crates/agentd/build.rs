//! Build steps: generate the gRPC code from `proto/` with a pure-Rust protobuf compiler (no system `protoc`), and
//! rebuild when a migration changes (`sqlx::migrate!` embeds them at compile time).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../migrations");
    println!("cargo:rerun-if-changed=../../proto");
    let descriptors = protox::compile(["agents.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // A request that does not parse is the caller's error: see `src/grpc/codec.rs`.
        .codec_path("crate::grpc::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
