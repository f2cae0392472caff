//! Compiles `proto/quorum_quest_api.proto` with protox (a pure-Rust protobuf
//! compiler), so building this crate never needs a system `protoc` and ignores
//! whatever `PROTOC` points at.
//!
//! The server stubs are generated only with the `testing` feature (the
//! in-process `TestServer` implements them); the client never needs them.

use std::io;

fn main() -> io::Result<()> {
    let proto = "proto/quorum_quest_api.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile([proto], ["proto"]).map_err(|e| io::Error::other(e.to_string()))?;

    let testing = std::env::var_os("CARGO_FEATURE_TESTING").is_some();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(testing)
        .compile_fds(fds)
}
